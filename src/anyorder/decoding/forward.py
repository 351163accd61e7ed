"""The forward pass a decoder calls each step: ``forward(x, masked) -> logits [B, L, V]``.

``uncached_forward`` runs the whole sequence under the order's attention for the current state.
``cached_forward`` is the exact KV-cached variant for orders whose attention lets finished
positions freeze (to be implemented; see the decoding-lab issue).
"""
from __future__ import annotations


def uncached_forward(model, order, layout, extra=None):
    def forward(x, masked):
        return model(x, attn_mask=order.decode_attention(masked, layout), extra=extra)

    return forward


def cached_forward(model, order, layout, extra=None):
    raise NotImplementedError(f"no exact KV cache for order {order.name!r} yet")
