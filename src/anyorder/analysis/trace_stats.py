"""Trace statistics, split the way "Parallelism and Generation Order in Masked Diffusion
Language Models: Limits Today, Potential Tomorrow" splits them.

From a :class:`~anyorder.decoding.trace.Trace` (per position: the step it was finalised):

- AFP and Kendall's τ_b (from ``decoding.trace``), averaged over rows, overall and split by
  whether the decoded output is correct, and by *stage*: the first, middle and last third of the
  answer positions (left to right) -- AFP and τ_b computed on each third's positions alone;
- tokens finalised per step: how many steps finalised 1, 2, 3, ... tokens (a histogram over all
  steps of all rows that finalised at least one token);
- the order heatmap: share of rows that finalised answer position i at step t ([n, T] matrix).
"""
from __future__ import annotations

from collections import Counter
from typing import Dict, List, Optional

import torch

from ..decoding.trace import Trace, afp, kendall_tau_b

STAGES = ("first", "middle", "last")


def _mean(v: torch.Tensor) -> float:
    v = v[~torch.isnan(v)]
    return float(v.mean()) if v.numel() else float("nan")


def stage_masks(answer: torch.Tensor) -> Dict[str, torch.Tensor]:
    """[B, L] bool per stage: answer position k of n belongs to third floor(3k / n)."""
    aidx = answer.long().cumsum(-1) - 1
    n = answer.sum(-1, keepdim=True).clamp_min(1)
    third = torch.div(3 * aidx, n, rounding_mode="floor")
    return {s: answer & (third == i) for i, s in enumerate(STAGES)}


def afp_tau(finalize_step: torch.Tensor, answer: torch.Tensor) -> Dict[str, float]:
    """Mean AFP and mean τ_b (rows with a defined τ) of the given rows / positions."""
    if len(finalize_step) == 0:
        return {"rows": 0, "afp": float("nan"), "kendall_tau": float("nan")}
    return {"rows": int(len(finalize_step)), "afp": _mean(afp(finalize_step, answer)),
            "kendall_tau": _mean(kendall_tau_b(finalize_step, answer))}


def split_stats(trace: Trace, correct: Optional[torch.Tensor] = None) -> Dict[str, Dict[str, float]]:
    """``{"all": .., "correct": .., "incorrect": .., "stage_first": .., ...}`` of AFP / τ_b."""
    fs, ans = trace.finalize_step, trace.answer.bool()
    out = {"all": afp_tau(fs, ans)}
    if correct is not None:
        c = correct.bool()
        out["correct"] = afp_tau(fs[c], ans[c])
        out["incorrect"] = afp_tau(fs[~c], ans[~c])
    for s, m in stage_masks(ans).items():
        out[f"stage_{s}"] = afp_tau(fs, m)
    return out


def tokens_per_step(trace: Trace) -> Dict[int, int]:
    """k -> number of (row, step) pairs that finalised exactly k answer tokens (k >= 1)."""
    hist: Counter = Counter()
    for s, a in zip(trace.finalize_step, trace.answer.bool()):
        hist.update(Counter(s[a].tolist()).values())
    return dict(sorted(hist.items()))


def heatmap_matrix(trace: Trace) -> torch.Tensor:
    """[n_answer, T] float: share of rows that finalised answer position i at step t.

    Rows must have the same number of answer positions (true of every task here)."""
    ans = trace.answer.bool()
    n = int(ans[0].sum())
    if not bool((ans.sum(-1) == n).all()):
        raise ValueError("heatmap_matrix needs rows with equal answer lengths")
    steps = trace.finalize_step[ans].view(len(ans), n)
    T = int(steps.max()) + 1 if steps.numel() else 1
    mat = torch.zeros(n, T, dtype=torch.float64)
    mat.index_put_((torch.arange(n).expand_as(steps).reshape(-1), steps.reshape(-1)),
                   torch.ones(steps.numel(), dtype=torch.float64), accumulate=True)
    return mat / len(ans)


def stats_table_rows(label: str, split: Dict[str, Dict[str, float]]) -> List[Dict[str, object]]:
    return [{"decoder": label, "subset": k, **v} for k, v in split.items()]
