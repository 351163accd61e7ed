"""The factorisation gap: what committing several tokens in one step loses.

From "Why mask diffusion does not work".

A step that commits a set S of masked positions samples each from the model's *marginal*
q_i, i.e. from the product Π_{i∈S} q_i, while the data follow the joint p over S. The gap is

    KL(p || Π_i q_i) = Σ_x p(x) log( p(x) / Π_i q_i(x_i) ).

- The A/B toy (:mod:`anyorder.tasks.toy`): given ``_ _ C D _`` the joint over the first two positions is enumerable from
  the counts 34/21/35/10. With the data's own marginals (0.55, 0.69) as q, the gap is the mutual
  information of the pair, the part that no per-position predictor can remove; with a trained
  model's marginals it adds the model's marginal errors.
- Sudoku: a puzzle has one solution, so given the puzzle and correct committed cells the true
  joint over any set S is a point mass on the solution, and the gap collapses to
  KL(δ_sol || Π q_i) = −Σ_{i∈S} log q_i(sol_i), the summed per-cell cross-entropy (a point
  mass has no mutual information: what is left is only the marginals' error). It is reported per
  step size |S|, on the steps whose state before the step is still consistent with the solution
  (after a wrong commit the conditional joint is empty).
"""
from __future__ import annotations

import math
from collections import defaultdict
from typing import Dict, Mapping, Optional, Sequence, Tuple

import torch

from ..decoding.forward import uncached_forward
from ..tasks.toy import COUNTS, C, D


def kl_joint_vs_product(joint: Mapping[Tuple[int, ...], float], marginals: Sequence) -> float:
    """KL(joint || Π marginals) in nats. ``joint`` maps token tuples to probabilities (zero
    entries may be left out); ``marginals[i][tok]`` is position i's probability of ``tok``."""
    total = 0.0
    for toks, p in joint.items():
        if p <= 0:
            continue
        q = 1.0
        for i, t in enumerate(toks):
            q *= float(marginals[i][t])
        if q <= 0:
            return math.inf
        total += p * math.log(p / q)
    return total


# ----------------------------------------------------------------------------- the toy
def toy_joint() -> Dict[Tuple[int, int], float]:
    """P(first, second | C D) from the toy's counts."""
    n = sum(COUNTS.values())
    return {ab: c / n for ab, c in COUNTS.items()}


def toy_data_marginals() -> Tuple[Dict[int, float], Dict[int, float]]:
    first: Dict[int, float] = defaultdict(float)
    second: Dict[int, float] = defaultdict(float)
    for (a, b), p in toy_joint().items():
        first[a] += p
        second[b] += p
    return dict(first), dict(second)


def toy_gap(marginals: Optional[Sequence] = None) -> float:
    """KL(true joint || product of ``marginals``) for the toy's first two positions; the data's
    own marginals by default (= the pair's mutual information)."""
    return kl_joint_vs_product(toy_joint(), marginals if marginals is not None else toy_data_marginals())


@torch.no_grad()
def toy_model_marginals(model, mask_id: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """The model's full-vocabulary marginals at positions 0 and 1 given ``_ _ C D _``."""
    q = torch.tensor([[mask_id, mask_id, C, D, mask_id]])
    p = torch.softmax(model(q).double(), -1)[0]
    return p[0], p[1]


# ----------------------------------------------------------------------------- Sudoku
@torch.no_grad()
def sudoku_gap(model, order, task, x0: torch.Tensor, answer: torch.Tensor, pred: torch.Tensor,
               finalize_step: torch.Tensor, batch_size: int = 256) -> Dict[int, Dict[str, float]]:
    """Per step size k: over the (row, step) pairs that committed k answer cells from a state
    consistent with the solution, the mean gap −Σ log q_i(sol_i) per step and per cell.

    The state before step t is rebuilt from the trace (cells finalised before t visible with
    their decoded values), exact for decoders that never re-mask. ``x0``'s answer is the
    puzzle's unique solution (the generator verified uniqueness with the solver).
    """
    answer = answer.bool()
    mask_id = task.mask_id
    extra = task.extra()
    T = int(finalize_step[answer].max()) + 1
    acc: Dict[int, Dict[str, float]] = defaultdict(lambda: {"steps": 0, "consistent_steps": 0, "gap": 0.0,
                                                             "wrong_commits": 0})
    for i in range(0, len(x0), batch_size):
        sl = slice(i, i + batch_size)
        xb, ab, pb, fb = x0[sl], answer[sl], pred[sl], finalize_step[sl]
        layout = order.layout(ab)
        forward = uncached_forward(model, order, layout, extra)
        for t in range(T):
            commit = ab & (fb == t)
            rows = commit.any(-1)
            if not rows.any():
                continue
            masked = ab & (fb >= t)
            state = torch.where(masked, torch.full_like(pb, mask_id), pb)
            consistent = ((state == xb) | masked).all(-1)
            logq = torch.log_softmax(forward(state, masked).double(), -1)
            nll = -logq.gather(-1, xb.unsqueeze(-1)).squeeze(-1)          # −log q_i(sol_i)
            for b in torch.nonzero(rows).flatten().tolist():
                c = commit[b]
                a = acc[int(c.sum())]
                a["steps"] += 1
                a["wrong_commits"] += int((pb[b][c] != xb[b][c]).sum())
                if consistent[b]:
                    a["consistent_steps"] += 1
                    a["gap"] += float(nll[b][c].sum())
    out = {}
    for k, a in sorted(acc.items()):
        n = a["consistent_steps"]
        gap = a["gap"] / n if n else float("nan")
        out[k] = {"steps": a["steps"], "consistent_steps": n, "gap_per_step": gap,
                  "gap_per_token": gap / k if n else float("nan"),
                  "wrong_commit_rate": a["wrong_commits"] / (a["steps"] * k)}
    return out
