"""Sweeps: grid expansion, finished runs are never redone, a killed sweep resumes, submitit local mode."""
import json
import os
from pathlib import Path

import pytest

from anyorder.sweep import expand, load_sweep, run_sweep

ROOT = Path(__file__).resolve().parents[1]
TINY = ["task.n_train=100", "task.n_eval=16", "model.d_model=32", "model.n_layers=1", "model.n_heads=2",
        "train.steps=3", "train.warmup_steps=1", "train.batch_size=4", "train.progress=false",
        "train.checkpoint_every=1", "eval.n=8"]


def spec(tmp_path, **kw):
    s = {"name": "s", "out_dir": str(tmp_path), "base": str(ROOT / "configs" / "sudoku4.yaml"), "overrides": TINY,
         "grid": {"order": [{"name": "random"}, {"name": "ar"}], "seed": [0, 1]}}
    s.update(kw)
    return s


def test_grid_expansion_and_errors(tmp_path):
    runs = expand(load_sweep(spec(tmp_path)))
    assert [r[0] for r in runs] == ["order=random,seed=0", "order=random,seed=1", "order=ar,seed=0", "order=ar,seed=1"]
    assert runs[2][1]["order"] == {"name": "ar"} and runs[3][1]["seed"] == 1
    assert runs[0][1]["out_dir"] == str(tmp_path / "s")
    with pytest.raises(ValueError, match="unknown sweep key 'gird'. Did you mean 'grid'"):
        load_sweep({"gird": {}})
    with pytest.raises(ValueError, match="unknown launcher 'slurmm'"):
        load_sweep({"launcher": {"name": "slurmm"}})
    with pytest.raises(ValueError, match="unknown config key 'train.stesp'"):
        expand(load_sweep(spec(tmp_path, grid={"train.stesp": [1]})))


def test_finished_runs_are_not_redone_and_killed_runs_resume(tmp_path):
    s = spec(tmp_path, grid={"seed": [0, 1]})
    out = run_sweep(s, workers=1)
    assert [r["status"] for r in out] == ["trained", "trained"]
    done = tmp_path / "s" / "seed=0" / "model.safetensors"
    stamp = done.stat().st_mtime_ns
    # "kill" the second run after its checkpoint: drop the final weights and the summary.json that
    # marks it finished, keep the checkpoint
    (tmp_path / "s" / "seed=1" / "model.safetensors").unlink()
    (tmp_path / "s" / "seed=1" / "summary.json").unlink()
    out = run_sweep(s, workers=1)
    assert [r["status"] for r in out] == ["done (skipped)", "trained"]
    assert done.stat().st_mtime_ns == stamp
    info = json.loads((tmp_path / "s" / "seed=1" / "run.json").read_text())
    assert info["resumes"][-1]["step"] == 3          # resumed from its checkpoint, not retrained


def test_local_process_pool(tmp_path):
    out = run_sweep(spec(tmp_path, grid={"seed": [0, 1]}), workers=2)
    assert sorted(r["status"] for r in out) == ["trained", "trained"]
    assert all((Path(r["run"]) / "model.safetensors").exists() for r in out)


def test_submitit_local_mode(tmp_path):
    pytest.importorskip("submitit")
    out = run_sweep(spec(tmp_path, grid={"seed": [0]}, launcher={"name": "submitit", "cluster": "debug"}))
    assert out[0]["status"] == "trained"


def test_study_report_from_a_sweep(tmp_path):
    import math

    from anyorder.studies.sweep_report import summarise, load_runs, write_report

    over = TINY + ["train.eval_every=1"]
    s = spec(tmp_path, overrides=over, grid={"order": [{"name": "random"}, {"name": "ar"}], "seed": [0, 1]})
    run_sweep(s, workers=1)
    sweep_dir = tmp_path / "s"
    rows = summarise(load_runs(sweep_dir), {"sudoku": ("cell_acc", ">=", 0.0)})  # τ = 0: reached at eval 1
    by = {r["order"]: r for r in rows}
    assert by["ar"]["reached"] == "2/2" and by["random"]["seeds"] == 2
    def first_eval_flops(order):
        """Mean over seeds of the FLOPs logged at the first evaluation (after step 1). A random
        order's step costs what its masks score (the head runs on the scored rows only), so
        seeds differ: the report averages the seeds that reached τ."""
        out = []
        for seed in (0, 1):
            lines = (sweep_dir / f"order={order},seed={seed}" / "metrics.jsonl").read_text().splitlines()
            out.append(next(r["flops"] for r in map(json.loads, lines) if r.get("event") == "eval"))
        return sum(out) / len(out)

    ar_flops, rnd_flops = first_eval_flops("ar"), first_eval_flops("random")
    ar_step = json.loads((sweep_dir / "order=ar,seed=0" / "run.json").read_text())["flops_per_step"]
    assert by["ar"]["flops_to_threshold"] == ar_flops == ar_step   # AR's step always costs the same
    assert math.isclose(by["random"]["affinity_vs_ar"], math.log10(ar_flops / rnd_flops))
    assert by["ar"]["affinity_vs_ar"] == 0.0
    rows = summarise(load_runs(sweep_dir), {"sudoku": ("cell_acc", ">=", 2.0)})  # unreachable
    assert all(r["reached"] == "0/2" and math.isnan(r["flops_to_threshold"]) for r in rows)
    report = write_report(sweep_dir)
    assert (sweep_dir / "curves_sudoku.png").exists() and "affinity_vs_ar" in report.read_text()


def test_sweep_and_report_cli(tmp_path, capsys):
    import yaml

    from anyorder.cli import main

    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(spec(tmp_path, grid={"seed": [0]}, overrides=TINY + ["train.eval_every=1"])))
    assert main(["sweep", str(path), "--workers", "1"]) == 0
    assert "trained" in capsys.readouterr().out
    assert main(["sweep", str(path)]) == 0
    assert "done (skipped)" in capsys.readouterr().out
    assert main(["report", str(tmp_path / "s")]) == 0
    assert (tmp_path / "s" / "report.md").exists()
    assert main(["report", str(tmp_path / "s"), "--out", str(tmp_path / "docs")]) == 0
    assert (tmp_path / "docs" / "report.md").read_text() == (tmp_path / "s" / "report.md").read_text()
    assert (tmp_path / "docs" / "curves_sudoku.png").exists()
    assert main(["report", str(tmp_path / "nope")]) == 2


def test_committed_sweep_presets_expand():
    """Every sweep preset in configs/study expands to valid run configs (orders and keys checked)."""
    from anyorder.orders import build_order

    presets = sorted((ROOT / "configs" / "study").rglob("*.yaml"))
    assert presets
    for path in presets:
        runs = expand(load_sweep(path))
        # a study compares at least 2 orders, every order on the same seeds 0..S-1 (3 where a
        # CPU-hour budget allows it; the 9x9 Sudoku study trains one seed per order, and its _long
        # variant only its random-order run, longer)
        orders = {json.dumps(cfg["order"], sort_keys=True) for _, cfg in runs}
        seeds = sorted({cfg["seed"] for _, cfg in runs})
        assert (len(orders) >= 2 or path.stem == "sudoku9_long") and len(runs) % (len(seeds) * len(orders)) == 0, path
        assert seeds == list(range(len(seeds))) and (len(seeds) >= 3 or path.stem.startswith("sudoku9")), path
        for _, cfg in runs:
            build_order(cfg["order"])


def test_report_groups_by_task_size_and_reads_tau_from_the_task(tmp_path):
    """Runs of one task at several sizes are separate groups; task.tau_nmse overrides τ."""
    import yaml

    from anyorder.studies.sweep_report import load_runs, summarise

    def fake(name, d, order, seed, nmse):
        run = tmp_path / name
        run.mkdir()
        cfg = {"task": {"name": "linear_regression", "d": d, "tau_nmse": 0.05, "seed": 0},
               "order": {"name": order}, "seed": seed}
        (run / "config.yaml").write_text(yaml.safe_dump(cfg))
        (run / "metrics.jsonl").write_text(json.dumps({"event": "eval", "step": 1, "val_nmse": nmse, "flops": 10.0}))

    fake("a", 2, "ar", 0, 0.04)   # below 0.05 (but not below the paper's 0.01)
    fake("b", 2, "ar", 1, 0.06)
    fake("c", 4, "ar", 0, 0.5)
    rows = {(r["task"], r["order"]): r for r in summarise(load_runs(tmp_path))}
    assert set(rows) == {("linear_regression(d=2)", "ar"), ("linear_regression(d=4)", "ar")}
    assert rows[("linear_regression(d=2)", "ar")]["reached"] == "1/2"
    assert rows[("linear_regression(d=2)", "ar")]["threshold"] == "< 0.05"
    assert rows[("linear_regression(d=2)", "ar")]["per_seed"] == "0.04 / 0.06"
    assert rows[("linear_regression(d=4)", "ar")]["reached"] == "0/1"
