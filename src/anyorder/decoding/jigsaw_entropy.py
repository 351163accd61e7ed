"""``jigsaw_entropy``: Jigsaw's block order made an explicit decoder ("BAD-AR" in
"On the Trainability of Masked Diffusion Language Models via Blockwise Locality" (2026)).

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

from typing import Optional

import torch

from ..orders.jigsaw import probe_block
from .loop import DECODERS, Decoder, check_range


@DECODERS.register("jigsaw_entropy")
class JigsawEntropyDecoder(Decoder):
    """Probe pass -> the unfinished block with the lowest mean entropy -> left to right inside it."""

    score = "left_to_right"
    needs_all_logits = True  # the probe reads the entropy of every masked position

    def __init__(self, blocks: Optional[int] = None, **kw):
        if kw.get("steps") is not None or kw.get("window") is not None or kw.get("score") is not None:
            raise ValueError("decoder 'jigsaw_entropy' picks its own blocks and goes left to right in them; "
                             "it takes decoder.blocks (block length) and decoder.k, not steps/window/score")
        super().__init__(**kw)
        self.blocks = None if blocks is None else check_range("blocks", blocks, 1, kind=int)

    def block_of(self, layout) -> torch.Tensor:
        return layout.block if self.blocks is None else torch.where(layout.answer, layout.aidx // self.blocks, -1)

    def allowed(self, st, dist, masked=None):
        masked = (st.masked if masked is None else masked) & st.answer
        logp = dist.logp()  # the probe reads the entropy of every masked position
        ok = st.order.allowed(masked, st.layout, logp) & masked
        block = self.block_of(st.layout)
        nb = int(block.max().clamp_min(0)) + 1
        has_ok = torch.zeros(masked.shape[0], nb, dtype=torch.long, device=masked.device).scatter_add_(1, block.clamp_min(0), ok.long()) > 0
        chosen = probe_block(logp, masked, st.answer, block, nb, candidate=has_ok)   # a block with an allowed position
        st.info.setdefault("block_order", []).append(torch.where(masked.any(-1), chosen, -1))
        return ok & (block == chosen.unsqueeze(-1))
