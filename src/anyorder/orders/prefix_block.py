"""``prefix_block``: "blockwise reverse-order training" of "Why mask diffusion does not work".

For a block k: the clean prefix before k is visible, block k is partly masked, everything after
block k is hidden; attention is bidirectional over prefix + block k. Training samples one block
per sequence (uniformly: weight nb/t keeps the estimate unbiased for the sum over blocks, since
the seed's procedure visits every block once). Decoding is semi-autoregressive block by block.
"""
from __future__ import annotations

import torch

from . import masks
from .plans import masked_plan
from .base import Order, first_open_block, low_discrepancy_t
from .registry import ORDERS


@ORDERS.register("prefix_block")
class PrefixBlockOrder(Order):
    attention = "bidirectional over prefix + current block"
    reads_logp = False  # allowed() ignores logp
    default_decoder = "top_prob"

    def __init__(self, block_size: int = 4, **kw):
        super().__init__(block_size=block_size, **kw)

    def train_plan(self, x0, layout, mask_id, gen):
        B, L = x0.shape
        nb = layout.n_blocks.to(torch.float64)
        k = (torch.rand(B, generator=gen, dtype=torch.float64) * nb).floor().long()  # block per row
        t = low_discrepancy_t(B, gen).to(torch.float64)
        in_k = layout.block == k.unsqueeze(-1)
        masked = in_k & (torch.rand(B, L, generator=gen, dtype=torch.float64) < t.unsqueeze(-1))
        w = (nb / t).unsqueeze(-1).expand(B, L)
        return masked_plan(x0, layout, mask_id, masked, w, t.unsqueeze(-1).expand(B, L),
                           masks.up_to_block(layout, k))

    def decode_attention(self, masked, layout):
        return masks.up_to_block(layout, first_open_block(masked, layout))

    def allowed(self, masked, layout, logp):
        return masked & (layout.block == first_open_block(masked, layout).unsqueeze(-1))

    def frozen(self, masked, layout):
        # only the prompt: the finished prefix attends to the current block, which keeps changing
        return layout.prompt

    def live(self, masked, layout):
        return self.allowed(masked, layout, None)  # later blocks are invisible and not yet committable
