"""Tests for anyorder.tasks.sudoku_core (parsing, solver, metrics) and sudoku_gen (generator,
symmetries, datasets)."""
import itertools

import numpy as np
import pytest

try:
    from anyorder.tasks import sudoku_core as S, sudoku_gen as G
except ImportError:  # package not installed: import from the src layout directly
    import pathlib
    import sys

    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "src"))
    from anyorder.tasks import sudoku_core as S, sudoku_gen as G

# Arto Inkala's 2012 "world's hardest sudoku" and its (unique) solution.
HARD = (
    "8........ ..36..... .7..9.2.. .5...7... ....457.. "
    "...1...3. ..1....68 ..85...1. .9....4.."
)
HARD_SOLUTION = (
    "812753649943682175675491283154237896369845721287169534521974368438526917796318452"
)
# A full 4x4 grid, and a puzzle from it with a blank "unique rectangle": rows 0 and 2
# columns 0-1 hold 1,2 / 2,1, which can be swapped, so exactly two solutions exist.
GRID4 = "1234341221434321"
TWO_SOLUTIONS4 = "0034341200434321"
OTHER4 = "2134341212434321"


def _valid_grid_brute(grid, n):
    box = int(round(n**0.5))
    g = np.asarray(grid).reshape(n, n)
    full = set(range(1, n + 1))
    units = [g[r] for r in range(n)] + [g[:, c] for c in range(n)]
    units += [g[r:r + box, c:c + box].ravel() for r in range(0, n, box) for c in range(0, n, box)]
    return all(set(u.tolist()) == full for u in units)


# ----------------------------------------------------------------------------- parsing
def test_parse_roundtrip_and_blanks():
    g = S.parse_grid(HARD, 9)
    assert g.dtype == np.int8 and g.shape == (81,)
    assert int((g > 0).sum()) == 21
    assert S.format_grid(g) == "".join(HARD.split()).replace(".", "0")
    assert np.array_equal(S.parse_grid(S.format_grid(g), 9), g)
    g4 = S.parse_grid("12.4 3..2\n2143\t4321", 4)
    assert g4.tolist() == [1, 2, 0, 4, 3, 0, 0, 2, 2, 1, 4, 3, 4, 3, 2, 1]


def test_parse_errors_say_what_is_wrong():
    with pytest.raises(ValueError) as e:
        S.parse_grid("1" * 80, 9)
    assert "expected 81 cells for a 9x9 sudoku, got 80" in str(e.value)
    with pytest.raises(ValueError) as e:
        S.parse_grid("123x" + "0" * 77, 9)
    msg = str(e.value)
    assert "'x'" in msg and "position 3" in msg and "allowed characters" in msg
    assert "1-9" in msg and "'.'" in msg
    with pytest.raises(ValueError) as e:
        S.parse_grid("1250" + "0" * 12, 4)
    msg = str(e.value)
    assert "'5'" in msg and "position 2" in msg and "out of range for a 4x4" in msg
    assert "1-4" in msg
    with pytest.raises(ValueError, match="expected 16 cells for a 4x4 sudoku, got 17"):
        S.parse_grid("0" * 17, 4)
    with pytest.raises(ValueError, match="must be 4 .* or 9"):
        S.parse_grid("0" * 25, 5)


# ----------------------------------------------------------------------------- solver
def test_solver_hard_puzzle_known_solution():
    p = S.parse_grid(HARD, 9)
    sol = S.solve(p)
    assert S.format_grid(sol) == HARD_SOLUTION
    assert S.count_solutions(p, limit=2) == 1
    assert S.is_valid_solution(p, sol)
    assert _valid_grid_brute(sol, 9)


def test_count_solutions_two_and_limits():
    p = S.parse_grid(TWO_SOLUTIONS4, 4)
    assert S.count_solutions(p) == 2
    assert S.count_solutions(p, limit=1) == 1
    assert S.count_solutions(p, limit=10) == 2
    assert S.format_grid(S.solve(p)) in (GRID4, OTHER4)
    # All 4x4 grids: 288 is the known number; 9x9 counting stops at the limit.
    assert S.count_solutions(np.zeros(16, np.int8), limit=1000) == 288
    assert S.count_solutions(np.zeros(81, np.int8), limit=5) == 5
    # A full grid is its own unique solution.
    assert S.count_solutions(S.parse_grid(GRID4, 4)) == 1


def test_clashing_clues_have_no_solution():
    p = np.zeros(81, np.int8)
    p[0] = p[5] = 7  # same digit twice in row 0
    assert S.count_solutions(p) == 0
    assert S.solve(p) is None
    with pytest.raises(ValueError, match="0 \\(blank\\) or 1..4"):
        S.count_solutions(np.full(16, 5, np.int8))


def test_is_valid_solution():
    p = S.parse_grid(HARD, 9)
    sol = S.parse_grid(HARD_SOLUTION, 9)
    assert S.is_valid_solution(p, sol)
    broken = sol.copy()
    broken[40] = broken[40] % 9 + 1
    assert not S.is_valid_solution(p, broken)
    incomplete = sol.copy()
    incomplete[3] = 0
    assert not S.is_valid_solution(p, incomplete)
    # A valid grid that contradicts a clue: relabel digits 8 <-> 1.
    swapped = sol.copy()
    swapped[sol == 8], swapped[sol == 1] = 1, 8
    assert _valid_grid_brute(swapped, 9)
    assert not S.is_valid_solution(p, swapped)
    assert not S.is_valid_solution(p, sol[:80])
    # Any valid completion counts, not only a stored one.
    two = S.parse_grid(TWO_SOLUTIONS4, 4)
    assert S.is_valid_solution(two, S.parse_grid(GRID4, 4))
    assert S.is_valid_solution(two, S.parse_grid(OTHER4, 4))


def test_candidates_count_matches_brute_force():
    p = S.parse_grid(HARD, 9)
    got = S.candidates_count(p)
    g = p.reshape(9, 9)
    for cell in range(81):
        r, c = divmod(cell, 9)
        if g[r, c]:
            assert got[cell] == 0
            continue
        used = set(g[r].tolist()) | set(g[:, c].tolist())
        used |= set(g[r // 3 * 3:r // 3 * 3 + 3, c // 3 * 3:c // 3 * 3 + 3].ravel().tolist())
        assert got[cell] == len(set(range(1, 10)) - used)
    assert got.shape == (81,)
    assert got.sum() > 0
    batch = S.candidates_count(np.stack([p, np.zeros(81, np.int8)]))
    assert batch.shape == (2, 81)
    assert np.array_equal(batch[0], got) and (batch[1] == 9).all()


# ----------------------------------------------------------------------------- generator
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_generated_9x9_puzzles_unique_with_target_clues(seed):
    rng = np.random.default_rng(seed)
    for _ in range(3):
        p, s = G.generate_puzzle(9, 30, rng)
        assert p.dtype == np.int8 and p.shape == (81,)
        assert int((p > 0).sum()) == 30
        assert S.count_solutions(p, limit=2) == 1
        assert S.is_valid_solution(p, s) and _valid_grid_brute(s, 9)
        assert np.array_equal(S.solve(p), s)


def test_generator_stops_at_minimal_puzzle():
    rng = np.random.default_rng(5)
    clue_counts = []
    for size in (4, 9):
        p, s = G.generate_puzzle(size, 0, rng)
        assert S.count_solutions(p) == 1 and S.is_valid_solution(p, s)
        # Minimal: removing any remaining clue makes the solution non-unique.
        for cell in np.flatnonzero(p):
            q = p.copy()
            q[cell] = 0
            assert S.count_solutions(q) == 2
        clue_counts.append(int((p > 0).sum()))
    assert clue_counts[0] >= 4
    assert 17 <= clue_counts[1] <= 30
    # The 4x4 generator reaches the true minimum of 4 clues regularly.
    got = [int((G.generate_puzzle(4, 0, rng)[0] > 0).sum()) for _ in range(50)]
    assert min(got) == 4 and max(got) <= 6


# ----------------------------------------------------------------------------- symmetries
def test_symmetries_preserve_uniqueness_and_validity():
    rng = np.random.default_rng(0)
    bases = [G.generate_puzzle(9, 26, rng) for _ in range(3)]
    bp = np.stack([b[0] for b in bases])
    bs = np.stack([b[1] for b in bases])
    tp, ts = G.random_symmetries(bp, bs, 50, rng)
    assert tp.shape == (50, 81) and ts.shape == (50, 81) and tp.dtype == np.int8
    assert len(np.unique(tp, axis=0)) == 50
    assert ((tp > 0).sum(axis=1) == 26).all()
    for p, s in zip(tp, ts):
        assert S.count_solutions(p, limit=2) == 1
        assert S.is_valid_solution(p, s) and _valid_grid_brute(s, 9)
    # The orbit of a 4x4 grid under these symmetries reaches many of the 288 grids.
    g = S.parse_grid(GRID4, 4)[None]
    tp, ts = G.random_symmetries(g, g, 2000, rng)
    assert np.array_equal(tp, ts)
    assert all(_valid_grid_brute(x, 4) for x in tp)
    assert len(np.unique(tp, axis=0)) > 50


def test_symmetries_include_transpose_and_relabel():
    # A grid whose first row is 1..n: every output's first row or column tells us which
    # operations happened; check both relabelled and transposed outputs occur.
    g = S.parse_grid(GRID4, 4)[None]
    tp, _ = G.random_symmetries(g, g, 500, np.random.default_rng(1))
    grids = tp.reshape(-1, 4, 4)
    assert len({tuple(x[0]) for x in grids}) > 12  # many digit labellings of row 0
    # Clues only in row 0: an output keeps them in one row, or in one column if transposed.
    row0 = g.copy()
    row0[0, 4:] = 0
    tp, _ = G.random_symmetries(row0, g, 400, np.random.default_rng(2))
    mask = tp.reshape(-1, 4, 4) > 0
    in_one_row = (mask.sum(axis=2) == 4).any(axis=1)
    in_one_col = (mask.sum(axis=1) == 4).any(axis=1)
    assert (in_one_row ^ in_one_col).all()
    assert 120 < in_one_col.sum() < 280  # transposed about half the time
    with pytest.raises(ValueError):
        G.random_symmetries(g, g[:, :15], 3, np.random.default_rng(0))


# ----------------------------------------------------------------------------- datasets
def test_dataset_deterministic_distinct_and_unique():
    p1, s1 = G.generate_dataset(9, 2000, n_clues=30, seed=3, n_base=8)
    p2, s2 = G.generate_dataset(9, 2000, n_clues=30, seed=3, n_base=8)
    assert np.array_equal(p1, p2) and np.array_equal(s1, s2)
    p3, _ = G.generate_dataset(9, 2000, n_clues=30, seed=4, n_base=8)
    assert not np.array_equal(p1, p3)
    assert p1.shape == (2000, 81) and p1.dtype == np.int8 and s1.dtype == np.int8
    assert len(np.unique(p1, axis=0)) == 2000
    assert ((p1 > 0).sum(axis=1) == 30).all()
    assert S.puzzle_accuracy(s1, p1) == 1.0  # every solution valid for its puzzle
    for i in np.random.default_rng(0).choice(2000, 30, replace=False):
        assert S.count_solutions(p1[i]) == 1


def test_4x4_dataset_few_hundred():
    p, s = G.generate_dataset(4, 500, n_clues=6, seed=0)
    assert p.shape == (500, 16)
    assert len(np.unique(p, axis=0)) == 500
    assert ((p > 0).sum(axis=1) == 6).all()
    assert all(S.count_solutions(x, limit=2) == 1 for x in p)
    assert S.puzzle_accuracy(s, p) == 1.0


def test_4x4_exact_sizes_of_finite_spaces():
    # 15 clues = a full grid minus one cell: exactly 288 * 16 = 4608 distinct puzzles.
    p, _ = G.generate_dataset(4, 4608, n_clues=15, seed=0)
    assert len(np.unique(p, axis=0)) == 4608
    with pytest.raises(ValueError) as e:
        G.generate_dataset(4, 4609, n_clues=15, seed=0)
    assert "found only 4608" in str(e.value) and "4609" in str(e.value)
    with pytest.raises(ValueError, match="found only 288"):
        G.generate_dataset(4, 300, n_clues=16, seed=0)


def test_impossible_settings_raise():
    with pytest.raises(ValueError, match="at least 17 clues"):
        G.generate_dataset(9, 10, n_clues=16, seed=0)
    with pytest.raises(ValueError, match="at least 4 clues"):
        G.generate_dataset(4, 10, n_clues=3, seed=0)
    with pytest.raises(ValueError, match="exceeds the 81 cells"):
        G.generate_dataset(9, 10, n_clues=82, seed=0)
    with pytest.raises(ValueError, match="exceeds the 16 cells"):
        G.generate_dataset(4, 10, n_clues=17, seed=0)
    with pytest.raises(ValueError, match="count must be >= 1"):
        G.generate_dataset(4, 0, n_clues=8, seed=0)
    with pytest.raises(ValueError, match="must be 4 .* or 9"):
        G.generate_dataset(16, 10, n_clues=100, seed=0)


@pytest.mark.slow
def test_unreachable_clue_count_raises_after_bounded_tries():
    # 18 clues is feasible in principle but greedy removal practically never gets there.
    with pytest.raises(ValueError, match="could not generate a 9x9 puzzle with 18 clues"):
        G.generate_dataset(9, 1, n_clues=18, seed=0)


def test_bench_generation_small():
    r = G.bench_generation(size=4, count=300, n_clues=6, seed=0, verify_sample=100)
    assert set(r) == {"size", "count", "seconds", "puzzles_per_s", "n_base",
                      "verified_unique_sample", "verify_seconds"}
    assert r["count"] == 300 and r["verified_unique_sample"] == 100
    assert r["seconds"] > 0 and r["puzzles_per_s"] > 0


# ----------------------------------------------------------------------------- metrics
def test_cell_and_puzzle_accuracy():
    p, s = G.generate_dataset(4, 20, n_clues=8, seed=1)
    assert S.cell_accuracy(s, s) == 1.0
    assert S.cell_accuracy(s, s, puzzle=p) == 1.0
    # Predicting the puzzle itself (blanks = 0): every clue right, every blank wrong.
    assert S.cell_accuracy(p, s) == pytest.approx(8 / 16)
    assert S.cell_accuracy(p, s, puzzle=p) == 0.0
    # One wrong blank cell in one puzzle: 1 of 20 * 8 blank cells wrong.
    pred = s.copy()
    blank = int(np.flatnonzero(p[0] == 0)[0])
    pred[0, blank] = pred[0, blank] % 4 + 1
    assert S.cell_accuracy(pred, s, puzzle=p) == pytest.approx(1 - 1 / 160)
    assert S.puzzle_accuracy(pred, p) == pytest.approx(19 / 20)
    assert S.puzzle_accuracy(p, p) == 0.0
    # Any valid completion counts: the other solution of a two-solution puzzle.
    two = S.parse_grid(TWO_SOLUTIONS4, 4)
    other = S.parse_grid(OTHER4, 4)
    assert S.puzzle_accuracy(other[None], two[None]) == 1.0
    assert S.cell_accuracy(other, S.parse_grid(GRID4, 4), puzzle=two) == 0.0
    assert np.isnan(S.cell_accuracy(s, s, puzzle=s))  # no blanks to score


def test_count_solutions_matches_brute_force_4x4():
    # Cross-check the solver against brute force on a small 4x4 puzzle: enumerate every
    # filling of the blanks and count the valid ones.
    p = S.parse_grid("0034 3002 0043 4301", 4)
    blanks = np.flatnonzero(p == 0)
    brute = 0
    for digits in itertools.product(range(1, 5), repeat=len(blanks)):
        g = p.copy()
        g[blanks] = digits
        brute += _valid_grid_brute(g, 4)
    assert S.count_solutions(p, limit=10**6) == brute
