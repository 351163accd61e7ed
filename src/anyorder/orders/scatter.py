"""``scatter`` ("BOP-AR" of "On the Trainability of Masked Diffusion Language Models via Blockwise Locality" (2026)): groups are columns (offset inside a block of S).

Key j is visible to query i iff j is prompt or offset(j) <= offset(i). Training is random
masking under that mask with that paper's clamp(1/t, 0.1, 10) weighting by default; decoding
goes column by column (offset 0 of every block first), in any order inside a column.
"""
from __future__ import annotations

import torch

from . import masks
from .base import lowest_open
from .random import ScheduledMasking
from .registry import ORDERS


@ORDERS.register("scatter")
class ScatterOrder(ScheduledMasking):
    attention = "offset(key) <= offset(query)"
    reads_logp = False  # allowed() ignores logp
    default_weighting = "clamp"
    default_decoder = "top_prob"

    def __init__(self, block_size: int = 4, schedule="linear", **kw):
        super().__init__(schedule=schedule, block_size=block_size, **kw)

    def train_attention(self, layout):
        return masks.scatter(layout)

    def label(self) -> str:
        return f"Scatter {self.block_size}"

    def natural_decoder(self, seq_len, steps=None):
        """Column by column, random positions inside a column, KV cache."""
        return {"name": "scatter_offsets", "steps_per_offset": max(1, int(steps or seq_len) // self.block_size),
                "score": "random", "cache": True}

    def decode_attention(self, masked, layout):
        return masks.scatter(layout)

    def allowed(self, masked, layout, logp):
        return lowest_open(masked, layout, layout.offset)  # the lowest unfinished column

    def frozen(self, masked, layout):
        # a column c sees only columns <= c: finished columns left of the first open one are final
        m = masked & layout.answer
        none_open = torch.full_like(layout.offset, self.block_size)
        first = torch.where(m, layout.offset, none_open).min(-1, keepdim=True).values
        return layout.prompt | (layout.answer & (layout.offset < first))

    def live(self, masked, layout):
        return self.allowed(masked, layout, None)  # allowed() does not read logp
