"""Fuzz the command line: adversarial config values and CLI arguments for train, eval, sample, sweep.

Every case must end in success (status 0) or a one-line user error (status 2, stderr a single
line starting ``anyorder: error:`` that names the key or flag at fault): never a traceback, never
a half-written run directory (after an error the output folder holds nothing new), never a
process left behind. The values are a fixed list of adversarial ones (wrong types, zero,
negative, NaN, ±inf, huge, empty, lists and mappings where scalars go, malformed YAML) drawn
by a seeded generator, so a failure replays exactly. The default run is a few dozen cases; the
``slow`` run draws many more. Issue 12, item 7 is probed case by case in ``test_item7_*``.
"""
from __future__ import annotations

import contextlib
import io
import os
import random
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import yaml

from anyorder import checks
from anyorder.cli import main

ROOT = Path(__file__).resolve().parents[1]

TINY = {
    "name": "tiny", "seed": 0,
    "task": {"name": "sudoku", "size": 4, "n_clues": 5, "n_train": 16, "n_eval": 4, "seed": 0},
    "order": {"name": "random"},
    "model": {"d_model": 8, "n_layers": 1, "n_heads": 2},
    "train": {"steps": 1, "batch_size": 2, "warmup_steps": 0, "log_every": 0, "progress": False},
    "eval": {"n": 4, "batch_size": 4},
    "decode": [{"name": "top_prob"}],
}

# YAML texts of adversarial values (PyYAML needs the dot and the sign: 1.0e+30 is a float, 1e30 a string)
VALUES = ["0", "-1", "1.5", ".nan", ".inf", "-.inf", "1.0e+30", "-1.0e+30", "''", "abc", "1e6", "[1, 2]", "[]",
          "{a: 1}", "{}", "true", "null", "[", "{", "'../x'", "99999999999999999999999"]
# keys whose every value is cheap: a huge valid value (train.steps, grad_accum, flops_budget = 1e30) would
# only be slow
KEYS = ["seed", "force_size", "weighting", "objective", "task", "order", "model", "train", "eval", "decode",
        "model.d_model", "model.n_layers", "model.n_heads", "model.mlp", "model.mlp_ratio", "model.rope_base",
        "model.time_conditioning", "model.tie_embeddings", "task.name", "task.size", "task.n_clues", "task.n_train",
        "task.n_eval", "task.seed", "task.bogus", "order.name", "order.block_size", "order.schedule",
        "eval.n", "eval.batch_size", "train.batch_size", "train.lr", "train.warmup_steps", "train.grad_clip",
        "train.ema", "train.precision", "train.betas", "train.progress", "bogus", "model.bogus"]
# valid values that are merely slow (a 1e6-wide MLP fits in memory, so it trains, for minutes)
SLOW_BUT_VALID = {("model.mlp_ratio", "1e6")}
DECODERS = ["top_prob", "margin", "threshold", "beam", "remask", "random_init", "edit", "ancestral", "nope", ""]
FLAG_VALUES = ["0", "-5", "1", "2", "1.5", "nan", "inf", "-inf", "abc", "", "1e30", "[1]"]
FLAGS = ["--n", "--k", "--steps", "--window", "--temperature", "--top-k", "--top-p", "--seed"]
OPTS = ["tau", "ratio", "remask_until", "edit_tau", "fill_tokens", "width", "bogus", ""]


# -- running the CLI -----------------------------------------------------------------------------

def run_cli(argv):
    """(status, stdout, stderr) of ``anyorder argv`` run in this process; any exception escaping
    ``main`` (a traceback) fails the test with the arguments that caused it."""
    out, err = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            rc = main([str(a) for a in argv])
    except BaseException as exc:  # noqa: BLE001  (SystemExit included: main returns a status)
        raise AssertionError(f"anyorder {argv} raised {type(exc).__name__}: {exc}") from exc
    return rc, out.getvalue(), err.getvalue()


def tree(folder: Path):
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*")) if folder.exists() else []


def assert_clean(argv, rc, err, names, before, after):
    """Success, or one line ``anyorder: error: ...`` naming one of ``names``, and nothing new on disk."""
    assert rc in (0, 2), f"anyorder {argv}: status {rc}\n{err}"
    assert "Traceback" not in err, f"anyorder {argv}: traceback\n{err}"
    if rc == 2:
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("anyorder: error: "), f"anyorder {argv}: stderr {err!r}"
        assert any(n in lines[0] for n in names), f"anyorder {argv}: the error names none of {names}: {lines[0]}"
        new = sorted(set(after) - set(before))
        if "non-finite" in lines[0]:  # a failure after training started keeps the metrics it logged
            new = [p for p in new if not p.startswith(tuple(q.split("/")[0] + "/" for q in new
                                                             if q.endswith("metrics.jsonl")))
                   and not any(q.startswith(p + "/") for q in new)]
        assert not new, f"anyorder {argv}: an error left {new}"


def write_config(folder: Path, cfg=None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "tiny.yaml"
    path.write_text(yaml.safe_dump({**(cfg or TINY), "out_dir": str(folder / "runs")}, sort_keys=False))
    return path


def fuzz_train(tmp: Path, key: str, value: str):
    if (key, value) in SLOW_BUT_VALID:
        return
    cfg = write_config(tmp)
    runs = tmp / "runs"
    before = tree(runs)
    argv = ["train", cfg, f"{key}={value}", f"name=r{uuid.uuid4().hex[:8]}"]
    rc, _, err = run_cli(argv)
    assert_clean(argv, rc, err, [key, *key.split(".")], before, tree(runs))
    if rc == 0:
        assert len(tree(runs)) > len(before)


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fuzz_run")
    rc, _, err = run_cli(["train", write_config(tmp)])
    assert rc == 0, err
    return tmp / "runs" / "tiny"


def decoder_args(rnd: random.Random):
    """A random decoder choice with random flags and options, and the names an error may cite."""
    argv, names = [], ["decoder"]
    if rnd.random() < 0.8:
        argv += ["--decoder", rnd.choice(DECODERS)]
    for flag in rnd.sample(FLAGS, rnd.randint(0, 2)):
        argv += [flag, rnd.choice(FLAG_VALUES)]
        names += [flag, flag.lstrip("-").replace("-", "_")]
    for _ in range(rnd.randint(0, 2)):
        opt = rnd.choice(OPTS)
        argv += ["--opt", f"{opt}={rnd.choice(VALUES + ['0.5', '[1, 2, 3, 4]'])}"]
        names += ["--opt", opt or "--opt"]
    return argv, names


def fuzz_decode_cmd(run_dir: Path, cmd: str, rnd: random.Random):
    argv, names = decoder_args(rnd)
    if cmd == "sample" and rnd.random() < 0.3:
        argv += ["--puzzle", rnd.choice(["1234341221434321", "12", "abcd" * 4, "", "0" * 16])]
        names += ["puzzle", "sudoku", "grid"]
    argv = [cmd, run_dir] + argv
    before = tree(run_dir.parent)
    rc, _, err = run_cli(argv)
    assert_clean(argv, rc, err, names + ["decoder", "Valid options"], before, tree(run_dir.parent))


def fuzz_sweep(tmp: Path, key: str, value: str, sweep_key=None, sweep_value=None):
    if (key, value) in SLOW_BUT_VALID:
        return
    base = write_config(tmp)
    label = f"s{uuid.uuid4().hex[:6]}"
    spec = {"name": label, "out_dir": str(tmp / "sweeps"), "base": str(base),
            "grid": {key: [yaml.safe_load(value) if value not in ("[", "{") else value]}}
    names = [key, *key.split("."), "grid"]
    if sweep_key is not None:
        spec[sweep_key] = sweep_value
        names += [sweep_key, sweep_key.rstrip("s")]
    path = tmp / f"{label}.yaml"
    path.write_text(yaml.safe_dump(spec))
    before = tree(tmp / "sweeps")
    argv = ["sweep", path]
    rc, _, err = run_cli(argv)
    # the sweep's folder and sweep.json may exist after an error (item 5 validates every grid point
    # before making them); a run directory may not
    after = [p for p in tree(tmp / "sweeps") if p not in (label, f"{label}/sweep.json")]
    assert_clean(argv, rc, err, names, before, after)


# -- the default run: seeded, a few dozen cases -------------------------------------------------------

def test_fuzz_train_config_values(tmp_path):
    rnd = random.Random(0)
    for i in range(40):
        fuzz_train(tmp_path, rnd.choice(KEYS), rnd.choice(VALUES))


def test_fuzz_every_value_of_the_model_and_decode_keys(tmp_path):
    for key in ("model.d_model", "model.n_heads", "decode"):
        for value in VALUES:
            fuzz_train(tmp_path, key, value)


def test_fuzz_eval_and_sample_arguments(trained_run):
    rnd = random.Random(1)
    for i in range(30):
        fuzz_decode_cmd(trained_run, rnd.choice(["eval", "sample"]), rnd)


def test_fuzz_eval_and_sample_counts(trained_run):
    for cmd in ("eval", "sample"):
        for n in FLAG_VALUES:
            argv = [cmd, trained_run, "--n", n]
            rc, _, err = run_cli(argv)
            assert_clean(argv, rc, err, ["--n"], [], [])
            assert (rc == 0) == (n in ("1", "2")), (argv, err)


def test_fuzz_sweep_grid_values(tmp_path):
    rnd = random.Random(2)
    for key in ("model.d_model", "task.n_train", "seed", "decode", "order"):
        fuzz_sweep(tmp_path, key, rnd.choice(["0", "-1", "1.5", ".nan", "abc", "[", "{a: 1}"]))
    for sweep_key, sweep_value in [("grid", 5), ("grid", {"seed": 5}), ("grid", {"seed": []}), ("launcher", 5),
                                   ("launcher", {"name": "nope"}), ("overrides", 5), ("overrides", ["x"]),
                                   ("base", 5), ("base", "missing.yaml"), ("name", ["a"]), ("bogus", 1)]:
        fuzz_sweep(tmp_path, "seed", "0", sweep_key, sweep_value)


def test_fuzz_bad_command_lines(tmp_path, trained_run):
    cfg = write_config(tmp_path)
    for argv in (["train"], ["train", cfg, "novalue"], ["train", cfg, "=1"], ["train", tmp_path], ["train", "nope.yaml"],
                 ["eval"], ["eval", tmp_path], ["eval", trained_run, "--bogus"], ["sample", trained_run, "--n"],
                 ["sweep", cfg], ["sweep", tmp_path / "none.yaml"], ["sweep", cfg, "--workers", "0"], ["nope"], []):
        rc, _, err = run_cli(argv)
        assert_clean(argv, rc, err, ["anyorder", "config", "sweep", "run", "argument", "override", "key", "--", "="],
                     [], [])
        assert rc == 2, (argv, err)


def test_path_like_names_stay_in_the_sandbox(tmp_path):
    """Names that look like paths (item 8 makes them errors): whatever they do, they end cleanly
    and write nothing outside the folder the run was given."""
    sandbox = tmp_path / "a" / "b"
    cfg = write_config(sandbox)
    for name in ("../x", "'..'", "'.'", "x/../../y", "''", "[1]", "5", "true", "null"):
        rc, _, err = run_cli(["train", cfg, f"name={name}"])
        assert rc in (0, 2) and "Traceback" not in err and len(err.strip().splitlines()) <= 1, (name, err)
    assert not [p for p in tmp_path.rglob("*") if sandbox not in p.parents and p != sandbox
                and p not in sandbox.parents and "x" not in p.name and "y" not in p.name], tree(tmp_path)


# -- real processes --------------------------------------------------------------------------------

def run_process(argv, tag):
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "ANYORDER_FUZZ_TAG": tag, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "anyorder.cli", *map(str, argv)], capture_output=True, text=True,
                          env=env, timeout=300)


def processes_tagged(tag):
    """Live processes whose environment carries ``tag`` (a worker outliving its parent would)."""
    found = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            if f"ANYORDER_FUZZ_TAG={tag}".encode() in (proc / "environ").read_bytes():
                found.append(proc.name)
        except OSError:
            continue
    return found


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="needs /proc to look for stray processes")
def test_fuzz_as_real_processes(tmp_path):
    cfg = write_config(tmp_path)
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text(yaml.safe_dump({"name": "s", "out_dir": str(tmp_path / "sweeps"), "base": str(cfg),
                                     "grid": {"seed": [0, 1], "model.d_model": [8, 0]}}))
    cases = [(["train", cfg, "model.d_model=abc"], ["model.d_model"]),
             (["train", cfg, "decode=[{name: margin, temperature: -1}]"], ["decoder.temperature"]),
             (["eval", tmp_path / "runs" / "none", "--n", "-5"], ["--n"]),
             (["sweep", sweep, "--workers", "2"], ["model.d_model"])]
    for argv, names in cases:
        tag = uuid.uuid4().hex
        before = tree(tmp_path / "runs")
        res = run_process(argv, tag)
        assert_clean(argv, res.returncode, res.stderr, names, before, tree(tmp_path / "runs"))
        assert res.returncode == 2, res.stderr
        assert not processes_tagged(tag), f"anyorder {argv} left processes behind"


# -- issue 12, item 7, probe by probe ----------------------------------------------------------------

@pytest.mark.parametrize("override,named", [
    ("model.d_model=0", "model.d_model"), ("model.n_layers=-1", "model.n_layers"),
    ("model.mlp_ratio=0", "model.mlp_ratio"), ("model.n_heads=0", "model.n_heads"),
    ("task.n_train=0", "task.n_train"), ("eval.n=0", "eval.n"), ("seed=1.5", "seed"),
    ("model.d_model=abc", "model.d_model"), ("decode=5", "decode"), ("decode=[]", "decode"),
    ("decode=[{name: margin, temperature: -1}]", "decoder.temperature"),
    ("decode=[{name: margin, temperature: .nan}]", "decoder.temperature"),
    ("task.size=abc", "task.size"), ("task.foo=1", "Valid options: n_clues, n_eval, n_train, seed, size"),
    ("task.n_train=[1]", "task.n_train"), ("model.d_model=[", "line 1"),
])
def test_item7_bad_values_fail_before_the_run_directory(tmp_path, override, named):
    cfg = write_config(tmp_path)
    rc, _, err = run_cli(["train", cfg, override])
    assert rc == 2 and named in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "runs").exists()


def test_item7_seed_is_an_integer_not_truncated(tmp_path):
    cfg = write_config(tmp_path)
    for seed in ("1.5", "true", "-1", "'3'"):
        rc, _, err = run_cli(["train", cfg, f"seed={seed}"])
        assert rc == 2 and "seed must be an integer" in err, err


def test_item7_a_model_too_large_for_memory_is_refused_unless_forced(tmp_path, monkeypatch):
    cfg = write_config(tmp_path)
    monkeypatch.setattr(checks, "available_memory", lambda: 2 ** 30)  # the same answer on every machine
    rc, _, err = run_cli(["train", cfg, "model.d_model=16384", "model.n_heads=128"])
    assert rc == 2 and "GiB" in err and "force_size=true" in err, err
    monkeypatch.setattr(checks, "available_memory", lambda: 10_000)  # even the tiny model is too large now
    rc, _, err = run_cli(["train", cfg])
    assert rc == 2 and "force_size=true" in err and not (tmp_path / "runs").exists(), err
    rc, _, err = run_cli(["train", cfg, "force_size=true"])
    assert rc == 0, err


def test_item7_malformed_yaml_names_the_file_and_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nmodel: {d_model: 8\ntrain: {}\n")
    rc, _, err = run_cli(["train", bad])
    assert rc == 2 and "bad.yaml" in err and "line" in err and len(err.strip().splitlines()) == 1, err


@pytest.mark.parametrize("args,named", [
    (["eval", "--n", "-5"], "--n"), (["eval", "--n", "0"], "--n"),
    (["eval", "--decoder", "margin", "--temperature", "nan"], "decoder.temperature"),
    (["eval", "--decoder", "threshold", "--opt", "tau=.nan"], "decoder.tau"),
    (["eval", "--decoder", "top_prob", "--top-k", "-1"], "decoder.top_k"),
    (["sample", "--decoder", "margin", "--top-p", "0"], "decoder.top_p"),
    (["eval", "--k", "2"], "--decoder"),
])
def test_item7_cli_values(trained_run, args, named):
    rc, _, err = run_cli([args[0], trained_run, *args[1:]])
    assert rc == 2 and named in err and len(err.strip().splitlines()) == 1, err


def test_item7_long_generation_shows_progress(monkeypatch):
    from anyorder.tasks import star_graph, sudoku_gen

    seen = []

    def recorder(*args, **kw):
        seen.append(kw.get("desc"))
        return __import__("tqdm").tqdm(*args, **{**kw, "disable": True})

    monkeypatch.setattr(sudoku_gen, "tqdm", recorder)
    monkeypatch.setattr(star_graph, "tqdm", recorder)
    sudoku_gen.generate_dataset(4, 20, 5, seed=0)
    star_graph.StarGraphTask(num_nodes=10, degree=2, path_len=3, n_train=4, n_eval=2)
    assert {"4x4 sudoku puzzles", "4x4 base puzzles", "star graphs"} <= set(seen)


# -- the long run -----------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("seed", range(4))
def test_fuzz_many_random_cases(tmp_path, trained_run, seed):
    rnd = random.Random(100 + seed)
    for i in range(150):
        fuzz_train(tmp_path, rnd.choice(KEYS), rnd.choice(VALUES))
    for i in range(100):
        fuzz_decode_cmd(trained_run, rnd.choice(["eval", "sample"]), rnd)
    for i in range(10):
        fuzz_sweep(tmp_path, rnd.choice(KEYS[10:]), rnd.choice(VALUES))
