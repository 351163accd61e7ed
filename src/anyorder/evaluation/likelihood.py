"""Honest likelihoods: the NELBO bound and perplexity bound of any order, exact NLL for AR.

For a diffusion order the model defines no tractable likelihood; what it does define is the
NELBO (the per-position-schedule NELBO of "Unifying Masked Diffusion Models with Various
Generation Orders and Beyond", arXiv 2602.02112), an upper bound on the negative
log-likelihood of a proper distribution (for the linear schedule: the mixture over generation
orders of the any-order autoregressive models the network induces; see
tests/test_likelihood.py). So we report

    NELBO / token   and   PPL bound = exp(NELBO / token)     (upper bounds, "≤ PPL")

estimated by Monte Carlo by the run's objective (:meth:`anyorder.objectives.base.Objective.likelihood`):
for a fixed order, its own ``train_plan`` with the ``elbo`` weighting
(:func:`anyorder.objectives.nelbo.likelihood`); for the learned order, LoMDM's own bound.
``samples`` independent replicates each score the whole evaluation set once, with ``t``
stratified across the rows of each batch (the low-discrepancy sampler of MDLM: Sahoo et al.,
2024, arXiv 2406.07524) and fresh masks; the mean of the replicates is the estimate and their
spread gives the standard error. AR's plan (teacher forcing, every position predicted from its
clean prefix) is deterministic and *is* the exact NLL: one replicate, standard error 0.
"""
from __future__ import annotations

import math
import time
from typing import Dict, Optional

import torch


def likelihood_summary(per_rep, exact: bool, sequences: int, n_tok: float, t0: float) -> Dict[str, object]:
    """Mean of the replicates, its standard error and the perplexity (bound) with ±2 s.e."""
    reps = torch.tensor(per_rep, dtype=torch.float64)
    mean = float(reps.mean())
    k = len(per_rep)
    # one replicate of a Monte-Carlo estimate has no error estimate: NaN, not a false 0
    se = 0.0 if exact else (float(reps.std(unbiased=True)) / math.sqrt(k) if k > 1 else float("nan"))
    return {
        "bound": "exact NLL" if exact else "NELBO (upper bound)",
        "nelbo_per_token": mean,
        "stderr": se,
        "ppl": math.exp(mean),
        "ppl_low": math.exp(mean - 2 * se),   # ±2 standard errors of the Monte-Carlo estimate
        "ppl_high": math.exp(mean + 2 * se),
        "bits_per_token": mean / math.log(2),
        "samples": k,
        "replicates": list(per_rep),
        "sequences": int(sequences),
        "tokens": int(n_tok),
        "seconds": round(time.perf_counter() - t0, 3),
    }


def likelihood_of_run(exp, split: str = "test", samples: int = 8, n: Optional[int] = None,
                      batch_size: int = 64, seed: int = 0) -> Dict[str, object]:
    """The likelihood bound of a loaded run (:func:`anyorder.experiment.load_run`) on a split of its
    task. Tasks with named splits (``text``) take ``train``/``validation``/``test``/``zero_shot``;
    other tasks only have their evaluation set (``split='validation'`` or ``'test'``)."""
    task = exp.task
    if not exp.objective.has_likelihood:
        raise ValueError(f"run of task {task.name!r} trains with the {exp.objective.describe()['name']!r} objective, "
                         f"which has no likelihood bound (use anyorder eval for its metrics)")
    if hasattr(task, "split_set"):
        x0, answer = task.split_set(split, n)
    elif split in ("validation", "test"):
        x0, answer = task.eval_set(n or int(exp.cfg["eval"]["n"]))
    else:
        raise ValueError(f"task {task.name!r} has no split {split!r}; it has only its evaluation set "
                         f"(use --split test)")
    res = exp.objective.likelihood(exp.model, x0, answer, samples=samples, batch_size=batch_size, seed=seed)
    res.update({"split": split, "order": exp.order.name, "task": task.name})
    return res
