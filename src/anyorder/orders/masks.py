"""Boolean attention masks (True = query may attend to key), built from a :class:`Layout`.

One function per attention rule of the orders' table (README, "Orders"). Shapes are [B, Lq, Lk]. Every rule shares the
prompt convention: prompt keys are visible to every query; prompt queries see only the
prompt (so no answer token, masked or not, can leak into the prompt's representation).
"""
from __future__ import annotations

import torch

from .base import Layout


def with_prompt(answer_rule: torch.Tensor, layout: Layout) -> torch.Tensor:
    p = layout.prompt
    q_ans, k_prompt = layout.answer.unsqueeze(-1), p.unsqueeze(-2)
    return k_prompt | (q_ans & layout.answer.unsqueeze(-2) & answer_rule)


def _pair(x: torch.Tensor):
    return x.unsqueeze(-1), x.unsqueeze(-2)  # query-major, key-major


def bidirectional(layout: Layout) -> torch.Tensor:
    B, L = layout.answer.shape
    return torch.ones(B, L, L, dtype=torch.bool, device=layout.answer.device)


def causal(layout: Layout) -> torch.Tensor:
    """AR: an answer token sees answer tokens at or before it."""
    qa, ka = _pair(layout.aidx)
    return with_prompt(ka <= qa, layout)


def block_causal(layout: Layout) -> torch.Tensor:
    """Block diffusion: a block sees itself (bidirectionally) and earlier blocks."""
    qb, kb = _pair(layout.block)
    return with_prompt(kb <= qb, layout)


def up_to_block(layout: Layout, current: torch.Tensor) -> torch.Tensor:
    """Prefix-block: every answer token sees blocks <= current[b] (prefix + current), nothing after."""
    kb = layout.block.unsqueeze(-2)
    return with_prompt(kb <= current.view(-1, 1, 1), layout)


def scatter(layout: Layout) -> torch.Tensor:
    """Scatter: a column (offset) sees every earlier or equal column, in every block."""
    qo, ko = _pair(layout.offset)
    return with_prompt(ko <= qo, layout)


def jigsaw(layout: Layout, block_visible: torch.Tensor) -> torch.Tensor:
    """Jigsaw: visible (unmasked/finished) blocks are seen by all; a masked block is causal inside
    and cannot see other masked blocks. ``block_visible`` is [B, L] bool per position."""
    qb, kb = _pair(layout.block)
    qa, ka = _pair(layout.aidx)
    rule = block_visible.unsqueeze(-2) | ((qb == kb) & (ka <= qa))
    return with_prompt(rule, layout)


def two_stream(layout: Layout, noisy_sees_noisy: torch.Tensor, noisy_sees_clean: torch.Tensor,
               clean_sees_clean: torch.Tensor) -> torch.Tensor:
    """Assemble the [B, 2L, 2L] mask of a ``[x_t ⊕ x_0]`` pass from three answer-to-answer rules.

    The clean half's prompt serves as the prompt keys for both halves; the noisy half's prompt
    copies are never attended to (they would only duplicate it). The clean half never sees the
    noisy half (BD3-LM's x_0 stream must not depend on the noise).
    """
    B, L = layout.answer.shape
    qa_ans = layout.answer.unsqueeze(-1) & layout.answer.unsqueeze(-2)
    k_prompt = layout.prompt.unsqueeze(-2).expand(B, L, L)
    none = torch.zeros(B, L, L, dtype=torch.bool, device=layout.answer.device)
    top = torch.cat([qa_ans & noisy_sees_noisy, k_prompt | (qa_ans & noisy_sees_clean)], dim=-1)
    bottom = torch.cat([none, k_prompt | (qa_ans & clean_sees_clean)], dim=-1)
    return torch.cat([top, bottom], dim=-2)


def causal_prompt(mask: torch.Tensor, layout: Layout, index=None) -> torch.Tensor:
    """``mask`` [B, L', L'] with prompt-to-prompt attention made causal (a prompt token sees the
    prompt tokens at or before it), as an AR-pretrained model read its prompt. ``index`` [L']:
    the sequence position of every slot of a two-stream pass (None: slot = position)."""
    pos = torch.arange(mask.shape[-1], device=mask.device) if index is None else index.to(mask.device)
    p = layout.prompt[:, pos]
    later = pos.view(1, 1, -1) > pos.view(1, -1, 1)
    return mask & ~(p.unsqueeze(-1) & p.unsqueeze(-2) & later)
