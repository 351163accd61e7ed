"""train.strategy=fsdp: two FSDP2 ranks (gloo, CPU, torchrun) train exactly what one process
accumulating both ranks' batches trains, for the native and the Hugging Face backbone; a sharded
checkpoint is refused by the unsharded loader (and back) with the fix; a bad strategy is named."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

HERE = Path(__file__).resolve().parent
SRC = HERE.parent / "src"
sys.path.insert(0, str(HERE))

import fsdp_worker  # noqa: E402
from test_ddp import _torchrun  # noqa: E402

from anyorder.train import CheckpointMismatchError, TrainConfig  # noqa: E402
from anyorder.train.fsdp import shard_units  # noqa: E402

pytest.importorskip("torch.distributed.fsdp")


def launch(out: Path, runs: Path, jobs: str, fault: str | None = None, check: bool = True):
    """One ``torchrun --nproc_per_node=2`` of tests/fsdp_worker.py; ``fault`` sets ANYORDER_FAULT."""
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    env["PYTHONPATH"] = os.pathsep.join([str(SRC), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "ANYORDER_FAULT"):
        env.pop(var, None)  # never inherit a surrounding launcher's rendezvous (or fault)
    if fault:
        env["ANYORDER_FAULT"] = fault
    cmd = [_torchrun(), "--standalone", "--nproc_per_node=2", str(HERE / "fsdp_worker.py"),
           "--out", str(out), "--run-dir", str(runs), "--jobs", jobs]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    if check:
        assert proc.returncode == 0, f"torchrun failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr[-4000:]}"
    return proc


@pytest.fixture(scope="module")
def fsdp_run(tmp_path_factory):
    if not torch.distributed.is_available():
        pytest.skip("torch.distributed is not available in this build")
    base = tmp_path_factory.mktemp("fsdp")
    proc = launch(base / "out", base / "runs", "native_ga1,native_ga2,hf_ga1")
    return base / "out", base / "runs", proc.stdout


def _reference(job: str, tmp_path):
    """One process (no FSDP), grad_accum doubled: the batches of both ranks, accumulated."""
    trainer = fsdp_worker.train_job(job, tmp_path / job, strategy="ddp", world=1)
    return trainer.model.state_dict()


@pytest.mark.parametrize("job", ["native_ga1", "native_ga2", "hf_ga1"])
def test_fsdp_two_ranks_equal_one_process_accumulating(fsdp_run, job, tmp_path):
    """FSDP reduce-scatters the mean gradient over ranks, (g0 + g1) / 2; accumulation sums g0/2 + g1/2.
    With grad_accum 2 per rank every micro-step reduce-scatters and the shards accumulate. Equal up
    to the summation order of the gradient norm (clipping) and of the reductions."""
    out, runs, stdout = fsdp_run
    assert f"job={job} world_size=2 backend=gloo step={fsdp_worker.STEPS}" in stdout
    got = load_file(str(out / f"{job}.safetensors"))
    ref = _reference(job, tmp_path)
    assert set(got) == set(ref)
    init = fsdp_worker.make_model("hf" if job.startswith("hf") else "native").state_dict()
    assert all(not torch.equal(ref[k], init[k]) for k in ref), "parameters did not change"
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], rtol=1e-5, atol=1e-6, msg=lambda m, k=k: f"{k}: {m}")
    print(f"{job}: max |fsdp - one process| = {max(float((got[k] - ref[k]).abs().max()) for k in ref):.2g}")
    # the checkpoint is sharded: one safetensors file per rank, no unsharded model file
    ckpt = runs / job / "checkpoint"
    assert sorted(p.name for p in (ckpt / "sharded").iterdir()) == [
        "shard-00001-model-00001-of-00001.safetensors", "shard-00002-model-00001-of-00001.safetensors"]
    assert not (ckpt / "model.safetensors").exists()


def test_shard_units_are_the_blocks_of_either_backbone():
    native, hf = fsdp_worker.make_model("native"), fsdp_worker.make_model("hf")
    assert shard_units(native) == list(native.blocks)
    layers = hf.hf.model.layers
    assert shard_units(hf) == list(layers) and len(layers) == 2


def test_bad_strategy_is_named():
    with pytest.raises(ValueError, match=r"^TrainConfig.strategy must be one of 'ddp', 'fsdp', got 'fdsp'$"):
        TrainConfig(strategy="fdsp")


def test_sharded_and_unsharded_checkpoints_refuse_each_other(tmp_path):
    """One process, FSDP on a one-rank group: the checkpoint it writes is refused by a ddp run with
    the fix, and a ddp checkpoint by an fsdp run."""
    import torch.distributed as dist
    try:
        fsdp_worker.train_job("native_ga1", tmp_path / "a", strategy="fsdp", world=1)
        with pytest.raises(CheckpointMismatchError, match="sharded checkpoint .*resume it with train.strategy=fsdp"):
            fsdp_worker.train_job("native_ga1", tmp_path / "a", strategy="ddp", world=1)
        fsdp_worker.train_job("native_ga1", tmp_path / "b", strategy="ddp", world=1)
        with pytest.raises(CheckpointMismatchError, match="not a sharded checkpoint .*resume it with train.strategy=ddp"):
            fsdp_worker.train_job("native_ga1", tmp_path / "b", strategy="fsdp", world=1)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def test_a_two_rank_checkpoint_loads_on_one_rank(fsdp_run, tmp_path):
    """DCP reshards: the 2-rank checkpoint of native_ga1 restores the same full parameters and the
    optimizer's step count in a one-process FSDP trainer (with the world-size warning)."""
    import shutil
    import torch.distributed as dist
    from anyorder.train import Trainer
    out, runs, _ = fsdp_run
    shutil.copytree(runs / "native_ga1" / "checkpoint", tmp_path / "checkpoint")
    cfg = fsdp_worker.make_config(2, "fsdp")
    try:
        trainer = Trainer(fsdp_worker.make_model(), fsdp_worker.make_loss_fn(cfg.seed, 2), cfg, tmp_path)
        with pytest.warns(UserWarning, match="saved with world size 2, resuming with 1"):
            assert trainer._resume_or_seed() == fsdp_worker.STEPS
        full = trainer.fsdp.full_state_dict(trainer.model)
        ref = load_file(str(out / "native_ga1.safetensors"))
        assert set(full) == set(ref) and all(torch.equal(full[k], ref[k]) for k in ref)
        steps = {float(s["step"]) for s in trainer.optimizer.state_dict()["state"].values()}
        assert steps == {float(fsdp_worker.STEPS)}
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
