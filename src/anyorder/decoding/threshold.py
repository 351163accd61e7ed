"""``threshold`` (Fast-dLLM: Wu et al., 2025, arXiv 2505.22618): commit every confident token,
at least one per step.

Rule, per row and step: among the positions the order (and the semi-AR window) allows,
commit every one whose confidence -- the model's probability of the proposed token -- is at
least ``tau``; if none reaches ``tau``, commit the single most confident one. So the number
of tokens per step adapts to how sure the model is: many where the answer is determined,
one at a time where it is not. Equality passes, as in Fast-dLLM's ``get_transfer_index``.

Options: ``tau`` in (0, 1] (default 0.9, Fast-dLLM's scripts), ``window`` (semi-AR
windows, Fast-dLLM decodes block by block), ``max_per_step`` (an optional cap), plus the
sampling options. ``k``/``steps`` do not apply: the threshold sets the count.
"""
from __future__ import annotations

from typing import Optional

import torch

from .loop import DECODERS, Decoder, check_range


def threshold_commit(conf: torch.Tensor, allowed: torch.Tensor, tau: float,
                     max_per_step: Optional[int] = None) -> torch.Tensor:
    """[B, L] bool: allowed positions with conf >= tau, plus the most confident allowed one
    (leftmost on ties); at most ``max_per_step`` of them, most confident first."""
    key = torch.where(allowed, conf, torch.full_like(conf, -1.0))
    best = torch.zeros_like(allowed).scatter_(-1, key.argmax(-1, keepdim=True), True) & allowed
    out = (allowed & (conf >= tau)) | best
    if max_per_step is not None:
        order = torch.sort(torch.where(out, -conf, torch.full_like(conf, float("inf"))), dim=-1, stable=True).indices
        rank = torch.empty_like(order).scatter_(
            -1, order, torch.arange(order.shape[-1], device=order.device).expand_as(order))
        out = out & (rank < max_per_step)
    return out


@DECODERS.register("threshold")
class ThresholdDecoder(Decoder):
    """Fast-dLLM's confidence threshold: commit every allowed token whose probability is >= tau,
    at least the most confident one per step."""

    score = "top_prob"

    def __init__(self, tau: float = 0.9, max_per_step: Optional[int] = None, **kw):
        if kw.get("k") is not None or kw.get("steps") is not None:
            raise ValueError("decoder 'threshold' sets the tokens per step from tau; "
                             "drop decoder.k / decoder.steps (use max_per_step to cap it)")
        super().__init__(**kw)
        self.tau = check_range("tau", tau, 0.0, 1.0, lo_open=True)
        self.max_per_step = None if max_per_step is None else check_range("max_per_step", max_per_step, 1, kind=int)

    def choose(self, st, dist, proposal, allowed):
        return threshold_commit(dist.prob_of(proposal), allowed, self.tau, self.max_per_step)
