"""``random``: MDLM / LLaDA random masking. One group, random order, bidirectional attention."""
from __future__ import annotations

import torch

from . import masks
from .plans import masked_plan
from .base import Layout, Order, low_discrepancy_t
from .registry import ORDERS
from .schedules import build_schedule


class ScheduledMasking(Order):
    """Mask each answer position independently with probability 1 − α_i(t) (the generic
    OeMDM estimator) under this order's attention rule."""

    def __init__(self, schedule="linear", block_size: int = 1, **kw):
        super().__init__(block_size=block_size, **kw)
        self.schedule = build_schedule(schedule)

    def train_attention(self, layout: Layout):
        return None

    def train_plan(self, x0, layout, mask_id, gen):
        B, L = x0.shape
        t = low_discrepancy_t(B, gen)
        alpha, velocity = self.schedule.velocity(t, layout.aidx, layout.n_answer)
        u = torch.rand(B, L, generator=gen, dtype=torch.float64)
        masked = u >= alpha  # P(masked) = 1 − α
        return masked_plan(x0, layout, mask_id, masked, velocity, t.view(B, 1).expand(B, L),
                           self.train_attention(layout))


@ORDERS.register("random")
class RandomOrder(ScheduledMasking):
    attention = "bidirectional"
    reads_logp = False  # allowed() ignores logp
    default_decoder = "top_prob"

    def decode_attention(self, masked, layout):
        return None

    def label(self) -> str:
        return "MDLM (random)"

    def natural_decoder(self, seq_len, steps=None):
        return {"name": "ancestral", "steps": int(steps or seq_len)}  # MDLM's ancestral sampler
