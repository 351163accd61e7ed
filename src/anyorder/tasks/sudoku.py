"""Sudoku as a sequence task: ``clues (n²) [SEP] solution (n²)``; the solution is the answer.

Tokens: 0 = blank clue, 1..n digits, n+1 = [SEP], n+2 = [MASK]. Every position carries
row / column / box / segment embeddings (segment: clue, separator, answer), so the model
knows the grid geometry whichever order it decodes in. Puzzles come from
:mod:`anyorder.tasks.sudoku_gen` (unique solutions, verified by the solver); train and
evaluation sets are drawn from different seeds and made disjoint.
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict

import numpy as np
import torch

from . import sudoku_core as core
from ..checks import check_int, check_memory, show
from .sudoku_gen import MIN_CLUES, generate_dataset
from .sudoku_grade import GRADES, grade_batch
from .base import TASKS, Task


@TASKS.register("sudoku")
class SudokuTask(Task):
    name = "sudoku"
    threshold = ("cell_acc", ">=", 0.9)
    secondary_metric = "puzzle_acc"
    detail_metrics = (r"(cell|puzzle)_acc(_\w+)?", r"n_\w+")  # per difficulty grade where graded
    unique_solution = True  # the generator verifies every puzzle's uniqueness with its solver

    def __init__(self, size: int = 4, n_clues: int = 6, n_train: int = 20000, n_eval: int = 1000, seed: int = 0):
        if isinstance(size, bool) or size not in (4, 9):
            raise ValueError(f"task.size must be 4 or 9 (4x4 or 9x9), got {show(size)}")
        n = int(size)
        n_clues = check_int("task.n_clues", n_clues, MIN_CLUES[n], n * n, note=f" for a {n}x{n} sudoku")
        n_train, n_eval = check_int("task.n_train", n_train, 1), check_int("task.n_eval", n_eval, 1)
        seed = check_int("task.seed", seed, 0)
        # the int8 grids and the int64 sequences of every example, before any is generated
        check_memory(f"task.n_train + task.n_eval = {n_train + n_eval:,} sudoku examples",
                     (n_train + n_eval) * (2 * n * n + 1) * 10, "make task.n_train smaller")
        self.size, self.box, self.n_clues = n, {4: 2, 9: 3}[n], n_clues
        self.cells = n * n
        self.grid_shape = (n, n)
        self.sep_id, self.mask_id = n + 1, n + 2
        self.vocab_size = n + 3
        self.seq_len = 2 * self.cells + 1
        self.extra_embeddings = {"row": n + 1, "col": n + 1, "box": n + 1, "segment": 3}
        self.n_train, self.n_eval, self.seed = n_train, n_eval, seed
        # the puzzles are generated on first use (9x9: 3.6 s for 101k here): a run loaded to
        # decode a puzzle file (load_eval) or to answer one puzzle needs none of them
        self._parts: Dict[str, tuple] = {}
        self.answer_mask = torch.zeros(self.seq_len, dtype=torch.bool)
        self.answer_mask[self.cells + 1:] = True

    def _part(self, name: str) -> tuple:
        """(puzzles, solutions, sequences) of ``"train"`` or ``"eval"``: the first ``n_eval`` of
        the generated set for evaluation, the rest for training (disjoint: the set is distinct);
        an evaluation set read by :meth:`load_eval` stays in place of the generated one."""
        if name not in self._parts:
            puzzles, solutions = generate_dataset(self.size, self.n_train + self.n_eval, self.n_clues, seed=self.seed)
            for part, rows in (("eval", slice(None, self.n_eval)), ("train", slice(self.n_eval, None))):
                self._parts.setdefault(part, (puzzles[rows], solutions[rows],
                                              self.encode(puzzles[rows], solutions[rows])))
        return self._parts[name]

    def prepare(self) -> None:
        self._part("train")

    train_p = property(lambda self: self._part("train")[0])
    train_s = property(lambda self: self._part("train")[1])
    eval_p = property(lambda self: self._part("eval")[0])
    eval_s = property(lambda self: self._part("eval")[1])
    _x_train = property(lambda self: self._part("train")[2])
    _x_eval = property(lambda self: self._part("eval")[2])

    def encode(self, puzzles: np.ndarray, solutions: np.ndarray) -> torch.Tensor:
        N = len(puzzles)
        sep = np.full((N, 1), self.sep_id)
        return torch.from_numpy(np.concatenate([puzzles, sep, solutions], axis=1).astype(np.int64))

    def extra(self) -> Dict[str, torch.Tensor]:
        n, b = self.size, self.box
        cell = torch.arange(self.cells)
        row, col = cell // n, cell % n
        box = (row // b) * b + col // b
        sep = torch.tensor([n])
        seg = torch.cat([torch.zeros(self.cells), torch.ones(1), 2 * torch.ones(self.cells)]).long()
        return {"row": torch.cat([row, sep, row]), "col": torch.cat([col, sep, col]),
                "box": torch.cat([box, sep, box]), "segment": seg}

    def train_batch(self, batch_size, gen):
        idx = torch.randint(0, len(self._x_train), (batch_size,), generator=gen)
        x0 = self._x_train[idx]
        return x0, self.answer_mask.expand_as(x0).clone()

    def eval_set(self, n):
        x0 = self._x_eval[:n]
        return x0, self.answer_mask.expand_as(x0).clone()

    def metrics(self, pred, x0, answer):
        puzzles = x0[:, : self.cells].numpy()
        sol = x0[:, self.cells + 1:].numpy()
        guess = pred[:, self.cells + 1:].numpy()
        out = {"cell_acc": core.cell_accuracy(guess, sol, puzzles),
               "puzzle_acc": core.puzzle_accuracy(guess, puzzles)}
        grades = grade_batch(puzzles)
        if len(np.unique(grades)) > 1:  # by difficulty grade, where the set mixes grades
            for g, name in enumerate(GRADES):
                rows = grades == g
                if rows.any():
                    out[f"cell_acc_{name}"] = core.cell_accuracy(guess[rows], sol[rows], puzzles[rows])
                    out[f"puzzle_acc_{name}"] = core.puzzle_accuracy(guess[rows], puzzles[rows])
                    out[f"n_{name}"] = float(rows.sum())
        return out

    def load_eval(self, path) -> int:
        """Held-out puzzles from a text file: one puzzle per line in the usual n²-character format
        ('0' or '.' blank), optionally followed by ``,`` and its solution; blank lines and lines
        starting with ``#`` are skipped, as is a first line naming CSV columns. A puzzle without a
        solution is solved here (the solver is exact); one with none or several is refused."""
        lines = Path(path).read_text().splitlines()
        puzzles, solutions = [], []
        for no, line in enumerate(lines, 1):
            line = line.strip()
            if not line or line.startswith("#") or (no == 1 and not any(ch.isdigit() for ch in line)):
                continue
            fields = [f.strip() for f in line.split(",")]
            try:
                puzzle = core.parse_grid(fields[0], self.size)
                solution = core.parse_grid(fields[1], self.size) if len(fields) > 1 and fields[1] else None
            except ValueError as exc:
                raise ValueError(f"{path}, line {no}: {exc}") from None
            if solution is None:
                if core.count_solutions(puzzle, limit=2) != 1:
                    raise ValueError(f"{path}, line {no}: the puzzle does not have exactly one solution; "
                                     f"give its solution after a comma")
                solution = core.solve(puzzle)
            elif not core.is_valid_solution(puzzle, solution):
                raise ValueError(f"{path}, line {no}: the given solution does not solve the puzzle")
            puzzles.append(puzzle)
            solutions.append(solution)
        if not puzzles:
            raise ValueError(f"{path}: no puzzles found (one {self.cells}-character puzzle per line)")
        puzzles, solutions = np.stack(puzzles), np.stack(solutions)
        self._parts["eval"] = (puzzles, solutions, self.encode(puzzles, solutions))
        return len(puzzles)

    def row_correct(self, pred, x0, answer):
        """A valid solution of its puzzle counts, as in ``puzzle_acc`` (not only the stored one)."""
        puzzles = x0[:, : self.cells].numpy()
        guess = pred[:, self.cells + 1:].numpy()
        return torch.tensor([core.is_valid_solution(p, g) for p, g in zip(puzzles, guess)])

    def easy_first(self, x0, pred, finalize_step):
        """Step vs candidate count of each blank cell (:func:`anyorder.analysis.easy_first.easy_first`)."""
        from ..analysis.easy_first import easy_first  # lazy: cycle (easy_first imports anyorder.tasks)

        return easy_first(self, x0, pred, finalize_step)

    def headline(self):
        return "puzzle_acc"

    def token_str(self, token: int) -> str:
        return {0: ".", self.sep_id: "|", self.mask_id: "_"}.get(token, str(token))

    def parse(self, s: str) -> torch.Tensor:
        """A puzzle string -> a prompt row with the answer masked (malformed input: ValueError)."""
        grid = core.parse_grid(s, self.size)
        x = torch.full((self.seq_len,), self.mask_id, dtype=torch.long)
        x[: self.cells] = torch.from_numpy(grid.astype(np.int64))
        x[self.cells] = self.sep_id
        return x

    def check_puzzle(self, s: str):
        """None if the puzzle string has exactly one solution, else a one-line note saying what is wrong."""
        count = core.count_solutions(core.parse_grid(s, self.size), limit=2)
        if count == 0:
            return "has no solution (its clues clash or cannot be completed): no output can be a valid grid"
        if count > 1:
            return "has several solutions: the output is one valid completion at best, not the only answer"
        return None

    def describe(self):
        return {**super().describe(), "size": self.size, "n_clues": self.n_clues,
                "n_train": self.n_train, "n_eval": len(self.eval_p) if "eval" in self._parts else self.n_eval}
