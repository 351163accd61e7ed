"""A sharded (FSDP2) run killed with SIGKILL and resumed continues to the parameters of an
uninterrupted one, and an FSDP run directory works with every command that reads model.safetensors.
Five torchrun launches (~1.5 min on 2 busy cores): slow."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).resolve().parent))

from test_fsdp import launch  # noqa: E402

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    if not torch.distributed.is_available():
        pytest.skip("torch.distributed is not available in this build")
    base = tmp_path_factory.mktemp("fsdp_resume")
    out, runs = base / "out", base / "runs"
    launch(out, runs, "resume:a,experiment")
    killed = {}
    # b: killed after the 3rd optimizer step (checkpoint of step 2 on disk);
    # c: killed while the step-4 checkpoint replaces the step-2 one (only ckpt.old-* exists then)
    for job, fault in (("resume:b", "step:3"), ("resume:c", "ckpt_write:5")):
        proc = launch(out, runs, job, fault=fault, check=False)
        assert proc.returncode != 0, "the fault did not kill the run"
        assert "SIGKILL" in proc.stdout + proc.stderr
        killed[job] = sorted(p.name for p in (runs / job.replace(":", "_")).iterdir())
        launch(out, runs, job)
    return out, runs, killed


@pytest.mark.parametrize("job", ["resume_b", "resume_c"])
def test_killed_and_resumed_sharded_run_equals_uninterrupted(runs, job):
    out, run_dirs, killed = runs
    left = killed[job.replace("_", ":")]
    if job == "resume_b":
        assert "checkpoint" in left
    else:  # killed between the two renames: find_checkpoint moves the old one back
        assert "checkpoint" not in left and any(n.startswith("ckpt.old-") for n in left), left
    summary = json.loads((run_dirs / job / "summary.json").read_text())
    assert summary["resumed_from"] == 2 and summary["step"] == 4
    for suffix in ("", "_live"):  # the EMA weights and the trained ones
        a = load_file(str(out / f"resume_a{suffix}.safetensors"))
        b = load_file(str(out / f"{job}{suffix}.safetensors"))
        assert set(a) == set(b) and len(a) > 0
        for k in a:
            assert torch.equal(a[k], b[k]), f"{job}{suffix}: {k} differs after resume"
    a, b = load_file(str(out / "resume_a.safetensors")), load_file(str(out / "resume_a_live.safetensors"))
    assert any(not torch.equal(a[k], b[k]) for k in a), "EMA and live weights are the same: EMA not exercised"


def test_fsdp_run_directory_is_read_by_every_command(runs, capsys):
    from anyorder.cli import main
    from anyorder.experiment import evaluate, load_run
    _, run_dirs, _ = runs
    run = run_dirs / "experiment"
    state = json.loads((run / "checkpoint" / "state.json").read_text())
    assert state["sharded"] == "sharded" and state["world_size"] == 2 and state["has_ema"]
    exp = load_run(run)  # model.safetensors: full tensors gathered from the shards
    weights = load_file(str(run / "model.safetensors"))
    assert {k: tuple(v.shape) for k, v in weights.items()} == {k: tuple(v.shape) for k, v in exp.model.state_dict().items()}
    metrics = evaluate(exp, {"name": "margin"}, n=8, batch_size=8)
    assert 0.0 <= metrics["cell_acc"] <= 1.0
    summary = json.loads((run / "summary.json").read_text())
    assert summary["finished"] and "val_cell_acc" in summary["eval"]  # rank 0 evaluated in its plain copy
    assert main(["sample", str(run), "--n", "1"]) == 0
    assert capsys.readouterr().out.strip()
