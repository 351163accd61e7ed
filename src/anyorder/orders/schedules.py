"""Per-position keep-probability schedules α_i(t) and their velocities A_i(t).

OeMDM's point ("Unifying Masked Diffusion Models with Various Generation Orders and
Beyond", arXiv 2602.02112): MDLM, AR and block diffusion are one NELBO with different α_i(t).
Each schedule maps ``t`` [B] and the answer index ``aidx`` [B, L] (with ``n`` answer positions
per row) to ``alpha`` and ``velocity`` of shape [B, L], where
``velocity = -alpha'(t) / (1 - alpha(t))`` and ``rate = -alpha'(t)`` (the integrable quantity
the exact NELBO integrates: P(masked)·A = -α').
"""
from __future__ import annotations

import math

import torch

from ..checks import check_float
from ..registry import Registry

SCHEDULES: Registry = Registry("schedule")


class Schedule:
    """Subclasses implement ``alpha_and_rate``; ``velocity`` follows from it."""

    def alpha_and_rate(self, t: torch.Tensor, aidx: torch.Tensor, n: torch.Tensor):
        raise NotImplementedError

    def velocity(self, t, aidx, n):
        alpha, rate = self.alpha_and_rate(t, aidx, n)
        return alpha, rate / (1 - alpha).clamp_min(1e-12)

    def breakpoints(self, n: int):
        """Points in [0, 1] where α' is discontinuous (for piecewise quadrature)."""
        return [0.0, 1.0]


def _bt(t, like):
    return t.to(like.device, torch.float64).view(-1, *([1] * (like.dim() - 1))).expand(like.shape)


@SCHEDULES.register("linear")
class Linear(Schedule):
    """MDLM / LLaDA: α = 1 − t, A = 1/t."""

    def alpha_and_rate(self, t, aidx, n):
        t = _bt(t, aidx)
        return 1 - t, torch.ones_like(t)


@SCHEDULES.register("cosine")
class Cosine(Schedule):
    """α = cos(πt/2)."""

    def alpha_and_rate(self, t, aidx, n):
        t = _bt(t, aidx)
        return torch.cos(math.pi * t / 2), (math.pi / 2) * torch.sin(math.pi * t / 2)


@SCHEDULES.register("polynomial")
class Polynomial(Schedule):
    """α = 1 − t^c, A = c/t (c = 1 is linear)."""

    def __init__(self, c: float = 1.0):
        self.c = check_float("order.schedule.c", c, 0, lo_open=True, note=" (polynomial schedule)")

    def alpha_and_rate(self, t, aidx, n):
        t = _bt(t, aidx)
        return 1 - t ** self.c, self.c * t ** (self.c - 1)


@SCHEDULES.register("eps_block")
class EpsBlock(Schedule):
    """Block diffusion as a schedule: block b (0-based, nb blocks) owns the window
    [(nb-b-1)/nb, (nb-b)/nb] and is linear inside it; ε mixes in a strictly decreasing 1 − t.
    With block_size 1 this is the ε-AR schedule (:class:`EpsAR`)."""

    def __init__(self, eps: float = 1e-3, block_size: int = 1):
        self.eps, self.block_size = check_float("order.eps", eps, 0, 1, hi_open=True), int(block_size)

    def _nb(self, n):
        return (n + self.block_size - 1) // self.block_size

    def alpha_and_rate(self, t, aidx, n):
        t = _bt(t, aidx)
        nb = self._nb(n).to(torch.float64).view(-1, *([1] * (aidx.dim() - 1)))
        b = (aidx.clamp_min(0) // self.block_size).to(torch.float64)
        hi = (nb - b) / nb                       # window upper end; α_b = clip(nb·(hi − t), 0, 1)
        sharp = (nb * (hi - t)).clamp(0, 1)
        inside = ((hi - t) > 0) & ((hi - t) < 1 / nb)
        alpha = (1 - self.eps) * sharp + self.eps * (1 - t)
        rate = (1 - self.eps) * nb * inside.to(torch.float64) + self.eps
        return alpha, rate

    def breakpoints(self, n: int):
        nb = self._nb(torch.tensor(n)).item()
        return [k / nb for k in range(nb + 1)]


@SCHEDULES.register("eps_ar")
class EpsAR(EpsBlock):
    """ε-AR, AR as a masking schedule: position i owns the time slice [(L−i)/L, (L−i+1)/L]."""

    def __init__(self, eps: float = 1e-3):
        super().__init__(eps=eps, block_size=1)


def build_schedule(spec) -> Schedule:
    """``"linear"``, ``{"name": "polynomial", "c": 2}`` or a :class:`Schedule` instance."""
    return SCHEDULES.build(spec)
