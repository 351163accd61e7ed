"""A new order, decoder, objective and task are each one file plus a registration, outside the
package: the example plugins register one of each and a config trains and decodes with them."""
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def test_example_plugin_imports_alone_in_a_fresh_interpreter():
    for example in ("right_to_left.py", "reverse_task.py", "smoothed_objective.py"):
        r = subprocess.run([sys.executable, str(ROOT / "examples" / example)], capture_output=True, text=True,
                           cwd=ROOT)
        assert r.returncode == 0, r.stderr


def test_user_task_objective_order_and_decoder_train_and_decode(tmp_path, monkeypatch):
    from anyorder.config import load_config
    from anyorder.experiment import build, evaluate, load_run, train

    monkeypatch.chdir(ROOT)  # plugin paths in the config are relative to the repository
    over = ["train.steps=3", "train.warmup_steps=1", "train.batch_size=8", "train.progress=false",
            "model.d_model=32", "eval.n=16", f"out_dir={tmp_path}", "name=ext"]
    cfg = load_config("configs/examples/extending.yaml", over)
    exp = build(cfg)
    assert type(exp.task).__name__ == "ReverseTask" and exp.order.name == "right_to_left"
    assert exp.objective.describe() == {"name": "label_smoothed", "weighting": "elbo"}
    # ε = 0 is exactly the NELBO on the same batch; ε = 0.1 is finite and differs from it
    from anyorder.objectives import OBJECTIVES
    plain = OBJECTIVES.get("nelbo")(exp.task, exp.order)
    gen = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    with torch.no_grad():
        nelbo = float(plain.loss(exp.model, 4, gen(), 0)[0])
        smoothed = float(exp.objective.loss(exp.model, 4, gen(), 0)[0])
        exp.objective.epsilon = 0.0
        unsmoothed = float(exp.objective.loss(exp.model, 4, gen(), 0)[0])
        del exp.objective.epsilon
    assert unsmoothed == pytest.approx(nelbo, rel=1e-6)
    assert math.isfinite(smoothed) and smoothed != nelbo
    run = train(cfg)
    res = evaluate(load_run(run), {"name": "most_uncertain_last"}, n=16)
    assert res["kendall_tau"] == pytest.approx(-1.0)   # right to left, one token per step
    assert 0.0 <= res["seq_acc"] <= 1.0 and res["nfe"] == 6
    assert json.loads((run / "summary.json").read_text())["step"] == 3


def test_an_objective_the_config_names_must_exist(tmp_path):
    from anyorder.config import load_config
    from anyorder.experiment import build

    with pytest.raises(ValueError, match="unknown objective 'nelbp'. Did you mean 'nelbo'"):
        build(load_config(None, ["objective=nelbp", "task.n_train=10", "task.n_eval=5"]))
