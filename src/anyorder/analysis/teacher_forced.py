"""Teacher-forced accuracy along the answer, left to right, for any order.

For answer position j (counting left to right), the model sees the prompt and the *true* answer
tokens before j, with j and everything after it masked, and predicts position j (argmax) in one
forward pass under the order's decoding attention. Under ``ar`` this is exactly teacher-forced
next-token accuracy; under a masked-diffusion order it asks the same question of a model that
was trained to fill any hole.

Why it matters: on star graphs, teacher-forced AR learns the "Clever Hans" shortcut (Bachmann &
Nagarajan, 2024, arXiv 2403.06963): each path node after the first is copied from the edge that
starts at the previous *true* node, so accuracy is near 1 on every step after the first, while
the first step, which needs planning, stays near 1/degree. The per-step curve is the evidence even
where a run never converges; the decoded path accuracy alone cannot tell the two failures apart.
"""
from __future__ import annotations

from typing import Dict, Optional

import torch

from ..objectives.rows import extra_to


@torch.no_grad()
def teacher_forced_accuracy(model, order, x0: torch.Tensor, answer: torch.Tensor, mask_id: int,
                            extra: Optional[Dict[str, torch.Tensor]] = None, batch_size: int = 256) -> torch.Tensor:
    """[n] accuracy at each of the n answer positions (left to right), averaged over rows.

    Every row must have the same number n of answer positions (the tasks that use this have
    a fixed answer length); position j of a row is its j-th answer position."""
    param = next(iter(model.parameters()), None) if hasattr(model, "parameters") else None
    device = x0.device if param is None else param.device  # held-out sets live on the CPU; run on the model's device
    x0, answer = x0.to(device), answer.to(device).bool()
    extra = extra_to(extra, device)
    n_answer = answer.sum(-1)
    if len(x0) == 0 or bool((n_answer != n_answer[0]).any()):
        raise ValueError("teacher_forced_accuracy needs at least one row and the same number of answer positions in every row")
    n = int(n_answer[0])
    was_training = model.training
    model.eval()
    rank = torch.cumsum(answer.long(), -1) - 1        # j-th answer position of its row: rank == j
    correct = torch.zeros(n, dtype=torch.float64)
    try:
        for i in range(0, len(x0), batch_size):
            xb, ab, rb = x0[i:i + batch_size], answer[i:i + batch_size], rank[i:i + batch_size]
            layout = order.layout(ab)
            for j in range(n):
                masked = ab & (rb >= j)
                x = torch.where(masked, torch.full_like(xb, mask_id), xb)
                logits = model(x, attn_mask=order.decode_attention(masked, layout), extra=extra)
                at = ab & (rb == j)                     # exactly one position per row
                pred = logits.argmax(-1)[at]
                correct[j] += float((pred == xb[at]).sum())
    finally:
        model.train(was_training)
    return correct / len(x0)
