"""Adapters to the outside world: Hugging Face masked-diffusion LMs and lm-evaluation-harness.

Both need optional packages (``pip install 'anyorder[hf]'`` / ``'anyorder[lm_eval]'``), so nothing
heavy is imported here: ``from anyorder.adapters import load_hf_model`` imports it on first use.
Importing :mod:`anyorder.adapters.lm_eval` registers the lm_eval model ``"anyorder"``;
:mod:`anyorder.adapters.hf_generate` is ``anyorder generate`` (any order on a Hugging Face directory);
:mod:`anyorder.adapters.hf_export` is ``anyorder export`` (an hf-backbone run as such a directory).
"""
from importlib import import_module

_EXPORTS = {
    "HFMaskedDiffusionLM": "hf", "HFAdapterConfig": "hf", "load_hf_model": "hf", "prompt_ids": "hf",
    "masked_batch": "hf", "generate": "hf",
    "DecodeCore": "lm_eval", "GenRequest": "lm_eval", "build_core": "lm_eval", "evaluate": "lm_eval",
    "task_stats": "lm_eval",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'anyorder.adapters' has no attribute {name!r}")
    return getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
