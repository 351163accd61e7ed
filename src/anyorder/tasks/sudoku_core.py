"""Sudoku core: parsing, an exact solver, a puzzle generator and dataset building.

Pure Python + numpy (no torch), so data generation and checking do not depend on the
model stack.

A grid of side ``n = box * box`` (box 2 -> 4x4, box 3 -> 9x9) is a flat numpy ``int8``
array of shape ``(n * n,)`` in row-major order; 0 is a blank and 1..n are digits.
Batches are ``(N, n * n)`` arrays.

Difficulty is controlled by the number of clues: the generator removes clues from a
random full grid while the puzzle stays uniquely solvable, so fewer clues means a
harder puzzle (more cells to infer, longer chains of deduction).
"""
from __future__ import annotations

import random
import time
from functools import lru_cache
from typing import List, Optional, Tuple

import numpy as np

SIZES = (4, 9)
# Smallest clue count for which a uniquely solvable puzzle exists: 4 for 4x4 and 17 for
# 9x9 (McGuire et al. 2012). Requests below these can never succeed.
MIN_CLUES = {4: 4, 9: 17}
# Default number of base puzzles a dataset is expanded from by symmetries. Generating a
# 9x9 base costs tens of milliseconds in pure Python; each base has ~10^12 symmetric
# variants, so 64 bases give plenty of distinct puzzles quickly.
DEFAULT_N_BASE = {4: 256, 9: 64}


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


# ----------------------------------------------------------------------------- generator
def _random_full_grid(n: int, rand: random.Random) -> List[int]:
    # Randomised backtracking on the empty grid: MRV with a shuffled digit order.
    return _run([0] * (n * n), n, 1, rand)[1]


def generate_puzzle(size: int, n_clues_target: int, rng: np.random.Generator
                    ) -> Tuple[np.ndarray, np.ndarray]:
    """A uniquely solvable puzzle and its solution.

    ``n_clues_target`` is the difficulty knob: fewer clues = harder. Starting from a
    random full grid, clues are removed in random order, each removal kept only if the
    puzzle stays uniquely solvable, until ``n_clues_target`` clues remain or no clue can
    be removed (the puzzle is then minimal and has more clues than asked for - check
    ``(puzzle > 0).sum()``). In practice this greedy removal reaches 4 clues on 4x4 (the
    true minimum) in a fair share of tries, but on 9x9 stops at about 22-25 clues; 17 is
    the known minimum for 9x9 and needs far more elaborate searches.
    """
    n = _check_size(size)
    rand = random.Random(int(rng.integers(2**63)))
    solution = _random_full_grid(n, rand)
    puzzle = solution[:]
    clues = n * n
    for cell in rng.permutation(n * n).tolist():
        if clues <= n_clues_target:
            break
        keep = puzzle[cell]
        puzzle[cell] = 0
        # The puzzle was unique with ``keep`` here, so it stays unique iff no other
        # digit at this cell leads to a solution: try each alternative, stop at the first.
        for d in range(1, n + 1):
            if d != keep:
                puzzle[cell] = d
                if _run(puzzle, n, 1)[0]:
                    break
        else:
            puzzle[cell] = 0
            clues -= 1
            continue
        puzzle[cell] = keep  # removal would allow another solution: put the clue back
    return np.array(puzzle, dtype=np.int8), np.array(solution, dtype=np.int8)


# ----------------------------------------------------------------------------- symmetries
def _block_perms(count: int, box: int, rng: np.random.Generator) -> np.ndarray:
    """(count, n) random line permutations that keep the band structure.

    Output line ``B*box + j`` takes input line ``outer[B]*box + inner[B, j]``: a random
    order of bands and an independent random order of lines inside each band.
    """
    outer = np.argsort(rng.random((count, box)), axis=1)
    inner = np.argsort(rng.random((count, box, box)), axis=2)
    return (outer[:, :, None] * box + inner).reshape(count, box * box)


def random_symmetries(puzzles: np.ndarray, solutions: np.ndarray, count: int,
                      rng: np.random.Generator) -> Tuple[np.ndarray, np.ndarray]:
    """``count`` random symmetric variants of the given (puzzle, solution) pairs.

    Each output picks a base (bases used in equal shares, random order) and applies a
    random digit relabelling, band permutation, row permutation within each band, stack
    permutation, column permutation within each stack and (with probability 1/2) a
    transpose. These all map valid grids to valid grids bijectively, so a unique puzzle
    stays unique and the transformed solution is its solution. Vectorised over the batch.
    """
    puzzles = np.asarray(puzzles)
    solutions = np.asarray(solutions)
    if puzzles.ndim != 2 or puzzles.shape != solutions.shape or len(puzzles) == 0:
        raise ValueError(f"need matching non-empty (N, n*n) batches, got shapes "
                         f"{puzzles.shape} and {solutions.shape}")
    n = _grid_size(puzzles)
    box = int(round(n**0.5))
    base = rng.permutation(np.arange(count) % len(puzzles))
    row_perm = _block_perms(count, box, rng)
    col_perm = _block_perms(count, box, rng)
    # src[k, r, c]: the input cell that output cell (r, c) of variant k copies.
    src = row_perm[:, :, None] * n + col_perm[:, None, :]
    transpose = rng.random(count) < 0.5
    src = np.where(transpose[:, None, None], src.transpose(0, 2, 1), src).reshape(count, n * n)
    # Digit relabelling as a lookup table with 0 (blank) fixed: relabel[k, old] = new.
    relabel = np.zeros((count, n + 1), dtype=np.int8)
    relabel[:, 1:] = np.argsort(rng.random((count, n)), axis=1) + 1
    rows = np.arange(count)[:, None]

    def apply(grids: np.ndarray) -> np.ndarray:
        moved = grids[base[:, None], src]
        return relabel[rows, moved.astype(np.intp)]

    return apply(puzzles), apply(solutions)


# ----------------------------------------------------------------------------- datasets
def _first_unique_rows(a: np.ndarray) -> np.ndarray:
    """Indices of the first occurrence of each distinct row, in their original order."""
    _, idx = np.unique(a, axis=0, return_index=True)
    return np.sort(idx)


def _generate_bases(n: int, k: int, n_clues: int, rng: np.random.Generator,
                    max_tries: int) -> Tuple[np.ndarray, np.ndarray]:
    """``k`` base puzzles with exactly ``n_clues`` clues, each checked to be unique."""
    puzzles, solutions = [], []
    for _ in range(k):
        lowest = n * n
        for _ in range(max_tries):
            p, s = generate_puzzle(n, n_clues, rng)
            got = int((p > 0).sum())
            lowest = min(lowest, got)
            if got == n_clues:
                break
        else:
            raise ValueError(
                f"could not generate a {n}x{n} puzzle with {n_clues} clues in {max_tries} "
                f"tries (greedy clue removal got down to {lowest} at best); it rarely goes "
                f"below ~22-24 clues on 9x9, so ask for more clues"
            )
        if count_solutions(p, limit=2) != 1 or not is_valid_solution(p, s):
            raise RuntimeError("generator produced a puzzle without a unique solution")
        puzzles.append(p)
        solutions.append(s)
    return np.stack(puzzles), np.stack(solutions)


def generate_dataset(size: int, count: int, n_clues: int, seed: int,
                     n_base: Optional[int] = None) -> Tuple[np.ndarray, np.ndarray]:
    """``count`` distinct uniquely solvable puzzles with exactly ``n_clues`` clues.

    ``n_base`` base puzzles come from generate_puzzle (each checked with
    count_solutions == 1); the dataset is random symmetric variants of them, with
    duplicate puzzles dropped and topped up with fresh variants (and fresh bases once the
    variants stop giving new puzzles). Deterministic given ``seed``. Returns int8 arrays
    (puzzles, solutions) of shape (count, n*n).

    Raises ValueError for impossible requests: n_clues outside [minimum, n*n], or more
    distinct puzzles than can be found (4x4 has only finitely many - e.g. 288 full grids).
    """
    n = _check_size(size)
    if count < 1:
        raise ValueError(f"count must be >= 1, got {count}")
    if n_clues > n * n:
        raise ValueError(f"n_clues={n_clues} exceeds the {n * n} cells of a {n}x{n} sudoku")
    if n_clues < MIN_CLUES[n]:
        raise ValueError(
            f"n_clues={n_clues} is infeasible: a {n}x{n} sudoku needs at least "
            f"{MIN_CLUES[n]} clues to have a unique solution"
        )
    if n_base is None:
        n_base = min(count, DEFAULT_N_BASE[n])
    if n_base < 1:
        raise ValueError(f"n_base must be >= 1, got {n_base}")
    rng = np.random.default_rng(seed)
    # Tries per base before giving up on reaching exactly n_clues. 9x9 greedy removal
    # hits 22 clues in ~3.5% of tries (one base needed 202 tries in a run of 64), 21
    # in ~0.3%, and 20 or fewer practically never; 1000 tries cost ~15 s on 9x9.
    max_tries = 1000
    base_p, base_s = _generate_bases(n, n_base, n_clues, rng, max_tries)

    out_p = np.zeros((0, n * n), dtype=np.int8)
    out_s = np.zeros((0, n * n), dtype=np.int8)
    # Give up after this many rounds in a row that found nothing new: then the space of
    # distinct puzzles is exhausted (in practice only for 4x4). A stale round draws up to
    # 16x as many variants as distinct puzzles found so far and, from the second one on,
    # also brings new bases, so the last few missing puzzles of a nearly exhausted space
    # are still found.
    stale, max_stale = 0, 10
    while len(out_p) < count:
        need = count - len(out_p)
        draw = need + max(need // 50, 256)  # small margin covers the rare duplicates
        if stale:
            draw = max(draw, min(len(out_p) << min(stale, 4), 1 << 19))
        p, s = random_symmetries(base_p, base_s, draw, rng)
        all_p = np.concatenate([out_p, p])
        keep = _first_unique_rows(all_p)
        added = len(keep) - len(out_p)
        out_p, out_s = all_p[keep], np.concatenate([out_s, s])[keep]
        if added > 0:
            stale = 0
            continue
        stale += 1
        if stale >= max_stale:
            raise ValueError(
                f"asked for {count} distinct {n}x{n} puzzles with {n_clues} clues but found "
                f"only {len(out_p)} after {stale} rounds without a new one; fewer distinct "
                f"puzzles exist than requested"
            )
        if stale >= 2:  # variants of the current bases are exhausted: add new bases
            more_p, more_s = _generate_bases(n, n_base, n_clues, rng, max_tries)
            base_p = np.concatenate([base_p, more_p])
            base_s = np.concatenate([base_s, more_s])
    return out_p[:count], out_s[:count]


def bench_generation(size: int = 9, count: int = 100_000, n_clues: int = 30, seed: int = 0,
                     verify_sample: int = 1000) -> dict:
    """Time generate_dataset and re-check a random sample of outputs for uniqueness."""
    t0 = time.perf_counter()
    puzzles, solutions = generate_dataset(size, count, n_clues, seed)
    seconds = time.perf_counter() - t0
    n_base = min(count, DEFAULT_N_BASE[size])
    t1 = time.perf_counter()
    rng = np.random.default_rng(seed + 1)
    sample = rng.choice(len(puzzles), size=min(verify_sample, len(puzzles)), replace=False)
    verified = sum(
        count_solutions(puzzles[i], limit=2) == 1 and is_valid_solution(puzzles[i], solutions[i])
        for i in sample
    )
    return {
        "size": size,
        "count": len(puzzles),
        "seconds": seconds,
        "puzzles_per_s": len(puzzles) / seconds,
        "n_base": n_base,
        "verified_unique_sample": int(verified),
        "verify_seconds": time.perf_counter() - t1,
    }


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


if __name__ == "__main__":
    print(bench_generation())
