"""Sudoku "easy first": does the decoder fill the cells with fewest candidates first?

A reading of "Parallelism and Generation Order in Masked Diffusion Language Models: Limits
Today, Potential Tomorrow" on Sudoku.

Two readings of one decode:

- *static*: per puzzle, Kendall's τ_b between the step at which each blank cell was finalised and
  its number of legal digits in the puzzle as given (``sudoku_core.candidates_count``); averaged
  over puzzles, plus Spearman's ρ pooled over all blank cells. Positive = fewer candidates, earlier.
- *dynamic*: at each step, among the blank cells still masked, the candidates are recounted on
  the grid as decoded so far; the share of committed cells whose count is the minimum among the
  masked ones ("took an easiest cell"), next to the share a uniformly random choice would get.
"""
from __future__ import annotations

from typing import Dict

import numpy as np
import torch

from ..decoding.trace import tau_b
from ..tasks import sudoku_core as core


def _ranks(v: np.ndarray) -> np.ndarray:
    """Average ranks (ties share the mean rank), for Spearman's ρ."""
    order = np.argsort(v, kind="stable")
    r = np.empty(len(v), dtype=np.float64)
    r[order] = np.arange(len(v), dtype=np.float64)
    for val in np.unique(v):
        m = v == val
        r[m] = r[m].mean()
    return r


def spearman(x, y) -> float:
    x, y = _ranks(np.asarray(x, dtype=np.float64)), _ranks(np.asarray(y, dtype=np.float64))
    if len(x) < 2 or x.std() == 0 or y.std() == 0:
        return float("nan")
    return float(np.corrcoef(x, y)[0, 1])


def easy_first(task, x0: torch.Tensor, pred: torch.Tensor, finalize_step: torch.Tensor) -> Dict[str, float]:
    c = task.cells
    puzzles = x0[:, :c].numpy()
    steps = finalize_step[:, c + 1:].numpy()
    grids = pred[:, c + 1:].numpy()
    cand0 = core.candidates_count(puzzles)
    taus, all_steps, all_cands = [], [], []
    hit = picks = 0
    chance = 0.0
    for p, s, g, k0 in zip(puzzles, steps, grids, cand0):
        blank = p == 0
        all_steps += s[blank].tolist()
        all_cands += k0[blank].tolist()
        t = tau_b(torch.tensor(s[blank], dtype=torch.float64), torch.tensor(k0[blank], dtype=torch.float64))
        if not np.isnan(t):
            taus.append(t)
        for step in np.unique(s[blank]):
            state = np.where(blank & (s >= step), 0, np.where(blank, g, p)).astype(np.int8)
            cand = core.candidates_count(state)
            open_ = blank & (s >= step)
            best = cand[open_].min()
            committed = blank & (s == step)
            hit += int((cand[committed] == best).sum())
            picks += int(committed.sum())
            chance += float((cand[open_] == best).mean()) * int(committed.sum())
    return {
        "kendall_tau_step_vs_candidates": float(np.mean(taus)) if taus else float("nan"),
        "puzzles_with_tau": len(taus),
        "spearman_pooled": spearman(all_steps, all_cands),
        "blank_cells": len(all_steps),
        "min_candidate_share": hit / picks if picks else float("nan"),
        "min_candidate_share_random": chance / picks if picks else float("nan"),
    }
