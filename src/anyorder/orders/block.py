"""``block``: BD3-LM block diffusion. Blocks left to right, random order inside, block-causal.

Efficient plan (default): the vectorised ``[x_t ⊕ x_0]`` pass. Each (sequence, block) gets its
own noise level t from a stratified draw; unlike BD3-LM (whose strata put all blocks of one
sequence at nearly the same t: Arriola et al., 2025, arXiv 2503.09573) the strata are shuffled across blocks, so one
sequence sees diverse noise levels. Loss weight 1/t on masked tokens (each block's MDLM ELBO).
``plan="generic"`` uses the ε-block schedule under the single-stream block-causal mask.
"""
from __future__ import annotations

import torch

from . import masks
from .plans import block_rules, two_stream_plan
from .base import Layout, first_open_block
from .random import ScheduledMasking
from .registry import ORDERS
from .schedules import EpsBlock


def stratified_block_t(B: int, nb: int, gen: torch.Generator, eps: float = 1e-3) -> torch.Tensor:
    n = B * nb
    strata = torch.randperm(n, generator=gen).to(torch.float64)
    u = (torch.rand(n, generator=gen, dtype=torch.float64) + strata) / n
    return ((1 - eps) * u + eps).view(B, nb)


@ORDERS.register("block")
class BlockOrder(ScheduledMasking):
    attention = "block-causal"
    reads_logp = False  # allowed() ignores logp
    default_decoder = "top_prob"

    def __init__(self, block_size: int = 4, plan: str = "efficient", eps: float = 1e-3, **kw):
        super().__init__(schedule=EpsBlock(eps, block_size), block_size=block_size, **kw)
        if plan not in ("efficient", "generic"):
            raise ValueError(f"order.plan must be 'efficient' or 'generic', got {plan!r}")
        self.plan = plan

    def train_attention(self, layout: Layout):
        return masks.block_causal(layout)

    def label(self) -> str:
        return f"block {self.block_size}"

    def natural_decoder(self, seq_len, steps=None):
        """BD3-LM: MDLM's ancestral sampler inside each block, blocks left to right, KV cache;
        ``steps`` is rounded up to a multiple of the number of blocks."""
        n_blocks = -(-int(seq_len) // self.block_size)
        per_block = max(1, -(-int(steps or seq_len) // n_blocks))
        return {"name": "ancestral", "steps": per_block * n_blocks, "window": self.block_size, "cache": True}

    def train_plan(self, x0, layout, mask_id, gen):
        if self.plan == "generic":
            return super().train_plan(x0, layout, mask_id, gen)
        B, L = x0.shape
        nb = int(layout.n_blocks.max())
        tb = stratified_block_t(B, max(nb, 1), gen)
        t = torch.gather(tb, 1, layout.block.clamp_min(0))  # [B, L]
        masked = torch.rand(B, L, generator=gen, dtype=torch.float64) < t
        return two_stream_plan(x0, layout, mask_id, masked, 1.0 / t, t, *block_rules(layout))

    def decode_attention(self, masked, layout):
        return masks.block_causal(layout)

    def allowed(self, masked, layout, logp):
        return masked & (layout.block == first_open_block(masked, layout).unsqueeze(-1))

    def frozen(self, masked, layout):
        # block-causal: a finished block left of the first open one sees only finished blocks
        return layout.prompt | (layout.answer & (layout.block < first_open_block(masked, layout).unsqueeze(-1)))

    def live(self, masked, layout):
        return self.allowed(masked, layout, None)  # allowed() does not read logp
