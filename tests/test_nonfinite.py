"""A NaN/inf loss or gradient: stop at that step (nothing non-finite applied or saved, the run not
finished), or with train.nonfinite=skip drop exactly that step's update and go on."""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch

from anyorder.cli import main
from anyorder.train import NonFiniteError, Trainer, load_checkpoint
from anyorder.train.nonfinite import MAX_CONSECUTIVE_SKIPS

from test_trainer import assert_same_params, cfg_for, eval_loss, make_loss_fn, make_model

ROOT = Path(__file__).resolve().parents[1]


def poisoned(at, value=float("nan"), micro=0, **kw):
    """make_loss_fn's loss, times ``value`` at the (step, micro) pairs in ``at`` (after the forward
    pass, so the RNG is drawn exactly as on a clean step)."""
    clean = make_loss_fn(**kw)
    at = at if callable(at) else (lambda s, m, at=at: (s, m) == (at, micro))

    def loss_fn(model, step, micro, rank, world_size):
        loss, metrics = clean(model, step, micro, rank, world_size)
        return (loss * value if at(step, micro) else loss), metrics

    return loss_fn


def rows(run_dir):
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def all_finite(model):
    return all(torch.isfinite(t).all() for t in model.state_dict().values())


@pytest.mark.parametrize("value,shown", [(float("nan"), "nan"), (float("inf"), "inf"), (-float("inf"), "-inf")])
def test_nonfinite_loss_stops_at_its_step_and_keeps_the_last_checkpoint(tmp_path, value, shown):
    cfg = cfg_for(checkpoint_every=5, eval_every=5)
    clean = Trainer(make_model(), make_loss_fn(fail_at=7), cfg, tmp_path / "clean", eval_fn=eval_loss)
    with pytest.raises(RuntimeError, match="simulated crash"):
        clean.fit()

    t = Trainer(make_model(), poisoned(7, value), cfg, tmp_path / "run", eval_fn=eval_loss)
    with pytest.raises(NonFiniteError, match=rf"^non-finite loss {shown}(, gradient norm \S+)? at step 8/20; its update was not applied "
                                             r"and the run is not finished \(last checkpoint: step 5 in .*checkpoint\)") as e:
        t.fit()
    assert "\n" not in str(e.value) and t.step == 7 and all_finite(t.model)  # update 7 (0-based) not applied
    state = json.loads((tmp_path / "run" / "checkpoint" / "state.json").read_text())
    assert state["step"] == 5
    fresh = make_model(init_seed=99)
    load_checkpoint(tmp_path / "run" / "checkpoint", fresh)
    assert_same_params(fresh, _ckpt_model(tmp_path / "clean"))  # the step-5 state of a clean run
    assert [r["step"] for r in rows(tmp_path / "run")] == [5, 5]  # no row for the failed step (log_every=5)
    assert not (tmp_path / "run" / "model.safetensors").exists()


def _ckpt_model(run_dir):
    m = make_model(init_seed=5)
    load_checkpoint(Path(run_dir) / "checkpoint", m)
    return m


def test_nonfinite_loss_in_a_later_micro_step_is_named(tmp_path):
    t = Trainer(make_model(), poisoned(3, micro=1), cfg_for(grad_accum=2), tmp_path / "run")
    with pytest.raises(NonFiniteError, match=r"non-finite loss nan \(micro-step 1 of 2\), gradient norm nan at step 4/20"
                                             r".*no checkpoint written yet"):
        t.fit()
    assert t.step == 3 and not (tmp_path / "run" / "checkpoint").exists()


@pytest.mark.parametrize("grad_clip", [0.5, 0.0])  # the norm from clipping, or computed when clipping is off
def test_nonfinite_gradient_with_a_finite_loss_is_caught(tmp_path, grad_clip):
    model = make_model()
    state = {"step": None}

    def loss_fn(m, step, micro, rank, world):
        state["step"] = step
        return make_loss_fn()(m, step, micro, rank, world)

    model[0].weight.register_hook(lambda g: g * float("nan") if state["step"] == 4 else g)
    t = Trainer(model, loss_fn, cfg_for(grad_clip=grad_clip), tmp_path / "run")
    with pytest.raises(NonFiniteError, match=r"^non-finite gradient norm nan at step 5/20"):
        t.fit()
    assert t.step == 4 and all_finite(t.model)


def test_skip_drops_exactly_that_update_and_resumes_the_same(tmp_path):
    """What is provable: the skipped step leaves parameters, AdamW moments and EMA bit-identical to
    the state before it (only the step counter, hence the lr schedule, and the RNG move on); the
    loss/metrics of that step are not logged; and stopping there (default mode) then resuming with
    nonfinite=skip is bit-identical to skipping in one go (no config-change warning)."""
    k = 7
    cfg = cfg_for(ema=0.9, nonfinite="skip", checkpoint_every=5, eval_every=5)
    snaps = {}
    holder = {}

    def spy(model, step, micro, rank, world):
        if step in (k, k + 1) and micro == 0:  # the state before update k and right after (skipped) update k
            t = holder["t"]
            snaps[step] = ({n: v.clone() for n, v in model.state_dict().items()},
                           {n: v.clone() for n, v in t.ema.module.state_dict().items()},
                           [{n: v.clone() for n, v in s.items()} for s in t.optimizer.state.values()])
        return poisoned(k)(model, step, micro, rank, world)

    a = Trainer(make_model(), spy, cfg, tmp_path / "a", eval_fn=eval_loss)
    holder["t"] = a
    out = a.fit()
    assert out["step"] == 20 and all_finite(a.model) and all_finite(a.ema.module)
    before, after = snaps[k], snaps[k + 1]
    for x, y in zip(before[:2], after[:2]):
        assert x.keys() == y.keys() and all(torch.equal(x[n], y[n]) for n in x)
    assert all(torch.equal(sa[n], sb[n]) for sa, sb in zip(before[2], after[2]) for n in sa)  # moments, step count
    logged = rows(tmp_path / "a")
    train_rows = [r for r in logged if r["event"] == "train"]
    assert [r["nonfinite_skipped"] for r in train_rows] == [0, 1, 1, 1]
    assert all(r["loss"] == r["loss"] for r in train_rows)  # the NaN step is not in any window's mean
    assert out["metrics"]["nonfinite_skipped"] == 1

    # the default mode stops at step k+1 (checkpoint at 5); resuming with skip continues the same trajectory
    b = Trainer(make_model(), poisoned(k), cfg_for(ema=0.9, checkpoint_every=5, eval_every=5), tmp_path / "b",
                eval_fn=eval_loss)
    with pytest.raises(NonFiniteError, match=f"at step {k + 1}/20"):
        b.fit()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "resuming with a different config" warning
        b2 = Trainer(make_model(init_seed=3), poisoned(k), cfg, tmp_path / "b", eval_fn=eval_loss)
        b2.fit()
    assert_same_params(a.model, b2.model)
    assert_same_params(a.ema.module, b2.ema.module)
    # the same history: steps 1-5 logged in "error" mode (no counter column), the rest after the resume
    keep = lambda r: {k_: v for k_, v in r.items() if k_ not in ("time", "elapsed", "step_time", "tokens_per_s")
                      and not (r["step"] <= 5 and k_ == "nonfinite_skipped")}
    assert [keep(r) for r in rows(tmp_path / "b")] == [keep(r) for r in logged]


def test_skip_counter_is_checkpointed(tmp_path):
    cfg = cfg_for(nonfinite="skip", checkpoint_every=5)
    t = Trainer(make_model(), poisoned(lambda s, m: s in (2, 3)), cfg, tmp_path / "run")
    t.fit()
    state = json.loads((tmp_path / "run" / "checkpoint" / "state.json").read_text())
    assert state["extra"]["nonfinite"] == {"skipped": 2, "streak": 0}


def test_skip_gives_up_after_too_many_in_a_row(tmp_path):
    cfg = cfg_for(nonfinite="skip", steps=30)
    t = Trainer(make_model(), poisoned(lambda s, m: s >= 3), cfg, tmp_path / "run")
    with pytest.raises(NonFiniteError, match=rf"{MAX_CONSECUTIVE_SKIPS + 1} steps in a row skipped \(the last: "
                                             rf"non-finite loss nan, gradient norm nan\) at step {3 + MAX_CONSECUTIVE_SKIPS + 1}/30"):
        t.fit()


def test_no_checkpoint_of_nonfinite_parameters(tmp_path):
    t = Trainer(make_model(), make_loss_fn(), cfg_for(), tmp_path / "run")
    with torch.no_grad():
        t.model[0].weight[0, 0] = float("inf")
    with pytest.raises(NonFiniteError, match="non-finite parameters after step 0/20: not writing a checkpoint"):
        t.save()
    assert not (tmp_path / "run" / "checkpoint").exists()


def test_a_diverging_regression_run_fails_and_is_not_finished(tmp_path, capsys):
    """The issue's probe: linear regression at lr=1e4 diverged to an all-NaN model and exited 0."""
    args = ["train", str(ROOT / "configs" / "linear_regression.yaml"), f"out_dir={tmp_path}", "name=r",
            "train.steps=30", "train.lr=1e4", "train.grad_clip=0", "train.warmup_steps=0", "train.log_every=1",
            "train.checkpoint_every=2", "train.progress=false", "train.batch_size=8", "eval.n=16",
            "task={name: linear_regression, d: 2, n_prompt: 3, n_query: 3, n_eval: 16}",
            "model={d_model: 16, n_layers: 1, n_heads: 2}"]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "non-finite" in err[0] and "run is not finished" in err[0], err
    run = tmp_path / "r"
    assert not (run / "model.safetensors").exists() and not (run / "summary.json").exists()
    from anyorder.experiment import build
    import yaml
    exp = build(yaml.safe_load((run / "config.yaml").read_text()))
    load_checkpoint(run / "checkpoint", exp.model)  # the last checkpoint: finite and loadable
    assert all_finite(exp.model)
    assert all(r["loss"] == r["loss"] for r in rows(run) if r["event"] == "train")  # no NaN row logged
