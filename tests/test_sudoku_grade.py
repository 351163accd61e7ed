"""Difficulty grades by technique, per-grade accuracy, and evaluation on a file of puzzles."""
import json
import subprocess
import sys

import numpy as np
import pytest

from anyorder.tasks import build_task
from anyorder.tasks import sudoku_core as core
from anyorder.tasks.sudoku_gen import generate_dataset
from anyorder.tasks.sudoku_grade import GRADES, grade, grade_batch, grade_counts


def singles_reference(puzzle, hidden: bool):
    """An independent singles solver on numpy candidate sets: True if it completes the grid."""
    n = int(round(len(puzzle) ** 0.5))
    b = int(round(n ** 0.5))
    g = np.array(puzzle, dtype=int).reshape(n, n)
    while (g == 0).any():
        cand = np.ones((n, n, n), dtype=bool)  # row, col, digit-1
        for r in range(n):
            for c in range(n):
                if g[r, c]:
                    d = g[r, c] - 1
                    cand[r, :, d] = cand[:, c, d] = False
                    cand[r // b * b:r // b * b + b, c // b * b:c // b * b + b, d] = False
                    cand[r, c, :] = False
        empty = g == 0
        if (empty & ~cand.any(-1)).any():
            return False
        naked = empty & (cand.sum(-1) == 1)
        if naked.any():
            g[naked] = cand[naked].argmax(-1) + 1
            continue
        if not hidden:
            return False
        placed = False
        units = [[(r, c) for c in range(n)] for r in range(n)] + [[(r, c) for r in range(n)] for c in range(n)]
        units += [[(br + i, bc + j) for i in range(b) for j in range(b)] for br in range(0, n, b) for bc in range(0, n, b)]
        for unit in units:
            for d in range(n):
                cells = [(r, c) for r, c in unit if cand[r, c, d]]
                if len(cells) == 1 and g[cells[0]] == 0:
                    g[cells[0]] = d + 1
                    placed = True
                    break
            if placed:
                break
        if not placed:
            return False
    return True


def test_grades_match_an_independent_singles_solver():
    puzzles, _ = generate_dataset(9, 120, 27, seed=3)
    for p in puzzles:
        want = 0 if singles_reference(p, hidden=False) else 1 if singles_reference(p, hidden=True) else 2
        assert grade(p) == want, core.format_grid(p)


def test_grade_examples_and_the_25_clue_mix():
    solution = core.solve(np.zeros(81, dtype=np.int8))
    one_blank = solution.copy()
    one_blank[40] = 0
    assert GRADES[grade(one_blank)] == "naked_singles"
    # a well-known puzzle that needs more than singles (published as "the world's hardest", Inkala 2012)
    hard = core.parse_grid("800000000003600000070090200050007000000045700000100030001000068008500010090000400", 9)
    assert GRADES[grade(hard)] == "beyond_singles"
    clash = one_blank.copy()
    clash[0] = clash[1]
    assert grade(clash) == 2
    # the claim: at 25 clues about half of the generator's puzzles need more than singles
    counts = grade_counts(generate_dataset(9, 200, 25, seed=1)[0])
    assert sum(counts.values()) == 200 and 0.3 < counts["beyond_singles"] / 200 < 0.7


def test_metrics_per_grade_add_up():
    task = build_task({"name": "sudoku", "size": 9, "n_clues": 28, "n_train": 1, "n_eval": 60, "seed": 0})
    x0, answer = task.eval_set(60)
    pred = x0.clone()
    g = grade_batch(task.eval_p)
    # wrong answers exactly on the beyond-singles puzzles
    pred[np.where(g == 2)[0], task.cells + 1] = (pred[np.where(g == 2)[0], task.cells + 1] % 9) + 1
    m = task.metrics(pred, x0, answer)
    assert m.get("puzzle_acc_beyond_singles", 0.0) == 0.0 and m["puzzle_acc_hidden_singles"] == 1.0
    total = sum(m[f"n_{name}"] for name in GRADES if f"n_{name}" in m)
    assert total == 60
    assert m["puzzle_acc"] == pytest.approx(sum(m[f"puzzle_acc_{k}"] * m[f"n_{k}"] for k in GRADES if f"n_{k}" in m) / 60)


def test_load_eval_reads_solves_and_refuses(tmp_path):
    task = build_task({"name": "sudoku", "size": 9, "n_clues": 30, "n_train": 1, "n_eval": 3, "seed": 0})
    p, s = generate_dataset(9, 4, 30, seed=9)
    f = tmp_path / "p.csv"
    f.write_text("quizzes,solutions\n" + core.format_grid(p[0]) + "\n\n# a comment\n"
                 + core.format_grid(p[1]).replace("0", ".") + "," + core.format_grid(s[1]) + "\n")
    assert task.load_eval(f) == 2
    x0, _ = task.eval_set(10)
    assert len(x0) == 2 and (x0[:, task.cells + 1:].numpy() == s[:2]).all()
    bad = tmp_path / "bad.txt"
    bad.write_text(core.format_grid(p[0]) + "\n" + "12x" * 27 + "\n")
    with pytest.raises(ValueError, match=r"bad.txt, line 2: invalid character 'x'"):
        task.load_eval(bad)
    open_grid = tmp_path / "open.txt"
    open_grid.write_text("0" * 81 + "\n")
    with pytest.raises(ValueError, match="line 1: the puzzle does not have exactly one solution"):
        task.load_eval(open_grid)
    wrong = tmp_path / "wrong.txt"
    wrong.write_text(core.format_grid(p[0]) + "," + core.format_grid(s[1]) + "\n")
    with pytest.raises(ValueError, match="line 1: the given solution does not solve the puzzle"):
        task.load_eval(wrong)
    with pytest.raises(ValueError, match="does not read evaluation files"):
        build_task({"name": "star_graph", "n_train": 1, "n_eval": 1}).load_eval(f)


def test_cli_eval_on_a_puzzle_file(tmp_path):
    from anyorder.config import load_config
    from anyorder.experiment import train

    cfg = load_config(None, ["task.name=sudoku", "task.size=9", "task.n_clues=30", "task.n_train=64", "task.n_eval=8",
                             "model.d_model=16", "model.n_layers=1", "model.n_heads=2", "train.steps=2",
                             "train.batch_size=4", "train.warmup_steps=0", "eval.n=4", f"out_dir={tmp_path}", "name=s9"])
    run_dir = train(cfg)
    p, s = generate_dataset(9, 5, 30, seed=11)
    f = tmp_path / "puzzles.txt"
    f.write_text("\n".join(core.format_grid(q) for q in p) + "\n")
    out = subprocess.run([sys.executable, "-m", "anyorder.cli", "eval", str(run_dir), "--puzzles", str(f), "--json",
                          "--decoder", "margin"], capture_output=True, text=True, check=True)
    rows = json.loads(out.stdout)
    assert len(rows) == 1 and 0.0 <= rows[0]["cell_acc"] <= 1.0
    # the model's own evaluation on exactly those puzzles, from Python
    from anyorder.experiment import evaluate, load_run
    exp = load_run(run_dir)
    exp.task.load_eval(f)
    assert evaluate(exp, {"name": "margin"}, n=5)["cell_acc"] == rows[0]["cell_acc"]
    missing = subprocess.run([sys.executable, "-m", "anyorder.cli", "eval", str(run_dir), "--puzzles", str(tmp_path / "nope")],
                             capture_output=True, text=True)
    assert missing.returncode != 0 and "nope" in missing.stderr and "Traceback" not in missing.stderr


def test_puzzles_are_generated_on_first_use(tmp_path):
    """Building the task generates nothing; a puzzle file read by load_eval is decoded without
    generating the training set; the first use generates exactly the set built eagerly before
    (the first n_eval for evaluation, the rest for training); training builds it before writing."""
    spec = {"name": "sudoku", "size": 9, "n_clues": 30, "n_train": 5, "n_eval": 3, "seed": 4}
    task = build_task(spec)
    assert task._parts == {} and task.describe()["n_train"] == 5
    p, s = generate_dataset(9, 8, 30, seed=4)
    f = tmp_path / "p.txt"
    f.write_text(core.format_grid(p[6]) + "\n")
    assert task.load_eval(f) == 1 and task.eval_set(4)[0].shape[0] == 1
    assert list(task._parts) == ["eval"] and task.describe()["n_eval"] == 1
    assert (task.train_p == p[3:]).all() and (task.train_s == s[3:]).all()  # generated now
    assert len(task.eval_p) == 1 and (task.eval_p[0] == p[6]).all()         # the file's set stays
    fresh = build_task(spec)
    assert (fresh.eval_p == p[:3]).all() and (fresh._x_train[:, :81].numpy() == p[3:]).all()
    from anyorder.config import load_config
    from anyorder.experiment import build
    exp = build(load_config(None, ["task.name=sudoku", "task.size=4", "task.n_train=30", "task.n_eval=5",
                                   "model.d_model=16", "model.n_layers=1", "model.n_heads=2"]), meta=True)
    assert set(exp.task._parts) == {"train", "eval"}
