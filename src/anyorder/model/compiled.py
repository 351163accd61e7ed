"""Compiled window passes for the approximate caches: ``Decoder(cache="dual", compile=True)``.

Why: an approximate cache's window pass (decoding/approx_cache.py) runs a few query rows (a
semi-AR window: 32) through every layer. Its matrix products are small, and on CPU much of its
time goes to the thirty or so other operators per layer (norms, RoPE, SwiGLU, residual adds,
the K/V write): each is a kernel of its own, and the weights streaming through the cache between
them leave each to start cold. ``torch.compile`` (Inductor) fuses them into a few generated
loops. A full pass (every position: the matrix products dominate) gains nothing from it, so
only the window passes compile; exact decoding and the caches' refresh passes stay eager.
``anyorder bench cache`` measures both (``pass_ms``) and the decode with and without.

What it costs: the first window pass of each new shape compiles (tens of seconds on a 2-core
CPU; Inductor keeps its generated code on disk, so later processes compile faster), which pays
only over long decodes or many of them; it needs a C++ compiler; and the fused arithmetic differs
from eager's in the last bits (the approximate caches' tokens are an approximation anyway: the
benchmark reports agreement with exact decoding both ways). Where compiling fails (no compiler),
the decode warns once and runs the passes eagerly.
"""
from __future__ import annotations

import contextlib
import contextvars
import warnings

import torch

_COMPILING: contextvars.ContextVar = contextvars.ContextVar("anyorder_compiled_blocks", default=False)


@contextlib.contextmanager
def compiling(on: bool = True):
    """Within this block, cached passes of a model with ``blocks_cached`` run its compiled version
    (one per model, compiled on first use and kept: every decode of the model reuses it)."""
    token = _COMPILING.set(bool(on))
    try:
        yield
    finally:
        _COMPILING.reset(token)


def blocks_runner(model):
    """``model.blocks_cached``, or inside :func:`compiling` its compiled version."""
    if not _COMPILING.get():
        return model.blocks_cached
    runner = model.__dict__.get("_compiled_blocks")  # not a module attribute: never saved or moved
    if runner is None:
        runner = model.__dict__["_compiled_blocks"] = CompiledBlocks(model.blocks_cached)
    return runner


class CompiledBlocks:
    """``torch.compile`` of a cached pass's blocks, falling back to the eager function (with one
    warning) if compiling fails."""

    def __init__(self, eager):
        self.eager = eager
        self.compiled = torch.compile(eager)
        self.failed = None

    def __call__(self, *args):
        if self.failed is None:
            try:
                return self.compiled(*args)
            except Exception as e:  # a compiler missing or failing; a genuine error recurs eagerly
                self.failed = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                warnings.warn(f"decoder.compile: torch.compile failed ({self.failed}); the window passes run "
                              f"uncompiled", RuntimeWarning, stacklevel=2)
        return self.eager(*args)
