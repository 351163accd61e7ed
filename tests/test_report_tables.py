"""The study report's two final tables: the task's detail metrics (mean ± std over seeds of the last
evaluation) and every finished run decoded by each of its decoders (equal to `anyorder eval`, cached)."""
import json
import math

import pytest

from anyorder.experiment import evaluate, load_run
from anyorder.studies import final_tables
from anyorder.studies.sweep_report import load_runs, write_report
from anyorder.sweep import run_sweep

from test_sweep import TINY, spec

DECODERS = [{"name": "margin"}, {"name": "top_prob", "k": 2}]


@pytest.fixture(scope="module")
def sweep_dir(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("report_tables")
    over = TINY + ["train.eval_every=1", "decode=" + json.dumps(DECODERS)]
    run_sweep(spec(tmp, overrides=over, grid={"order": [{"name": "random"}, {"name": "ar"}], "seed": [0, 1]}), workers=1)
    return tmp / "s"


def test_detail_rows_are_the_last_evaluation_over_seeds(sweep_dir):
    runs = load_runs(sweep_dir)
    rows = final_tables.detail_rows(runs, lambda cfg: (r"(cell|puzzle)_acc(_\w+)?",))
    assert [r["order"] for r in rows] == ["ar", "random"]
    for row in rows:
        finals = [r["evals"][-1]["val_cell_acc"] for r in runs if r["cfg"]["order"]["name"] == row["order"]]
        mean = sum(finals) / 2
        std = math.sqrt(sum((f - mean) ** 2 for f in finals) / 2)
        assert row["cell_acc"] == f"{mean:.3f} ± {std:.3f}" and row["seeds"] == 2 and row["step"] == "3 / 3"
    assert final_tables.detail_rows(runs, lambda cfg: ()) == []  # a task without detail metrics: no table


def test_decode_rows_equal_anyorder_eval_and_are_cached(sweep_dir, monkeypatch):
    runs = [r for r in load_runs(sweep_dir) if r["cfg"]["seed"] == 0]
    rows = [row for r in runs for row in final_tables.decode_run(r, 8)]
    assert [(r["order"], r["decoder"]) for r in rows] == [
        ("ar", "margin"), ("ar", "top_prob(k=2)"), ("random", "margin"), ("random", "top_prob(k=2)")]
    exp = load_run(sweep_dir / "order=random,seed=0")
    direct = evaluate(exp, DECODERS[1], n=8)
    got = rows[3]
    timing = {"tokens_per_s", "seconds"}  # measured, not decoded: everything else must be equal
    assert {k: got[k] for k in direct if k not in timing} == {k: v for k, v in direct.items() if k not in timing}
    assert set(direct) <= set(got)
    assert got["train_steps"] == 3 and got["train_flops"] == runs[1]["evals"][-1]["flops"] and got["n"] == 8

    def no_decoding(*a, **k):
        raise AssertionError("decoded again although decode_eval.json holds the result")
    monkeypatch.setattr(final_tables, "evaluate", no_decoding)
    assert [row for r in runs for row in final_tables.decode_run(r, 8)] == rows
    with pytest.raises(AssertionError, match="decoded again"):  # another n is another result
        final_tables.decode_run(runs[0], 4)


def test_report_cli_with_decode(sweep_dir, capsys):
    from anyorder.cli import main

    assert main(["report", str(sweep_dir), "--decode", "8"]) == 0
    text = (sweep_dir / "report.md").read_text()
    assert "## Decoders on held-out examples" in text and "top_prob(k=2)" in text
    assert "## Final evaluation, task detail metrics" in text
    assert main(["report", str(sweep_dir), "--decode", "-1"]) == 2
    assert "--decode must be a number of examples >= 0, got -1" in capsys.readouterr().err


def test_training_seconds_leave_out_the_time_a_run_lay_stopped():
    from anyorder.rundir import training_seconds

    # one process logged until 100 s, was killed; its resume logged from 0 again, until 30 s,
    # an hour of wall clock later (``time``): 130 s of training, not 3730
    lines = [{"time": 1000.0, "elapsed": 50.0}, {"time": 1050.0, "elapsed": 100.0},
             {"time": 4600.0, "elapsed": 0.5}, {"time": 4630.0, "elapsed": 30.0}]
    assert training_seconds(lines, start=950.0) == 130.0
    assert training_seconds([{"time": 1050.0}], start=950.0) == 100.0  # logs without elapsed
    assert math.isnan(training_seconds([], start=None))
