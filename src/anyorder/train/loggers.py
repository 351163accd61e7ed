"""Metric sinks: JSON lines (always), TensorBoard and Weights & Biases (opt-in).

``metrics.jsonl`` is the source of truth -- plain text, greppable, no dependency -- and the
optional backends only mirror it. They are imported lazily so the library never requires them.
"""
from __future__ import annotations

import importlib.util
import json
import math
import os
import time
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional

METRICS_FILE = "metrics.jsonl"


def _jsonable(v: Any) -> Any:
    # Strict JSON has no NaN/Infinity; write them as strings so every line stays parseable
    # (float("nan") reads them back) instead of emitting the non-standard NaN token.
    if hasattr(v, "item") and callable(v.item):  # 0-d tensors / numpy scalars
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return v


class JsonlLogger:
    """Appends one JSON object per event: ``{"step", "time", "elapsed", "event", **metrics}``."""

    def __init__(self, run_dir: str | os.PathLike, resume_step: Optional[int] = None, redo_eval: bool = False):
        self.path = Path(run_dir) / METRICS_FILE
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is not None and self.path.exists():
            self._truncate_after(resume_step, redo_eval)
        self._start = time.time()
        self._f = open(self.path, "a", buffering=1)  # line-buffered: a crash loses at most one line

    def _truncate_after(self, step: int, redo_eval: bool = False) -> None:
        # A crashed run may have logged steps after its last checkpoint; the resumed run logs them
        # again. Drop the stale ones so the file reads as one consistent history. ``redo_eval``:
        # the evaluation at ``step`` itself is redone (it ran after that step's checkpoint).
        kept = []
        for line in self.path.read_text().splitlines():
            try:
                row = json.loads(line)
                if row.get("step", 0) > step or (redo_eval and row.get("step") == step and row.get("event") == "eval"):
                    continue
            except (ValueError, AttributeError):
                continue  # a torn last line from the crash
            kept.append(line + "\n")
        tmp = self.path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(kept))
        os.replace(tmp, self.path)

    def log(self, step: int, metrics: Mapping[str, Any], event: str = "train") -> None:
        now = time.time()
        row = {"step": int(step), "time": now, "elapsed": now - self._start, "event": event}
        row.update({k: _jsonable(v) for k, v in metrics.items()})
        self._f.write(json.dumps(row, allow_nan=False) + "\n")

    def close(self) -> None:
        if not self._f.closed:
            self._f.close()


class TensorBoardLogger:
    def __init__(self, run_dir: str | os.PathLike, resume_step: Optional[int] = None):
        try:
            from torch.utils.tensorboard import SummaryWriter  # lazy: optional (needs tensorboard)
        except ImportError as e:  # torch's module imports the tensorboard package
            raise ImportError(
                "TrainConfig.tensorboard=True needs the 'tensorboard' package: pip install tensorboard "
                "(or pip install 'anyorder[tensorboard]')"
            ) from e
        # purge_step hides events a crashed run wrote after the checkpoint we resume from
        self.writer = SummaryWriter(log_dir=str(Path(run_dir) / "tensorboard"), purge_step=resume_step)

    def log(self, step: int, metrics: Mapping[str, Any], event: str = "train") -> None:
        for k, v in metrics.items():
            v = _jsonable(v)
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                self.writer.add_scalar(f"{event}/{k}", v, step)

    def close(self) -> None:
        self.writer.close()


class WandbLogger:
    def __init__(self, run_dir: str | os.PathLike, project: str, config: Dict[str, Any]):
        try:
            import wandb  # lazy: optional dependency
        except ImportError as e:
            raise ImportError(
                "TrainConfig.wandb=True needs the 'wandb' package: pip install wandb "
                "(or pip install 'anyorder[wandb]')"
            ) from e
        self._wandb = wandb
        # Keep the run id in the run dir so a resumed training continues the same W&B run.
        id_file = Path(run_dir) / "wandb_id.txt"
        run_id = id_file.read_text().strip() if id_file.exists() else wandb.util.generate_id()
        id_file.write_text(run_id + "\n")
        self.run = wandb.init(
            project=project, dir=str(run_dir), config=config, id=run_id, resume="allow", name=Path(run_dir).name
        )

    def log(self, step: int, metrics: Mapping[str, Any], event: str = "train") -> None:
        self.run.log({f"{event}/{k}": _jsonable(v) for k, v in metrics.items()}, step=step)

    def close(self) -> None:
        self.run.finish()


class Loggers:
    """Fan-out to every enabled sink. On non-main ranks it holds none, so calls are no-ops."""

    def __init__(self, sinks: List[Any]):
        self.sinks = sinks

    def log(self, step: int, metrics: Mapping[str, Any], event: str = "train") -> None:
        for s in self.sinks:
            s.log(step, metrics, event)

    def close(self) -> None:
        for s in self.sinks:
            s.close()


def require_backends(*, tensorboard: bool = False, wandb: bool = False) -> None:
    """Fail at start-up, not at the first log line, when an enabled backend is not installed."""
    for enabled, module, flag in ((tensorboard, "tensorboard", "tensorboard"), (wandb, "wandb", "wandb")):
        if enabled and importlib.util.find_spec(module) is None:
            raise ImportError(
                f"TrainConfig.{flag}=True needs the '{module}' package: pip install {module} "
                f"(or pip install 'anyorder[{module}]')"
            )


def build_loggers(
    run_dir: str | os.PathLike,
    *,
    tensorboard: bool = False,
    wandb: bool = False,
    wandb_project: str = "anyorder",
    config: Optional[Dict[str, Any]] = None,
    resume_step: Optional[int] = None,
    enabled: bool = True,
    redo_eval: bool = False,
) -> Loggers:
    if not enabled:
        return Loggers([])
    require_backends(tensorboard=tensorboard, wandb=wandb)
    sinks: List[Any] = [JsonlLogger(run_dir, resume_step=resume_step, redo_eval=redo_eval)]
    if tensorboard:
        sinks.append(TensorBoardLogger(run_dir, resume_step=resume_step))
    if wandb:
        sinks.append(WandbLogger(run_dir, wandb_project, config or {}))
    return Loggers(sinks)


__all__ = ["JsonlLogger", "TensorBoardLogger", "WandbLogger", "Loggers", "build_loggers", "require_backends", "METRICS_FILE"]
