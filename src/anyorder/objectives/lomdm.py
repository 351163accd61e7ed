"""LoMDM's objective: learn the generation order jointly with the model.

From "Unifying Masked Diffusion Models with Various Generation Orders and Beyond" (arXiv
2602.02112); the network (backbone + schedule heads g_φ, g_ψ, the exponents k) is
:mod:`anyorder.model.lomdm`. With A_φ^i = k_i / t, per masked position:

    L_main     = A_φ^i · (−log p_θ(x^i | z_t))
    L_velocity = A_φ^i (log A_φ^i − log Â_ψ^i) − (A_φ^i − Â_ψ^i)      (≥ 0, 0 iff A = Â)

φ also changes *which* z_t is drawn, so it needs a score-function gradient: RLOO with two masks
z¹, z² of the same (x, t):

    L_rloo = ½ [log q_φ(z¹|x) − log q_φ(z²|x)] · stopgrad(ℓ(z¹) − ℓ(z²))

where ℓ(z) is the row's summed L_main + L_velocity. Its value is not a loss (it is a gradient
carrier), so :func:`lomdm_loss` adds ``L_rloo − stopgrad(L_rloo)``: the returned loss *value* is
exactly ½(L(z¹) + L(z²)) (the NELBO + velocity estimate), its gradient includes RLOO, and the raw
L_rloo is reported in the stats. Three backbone passes per step: x (for f, no grad), and z¹, z²
as one concatenated batch. :class:`LoMDMObjective` (registered ``lomdm``, named by the
``learned`` order) trains, validates and scores it, with the heads' own learning rate.
"""
from __future__ import annotations

import time
from typing import Dict, List, Optional

import torch
import torch.nn.functional as F

from ..evaluation.likelihood import likelihood_summary
from ..model.lomdm import LoMDM
from ..orders.base import low_discrepancy_t
from .base import OBJECTIVES
from .nelbo import NelboObjective
from .rows import extra_to


def velocity_loss(A: torch.Tensor, A_hat: torch.Tensor) -> torch.Tensor:
    """A (log A − log Â) − (A − Â): the Bregman divergence of x log x, ≥ 0 and 0 iff A = Â."""
    return A * (torch.log(A) - torch.log(A_hat)) - (A - A_hat)


def log_q(k: torch.Tensor, t: torch.Tensor, masked: torch.Tensor, answer: torch.Tensor) -> torch.Tensor:
    """[B] log q_φ(z | x, t) = Σ_answer [masked] log(1 − α) + [kept] log α, with 1 − α = t^k."""
    log_t = torch.log(t.double()).view(-1, 1)
    log_masked = k * log_t                                       # log t^k
    log_kept = torch.log1p(-torch.exp(log_masked).clamp(max=1 - 1e-12))  # log(1 − t^k)
    per = torch.where(masked, log_masked, log_kept)
    return torch.where(answer, per, torch.zeros_like(per)).sum(-1)


def sample_masks(k, t, answer, gen, n: int = 2) -> List[torch.Tensor]:
    """n independent masks with P(masked) = 1 − α = t^k (drawn like ScheduledMasking's, so
    with c2 = 0 the first equals the polynomial order's mask under the same generator)."""
    p_keep = 1 - t.double().view(-1, 1) ** k.detach()
    out = []
    for _ in range(n):
        u = torch.rand(k.shape, generator=gen, dtype=torch.float64).to(k.device)  # the CPU generator's draws
        out.append((u >= p_keep) & answer)
    return out

def loss_terms(model, x0, answer, t, masks, k_phi, extra=None):
    """Per-row summed terms for given t [B], masks (list of [B, L] bool) and k_φ [B, L].

    Returns a dict of [n_masks, B] tensors: ``main`` (Σ A_φ·CE), ``velocity`` (Σ L_velocity),
    ``logq`` (log q_φ(z|x)), plus ``ce``/``correct`` sums for stats.
    """
    n, (B, L) = len(masks), x0.shape
    masked = torch.stack(masks)                                       # [n, B, L]
    z = torch.where(masked, torch.full_like(x0, model.cfg.mask_id), x0).view(n * B, L)
    rep = lambda v: v.unsqueeze(0).expand(n, *v.shape).reshape(n * B, *v.shape[1:])  # noqa: E731
    ex = None if extra is None else {k_: (v if v.dim() == 1 else rep(v)) for k_, v in extra.items()}
    logits, k_hat = model.logits_and_exponent(z, rep(answer), extra=ex, t=rep(t))
    logits, k_hat = logits.view(n, B, L, -1), k_hat.view(n, B, L)
    logp = F.log_softmax(logits, -1).gather(-1, x0.expand(n, B, L).unsqueeze(-1)).squeeze(-1)
    tt = t.double().view(1, B, 1)
    A = (k_phi / tt).expand(n, B, L)
    A_hat = k_hat / tt
    zero = torch.zeros((), dtype=torch.float64)
    main = torch.where(masked, A * -logp.double(), zero).sum(-1)
    vel = torch.where(masked, velocity_loss(A, A_hat), zero).sum(-1)
    logq = torch.stack([log_q(k_phi, t, m, answer) for m in masks])
    with torch.no_grad():
        ce = torch.where(masked, -logp.double(), zero).sum(-1)
        correct = ((logits.argmax(-1) == x0) & masked).sum(-1)
    return {"main": main, "velocity": vel, "logq": logq, "ce": ce, "correct": correct,
            "n_masked": masked.sum(-1), "k_hat": k_hat}

def lomdm_loss(model, x0, answer, gen: torch.Generator, extra=None, t: Optional[torch.Tensor] = None):
    """(loss, stats) of one training step; loss value = ½(L(z¹) + L(z²)) per answer token."""
    device = next(model.parameters()).device  # batches and draws come from the CPU generator
    x0, answer, extra = x0.to(device), answer.to(device).bool(), extra_to(extra, device)
    B = x0.shape[0]
    t = (low_discrepancy_t(B, gen) if t is None else t).to(device)
    k_phi = model.forward_exponent(x0, answer, extra)
    z1, z2 = sample_masks(k_phi, t, answer, gen)
    T = loss_terms(model, x0, answer, t, [z1, z2], k_phi, extra)
    n_tok = answer.sum().clamp_min(1)
    ell = T["main"] + T["velocity"]                                   # [2, B]
    rloo = 0.5 * ((T["logq"][0] - T["logq"][1]) * (ell[0] - ell[1]).detach()).sum() / n_tok
    main, vel = T["main"].sum() / (2 * n_tok), T["velocity"].sum() / (2 * n_tok)
    loss = (main + vel + (rloo - rloo.detach())).float()
    with torch.no_grad():
        n_m = T["n_masked"].sum().clamp_min(1)
        a = answer.unsqueeze(0)
        stats = {"nelbo": float(main), "velocity": float(vel), "rloo": float(rloo),
                 "nelbo_z1": float(T["main"][0].sum() / n_tok), "nelbo_z2": float(T["main"][1].sum() / n_tok),
                 "masked_ce": float(T["ce"].sum() / n_m), "masked_acc": float(T["correct"].sum() / n_m),
                 "masked_frac": float(T["n_masked"].sum() / (2 * n_tok)),
                 "k_mean": float(k_phi[answer].mean()), "k_std": float(k_phi[answer].std()) if answer.sum() > 1 else 0.0,
                 "k_hat_mean": float(T["k_hat"][a.expand_as(T["k_hat"])].mean()),
                 "tokens": int(3 * x0.numel())}
    return loss, stats


@torch.no_grad()
def lomdm_likelihood(model, x0: torch.Tensor, answer: torch.Tensor, samples: int = 4, extra=None,
                     batch_size: int = 64, seed: int = 0) -> Dict[str, object]:
    """LoMDM's NELBO per answer token: E_t E_{z~q_φ(·|x,t)} Σ_masked [A_φ·CE + L_velocity], one
    mask per (row, t), t stratified per batch; ``samples`` replicates give the standard error.
    ``velocity_per_token`` is the velocity part alone (0 when k̂_ψ matches k_φ)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    x0, answer, extra = x0.to(device), answer.to(device).bool(), extra_to(extra, device)
    n_tok = float(answer.sum())
    t0 = time.perf_counter()
    reps, vels = [], []
    for r in range(int(samples)):
        gen = torch.Generator().manual_seed(seed * 1_000_003 + r)
        tot = vel = 0.0
        for i in range(0, len(x0), batch_size):
            xb, ab = x0[i:i + batch_size], answer[i:i + batch_size]
            t = low_discrepancy_t(len(xb), gen).to(device)
            k = model.forward_exponent(xb, ab, extra)
            masks = sample_masks(k, t, ab, gen, n=1)
            terms = loss_terms(model, xb, ab, t, masks, k, extra)
            tot += float(terms["main"].sum() + terms["velocity"].sum())
            vel += float(terms["velocity"].sum())
        reps.append(tot / n_tok)
        vels.append(vel / n_tok)
    model.train(was_training)
    return {**likelihood_summary(reps, False, len(x0), n_tok, t0), "velocity_per_token": sum(vels) / len(vels)}


@OBJECTIVES.register("lomdm")
class LoMDMObjective(NelboObjective):
    """The backbone plus LoMDM's heads, trained with :func:`lomdm_loss` (its own NELBO bound)."""

    weightings = ("elbo",)

    def build_model(self, options):
        return self.order.wrap(super().build_model(options))

    def loss(self, model, batch_size, gen, step):
        x0, answer = self.task.train_batch(batch_size, gen)
        loss, stats = lomdm_loss(model, x0, answer, gen, extra=self.extra)
        stats = {k: float(v) for k, v in stats.items()}
        stats["tokens"] = 3 * int(x0.numel())
        return loss, stats

    def validation_loss(self, model, x0, answer, gen):
        _, stats = lomdm_loss(model, x0, answer, gen, extra=self.extra)
        return {"val_nelbo_per_token": float(stats["nelbo"]), "val_masked_acc": float(stats["masked_acc"])}

    def likelihood(self, model, x0, answer, samples=8, batch_size=64, seed=0):
        return lomdm_likelihood(model, x0, answer, samples=samples, extra=self.extra, batch_size=batch_size,
                                seed=seed)

    def lr_scale(self, lr):
        if self.order.head_lr is None:
            return None
        head_scale = self.order.head_lr / lr
        return lambda name: head_scale if LoMDM.is_head(name) else 1.0
