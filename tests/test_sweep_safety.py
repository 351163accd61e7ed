"""Sweeps compare each run on disk with its grid point (refuse, or rerun with force), validate
every point before the first run, and their local workers die with the sweep process."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from anyorder.cli import main
from anyorder.studies.sweep_report import load_runs
from anyorder.sweep import run_sweep

ROOT = Path(__file__).resolve().parents[1]
TINY = ["task.n_train=60", "task.n_eval=8", "model.d_model=16", "model.n_layers=1", "model.n_heads=2",
        "train.steps=2", "train.warmup_steps=0", "train.batch_size=4", "train.progress=false", "eval.n=4"]


def spec(tmp_path, overrides=(), **kw):
    s = {"name": "s", "out_dir": str(tmp_path), "base": str(ROOT / "configs" / "sudoku4.yaml"),
         "overrides": TINY + list(overrides), "grid": {"seed": [0]}}
    s.update(kw)
    return s


def statuses(out):
    return [r["status"] for r in out]


def on_disk(tmp_path):
    return json.loads((tmp_path / "s" / "sweep.json").read_text())["on_disk"]


@pytest.mark.filterwarnings("ignore:resuming from")
def test_a_changed_grid_point_is_refused_or_rerun_with_force(tmp_path, capsys):
    run = tmp_path / "s" / "seed=0"
    assert statuses(run_sweep(spec(tmp_path), workers=1)) == ["trained"]
    weights = (run / "model.safetensors").read_bytes()
    # a training difference: refused, one line naming the run and the key, nothing touched
    with pytest.raises(ValueError, match=r"seed=0: model\.d_model: 16 -> 32.*--force") as err:
        run_sweep(spec(tmp_path, ["model.d_model=32"]), workers=1)
    assert "\n" not in str(err.value)
    assert (run / "model.safetensors").read_bytes() == weights
    assert json.loads((tmp_path / "s" / "sweep.json").read_text())["spec"]["overrides"] == TINY
    # fewer steps than the finished run trained is a difference too
    with pytest.raises(ValueError, match=r"train\.steps: 2 -> 1 \(trained further\)"):
        run_sweep(spec(tmp_path, ["train.steps=1"]), workers=1)
    # keys that do not change training: skipped, and sweep.json says what the run on disk keeps
    assert statuses(run_sweep(spec(tmp_path, ["eval.n=2"]), workers=1)) == ["done (skipped)"]
    assert on_disk(tmp_path)[0]["kept"] == "eval.n: 4 -> 2" and on_disk(tmp_path)[0]["state"] == "finished"
    # more steps: the finished run trains on from its checkpoint
    assert statuses(run_sweep(spec(tmp_path, ["train.steps=3"]), workers=1)) == ["trained"]
    assert json.loads((run / "summary.json").read_text())["step"] == 3
    assert json.loads((run / "run.json").read_text())["resumes"][-1]["step"] == 2
    # the command line: a one-line error, then --force: the old run moved aside, a new one trained
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(spec(tmp_path, ["model.d_model=32", "train.steps=3"])))
    capsys.readouterr()
    assert main(["sweep", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "model.d_model: 16 -> 32" in err
    assert main(["sweep", str(path), "--force"]) == 0
    assert "trained" in capsys.readouterr().out
    old = [p for p in (tmp_path / "s").iterdir() if p.name.startswith("seed=0.old-")]
    assert len(old) == 1 and (old[0] / "model.safetensors").exists()
    assert "resumes" not in json.loads((run / "run.json").read_text())
    state = on_disk(tmp_path)[0]
    assert state["state"] == "rerun" and state["moved_to"] == str(old[0]) and state["status"] == "trained"
    assert [r["dir"].name for r in load_runs(tmp_path / "s")] == ["seed=0"]   # the report ignores the old run


def test_every_grid_point_is_validated_before_the_first_run(tmp_path):
    s = spec(tmp_path, grid={"order": [{"name": "random"}, {"name": "ar"}, {"name": "rnadom"}]})
    with pytest.raises(ValueError, match=r"sweep point 'order=rnadom': unknown order 'rnadom'. Did you mean 'random'"):
        run_sweep(s, workers=1)
    assert not (tmp_path / "s").exists()          # nothing trained, nothing written
    s = spec(tmp_path, grid={"decode": [[{"name": "margin"}], [{"name": "margn"}]]})
    with pytest.raises(ValueError, match=r"sweep point 'decode=.*margn.*unknown decoder 'margn'"):
        run_sweep(s, workers=1)
    assert not (tmp_path / "s").exists()


def _children(pid):
    """Live (non-zombie) processes whose parent is ``pid``."""
    out = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[1]) == pid and fields[0] != "Z":
            out.append(int(d.name))
    return out


def _alive(pid):
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM, signal.SIGINT])
def test_workers_die_with_the_sweep(tmp_path, sig):
    """Two workers training long runs; the sweep process is killed: within seconds no worker lives."""
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(spec(tmp_path, ["train.steps=100000", "train.log_every=0"], grid={"seed": [0, 1]})))
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
    parent = subprocess.Popen([sys.executable, "-m", "anyorder.cli", "sweep", str(path), "--workers", "2"], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    workers = []
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not all((tmp_path / "s" / f"seed={i}" / "metrics.jsonl").exists()
                                                      for i in (0, 1)):
            assert parent.poll() is None, parent.stderr.read()
            time.sleep(0.2)
        workers = _children(parent.pid)
        assert len(workers) >= 2
        parent.send_signal(sig)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and any(_alive(w) for w in workers):
            time.sleep(0.1)
        assert not [w for w in workers if _alive(w)]
        rc = parent.wait(timeout=15)
        err = parent.stderr.read()
        if sig != signal.SIGKILL:  # one line, the exit status of a process ended by that signal
            assert rc == 128 + sig and err == f"anyorder: sweep stopped by {sig.name}; stopping its workers " \
                                              f"(rerun the sweep to resume)\n", (rc, err)
    finally:
        for w in [parent.pid, *workers]:
            if _alive(w):
                os.kill(w, signal.SIGKILL)
        parent.wait()


def test_workers_load_the_base_configs_plugins(tmp_path, monkeypatch):
    """Spawned workers import the plugins of the sweep's base config, relative to that config."""
    (tmp_path / "cfg" / "plug").mkdir(parents=True)
    (tmp_path / "cfg" / "plug" / "myorder.py").write_text(
        "from anyorder.orders import ORDERS\n\n\n@ORDERS.register('sweep_test_ar')\n"
        "class SweepTestAR(ORDERS.get('ar')):\n    pass\n")
    base = tmp_path / "cfg" / "base.yaml"
    base.write_text((ROOT / "configs" / "sudoku4.yaml").read_text() + "plugins: [plug/myorder.py]\n")
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    out = run_sweep(spec(tmp_path, base=str(base), grid={"order": ["sweep_test_ar"], "seed": [0, 1]}), workers=2)
    assert statuses(out) == ["trained", "trained"]
    plugins = json.loads((tmp_path / "s" / "order=sweep_test_ar,seed=1" / "plugins.json").read_text())
    assert plugins["resolved"] == [str(tmp_path / "cfg" / "plug" / "myorder.py")]
