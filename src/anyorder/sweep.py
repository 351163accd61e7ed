"""Sweeps: a grid of configs (orders × tasks × seeds × sizes ...) trained as separate runs.

    name: study
    out_dir: runs/sweeps
    base: ../sudoku4.yaml            # a config file, relative to this file (optional)
    overrides: [train.steps=300]     # dotted overrides applied to every run (optional)
    grid:                            # dotted key -> values; the sweep is their cartesian product
      order: [{name: random}, {name: ar}]
      seed: [0, 1, 2]
    launcher: {name: local, workers: 2}   # or {name: submitit, cluster: slurm, ...}

Each run lives in ``<out_dir>/<name>/<run label>/`` and is an ordinary run directory. A run
with ``model.safetensors`` is finished and never redone; an unfinished one resumes from its
checkpoint, so a killed sweep continues where it stopped. Runs go to local processes by default
(``concurrent.futures``) or to a cluster through submitit (Slurm; ``cluster: local`` or
``debug`` runs submitit's own local modes). No scheduler of our own.
"""
from __future__ import annotations

import copy
import itertools
import json
import multiprocessing as mp
import os
import re
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any, Dict, List, Tuple

import torch
import yaml

from .checks import check_mapping, show
from .config import DEFAULTS, apply_overrides, load_config, merge, read_yaml
from .experiment import build, run_dir_for, train
from .registry import unknown_choice

SWEEP_KEYS = {"name", "out_dir", "base", "overrides", "grid", "launcher"}
LAUNCHERS = ("local", "submitit")


def _label(value) -> str:
    if isinstance(value, dict):
        value = "-".join(str(v) for v in value.values())
    return re.sub(r"[^A-Za-z0-9._-]+", "_", str(value))


def load_sweep(path_or_dict) -> Dict[str, Any]:
    if isinstance(path_or_dict, dict):
        spec, base_dir = copy.deepcopy(path_or_dict), Path(".")
    else:
        path = Path(path_or_dict)
        if not path.exists():
            raise FileNotFoundError(f"sweep file {str(path)!r} does not exist")
        if not path.is_file():
            raise FileNotFoundError(f"sweep file {str(path)!r} is a folder, not a file")
        spec, base_dir = read_yaml(path.read_text(errors="replace"), f"sweep file {str(path)!r}") or {}, path.parent
    check_mapping("a sweep file", spec)
    unknown = set(spec) - SWEEP_KEYS
    if unknown:
        raise unknown_choice("sweep key", str(sorted(map(str, unknown))[0]), sorted(SWEEP_KEYS))
    if not isinstance(spec.get("grid", {}), dict):
        raise ValueError("sweep 'grid' must map dotted config keys to lists of values")
    spec.setdefault("name", "sweep")
    spec.setdefault("out_dir", "runs/sweeps")
    spec.setdefault("launcher", {"name": "local"})
    for key in ("name", "out_dir"):
        if not isinstance(spec[key], str) or not spec[key].strip():
            raise ValueError(f"sweep {key!r} must be a non-empty string, got {show(spec[key])}")
    if spec.get("base") is not None and not isinstance(spec["base"], str):
        raise ValueError(f"sweep 'base' must be a config file path, got {show(spec['base'])}")
    if not isinstance(spec.get("overrides") or [], list) or not all(isinstance(o, str) for o in spec.get("overrides") or []):
        raise ValueError(f"sweep 'overrides' must be a list of key=value strings, got {show(spec.get('overrides'))}")
    if isinstance(spec["launcher"], str):
        spec["launcher"] = {"name": spec["launcher"]}
    check_mapping("sweep 'launcher'", spec["launcher"])
    if spec.get("base"):
        spec["base"] = str((base_dir / spec["base"]).resolve()) if not Path(spec["base"]).is_absolute() else spec["base"]
    if spec["launcher"].get("name", "local") not in LAUNCHERS:
        raise unknown_choice("launcher", spec["launcher"].get("name"), list(LAUNCHERS))
    return spec


def expand(spec: Dict[str, Any]) -> List[Tuple[str, Dict[str, Any]]]:
    """(run label, resolved config) for every point of the grid, validated up front."""
    base = load_config(spec.get("base"), list(spec.get("overrides") or []))
    grid = spec.get("grid") or {}
    for key, values in grid.items():
        if not isinstance(values, list) or not values:
            raise ValueError(f"sweep grid entry {key!r} must be a non-empty list")
    keys = list(grid)
    runs = []
    for combo in itertools.product(*(grid[k] for k in keys)):
        cfg = copy.deepcopy(base)
        for key, value in zip(keys, combo):
            parts = key.split(".")
            if len(parts) == 1 and key in ("order", "task") and isinstance(value, dict):
                cfg[key] = copy.deepcopy(value)
            else:
                cfg = apply_overrides(cfg, [f"{key}={json.dumps(value)}"])
        label = ",".join(f"{k.split('.')[-1]}={_label(v)}" for k, v in zip(keys, combo)) or "run"
        out = Path(spec["out_dir"]) / str(spec["name"])
        cfg.update({"name": label, "out_dir": str(out)})
        runs.append((label, merge(DEFAULTS, cfg)))
    labels = [r[0] for r in runs]
    if len(set(labels)) != len(labels):
        raise ValueError("two grid points map to the same run label; give the values distinct names")
    return runs


def _train_one(cfg: Dict[str, Any], threads: int = 0) -> Dict[str, Any]:
    """One run (in a worker process): skip if finished, else train or resume."""
    if threads:
        torch.set_num_threads(threads)
    run_dir = run_dir_for(cfg)
    if (run_dir / "model.safetensors").exists():
        return {"run": str(run_dir), "status": "done (skipped)"}
    build(cfg)  # validate before any work
    train(cfg, run_dir)
    return {"run": str(run_dir), "status": "trained"}


def run_sweep(path_or_dict, workers: int = None, launcher: str = None) -> List[Dict[str, Any]]:
    spec = load_sweep(path_or_dict)
    runs = expand(spec)
    launch = dict(spec["launcher"])
    name = launcher or launch.pop("name", "local")
    launch.pop("name", None)
    out = Path(spec["out_dir"]) / str(spec["name"])
    out.mkdir(parents=True, exist_ok=True)
    (out / "sweep.json").write_text(json.dumps({"spec": spec, "runs": [r[0] for r in runs]}, indent=1))
    cfgs = [c for _, c in runs]
    for c in cfgs:
        c["train"]["progress"] = False
    if name == "local":
        n = int(workers or launch.get("workers") or 1)
        # OMP_NUM_THREADS, when set, wins: a sweep sharing the machine with other work must not
        # take every core
        threads = int(os.environ.get("OMP_NUM_THREADS") or 0) or max(1, (os.cpu_count() or 1) // n)
        if n == 1:
            return [_train_one(c, threads) for c in cfgs]
        with ProcessPoolExecutor(max_workers=n, mp_context=mp.get_context("spawn")) as pool:
            return list(pool.map(_train_one, cfgs, [threads] * len(cfgs)))
    import submitit  # lazy: optional dependency (pip install submitit), only for launcher 'submitit'

    executor = submitit.AutoExecutor(folder=str(out / "submitit"), cluster=launch.pop("cluster", None))
    if launch:
        executor.update_parameters(**launch)
    jobs = executor.map_array(_train_one, cfgs, [0] * len(cfgs))
    return [j.result() for j in jobs]
