"""Loading a run imports none of the plugins its config.yaml lists unless the user asks
(``--plugin``, ``--trust-plugins``); ``anyorder train CONFIG`` imports its config's plugins,
relative paths resolved against the config file's directory; ``plugins.json`` records them."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from anyorder.cli import main
from anyorder.experiment import load_run
from anyorder.plugins import PluginsNotAllowed

ROOT = Path(__file__).resolve().parents[1]
TINY = ["task.n_train=100", "task.n_eval=16", "model.d_model=32", "model.n_layers=1", "model.n_heads=2",
        "train.steps=2", "train.warmup_steps=1", "train.batch_size=4", "train.progress=false", "eval.n=8"]


def marker_plugin(path: Path, marker: Path) -> Path:
    """A plugin file that, when imported, writes ``marker`` (and registers nothing)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"from pathlib import Path\nPath({str(marker)!r}).write_text('imported')\n")
    return path


def cli_train(config: Path, tmp_path, name, *extra):
    return main(["train", str(config), *TINY, f"out_dir={tmp_path / 'runs'}", f"name={name}", *extra])


@pytest.fixture
def foreign_run(tmp_path, monkeypatch):
    """A finished run directory whose config.yaml lists ``evil.py`` (shipped in the run directory):
    importing it would write ``tmp_path/evil-ran``."""
    cfg = tmp_path / "cfg" / "exp.yaml"
    cfg.parent.mkdir()
    cfg.write_text((ROOT / "configs" / "sudoku4.yaml").read_text())
    monkeypatch.chdir(tmp_path)
    assert cli_train(cfg, tmp_path, "foreign") == 0
    run = tmp_path / "runs" / "foreign"
    marker_plugin(run / "evil.py", tmp_path / "evil-ran")
    stored = yaml.safe_load((run / "config.yaml").read_text())
    stored["plugins"] = ["evil.py"]
    (run / "config.yaml").write_text(yaml.safe_dump(stored))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    return run


def test_load_run_and_cli_refuse_a_runs_plugins(foreign_run, tmp_path, capsys):
    evil = tmp_path / "evil-ran"
    with pytest.raises(PluginsNotAllowed, match=r"lists plugins .*evil\.py.*--plugin PATH_OR_MODULE.*--trust-plugins"):
        load_run(foreign_run)
    for cmd in (["eval", "--n", "4"], ["sample", "--n", "1"], ["likelihood", "--n", "2", "--samples", "1"],
                ["analyze", "--n", "4", "--out", str(tmp_path / "an")]):
        capsys.readouterr()
        assert main([cmd[0], str(foreign_run), *cmd[1:]]) == 2, cmd
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "evil.py" in err and "--trust-plugins" in err and "--plugin" in err
    assert main(["text-compare", str(foreign_run), "--judge", str(foreign_run), "--out", str(tmp_path / "tc")]) == 2
    assert not evil.exists()


def test_plugin_flag_loads_the_users_plugin_instead(foreign_run, tmp_path, capsys):
    mine = marker_plugin(tmp_path / "mine.py", tmp_path / "mine-ran")
    assert main(["eval", str(foreign_run), "--n", "4", "--plugin", str(mine)]) == 0
    assert (tmp_path / "mine-ran").exists() and not (tmp_path / "evil-ran").exists()
    mine2 = marker_plugin(tmp_path / "m2" / "mine.py", tmp_path / "mine2-ran")  # same file name, other file
    exp = load_run(foreign_run, plugins=[str(mine2)])
    assert (tmp_path / "mine2-ran").exists() and not (tmp_path / "evil-ran").exists()
    assert exp.model is not None


def test_trust_plugins_imports_what_the_run_lists(foreign_run, tmp_path, capsys):
    assert main(["eval", str(foreign_run), "--n", "4", "--trust-plugins"]) == 0
    assert (tmp_path / "evil-ran").read_text() == "imported"   # resolved against the run's directory
    (tmp_path / "evil-ran").unlink()
    load_run(foreign_run)       # imported once in this process: loading again runs nothing new
    assert not (tmp_path / "evil-ran").exists()


def test_trust_plugins_in_python(foreign_run, tmp_path):
    load_run(foreign_run, trust_plugins=True)
    assert (tmp_path / "evil-ran").exists()


def test_module_plugins(foreign_run, tmp_path, monkeypatch):
    stored = yaml.safe_load((foreign_run / "config.yaml").read_text())
    stored["plugins"] = ["os"]                         # imported already: importing runs nothing
    (foreign_run / "config.yaml").write_text(yaml.safe_dump(stored))
    load_run(foreign_run)
    marker_plugin(tmp_path / "mods" / "anyorder_test_marker_mod.py", tmp_path / "mod-ran")
    monkeypatch.syspath_prepend(str(tmp_path / "mods"))
    stored["plugins"] = ["anyorder_test_marker_mod"]
    (foreign_run / "config.yaml").write_text(yaml.safe_dump(stored))
    with pytest.raises(PluginsNotAllowed, match="anyorder_test_marker_mod"):
        load_run(foreign_run)
    assert not (tmp_path / "mod-ran").exists()
    load_run(foreign_run, trust_plugins=True)
    assert (tmp_path / "mod-ran").exists()


@pytest.mark.filterwarnings("ignore:resuming from")
def test_train_resolves_plugins_against_the_config_and_records_them(tmp_path, monkeypatch, capsys):
    cfg = tmp_path / "cfg" / "exp.yaml"
    plug = marker_plugin(tmp_path / "cfg" / "plug" / "p.py", tmp_path / "p-ran")
    cfg.parent.mkdir(exist_ok=True)
    cfg.write_text((ROOT / "configs" / "sudoku4.yaml").read_text() + "plugins: [plug/p.py]\n")
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")          # not the config's directory
    assert cli_train(cfg, tmp_path, "r") == 0
    assert (tmp_path / "p-ran").exists()
    run = tmp_path / "runs" / "r"
    assert yaml.safe_load((run / "config.yaml").read_text())["plugins"] == ["plug/p.py"]   # as written
    assert json.loads((run / "plugins.json").read_text()) == {"plugins": ["plug/p.py"], "resolved": [str(plug)]}
    load_run(run)                                       # imported in this process already
    # a fresh process, elsewhere: nothing imported without asking; trusted, the recorded absolute path
    (tmp_path / "p-ran").unlink()
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    r = subprocess.run([sys.executable, "-m", "anyorder.cli", "eval", str(run), "--n", "4", "--trust-plugins"],
                       cwd=tmp_path, env=env, capture_output=True, text=True)
    assert r.returncode == 0 and (tmp_path / "p-ran").exists(), r.stderr
    # a resume takes the command's plugins (here: the same file named by its absolute path)
    assert cli_train(cfg, tmp_path, "r", f"plugins=[{plug}]", "train.steps=3") == 0
    assert yaml.safe_load((run / "config.yaml").read_text())["plugins"] == [str(plug)]
    assert json.loads((run / "plugins.json").read_text())["resolved"] == [str(plug)]
    assert json.loads((run / "summary.json").read_text())["step"] == 3
    capsys.readouterr()
    assert cli_train(cfg, tmp_path, "r2", "plugins=[nope/p.py]") == 2
    err = capsys.readouterr().err
    assert "plugin file 'nope/p.py' does not exist" in err and str(cfg.parent) in err
    assert not (tmp_path / "runs" / "r2").exists()


@pytest.mark.parametrize("example", ["right_to_left.yaml", "extending.yaml"])
def test_repository_example_configs_train_from_the_repository_root(example, tmp_path, monkeypatch, capsys):
    """Their plugins name ``examples/...`` from the repository root: not next to the config, so the
    current directory is the fallback."""
    monkeypatch.chdir(ROOT)
    extra = ["task.n_train=100", "task.n_eval=16"] if example == "right_to_left.yaml" else []
    over = [o for o in TINY if not o.startswith("task.")] + extra
    assert main(["train", f"configs/examples/{example}", *over, f"out_dir={tmp_path}", "name=ex"]) == 0
    resolved = json.loads((tmp_path / "ex" / "plugins.json").read_text())["resolved"]
    assert all(Path(p).is_relative_to(ROOT / "examples") and Path(p).is_file() for p in resolved)
    capsys.readouterr()
    assert main(["eval", str(tmp_path / "ex"), "--n", "4"]) == 0   # the same files, imported by training


def test_no_unsafe_loaders_in_the_package():
    """Nothing in the package deserialises with code execution: no yaml.load / unsafe_load, no
    pickle, no torch.load."""
    bad = []
    for f in (ROOT / "src" / "anyorder").rglob("*.py"):
        text = f.read_text()
        for needle in ("yaml.load(", "yaml.unsafe_load", "yaml.full_load", "import pickle", "pickle.load",
                       "torch.load(", "yaml.Loader", "eval(input"):
            if needle in text:
                bad.append(f"{f.relative_to(ROOT)}: {needle}")
    assert not bad, bad
