"""The one objective of every fixed order: per-position weighted masked cross-entropy.

The NELBO of OeMDM ("Unifying Masked Diffusion Models with Various Generation Orders and
Beyond", arXiv 2602.02112): with a per-position schedule α_i(t), the negative ELBO is
E_t E_{z_t} Σ_{i masked} A_i(t) · (−log p_θ(x^i | z_t)), A_i(t) = −α_i'(t) / (1 − α_i(t)).

``plan_loss`` scores any :class:`TrainPlan` with a chosen weighting:

- ``elbo``    A_i(t), the NELBO weight (an upper bound on NLL per answer token);
- ``clamp``   clamp(1/t, 0.1, 10), the weighting of "On the Trainability of Masked Diffusion
              Language Models via Blockwise Locality" (2026);
- ``uniform`` 1 on every masked position;
- ``focal``   A_i(t)·α(1−p)^γ, MGDM's token reweighting (Ye et al., 2024, arXiv 2410.14157)
              on top of the ELBO weight.

The loss is a sum over scored positions divided by the number of answer tokens, so under
``elbo`` it estimates the NELBO per token (MDLM's convention: Sahoo et al., 2024, arXiv 2406.07524).

``exact_nelbo`` integrates the same objective exactly (Gauss–Legendre in t, all 2^n mask
patterns) for short sequences: the ground truth the efficient plans are tested against.

:class:`NelboObjective` (registered ``nelbo``) wires these into training, validation, decoding
and likelihood for any order with a ``train_plan``; :func:`likelihood` is its bound.
"""
from __future__ import annotations

import itertools
import time
from typing import Callable, Dict, Optional

import numpy as np
import torch

from ..evaluation.decode import run_decoder
from ..evaluation.likelihood import likelihood_summary
from ..model import build_backbone
from ..orders.base import Layout, TrainPlan
from ..registry import unknown_choice
from .base import OBJECTIVES, Objective
from .rows import expand_extra, extra_to, plan_time, scored_target_logp

WEIGHTINGS = ("elbo", "clamp", "uniform", "focal")


def plan_logits(model, plan: TrainPlan, extra=None) -> torch.Tensor:
    """Logits [B, L, V] of the scored (first L) query rows of a plan (the full pass)."""
    L = plan.targets.shape[1]
    logits = model(plan.tokens, attn_mask=plan.attn, positions=plan.index,
                   extra=expand_extra(extra, plan.index), t=plan_time(model, plan))
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
    """(loss, stats): weighted masked CE summed over scored positions / number of answer tokens.

    The head and the log-softmax run on the scored rows only (:mod:`.rows`); the sums keep the
    [B, L] layout, so the value is the one the full-logits computation gives, within float rounding.
    """
    device = next(model.parameters()).device  # the plan was drawn on the CPU
    plan, extra = plan.to(device), extra_to(extra, device)
    logp_t, n_correct = scored_target_logp(model, plan, extra, logits_fn=plan_logits)
    w = token_weights(weighting, plan, logp_t, **kw)
    n_tok = (plan.answer.sum() if plan.answer is not None else plan.targets.numel()).clamp_min(1)
    ce = torch.where(plan.scored, -logp_t, torch.zeros_like(logp_t))
    loss = (w * ce).sum() / n_tok
    with torch.no_grad():
        n_scored = plan.scored.sum().clamp_min(1)
        stats = {"masked_ce": float(ce.sum() / n_scored), "masked_acc": float(n_correct / n_scored),
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

    Where the order's training pass is the exact NLL (``order.exact_likelihood``: AR's teacher
    forcing) the result is that NLL; ``samples`` is then 1 whatever was asked.
    """
    if samples < 1:
        raise ValueError(f"samples must be >= 1, got {samples}")
    was_training = model.training
    model.eval()
    exact = bool(order.exact_likelihood)
    k = 1 if exact else int(samples)
    n_tok = float(answer.sum())
    t0 = time.perf_counter()
    reps = []
    for r in range(k):
        gen = torch.Generator().manual_seed(seed * 1_000_003 + r)
        reps.append(nelbo_total(model, order, x0, answer, mask_id, gen, extra, batch_size) / n_tok)
    model.train(was_training)
    return likelihood_summary(reps, exact, len(x0), n_tok, t0)


@OBJECTIVES.register("nelbo")
class NelboObjective(Objective):
    """The NELBO of any order with a fixed masking plan (``order.train_plan`` + :func:`plan_loss`)."""

    weightings = WEIGHTINGS

    def __init__(self, task, order, weighting: Optional[str] = None):
        super().__init__(task, order, weighting)
        self.extra = task.extra()

    def build_model(self, options):
        return build_backbone(options, self.task.vocab_size, self.task.mask_id, self.task.seq_len,
                              dict(self.task.extra_embeddings))

    def loss(self, model, batch_size, gen, step):
        x0, answer = self.task.train_batch(batch_size, gen)
        plan = self.order.train_plan(x0, self.order.layout(answer), self.task.mask_id, gen)
        loss, stats = plan_loss(model, plan, extra=self.extra, weighting=self.weighting)
        stats["tokens"] = int(plan.tokens.numel())
        return loss, stats

    def validation_loss(self, model, x0, answer, gen) -> Dict[str, float]:
        """The held-out NELBO per token and masked accuracy under the ``elbo`` weighting."""
        plan = self.order.train_plan(x0, self.order.layout(answer), self.task.mask_id, gen)
        loss, stats = plan_loss(model, plan, extra=self.extra, weighting="elbo")
        return {"val_nelbo_per_token": float(loss), "val_masked_acc": stats["masked_acc"]}

    def validation(self, n, decoder_spec):
        """Held-out NELBO (fixed masks) and the decoder's task metrics on the first 128 examples."""
        x0, answer = self.task.eval_set(n)

        def eval_fn(model):
            out = self.validation_loss(model, x0, answer, torch.Generator().manual_seed(12345))
            res = run_decoder(model, self, decoder_spec, x0[:128], answer[:128])
            res.update(self.task.model_metrics(model, self.order, x0[:128], answer[:128]))
            out.update({f"val_{k}": v for k, v in res.items() if isinstance(v, float)})
            return out

        return eval_fn

    def evaluate(self, model, decoder_spec, n, batch_size=256, return_results=False):
        x0, answer = self.task.eval_set(n)
        res = run_decoder(model, self, decoder_spec, x0, answer, batch_size, return_results)
        probe = self.task.model_metrics(model, self.order, x0, answer)
        (res[0] if return_results else res).update(probe)
        return res

    def likelihood(self, model, x0, answer, samples=8, batch_size=64, seed=0):
        return likelihood(model, self.order, x0, answer, self.task.mask_id, samples=samples, extra=self.extra,
                          batch_size=batch_size, seed=seed)
