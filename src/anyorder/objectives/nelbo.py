"""The one objective: per-position weighted masked cross-entropy (OeMDM's NELBO, SPEC §2).

``plan_loss`` scores any :class:`TrainPlan` with a chosen weighting:

- ``elbo``    A_i(t), the NELBO weight (an upper bound on NLL per answer token);
- ``clamp``   clamp(1/t, 0.1, 10), seed 000's weighting;
- ``uniform`` 1 on every masked position;
- ``focal``   A_i(t)·α(1−p)^γ, MGDM's token reweighting on top of the ELBO weight.

The loss is a sum over scored positions divided by the number of answer tokens, so under
``elbo`` it estimates the NELBO per token (MDLM's convention, REFERENCE §2).

``exact_nelbo`` integrates the same objective exactly (Gauss–Legendre in t, all 2^n mask
patterns) for short sequences: the ground truth the efficient plans are tested against.
"""
from __future__ import annotations

import itertools
from typing import Callable, Dict, Optional

import numpy as np
import torch
import torch.nn.functional as F

from ..orders.base import Layout, TrainPlan
from ..registry import unknown_choice

WEIGHTINGS = ("elbo", "clamp", "uniform", "focal")


def expand_extra(extra: Optional[Dict[str, torch.Tensor]], index: Optional[torch.Tensor]):
    if not extra or index is None:
        return extra
    return {k: v.index_select(-1, index) for k, v in extra.items()}


def plan_logits(model, plan: TrainPlan, extra=None) -> torch.Tensor:
    """Logits [B, L, V] of the scored (first L) query rows of a plan."""
    L = plan.targets.shape[1]
    positions = plan.index if plan.index is not None else None
    t = plan.time if getattr(model, "cfg", None) is not None and model.cfg.time_conditioning else None
    logits = model(plan.tokens, attn_mask=plan.attn, positions=positions,
                   extra=expand_extra(extra, plan.index), t=t)
    return logits[:, :L]


def token_weights(weighting: str, plan: TrainPlan, logp_target: torch.Tensor,
                  focal_alpha: float = 0.25, focal_gamma: float = 2.0) -> torch.Tensor:
    if weighting == "elbo":
        w = plan.elbo_weight
    elif weighting == "clamp":
        w = torch.clamp(1.0 / plan.t.clamp_min(1e-12), 0.1, 10.0)
    elif weighting == "uniform":
        w = torch.ones_like(plan.elbo_weight)
    elif weighting == "focal":
        p = logp_target.detach().exp()
        w = plan.elbo_weight * focal_alpha * (1 - p) ** focal_gamma
    else:
        raise unknown_choice("weighting", weighting, list(WEIGHTINGS))
    return torch.where(plan.scored, w, torch.zeros_like(w))


def plan_loss(model, plan: TrainPlan, extra=None, weighting: str = "elbo", **kw):
    """(loss, stats): weighted masked CE summed over scored positions / number of answer tokens."""
    logits = plan_logits(model, plan, extra)
    logp = F.log_softmax(logits.float(), dim=-1)
    logp_t = logp.gather(-1, plan.targets.unsqueeze(-1)).squeeze(-1)
    w = token_weights(weighting, plan, logp_t, **kw)
    n_tok = (plan.answer.sum() if plan.answer is not None else plan.targets.numel()).clamp_min(1)
    ce = torch.where(plan.scored, -logp_t, torch.zeros_like(logp_t))
    loss = (w * ce).sum() / n_tok
    with torch.no_grad():
        n_scored = plan.scored.sum().clamp_min(1)
        acc = ((logits.argmax(-1) == plan.targets) & plan.scored).sum() / n_scored
        stats = {"masked_ce": float(ce.sum() / n_scored), "masked_acc": float(acc),
                 "masked_frac": float(plan.scored.sum() / n_tok)}
    return loss, stats


@torch.no_grad()
def exact_nelbo(logp_fn: Callable[[torch.Tensor], torch.Tensor], x0: torch.Tensor, answer: torch.Tensor,
                schedule, mask_id: int, n_quad: int = 24) -> float:
    """Exact NELBO (nats, summed over answer positions) of one sequence.

    ``logp_fn(z)`` maps a batch of noisy sequences [P, L] to log-probabilities [P, L, V].
    Uses: E[Σ_{i masked} A_i CE_i] = Σ_i (−α_i') E_{z_{-i}}[CE_i(z with i masked)], whose
    integrand is bounded, so Gauss–Legendre per smooth piece converges fast.
    """
    x0, answer = x0.view(-1), answer.view(-1).bool()
    pos = answer.nonzero().view(-1)
    n = len(pos)
    if n > 14:
        raise ValueError(f"exact_nelbo enumerates 2^n mask patterns; n={n} answer positions is too many (max 14)")
    patterns = torch.tensor(list(itertools.product([0, 1], repeat=n)), dtype=torch.bool)  # [P, n] 1 = masked
    z = x0.unsqueeze(0).repeat(len(patterns), 1)
    z[:, pos] = torch.where(patterns, torch.full_like(z[:, pos], mask_id), z[:, pos])
    logp = logp_fn(z).double()                                                           # [P, L, V]
    ce = -logp[:, pos, :].gather(-1, x0[pos].view(1, n, 1).expand(len(patterns), n, 1)).squeeze(-1)  # [P, n]
    lay = Layout.from_answer(answer.view(1, -1))
    aidx = lay.aidx[:, pos]                                                               # [1, n]
    nodes, weights = np.polynomial.legendre.leggauss(n_quad)
    bps = schedule.breakpoints(n)
    total = 0.0
    for lo, hi in zip(bps[:-1], bps[1:]):
        ts = torch.tensor(lo + (hi - lo) * (nodes + 1) / 2, dtype=torch.float64)
        ws = torch.tensor((hi - lo) / 2 * weights, dtype=torch.float64)
        alpha, rate = schedule.alpha_and_rate(ts, aidx.expand(len(ts), n), torch.full((len(ts),), n))
        # factor[t, p, j] = P(position j in state pattern[p, j])
        fac = torch.where(patterns.unsqueeze(0), (1 - alpha).unsqueeze(1), alpha.unsqueeze(1))  # [T, P, n]
        for i in range(n):
            others = torch.cat([fac[..., :i], fac[..., i + 1:]], dim=-1).prod(-1)              # [T, P]
            term = (others * patterns[:, i].double().unsqueeze(0) * ce[:, i].unsqueeze(0)).sum(-1)  # [T]
            total += float((ws * rate[:, i] * term).sum())
    return total
