"""NaN/inf guard of the training loop: a non-finite loss or gradient is never applied, never saved.

Before each update the Trainer asks :meth:`NonFiniteGuard.check` about the step: one ``isfinite``
on (gradient norm + the micro-steps' losses), the norm being the one clipping computes anyway -- a
sum is non-finite iff one of its terms is. A finite run pays one host sync per step (on CPU a few
microseconds) and its numbers are unchanged. On a non-finite step, ``train.nonfinite``:

``"error"`` (default)
    raises :class:`NonFiniteError` naming the step and what was non-finite, before the update: the
    last checkpoint on disk is the last finite state, and the run never reaches its final save.
``"skip"``
    drops the step's update (parameters, optimizer moments and EMA untouched; its loss and metrics
    stay out of the logs), counts it in ``nonfinite_skipped`` and goes on; more than
    :data:`MAX_CONSECUTIVE_SKIPS` in a row raise NonFiniteError (the run has diverged).

:meth:`params_finite` guards every checkpoint write: parameters that overflowed are not saved.
"""
from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Any, Dict, Iterable, List

import torch

from .checkpoint import STATE_FILE
from .config import TrainConfig
from .distributed import all_reduce_sum
from .files import read_json

MAX_CONSECUTIVE_SKIPS = 10


class NonFiniteError(ValueError):
    """A NaN/inf loss, gradient or parameter stopped training; nothing non-finite was applied or saved."""


class NonFiniteGuard:
    def __init__(self, cfg: TrainConfig, optimizer: torch.optim.Optimizer, world_size: int, is_main: bool,
                 checkpoint_dir: Path):
        self.mode, self.steps, self.grad_accum, self.optimizer = cfg.nonfinite, cfg.steps, cfg.grad_accum, optimizer
        self.world_size, self.is_main, self.checkpoint_dir = world_size, is_main, Path(checkpoint_dir)
        self.skipped = 0  # steps skipped so far (train.nonfinite=skip)
        self.streak = 0  # ... of them in a row, up to now

    def metrics(self) -> Dict[str, int]:
        """What a train log row adds: the count of skipped steps, in "skip" mode."""
        return {"nonfinite_skipped": self.skipped} if self.mode == "skip" else {}

    def state(self) -> Dict[str, int]:
        return {"skipped": self.skipped, "streak": self.streak}

    def load(self, state: Dict[str, Any]) -> None:
        self.skipped, self.streak = int(state.get("skipped", 0)), int(state.get("streak", 0))

    def check(self, step: int, losses: List[torch.Tensor], grad_norm: torch.Tensor) -> bool:
        """True to apply update ``step`` (0-based); False to skip it (mode "skip": the gradients are
        zeroed); else raises NonFiniteError."""
        # a sum is non-finite iff one of its terms is (float64 sums of float32 values do not overflow)
        if self.world_size == 1 and grad_norm.device.type == "cpu":  # measured: 1-5 us, the tensor path 20-40 us
            finite = math.isfinite(grad_norm.item() + sum(loss.item() for loss in losses))
        else:  # on an accelerator: a few tiny kernels and a single host sync
            total = grad_norm.detach().float()
            for loss in losses:
                total = total + loss.detach().float()
            if self.world_size > 1:
                total = all_reduce_sum(total)  # a NaN loss on one rank stops (or skips) every rank
            finite = bool(torch.isfinite(total))
        if finite:
            self.streak = 0
            return True
        bad = [f"loss {loss.item()}" + (f" (micro-step {m} of {self.grad_accum})" if self.grad_accum > 1 else "")
               for m, loss in enumerate(losses) if not torch.isfinite(loss)]
        if not torch.isfinite(grad_norm):
            bad.append(f"gradient norm {grad_norm.item()}")
        what = "non-finite " + (", ".join(bad) if bad else "loss on another rank")
        where = f"step {step + 1}/{self.steps}"  # numbered as the log lines: the (step+1)-th update
        if self.mode == "skip":
            self.skipped += 1
            self.streak += 1
            if self.streak <= MAX_CONSECUTIVE_SKIPS:
                self.optimizer.zero_grad(set_to_none=True)
                if self.is_main:
                    print(f"{where}: {what}; update skipped (train.nonfinite=skip, {self.skipped} skipped so far)",
                          file=sys.stderr, flush=True)
                return False
            what = f"{self.streak} steps in a row skipped (the last: {what})"
        hint = "" if self.mode == "skip" else ", or set train.nonfinite=skip to skip such steps"
        raise NonFiniteError(f"{what} at {where}; its update was not applied and the run is not finished "
                             f"({self.last_checkpoint()}). Lower train.lr or set train.grad_clip{hint}")

    @staticmethod
    def params_finite(params: Iterable[torch.Tensor]) -> bool:
        norms = torch._foreach_norm([p.detach() for p in params])
        return bool(torch.isfinite(torch.stack([n.float() for n in norms]).sum())) if norms else True

    def check_params(self, params: Iterable[torch.Tensor], step: int) -> None:
        """Raise before a checkpoint of non-finite parameters is written."""
        if not self.params_finite(params):
            raise NonFiniteError(f"non-finite parameters after step {step}/{self.steps}: not writing a checkpoint "
                                 f"({self.last_checkpoint()}). Lower train.lr or set train.grad_clip")

    def last_checkpoint(self) -> str:
        try:
            return f"last checkpoint: step {int(read_json(self.checkpoint_dir / STATE_FILE)['step'])} in {self.checkpoint_dir}"
        except (OSError, ValueError, KeyError, TypeError):
            return "no checkpoint written yet"


__all__ = ["MAX_CONSECUTIVE_SKIPS", "NonFiniteError", "NonFiniteGuard"]
