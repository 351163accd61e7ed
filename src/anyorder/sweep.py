"""Sweeps: a grid of configs (orders × tasks × seeds × sizes ...) trained as separate runs.

    name: study
    out_dir: runs/sweeps
    base: ../sudoku4.yaml            # a config file, relative to this file (optional)
    overrides: [train.steps=300]     # dotted overrides applied to every run (optional)
    grid:                            # dotted key -> values; the sweep is their cartesian product
      order: [{name: random}, {name: ar}]
      seed: [0, 1, 2]
    launcher: {name: local, workers: 2}   # or {name: submitit, cluster: slurm, ...}

Each run lives in ``<out_dir>/<name>/<run label>/`` and is an ordinary run directory. Before
anything trains, every grid point is built (task, order, objective, decoders, the model on the
meta device: no weights) and every run directory on disk is compared with its grid point
(:func:`anyorder.rundir.trajectory`): a run whose training config differs is refused, or with
``force`` moved aside to ``<label>.old-<time>`` and trained from scratch. A run
whose ``summary.json`` says finished is never redone (more ``train.steps`` continue it); an
unfinished one resumes from its checkpoint, so a killed sweep continues where it stopped.
``sweep.json`` lists each run's state on disk. Runs go to local processes by default
(``concurrent.futures``; they stop with the sweep: SIGTERM/SIGINT to the sweep stops them, and
they exit when the sweep process dies, even by SIGKILL) or to a cluster through submitit (Slurm;
``cluster: local`` or ``debug`` runs submitit's own local modes). No scheduler of our own.
"""
from __future__ import annotations

import contextlib
import copy
import ctypes
import itertools
import json
import multiprocessing as mp
import os
import re
import signal
import sys
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch
import yaml
from tqdm import tqdm

from .checks import check_mapping, show
from .config import DEFAULTS, apply_overrides, load_config, merge, read_yaml
from .experiment import build, run_dir_for, train
from .train.guard import finished_summary
from .registry import unknown_choice
from .rundir import config_diff, trajectory

SWEEP_KEYS = {"name", "out_dir", "base", "overrides", "grid", "launcher"}
LAUNCHERS = ("local", "submitit")
DATA_KEYS = ("n_train", "n_eval")  # task options that only size the dataset
OLD_RUN = re.compile(r"\.old-\d{8}-\d{6}(-\d+)?$")  # a run moved aside by a forced rerun
STOP_GRACE_S = 10.0  # a stopped worker's time to checkpoint and exit before it is killed


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


def cap_data(cfg: Dict[str, Any], max_data: int) -> Dict[str, Any]:
    """A copy of ``cfg`` whose task holds at most ``max_data`` train / eval examples (0 = as is)."""
    cfg = copy.deepcopy(cfg)
    if max_data:
        for key in DATA_KEYS:
            value = cfg["task"].get(key)
            if isinstance(value, int) and not isinstance(value, bool):  # anything else: validation names it
                cfg["task"][key] = min(value, int(max_data))
    return cfg


def validate(runs: List[Tuple[str, Dict[str, Any]]], config_dir=None) -> None:
    """Build every grid point as ``train`` would (datasets capped, the model on the meta device),
    so a bad value in any point fails before the first run trains, naming the point."""
    for label, cfg in runs:
        try:
            build(cap_data(cfg, 16), config_dir, meta=True)
        except FileNotFoundError as exc:
            raise FileNotFoundError(f"sweep point {label!r}: {exc}") from exc
        except ValueError as exc:
            raise ValueError(f"sweep point {label!r}: {exc}") from exc
    torch.manual_seed(0)  # leave no point-dependent global RNG state behind


def _on_disk(label: str, cfg: Dict[str, Any]) -> Dict[str, Any]:
    """What the run directory of a grid point holds: ``state`` new, partial (resumes), finished
    (skipped; ``kept``: its config's differences that do not change training), continue (finished
    with fewer ``train.steps``: trains on) or differs (``diff``: what changes training)."""
    run_dir = run_dir_for(cfg)
    stored = run_dir / "config.yaml"
    if not stored.exists():
        return {"run": label, "state": "new"}
    prev = yaml.safe_load(stored.read_text()) or {}
    finished = finished_summary(run_dir) is not None  # summary.json: the final evaluation completed
    diff = config_diff(trajectory(prev), trajectory(cfg))
    steps, want = prev.get("train", {}).get("steps"), cfg["train"]["steps"]
    if finished and cfg["train"].get("flops_budget") is None and steps is not None and int(steps) > int(want):
        diff = "; ".join(filter(None, [diff, f"train.steps: {steps!r} -> {want!r} (trained further)"]))
    if diff:
        return {"run": label, "state": "differs", "diff": diff}
    if not finished:
        return {"run": label, "state": "partial"}
    if steps is not None and int(want) > int(steps):
        return {"run": label, "state": "continue"}
    kept = config_diff(prev, cfg)  # keys that do not change training: the run on disk keeps its own
    return {"run": label, "state": "finished", **({"kept": kept} if kept else {})}


def check_on_disk(runs: List[Tuple[str, Dict[str, Any]]], force: bool = False) -> List[Dict[str, Any]]:
    """The state on disk of every run (:func:`_on_disk`); runs whose training config differs from
    their grid point are refused, or with ``force`` moved aside to ``<dir>.old-<time>`` (state
    ``rerun``)."""
    states = [_on_disk(label, cfg) for label, cfg in runs]
    differ = [s for s in states if s["state"] == "differs"]
    if differ and not force:
        listed = " | ".join(f"{s['run']}: {s['diff']}" for s in differ)
        raise ValueError(f"{len(differ)} run(s) on disk were trained with a different config than their grid "
                         f"point: {listed}. Rerun them from scratch with --force (force=True; the old "
                         f"directories are kept as NAME.old-TIME) or change the sweep's name/out_dir")
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for s, (_, cfg) in zip(states, runs):
        if s["state"] == "differs":
            run_dir, i = run_dir_for(cfg), 0
            old = run_dir.with_name(f"{run_dir.name}.old-{stamp}")
            while old.exists():
                i += 1
                old = run_dir.with_name(f"{run_dir.name}.old-{stamp}-{i}")
            run_dir.rename(old)
            s.update(state="rerun", moved_to=str(old))
    return states


def _write_sweep_json(out: Path, spec, states, results=None) -> None:
    runs = [{**s, **({"status": r["status"]} if r else {})} for s, r in zip(states, results or [None] * len(states))]
    data = {"spec": spec, "runs": [s["run"] for s in states], "on_disk": runs}
    tmp = out / "sweep.json.tmp"
    tmp.write_text(json.dumps(data, indent=1))
    tmp.replace(out / "sweep.json")


def _train_one(cfg: Dict[str, Any], threads: int = 0, config_dir: Optional[str] = None) -> Dict[str, Any]:
    """One run (in a worker process): train, or resume from its checkpoint."""
    if threads:
        torch.set_num_threads(threads)
    run_dir = run_dir_for(cfg)
    train(cfg, run_dir, config_dir=config_dir)
    return {"run": str(run_dir), "status": "trained"}


def run_sweep(path_or_dict, workers: int = None, launcher: str = None, force: bool = False) -> List[Dict[str, Any]]:
    spec = load_sweep(path_or_dict)
    runs = expand(spec)
    for _, c in runs:
        c["train"]["progress"] = False
    config_dir = str(Path(spec["base"]).parent) if spec.get("base") else None  # the base config's plugins
    validate(runs, config_dir)
    states = check_on_disk(runs, force)
    launch = dict(spec["launcher"])
    name = launcher or launch.pop("name", "local")
    launch.pop("name", None)
    out = Path(spec["out_dir"]) / str(spec["name"])
    out.mkdir(parents=True, exist_ok=True)
    _write_sweep_json(out, spec, states)
    cfgs = [c for _, c in runs]
    todo = [i for i, s in enumerate(states) if s["state"] != "finished"]
    results: List[Optional[Dict[str, Any]]] = [
        {"run": str(run_dir_for(c)), "status": "done (skipped)"} for c in cfgs]
    todo_cfgs = [cfgs[i] for i in todo]
    if not todo_cfgs:
        done = []
    elif name == "local":
        n = int(workers or launch.get("workers") or 1)
        # OMP_NUM_THREADS, when set, wins: a sweep sharing the machine with other work must not
        # take every core
        threads = int(os.environ.get("OMP_NUM_THREADS") or 0) or max(1, (os.cpu_count() or 1) // n)
        if n == 1 or len(todo_cfgs) <= 1:
            done = [_train_one(c, threads, config_dir) for c in todo_cfgs]
        else:
            done = _run_local_pool(todo_cfgs, n, threads, config_dir)
    else:
        import submitit  # lazy: optional dependency (pip install submitit), only for launcher 'submitit'

        executor = submitit.AutoExecutor(folder=str(out / "submitit"), cluster=launch.pop("cluster", None))
        if launch:
            executor.update_parameters(**launch)
        jobs = executor.map_array(_train_one, todo_cfgs, [0] * len(todo_cfgs), [config_dir] * len(todo_cfgs))
        done = [j.result() for j in jobs]
    for i, r in zip(todo, done):
        results[i] = r
    _write_sweep_json(out, spec, states, results)
    return results


# -- local workers die with the sweep -------------------------------------------------------------

def _run_local_pool(cfgs, n: int, threads: int, config_dir) -> List[Dict[str, Any]]:
    """``_train_one`` over ``cfgs`` in ``n`` spawned processes that stop with this one."""
    pool = ProcessPoolExecutor(max_workers=n, mp_context=mp.get_context("spawn"), initializer=_worker_init,
                               initargs=(os.getpid(),))
    try:
        with _stop_workers_on_signal(pool):
            return list(pool.map(_train_one, cfgs, [threads] * len(cfgs), [config_dir] * len(cfgs)))
    finally:
        pool.shutdown(wait=True, cancel_futures=True)  # after a failed run: the others finish theirs


class SweepStopped(KeyboardInterrupt):
    """Ctrl-C stopped the sweep and its workers (already said on stderr)."""


def _stop_workers(pool: ProcessPoolExecutor) -> None:
    """SIGTERM to every worker's process group (a worker checkpoints and exits), SIGKILL after
    :data:`STOP_GRACE_S`."""
    procs = list((getattr(pool, "_processes", None) or {}).values())  # this pool's processes only
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for p in procs:
            try:
                os.killpg(p.pid, sig)  # the worker leads its own group (_worker_init): its children too
            except (ProcessLookupError, PermissionError):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(p.pid, sig)  # not yet in its own group
        deadline = time.monotonic() + STOP_GRACE_S
        for p in procs:
            p.join(max(0.0, deadline - time.monotonic()))
        procs = [p for p in procs if p.is_alive()]
        if not procs:
            return


@contextlib.contextmanager
def _stop_workers_on_signal(pool: ProcessPoolExecutor):
    """While the pool runs: SIGTERM or SIGINT to the sweep stops its workers first, then the sweep
    (one line on stderr, then SystemExit 143 or :class:`SweepStopped`)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not cut the stopping short
        print(f"anyorder: sweep stopped by {signal.Signals(signum).name}; stopping its workers "
              f"(rerun the sweep to resume)", file=sys.stderr, flush=True)
        _stop_workers(pool)
        if signum == signal.SIGINT:
            raise SweepStopped
        raise SystemExit(128 + signum)

    old = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def _worker_init(parent: int) -> None:
    """In each worker: a process group of its own (the terminal's Ctrl-C reaches the sweep, which
    stops the workers), and exit when the sweep process dies, SIGKILL included: the kernel sends
    SIGTERM (Linux ``PR_SET_PDEATHSIG``), and a thread watching the parent pid does it elsewhere."""
    with contextlib.suppress(OSError):
        os.setpgid(0, 0)
    # tqdm's default lock is a multiprocessing semaphore, which a killed worker would leave to the
    # resource tracker (a warning when the sweep stops); a worker has one process, a thread lock will do
    tqdm.set_lock(threading.RLock())
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGTERM))  # 1 = PR_SET_PDEATHSIG
    threading.Thread(target=_watch_parent, args=(parent,), name="anyorder-parent-watch", daemon=True).start()


def _watch_parent(parent: int, every_s: float = 1.0) -> None:
    while os.getppid() == parent:
        time.sleep(every_s)
    os.kill(os.getpid(), signal.SIGTERM)  # the parent is gone (its pid no longer ours)
    time.sleep(STOP_GRACE_S)
    os._exit(1)
