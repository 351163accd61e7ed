"""Two-process DDP (gloo, CPU) through torchrun: replicas stay identical and match grad accumulation."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

HERE = Path(__file__).resolve().parent
SRC = HERE.parent / "src"
sys.path.insert(0, str(HERE))  # for ddp_worker's model/loss (it also makes anyorder importable)

import ddp_worker  # noqa: E402
from anyorder.train import Trainer  # noqa: E402

STEPS = 5


def _torchrun() -> str:
    exe = Path(sys.executable).with_name("torchrun")
    if exe.exists():
        return str(exe)
    found = shutil.which("torchrun")
    if found is None:
        pytest.skip("torchrun not found next to the Python executable or on PATH")
    return found


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    """One torchrun launch, two trainings: grad_accum=1 and grad_accum=2 (the latter uses no_sync)."""
    if not torch.distributed.is_available():
        pytest.skip("torch.distributed is not available in this build")
    base = tmp_path_factory.mktemp("ddp")
    out, run_dir = base / "out", base / "run"
    env = dict(os.environ)
    env["OMP_NUM_THREADS"] = "1"
    env["PYTHONPATH"] = os.pathsep.join([str(SRC), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)  # never inherit a surrounding launcher's rendezvous
    cmd = [
        _torchrun(), "--standalone", "--nproc_per_node=2", str(HERE / "ddp_worker.py"),
        "--out", str(out), "--run-dir", str(run_dir), "--steps", str(STEPS), "--grad-accum", "1,2",
        "--resume-check",
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, f"torchrun failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    return out, run_dir, proc.stdout


def _single_process(tmp_path, grad_accum: int):
    cfg = ddp_worker.make_config(steps=STEPS, grad_accum=grad_accum)
    trainer = Trainer(ddp_worker.make_model(), ddp_worker.make_loss_fn(cfg.seed, grad_accum), cfg, tmp_path)
    trainer.fit()
    return trainer.model.state_dict()


@pytest.mark.parametrize("ga", [1, 2])
def test_ddp_replicas_identical_and_trained(ddp_run, ga):
    out, run_dir, stdout = ddp_run
    assert f"world_size=2 backend=gloo ga={ga}" in stdout
    init = load_file(str(out / "init.safetensors"))
    r0, r1 = (load_file(str(out / f"rank{r}_ga{ga}.safetensors")) for r in (0, 1))
    assert set(r0) == set(r1) == set(init)
    for k in r0:
        assert torch.equal(r0[k], r1[k]), f"replicas diverged on {k}"
    assert all(not torch.equal(r0[k], init[k]) for k in r0), "parameters did not change"

    # rank 0 alone wrote the checkpoint/logs, with the RNG state of both ranks
    state = json.loads((run_dir / f"ga{ga}" / "checkpoint" / "state.json").read_text())
    assert state["step"] == STEPS and state["world_size"] == 2
    assert state["tokens_seen"] == STEPS * 2 * ga * ddp_worker.BATCH  # summed over ranks
    assert set(state["rng"]) == {"rank0", "rank1"}
    lines = [json.loads(x) for x in (run_dir / f"ga{ga}" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [2, 4, 5]


def test_ddp_matches_single_process_grad_accum(ddp_run, tmp_path):
    """2 ranks x 1 micro-batch == 1 rank x 2 micro-batches on the same data, bit for bit.

    DDP averages the ranks' gradients, (g0 + g1) / 2; accumulation sums g0 / 2 + g1 / 2. Halving is
    exact in floating point, so with the same batches the two are identical.
    """
    out, _, _ = ddp_run
    r0 = load_file(str(out / "rank0_ga1.safetensors"))
    single = _single_process(tmp_path, grad_accum=2)
    for k in r0:
        assert torch.equal(r0[k], single[k]), f"{k}: DDP and grad_accum differ, max abs {(r0[k] - single[k]).abs().max()}"


def test_ddp_no_sync_accumulation_matches_single_process(ddp_run, tmp_path):
    """2 ranks x grad_accum=2 vs 1 rank x grad_accum=4 on the same 4 batches per step.

    Same maths, different summation order ((g0+g1)+(g2+g3) vs ((g0+g1)+g2)+g3), so equal only up
    to rounding.
    """
    out, _, _ = ddp_run
    r0 = load_file(str(out / "rank0_ga2.safetensors"))
    single = _single_process(tmp_path, grad_accum=4)
    for k in r0:
        torch.testing.assert_close(r0[k], single[k], rtol=1e-5, atol=1e-6)


def test_ddp_resume_is_bit_identical(ddp_run):
    """Crash at step 3, resume from the step-2 checkpoint: same params as uninterrupted, every rank.

    The model has dropout, so this needs each rank's own RNG state restored from the checkpoint.
    """
    out, run_dir, _ = ddp_run
    state = json.loads((run_dir / "resume_b" / "checkpoint" / "state.json").read_text())
    assert state["step"] == STEPS
    for rank in (0, 1):
        for suffix in ("", "_ema"):
            a = load_file(str(out / f"rank{rank}_resume_a{suffix}.safetensors"))
            b = load_file(str(out / f"rank{rank}_resume_b{suffix}.safetensors"))
            for k in a:
                assert torch.equal(a[k], b[k]), f"rank {rank}{suffix}: {k} differs after resume"
    a0, a1 = (load_file(str(out / f"rank{r}_resume_a.safetensors")) for r in (0, 1))
    assert all(torch.equal(a0[k], a1[k]) for k in a0)


def test_ddp_nonfinite_loss_on_one_rank_is_handled_by_every_rank(ddp_run):
    """(ddp_worker.nonfinite_check asserted in each rank that "error" stopped both at the step.)"""
    out, _, _ = ddp_run
    r0, r1 = (load_file(str(out / f"rank{r}_nonfinite_skip.safetensors")) for r in (0, 1))
    assert all(torch.equal(r0[k], r1[k]) for k in r0)  # both ranks skipped the same step
