"""anyorder: masked diffusion language models with a swappable generation order."""
__version__ = "0.1.0"
