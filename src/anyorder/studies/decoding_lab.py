"""The decoding lab's Sudoku table: one trained model, every lab decoder, one command.

    python -m anyorder.studies.decoding_lab runs/demo/random [--n 500] [--json] [--quick]

Decodes the run's first ``n`` held-out puzzles with each decoder of :data:`LAB_DECODERS` and
prints (decoder, puzzle_acc, cell_acc, NFE, AFP, Kendall τ, seconds) as a Markdown table, or
JSON rows with ``--json``. The rows answer: does ``threshold`` (confidence-threshold parallel
commits, as in Fast-dLLM: Wu et al., 2025, arXiv 2505.22618) reach AFP >= 3 within 1 point of
one-token-per-step ``margin``; does ``edit`` win back what an over-parallel draft (``top_prob``
k=8 / k=16) loses; how do remask, ancestral, random_init and beam compare (beam next to the
plain k=4 it replaces). The run directory is only read.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Dict, List, Optional

from ..analysis.table import format_table
from ..experiment import evaluate, load_run

LAB_DECODERS: List[Dict] = [
    {"name": "margin"},
    {"name": "threshold", "tau": 0.9},
    {"name": "threshold", "tau": 0.99},
    {"name": "threshold", "tau": 0.999},
    {"name": "top_prob", "k": 8},
    {"name": "edit", "k": 8},
    {"name": "edit", "k": 8, "edit_groups": 4},
    {"name": "top_prob", "k": 16},
    {"name": "edit", "k": 16},
    {"name": "remask"},
    {"name": "ancestral"},
    {"name": "random_init", "ratio": 0.25, "fill_tokens": [1, 2, 3, 4]},
    {"name": "top_prob", "k": 4},
    {"name": "beam", "k": 4},
]
QUICK = [{"name": "margin"}, {"name": "threshold", "tau": 0.99}, {"name": "top_prob", "k": 8},
         {"name": "edit", "k": 8, "edit_groups": 4}]


def decoding_lab(run_dir: str, n: int = 500, decoders: Optional[List[Dict]] = None, log=None) -> List[Dict]:
    """One row per decoder: the task metrics, NFE, AFP, Kendall τ and wall seconds."""
    exp = load_run(run_dir)
    rows = []
    for spec in decoders or LAB_DECODERS:
        t0 = time.perf_counter()
        res = evaluate(exp, dict(spec), n=n)
        row = {"decoder": spec, "puzzle_acc": res.get("puzzle_acc"), "cell_acc": res.get("cell_acc"),
               "nfe": res["nfe"], "afp": res["afp"], "kendall_tau": res["kendall_tau"],
               "seconds": round(time.perf_counter() - t0, 1)}
        rows.append(row)
        if log:
            log(row)
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m anyorder.studies.decoding_lab", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir")
    p.add_argument("--n", type=int, default=500, help="held-out puzzles (default 500)")
    p.add_argument("--json", action="store_true", help="print JSON rows instead of a Markdown table")
    p.add_argument("--quick", action="store_true", help="four decoders only")
    args = p.parse_args(argv)
    rows = decoding_lab(args.run_dir, args.n, QUICK if args.quick else None,
                        log=lambda r: print(json.dumps(r), file=sys.stderr, flush=True))
    if args.json:
        print(json.dumps(rows, indent=1))
    else:
        print(format_table(rows, columns=["decoder", "puzzle_acc", "cell_acc", "nfe", "afp", "kendall_tau", "seconds"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
