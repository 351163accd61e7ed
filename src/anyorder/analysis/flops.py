"""Training FLOPs: counted on the real step (FLOPs to threshold needs counts, not guesses).

FLOPs to threshold is the cost measure of "On the Trainability of Masked Diffusion Language
Models via Blockwise Locality" (2026) (:mod:`anyorder.studies.sweep_report`).

``count_step_flops`` runs one forward + backward of a training micro-step under
``torch.utils.flop_counter.FlopCounterMode`` (matmuls and attention; elementwise ops are not
counted, as usual). ``analytic_step_flops`` is the textbook count for our backbone, used to
check the counter: forward = 2 · (matmul parameters) per token + 4 · Lq · Lk · d per layer for
attention (QKᵀ and AV), backward = 2 × forward.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.utils.flop_counter as fc
from torch.utils.flop_counter import FlopCounterMode


_REGISTERED = False


def register_cpu_attention_flops() -> None:
    """PyTorch's FLOP counter knows the CUDA SDPA kernels but not the CPU flash kernel, so on a
    CPU every attention FLOP would be missed (measured: 11-20 % of a small model's step).
    Register the standard SDPA formulas for the CPU ops once."""
    global _REGISTERED
    if _REGISTERED:
        return
    aten = torch.ops.aten
    fwd, bwd = aten._scaled_dot_product_flash_attention_for_cpu, aten._scaled_dot_product_flash_attention_for_cpu_backward
    if fwd.default not in fc.flop_registry:
        @fc.register_flop_formula(fwd)
        def _fwd(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
            return fc.sdpa_flop_count(query_shape, key_shape, value_shape)

    if bwd.default not in fc.flop_registry:
        @fc.register_flop_formula(bwd)
        def _bwd(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
            return fc.sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)

    _REGISTERED = True


def count_step_flops(model: torch.nn.Module, loss_fn: Callable[[torch.nn.Module], torch.Tensor]) -> int:
    """FLOPs of ``loss_fn(model).backward()``; leaves no gradients behind."""
    register_cpu_attention_flops()
    with FlopCounterMode(display=False) as counter:
        loss = loss_fn(model)
        loss.backward()
    for p in model.parameters():
        p.grad = None
    return int(counter.get_total_flops())


def analytic_step_flops(cfg, batch: int, q_len: int, k_len: int = None, scored: int = None) -> int:
    """Forward + backward FLOPs of the backbone for ``batch`` sequences of ``q_len`` positions
    attending to ``k_len`` keys (a two-stream pass has q_len = k_len = 2L). ``scored``: the
    number of rows the loss reads (objectives/rows.py), where the last block's projection and
    MLP and the output head run only on those; None: on every row."""
    k_len = q_len if k_len is None else k_len
    d = cfg.d_model
    hidden = int(cfg.mlp_ratio * d)
    if cfg.mlp == "swiglu":
        hidden = int(2 * hidden / 3)
        mlp = 3 * d * hidden
    else:
        mlp = 2 * d * hidden
    per_layer = 4 * d * d + mlp                          # qkv + proj, MLP
    tokens = batch * q_len
    rows = tokens if scored is None else scored
    row_wise = d * d + mlp + d * cfg.vocab_size          # the last block's proj + MLP, the head
    matmuls = tokens * (cfg.n_layers * per_layer - row_wise + d * cfg.vocab_size) + rows * row_wise
    fwd = 2 * matmuls + cfg.n_layers * 4 * batch * q_len * k_len * d
    return 3 * fwd
