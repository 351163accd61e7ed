"""One decoding loop for every order.

    repeat until no masked answer position is left:
        forward pass under the order's attention for the current state (unfinished rows only)
        allowed  = masked ∩ what the order permits now ∩ the current semi-AR window
        propose a token at the allowed positions (greedy or float64 Gumbel-max)
        score the allowed positions (random / top_prob / margin / entropy / left_to_right)
        commit the n best, n from the commit schedule (k per step, or LLaDA's even split:
            Nie et al., 2025, arXiv 2502.09992)
        record, per committed position, the step and its confidence (the trace)

The order decides *where* it is legal to commit (AR: the leftmost hole; block diffusion: the
current block; Jigsaw: the block its probe picked, left to right; Scatter: the current column);
the decoder decides *which* and *how many*. A new decoder subclasses :class:`Decoder` and
overrides one of the hooks, from the smallest to the largest:

    scores(dist, proposal, layout, gens)      which positions first (or just set ``score``)
    windows(layout)                           the semi-AR windows (scatter_offsets: the columns)
    allowed(state, dist)                      where (jigsaw_entropy: the lowest-entropy block)
    counts(state, allowed)                    how many this step
    choose(state, dist, proposal, allowed)    the commit set itself (threshold)
    fill(state, commit, dist, proposal)       the tokens written there (beam)
    step(state, forward)                      one whole step (random_init)
    run(state, forward)                       the whole loop (ancestral, remask, edit)

``dist`` (:class:`~anyorder.decoding.dist.StepDist`) is the step's model distribution, computed
only at the positions the step may commit (``dist.where`` = allowed): the loop costs its
forward passes, not a full-vocabulary softmax of every position. ``dist.logp()`` /
``dist.probs()`` give the whole [B, L, V] tensors to a hook whose rule needs them.
``proposal`` [B, L] is the token the step proposes at the allowed positions (greedy or
sampled; the current token elsewhere); a hook decides where, and how many of, the proposals are
committed. A forward is ``forward(x, masked, rows=None) -> logits``: with ``rows`` [R] it runs
(and returns [R, L, V] for) those batch rows only; the loop passes the unfinished rows.

Everything a decode carries from step to step lives in a :class:`DecodeState` (state.py); its
``commit``/``remask`` keep the trace right (``finalize_step`` = step of the last commit).
Decoders in other files of this package (threshold, ancestral, remask, edit, random_init,
beam, jigsaw_entropy, scatter_offsets) are built on these hooks.
"""
from __future__ import annotations

import warnings
from typing import Dict, List, Optional

import torch

from ..checks import check_float, check_int, in_range, show
from ..orders.base import Layout, Order
from ..registry import Registry
from .approx_cache import cache_spec
from .dist import StepDist
from .sampling import row_generators, sample_at
from .events import EventLog
from .scores import SCORES
from .state import DecodeResult, DecodeState

DECODERS: Registry = Registry("decoder")


class Decoder:
    """Commit-by-score decoder.

    k:           tokens committed per step (default 1 when ``steps`` is not given)
    steps:       total steps; split evenly over semi-AR windows, and inside a window the tokens
                 are split evenly over its steps, remainder first (LLaDA's schedule)
    window:      semi-AR window length over the answer (None: the whole answer at once); LLaDA's
                 ``block_length``. Not an order's ``block_size`` (the order's group size)
    temperature, top_k, top_p: token sampling (0 = greedy)
    seed:        row b uses generator seed ``seed + b`` unless ``row_seeds`` is given to decode()
    cache:       false; true (exact KV cache); "prefix" | "dual" | "drift" (approximate, for orders
                 without an exact cache; ``cache_tol``, ``cache_every``: decoding/approx_cache.py)
    compile:     with an approximate cache, compile its window passes (model/compiled.py)
    """

    score: str = "top_prob"
    # what the trace's event log keeps (not decoder options: they never change a decode)
    record_events: bool = True  # keep trace.events (False: finalize_step / confidence only)
    alternatives: int = 0      # top-K tokens kept per committed position
    on_step = None             # called with the state after every step (the live viewer)
    # True for a decoder whose hooks read every position's logits (dist.logp(): beam, jigsaw_entropy);
    # otherwise the output head runs only at the positions a step may commit
    needs_all_logits: bool = False

    def __init__(self, k: Optional[int] = None, steps: Optional[int] = None, window: Optional[int] = None,
                 temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, seed: int = 0,
                 score: Optional[str] = None, cache=False, cache_tol: Optional[float] = None,
                 cache_every: Optional[int] = None, compile: bool = False):
        if k is not None and steps is not None:
            raise ValueError("give either decoder.k (tokens per step) or decoder.steps, not both")
        # every option checked here, at construction: a bad one fails before a run starts
        self.k = check_int("decoder.k", k, 1, optional=True)
        self.steps = check_int("decoder.steps", steps, 1, optional=True)
        self.window = check_int("decoder.window", window, 1, optional=True)
        self.temperature = check_float("decoder.temperature", temperature, 0, note=" (0 = greedy)")
        self.top_k = check_int("decoder.top_k", 0 if top_k is None else top_k, 0, note=" (0 = off)")
        self.top_p = check_float("decoder.top_p", top_p, 0, 1, lo_open=True)
        self.seed = check_int("decoder.seed", seed, 0)
        if score is not None:
            SCORES.get(score)  # validate early, with the valid choices in the error
            self.score = score
        self.cache_spec = cache_spec(cache, cache_tol, cache_every, compile)  # approx_cache.py
        self.cache = cache

    def make_forward(self, model, order: Order, layout: Layout, extra=None):
        """``forward(x, masked) -> logits`` for this decode: the plain full pass under the order's
        attention, (``cache=True``) an exact KV-cached pass where the order allows one, or an
        approximate cache (``cache="prefix" | "dual" | "drift"``, decoding/approx_cache.py)."""
        return self.cache_spec.make_forward(model, order, layout, extra, self.windows(layout))

    def probe_forward(self, st: DecodeState):
        """A forward for passes that look at a state the decode may later undo (a re-masked
        token, a tentative beam extension, random fills). Each call builds its forward afresh
        through :meth:`make_forward`, so a KV cache never keeps entries of an undone state."""
        def forward(x, masked, rows=None, where=None):
            return self.make_forward(st.model, st.order, st.layout, st.extra)(x, masked, rows, where)

        return forward

    # -- pieces a subclass may override -------------------------------------------------
    def scores(self, dist: StepDist, proposal, layout, gens) -> torch.Tensor:
        return SCORES.get(self.score)(dist, proposal, layout, gens)

    def select(self, score: torch.Tensor, allowed: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
        """The n highest-scoring allowed positions per row (ties: leftmost first)."""
        key = torch.where(allowed, -score, torch.full_like(score, float("inf")))
        order = torch.sort(key, dim=-1, stable=True).indices
        rank = torch.empty_like(order).scatter_(
            -1, order, torch.arange(order.shape[-1], device=order.device).expand_as(order))
        return allowed & (rank < n.unsqueeze(-1))

    def step_dist(self, st: DecodeState, forward, x=None, masked=None) -> StepDist:
        """One forward pass of the state (``x``, ``masked``: default the decode's) and the step's
        commit candidates ``dist.where`` (:meth:`allowed` of the unfinished rows). Only the
        unfinished rows run (a row reads only itself: the others' logits do not change), and when
        the candidates do not depend on the logits the output head runs at them only."""
        x = st.x if x is None else x
        masked = st.masked if masked is None else masked
        active, rows, _ = st.active()
        if self.needs_all_logits or st.order.reads_logp:
            dist = StepDist(forward(x, masked, rows), x.shape[0], rows)
            dist.where = self.allowed(st, dist, masked) & active.unsqueeze(-1)
        else:
            where = self.allowed(st, None, masked) & active.unsqueeze(-1)
            dist = StepDist(forward(x, masked, rows, where), x.shape[0], rows, where)
        return dist

    def propose(self, dist: StepDist, st: DecodeState) -> torch.Tensor:
        """[B, L] the proposed token at the step's commit candidates ``dist.where`` (greedy or
        float64 Gumbel-max; the current token elsewhere). Rows with holes draw their noise."""
        tokens = sample_at(dist, self.temperature, st.gens, self.top_k, self.top_p, draw=st.active()[2])
        if st.events is not None:
            st.events.propose(dist)
        return dist.put_proposal(tokens, st.x)

    def allowed(self, st: DecodeState, dist: Optional[StepDist], masked: Optional[torch.Tensor] = None) -> torch.Tensor:
        """What the order permits now, restricted to the current semi-AR window when that window
        has an allowed position (an order may point elsewhere, e.g. Jigsaw's probe). ``dist`` is
        None when neither the order (``reads_logp``) nor the decoder (``needs_all_logits``) reads
        the logits here: the candidates are then known before the forward pass."""
        masked = st.masked if masked is None else masked
        allowed = st.order.allowed(masked, st.layout, dist.logp() if st.order.reads_logp else None)
        in_win = allowed & (st.window == st.current_window(masked).unsqueeze(-1))
        return torch.where(in_win.any(-1, keepdim=True), in_win, allowed)

    def counts(self, st: DecodeState, allowed: torch.Tensor) -> torch.Tensor:
        """[B] how many tokens each row commits this step: ``k``, or with ``steps`` LLaDA's even
        split of each window over steps / #windows steps."""
        if self.steps is None:
            return torch.clamp(allowed.sum(-1), max=self.k or 1)
        return self.split_counts(st, allowed, self.steps // st.n_windows.clamp_min(1))

    def split_counts(self, st: DecodeState, allowed: torch.Tensor, steps_per_window: torch.Tensor,
                     at_least: int = 0) -> torch.Tensor:
        """[B] this step's entry of the plan of each row's current window: when a row enters a
        window, its masked positions there are split over ``steps_per_window[b]`` steps by
        :func:`even_split`; a row whose order committed fewer than planned takes 1 per extra
        step. At least ``at_least``, at most what is allowed now."""
        active = st.masked.any(-1)
        win = st.current_window()
        enter = active & (win != st.cur_window)         # entering a new window: plan it
        st.cur_window = torch.where(enter, win, st.cur_window)
        m = (st.masked & (st.window == win.unsqueeze(-1))).sum(-1)
        st.plan = torch.where(enter.unsqueeze(-1), torch.stack([m, torch.zeros_like(m)], -1), st.plan)
        n, i = st.plan.unbind(-1)
        spw = steps_per_window.clamp_min(1)
        want = torch.where(i < spw, n // spw + (i < n % spw).long(), torch.ones_like(n))  # even_split(n, spw)[i]
        st.plan = torch.stack([n, i + active.long()], -1)
        return torch.where(active, torch.minimum(want.clamp_min(at_least), allowed.sum(-1)), torch.zeros_like(n))

    def choose(self, st: DecodeState, dist: StepDist, proposal, allowed) -> torch.Tensor:
        """[B, L] bool: the positions committed this step."""
        return self.select(self.scores(dist, proposal, st.layout, st.gens), allowed, self.counts(st, allowed))

    def fill(self, st: DecodeState, commit, dist: StepDist, proposal):
        """The tokens written at ``commit`` and their confidence (the model's probability of the
        token, at the step's candidates, which hold ``commit``): the proposals, by default
        (beam search replaces them by the jointly best combination)."""
        return proposal, dist.prob_of(proposal)

    # -- the loop -------------------------------------------------------------------------
    def start(self, model, order: Order, x: torch.Tensor, answer: torch.Tensor,
              extra: Optional[Dict[str, torch.Tensor]] = None, row_seeds: Optional[List[int]] = None,
              max_steps: Optional[int] = None) -> DecodeState:
        mask_id = model.cfg.mask_id
        x = x.clone()
        B, L = x.shape
        dev = x.device
        answer = answer.bool()
        layout = order.layout(answer)
        masked = answer & (x == mask_id)
        seeds = [int(s) for s in (row_seeds if row_seeds is not None else [self.seed + b for b in range(B)])]
        gens = row_generators(seeds, dev)
        if len(gens) != B:
            raise ValueError(f"row_seeds has {len(gens)} seeds for a batch of {B} rows")
        window = self.windows(layout)
        n_windows = torch.where(answer, window + 1, 0).max(-1).values
        if self.steps is not None and int(n_windows.max()) > 0 and self.steps % int(n_windows.max()) != 0:
            raise ValueError(f"decoder.steps={self.steps} must be a multiple of the number of semi-AR "
                             f"windows ({int(n_windows.max())})")
        return DecodeState(
            model=model, order=order, layout=layout, extra=extra, x=x, masked=masked, answer=answer, gens=gens,
            window=window, n_windows=n_windows, plan=torch.zeros(B, 2, dtype=torch.long, device=dev),
            cur_window=torch.full((B,), -1, dtype=torch.long, device=dev),
            finalize=torch.full((B, L), -1, dtype=torch.long, device=dev),
            conf=torch.zeros(B, L, dtype=torch.float64, device=dev),
            nfe=torch.zeros(B, dtype=torch.long, device=dev), limit=max_steps or 4 * L * max(1, self.steps or 1) + 16,
            seeds=seeds, row_step=torch.zeros(B, dtype=torch.long, device=dev),
            events=EventLog((B, L), dev, self.alternatives, self.on_step,
                            initial=torch.where(answer & ~masked, x, -1)) if self.record_events else None)

    def windows(self, layout: Layout) -> torch.Tensor:
        """[B, L] semi-AR window of each answer position (-1 on prompt): contiguous runs of
        ``window`` answer positions, or one window for the whole answer."""
        window_size = self.window or int(layout.n_answer.max().clamp_min(1))
        return torch.where(layout.answer, layout.aidx // window_size, -1)

    @torch.no_grad()
    def decode(self, model, order: Order, x: torch.Tensor, answer: torch.Tensor,
               extra: Optional[Dict[str, torch.Tensor]] = None, row_seeds: Optional[List[int]] = None,
               max_steps: Optional[int] = None) -> DecodeResult:
        st = self.start(model, order, x, answer, extra, row_seeds, max_steps)
        layout = st.layout
        forward = self.make_forward(model, order, layout, extra)
        self.run(st, forward)
        return DecodeResult(st.x, st.trace())

    def run(self, st: DecodeState, forward) -> None:
        """Steps until no masked answer position is left."""
        while st.active()[2]:  # rows with a hole left
            st.check_limit()
            active = st.active()[0]
            self.step(st, forward)
            st.advance(active)

    def step(self, st: DecodeState, forward) -> None:
        """One forward pass (of the unfinished rows), one commit."""
        active = st.active()[0]
        dist = self.step_dist(st, forward)
        proposal = self.propose(dist, st)
        commit = self.choose(st, dist, proposal, dist.where)
        st.commit(commit, *self.fill(st, commit, dist, proposal))
        st.nfe += active.long()


def even_split(n: int, steps: int) -> List[int]:
    """``n`` tokens over ``steps`` steps as evenly as possible, the remainder first (LLaDA's
    ``get_num_transfer_tokens``; Nie et al., 2025, arXiv 2502.09992): 10 over 4 is 3, 3, 2, 2."""
    base, r = divmod(n, steps)
    return [base + 1 if i < r else base for i in range(steps)]


def _score_decoder(name: str, doc: str):
    cls = type(f"Decoder_{name}", (Decoder,), {"score": name, "__doc__": doc})
    DECODERS.register(name)(cls)
    return cls


for _name, _doc in [("random", "Uniformly random positions (LLaDA 'random')."),
                    ("top_prob", "Most probable proposed token first (LLaDA 'low_confidence')."),
                    ("margin", "Largest top-1 minus top-2 probability first."),
                    ("entropy", "Lowest entropy first."),
                    ("left_to_right", "Leftmost masked position first.")]:
    _score_decoder(_name, _doc)


def check_range(name: str, value, lo=None, hi=None, lo_open=False, hi_open=False, kind=float):
    """``value`` as a ``kind`` (int or float) in the range, or a ValueError naming decoder.<name>,
    the value and the range. NaN, ±inf, bools and non-whole numbers for an int never pass."""
    rng = f"{'(' if lo_open else '['}{'-inf' if lo is None else lo}, {'inf' if hi is None else hi}{')' if hi_open else ']'}"
    try:
        v = (check_int if kind is int else check_float)(f"decoder.{name}", value)
    except ValueError:
        raise ValueError(f"decoder.{name} must be {'an integer' if kind is int else 'a finite number'} in {rng}, "
                         f"got {show(value)}") from None
    if not in_range(v, lo, hi, lo_open, hi_open):
        raise ValueError(f"decoder.{name} must be in {rng}, got {show(value)}")
    return v


def build_decoder(spec) -> Decoder:
    """``"margin"`` or ``{"name": "top_prob", "k": 2, "temperature": 0.7}``.

    ``block_size`` is read as a deprecated alias of ``window`` (run directories saved before the
    rename have it in their ``decode`` specs), with a :class:`DeprecationWarning`."""
    return DECODERS.build(renamed_options(dict(spec)) if isinstance(spec, dict) else spec)


RENAMED_OPTIONS = {"block_size": "window"}  # old decoder option -> new


def renamed_options(spec: dict) -> dict:
    """``spec`` with deprecated option names replaced by their new names (warning once per use)."""
    for old, new in RENAMED_OPTIONS.items():
        if old not in spec:
            continue
        if new in spec:
            raise ValueError(f"decoder {spec.get('name')!r}: give decoder.{new}, not both decoder.{new} and "
                             f"decoder.{old} (its deprecated name)")
        warnings.warn(f"decoder option {old!r} is deprecated: use {new!r} (the semi-AR window length)",
                      DeprecationWarning, stacklevel=3)
        spec[new] = spec.pop(old)
    return spec


def decode(model, order: Order, x, answer, decoder="top_prob", extra=None, row_seeds=None) -> DecodeResult:
    return build_decoder(decoder).decode(model, order, x, answer, extra=extra, row_seeds=row_seeds)
