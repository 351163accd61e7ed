"""Honest likelihoods: the NELBO bound and perplexity bound of any order, exact NLL for AR.

For a diffusion order the model defines no tractable likelihood; what it does define is the
NELBO (SPEC §2), an upper bound on the negative log-likelihood of a proper distribution (for
the linear schedule: the mixture over generation orders of the any-order autoregressive models
the network induces; see tests/test_likelihood.py). So we report

    NELBO / token   and   PPL bound = exp(NELBO / token)     (upper bounds, "≤ PPL")

estimated by Monte Carlo with the order's own ``train_plan`` and the ``elbo`` weighting of
:func:`anyorder.objectives.nelbo.plan_loss` (each order's elbo weights are ELBO weights).
``samples`` independent replicates each score the whole evaluation set once, with ``t``
stratified across the rows of each batch (MDLM's low-discrepancy sampler) and fresh masks; the
mean of the replicates is the estimate and their spread gives the standard error. AR's plan
(teacher forcing, every position predicted from its clean prefix) is deterministic and *is*
the exact NLL: one replicate, standard error 0.
"""
from __future__ import annotations

import math
import time
from typing import Dict, Optional

import torch

from ..objectives.nelbo import plan_loss
from ..orders.base import low_discrepancy_t


def is_exact(order) -> bool:
    """True where the order's training pass computes the exact NLL (AR with its efficient plan)."""
    return getattr(order, "name", None) == "ar" and getattr(order, "plan", "efficient") == "efficient"


@torch.no_grad()
def nelbo_total(model, order, x0, answer, mask_id: int, gen: torch.Generator, extra=None,
                batch_size: int = 64) -> float:
    """One Monte-Carlo replicate: the ELBO-weighted masked CE summed over all rows (nats)."""
    total = 0.0
    for i in range(0, len(x0), batch_size):
        xb, ab = x0[i:i + batch_size], answer[i:i + batch_size]
        plan = order.train_plan(xb, order.layout(ab), mask_id, gen)
        loss, _ = plan_loss(model, plan, extra=extra, weighting="elbo")  # sum / this batch's answer tokens
        total += float(loss) * float(ab.sum())
    return total


@torch.no_grad()
def likelihood(model, order, x0: torch.Tensor, answer: torch.Tensor, mask_id: int, samples: int = 8,
               extra: Optional[Dict[str, torch.Tensor]] = None, batch_size: int = 64, seed: int = 0) -> Dict[str, object]:
    """NELBO per answer token (nats), its standard error, and the perplexity bound.

    For AR (exact) the result is the exact NLL; ``samples`` is then 1 whatever was asked.
    """
    if samples < 1:
        raise ValueError(f"samples must be >= 1, got {samples}")
    was_training = model.training
    model.eval()
    exact = is_exact(order)
    k = 1 if exact else int(samples)
    n_tok = float(answer.sum())
    if n_tok == 0:
        raise ValueError("the evaluation set has no answer (scored) tokens")
    t0 = time.perf_counter()
    per_rep = []
    for r in range(k):
        gen = torch.Generator().manual_seed(seed * 1_000_003 + r)
        per_rep.append(nelbo_total(model, order, x0, answer, mask_id, gen, extra, batch_size) / n_tok)
    model.train(was_training)
    return _summary(per_rep, exact, len(x0), n_tok, t0)


def _summary(per_rep, exact: bool, sequences: int, n_tok: float, t0: float) -> Dict[str, object]:
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


def lomdm_likelihood(model, x0: torch.Tensor, answer: torch.Tensor, samples: int = 4, extra=None,
                     batch_size: int = 64, seed: int = 0) -> Dict[str, object]:
    """LoMDM's NELBO per answer token: E_t E_{z~q_φ(·|x,t)} Σ_masked [A_φ·CE + L_velocity], one
    mask per (row, t), t stratified per batch; ``samples`` replicates give the standard error.
    ``velocity_per_token`` is the velocity part alone (0 when k̂_ψ matches k_φ)."""
    was_training = model.training
    model.eval()
    answer = answer.bool()
    n_tok = float(answer.sum())
    t0 = time.perf_counter()
    reps, vels = [], []
    for r in range(int(samples)):
        gen = torch.Generator().manual_seed(seed * 1_000_003 + r)
        tot = vel = 0.0
        for i in range(0, len(x0), batch_size):
            xb, ab = x0[i:i + batch_size], answer[i:i + batch_size]
            t = low_discrepancy_t(len(xb), gen)
            k = model.forward_exponent(xb, ab, extra)
            masks = model.sample_masks(k, t, ab, gen, n=1)
            terms = model.loss_terms(xb, ab, t, masks, k, extra)
            tot += float(terms["main"].sum() + terms["velocity"].sum())
            vel += float(terms["velocity"].sum())
        reps.append(tot / n_tok)
        vels.append(vel / n_tok)
    model.train(was_training)
    return {**_summary(reps, False, len(x0), n_tok, t0), "velocity_per_token": sum(vels) / len(vels)}


def order_likelihood(model, order, x0, answer, mask_id: int, samples: int = 8, extra=None,
                     batch_size: int = 64, seed: int = 0) -> Dict[str, object]:
    """:func:`likelihood` under a fixed order; LoMDM's own NELBO for the learned order."""
    if getattr(order, "learned", False):
        return lomdm_likelihood(model, x0, answer, samples=samples, extra=extra, batch_size=batch_size, seed=seed)
    return likelihood(model, order, x0, answer, mask_id, samples=samples, extra=extra, batch_size=batch_size,
                      seed=seed)


def likelihood_of_run(exp, split: str = "test", samples: int = 8, n: Optional[int] = None,
                      batch_size: int = 64, seed: int = 0) -> Dict[str, object]:
    """:func:`likelihood` of a loaded run (:func:`anyorder.experiment.load_run`) on a split of its
    task. Tasks with named splits (``text``) take ``train``/``validation``/``test``/``zero_shot``;
    other tasks only have their evaluation set (``split='validation'`` or ``'test'``)."""
    task = exp.task
    if hasattr(task, "split_set"):
        x0, answer = task.split_set(split, n)
    elif split in ("validation", "test"):
        x0, answer = task.eval_set(n or int(exp.cfg["eval"]["n"]))
    else:
        raise ValueError(f"task {task.name!r} has no split {split!r}; it has only its evaluation set "
                         f"(use --split test)")
    res = order_likelihood(exp.model, exp.order, x0, answer, task.mask_id, samples=samples, extra=task.extra(),
                           batch_size=batch_size, seed=seed)
    res.update({"split": split, "order": exp.order.name, "task": task.name})
    return res
