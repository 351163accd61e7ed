"""Exponential moving average of model weights.

The average lives in a full copy of the module (not a dict of tensors) so evaluation code can call
it exactly like the live model: ``eval_fn(ema.module)``.
"""
from __future__ import annotations

import copy

import torch
from torch import nn


class EMA:
    def __init__(self, model: nn.Module, decay: float):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must be in (0, 1), got {decay}")
        self.decay = decay
        self.module = copy.deepcopy(model)
        self.module.eval()
        self.module.requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        ema_params = list(self.module.parameters())
        params = list(model.parameters())
        # lerp: ema += (1 - decay) * (param - ema), one fused kernel per dtype/device group
        torch._foreach_lerp_(ema_params, params, 1.0 - self.decay)
        # buffers (e.g. norm statistics) are not averaged; the EMA model uses the current ones
        for b_ema, b in zip(self.module.buffers(), model.buffers()):
            b_ema.copy_(b)

    def state_dict(self):
        return self.module.state_dict()

    def load_state_dict(self, state) -> None:
        self.module.load_state_dict(state)
