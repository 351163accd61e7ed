"""Evaluation of trained runs: decoded task metrics and likelihood bounds (NELBO / perplexity).

The bounds themselves are computed by each run's objective (:mod:`anyorder.objectives`); this
package holds what they share.
"""
from .decode import run_decoder
from .likelihood import likelihood_of_run, likelihood_summary

__all__ = ["likelihood_of_run", "likelihood_summary", "run_decoder"]
