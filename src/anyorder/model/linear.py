"""The backbone's linear layer: ``nn.Linear`` (same parameter, same state dict) that, inside
:func:`multiplying_by`, multiplies by a contiguous ``[in, out]`` copy of its weight instead.

Why: ``nn.Linear`` keeps its weight ``[out, in]`` and computes ``x @ W.T``. On CPU, MKL runs the
plain product with ``W.T`` laid out contiguously faster for the few rows of an approximate
cache's window pass (decoding/approx_cache.py): measured here at width 256, a 32-query window
pass gains 1.16-1.18x (``anyorder bench cache``, ``pass_ms``). A copy costs one extra copy of the
layer's weight while a decode runs, so the caches skip it for their first, full pass.

The two layouts do not always give the same bits: MKL picks its kernels by shape and layout (on
the CPU this was written on, ``x @ W.T`` and the copy's product differ for some shapes up to 128
rows). So only the approximate caches use the copies -- their tokens are an approximation
anyway -- while exact decoding keeps ``nn.Linear``'s arithmetic, the model's own. The layer is plain
``nn.Linear`` with gradients on, with a bias, off the CPU (cuBLAS reads either layout as fast),
and under CPU autocast (a copy is not a parameter, so autocast would cast it to bf16 on every
product instead of once, which made a window pass slower).

A cached pass (``Block.forward_cached``) calls no module: :func:`products` gives it each layer's
product and weight, the same choice the layer's forward makes.
"""
from __future__ import annotations

import contextlib
import contextvars
from typing import Dict, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

_COPIES: contextvars.ContextVar = contextvars.ContextVar("anyorder_transposed_weights", default=None)


class Linear(nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        copies = active_copies()
        if copies is not None and self.bias is None and x.is_cpu:
            # matmul folds the leading dims into one mm on the rows, in C++ (the same mm as
            # reshape + mm + view from Python, two fewer Python-level dispatches)
            return torch.matmul(x, self.copy_in(copies))
        return F.linear(x, self.weight, self.bias)

    def copy_in(self, copies: Dict[nn.Module, torch.Tensor]) -> torch.Tensor:
        """This layer's copy in ``copies``, made on the layer's first product in the context (so
        only layers that run get one)."""
        w = copies.get(self)
        if w is None:
            w = copies[self] = self.transposed_weight()
        return w

    def transposed_weight(self) -> torch.Tensor:
        """The weight as a contiguous ``[in, out]`` tensor (no grad)."""
        return self.weight.detach().t().contiguous()


def active_copies() -> Optional[Dict[nn.Module, torch.Tensor]]:
    """The dict of the enclosing :func:`multiplying_by` block where copies apply (no gradients, no
    CPU autocast), else None."""
    copies = _COPIES.get()
    if copies is None or torch.is_grad_enabled() or torch.is_autocast_enabled("cpu"):
        return None
    return copies


def products(layers, copies=None):
    """``(mul, weights)`` with ``mul(x, w)`` the product each of ``layers`` (bias-free
    :class:`Linear` layers, or None) computes in :meth:`Linear.forward` -- ``torch.matmul`` by its copy
    in ``copies`` (:func:`active_copies`; made here as the layer would make it), else ``F.linear``
    by its own weight -- for passes that call no module (``Block.forward_cached``)."""
    if any(layer is not None and layer.bias is not None for layer in layers):
        raise ValueError("products: every layer must be bias-free (mul(x, w) takes no bias)")
    if copies is None or not all(layer is None or layer.weight.is_cpu for layer in layers):
        return F.linear, tuple(None if layer is None else layer.weight for layer in layers)
    return torch.matmul, tuple(None if layer is None else layer.copy_in(copies) for layer in layers)


@contextlib.contextmanager
def multiplying_by(copies: Optional[Dict[nn.Module, torch.Tensor]]):
    """Within this block every :class:`Linear` multiplies by its copy in ``copies`` (a dict the
    layers fill as they first run; keep it for later blocks of the same decode), where it can
    (see the module doc). ``None``: plain ``nn.Linear``."""
    token = _COPIES.set(copies)
    try:
        yield
    finally:
        _COPIES.reset(token)
