"""Fault injection: ``anyorder train`` (and ``anyorder sweep``) killed with SIGKILL at many points --
inside checkpoint writes (every file, the rename window), after an optimizer step before its log
row, inside periodic and final evaluations, between the final evaluation and summary.json, at
random times -- and every time a resume reaches the parameters, weights and metrics of an
uninterrupted run.

Kills come from ``ANYORDER_FAULT=POINT:N`` (``anyorder/train/faults.py``: SIGKILL the N-th time
the process passes POINT) or from a timer. After each kill a *copy* of the run directory is
resumed in this process and compared with the reference; the chain of kills goes on in the
original, so later kills hit runs that were already killed and resumed before.

"No lost or duplicated metrics rows" means: ``metrics.jsonl`` holds exactly one ``train`` row per
log step and one ``eval`` row per evaluation step, in the order of the uninterrupted run, and
every value in them equals the uninterrupted run's (timings aside: with ``log_every=1`` a train
row covers one step, so a resumed row has nothing to differ in).
"""
from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from anyorder.config import load_config
from anyorder.experiment import train
from anyorder.sweep import run_sweep

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "sudoku4.yaml"
OVER = ["task.n_train=64", "task.n_eval=16", "model.d_model=16", "model.n_layers=1", "model.n_heads=2",
        "train.steps=8", "train.warmup_steps=1", "train.batch_size=4", "train.progress=false", "train.log_every=1",
        "train.eval_every=2", "train.checkpoint_every=3", "train.ema=0.9", "eval.n=8"]
TIMING = ("time", "per_s", "elapsed")


def cfg(out_dir, name="t"):
    return load_config(str(CONFIG), OVER + [f"out_dir={out_dir}", f"name={name}"])


def env(**extra) -> dict:
    return {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", **extra}


def table(run_dir: Path) -> list:
    """metrics.jsonl as (event, step, values without timings), in file order."""
    out = []
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        out.append((r.pop("event"), r.pop("step"), {k: v for k, v in r.items() if not any(t in k for t in TIMING)}))
    return out


def assert_same_run(run: Path, ref: Path, label: str) -> None:
    for f in ("model.safetensors", "checkpoint/model.safetensors", "checkpoint/ema.safetensors"):
        a, b = load_file(str(run / f)), load_file(str(ref / f))
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), f"{label}: {f}:{k} differs from the uninterrupted run"
    got, want = table(run), table(ref)
    assert [r[:2] for r in got] == [r[:2] for r in want], f"{label}: rows lost or duplicated"
    assert got == want, f"{label}: a metrics row differs from the uninterrupted run"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["finished"] and summary["eval"] and summary["step"] == 8, label
    strip = lambda d: {k: v for k, v in d.items() if not any(t in k for t in TIMING)}
    assert strip(summary["eval"]) == strip(json.loads((ref / "summary.json").read_text())["eval"]), label
    assert not list(run.glob("ckpt.*")) and not (run / ".lock").exists(), label


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("ref")
    return train(cfg(out))


def kill_then_check(out: Path, reference: Path, fault: str | None, n: int, delay: float = 0.0) -> int:
    """Run ``anyorder train`` on out/t under ``fault`` (or SIGKILL it after ``delay`` s), then resume a
    copy here and compare it with the reference. Returns the child's exit status."""
    cmd = [sys.executable, "-m", "anyorder.cli", "train", str(CONFIG), *OVER, f"out_dir={out}", "name=t"]
    extra = {"ANYORDER_FAULT": fault} if fault else {}
    proc = subprocess.Popen(cmd, env=env(**extra), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if delay:
        try:
            proc.wait(timeout=delay)
        except subprocess.TimeoutExpired:
            proc.kill()
    _, err = proc.communicate(timeout=300)
    assert proc.returncode in (0, -signal.SIGKILL), err[-2000:]
    copy = out.parent / f"copy{n}"
    shutil.copytree(out / "t", copy / "t")
    train(cfg(copy))
    assert_same_run(copy / "t", reference, f"kill {n} ({fault or f'after {delay:.2f}s'})")
    return proc.returncode


# The fresh run: evaluations at 2, 4, 6, checkpoints at 3, 6, then the step-8 checkpoint, the
# weights, the final evaluation, summary.json. Each kill below starts from what the one before left.
FAULTS = [
    "ckpt_write:2",  # inside the first checkpoint write (model and optimizer files written): no checkpoint yet
    "step:5",        # after step 5's update, before its row; resumes from step 3
    "ckpt_write:4",  # replacing checkpoint 3 by 6: between moving 3 aside and moving 6 in
    "eval:2",        # inside the step-6 evaluation, before its row
    "ckpt_write:9",  # the rename window of the step-8 checkpoint
    "final:1",       # final evaluation logged, summary.json not yet written: the row is redone, once
    "eval:1",        # inside the redone final evaluation
]


# the default suite's share (about 40 s): both kinds of checkpoint kill, a step, the final evaluation
QUICK = ["ckpt_write:2", "step:5", "ckpt_write:4", "final:1", "eval:1"]


@pytest.mark.parametrize("faults", [QUICK, pytest.param(FAULTS, marks=pytest.mark.slow)], ids=["quick", "all"])
def test_sigkill_at_named_points_always_resumes_bit_identically(tmp_path, reference, faults):
    out = tmp_path / "chain"
    for n, fault in enumerate(faults):
        assert kill_then_check(out, reference, fault, n) == -signal.SIGKILL, f"{fault} was never reached"
    train(cfg(out))
    assert_same_run(out / "t", reference, "the chain's own resume")


@pytest.mark.slow
def test_sigkill_of_a_sweep_then_rerun_matches_an_uninterrupted_sweep(tmp_path):
    def spec(out):
        return {"name": "s", "out_dir": str(out), "base": str(CONFIG), "overrides": OVER, "grid": {"seed": [0, 1]}}

    run_sweep(spec(tmp_path / "ref"), workers=1)
    path = tmp_path / "sweep.yaml"
    path.write_text(json.dumps(spec(tmp_path / "killed")))
    # one worker trains in the sweep process itself; hit 9 is in seed=0's step-8 checkpoint write,
    # hit 1 of "final" (the first run's) with seed=1 untouched
    for n, fault in enumerate(["ckpt_write:9", "final:1", "ckpt_write:12"]):
        proc = subprocess.run([sys.executable, "-m", "anyorder.cli", "sweep", str(path), "--workers", "1"],
                              env=env(ANYORDER_FAULT=fault), capture_output=True, text=True, timeout=300)
        assert proc.returncode == -signal.SIGKILL, (fault, proc.stderr[-2000:])
    out = run_sweep(str(path), workers=1)
    assert [r["status"] for r in out][1] == "trained"
    for seed in ("seed=0", "seed=1"):
        assert_same_run(tmp_path / "killed" / "s" / seed, tmp_path / "ref" / "s" / seed, seed)


@pytest.mark.slow
def test_sigkill_at_random_points_and_times(tmp_path, reference):
    """Random named points and random timed kills, chained until the run finishes, several chains."""
    rng = random.Random(int(os.environ.get("ANYORDER_FAULT_SEED", "12")))
    points = {"micro": 12, "step": 8, "ckpt_write": 12, "eval": 4, "final": 1}
    n = 0
    for chain in range(4):
        out = tmp_path / f"chain{chain}"
        while True:
            if rng.random() < 0.3:
                rc = kill_then_check(out, reference, None, n, delay=rng.uniform(2.0, 6.0))
            else:
                point = rng.choice(sorted(points))
                rc = kill_then_check(out, reference, f"{point}:{rng.randint(1, points[point])}", n)
            n += 1
            if rc == 0:
                break
        assert_same_run(out / "t", reference, f"chain {chain}")
