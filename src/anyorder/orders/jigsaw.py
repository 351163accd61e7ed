"""``jigsaw`` ("BAD-AR" of "On the Trainability of Masked Diffusion Language Models via Blockwise Locality" (2026)): blocks in an order chosen at inference, left to right inside.

Training masks ceil(t·nb) whole blocks (at least one). Attention: prompt and unmasked blocks are
visible to all; a masked block is causal inside and cannot see other masked blocks.

``teacher_forced=True`` (default, our faithful reading of the paper): a two-stream pass where the
masked token k of a block sees the *clean* tokens < k of its block, exactly what it sees at
inference when the block is generated left to right. ``teacher_forced=False`` reproduces the
released code: every token of a masked block is [MASK], so the causal mask inside the block
carries no left-to-right signal.

Decoding: each forward pass doubles as the probe: if no block is in progress, the unfinished
block with the lowest mean entropy over its masked tokens is started; a started block is
finished left to right, one token per step.
"""
from __future__ import annotations

import math

import torch

from ..checks import check_bool
from . import masks
from .plans import jigsaw_rules, masked_plan, two_stream_plan
from .base import Order, low_discrepancy_t
from .registry import ORDERS


@ORDERS.register("jigsaw")
class JigsawOrder(Order):
    attention = "masked blocks causal inside, blind to each other"
    default_weighting = "clamp"
    default_decoder = "left_to_right"

    def __init__(self, block_size: int = 4, teacher_forced: bool = True, **kw):
        super().__init__(block_size=block_size, **kw)
        self.teacher_forced = check_bool("order.teacher_forced", teacher_forced)

    def train_plan(self, x0, layout, mask_id, gen):
        B, L = x0.shape
        nb = layout.n_blocks
        t = low_discrepancy_t(B, gen).to(torch.float64)
        r = torch.clamp(torch.ceil(t * nb), min=1).long()  # number of masked blocks per row
        nbmax = int(nb.max())
        # a random subset of r blocks per row: the r smallest of iid uniforms over valid blocks
        keys = torch.rand(B, nbmax, generator=gen, dtype=torch.float64)
        keys = torch.where(torch.arange(nbmax).unsqueeze(0) < nb.unsqueeze(1), keys, torch.full_like(keys, 2.0))
        rank = keys.argsort(-1).argsort(-1)
        chosen = rank < r.unsqueeze(-1)                                    # [B, nbmax]
        block_masked = torch.gather(chosen, 1, layout.block.clamp_min(0)) & layout.answer
        tt = (r.to(torch.float64) / nb.to(torch.float64)).unsqueeze(-1).expand(B, L)
        w = 1.0 / tt  # any-order block AR ELBO: nb / r
        if self.teacher_forced:
            return two_stream_plan(x0, layout, mask_id, block_masked, w, tt, *jigsaw_rules(layout, block_masked))
        attn = masks.jigsaw(layout, layout.answer & ~block_masked)
        return masked_plan(x0, layout, mask_id, block_masked, w, tt, attn)

    @staticmethod
    def _finished_blocks(masked, layout):
        open_blocks = torch.zeros(masked.shape[0], int(layout.n_blocks.max()) + 1, dtype=torch.bool,
                                  device=masked.device)
        idx = torch.where(masked & layout.answer, layout.block, torch.full_like(layout.block, open_blocks.shape[1] - 1))
        open_blocks.scatter_(1, idx, True)
        return ~torch.gather(open_blocks, 1, layout.block.clamp_min(0)) & layout.answer

    def frozen(self, masked, layout):
        # only the prompt: a finished block sees every finished block, so it changes whenever another
        # block finishes, and a block in progress changes when it finishes (it then sees its own
        # later tokens); see docs/kv_cache.md
        return layout.prompt

    def decode_attention(self, masked, layout):
        return masks.jigsaw(layout, self._finished_blocks(masked, layout))

    def allowed(self, masked, layout, logp):
        m = masked & layout.answer
        chosen = probe_block(logp, m, layout.answer, layout.block, int(layout.n_blocks.max()))  # [B]
        in_block = m & (layout.block == chosen.unsqueeze(-1))
        big = torch.iinfo(torch.long).max
        first = torch.where(in_block, layout.aidx, torch.full_like(layout.aidx, big)).min(-1, keepdim=True).values
        return in_block & (layout.aidx == first)


def probe_block(logp, masked, answer, block, n_blocks: int, candidate=None) -> torch.Tensor:
    """[B] the block Jigsaw decodes next (the probe): a block in progress (some of its answer
    positions committed, some masked) if there is one, else the unfinished block whose masked
    positions have the lowest mean entropy under ``logp`` (ties: leftmost). ``block`` [B, L] is
    each position's block (-1 on prompt), ``candidate`` [B, n_blocks] optionally the blocks that
    may be chosen. Also the policy of the ``jigsaw_entropy`` decoder under any order."""
    B = masked.shape[0]
    m = masked & answer
    blk = block.clamp_min(0)
    n_masked = torch.zeros(B, n_blocks, dtype=torch.long, device=m.device).scatter_add_(1, blk, m.long())
    n_total = torch.zeros(B, n_blocks, dtype=torch.long, device=m.device).scatter_add_(1, blk, answer.long())
    started = (n_masked > 0) & (n_masked < n_total)
    ent = -(logp.exp() * logp.clamp_min(-1e30)).sum(-1).double()                 # 0 * -inf guarded
    ent_sum = torch.zeros(B, n_blocks, dtype=torch.float64, device=m.device).scatter_add_(1, blk, torch.where(m, ent, 0.0))
    key = torch.where(n_masked > 0, ent_sum / n_masked.clamp_min(1), torch.full_like(ent_sum, math.inf))
    key = torch.where(started, torch.full_like(key, -math.inf), key)             # finish a started block
    if candidate is not None:
        key = torch.where(candidate, key, torch.full_like(key, math.inf))
    return key.argmin(-1)
