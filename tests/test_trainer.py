"""Trainer, checkpoints, schedule, loggers and config validation on a tiny regression MLP."""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from anyorder.train import (
    CheckpointMismatchError,
    Trainer,
    TrainConfig,
    all_reduce_mean,
    find_checkpoint,
    load_checkpoint,
    load_weights,
    lr_multiplier,
    save_checkpoint,
    save_weights,
)
from anyorder.train import checkpoint as ckpt_mod

IN_DIM, BATCH = 8, 16
TARGET = torch.randn(IN_DIM, 1, generator=torch.Generator().manual_seed(7))


def make_model(init_seed: int = 0) -> nn.Module:
    # Dropout makes the global RNG part of the training state, so resume must restore it exactly.
    torch.manual_seed(init_seed)
    return nn.Sequential(nn.Linear(IN_DIM, 32), nn.Tanh(), nn.Dropout(0.1), nn.Linear(32, 1))


def batch(seed: int, step: int, micro: int, rank: int):
    s = int(np.random.SeedSequence([seed, step, micro, rank]).generate_state(1)[0])
    g = torch.Generator().manual_seed(s)
    x = torch.randn(BATCH, IN_DIM, generator=g)
    return x, x @ TARGET + 0.05 * torch.randn(BATCH, 1, generator=g)


def make_loss_fn(
    seed: int = 0, fail_at: int | None = None, exc: type[BaseException] = RuntimeError, fail_micro: int = 0
):
    def loss_fn(model, step, micro, rank, world_size):
        if fail_at is not None and (step, micro) == (fail_at, fail_micro):
            raise exc(f"simulated crash at step {step}")
        x, y = batch(seed, step, micro, rank)
        pred = model(x)
        return nn.functional.mse_loss(pred, y), {"tokens": BATCH, "mae": (pred - y).abs().mean()}

    return loss_fn


def eval_loss(model) -> dict:
    x, y = batch(12345, 0, 0, 0)
    return {"val_loss": nn.functional.mse_loss(model(x), y).item()}


def cfg_for(**kw) -> TrainConfig:
    base = dict(
        steps=20, batch_size=BATCH, lr=1e-2, warmup_steps=3, weight_decay=0.1, grad_clip=0.5,
        log_every=5, progress=False,
    )
    base.update(kw)
    return TrainConfig(**base)


def assert_same_params(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), f"{k} differs (max abs {(sa[k] - sb[k]).abs().max().item():.3g})"


# ----------------------------------------------------------------------------- (a) exact resume
@pytest.mark.parametrize("ema,grad_accum", [(0.0, 1), (0.9, 2)])
def test_resume_is_bit_identical(tmp_path, ema, grad_accum):
    cfg = cfg_for(ema=ema, grad_accum=grad_accum, checkpoint_every=5, eval_every=5)

    a = Trainer(make_model(), make_loss_fn(), cfg, tmp_path / "a", eval_fn=eval_loss)
    sum_a = a.fit()

    b = Trainer(make_model(), make_loss_fn(fail_at=12), cfg, tmp_path / "b", eval_fn=eval_loss)
    with pytest.raises(RuntimeError, match="simulated crash"):
        b.fit()
    state = json.loads((tmp_path / "b" / "checkpoint" / "state.json").read_text())
    assert state["step"] == 10
    assert state["tokens_seen"] == 10 * grad_accum * BATCH

    # A fresh process would build the model from scratch; a different init proves it is overwritten.
    b2 = Trainer(make_model(init_seed=99), make_loss_fn(), cfg, tmp_path / "b", eval_fn=eval_loss)
    sum_b = b2.fit()

    assert sum_b["resumed_from"] == 10 and sum_a["resumed_from"] is None
    assert sum_a["step"] == sum_b["step"] == 20
    assert sum_a["tokens_seen"] == sum_b["tokens_seen"] == 20 * grad_accum * BATCH
    assert_same_params(a.model, b2.model)
    if ema:
        assert_same_params(a.ema.module, b2.ema.module)
        assert not torch.equal(a.ema.module[0].weight, a.model[0].weight)
    assert sum_a["eval"] == sum_b["eval"]
    assert sum_a["best"] == sum_b["best"]
    # optimizer moments too
    for (ka, va), (kb, vb) in zip(a.optimizer.state.items(), b2.optimizer.state.items()):
        for name in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(va[name], vb[name])

    # the crashed run's step-11/12 log lines were dropped: one consistent history, same steps as A
    steps = lambda d: [(r["event"], r["step"]) for r in map(json.loads, (d / "metrics.jsonl").read_text().splitlines())]
    assert steps(tmp_path / "b") == steps(tmp_path / "a")
    run = json.loads((tmp_path / "b" / "run.json").read_text())
    assert run["resumes"][0]["step"] == 10


def test_keyboard_interrupt_saves_and_resumes_exactly(tmp_path):
    cfg = cfg_for(checkpoint_every=0, grad_accum=2)  # only at the end: the interrupt save is the only one
    a = Trainer(make_model(), make_loss_fn(), cfg, tmp_path / "a")
    a.fit()

    # Ctrl-C in the middle of step 13 (after its first micro-step drew dropout masks): the
    # checkpoint holds the state after step 12 completed, RNG included.
    b = Trainer(make_model(), make_loss_fn(fail_at=13, fail_micro=1, exc=KeyboardInterrupt), cfg, tmp_path / "b")
    with pytest.raises(KeyboardInterrupt):
        b.fit()
    state = json.loads((tmp_path / "b" / "checkpoint" / "state.json").read_text())
    assert state["step"] == 13 and state["tokens_seen"] == 13 * 2 * BATCH

    b2 = Trainer(make_model(), make_loss_fn(), cfg, tmp_path / "b")
    assert b2.fit()["resumed_from"] == 13
    assert_same_params(a.model, b2.model)


# ----------------------------------------------------------------------------- (b) lr schedule
def test_lr_schedule_values():
    total, warm, floor = 100, 10, 0.1
    assert lr_multiplier(0, total, warm, floor) == pytest.approx(1 / 11)
    assert lr_multiplier(4, total, warm, floor) == pytest.approx(5 / 11)
    assert lr_multiplier(warm, total, warm, floor) == 1.0  # peak right after warm-up
    assert lr_multiplier(total - 1, total, warm, floor) == pytest.approx(floor)  # last update at the floor
    assert lr_multiplier(total + 50, total, warm, floor) == pytest.approx(floor)
    mid = warm + (total - 1 - warm) / 2
    assert lr_multiplier(int(mid), total, warm, floor) == pytest.approx(
        floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * int(mid - warm) / (total - 1 - warm)))
    )
    values = [lr_multiplier(s, total, warm, floor) for s in range(total)]
    assert all(x < y for x, y in zip(values[:warm], values[1 : warm + 1]))  # warm-up increases
    assert all(x >= y for x, y in zip(values[warm:], values[warm + 1 :]))  # then never increases
    assert lr_multiplier(0, 10, 0, 0.0) == 1.0 and lr_multiplier(9, 10, 0, 0.0) == pytest.approx(0.0)


def test_trainer_uses_schedule(tmp_path):
    cfg = cfg_for(steps=20, warmup_steps=4, log_every=1, min_lr_ratio=0.2)
    Trainer(make_model(), make_loss_fn(), cfg, tmp_path).fit()
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    lrs = {r["step"]: r["lr"] for r in rows}  # logged after step s: the lr of update s - 1
    assert lrs[1] == pytest.approx(cfg.lr / 5)
    assert lrs[5] == pytest.approx(cfg.lr)
    assert lrs[20] == pytest.approx(cfg.lr * 0.2)


# ----------------------------------------------------------------------------- (c) it learns
def test_loss_decreases(tmp_path):
    cfg = cfg_for(steps=60, log_every=10, warmup_steps=5, lr=2e-2, ema=0.9)
    summary = Trainer(make_model(), make_loss_fn(), cfg, tmp_path, eval_fn=eval_loss).fit()
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train = [r["loss"] for r in rows if r["event"] == "train"]
    assert len(train) == 6
    assert train[-1] < 0.25 * train[0], train
    assert summary["eval"]["val_loss"] < 0.25 * eval_loss(make_model())["val_loss"]
    assert summary["tokens_seen"] == 60 * BATCH and summary["tokens_per_s"] > 0


def test_bf16_autocast_trains(tmp_path):
    cfg = cfg_for(steps=30, precision="bf16", lr=2e-2, log_every=10)
    trainer = Trainer(make_model(), make_loss_fn(), cfg, tmp_path)
    summary = trainer.fit()
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert math.isfinite(summary["metrics"]["loss"])
    assert rows[-1]["loss"] < rows[0]["loss"]
    assert all(p.dtype == torch.float32 for p in trainer.model.parameters())  # autocast: params stay fp32


# ----------------------------------------------------------------------------- (d) checkpoint files
EXPECTED_FILES = {
    "model.safetensors", "ema.safetensors", "optimizer.safetensors", "optimizer.json", "rng.safetensors", "state.json",
}


def test_checkpoint_layout_and_atomicity(tmp_path, monkeypatch):
    cfg = cfg_for(steps=6, ema=0.5, checkpoint_every=3)
    t = Trainer(make_model(), make_loss_fn(), cfg, tmp_path, flops_per_step=1e6, run_info={"name": "unit"})
    t.fit()
    ck = tmp_path / "checkpoint"
    assert {p.name for p in ck.iterdir()} == EXPECTED_FILES
    assert not list(tmp_path.glob("ckpt.tmp-*")) and not list(tmp_path.glob("ckpt.old-*"))

    state = json.loads((ck / "state.json").read_text())
    assert state["step"] == 6 and state["flops"] == 6e6 and state["config_hash"] == cfg.hash()
    assert set(state["versions"]) == {"python", "torch", "numpy"}
    from safetensors.torch import load_file

    opt = load_file(str(ck / "optimizer.safetensors"))
    n_params = len(list(t.model.parameters()))
    assert set(opt) == {f"state.{i}.{k}" for i in range(n_params) for k in ("exp_avg", "exp_avg_sq", "step")}
    groups = json.loads((ck / "optimizer.json").read_text())["param_groups"]
    assert [g["weight_decay"] for g in groups] == [0.1, 0.0]  # decay only on matrices
    assert load_file(str(ck / "rng.safetensors"))["rank0.torch_cpu"].dtype == torch.uint8

    # A crash while writing leaves the previous checkpoint untouched and no temp dir behind.
    before = {p.name: p.read_bytes() for p in ck.iterdir()}
    real = ckpt_mod.write_json

    def boom(path, obj):
        if Path(path).name == "state.json":
            raise OSError("disk full (simulated)")
        real(path, obj)

    monkeypatch.setattr(ckpt_mod, "write_json", boom)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(ck, t.model, t.optimizer, t.ema, step=999)
    assert {p.name: p.read_bytes() for p in ck.iterdir()} == before
    assert not list(tmp_path.glob("ckpt.tmp-*"))
    monkeypatch.undo()

    # The one crash window of the swap (old moved aside, new not yet in) is repaired on resume.
    os.replace(ck, tmp_path / "ckpt.old-abcd")
    assert find_checkpoint(tmp_path) == ck and (ck / "state.json").exists()

    # Round trip through load_checkpoint into fresh objects.
    t2 = Trainer(make_model(5), make_loss_fn(), cfg, tmp_path / "other")
    st = load_checkpoint(ck, t2.model, t2.optimizer, t2.ema)
    assert st["step"] == 6
    assert_same_params(t.model, t2.model)
    assert_same_params(t.ema.module, t2.ema.module)


def test_tied_weights_round_trip(tmp_path):
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(10, 4)
            self.out = nn.Linear(4, 10, bias=False)
            self.out.weight = self.emb.weight  # tied: two state_dict keys, one storage

    m = Tied()
    save_weights(m, tmp_path / "w.safetensors")
    m2 = Tied()
    load_weights(m2, tmp_path / "w.safetensors")
    assert torch.equal(m2.emb.weight, m.emb.weight) and m2.out.weight is m2.emb.weight


# ----------------------------------------------------------------------------- (e) mismatch errors
def test_load_weights_shape_mismatch(tmp_path):
    save_weights(make_model(), tmp_path / "w.safetensors")
    wider = nn.Sequential(nn.Linear(IN_DIM, 64), nn.Tanh(), nn.Dropout(0.1), nn.Linear(64, 1))
    with pytest.raises(ValueError) as err:
        load_weights(wider, tmp_path / "w.safetensors")
    msg = str(err.value)
    assert isinstance(err.value, CheckpointMismatchError)
    assert "0.weight" in msg and "[32, 8]" in msg and "[64, 8]" in msg
    assert "3.weight" in msg and "[1, 32]" in msg and "[1, 64]" in msg
    assert "incompatible config" in msg

    no_dropout = nn.Sequential(nn.Linear(IN_DIM, 32), nn.Tanh(), nn.Linear(32, 1))  # keys 0.*, 2.*
    with pytest.raises(
        ValueError, match=r"missing from the checkpoint: 2\.weight, 2\.bias; unexpected in the checkpoint .*3\.weight"
    ):
        load_weights(no_dropout, tmp_path / "w.safetensors")


def test_resume_into_incompatible_model_fails(tmp_path):
    Trainer(make_model(), make_loss_fn(), cfg_for(steps=2, warmup_steps=0), tmp_path).fit()
    wider = nn.Sequential(nn.Linear(IN_DIM, 64), nn.Tanh(), nn.Dropout(0.1), nn.Linear(64, 1))
    t = Trainer(wider, make_loss_fn(), cfg_for(steps=4), tmp_path)
    with pytest.raises(CheckpointMismatchError, match=r"0\.weight: checkpoint \[32, 8\] vs model \[64, 8\]"):
        t.fit()


# ----------------------------------------------------------------------------- (f) metrics / run.json
def test_metrics_jsonl_and_run_json(tmp_path):
    cfg = cfg_for(steps=12, log_every=5, eval_every=6, progress=True)  # also exercises the tqdm bar
    Trainer(make_model(), make_loss_fn(), cfg, tmp_path, eval_fn=eval_loss, run_info={"task": "regression"}).fit()
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if r["event"] == "train"]
    evals = [r for r in rows if r["event"] == "eval"]
    assert [r["step"] for r in train] == [5, 10, 12]  # every log_every, plus the final step
    assert [r["step"] for r in evals] == [6, 12]
    for r in train:
        assert {"step", "time", "loss", "lr", "grad_norm", "tokens_per_s", "step_time", "mae"} <= set(r)
        assert math.isfinite(r["loss"]) and r["tokens_per_s"] > 0
    assert all(math.isfinite(r["val_loss"]) for r in evals)

    run = json.loads((tmp_path / "run.json").read_text())
    precision = run["run_info"].pop("precision")  # what precision "auto" chose, and why
    assert run["run_info"] == {"task": "regression"} and precision["requested"] == "auto"
    assert precision["chosen"] in ("fp32", "bf16") and precision["reason"]
    assert run["config"]["steps"] == 12 and run["seed"] == 0
    assert {"python", "torch", "numpy"} <= set(run["versions"])
    assert {"hostname", "cpu_count", "cuda_device", "start_time"} <= set(run)


def test_optional_logger_missing_package_is_clear(tmp_path):
    import importlib.util

    if importlib.util.find_spec("tensorboard") is not None:
        pytest.skip("tensorboard is installed")
    with pytest.raises(ImportError, match="pip install tensorboard"):
        Trainer(make_model(), make_loss_fn(), cfg_for(tensorboard=True), tmp_path)


def test_all_reduce_mean_single_process():
    assert all_reduce_mean(3) == 3.0
    assert torch.equal(all_reduce_mean(torch.tensor([1, 2])), torch.tensor([1.0, 2.0], dtype=torch.float64))


# ----------------------------------------------------------------------------- (g) config validation
@pytest.mark.parametrize(
    "kw,pattern",
    [
        ({"steps": 0}, r"TrainConfig\.steps must be an integer >= 1, got 0"),
        ({"batch_size": -2}, r"batch_size must be an integer >= 1"),
        ({"grad_accum": 0}, r"grad_accum must be an integer >= 1"),
        ({"lr": 0.0}, r"TrainConfig\.lr must be a number > 0, got 0\.0"),
        ({"weight_decay": -1}, r"weight_decay must be a number >= 0"),
        ({"betas": (0.9, 1.0)}, r"betas must be a pair \(beta1, beta2\) with each in \[0, 1\)"),
        ({"warmup_steps": 30}, r"warmup_steps must be in \[0, steps=20\], got 30"),
        ({"min_lr_ratio": 1.5}, r"min_lr_ratio must be a number in \[0, 1\]"),
        ({"grad_clip": -0.1}, r"grad_clip must be a number >= 0 \(0 = off\)"),
        ({"ema": 1.0}, r"ema must be a number in \[0, 1\) \(0 = off\)"),
        ({"precision": "fp16"}, r"precision must be one of 'auto', 'fp32', 'bf16', got 'fp16'"),
        ({"nonfinite": "ignore"}, r"TrainConfig\.nonfinite must be one of 'error', 'skip', got 'ignore'"),
        ({"log_every": -1}, r"log_every must be an integer >= 0"),
        ({"tensorboard": "yes"}, r"tensorboard must be true or false"),
        ({"lr": "fast"}, r"lr must be a number"),
        ({"steps": True}, r"steps must be an integer"),
    ],
)
def test_config_validation(kw, pattern):
    base = dict(steps=20, batch_size=4, warmup_steps=0)  # the default warm-up (50) exceeds 20 steps
    base.update(kw)
    with pytest.raises(ValueError, match=pattern):
        TrainConfig(**base)


def test_config_defaults_are_the_experiment_config_defaults():
    from anyorder.config import DEFAULTS, load_config
    from anyorder.experiment import train_config

    tcfg, flops_budget = train_config(load_config())
    assert tcfg == TrainConfig() and flops_budget is None
    assert list(DEFAULTS["train"]) == [  # the order configs are dumped to YAML in
        "steps", "batch_size", "grad_accum", "lr", "weight_decay", "betas", "warmup_steps", "min_lr_ratio",
        "grad_clip", "ema", "precision", "eval_every", "checkpoint_every", "log_every", "tensorboard", "wandb",
        "wandb_project", "progress", "nonfinite", "strategy", "gradient_checkpointing", "flops_budget",
    ]
    assert DEFAULTS["train"]["betas"] == [0.9, 0.95]  # a list: YAML has no tuples


def test_config_normalises_yaml_values():
    cfg = TrainConfig(steps=1e3, batch_size=4, lr="3e-4", betas=[0.9, 0.99])
    assert cfg.steps == 1000 and cfg.lr == 3e-4 and cfg.betas == (0.9, 0.99)
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg
    assert cfg.hash() == TrainConfig(steps=1000, batch_size=4, lr=3e-4, betas=(0.9, 0.99), log_every=1).hash()
    with pytest.raises(ValueError, match="Did you mean 'steps'"):
        TrainConfig.from_dict({"step": 10, "batch_size": 4})
