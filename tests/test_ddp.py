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
    if not torch.distributed.is_available():
        pytest.skip("torch.distributed is not available in this build")
    base = tmp_path_factory.mktemp("ddp")
    out, run_dir = base / "out", base / "run"
    env = dict(os.environ)
    env["OMP_NUM_THREADS"] = "1"
    env["PYTHONPATH"] = os.pathsep.join([str(SRC), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)  # never inherit a surrounding launcher's rendezvous
    cmd = [
        _torchrun(), "--standalone", "--nproc_per_node=2", str(HERE / "ddp_worker.py"),
        "--out", str(out), "--run-dir", str(run_dir), "--steps", "5", "--grad-accum", "1",
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, f"torchrun failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    return out, run_dir, proc.stdout


def test_ddp_replicas_identical_and_trained(ddp_run):
    out, run_dir, stdout = ddp_run
    assert "world_size=2 backend=gloo" in stdout
    init, r0, r1 = (load_file(str(out / f)) for f in ("init.safetensors", "rank0.safetensors", "rank1.safetensors"))
    assert set(r0) == set(r1) == set(init)
    for k in r0:
        assert torch.equal(r0[k], r1[k]), f"replicas diverged on {k}"
    assert any(not torch.equal(r0[k], init[k]) for k in r0), "parameters did not change"

    # rank 0 alone wrote the checkpoint/logs, with the RNG state of both ranks
    state = json.loads((run_dir / "checkpoint" / "state.json").read_text())
    assert state["step"] == 5 and state["world_size"] == 2
    assert state["tokens_seen"] == 5 * 2 * ddp_worker.BATCH  # summed over ranks
    assert set(state["rng"]) == {"rank0", "rank1"}
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [2, 4, 5]


def test_ddp_matches_single_process_grad_accum(ddp_run, tmp_path):
    """2 ranks x 1 micro-batch == 1 rank x 2 micro-batches on the same data, bit for bit.

    DDP averages the ranks' gradients, (g0 + g1) / 2; accumulation sums g0 / 2 + g1 / 2. Halving is
    exact in floating point, so with the same batches the two are identical.
    """
    out, _, _ = ddp_run
    cfg = ddp_worker.make_config(steps=5, grad_accum=2)
    trainer = Trainer(ddp_worker.make_model(), ddp_worker.make_loss_fn(cfg.seed, cfg.grad_accum), cfg, tmp_path)
    trainer.fit()
    r0 = load_file(str(out / "rank0.safetensors"))
    single = trainer.model.state_dict()
    for k in r0:
        assert torch.equal(r0[k], single[k]), f"{k}: DDP and grad_accum differ, max abs {(r0[k] - single[k]).abs().max()}"
