"""Sudoku generation: uniquely solvable puzzles, symmetric variants and datasets.

Difficulty is controlled by the number of clues: the generator removes clues from a
random full grid while the puzzle stays uniquely solvable, so fewer clues means a
harder puzzle (more cells to infer, longer chains of deduction). A dataset is random
symmetric variants of a few such base puzzles, every base checked by the solver of
:mod:`anyorder.tasks.sudoku_core` (grids are flat ``int8`` arrays as there).
"""
from __future__ import annotations

import random
import sys
import time
from typing import List, Optional, Tuple

import numpy as np
from tqdm import tqdm

from .sudoku_core import _check_size, _grid_size, _run, count_solutions, is_valid_solution

# Smallest clue count for which a uniquely solvable puzzle exists: 4 for 4x4 and 17 for
# 9x9 (McGuire et al. 2012). Requests below these can never succeed.
MIN_CLUES = {4: 4, 9: 17}
# Default number of base puzzles a dataset is expanded from by symmetries. A 9x9 base is
# costly to generate in pure Python (a solver search per removed clue), a symmetric
# variant is cheap, and each base has ~10^12 of them: 64 bases give plenty of puzzles.
DEFAULT_N_BASE = {4: 256, 9: 64}


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
    for _ in tqdm(range(k), desc=f"{n}x{n} base puzzles", unit="puzzle", delay=2, file=sys.stderr, leave=False):
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
    # in ~0.3%, and 20 or fewer practically never; 1000 tries bound the time one base takes.
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
    # long requests (a large 4x4 set nears the number of distinct puzzles) show progress on stderr
    progress = tqdm(total=count, desc=f"{n}x{n} sudoku puzzles", unit="puzzle", delay=2, file=sys.stderr, leave=False)
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
        progress.update(min(len(out_p), count) - progress.n)
        progress.set_postfix(rounds_without_new=stale + (added <= 0), refresh=False)
        if added > 0:
            stale = 0
            continue
        stale += 1
        if stale >= max_stale:
            progress.close()
            raise ValueError(
                f"asked for {count} distinct {n}x{n} puzzles with {n_clues} clues but found "
                f"only {len(out_p)} after {stale} rounds without a new one; fewer distinct "
                f"puzzles exist than requested"
            )
        if stale >= 2:  # variants of the current bases are exhausted: add new bases
            more_p, more_s = _generate_bases(n, n_base, n_clues, rng, max_tries)
            base_p = np.concatenate([base_p, more_p])
            base_s = np.concatenate([base_s, more_s])
    progress.close()
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


if __name__ == "__main__":
    print(bench_generation())
