"""Nothing lost, nothing run unasked (issue 12, items 2, 3, 6, 8, 9): errors and signals after
training started keep the run; one writer per run directory; run names are names; foreign,
finished and resume=False directories are left alone."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

import anyorder.experiment as experiment
from anyorder.cli import main
from anyorder.config import load_config
from anyorder.experiment import load_run, train
from anyorder.train import Trainer, save_checkpoint
from anyorder.train.lock import LOCK_FILE, RunLock, RunLockedError
from anyorder.train.guard import TrainingInterrupted
from test_trainer import BATCH, assert_same_params, cfg_for, eval_loss, make_loss_fn, make_model

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"
TINY = ["task.n_train=64", "task.n_eval=16", "model.d_model=16", "model.n_layers=1", "model.n_heads=2",
        "train.steps=4", "train.warmup_steps=1", "train.batch_size=4", "train.progress=false", "train.log_every=1",
        "train.checkpoint_every=0", "eval.n=8"]


def tiny(tmp_path, *over, name="t"):
    return load_config(str(ROOT / "configs" / "sudoku4.yaml"), TINY + [f"out_dir={tmp_path}", f"name={name}", *over])


def rows(run_dir) -> list:
    """(event, step) of every metrics.jsonl row: one train row per log step, one eval row per eval step."""
    return [(r["event"], r["step"]) for r in map(json.loads, (Path(run_dir) / "metrics.jsonl").read_text().splitlines())]


def untimed(d: dict) -> dict:
    return {k: v for k, v in d.items() if not any(t in k for t in ("per_s", "time"))}


def env() -> dict:
    return {**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


# ----------------------------------------------------------------------------- item 2: errors after training
def test_error_in_final_eval_keeps_the_run_and_a_rerun_only_redoes_the_eval(tmp_path, monkeypatch):
    ref = train(tiny(tmp_path, name="ref"))
    real = experiment.make_eval_fn

    def failing(exp):
        def eval_fn(model):
            raise ValueError("temperature must be >= 0")  # what a bad decoder did at the final eval
        return eval_fn

    monkeypatch.setattr(experiment, "make_eval_fn", failing)
    with pytest.raises(ValueError, match="temperature"):
        train(tiny(tmp_path))  # checkpoint_every=0: the final checkpoint was the only one
    run = tmp_path / "t"
    assert (run / "checkpoint" / "state.json").exists() and (run / "model.safetensors").exists()
    assert rows(run) == [("train", s) for s in (1, 2, 3, 4)]
    assert not (run / "summary.json").exists() and not (run / LOCK_FILE).exists()
    assert_same_params(load_run(run).model, load_run(ref).model)  # `anyorder eval` can load it

    monkeypatch.setattr(experiment, "make_eval_fn", real)
    train(tiny(tmp_path))  # the rerun: no training step, just the final evaluation
    info = json.loads((run / "run.json").read_text())
    assert info["resumes"][-1]["step"] == 4
    assert rows(run) == rows(ref)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["finished"] and untimed(summary["eval"]) == untimed(json.loads((ref / "summary.json").read_text())["eval"])
    assert summary["metrics"]["loss"] == json.loads((ref / "summary.json").read_text())["metrics"]["loss"]


def test_a_failed_run_with_metrics_is_never_deleted(tmp_path, monkeypatch):
    real = experiment.make_loss_fn

    def failing(exp):
        loss_fn = real(exp)

        def fn(model, step, micro, rank, world):
            if step == 2:
                raise RuntimeError("boom at step 2")
            return loss_fn(model, step, micro, rank, world)
        return fn

    monkeypatch.setattr(experiment, "make_loss_fn", failing)
    with pytest.raises(RuntimeError, match="boom"):
        train(tiny(tmp_path))
    assert rows(tmp_path / "t") == [("train", 1), ("train", 2)]  # no checkpoint, but metrics: kept
    assert not (tmp_path / "t" / LOCK_FILE).exists()

    def fails_at_once(exp):
        loss_fn = real(exp)

        def fn(model, step, micro, rank, world):
            fn.calls += 1
            if fn.calls == 2:  # call 1 counts the FLOPs; call 2 is the first training step
                raise RuntimeError("boom at step 0")
            return loss_fn(model, step, micro, rank, world)
        fn.calls = 0
        return fn

    monkeypatch.setattr(experiment, "make_loss_fn", fails_at_once)
    with pytest.raises(RuntimeError, match="boom at step 0"):
        train(tiny(tmp_path, name="u"))
    assert not (tmp_path / "u").exists()  # nothing trained, nothing logged: no half-made run left


# ----------------------------------------------------------------------------- item 6: signals
def test_sigterm_with_checkpoint_every_0_saves_and_resumes_bit_identically(tmp_path):
    cfg = cfg_for(checkpoint_every=0, eval_every=5)
    a = Trainer(make_model(), make_loss_fn(), cfg, tmp_path / "a", eval_fn=eval_loss)
    a.fit()

    def loss_fn(model, step, micro, rank, world):
        if step == 13:
            os.kill(os.getpid(), signal.SIGTERM)
        return make_loss_fn()(model, step, micro, rank, world)

    b = Trainer(make_model(), loss_fn, cfg, tmp_path / "b", eval_fn=eval_loss)
    with pytest.raises(TrainingInterrupted) as e:
        b.fit()
    assert e.value.exit_code == 143 and "checkpoint saved" in str(e.value)
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # restored
    assert json.loads((tmp_path / "b" / "checkpoint" / "state.json").read_text())["step"] == 13
    b2 = Trainer(make_model(), make_loss_fn(), cfg, tmp_path / "b", eval_fn=eval_loss)
    assert b2.fit()["resumed_from"] == 13
    assert_same_params(a.model, b2.model)
    assert rows(tmp_path / "b") == rows(tmp_path / "a")


@pytest.fixture
def default_sigint():
    """SIGINT at Python's default handler for the test: a suite started in the background
    (`nohup make test &`) inherits an ignored SIGINT, which the guard rightly leaves ignored."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


@pytest.mark.parametrize("at_step", [10, 20])  # a periodic evaluation, the final one
def test_sigint_during_an_evaluation_is_redone_on_resume(tmp_path, at_step, default_sigint):
    cfg = cfg_for(checkpoint_every=0, eval_every=5)
    a = Trainer(make_model(), make_loss_fn(), cfg, tmp_path / "a", eval_fn=eval_loss)
    sum_a = a.fit()

    def eval_fn(model):
        if eval_fn.trainer.step == at_step:
            os.kill(os.getpid(), signal.SIGINT)
        return eval_loss(model)

    b = Trainer(make_model(), make_loss_fn(), cfg, tmp_path / "b", eval_fn=eval_fn)
    eval_fn.trainer = b
    with pytest.raises(TrainingInterrupted) as e:
        b.fit()
    assert e.value.exit_code == 130
    state = json.loads((tmp_path / "b" / "checkpoint" / "state.json").read_text())
    assert state["step"] == at_step and state["extra"]["eval_pending"]
    assert not (tmp_path / "b" / "summary.json").exists()
    b2 = Trainer(make_model(), make_loss_fn(), cfg, tmp_path / "b", eval_fn=eval_loss)
    sum_b = b2.fit()
    assert_same_params(a.model, b2.model)
    assert rows(tmp_path / "b") == rows(tmp_path / "a")  # the cut-short evaluation redone, once
    assert sum_b["eval"] == sum_a["eval"] != {} and sum_b["best"] == sum_a["best"] and sum_b["finished"]
    # the finished run is left alone: no new rows, no new resume note, the same summary
    before = {f: (tmp_path / "b" / f).read_bytes() for f in ("summary.json", "run.json", "metrics.jsonl")}
    Trainer(make_model(), make_loss_fn(), cfg, tmp_path / "b", eval_fn=eval_loss).fit()
    assert before == {f: (tmp_path / "b" / f).read_bytes() for f in before}


def test_sigterm_inside_a_checkpoint_write_waits_for_it(tmp_path, monkeypatch):
    from anyorder.train import checkpoint as ckpt_mod
    cfg = cfg_for(checkpoint_every=5)
    a = Trainer(make_model(), make_loss_fn(), cfg, tmp_path / "a")
    a.fit()
    real = ckpt_mod.save_tensors

    def save_tensors(path, tensors):
        if path.name == "model.safetensors" and "step10" not in save_tensors.done and b.step == 10:
            save_tensors.done.add("step10")
            os.kill(os.getpid(), signal.SIGTERM)  # mid-write: deferred to the next safe point
        return real(path, tensors)
    save_tensors.done = set()
    monkeypatch.setattr(ckpt_mod, "save_tensors", save_tensors)
    b = Trainer(make_model(), make_loss_fn(), cfg, tmp_path / "b")
    with pytest.raises(TrainingInterrupted):
        b.fit()
    monkeypatch.setattr(ckpt_mod, "save_tensors", real)
    assert json.loads((tmp_path / "b" / "checkpoint" / "state.json").read_text())["step"] == 10
    b2 = Trainer(make_model(), make_loss_fn(), cfg, tmp_path / "b")
    assert b2.fit()["resumed_from"] == 10
    assert_same_params(a.model, b2.model)


def test_cli_sigterm_is_one_line_exit_143_and_resumes(tmp_path):
    cmd = [sys.executable, "-m", "anyorder.cli", "train", str(ROOT / "configs" / "sudoku4.yaml"), *TINY,
           "train.steps=8", f"out_dir={tmp_path}", "name=t"]
    proc = subprocess.Popen(cmd, env={**env(), "ANYORDER_FAULT": "micro:5:sleep=120"}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    metrics = tmp_path / "t" / "metrics.jsonl"
    deadline = time.time() + 120
    while not (metrics.exists() and ("train", 4) in rows(tmp_path / "t")):  # step 5 waits in its first micro-step
        assert proc.poll() is None and time.time() < deadline, proc.communicate()
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert err.startswith("anyorder: interrupted: SIGTERM at step 4: checkpoint saved")
    assert not (tmp_path / "t" / LOCK_FILE).exists()
    assert main(["train", str(ROOT / "configs" / "sudoku4.yaml"), *TINY, "train.steps=8", f"out_dir={tmp_path}",
                 "name=t"]) == 0
    assert json.loads((tmp_path / "t" / "run.json").read_text())["resumes"][-1]["step"] == 4
    assert rows(tmp_path / "t") == [("train", s) for s in range(1, 9)] + [("eval", 8)]


# ----------------------------------------------------------------------------- item 3: one writer
def _holder(run_dir: Path):
    """A separate live process holding run_dir's lock."""
    code = ("import sys, time; from anyorder.train.lock import RunLock; RunLock(sys.argv[1]).acquire(); "
            "print('locked', flush=True); time.sleep(120)")
    proc = subprocess.Popen([sys.executable, "-c", code, str(run_dir)], env=env(), stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_second_writer_is_refused_naming_the_pid_and_a_dead_owner_is_taken_over(tmp_path, capsys):
    cfg = tiny(tmp_path)
    run = tmp_path / "t"
    run.mkdir()
    (run / "config.yaml").write_text("")  # an unfinished run of someone
    proc = _holder(run)
    try:
        with pytest.raises(RunLockedError, match=f"in use by pid {proc.pid} on {socket.gethostname()}"):
            train(cfg)
        assert (run / "config.yaml").read_text() == ""  # nothing touched
        assert main(["train", str(ROOT / "configs" / "sudoku4.yaml"), *TINY, f"out_dir={tmp_path}", "name=t"]) == 2
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and f"pid {proc.pid}" in err
        with pytest.raises(RunLockedError):
            Trainer(make_model(), make_loss_fn(), cfg_for(steps=2, warmup_steps=1), run).fit()
    finally:
        proc.kill()
        proc.wait()
    assert (run / LOCK_FILE).exists()  # left behind by the killed owner: stale, taken over
    (run / "config.yaml").unlink()
    train(cfg)
    assert json.loads((run / "summary.json").read_text())["finished"] and not (run / LOCK_FILE).exists()


def test_lock_is_reentrant_and_released_on_errors(tmp_path):
    with RunLock(tmp_path):
        with RunLock(tmp_path):
            pass
        assert (tmp_path / LOCK_FILE).exists()
        assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == os.getpid()
    assert not (tmp_path / LOCK_FILE).exists()
    t = Trainer(make_model(), make_loss_fn(fail_at=3), cfg_for(steps=5), tmp_path / "r")
    with pytest.raises(RuntimeError, match="simulated crash"):
        t.fit()
    assert not (tmp_path / "r" / LOCK_FILE).exists()


def test_checkpoint_saves_leave_a_live_writers_temp_folder_alone(tmp_path):
    model = make_model()
    (tmp_path / "other").mkdir()
    proc = _holder(tmp_path / "other")  # any live process (its pid) will do
    try:
        host = socket.gethostname()
        live = tmp_path / f"ckpt.tmp-{proc.pid}@{host}-abc123"
        dead_pid = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                                  text=True).stdout.strip()
        dead = tmp_path / f"ckpt.tmp-{dead_pid}@{host}-abc123"
        other_host = tmp_path / "ckpt.tmp-1@elsewhere.example-abc123"
        for d in (live, dead, other_host):
            d.mkdir()
        save_checkpoint(tmp_path / "checkpoint", model, step=1)
        assert live.exists() and other_host.exists() and not dead.exists()
        assert not [p for p in tmp_path.glob(f"ckpt.*-{os.getpid()}@*")]  # its own temp folders: gone
    finally:
        proc.kill()
        proc.wait()


# ----------------------------------------------------------------------------- item 8: names
@pytest.mark.parametrize("name", ["../../x", "a/b", "", ".", "..", ".hidden", "a\\b"])
def test_run_names_are_single_path_components(tmp_path, name, capsys):
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=r"^name(=| must be a non-empty string)"):
        train(tiny(out, name=name))
    assert not out.exists()
    assert main(["train", str(ROOT / "configs" / "sudoku4.yaml"), *TINY, f"out_dir={out}", f"name={name}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("anyorder: error: name") and len(err.strip().splitlines()) == 1
    assert not out.exists() and list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------- item 9: foreign directories
def test_foreign_resume_false_and_finished_directories_are_left_intact(tmp_path, capsys):
    foreign = tmp_path / "t"
    foreign.mkdir()
    (foreign / "metrics.jsonl").write_text('{"mine": 1}\n')
    (foreign / "model.safetensors").write_bytes(b"not yours")
    with pytest.raises(ValueError, match="holds files .* but no config.yaml"):
        train(tiny(tmp_path))
    assert (foreign / "metrics.jsonl").read_text() == '{"mine": 1}\n'
    assert (foreign / "model.safetensors").read_bytes() == b"not yours"
    assert sorted(p.name for p in foreign.iterdir()) == ["metrics.jsonl", "model.safetensors"]

    run = train(tiny(tmp_path, name="r"))
    files = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    with pytest.raises(ValueError, match="resume=False never reuses"):
        train(tiny(tmp_path, name="r"), resume=False)
    capsys.readouterr()
    train(tiny(tmp_path, "decode=[{name: top_prob}]", name="r"))  # a finished run: nothing rewritten
    assert "is finished" in capsys.readouterr().out
    assert files == {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    assert json.loads(files["summary.json"])["eval"] != {}
