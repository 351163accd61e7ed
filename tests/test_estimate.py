"""`anyorder estimate`: FLOPs per step counted on the real step, GPU hours = steps × FLOPs / (peak × MFU)."""
import json
import math
from pathlib import Path

import pytest

from anyorder.studies.estimate import (DEFAULT_MFU, H100_BF16_DENSE_TFLOPS, cap_data, estimate, estimate_sweeps,
                                        format_estimate, gpu_hours, train_steps)
from anyorder.sweep import expand, load_sweep

ROOT = Path(__file__).resolve().parents[1]
PAPER = ROOT / "configs" / "study" / "paper"
TINY = ["task.n_train=100", "task.n_eval=16", "model.d_model=32", "model.n_layers=1", "model.n_heads=2",
        "train.steps=1000", "train.batch_size=4", "train.progress=false", "eval.n=8"]


def tiny_sweep(tmp_path, **kw):
    s = {"name": "s", "out_dir": str(tmp_path), "base": str(ROOT / "configs" / "sudoku4.yaml"), "overrides": TINY,
         "grid": {"order": [{"name": "random"}, {"name": "ar"}], "seed": [0, 1]}}
    s.update(kw)
    return s


def test_gpu_hours_arithmetic_and_bad_assumptions():
    one_hour = H100_BF16_DENSE_TFLOPS * 1e12 * DEFAULT_MFU * 3600
    assert gpu_hours(one_hour) == pytest.approx(1.0)
    assert gpu_hours(2e18, peak_tflops=100, mfu=0.5) == pytest.approx(2e18 / (100e12 * 0.5) / 3600)
    with pytest.raises(ValueError, match="MFU must be in"):
        gpu_hours(1.0, mfu=1.5)
    with pytest.raises(ValueError, match="GPU peak must be > 0"):
        gpu_hours(1.0, peak_tflops=0)


def test_estimate_of_a_tiny_sweep(tmp_path):
    """Counted FLOPs equal step_flops on the real step; seeds share one count; totals add up."""
    from anyorder.experiment import build, make_loss_fn, step_flops
    from anyorder.train import TrainConfig

    runs = expand(load_sweep(tiny_sweep(tmp_path)))
    res = estimate(runs, cpu_steps=2, peak_tflops=100.0, mfu=0.5)
    rows = {r["run"]: r for r in res["runs"]}
    assert len(rows) == 4 and res["distinct_configs"] == 2
    assert rows["order=ar,seed=0"]["flops_per_step"] == rows["order=ar,seed=1"]["flops_per_step"]
    # ar trains on two streams (clean + noisy): about twice random's single stream
    assert rows["order=ar,seed=0"]["flops_per_step"] > 1.5 * rows["order=random,seed=0"]["flops_per_step"]
    cfg = dict(runs[0][1])
    exp = build(cfg)
    tcfg = TrainConfig(seed=0, steps=1, batch_size=4, warmup_steps=0)
    assert rows["order=random,seed=0"]["flops_per_step"] == step_flops(exp, make_loss_fn(exp), tcfg)
    for r in rows.values():
        assert r["steps"] == 1000 and r["total_flops"] == 1000 * r["flops_per_step"]
        assert r["gpu_hours"] == pytest.approx(r["total_flops"] / (100e12 * 0.5) / 3600)
        assert r["cpu_steps"] == 2 and math.isfinite(r["cpu_loss"])
        assert r["params"] == sum(p.numel() for p in exp.model.parameters())
    assert res["total"]["total_flops"] == sum(r["total_flops"] for r in rows.values())
    assert res["total"]["gpu_hours"] == pytest.approx(sum(r["gpu_hours"] for r in rows.values()))
    text = format_estimate(res)
    assert "MFU 0.5" in text and "GPU peak 100 TFLOP/s" in text and "| **total** | 4 |" in text


def test_flops_budget_and_data_cap():
    cfg = {"train": {"steps": 10, "flops_budget": None}, "task": {"name": "x", "n_train": 10**6, "n_eval": 50}}
    assert train_steps(cfg, 7.0) == 10
    cfg["train"]["flops_budget"] = 100.0
    assert train_steps(cfg, 7.0) == 14                   # floor(100 / 7), as train() resolves it
    capped = cap_data(cfg, 64)
    assert capped["task"]["n_train"] == 64 and capped["task"]["n_eval"] == 50 and cfg["task"]["n_train"] == 10**6
    assert cap_data(cfg, 0)["task"]["n_train"] == 10**6


def test_estimate_cli_and_errors(tmp_path, capsys):
    import yaml

    from anyorder.cli import main

    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(tiny_sweep(tmp_path, grid={"seed": [0]})))
    assert main(["estimate", str(path), "--steps", "0", "--json", "--mfu", "0.25"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["assumptions"]["mfu"] == 0.25 and res["assumptions"]["gpu_peak_tflops"] == H100_BF16_DENSE_TFLOPS
    assert res["runs"][0]["cpu_steps"] == 0 and res["total"]["runs"] == 1
    assert main(["estimate", str(tmp_path / "nope.yaml")]) == 2
    err = capsys.readouterr().err
    assert "sweep file" in err and "nope.yaml" in err and "does not exist" in err
    with pytest.raises(FileNotFoundError, match="does not exist"):
        estimate_sweeps([tmp_path / "nope.yaml"])
    assert main(["estimate", str(path), "--mfu", "2"]) == 2
    assert "MFU must be in (0, 1]" in capsys.readouterr().err


def _one_run_per_task(path):
    """The paper preset's runs, one per distinct task config (the first order and seed of each)."""
    seen, out = set(), []
    for label, cfg in expand(load_sweep(path)):
        key = json.dumps(cfg["task"], sort_keys=True)
        if key not in seen:
            seen.add(key)
            out.append((label, cfg))
    return out


@pytest.mark.parametrize("name, n_runs, n_tasks", [("linear_regression", 54, 3), ("star_graph", 72, 4),
                                                   ("sudoku", 18, 1)])
def test_paper_presets_expand_and_build(name, n_runs, n_tasks):
    """Paper sizes (width 256, 12 layers, 8 heads, batch 64); every order builds; the data is capped."""
    from anyorder.experiment import build
    from anyorder.orders import build_order

    runs = expand(load_sweep(PAPER / f"{name}.yaml"))
    assert len(runs) == n_runs
    assert {c["order"]["name"] for _, c in runs} == {"random", "ar", "block", "prefix_block", "jigsaw", "scatter"}
    assert {c["seed"] for _, c in runs} == {0, 1, 2}
    for _, cfg in runs:
        assert (cfg["model"]["d_model"], cfg["model"]["n_layers"], cfg["model"]["n_heads"]) == (256, 12, 8)
        assert cfg["train"]["batch_size"] == 64 and 1e-4 <= cfg["train"]["lr"] <= 2e-4
        build_order(cfg["order"])
    per_task = _one_run_per_task(PAPER / f"{name}.yaml")
    assert len(per_task) == n_tasks
    for _, cfg in per_task:
        exp = build(cap_data(cfg, 32))
        assert 9e6 < sum(p.numel() for p in exp.model.parameters()) < 1e7


def test_paper_task_settings():
    lr = expand(load_sweep(PAPER / "linear_regression.yaml"))
    assert sorted({c["task"]["d"] for _, c in lr}) == [10, 15, 20]
    assert all(c["task"]["n_prompt"] == 20 and c["task"]["n_query"] == 20 for _, c in lr)
    sg = expand(load_sweep(PAPER / "star_graph.yaml"))
    assert {(c["task"]["degree"], c["task"]["path_len"]) for _, c in sg} == {(3, 5), (3, 10), (5, 5), (5, 10)}
    assert all(c["task"]["num_nodes"] == 100 and c["task"]["n_train"] == 800_000 and c["task"]["n_eval"] == 80_000
               for _, c in sg)
    su = expand(load_sweep(PAPER / "sudoku.yaml"))
    assert all(c["task"]["size"] == 9 for _, c in su)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["linear_regression", "star_graph", "sudoku"])
def test_paper_presets_train_one_cpu_step(name):
    """One real training step of every distinct task config at paper width/depth (on the CPU)."""
    res = estimate(_one_run_per_task(PAPER / f"{name}.yaml"), cpu_steps=1, max_data=256)
    for r in res["runs"]:
        assert r["cpu_steps"] == 1 and math.isfinite(r["cpu_loss"]) and r["flops_per_step"] > 1e11
