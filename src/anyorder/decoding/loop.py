"""One decoding loop for every order.

    repeat until no masked answer position is left:
        forward pass under the order's attention for the current state
        propose a token for every position (greedy or float64 Gumbel-max)
        allowed  = masked ∩ what the order permits now ∩ the current semi-AR window
        score the allowed positions (random / top_prob / margin / entropy / left_to_right)
        commit the n best, n from the commit schedule (k per step, or LLaDA's even split:
            Nie et al., 2025, arXiv 2502.09992)
        record, per committed position, the step and its confidence (the trace)

The order decides *where* it is legal to commit (AR: the leftmost hole; block diffusion: the
current block; Jigsaw: the block its probe picked, left to right; Scatter: the current column);
the decoder decides *which* and *how many*. A new decoder subclasses :class:`Decoder` and
overrides one of the hooks, from the smallest to the largest:

    scores(probs, proposal, layout, gens)     which positions first (or just set ``score``)
    windows(layout)                           the semi-AR windows (scatter_offsets: the columns)
    allowed(state, logp)                      where (jigsaw_entropy: the lowest-entropy block)
    counts(state, allowed)                    how many this step
    choose(state, probs, proposal, allowed)   the commit set itself (threshold)
    fill(state, commit, logp, proposal)       the tokens written there (beam)
    step(state, forward)                      one whole step (random_init)
    run(state, forward)                       the whole loop (ancestral, remask, edit)

``proposal`` [B, L] is the token the step proposes at every position (greedy or sampled);
a hook decides where, and how many of, the proposals are committed.

Everything a decode carries from step to step lives in a :class:`DecodeState`; its
``commit``/``remask`` keep the trace right (``finalize_step`` = step of the last commit).
Decoders in other files of this package (threshold, ancestral, remask, edit, random_init,
beam, jigsaw_entropy, scatter_offsets) are built on these hooks.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

import torch
import torch.nn.functional as F

from ..checks import check_float, check_int, in_range, show
from ..orders.base import Layout, Order
from ..registry import Registry
from .approx_cache import cache_spec
from .sampling import row_generators, sample_tokens
from .scores import SCORES
from .events import EventLog
from .trace import Trace

DECODERS: Registry = Registry("decoder")
_BIG = torch.iinfo(torch.long).max


@dataclass
class DecodeResult:
    tokens: torch.Tensor
    trace: Trace


@dataclass
class DecodeState:
    """The state of one (batched) decode. Row b only ever reads row b, and draws randomness
    only from ``gens[b]``: that is what makes a batch decode exactly as its rows one by one."""

    model: torch.nn.Module
    order: Order
    layout: Layout
    extra: Optional[Dict[str, torch.Tensor]]
    x: torch.Tensor               # [B, L] current tokens (mask_id where masked)
    masked: torch.Tensor          # [B, L] bool: answer positions still masked
    answer: torch.Tensor          # [B, L] bool
    gens: List[torch.Generator]   # one generator per row
    window: torch.Tensor          # [B, L] semi-AR window of each answer position (-1 on prompt)
    n_windows: torch.Tensor       # [B]
    plan: List[List[int]]         # per-row commit counts left in the current window (steps mode)
    cur_window: torch.Tensor      # [B] the window the plan was made for
    finalize: torch.Tensor        # [B, L] step of the last commit (-1: never committed)
    conf: torch.Tensor            # [B, L] probability of the committed token then
    nfe: torch.Tensor             # [B] forward passes this row needed
    limit: int
    step: int = 0                 # steps taken by the batch
    row_step: Optional[torch.Tensor] = None  # [B] steps taken by each row (while it had holes)
    info: Dict[str, Any] = field(default_factory=dict)  # decoder-specific (phase, counters)
    seeds: List[int] = field(default_factory=list)        # the row seeds gens were made from
    events: Optional[EventLog] = None   # every commit / re-mask / edit (decoding/events.py)

    def reseed(self, phase: int) -> None:
        """Fresh per-row generators for a new phase of a decode (an edit round). A batched row
        that finished a phase early keeps drawing (unused) noise while the others go on; a
        row-by-row decode does not, so a later phase must not continue those streams."""
        self.gens = row_generators([(s * 1_000_003 + phase) % (2 ** 63) for s in self.seeds])

    @property
    def mask_id(self) -> int:
        return int(self.model.cfg.mask_id)

    def current_window(self, masked: Optional[torch.Tensor] = None) -> torch.Tensor:
        """[B] the first semi-AR window that still has holes (a huge number if none)."""
        masked = self.masked if masked is None else masked
        return torch.where(masked, self.window, torch.full_like(self.window, _BIG)).min(-1).values

    def commit(self, where: torch.Tensor, tokens: torch.Tensor, conf: torch.Tensor) -> None:
        """Write ``tokens`` at ``where``; record this step and the confidence ``conf`` [B, L]."""
        self.x = torch.where(where, tokens, self.x)
        self.conf = torch.where(where, conf, self.conf)
        # the row's own step count, not the batch's: a row that waited (an edit round that
        # started later in the batch) records the same steps as when decoded alone
        self.finalize = torch.where(where, self.row_step.unsqueeze(-1).expand_as(self.finalize), self.finalize)
        self.masked = self.masked & ~where
        if self.events is not None:
            self.events.commit(where, tokens, conf, self.row_step)

    def remask(self, where: torch.Tensor) -> None:
        """Put [MASK] back at ``where`` (answer positions only). The position's trace entry is
        rewritten when it is committed again: its finalisation is the last commit."""
        where = where & self.answer
        self.x = torch.where(where, torch.full_like(self.x, self.mask_id), self.x)
        self.masked = self.masked | where
        if self.events is not None:
            self.events.remask(where, self.row_step)

    def advance(self, active: torch.Tensor) -> None:
        """End a step: ``active`` [B] rows took part in it."""
        self.step += 1
        self.row_step = self.row_step + active.long()
        if self.events is not None:
            self.events.end_step(self)

    def check_limit(self) -> None:
        if self.step >= self.limit:
            raise RuntimeError(f"decoding did not finish in {self.limit} steps (order {self.order.name!r})")

    def trace(self) -> Trace:
        return Trace(self.finalize, self.conf, self.answer, self.nfe,
                     None if self.events is None else self.events.finish())


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
    """

    score: str = "top_prob"
    # what the trace's event log keeps (not decoder options: they never change a decode)
    record_events: bool = True  # keep trace.events (False: finalize_step / confidence only)
    alternatives: int = 0      # top-K tokens kept per committed position
    on_step = None             # called with the state after every step (the live viewer)

    def __init__(self, k: Optional[int] = None, steps: Optional[int] = None, window: Optional[int] = None,
                 temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, seed: int = 0,
                 score: Optional[str] = None, cache=False, cache_tol: Optional[float] = None,
                 cache_every: Optional[int] = None):
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
        self.cache_spec = cache_spec(cache, cache_tol, cache_every)  # approx_cache.py
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
        def forward(x, masked):
            return self.make_forward(st.model, st.order, st.layout, st.extra)(x, masked)

        return forward

    # -- pieces a subclass may override -------------------------------------------------
    def scores(self, probs, proposal, layout, gens) -> torch.Tensor:
        return SCORES.get(self.score)(probs, proposal, layout, gens)

    def select(self, score: torch.Tensor, allowed: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
        """The n highest-scoring allowed positions per row (ties: leftmost first)."""
        key = torch.where(allowed, -score, torch.full_like(score, float("inf")))
        order = torch.sort(key, dim=-1, stable=True).indices
        rank = torch.empty_like(order).scatter_(-1, order, torch.arange(order.shape[-1]).expand_as(order))
        return allowed & (rank < n.unsqueeze(-1))

    def propose(self, logits: torch.Tensor, st: DecodeState):
        """float64 log-probs and probs of the model, and the proposed token at every position."""
        logp = F.log_softmax(logits.double(), dim=-1)
        if st.events is not None:
            st.events.propose(logp)
        return logp, logp.exp(), sample_tokens(logits, self.temperature, st.gens, self.top_k, self.top_p)

    def allowed(self, st: DecodeState, logp: torch.Tensor, masked: Optional[torch.Tensor] = None) -> torch.Tensor:
        """What the order permits now, restricted to the current semi-AR window when that window
        has an allowed position (an order may point elsewhere, e.g. Jigsaw's probe)."""
        masked = st.masked if masked is None else masked
        allowed = st.order.allowed(masked, st.layout, logp)
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
        n_allowed = allowed.sum(-1)
        win = st.current_window()
        out = torch.zeros(st.x.shape[0], dtype=torch.long)
        for b in range(st.x.shape[0]):
            if not st.masked[b].any():
                continue
            if int(win[b]) != int(st.cur_window[b]):  # entering a new window: plan it
                st.cur_window[b] = win[b]
                m = int((st.masked[b] & (st.window[b] == win[b])).sum())
                st.plan[b] = even_split(m, int(steps_per_window[b]))
            want = st.plan[b].pop(0) if st.plan[b] else 1
            out[b] = min(max(want, at_least), int(n_allowed[b]))
        return out

    def choose(self, st: DecodeState, probs, proposal, allowed) -> torch.Tensor:
        """[B, L] bool: the positions committed this step."""
        return self.select(self.scores(probs, proposal, st.layout, st.gens), allowed, self.counts(st, allowed))

    def fill(self, st: DecodeState, commit, logp, proposal):
        """The tokens written at ``commit`` and their confidence: the proposals, by default
        (beam search replaces them by the jointly best combination)."""
        return proposal, logp.exp().gather(-1, proposal.unsqueeze(-1)).squeeze(-1)

    # -- the loop -------------------------------------------------------------------------
    def start(self, model, order: Order, x: torch.Tensor, answer: torch.Tensor,
              extra: Optional[Dict[str, torch.Tensor]] = None, row_seeds: Optional[List[int]] = None,
              max_steps: Optional[int] = None) -> DecodeState:
        mask_id = model.cfg.mask_id
        x = x.clone()
        B, L = x.shape
        answer = answer.bool()
        layout = order.layout(answer)
        masked = answer & (x == mask_id)
        seeds = [int(s) for s in (row_seeds if row_seeds is not None else [self.seed + b for b in range(B)])]
        gens = row_generators(seeds)
        if len(gens) != B:
            raise ValueError(f"row_seeds has {len(gens)} seeds for a batch of {B} rows")
        window = self.windows(layout)
        n_windows = torch.where(answer, window + 1, 0).max(-1).values
        if self.steps is not None and int(n_windows.max()) > 0 and self.steps % int(n_windows.max()) != 0:
            raise ValueError(f"decoder.steps={self.steps} must be a multiple of the number of semi-AR "
                             f"windows ({int(n_windows.max())})")
        return DecodeState(
            model=model, order=order, layout=layout, extra=extra, x=x, masked=masked, answer=answer, gens=gens,
            window=window, n_windows=n_windows, plan=[[] for _ in range(B)],
            cur_window=torch.full((B,), -1, dtype=torch.long),
            finalize=torch.full((B, L), -1, dtype=torch.long), conf=torch.zeros(B, L, dtype=torch.float64),
            nfe=torch.zeros(B, dtype=torch.long), limit=max_steps or 4 * L * max(1, self.steps or 1) + 16,
            seeds=seeds, row_step=torch.zeros(B, dtype=torch.long),
            events=EventLog((B, L), x.device, self.alternatives, self.on_step,
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
        while st.masked.any():
            st.check_limit()
            active = st.masked.any(-1)
            self.step(st, forward)
            st.advance(active)

    def step(self, st: DecodeState, forward) -> None:
        """One forward pass, one commit."""
        x, masked = st.x, st.masked
        active = masked.any(-1)
        logits = forward(x, masked)
        logp, probs, proposal = self.propose(logits, st)
        allowed = self.allowed(st, logp)
        commit = self.choose(st, probs, proposal, allowed) & active.unsqueeze(-1)
        st.commit(commit, *self.fill(st, commit, logp, proposal))
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
