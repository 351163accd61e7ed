"""``scatter_offsets``: decode column by column with a fixed number of steps per column.

Read the answer as blocks × offsets (stride S, default the order's block size). Under the
``scatter`` order *any* decoder already decodes offset by offset, because the order only
allows the lowest unfinished offset (its ``allowed``); inside a column it commits ``k`` per
step by the decoder's score. What this decoder adds is a *schedule per column*: the columns
are its semi-AR windows, and each column is decoded in exactly ``steps_per_offset`` steps
(its tokens split evenly over them, remainder first -- LLaDA's split), so
``steps_per_offset=1`` commits a whole column per forward pass (AFP = number of blocks) and
the total NFE is S × steps_per_offset whatever the answer length. Under other orders it
imposes the same column-by-column policy (where the order allows it).
"""
from __future__ import annotations

from typing import Optional

import torch

from .loop import DECODERS, Decoder, check_range


@DECODERS.register("scatter_offsets")
class ScatterOffsetsDecoder(Decoder):
    """Offset by offset (Scatter's columns), steps_per_offset steps per column, best score first."""

    def __init__(self, steps_per_offset: int = 1, stride: Optional[int] = None, **kw):
        if any(kw.get(o) is not None for o in ("k", "steps", "window")):
            raise ValueError("decoder 'scatter_offsets' schedules by column: give decoder.steps_per_offset "
                             "(and decoder.stride), not k/steps/window")
        super().__init__(**kw)
        self.steps_per_offset = check_range("steps_per_offset", steps_per_offset, 1, kind=int)
        self.stride = None if stride is None else check_range("stride", stride, 1, kind=int)

    def windows(self, layout):
        return layout.offset if self.stride is None else torch.where(layout.answer, layout.aidx % self.stride, -1)

    def counts(self, st, allowed):
        return self.split_counts(st, allowed, torch.full((st.x.shape[0],), self.steps_per_offset, device=st.x.device), at_least=1)
