"""Tasks, configs, bad input and the CLI."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from anyorder.cli import main
from anyorder.config import load_config
from anyorder.experiment import build, load_run, train
from anyorder.tasks import build_task
from anyorder.studies.toy import all_pattern_batch, data_stats
from anyorder.tasks.toy import COUNTS, ToyTask

ROOT = Path(__file__).resolve().parents[1]


def tiny_cfg(tmp_path, **over):
    overrides = ["task.n_train=200", "task.n_eval=32", "model.d_model=32", "model.n_layers=1", "model.n_heads=2",
                 "train.steps=6", "train.warmup_steps=1", "train.batch_size=8", "train.progress=false",
                 "train.checkpoint_every=3", "eval.n=16", f"out_dir={tmp_path}", "name=t"]
    overrides += [f"{k}={v}" for k, v in over.items()]
    return load_config(str(ROOT / "configs" / "sudoku4.yaml"), overrides)


def test_toy_data_matches_the_seed():
    task = ToyTask()
    assert task.data.shape == (100, 5)
    assert len(set(task.data[:, 4].tolist())) == 100                  # E unique
    assert data_stats() == {"p_A": 0.55, "p_B": 0.69, "joint_AB": 0.34, "joint_A'B": 0.35}
    z, x, masked, w = all_pattern_batch(task.data, task.mask_id)
    assert z.shape == (100 * 31, 5) and abs(float(w.sum()) - 1.0) < 1e-6
    assert torch.equal(z == task.mask_id, masked)


def test_sudoku_task_layout():
    task = build_task({"name": "sudoku", "size": 4, "n_clues": 6, "n_train": 100, "n_eval": 20})
    x0, answer = task.train_batch(5, torch.Generator().manual_seed(0))
    assert x0.shape == (5, 33) and answer[0].sum() == 16 and (x0[:, 16] == task.sep_id).all()
    extra = task.extra()
    assert extra["row"].tolist()[:4] == [0, 0, 0, 0] and extra["row"][16] == 4 and extra["box"][17 + 5] == 0
    ev, ea = task.eval_set(20)
    train_set = {tuple(r) for r in task._x_train.tolist()}
    assert not any(tuple(r) in train_set for r in ev.tolist())          # disjoint
    m = task.metrics(ev, ev, ea)
    assert m == {"cell_acc": 1.0, "puzzle_acc": 1.0}
    bad = ev.clone()
    bad[:, 17:] = 1
    assert task.metrics(bad, ev, ea)["puzzle_acc"] == 0.0


def test_sudoku_parse_errors():
    task = build_task({"name": "sudoku", "size": 4, "n_clues": 6, "n_train": 10, "n_eval": 5})
    row = task.parse("1...\n..2.\n.3..\n...4")
    assert row.shape == (33,) and row[0] == 1 and (row[17:] == task.mask_id).all()
    with pytest.raises(ValueError, match="expected 16 cells"):
        task.parse("123")
    with pytest.raises(ValueError, match="'x'"):
        task.parse("x" * 16)
    with pytest.raises(ValueError, match="task.size must be 4 or 9"):
        build_task({"name": "sudoku", "size": 5})


def test_config_errors_name_valid_choices():
    with pytest.raises(ValueError, match="unknown config key 'modle'. Did you mean 'model'"):
        load_config(None, ["modle.d_model=3"])
    with pytest.raises(ValueError, match="Did you mean 'd_model'"):
        load_config(None, ["model.dmodel=3"])
    with pytest.raises(ValueError, match="not of the form key=value"):
        load_config(None, ["train.steps"])
    with pytest.raises(ValueError, match="unknown decoder 'marign'. Did you mean 'margin'"):
        build(load_config(None, ["decode=[marign]", "task.n_train=10", "task.n_eval=5"]))
    with pytest.raises(ValueError, match="order 'random' got unknown option.s. 'blok_size'. Did you mean 'block_size'"):
        build(load_config(None, ["order.blok_size=4", "task.n_train=10", "task.n_eval=5"]))
    with pytest.raises(ValueError, match="task 'sudoku' got unknown option.s. 'nclues'.*Valid options: .*n_clues"):
        build(load_config(None, ["task.nclues=4", "task.n_train=10", "task.n_eval=5"]))


def test_bad_config_leaves_no_run_dir(tmp_path):
    cfg = tiny_cfg(tmp_path, **{"order.name": "nope"})
    with pytest.raises(ValueError, match="unknown order"):
        train(cfg)
    assert not (tmp_path / "t").exists()
    cfg = tiny_cfg(tmp_path, **{"train.precision": "fp8"})
    with pytest.raises(ValueError, match="precision"):
        train(cfg)
    assert not (tmp_path / "t").exists()


def test_train_resume_and_incompatible_checkpoint(tmp_path):
    cfg = tiny_cfg(tmp_path)
    run = train(cfg)
    assert (run / "model.safetensors").exists() and (run / "checkpoint").exists()
    rows = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == 6
    exp = load_run(run)
    assert exp.model.cfg.d_model == 32
    # the same run dir with a different architecture is refused, and nothing is overwritten
    before = (run / "model.safetensors").read_bytes()
    with pytest.raises(ValueError, match="different config.*model.d_model: 32 -> 64"):
        train(tiny_cfg(tmp_path, **{"model.d_model": 64}))
    assert (run / "model.safetensors").read_bytes() == before
    # weights from an incompatible model: the error names the mismatching tensor and shapes
    from anyorder.train import load_weights
    other = build(tiny_cfg(tmp_path, **{"model.d_model": 64})).model
    with pytest.raises(ValueError, match="shape"):
        load_weights(other, run / "model.safetensors")


def test_cli_lists_and_errors(capsys):
    assert main(["orders", "--json"]) == 0
    orders = json.loads(capsys.readouterr().out)
    assert {"random", "ar", "block", "prefix_block", "jigsaw", "scatter"} <= set(orders)
    assert main(["decoders", "--json"]) == 0
    decs = json.loads(capsys.readouterr().out)
    assert {"random", "top_prob", "margin", "entropy", "left_to_right"} <= set(decs)
    assert main(["train", str(ROOT / "configs" / "sudoku4.yaml"), "order.name=blokc"]) == 2
    assert "Did you mean 'block'" in capsys.readouterr().err


def test_cli_eval_and_sample(tmp_path, capsys):
    run = train(tiny_cfg(tmp_path))
    capsys.readouterr()
    assert main(["eval", str(run), "--decoder", "margin", "--k", "2", "--n", "8", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert rows[0]["nfe"] == 8.0 and rows[0]["afp"] == 2.0
    assert main(["sample", str(run), "--puzzle", "1...\n..2.\n.3..\n...4", "--decoder", "top_prob"]) == 0
    out = capsys.readouterr().out.split()
    assert len(out) == 33 and out[0] == "1"
    assert main(["sample", str(run), "--puzzle", "12"]) == 2


def test_user_plugin_order_from_yaml(tmp_path, monkeypatch):
    """A user's order + decoder in a plugin file, used from a YAML config, end to end."""
    monkeypatch.chdir(ROOT)
    over = ["task.n_train=200", "task.n_eval=16", "model.d_model=32", "model.n_layers=1", "model.n_heads=2",
            "train.steps=3", "train.warmup_steps=1", "train.batch_size=4", "train.progress=false", "eval.n=8",
            f"out_dir={tmp_path}", "name=r2l"]
    cfg = load_config(str(ROOT / "configs" / "examples" / "right_to_left.yaml"), over)
    run = train(cfg)
    exp = load_run(run)
    from anyorder.experiment import evaluate
    res = evaluate(exp, {"name": "most_uncertain_last", "k": 3}, n=8)
    assert res["kendall_tau"] == -1.0 and res["afp"] == 1.0   # right to left, one token per step


def test_cli_train_under_torchrun_two_processes(tmp_path):
    """`torchrun ... -m anyorder.cli train` trains with DDP on 2 CPU processes and writes one run."""
    torchrun = Path(sys.executable).parent / "torchrun"
    over = ["task.n_train=200", "task.n_eval=16", "model.d_model=32", "model.n_layers=1", "model.n_heads=2",
            "train.steps=4", "train.warmup_steps=1", "train.batch_size=4", "train.progress=false", "eval.n=8",
            f"out_dir={tmp_path}", "name=ddp"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([str(torchrun), "--standalone", "--nproc_per_node=2", "-m", "anyorder.cli", "train",
                           str(ROOT / "configs" / "sudoku4.yaml"), *over], capture_output=True, text=True,
                          env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = tmp_path / "ddp"
    assert (run / "model.safetensors").exists()
    info = json.loads((run / "run.json").read_text())
    assert info["world_size"] == 2 and info["backend"] == "gloo"
    exp = load_run(run)
    assert exp.model.cfg.d_model == 32


def test_learned_order_under_torchrun_matches_single_process_accumulation(tmp_path):
    """LoMDM under DDP (2 CPU processes): the Trainer runs its loss inside a DDP-wrapped LossStep, so the gradients are
    all-reduced; the result equals one process accumulating the two ranks' batches."""
    import torch
    from safetensors.torch import load_file

    from anyorder.config import load_config
    from anyorder.experiment import build, make_loss_fn
    from anyorder.train import Trainer, TrainConfig

    torchrun = Path(sys.executable).parent / "torchrun"
    over = ["task.n_train=200", "task.n_eval=16", "model.d_model=32", "model.n_layers=1", "model.n_heads=2",
            "order.name=learned", "train.steps=3", "train.warmup_steps=1", "train.batch_size=4",
            "train.progress=false", "eval.n=8", f"out_dir={tmp_path}", "name=ddp_learned",
            # both sides in one precision: 'auto' probes in each process, and this machine's AMX bf16
            # sits near the margin (one CI run chose differently in the two)
            "train.precision=fp32"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([str(torchrun), "--standalone", "--nproc_per_node=2", "-m", "anyorder.cli", "train",
                           str(ROOT / "configs" / "sudoku4.yaml"), *over], capture_output=True, text=True,
                          env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ddp = load_file(str(tmp_path / "ddp_learned" / "model.safetensors"))

    cfg = load_config(str(ROOT / "configs" / "sudoku4.yaml"), over)
    exp = build(cfg)
    loss_fn = make_loss_fn(exp)
    # micro-batch m of the single process draws rank m's batch and masks
    as_ranks = lambda model, step, micro, rank, world: loss_fn(model, step, 0, micro, 2)  # noqa: E731
    tcfg = TrainConfig(seed=cfg["seed"], **{**{k: v for k, v in cfg["train"].items() if k != "flops_budget"},
                                            "grad_accum": 2})
    Trainer(exp.model, as_ranks, tcfg, tmp_path / "single").fit()
    single = exp.model.state_dict()
    assert set(ddp) == set(single) and any(k.startswith("g_phi.") for k in ddp)
    for k in ddp:
        torch.testing.assert_close(ddp[k], single[k], rtol=1e-4, atol=1e-5, msg=lambda m: f"{k}: {m}")
