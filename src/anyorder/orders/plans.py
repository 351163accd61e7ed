"""Training passes that compute an order's objective exactly and cheaply.

Sharp schedules (AR, blocks) make the generic Monte-Carlo NELBO estimate very noisy, so those
orders train with a dedicated layout instead:

- ``masked_plan``: one stream ``z_t`` under an order's attention rule (random, Scatter, the
  generic estimator of any order);
- ``two_stream_plan``: BD3-LM's vectorised ``[x_t ⊕ x_0]`` pass: every block's noisy copy sees
  the clean copies of the blocks its rule allows, in one forward pass. AR is the special case
  "block size 1, every position masked"; Jigsaw's faithful teacher-forced pass is the case
  "noisy token sees only itself, clean copies of its block up to its left".
"""
from __future__ import annotations

import torch

from . import masks
from .base import Layout, TrainPlan


def masked_plan(x0, layout: Layout, mask_id: int, masked, elbo_weight, t, attn) -> TrainPlan:
    masked = masked & layout.answer
    tokens = torch.where(masked, torch.full_like(x0, mask_id), x0)
    return TrainPlan(tokens=tokens, attn=attn, targets=x0, scored=masked,
                     elbo_weight=torch.where(masked, elbo_weight, torch.zeros_like(elbo_weight)).float(),
                     t=t.float(), time=t.float().amax(-1) if t.dim() == 2 else t.float(), answer=layout.answer)


def two_stream_plan(x0, layout: Layout, mask_id: int, masked, elbo_weight, t,
                    noisy_sees_noisy, noisy_sees_clean, clean_sees_clean) -> TrainPlan:
    masked = masked & layout.answer
    zt = torch.where(masked, torch.full_like(x0, mask_id), x0)
    L = x0.shape[1]
    attn = masks.two_stream(layout, noisy_sees_noisy, noisy_sees_clean, clean_sees_clean)
    index = torch.cat([torch.arange(L), torch.arange(L)]).to(x0.device)
    return TrainPlan(tokens=torch.cat([zt, x0], dim=1), attn=attn, targets=x0, scored=masked,
                     elbo_weight=torch.where(masked, elbo_weight, torch.zeros_like(elbo_weight)).float(),
                     t=t.float(), index=index, time=t.float().amax(-1), answer=layout.answer)


def block_rules(layout: Layout):
    """BD3-LM: noisy block b sees its own noisy block and clean blocks < b; clean is block-causal."""
    qb, kb = layout.block.unsqueeze(-1), layout.block.unsqueeze(-2)
    return (qb == kb), (kb < qb), (kb <= qb)


def jigsaw_rules(layout: Layout, block_masked):
    """Faithful Jigsaw: a masked token sees itself, the clean tokens to its left in its block, and
    every unmasked block; clean copies see unmasked blocks and their block up to themselves."""
    qb, kb = layout.block.unsqueeze(-1), layout.block.unsqueeze(-2)
    qa, ka = layout.aidx.unsqueeze(-1), layout.aidx.unsqueeze(-2)
    visible = (~block_masked).unsqueeze(-2)
    same = qb == kb
    return (qa == ka), visible | (same & (ka < qa)), visible | (same & (ka <= qa))
