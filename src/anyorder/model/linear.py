"""The backbone's linear layer: ``nn.Linear`` (same parameter, same state dict) that, inside
:func:`multiplying_by`, multiplies by a contiguous ``[in, out]`` copy of its weight instead.

Why: ``nn.Linear`` keeps its weight ``[out, in]`` and computes ``x @ W.T``. On CPU, MKL runs the
plain product with ``W.T`` laid out contiguously faster, the more so the fewer the rows: measured
here, a 32-query window pass of an approximate cache (decoding/approx_cache.py) gains 1.18x and a
288-position full pass 1.04x (``anyorder bench cache``, ``pass_ms``). The copies cost one extra
set of weights while a decode runs.

The two layouts do not always give the same bits: below about 16 rows (more for wide inputs) MKL
takes another kernel for one of them. So only the approximate caches use the copies -- their
tokens are an approximation anyway -- while exact decoding keeps ``nn.Linear``'s arithmetic,
which makes the exact KV cache equal the uncached pass bit for bit. With gradients on, or for a
weight the copies do not hold, the layer is ``nn.Linear``.
"""
from __future__ import annotations

import contextlib
import contextvars
from typing import Dict

import torch
import torch.nn as nn
import torch.nn.functional as F

_COPIES: contextvars.ContextVar = contextvars.ContextVar("anyorder_transposed_weights", default=None)


class Linear(nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        copies = _COPIES.get()
        if copies is not None and not torch.is_grad_enabled():
            w = copies.get(self)
            if w is not None:  # one mm on the rows (matmul of a 3-d input adds ~8 dispatches)
                return torch.mm(x.reshape(-1, x.shape[-1]), w).view(*x.shape[:-1], w.shape[1])
        return F.linear(x, self.weight, self.bias)


def transposed_copies(model: nn.Module) -> Dict[nn.Module, torch.Tensor]:
    """``{layer: weight.T contiguous}`` for every bias-free :class:`Linear` of ``model`` on the
    CPU (elsewhere the layout buys nothing: no copies, the layers stay ``nn.Linear``)."""
    return {m: m.weight.detach().t().contiguous() for m in model.modules()
            if isinstance(m, Linear) and m.bias is None and m.weight.device.type == "cpu"}


@contextlib.contextmanager
def multiplying_by(copies: Dict[nn.Module, torch.Tensor]):
    """Within this block, every :class:`Linear` in ``copies`` multiplies by its copy (no grad)."""
    token = _COPIES.set(copies or None)
    try:
        yield
    finally:
        _COPIES.reset(token)
