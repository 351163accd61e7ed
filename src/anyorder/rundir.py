"""Run directories: where a config's run lives, and refusing to mix two configs in one."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict

import yaml

# keys that do not change what training computes: a resumed run may change them
_NOT_TRAJECTORY = ("name", "out_dir", "eval", "decode", "force_size")
_NOT_TRAJECTORY_TRAIN = ("steps", "eval_every", "checkpoint_every", "log_every", "progress", "tensorboard",
                         "wandb", "wandb_project")


def run_dir_for(cfg) -> Path:
    return Path(cfg["out_dir"]) / str(cfg["name"])


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
