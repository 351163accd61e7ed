"""Sudoku core: grids, parsing, an exact solver, validity checks and accuracy metrics.

Pure Python + numpy (no torch), so data generation and checking do not depend on the
model stack. Puzzle generation and dataset building (on top of this solver) are in
:mod:`anyorder.tasks.sudoku_gen`.

A grid of side ``n = box * box`` (box 2 -> 4x4, box 3 -> 9x9) is a flat numpy ``int8``
array of shape ``(n * n,)`` in row-major order; 0 is a blank and 1..n are digits.
Batches are ``(N, n * n)`` arrays.
"""
from __future__ import annotations

import random
from functools import lru_cache
from typing import List, Optional

import numpy as np

SIZES = (4, 9)


# ----------------------------------------------------------------------------- helpers
def _check_size(size: int) -> int:
    if size not in SIZES:
        raise ValueError(f"sudoku size must be 4 (4x4) or 9 (9x9), got {size!r}")
    return int(size)


def _grid_size(grid: np.ndarray) -> int:
    """The side n of a flat grid (or of the rows of a batch), from its cell count."""
    ncell = grid.shape[-1]
    for n in SIZES:
        if ncell == n * n:
            return n
    raise ValueError(f"a grid must have 16 (4x4) or 81 (9x9) cells, got {ncell}")


def _as_grid(grid) -> np.ndarray:
    g = np.asarray(grid)
    if g.ndim != 1:
        raise ValueError(f"expected one flat grid of shape (n*n,), got shape {g.shape}")
    n = _grid_size(g)
    if g.size and (g.min() < 0 or g.max() > n):
        raise ValueError(f"cell values must be 0 (blank) or 1..{n} for a {n}x{n} sudoku")
    return g.astype(np.int8)


@lru_cache(maxsize=None)
def _tables(n: int):
    """Per-size lookup tables for the solver: row/col/box of each cell, popcounts."""
    box = int(round(n**0.5))
    cells = range(n * n)
    row_of = [c // n for c in cells]
    col_of = [c % n for c in cells]
    box_of = [(c // n) // box * box + (c % n) // box for c in cells]
    full = (1 << n) - 1
    popcount = [bin(m).count("1") for m in range(full + 1)]
    # The 3n units (rows, columns, boxes) as cell-index arrays, for vectorised checks.
    units = np.array(
        [[r * n + c for c in range(n)] for r in range(n)]
        + [[r * n + c for r in range(n)] for c in range(n)]
        + [[c for c in cells if box_of[c] == b] for b in range(n)],
        dtype=np.intp,
    )
    return row_of, col_of, box_of, full, popcount, units


# ----------------------------------------------------------------------------- parsing
def parse_grid(s: str, size: int) -> np.ndarray:
    """Parse ``size*size`` characters ('1'..'n', '0' or '.' = blank; whitespace ignored)."""
    n = _check_size(size)
    chars = "".join(s.split())
    allowed = f"digits 1-{n} and '0' or '.' for a blank"
    for pos, ch in enumerate(chars):
        if ch != "." and ch not in "0123456789":
            raise ValueError(
                f"invalid character {ch!r} at position {pos} (whitespace ignored); "
                f"allowed characters are {allowed}"
            )
    if len(chars) != n * n:
        raise ValueError(f"expected {n * n} cells for a {n}x{n} sudoku, got {len(chars)}")
    for pos, ch in enumerate(chars):
        if ch != "." and int(ch) > n:
            raise ValueError(
                f"digit {ch!r} at position {pos} is out of range for a {n}x{n} sudoku; "
                f"allowed characters are {allowed}"
            )
    return np.array([0 if ch == "." else int(ch) for ch in chars], dtype=np.int8)


def format_grid(grid) -> str:
    """Inverse of parse_grid: one character per cell, blanks written as '0'."""
    return "".join(str(int(v)) for v in _as_grid(grid))


# ----------------------------------------------------------------------------- solver
def _search(vals: List[int], empties: List[int], rows, cols, boxes, tab, limit: int,
            found: list, rand: Optional[random.Random]) -> int:
    """Count completions of ``vals`` (up to ``limit``) by MRV backtracking on bitmasks.

    ``rows/cols/boxes`` hold, per unit, a bitmask of the digits already placed (bit d-1
    for digit d). The first complete grid reached is appended to ``found``.
    """
    if not empties:
        if not found:
            found.append(vals[:])
        return 1
    row_of, col_of, box_of, full, popcount, _ = tab
    # MRV: branch on the empty cell with the fewest legal digits; a forced cell (one
    # candidate) is taken at once, and a cell with none proves this branch dead.
    best_i, best_m, best_k = -1, 0, 99
    for i, cell in enumerate(empties):
        m = full & ~(rows[row_of[cell]] | cols[col_of[cell]] | boxes[box_of[cell]])
        k = popcount[m]
        if k < best_k:
            if k == 0:
                return 0
            best_i, best_m, best_k = i, m, k
            if k == 1:
                break
    # Swap-remove the chosen cell; restored in the exact same position below.
    empties[best_i], empties[-1] = empties[-1], empties[best_i]
    cell = empties.pop()
    r, c, b = row_of[cell], col_of[cell], box_of[cell]
    bits = []
    m = best_m
    while m:
        low = m & -m
        bits.append(low)
        m ^= low
    if rand is not None:  # randomised digit order -> random full grids
        rand.shuffle(bits)
    total = 0
    for bit in bits:
        rows[r] |= bit
        cols[c] |= bit
        boxes[b] |= bit
        vals[cell] = bit.bit_length()
        total += _search(vals, empties, rows, cols, boxes, tab, limit - total, found, rand)
        rows[r] ^= bit
        cols[c] ^= bit
        boxes[b] ^= bit
        if total >= limit:
            break
    vals[cell] = 0
    empties.append(cell)
    empties[best_i], empties[-1] = empties[-1], empties[best_i]
    return total


def _run(vals: List[int], n: int, limit: int, rand: Optional[random.Random] = None):
    """Set up the unit masks for ``vals`` and search; returns (count, first solution)."""
    tab = _tables(n)
    row_of, col_of, box_of = tab[0], tab[1], tab[2]
    rows, cols, boxes = [0] * n, [0] * n, [0] * n
    empties = []
    for cell, v in enumerate(vals):
        if v == 0:
            empties.append(cell)
            continue
        bit = 1 << (v - 1)
        r, c, b = row_of[cell], col_of[cell], box_of[cell]
        if (rows[r] | cols[c] | boxes[b]) & bit:  # clashing clues: no solution at all
            return 0, None
        rows[r] |= bit
        cols[c] |= bit
        boxes[b] |= bit
    found: list = []
    count = _search(list(vals), empties, rows, cols, boxes, tab, limit, found, rand)
    return count, (found[0] if found else None)


def count_solutions(grid, limit: int = 2) -> int:
    """Number of solutions of ``grid``, counting stops at ``limit`` (returns min(true, limit))."""
    g = _as_grid(grid)
    if limit < 1:
        raise ValueError(f"limit must be >= 1, got {limit}")
    return _run(g.tolist(), _grid_size(g), limit)[0]


def solve(grid) -> Optional[np.ndarray]:
    """The solution of ``grid`` (the first one found if not unique), or None if unsolvable."""
    g = _as_grid(grid)
    sol = _run(g.tolist(), _grid_size(g), 1)[1]
    return None if sol is None else np.array(sol, dtype=np.int8)


def _valid_batch(puzzles: np.ndarray, preds: np.ndarray) -> np.ndarray:
    """Per row: ``pred`` is a complete valid grid agreeing with every clue of ``puzzle``."""
    n = _grid_size(preds)
    units = _tables(n)[5]
    # Every unit sorted must read 1..n: this rules out blanks, repeats and out-of-range.
    per_unit = np.sort(preds[:, units], axis=2)
    units_ok = (per_unit == np.arange(1, n + 1)).all(axis=(1, 2))
    clues_ok = ((puzzles == 0) | (puzzles == preds)).all(axis=1)
    return units_ok & clues_ok


def is_valid_solution(puzzle, candidate) -> bool:
    """True if ``candidate`` is a complete valid grid that agrees with every clue."""
    p = np.asarray(puzzle)
    c = np.asarray(candidate)
    if p.ndim != 1 or p.shape != c.shape:
        return False
    _grid_size(p)
    return bool(_valid_batch(p[None].astype(np.int64), c[None].astype(np.int64))[0])


def candidates_count(grid) -> np.ndarray:
    """Per cell, how many digits are still legal given the filled cells (0 for filled ones).

    Accepts one grid (n*n,) or a batch (N, n*n). An empty cell with no legal digit (a
    contradiction) also reads 0. Used for "easy first" analyses: cells with one
    candidate are the ones a human would fill first.
    """
    g = np.asarray(grid)
    n = _grid_size(g)
    box = int(round(n**0.5))
    flat = g.reshape(-1, n, n)  # (N, row, col)
    onehot = flat[..., None] == np.arange(1, n + 1)  # (N, row, col, digit)
    row_used = onehot.any(axis=2)  # (N, row, digit)
    col_used = onehot.any(axis=1)  # (N, col, digit)
    boxes = onehot.reshape(-1, box, box, box, box, n).any(axis=(2, 4))  # (N, br, bc, digit)
    box_used = np.repeat(np.repeat(boxes, box, axis=1), box, axis=2)  # (N, row, col, digit)
    used = row_used[:, :, None, :] | col_used[:, None, :, :] | box_used
    counts = n - used.sum(axis=-1)
    counts[flat != 0] = 0
    return counts.reshape(g.shape).astype(np.int8)


# ----------------------------------------------------------------------------- metrics
def cell_accuracy(pred, solution, puzzle=None) -> float:
    """Fraction of cells where ``pred`` equals ``solution``; only blank cells if ``puzzle``
    is given. NaN if there is no cell to score (e.g. puzzles without blanks)."""
    pred = np.asarray(pred)
    solution = np.asarray(solution)
    if pred.shape != solution.shape:
        raise ValueError(f"pred shape {pred.shape} != solution shape {solution.shape}")
    correct = pred == solution
    if puzzle is None:
        return float(correct.mean()) if correct.size else float("nan")
    blank = np.asarray(puzzle) == 0
    total = int(blank.sum())
    return float((correct & blank).sum() / total) if total else float("nan")


def puzzle_accuracy(pred, puzzles) -> float:
    """Fraction of predictions that are a valid completion of their puzzle (any valid
    completion counts; for uniquely solvable puzzles that is the solution)."""
    pred = np.atleast_2d(np.asarray(pred))
    puzzles = np.atleast_2d(np.asarray(puzzles))
    if pred.shape != puzzles.shape:
        raise ValueError(f"pred shape {pred.shape} != puzzles shape {puzzles.shape}")
    if len(pred) == 0:
        return float("nan")
    _grid_size(pred)
    return float(_valid_batch(puzzles.astype(np.int64), pred.astype(np.int64)).mean())
