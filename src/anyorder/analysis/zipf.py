"""The Zipf bound of "Why mask diffusion does not work" on the max probability of a masked token.

If every next-token distribution is Zipf(s, N) (top-1 probability ω1 = 1/Σ_{k≤N} k^{-s},
top-2 ω2 = 2^{-s} ω1) and different predecessors peak on different tokens, the max
probability of the n-th mask after the last visible token (distance n) is at most

    P_n = ω2/(1−(ω1−ω2)) + (ω1−ω2)^n (1−ω1)/(1−(ω1−ω2))        (P_1 = ω1, P_∞ = ω2/(1−ω1+ω2))

Committing the first n masks at once under independence has perplexity
PPL(n) = (Π_{k≤n} P_k)^{-1/n}. ``fit_s`` fits s to a measured curve.
"""
from __future__ import annotations

import math
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

# Table 2 of "Why mask diffusion does not work" (s = 1.05, N = 150000), printed beside ours: the
# per-position probabilities its rows imply, P_n = PPL(n)^-n / PPL(n-1)^-(n-1), go 0.1035, 0.0555,
# 0.0531, 0.0519, 0.0521, 0.0513, ... -- not monotone in n (P_5 > P_4), which no (s, N) of the
# formula produces.
SEED_PPL_TABLE = [9.6618, 13.1995, 14.8584, 15.8570, 16.4716, 16.9408, 17.3027, 17.6066]


def zipf_weights(s: float, N: int) -> Tuple[float, float]:
    """(ω1, ω2): the top-1 and top-2 probabilities of Zipf(s) over N tokens."""
    if N < 2:
        raise ValueError(f"the Zipf vocabulary N must be >= 2, got {N}")
    if s <= 0:
        raise ValueError(f"the Zipf exponent s must be > 0, got {s}")
    # numpy's pairwise summation: relative error ~1e-16 on 1.5e5 terms, and fast enough for fit_s
    z = float(np.sum(np.arange(1, int(N) + 1, dtype=np.float64) ** -float(s)))
    w1 = 1.0 / z
    return w1, 2.0 ** -s * w1


def zipf_bound(n: int, s: float, N: int, weights: Optional[Tuple[float, float]] = None) -> float:
    """The upper bound P_n on the max probability of the mask at distance n >= 1."""
    if n < 1:
        raise ValueError(f"distance n must be >= 1, got {n}")
    w1, w2 = weights or zipf_weights(s, N)
    r = w1 - w2
    return w2 / (1 - r) + r ** n * (1 - w1) / (1 - r)


def zipf_curve(max_n: int, s: float, N: int) -> List[float]:
    w = zipf_weights(s, N)
    return [zipf_bound(n, s, N, w) for n in range(1, max_n + 1)]


def independence_ppl(s: float, N: int, max_parallel: int) -> List[float]:
    """PPL(n) = (Π_{k≤n} P_k)^{-1/n} for n = 1..max_parallel (not rounded)."""
    if max_parallel < 1:
        raise ValueError(f"max_parallel must be >= 1, got {max_parallel}")
    out, logp = [], 0.0
    for n, p in enumerate(zipf_curve(max_parallel, s, N), start=1):
        logp += math.log(p)
        out.append(math.exp(-logp / n))
    return out


def implied_probabilities(ppl: Sequence[float]) -> List[float]:
    """Invert a PPL table: the per-position P_n it implies, PPL(n)^-n / PPL(n-1)^-(n-1)."""
    out, prev = [], 0.0
    for n, v in enumerate(ppl, start=1):
        tot = -n * math.log(v)
        out.append(math.exp(tot - prev))
        prev = tot
    return out


def ppl_table(s: float, N: int, max_parallel: int) -> Dict[str, object]:
    """What ``anyorder zipf --json`` prints: our values, the paper's (``seed_table``), and how they differ."""
    ours = [round(v, 4) for v in independence_ppl(s, N, max_parallel)]
    out: Dict[str, object] = {"ppl": ours, "s": s, "vocab": N,
                              "p_n": [round(p, 6) for p in zipf_curve(max_parallel, s, N)]}
    seed = SEED_PPL_TABLE[:max_parallel]
    implied = implied_probabilities(SEED_PPL_TABLE)[:max_parallel]
    out["seed_table"] = seed
    out["seed_implied_p_n"] = [round(p, 6) for p in implied]
    out["note"] = ("ppl: PPL(n) = (prod_{k<=n} P_k)^(-1/n) with P_k the Zipf bound for these s, N. "
                   "seed_table: Table 2 of 'Why mask diffusion does not work' (s=1.05, N=150000), 1.1-3.0% higher; "
                   "the P_n its rows imply (seed_implied_p_n) are not monotone in n (P_5 > P_4), which the bound "
                   "never is, so the paper's table was not computed from this formula alone; its n=1 value "
                   "needs sum_{k<=N} k^-1.05 = 9.6618, i.e. N ~ 180700 rather than 150000.")
    return out


def fit_s(distances: Sequence[float], values: Sequence[float], N: int, weights: Optional[Sequence[float]] = None,
          lo: float = 0.05, hi: float = 8.0) -> Tuple[float, float]:
    """Least-squares fit of the exponent s, N held fixed: minimise Σ_d w_d (P_d(s) − m_d)²
    over the measured mean max probabilities m_d at distances d (w_d: e.g. sample counts).

    P_d(s) is a smooth one-dimensional function of s, so a coarse log-spaced grid followed by a
    golden-section refinement of the best bracket finds the minimum without scipy.
    Returns (s, rmse) with rmse the weighted root-mean-square residual at the fitted s.
    """
    d = [int(x) for x in distances]
    m = [float(x) for x in values]
    w = [1.0] * len(d) if weights is None else [float(x) for x in weights]
    if not d:
        raise ValueError("fit_s needs at least one (distance, value) point")

    def loss(s: float) -> float:
        ws = zipf_weights(s, N)
        return sum(wi * (zipf_bound(di, s, N, ws) - mi) ** 2 for di, mi, wi in zip(d, m, w)) / sum(w)

    grid = [lo * (hi / lo) ** (i / 60) for i in range(61)]
    losses = [loss(s) for s in grid]
    i = min(range(len(grid)), key=losses.__getitem__)
    a, b = grid[max(i - 1, 0)], grid[min(i + 1, len(grid) - 1)]
    g = (math.sqrt(5) - 1) / 2
    c, e = b - g * (b - a), a + g * (b - a)
    fc, fe = loss(c), loss(e)
    for _ in range(40):
        if fc < fe:
            b, e, fe = e, c, fc
            c = b - g * (b - a)
            fc = loss(c)
        else:
            a, c, fc = c, e, fe
            e = a + g * (b - a)
            fe = loss(e)
    s = (a + b) / 2
    return s, math.sqrt(loss(s))
