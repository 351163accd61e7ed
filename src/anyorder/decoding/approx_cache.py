"""Approximate KV caches for orders whose attention has no exact cache (``random``,
``prefix_block``, ``jigsaw``): ``Decoder(cache="prefix" | "dual" | "drift")``.

Under bidirectional attention every position's hidden states change whenever any token it sees
changes, so (model/kv_cache.py) nothing but, at best, the prompt can be cached exactly. Fast-dLLM
(Wu et al., 2025, arXiv 2505.22618) observes that, decoded semi-autoregressively (one window of
the answer at a time), the K/V of the positions *outside* the current window change little while
the window is decoded, and reuses them:

    prefix   when a window starts, one full pass computes every position's K/V (and logits).
             On the window's later steps only the positions from the window's first position to
             the end of the sequence run; they attend to the K/V stored for the positions before
             it. Approximates: the prefix's K/V as they were when the window started (the prefix
             cannot see the window's new tokens).
    dual     the same, but only the window's own positions run; the K/V of the positions before
             AND after the window are reused. Approximates: both sides as they were when the
             window started; positions outside the window keep the logits of that pass.
    drift    the dual cache, also refreshed (a full pass, this step) whenever the K/V just
             recomputed for the window have drifted from their values at the last refresh by
             more than ``cache_tol`` (relative norm, all layers), in the spirit of Elastic-Cache
             (Nguyen-Tri et al., 2025, arXiv 2510.14973; they test the most-attended token and
             refresh from a layer on, we test the window and refresh it all). The drift is read on
             the window positions whose token is unchanged since the refresh: their change comes
             only from their context, as that of the cached entries does. ``cache_tol=0``
             refreshes on any change, i.e. decodes exactly.

All three also refresh every ``cache_every`` steps if given (``cache_every=1``: every step, an
exact decode) and recompute any position whose token changed since its K/V were computed (a
decoder or order may commit outside the window, e.g. Jigsaw's probe). Each row keeps its own
window, refresh and counters, so a batch decodes exactly as its rows one by one; rows that
refresh while others do not run apart (a batched pass pads every row to the largest query set,
so one refreshing row would make the whole batch rerun every position). On CPU, after the first
pass, the native backbone's layers multiply by ``[in, out]`` copies of their weights, faster for
a window's few rows (model/linear.py; the exact modes keep ``nn.Linear``'s arithmetic), and with
``compile=True`` the window passes (not the refreshes) run compiled (model/compiled.py). An order that
can freeze answer positions (``ar``, ``block``, ``scatter``: see ``Order.frozen``) gets the exact
cache (``cache=True``) whatever approximate mode is asked: it is exact and at least as cheap.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from ..checks import check_bool, check_float, check_int, show
from ..model.kv_cache import KVCache, select_extra
from ..model.compiled import compiling
from ..model.linear import multiplying_by
from .forward import QueryCounts, SlotOutputs, cached_forward, full_attention, run_queries, uncached_forward

APPROX_MODES = ("prefix", "dual", "drift")
_BIG = torch.iinfo(torch.long).max


@dataclass(frozen=True)
class CacheSpec:
    """What ``Decoder(cache=..., cache_tol=..., cache_every=...)`` asked for, validated."""

    mode: object = False            # False | True (exact) | "prefix" | "dual" | "drift"
    tol: float = 0.1                # drift: refresh when the relative K/V drift exceeds this
    every: Optional[int] = None     # approximate modes: also refresh every this many steps
    compile: bool = False           # approximate modes: compiled window passes (model/compiled.py)

    def make_forward(self, model, order, layout, extra, window: torch.Tensor):
        """``forward(x, masked) -> logits`` for one decode; ``window`` [B, L] is the decoder's
        semi-AR window of each answer position (-1 on the prompt)."""
        if self.mode is False or (self.mode is True and not caches_anything(order, layout)):
            return uncached_forward(model, order, layout, extra)  # a cache that keeps nothing only costs
        if self.mode is True or has_exact_cache(order, layout):
            return cached_forward(model, order, layout, extra)
        if self.compile and not hasattr(getattr(model, "backbone", model), "blocks_cached"):
            raise ValueError(f"decoder.compile=true needs anyorder's own transformer (model.backbone: native), "
                             f"got {type(model).__name__}")
        return ApproxCachedForward(model, order, layout, window, self, extra)


def cache_spec(cache=False, cache_tol=None, cache_every=None, compile=False) -> CacheSpec:
    """Validate the decoder's cache options (one-line ValueErrors naming key, value and choices)."""
    if not (isinstance(cache, bool) or cache in APPROX_MODES):
        choices = ", ".join(["false", "true"] + [repr(m) for m in APPROX_MODES])
        raise ValueError(f"decoder.cache must be one of {choices}, got {show(cache)}")
    if cache_tol is not None and cache != "drift":
        raise ValueError(f"decoder.cache_tol={show(cache_tol)} applies only to decoder.cache='drift', "
                         f"got decoder.cache={show(cache)}")
    if cache_every is not None and cache not in APPROX_MODES:
        raise ValueError(f"decoder.cache_every={show(cache_every)} applies only to decoder.cache in "
                         f"{', '.join(map(repr, APPROX_MODES))}, got decoder.cache={show(cache)}")
    check_bool("decoder.compile", compile)
    if compile and cache not in APPROX_MODES:
        raise ValueError(f"decoder.compile=true applies only to decoder.cache in {', '.join(map(repr, APPROX_MODES))} "
                         f"(it compiles their window passes; a full pass gains nothing), got decoder.cache={show(cache)}")
    tol = CacheSpec.tol if cache_tol is None else check_float("decoder.cache_tol", cache_tol, 0)
    return CacheSpec(cache, tol, check_int("decoder.cache_every", cache_every, 1, optional=True), compile)


def caches_anything(order, layout) -> bool:
    """Whether the exact cache can skip any work for ``order``: it freezes some position (asked
    at the fully decoded state) or reads the logits of fewer than all positions (``Order.live``).
    Neither holds for ``random``, whose prompt attends to the answer: every step is a full pass
    and the cache's book-keeping a pure cost, so ``cache=True`` runs the plain pass there."""
    return bool(frozen_when_done(order, layout).any()) or order.live(layout.answer, layout) is not None


def has_exact_cache(order, layout) -> bool:
    """Whether ``order`` can freeze answer positions (asked at the fully decoded state), i.e. its
    exact cache skips more than the prompt."""
    return bool((frozen_when_done(order, layout) & layout.answer).any())


def frozen_when_done(order, layout) -> torch.Tensor:
    """[B, L] what ``order`` freezes at the fully decoded state (no position masked)."""
    return order.frozen(torch.zeros_like(layout.answer), layout)


class ApproxCachedForward:
    """``forward(x, masked, rows=None) -> logits [B, L, V]`` with a prefix / dual / drift cache (see the
    module doc). Logits are fresh at the positions run this step (the window, and for ``prefix``
    everything after its start) and kept from the last pass that ran them elsewhere.
    ``query_tokens``, ``calls`` and ``refreshes`` count the work done (tests, benchmarks)."""

    def __init__(self, model, order, layout, window: torch.Tensor, spec: CacheSpec, extra=None):
        self.model, self.order, self.layout, self.extra = model, order, layout, extra
        self.window, self.spec = window, spec
        self.cache = None
        self.counts = QueryCounts()
        self._refreshes = 0

    query_tokens = property(lambda self: self.counts.tokens)
    calls = property(lambda self: self.counts.calls)
    refreshes = property(lambda self: int(self._refreshes))

    def _start(self, x: torch.Tensor) -> None:
        B, L = x.shape
        self.cache = KVCache(self.model, B, L)
        self.out = SlotOutputs(self.model, B, L, x.device)
        self.tokens = torch.full_like(x, -1)          # the token each slot's K/V was computed with
        self.win_at = torch.full((B,), -1, dtype=torch.long, device=x.device)  # window at refresh
        self.since = torch.zeros(B, dtype=torch.long, device=x.device)        # steps on this cache
        self.snap = None                               # drift: K/V and tokens at the last refresh
        self.far = torch.full_like(self.window, _BIG)  # (made once: a fill per step costs a dispatch)
        # the backbone's weights laid out for few-row products (model/linear.py), made as its
        # layers first run after the first, full pass (a forward used once makes none)
        self.weights = {}

    def __call__(self, x: torch.Tensor, masked: torch.Tensor, rows=None, where=None) -> torch.Tensor:
        """The decoding loop's forward protocol (decoding/forward.py): ``rows`` -> those batch rows'
        logits only (finished rows run nothing here anyway); ``where`` -> the [N, V] logits there."""
        B, L = x.shape
        first = self.cache is None
        if first:
            self._start(x)
        attn = self.order.decode_attention(masked, self.layout)  # None: all see all (no mask to build)
        active = masked.any(-1)
        win = torch.where(masked, self.window, self.far).min(-1).values  # [B]
        refresh = (win != self.win_at) & active
        if self.spec.every is not None:
            refresh |= (self.since >= self.spec.every) & active
        if first:  # one full pass: exact logits everywhere, every slot written
            refresh = torch.ones_like(active)
        run = self._recompute(x, win) & active.unsqueeze(-1)
        copies = None if first else self.weights
        self._pass(x, run, attn, refresh, copies)
        if self.spec.mode == "drift" and bool((check := ~refresh & active).any()):
            drifted = check & (self._drift(x, run) > self.spec.tol)
            if bool(drifted.any()):  # the window moved too far: recompute everything now
                self._pass(x, torch.zeros_like(run), attn, drifted, copies)
                refresh = refresh | drifted
        self._refreshed(x, refresh, win, active)
        with multiplying_by(copies):
            return self.out.read(rows, where)

    def _recompute(self, x: torch.Tensor, win: torch.Tensor) -> torch.Tensor:
        """[B, L] the positions a non-refresh step runs: the window (``prefix``: from its first
        position on), plus every position whose token changed since its K/V were computed."""
        in_win = self.window == win.unsqueeze(-1)
        if self.spec.mode == "prefix":
            start = torch.where(in_win, torch.arange(x.shape[1], device=x.device), _BIG).min(-1, keepdim=True).values
            in_win = torch.arange(x.shape[1], device=x.device) >= start
        return in_win | (x != self.tokens)

    def _pass(self, x: torch.Tensor, q: torch.Tensor, attn, full: torch.Tensor, copies) -> None:
        """Run ``q`` [B, L], and every position of the rows ``full`` [B] (a refresh), over every
        slot (each was written by the first, full pass) under the order's ``attn`` (None: all see
        all). One batched pass pads every row to the largest query count, so one refreshing row
        would make every row run every position: when only some rows refresh, they run apart, on
        a copy of their rows of the cache (``KVCache.select``), and the others run their own
        queries only. Row by row the same passes either way. ``copies``: the weights to multiply
        by (model/linear.py), None for the layers' own."""
        B, L = x.shape
        counts = torch.where(full, 0, q.sum(-1))  # the query counts of the rows that do not refresh
        # one read of the device: the split, and the query counts run_queries would read
        most, least, n_full = torch.stack([counts.max(), counts.min(), full.sum()]).tolist()
        with multiplying_by(copies):
            if n_full == B:
                self.counts.add(run_queries(self.model, self.cache, self.out, x, torch.ones_like(q), attn, None,
                                            self.extra, known=(L, L)))
            else:
                part = q if n_full == 0 else q & ~full.unsqueeze(-1)
                with compiling(self.spec.compile):  # window passes only: a full pass gains nothing
                    self.counts.add(run_queries(self.model, self.cache, self.out, x, part, attn, None, self.extra,
                                                known=(most, least)))
            if 0 < n_full < B:
                rows = full.nonzero().squeeze(-1)
                sub = self.cache.select(rows)
                self.counts.add(run_queries(self.model, sub, self.out, x[rows], torch.ones_like(q[rows]),
                                            None if attn is None else full_attention(attn, B, L, x.device)[rows],
                                            None, select_extra(self.extra, rows), rows, known=(L, L)))
                self.cache.put(rows, sub)
        self.tokens = torch.where(q | full.unsqueeze(-1), x, self.tokens)

    def _drift(self, x: torch.Tensor, run: torch.Tensor) -> torch.Tensor:
        """[B] relative change, all layers, of the K/V of the positions just run whose token is
        the same as at the last refresh (inf for a row without such a position)."""
        L = x.shape[1]
        keep = (run & (x == self.snap[0])).to(self.cache.k[0].dtype)[:, None, :, None]  # [B, 1, L, 1]
        num = torch.zeros(x.shape[0], dtype=torch.float64, device=x.device)
        den = torch.zeros_like(num)
        for now, then in zip(self.cache.k + self.cache.v, self.snap[1]):
            num += ((now[:, :, :L] - then) * keep).double().pow(2).sum((1, 2, 3))
            den += (then * keep).double().pow(2).sum((1, 2, 3))
        return torch.where(den > 0, num.sqrt() / den.clamp_min(1e-300).sqrt(), torch.full_like(num, float("inf")))

    def _refreshed(self, x, refresh, win, active) -> None:
        """Book-keeping after a step: rows that refreshed start counting (and, for drift,
        snapshot their K/V); the others count one more step."""
        self.since = torch.where(refresh, 1, self.since + active.long())
        self.win_at = torch.where(refresh, win, self.win_at)
        self._refreshes = self._refreshes + refresh.sum()  # a tensor: no host read per step
        if self.spec.mode != "drift" or not bool(refresh.any()):
            return
        L = x.shape[1]
        bufs = [b[:, :, :L] for b in self.cache.k + self.cache.v]
        if self.snap is None:
            self.snap = (x.clone(), [b.clone() for b in bufs])
            return
        r = refresh.view(-1, 1, 1, 1)
        self.snap = (torch.where(refresh.unsqueeze(-1), x, self.snap[0]),
                     [torch.where(r, b, s) for b, s in zip(bufs, self.snap[1])])
