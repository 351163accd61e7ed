"""``jigsaw_entropy``: Jigsaw's block order made an explicit decoder (seed 000's "BAD-AR").

The answer is read as blocks of ``blocks`` positions (default: the order's block size, 4 for
``jigsaw``). Rule, per row and step:
- if a block is in progress (some of its positions committed, some masked), continue it;
- otherwise the step's forward pass is the *probe*: the next block is the unfinished one whose
  masked positions have the lowest mean entropy under the model (ties: leftmost block);
- inside the block, commit the leftmost ``k`` masked positions (default 1): left to right.
Only positions the order allows are candidates (a block with no allowed position is skipped),
so under ``jigsaw`` -- whose ``allowed`` already probes and picks the same block -- this is
the order's own policy spelled out; under ``random`` (bidirectional attention) it imposes
Jigsaw's policy on a random-order model (``blocks=4`` on 4×4 Sudoku: one grid row per block).
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from .loop import DECODERS, Decoder, check_range


def block_mean_entropy(logp: torch.Tensor, masked: torch.Tensor, block: torch.Tensor, n_blocks: int) -> torch.Tensor:
    """[B, n_blocks] mean entropy of the masked positions of each block (+inf if none)."""
    ent = -(logp.exp() * logp.clamp_min(-1e30)).sum(-1)            # 0 * -inf guarded
    blk = block.clamp_min(0)
    s = torch.zeros(masked.shape[0], n_blocks, dtype=torch.float64).scatter_add_(1, blk, torch.where(masked, ent, 0.0))
    c = torch.zeros(masked.shape[0], n_blocks, dtype=torch.long).scatter_add_(1, blk, masked.long())
    return torch.where(c > 0, s / c.clamp_min(1), torch.full_like(s, math.inf))


@DECODERS.register("jigsaw_entropy")
class JigsawEntropyDecoder(Decoder):
    """Probe pass -> the unfinished block with the lowest mean entropy -> left to right inside it."""

    score = "left_to_right"

    def __init__(self, blocks: Optional[int] = None, **kw):
        if kw.get("steps") is not None or kw.get("window") is not None or kw.get("score") is not None:
            raise ValueError("decoder 'jigsaw_entropy' picks its own blocks and goes left to right in them; "
                             "it takes decoder.blocks (block length) and decoder.k, not steps/window/score")
        super().__init__(**kw)
        self.blocks = None if blocks is None else check_range("blocks", blocks, 1, kind=int)

    def block_of(self, layout) -> torch.Tensor:
        return layout.block if self.blocks is None else torch.where(layout.answer, layout.aidx // self.blocks, -1)

    def allowed(self, st, logp, masked=None):
        masked = (st.masked if masked is None else masked) & st.answer
        ok = st.order.allowed(masked, st.layout, logp) & masked
        block = self.block_of(st.layout)
        nb = int(block.max().clamp_min(0)) + 1
        blk = block.clamp_min(0)
        n_masked = torch.zeros(masked.shape[0], nb, dtype=torch.long).scatter_add_(1, blk, masked.long())
        n_total = torch.zeros(masked.shape[0], nb, dtype=torch.long).scatter_add_(1, blk, st.answer.long())
        has_ok = torch.zeros(masked.shape[0], nb, dtype=torch.long).scatter_add_(1, blk, ok.long()) > 0
        mean_ent = block_mean_entropy(logp, masked, block, nb)
        started = (n_masked > 0) & (n_masked < n_total)
        key = torch.where(started, torch.full_like(mean_ent, -math.inf), mean_ent)   # finish a started block
        key = torch.where(has_ok, key, torch.full_like(key, math.inf))
        chosen = key.argmin(-1)                                                      # leftmost on ties
        st.info.setdefault("block_order", []).append(torch.where(masked.any(-1), chosen, -1))
        return ok & (block == chosen.unsqueeze(-1))
