"""Counted training FLOPs agree with the analytic count for the backbone."""
import pytest
import torch

from anyorder.analysis.flops import analytic_step_flops, count_step_flops
from anyorder.model import ModelConfig, Transformer
from anyorder.objectives.nelbo import plan_loss
from anyorder.orders import build_order


@pytest.mark.parametrize("order_name,mlp", [("random", "swiglu"), ("block", "gelu"), ("ar", "swiglu")])
def test_counted_flops_match_analytic(order_name, mlp):
    cfg = ModelConfig(vocab_size=33, mask_id=32, d_model=64, n_layers=2, n_heads=4, mlp=mlp, max_len=64)
    model = Transformer(cfg)
    B, L = 4, 48
    x0 = torch.randint(0, 32, (B, L))
    answer = torch.ones(B, L, dtype=torch.bool)
    order = build_order(order_name)
    plan = order.train_plan(x0, order.layout(answer), 32, torch.Generator().manual_seed(0))
    counted = count_step_flops(model, lambda m: plan_loss(m, plan)[0])
    Lp = plan.tokens.shape[1]
    # attention is dense over L' keys; the last block's projection and MLP and the head run on
    # the scored rows only (objectives/rows.py; fp32: not padded)
    expected = analytic_step_flops(cfg, B, Lp, scored=int(plan.scored.sum()))
    assert abs(counted - expected) / expected < 0.05, (counted, expected)
    assert counted < 0.9 * analytic_step_flops(cfg, B, Lp)  # less than every row through everything
    assert all(p.grad is None for p in model.parameters())


def test_training_logs_cumulative_flops_with_every_evaluation(tmp_path):
    import json
    from pathlib import Path

    from anyorder.config import load_config
    from anyorder.experiment import train

    root = Path(__file__).resolve().parents[1]
    over = ["task.n_train=100", "task.n_eval=16", "model.d_model=32", "model.n_layers=1", "model.n_heads=2",
            "train.steps=4", "train.warmup_steps=1", "train.batch_size=4", "train.progress=false",
            "train.eval_every=2", "eval.n=8", f"out_dir={tmp_path}", "name=f"]
    run = train(load_config(str(root / "configs" / "sudoku4.yaml"), over))
    evals = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    evals = [e for e in evals if e.get("event") == "eval"]
    info = json.loads((run / "run.json").read_text())
    per_step = info["flops_per_step"]
    assert per_step > 0
    assert [e["flops"] for e in evals] == [2 * per_step, 4 * per_step]


def test_flops_budget_sets_the_step_count_from_the_counted_step(tmp_path):
    """train.flops_budget: equal-compute comparisons train floor(budget / FLOPs per step) steps."""
    import json
    from pathlib import Path

    from anyorder.config import load_config
    from anyorder.experiment import steps_for_budget, train

    root = Path(__file__).resolve().parents[1]
    over = ["task.n_train=100", "task.n_eval=16", "model.d_model=32", "model.n_layers=1", "model.n_heads=2",
            "train.steps=1000", "train.warmup_steps=1", "train.batch_size=4", "train.progress=false",
            "eval.n=8", f"out_dir={tmp_path}"]
    probe = train(load_config(str(root / "configs" / "sudoku4.yaml"), over + ["train.steps=1", "name=probe"]))
    per_step = json.loads((probe / "run.json").read_text())["flops_per_step"]
    run = train(load_config(str(root / "configs" / "sudoku4.yaml"),
                            over + [f"train.flops_budget={3.5 * per_step}", "name=budget"]))
    info = json.loads((run / "run.json").read_text())
    assert info["run_info"]["steps_from_flops_budget"] == 3
    summary = json.loads((run / "summary.json").read_text())
    assert summary["step"] == 3 and summary["metrics"]["flops"] == 3 * per_step
    with pytest.raises(ValueError, match="flops_budget must be a positive"):
        steps_for_budget(-1, per_step)
