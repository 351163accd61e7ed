"""Evaluation beyond task metrics: likelihood bounds (NELBO / perplexity) of any order."""
from .likelihood import is_exact, likelihood, likelihood_of_run, nelbo_total

__all__ = ["is_exact", "likelihood", "likelihood_of_run", "nelbo_total"]
