"""Run directories: where a config's run lives, and refusing to mix two configs in one.

A run name is one path component (never a path); a directory is reused only if it holds a run of
the same config (its ``config.yaml``), and written only under its lock (``train/lock.py``).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import yaml

from .train.lock import LOCK_FILE, RunLock

# keys that do not change what training computes: a resumed run may change them (plugins: where the
# code of the registered names lives, e.g. a path relative to another directory; the names are kept)
_NOT_TRAJECTORY = ("name", "out_dir", "plugins", "eval", "decode", "force_size")
_NOT_TRAJECTORY_TRAIN = ("steps", "eval_every", "checkpoint_every", "log_every", "progress", "tensorboard",
                         "wandb", "wandb_project", "nonfinite", "strategy",
                         "gradient_checkpointing")


def check_run_name(name: Any) -> str:
    """``name`` as a single path component, or a one-line ValueError naming the key and value."""
    text = "" if name is None else str(name)
    if (not text.strip() or text in (".", "..") or text.startswith(".") or any(c in text for c in "/\\\0")
            or text != text.strip()):
        raise ValueError(f"name={name!r}: a run name must be one non-empty path component (no '/', '\\', "
                         "'..', leading '.' or surrounding spaces); put directories in out_dir=")
    return text


def run_dir_for(cfg) -> Path:
    return Path(cfg["out_dir"]) / check_run_name(cfg.get("name"))


def open_run_dir(run_dir: Path, cfg: Dict[str, Any], resume: bool = True) -> Tuple[RunLock, bool]:
    """Create ``run_dir`` (or reopen a run of the same config in it) and lock it for writing.

    Returns (the held lock, whether this call created the directory). Refuses, with one line: a
    directory with files but no ``config.yaml`` (not ours to overwrite), any existing run when
    ``resume`` is False, a run of a different config, and a directory another process is writing.
    """
    run_dir = Path(run_dir)
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    try:
        run_dir.mkdir()
        created = True
    except FileExistsError:
        created = False
        if not run_dir.is_dir():
            raise ValueError(f"{run_dir} exists and is not a directory; choose another name= or out_dir=") from None
    lock = RunLock(run_dir).acquire()
    try:
        if not created:
            contents = [p.name for p in run_dir.iterdir() if p.name != LOCK_FILE]
            if contents and not (run_dir / "config.yaml").exists():
                raise ValueError(f"{run_dir} exists and holds files ({', '.join(sorted(contents)[:4])}) but no "
                                 "config.yaml: not a run directory; choose another name= or out_dir=")
            if contents and not resume:
                raise ValueError(f"{run_dir} already holds a run and resume=False never reuses one; choose "
                                 "another name= or delete the directory")
            check_same_run(run_dir, cfg)
    except BaseException:
        lock.release()
        raise
    return lock, created


def discard_if_empty(run_dir: Path, lock: RunLock) -> None:
    """After a failed start: remove ``run_dir`` (which this call created, under ``lock``) if it holds
    nothing worth keeping -- no checkpoint, weights, summary or metrics rows, only the config and
    the start-up record. Releases the lock either way."""
    run_dir, empty = Path(run_dir), False
    try:
        names = {p.name for p in run_dir.iterdir()} - {LOCK_FILE}
        metrics = run_dir / "metrics.jsonl"
        empty = names <= {"config.yaml", "run.json", "metrics.jsonl"} and (
            not metrics.exists() or metrics.stat().st_size == 0)
        if empty:
            for name in names:
                (run_dir / name).unlink(missing_ok=True)
    finally:
        lock.release()
    if empty:
        try:
            run_dir.rmdir()  # fails (and keeps it) if anyone wrote into it meanwhile
        except OSError:
            pass


def trajectory(cfg: Dict[str, Any]) -> Dict[str, Any]:
    """The parts of a config that change what training computes."""
    c = json.loads(json.dumps(cfg))
    for k in _NOT_TRAJECTORY + tuple(k for k, v in c.items() if v is None):
        c.pop(k, None)  # a top-level default of None may be missing from an older run's config
    for k in _NOT_TRAJECTORY_TRAIN:
        c.get("train", {}).pop(k, None)
    return c


def config_diff(a, b, path=""):
    out = []
    for k in sorted(set(a) | set(b)):
        va, vb = a.get(k), b.get(k)
        if isinstance(va, dict) and isinstance(vb, dict):
            out += config_diff(va, vb, f"{path}{k}.")
        elif va != vb:
            out.append(f"{path}{k}: {va!r} -> {vb!r}")
    return "; ".join(out[:6]) if path == "" else out


def check_same_run(run_dir: Path, cfg: Dict[str, Any]) -> None:
    """Refuse to resume into ``run_dir`` if it holds a run of a different config."""
    old = run_dir / "config.yaml"
    if old.exists():
        prev = yaml.safe_load(old.read_text())
        if trajectory(prev) != trajectory(cfg):
            raise ValueError(f"{run_dir} holds a run with a different config; choose another name= "
                             f"or delete the directory (differences: {config_diff(prev, cfg)})")


def training_seconds(lines: List[dict], start: Optional[float]) -> float:
    """Seconds spent training: the sum, over the run's processes (a resume starts a new one, whose
    log lines' ``elapsed`` count from 0 again), of each one's last ``elapsed``, so the time a run
    lay stopped between a kill and its resume is not counted. Logs without ``elapsed``: start of
    training to the last log line."""
    spans, last = [], None
    for e in (line.get("elapsed") for line in lines):
        if e is None:
            continue
        if last is not None and e < last:
            spans.append(last)
        last = e
    if last is not None:
        return float(sum(spans) + last)
    times = [line["time"] for line in lines if "time" in line]
    return (times[-1] - start) if times and start is not None else float("nan")
