"""Distance diagnostics: what a model predicts for masks far from any visible token.

From "Why mask diffusion does not work".

For a set of decoding states (tokens with some answer positions masked) one forward pass gives,
per masked position, the max top-1 probability and the argmax token. Read against the position's
distance to the nearest visible (non-mask) token -- prompt tokens included, distance measured in
sequence positions, 1 = adjacent -- they give:

- the *distance curve*: mean max probability per distance (the paper's Figure 3), to be compared
  with the Zipf bound (:mod:`.zipf`);
- *homogenisation*: among masked positions at distance >= d, the share whose argmax equals the
  most common argmax among them (per state, pooled over states);
- *parallel-sampling bounds* for committing the first n masked answer positions (left to right)
  at once with their top-1 tokens p_1..p_n: upper min p, independence Π p, lower (Bonferroni)
  max(0, Σ p − (n−1)); next to the model's own chain-rule probability of that same tuple
  (reveal the tokens one by one and multiply the conditionals), the number the bounds bracket
  when the model's conditionals are consistent.

States (``patterns``): ``initial`` = the whole answer masked; ``decoded`` = for each row, the
state after a uniformly drawn number of steps of an actual decode (rebuilt from its trace,
exact for decoders that never re-mask); ``reveal`` = the ground-truth answer with a uniform
random fraction of it revealed (training-like; off-distribution for left-to-right orders).
"""
from __future__ import annotations

from collections import Counter
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from ..decoding.forward import uncached_forward

PATTERNS = ("initial", "decoded", "reveal")


def distance_to_visible(masked: torch.Tensor) -> torch.Tensor:
    """[B, L] long: per masked position the distance (in positions) to the nearest visible one;
    0 on visible positions; -1 on masked positions of a row with nothing visible.

    Two linear scans (last visible index to the left, first to the right) instead of an L × L
    table, so long answers cost O(B·L).
    """
    B, L = masked.shape
    idx = torch.arange(L).expand(B, L)
    big = L * 4
    left = torch.where(~masked, idx, torch.full_like(idx, -big)).cummax(-1).values
    right_rev = torch.where(~masked, idx, torch.full_like(idx, big)).flip(-1).cummin(-1).values.flip(-1)
    d = torch.minimum(idx - left, right_rev - idx)
    d = torch.where(masked, d, torch.zeros_like(d))
    return torch.where(masked & (d >= big // 2), torch.full_like(d, -1), d)


def make_states(pattern: str, x0: torch.Tensor, answer: torch.Tensor, mask_id: int,
                gen: torch.Generator, pred: Optional[torch.Tensor] = None,
                finalize_step: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """(tokens, masked) for one pattern of :data:`PATTERNS`."""
    answer = answer.bool()
    if pattern == "initial":
        masked = answer.clone()
        base = x0
    elif pattern == "reveal":
        frac = torch.rand(len(x0), 1, generator=gen, dtype=torch.float64)
        masked = answer & (torch.rand(x0.shape, generator=gen, dtype=torch.float64) >= frac)
        base = x0
    elif pattern == "decoded":
        if pred is None or finalize_step is None:
            raise ValueError("pattern 'decoded' needs a decode's tokens and finalize_step")
        last = torch.where(answer, finalize_step, torch.full_like(finalize_step, -1)).max(-1).values
        # a step drawn uniformly in [0, last]: state after `cut` steps (positions finalised before it visible)
        cut = (torch.rand(len(x0), generator=gen, dtype=torch.float64) * (last + 1).double()).floor().long()
        masked = answer & (finalize_step >= cut.unsqueeze(-1))
        base = pred
    else:
        raise ValueError(f"unknown state pattern {pattern!r}; valid choices: {', '.join(PATTERNS)}")
    return torch.where(masked, torch.full_like(base, mask_id), base), masked


def _chunks(model, order, x, masked, answer, extra, batch_size):
    """Yield (slice, log-probs [b, L, V] float64) per chunk of rows, under the order's decoding
    attention; chunked so a large vocabulary never needs all rows' log-probs at once."""
    for i in range(0, len(x), batch_size):
        sl = slice(i, i + batch_size)
        layout = order.layout(answer[sl])
        logits = uncached_forward(model, order, layout, extra)(x[sl], masked[sl])
        yield sl, torch.log_softmax(logits.double(), -1)


@torch.no_grad()
def predict(model, order, x: torch.Tensor, masked: torch.Tensor, answer: torch.Tensor, extra=None,
            batch_size: int = 256) -> Tuple[torch.Tensor, torch.Tensor]:
    """(max probability [B, L] float64, argmax [B, L]) for the states, one forward pass each."""
    maxp, arg = [], []
    for _, logp in _chunks(model, order, x, masked, answer, extra, batch_size):
        m, a = logp.max(-1)
        maxp.append(m.exp())
        arg.append(a)
    return torch.cat(maxp), torch.cat(arg)


@torch.no_grad()
def prob_of(model, order, x, masked, answer, pos: torch.Tensor, tok: torch.Tensor, extra=None,
            batch_size: int = 256) -> torch.Tensor:
    """[B] the model's probability of token ``tok[b]`` at position ``pos[b]`` in state b."""
    out = []
    for sl, logp in _chunks(model, order, x, masked, answer, extra, batch_size):
        r = torch.arange(logp.shape[0])
        out.append(logp[r, pos[sl], tok[sl]].exp())
    return torch.cat(out)


def distance_curve(maxp: torch.Tensor, dist: torch.Tensor, masked: torch.Tensor) -> Dict[int, Tuple[float, int]]:
    """distance -> (mean max probability, number of masked positions at that distance)."""
    out = {}
    sel = masked & (dist > 0)
    for d in sorted(set(dist[sel].tolist())):
        v = maxp[sel & (dist == d)]
        out[int(d)] = (float(v.mean()), int(v.numel()))
    return out


def homogenisation(argmax: torch.Tensor, dist: torch.Tensor, masked: torch.Tensor, far: int) -> Dict[str, float]:
    """Among masked positions at distance >= ``far``: the share whose argmax is the most common
    argmax of its own state (pooled over the states with at least two such positions)."""
    modal = total = states = 0
    for a, d, m in zip(argmax, dist, masked):
        toks = a[m & (d >= far)].tolist()
        if len(toks) < 2:
            continue
        modal += Counter(toks).most_common(1)[0][1]
        total += len(toks)
        states += 1
    return {"far": far, "share": modal / total if total else float("nan"), "positions": total, "states": states}


def first_masked(masked: torch.Tensor, answer: torch.Tensor, n: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Positions [B, n] of the first n masked answer positions (left to right) and a [B] bool:
    the row has at least n of them."""
    m = masked & answer
    L = m.shape[-1]
    key = torch.where(m, torch.arange(L).expand_as(m), torch.full_like(m, L, dtype=torch.long))
    pos = key.sort(-1).values[:, :n]
    return pos.clamp(max=L - 1), m.sum(-1) >= n


def bounds(p: Sequence[float]) -> Dict[str, float]:
    """The paper's three metrics for committing tokens with top probabilities ``p`` at once."""
    p = [float(v) for v in p]
    prod = 1.0
    for v in p:
        prod *= v
    return {"upper_min": min(p), "independence": prod, "lower_bonferroni": max(0.0, sum(p) - (len(p) - 1))}


@torch.no_grad()
def parallel_bounds(model, order, x: torch.Tensor, masked: torch.Tensor, answer: torch.Tensor,
                    maxp: torch.Tensor, argmax: torch.Tensor, max_parallel: int, extra=None,
                    batch_size: int = 256) -> List[Dict[str, float]]:
    """Per n = 1..max_parallel, the bounds averaged over states with >= n masked answer
    positions, and ``chain``: the model's chain-rule probability of the same top-1 tuple."""
    pos, _ = first_masked(masked, answer, max_parallel)
    have = (masked & answer).sum(-1)
    B = len(x)
    rows = torch.arange(B)
    # chain[b, k] = P(a_k | state + a_1..a_{k-1} revealed) at the k-th first masked position
    chain = torch.zeros(B, max_parallel, dtype=torch.float64)
    xs, ms = x.clone(), masked.clone()
    for k in range(max_parallel):
        pk = pos[:, k]
        if k == 0:
            chain[:, 0] = maxp[rows, pk]
        else:
            chain[:, k] = prob_of(model, order, xs, ms, answer, pk, argmax[rows, pk], extra, batch_size)
        ok = have > k
        xs[rows[ok], pk[ok]] = argmax[rows[ok], pk[ok]]
        ms[rows[ok], pk[ok]] = False
    out = []
    for n in range(1, max_parallel + 1):
        sel = have >= n
        if not sel.any():
            break
        ps = maxp[rows[sel].unsqueeze(-1), pos[sel, :n]]
        per = [bounds(r) for r in ps.tolist()]
        row = {"n": n, "states": int(sel.sum())}
        for key in ("upper_min", "independence", "lower_bonferroni"):
            row[key] = sum(r[key] for r in per) / len(per)
        row["chain"] = float(chain[sel, :n].prod(-1).mean())
        out.append(row)
    return out


def distance_analysis(model, order, task, x0: torch.Tensor, answer: torch.Tensor, patterns: Sequence[str],
                      far: int, max_parallel: int, pred: Optional[torch.Tensor] = None,
                      finalize_step: Optional[torch.Tensor] = None, seed: int = 0,
                      batch_size: int = 256) -> Dict[str, object]:
    """Distance curve, homogenisation and parallel bounds over the states of ``patterns``."""
    extra = task.extra()
    gen = torch.Generator().manual_seed(seed)
    xs, ms, answers = [], [], []
    for pat in patterns:
        x, m = make_states(pat, x0, answer, task.mask_id, gen, pred, finalize_step)
        xs.append(x)
        ms.append(m)
        answers.append(answer)
    x, masked, ans = torch.cat(xs), torch.cat(ms), torch.cat(answers)
    maxp, argmax = predict(model, order, x, masked, ans, extra, batch_size)
    dist = distance_to_visible(masked)
    per_pattern = {}
    for i, pat in enumerate(patterns):
        sl = slice(i * len(x0), (i + 1) * len(x0))
        per_pattern[pat] = distance_curve(maxp[sl], dist[sl], masked[sl])
    return {
        "curve": distance_curve(maxp, dist, masked),
        "curve_by_pattern": per_pattern,
        "homogenisation": homogenisation(argmax, dist, masked, far),
        "parallel": parallel_bounds(model, order, x, masked, ans, maxp, argmax, max_parallel, extra, batch_size),
        "states": len(x),
        "patterns": list(patterns),
    }
