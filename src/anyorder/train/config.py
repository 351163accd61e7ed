"""Training hyper-parameters.

One flat dataclass so a YAML file or the CLI maps onto it with ``TrainConfig(**d)``; its field
defaults are the only training defaults (the ``train:`` section of ``anyorder.config.DEFAULTS`` is
read from them). Everything is validated up front: a typo'd precision or a negative lr should fail
before any compute is spent, with a message that names the field and what would have been accepted.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from typing import Any, Dict, Tuple

from ..checks import is_number
from ..registry import unknown_choice

# "auto": bf16 autocast only where a matmul probe finds it faster than fp32 (train/precision.py)
PRECISIONS = ("auto", "fp32", "bf16")
# what a step with a non-finite loss or gradient norm does: stop the run there, or skip its update
NONFINITE_MODES = ("error", "skip")
# how several processes share the work: "ddp" replicates the model and all-reduces gradients; "fsdp"
# shards parameters, gradients and optimizer state over the ranks (FSDP2, train/fsdp.py)
STRATEGIES = ("ddp", "fsdp")

# Fields that only change what is observed (logging, progress, how often we save/evaluate), not the
# trajectory of the parameters. Changing them between a run and its resume is harmless, so they are
# left out of the hash that guards exact resumption.
# ``nonfinite`` is here too: every run that completes computes the same numbers in either mode (an
# "error" run never gets past a non-finite step), so switching to "skip" to resume a run stopped by
# a NaN continues the same trajectory.
# ``strategy`` too: DDP and FSDP compute the same update (the mean gradient over ranks, up to
# rounding), and a checkpoint written by one is refused by the other with the fix (train/fsdp.py).
_OBSERVATION_FIELDS = frozenset(
    {"eval_every", "checkpoint_every", "log_every", "tensorboard", "wandb", "wandb_project", "progress",
     "nonfinite", "strategy", "gradient_checkpointing"}
)


@dataclass
class TrainConfig:
    # ``seed`` comes from an experiment config's top-level ``seed``, the rest from its ``train:`` section
    steps: int = 1000
    batch_size: int = 64  # per process, per micro-step
    grad_accum: int = 1
    lr: float = 1e-3
    weight_decay: float = 0.0
    betas: Tuple[float, float] = (0.9, 0.95)
    warmup_steps: int = 50  # must not exceed steps
    min_lr_ratio: float = 0.1  # cosine decays from lr to lr * min_lr_ratio
    grad_clip: float = 1.0  # max global grad norm; 0 = off
    ema: float = 0.0  # EMA decay; 0 = off
    precision: str = "auto"  # "auto" | "fp32" | "bf16" (torch.autocast bf16 on the device type)
    eval_every: int = 0  # 0 = only at the end (if an eval_fn is given)
    checkpoint_every: int = 0  # 0 = only at the end
    log_every: int = 50  # 0 = only at the end
    seed: int = 0
    tensorboard: bool = False
    wandb: bool = False
    wandb_project: str = "anyorder"
    progress: bool = True
    # a step whose loss or gradient norm is NaN/inf: "error" stops the run before applying it (the
    # last checkpoint is kept, the run is not finished); "skip" drops its update and goes on (logged
    # as nonfinite_skipped; more than 10 in a row is an error)
    nonfinite: str = "error"
    strategy: str = "ddp"  # "ddp" | "fsdp" (only matters under torchrun; fsdp also runs on one process)
    # recompute each block's activations in the backward pass instead of keeping them: less memory,
    # about one more forward pass of compute; the same numbers (a test), so an observation field
    gradient_checkpointing: bool = False

    def __post_init__(self) -> None:
        # YAML has no tuples; accept a 2-list for betas and normalise it so the hash and
        # torch's param_groups see the same thing whichever way the config arrived.
        if isinstance(self.betas, list):
            self.betas = tuple(self.betas)
        # YAML reads "3e-4" (no dot) as a string; be lenient for the float fields only.
        for name in ("lr", "weight_decay", "min_lr_ratio", "grad_clip", "ema"):
            value = getattr(self, name)
            if isinstance(value, str):
                try:
                    setattr(self, name, float(value))
                except ValueError:
                    raise ValueError(f"TrainConfig.{name} must be a number, got {value!r}") from None

        _int(self, "steps", minimum=1)
        _int(self, "batch_size", minimum=1)
        _int(self, "grad_accum", minimum=1)
        _float(self, "lr", low=0.0, low_open=True, range_text="> 0")
        _float(self, "weight_decay", low=0.0, range_text=">= 0")
        if (
            not isinstance(self.betas, tuple)
            or len(self.betas) != 2
            or not all(is_number(b) and 0.0 <= b < 1.0 for b in self.betas)
        ):
            raise ValueError(
                f"TrainConfig.betas must be a pair (beta1, beta2) with each in [0, 1), got {self.betas!r}"
            )
        self.betas = (float(self.betas[0]), float(self.betas[1]))
        _int(self, "warmup_steps", minimum=0)
        if self.warmup_steps > self.steps:
            raise ValueError(
                f"TrainConfig.warmup_steps must be in [0, steps={self.steps}], got {self.warmup_steps}"
            )
        _float(self, "min_lr_ratio", low=0.0, high=1.0, range_text="in [0, 1]")
        _float(self, "grad_clip", low=0.0, range_text=">= 0 (0 = off)")
        _float(self, "ema", low=0.0, high=1.0, high_open=True, range_text="in [0, 1) (0 = off)")
        if self.precision not in PRECISIONS:
            raise ValueError(
                f"TrainConfig.precision must be one of {', '.join(repr(p) for p in PRECISIONS)}, "
                f"got {self.precision!r}"
            )
        if self.nonfinite not in NONFINITE_MODES:
            raise ValueError(
                f"TrainConfig.nonfinite must be one of {', '.join(repr(m) for m in NONFINITE_MODES)}, "
                f"got {self.nonfinite!r}"
            )
        if not isinstance(self.gradient_checkpointing, bool):
            raise ValueError(f"TrainConfig.gradient_checkpointing must be true or false, got {self.gradient_checkpointing!r}")
        if self.strategy not in STRATEGIES:
            raise ValueError(
                f"TrainConfig.strategy must be one of {', '.join(repr(m) for m in STRATEGIES)}, "
                f"got {self.strategy!r}"
            )
        _int(self, "eval_every", minimum=0)
        _int(self, "checkpoint_every", minimum=0)
        _int(self, "log_every", minimum=0)
        _int(self, "seed", minimum=0)
        for name in ("tensorboard", "wandb", "progress"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"TrainConfig.{name} must be true or false, got {getattr(self, name)!r}")
        if not isinstance(self.wandb_project, str) or not self.wandb_project:
            raise ValueError(f"TrainConfig.wandb_project must be a non-empty string, got {self.wandb_project!r}")

    # ------------------------------------------------------------------ helpers
    def to_dict(self) -> Dict[str, Any]:
        d = dataclasses.asdict(self)
        d["betas"] = list(self.betas)
        return d

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "TrainConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise unknown_choice("TrainConfig field", unknown[0], sorted(known))
        return cls(**d)

    def dynamics_dict(self) -> Dict[str, Any]:
        """The fields that determine the parameter trajectory (see _OBSERVATION_FIELDS)."""
        return {k: v for k, v in self.to_dict().items() if k not in _OBSERVATION_FIELDS}

    def hash(self) -> str:
        """Short stable hash of the trajectory-determining fields, stored in checkpoints."""
        blob = json.dumps(self.dynamics_dict(), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


def _int(cfg: TrainConfig, name: str, minimum: int) -> None:
    value = getattr(cfg, name)
    if isinstance(value, float) and value.is_integer():
        value = int(value)  # 1e4 from YAML is a float; accept it when it is whole
        setattr(cfg, name, value)
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"TrainConfig.{name} must be an integer >= {minimum}, got {value!r}")


def _float(
    cfg: TrainConfig,
    name: str,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
    range_text: str,
) -> None:
    value = getattr(cfg, name)
    ok = is_number(value)
    if ok and low is not None:
        ok = value > low if low_open else value >= low
    if ok and high is not None:
        ok = value < high if high_open else value <= high
    if not ok:
        raise ValueError(f"TrainConfig.{name} must be a number {range_text}, got {value!r}")
    setattr(cfg, name, float(value))


__all__ = ["TrainConfig", "PRECISIONS", "NONFINITE_MODES", "STRATEGIES"]
