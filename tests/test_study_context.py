"""Study report, linear regression: error against the number of in-context examples (Garg et al.)."""
from pathlib import Path

import pytest

from anyorder.studies.sweep_report import context_curve, load_runs, write_report
from anyorder.experiment import evaluate, load_run, train
from anyorder.sweep import expand, load_sweep

ROOT = Path(__file__).resolve().parents[1]
TINY = ["task.d=3", "task.n_prompt=5", "task.n_query=3", "task.n_eval=64", "model.d_model=16", "model.n_layers=1",
        "model.n_heads=2", "train.steps=3", "train.warmup_steps=1", "train.batch_size=8", "train.eval_every=3",
        "train.progress=false", "eval.n=32"]


@pytest.fixture(scope="module")
def sweep_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("ctx")
    spec = {"name": "linreg", "out_dir": str(out), "base": str(ROOT / "configs" / "linear_regression.yaml"),
            "overrides": TINY,
            "grid": {"order": [{"name": "ar"}, {"name": "jigsaw", "block_size": 2}], "seed": [0, 1]}}
    for _, cfg in expand(load_sweep(spec)):  # train in-process (run_sweep would reset torch's threads)
        cfg["train"]["progress"] = False
        train(cfg)
    return out / "linreg"


def test_context_curve_points_and_baselines(sweep_dir):
    exp = load_run(sweep_dir / "order=ar,seed=0")
    c = context_curve(exp, n=32)
    d, P = 3, 5
    assert c["k"] == list(range(P + 1)) and all(len(c[k]) == P + 1 for k in ("model", "lstsq", "ridge", "zero"))
    assert all(v < 1e-10 for v in c["lstsq"][d:])                    # noiseless, k >= d pairs: exact
    assert all(v > 0.1 for v in c["lstsq"][:d])                       # k < d: w is underdetermined
    assert c["lstsq"][0] == c["ridge"][0] == c["zero"][0]             # no examples: predict 0
    assert 0 < c["ridge"][P] < c["zero"][P]
    # k = P is the ordinary evaluation on the same prompts (same positions, same decoding)
    assert c["model"][P] == pytest.approx(evaluate(exp, None, n=32)["mse"], rel=1e-6)


def test_report_has_the_context_section_and_png(sweep_dir):
    report = write_report(sweep_dir, context_n=32).read_text()
    assert "## linear_regression: error against the number of in-context examples" in report
    assert "![error against in-context examples, d=3](context_curve_d3_P5_R3.png)" in report
    assert (sweep_dir / "context_curve_d3_P5_R3.png").stat().st_size > 1000
    table = report.split("### d = 3, P = 5, R = 3")[1]
    assert "| ar | 2 |" in table and "| jigsaw(block_size=2) | 2 |" in table and "| least squares |" in table
    assert "| k=0 | k=1 | k=3 | k=5 |" in table
    cached = sorted(p.name for p in (sweep_dir / "context_curves").iterdir())
    assert len(cached) == 4
    # a second report reads the cache (same numbers) instead of recomputing
    again = write_report(sweep_dir, context_n=32).read_text()
    assert again == report


def test_no_section_without_finished_regression_runs(sweep_dir, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(sweep_dir, copy)
    for w in copy.glob("*/summary.json"):  # a run is finished once its summary.json says so
        w.unlink()
    assert [r["finished"] for r in load_runs(copy)] == [False] * 4
    assert "in-context examples" not in write_report(copy).read_text()
