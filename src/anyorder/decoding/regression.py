"""Decoding a continuous-valued model with an order's own structure (in-context regression).

Each step predicts every masked query y under ``order.decode_attention``, commits the positions
``order.allowed`` permits, and feeds the predictions back as values: ``random`` commits
everything in one shot; ar/block/prefix_block/scatter/jigsaw commit in their sequence. A point
predictor has no uncertainty, so Jigsaw's entropy probe sees equal (uniform) "entropies"
everywhere and starts blocks left to right.
"""
from __future__ import annotations

import torch

from ..orders.base import Order


@torch.no_grad()
def predict(model, order: Order, values: torch.Tensor, answer: torch.Tensor):
    """(pred [B, R] of the answer positions in sequence order, nfe) decoded with the order's
    attention and commit rule; committed predictions are fed back as y values."""
    layout = order.layout(answer)
    vals = values.clone()
    vals[answer] = 0.0  # nothing of the true answers is visible (they are masked anyway)
    masked = answer.clone()
    out = torch.zeros(answer.shape, dtype=torch.float32, device=values.device)
    # uniform "log-probabilities" over the 2-symbol proxy vocabulary: only Jigsaw's probe reads them
    flat_logp = torch.full((*answer.shape, 2), -0.6931471805599453, device=values.device)
    nfe = 0
    while bool(masked.any()):
        pred = model(vals, masked, attn_mask=order.decode_attention(masked, layout))
        nfe += 1
        allow = order.allowed(masked, layout, flat_logp) & masked
        if not bool(allow[masked.any(-1)].any(-1).all()):
            raise RuntimeError(f"order {order.name!r} allowed no masked position in a row that has some")
        out = torch.where(allow, pred, out)
        vals[..., 0] = torch.where(allow, pred, vals[..., 0])
        masked = masked & ~allow
    B = answer.shape[0]
    return out[answer].view(B, -1), nfe
