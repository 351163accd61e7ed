"""One decoding loop for every order (SPEC §5).

    repeat until no masked answer position is left:
        forward pass under the order's attention for the current state
        propose a token for every position (greedy or float64 Gumbel-max)
        allowed  = masked ∩ what the order permits now ∩ the current semi-AR window
        score the allowed positions (random / top_prob / margin / entropy / left_to_right)
        commit the n best, n from the commit schedule (k per step, or LLaDA's even split)
        record, per committed position, the step and its confidence (the trace)

The order decides *where* it is legal to commit (AR: the leftmost hole; block diffusion: the
current block; Jigsaw: the block its probe picked, left to right; Scatter: the current column);
the decoder decides *which* and *how many*. A new decoder subclasses :class:`Decoder` and
overrides :meth:`Decoder.select` (or just sets ``score``) and registers itself by name.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional

import torch
import torch.nn.functional as F

from ..orders.base import Layout, Order
from ..registry import Registry
from .sampling import row_generators, sample_tokens
from .scores import SCORES
from .trace import Trace

DECODERS: Registry = Registry("decoder")


@dataclass
class DecodeResult:
    tokens: torch.Tensor
    trace: Trace


class Decoder:
    """Commit-by-score decoder.

    k:           tokens committed per step (default 1 when ``steps`` is not given)
    steps:       total steps; split evenly over semi-AR windows, and inside a window the tokens
                 are split evenly over its steps, remainder first (LLaDA's schedule)
    block_size:  semi-AR window length over the answer (None: the whole answer at once)
    temperature, top_k, top_p: token sampling (0 = greedy)
    seed:        row b uses generator seed ``seed + b`` unless ``row_seeds`` is given to decode()
    """

    score: str = "top_prob"

    def __init__(self, k: Optional[int] = None, steps: Optional[int] = None, block_size: Optional[int] = None,
                 temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, seed: int = 0,
                 score: Optional[str] = None, cache: bool = False):
        if k is not None and steps is not None:
            raise ValueError("give either decoder.k (tokens per step) or decoder.steps, not both")
        if k is not None and int(k) < 1:
            raise ValueError(f"decoder.k must be >= 1, got {k}")
        if steps is not None and int(steps) < 1:
            raise ValueError(f"decoder.steps must be >= 1, got {steps}")
        if block_size is not None and int(block_size) < 1:
            raise ValueError(f"decoder.block_size must be >= 1, got {block_size}")
        if not 0 < top_p <= 1:
            raise ValueError(f"decoder.top_p must be in (0, 1], got {top_p}")
        if score is not None:
            SCORES.get(score)  # validate early, with the valid choices in the error
            self.score = score
        self.k = None if k is None else int(k)
        self.steps = None if steps is None else int(steps)
        self.block_size = None if block_size is None else int(block_size)
        self.temperature, self.top_k, self.top_p, self.seed = float(temperature), int(top_k), float(top_p), int(seed)
        self.cache = bool(cache)

    def make_forward(self, model, order: Order, layout: Layout, extra=None):
        """``forward(x, masked) -> logits`` for this decode: the plain full pass under the order's
        attention, or (``cache=True``) an exact KV-cached pass where the order allows one."""
        from .forward import cached_forward, uncached_forward

        return (cached_forward if self.cache else uncached_forward)(model, order, layout, extra)

    # -- pieces a subclass may override -------------------------------------------------
    def scores(self, probs, x0, layout, gens) -> torch.Tensor:
        return SCORES.get(self.score)(probs, x0, layout, gens)

    def select(self, score: torch.Tensor, allowed: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
        """The n highest-scoring allowed positions per row (ties: leftmost first)."""
        key = torch.where(allowed, -score, torch.full_like(score, float("inf")))
        order = torch.sort(key, dim=-1, stable=True).indices
        rank = torch.empty_like(order).scatter_(-1, order, torch.arange(order.shape[-1]).expand_as(order))
        return allowed & (rank < n.unsqueeze(-1))

    # -- the loop -------------------------------------------------------------------------
    @torch.no_grad()
    def decode(self, model, order: Order, x: torch.Tensor, answer: torch.Tensor,
               extra: Optional[Dict[str, torch.Tensor]] = None, row_seeds: Optional[List[int]] = None,
               max_steps: Optional[int] = None) -> DecodeResult:
        mask_id = model.cfg.mask_id
        x = x.clone()
        B, L = x.shape
        answer = answer.bool()
        layout = order.layout(answer)
        masked = answer & (x == mask_id)
        gens = row_generators(row_seeds if row_seeds is not None else [self.seed + b for b in range(B)])
        if len(gens) != B:
            raise ValueError(f"row_seeds has {len(gens)} seeds for a batch of {B} rows")
        window_size = self.block_size or int(layout.n_answer.max().clamp_min(1))
        window = torch.where(answer, layout.aidx // window_size, -1)
        n_windows = (layout.n_answer + window_size - 1) // window_size
        if self.steps is not None and int(n_windows.max()) > 0 and self.steps % int(n_windows.max()) != 0:
            raise ValueError(f"decoder.steps={self.steps} must be a multiple of the number of semi-AR "
                             f"blocks ({int(n_windows.max())})")
        plan: List[List[int]] = [[] for _ in range(B)]   # per-row commit counts left in the current window
        cur_window = torch.full((B,), -1, dtype=torch.long)
        finalize = torch.full((B, L), -1, dtype=torch.long)
        conf = torch.zeros(B, L, dtype=torch.float64)
        nfe = torch.zeros(B, dtype=torch.long)
        limit = max_steps or 4 * L * max(1, self.steps or 1) + 16
        forward = self.make_forward(model, order, layout, extra)
        step = 0
        while masked.any():
            if step >= limit:
                raise RuntimeError(f"decoding did not finish in {limit} steps (order {order.name!r})")
            active = masked.any(-1)
            logits = forward(x, masked)
            logp = F.log_softmax(logits.double(), dim=-1)
            probs = logp.exp()
            x0 = sample_tokens(logits, self.temperature, gens, self.top_k, self.top_p)
            # the semi-AR window of each row: the first window that still has holes
            big = torch.iinfo(torch.long).max
            win = torch.where(masked, window, torch.full_like(window, big)).min(-1).values
            allowed = order.allowed(masked, layout, logp)
            in_win = allowed & (window == win.unsqueeze(-1))
            allowed = torch.where(in_win.any(-1, keepdim=True), in_win, allowed)
            n = self._counts(masked, window, win, cur_window, plan, allowed, n_windows)
            commit = self.select(self.scores(probs, x0, layout, gens), allowed, n) & active.unsqueeze(-1)
            x = torch.where(commit, x0, x)
            conf = torch.where(commit, probs.gather(-1, x0.unsqueeze(-1)).squeeze(-1), conf)
            finalize = torch.where(commit, torch.full_like(finalize, step), finalize)
            masked = masked & ~commit
            nfe += active.long()
            step += 1
        return DecodeResult(x, Trace(finalize, conf, answer, nfe))

    def _counts(self, masked, window, win, cur_window, plan, allowed, n_windows) -> torch.Tensor:
        B = masked.shape[0]
        n_allowed = allowed.sum(-1)
        if self.steps is None:
            return torch.clamp(n_allowed, max=self.k or 1)
        out = torch.zeros(B, dtype=torch.long)
        for b in range(B):
            if not masked[b].any():
                continue
            if int(win[b]) != int(cur_window[b]):  # entering a new window: LLaDA's even split
                cur_window[b] = win[b]
                m = int((masked[b] & (window[b] == win[b])).sum())
                spb = self.steps // max(int(n_windows[b]), 1)
                base, r = divmod(m, spb)
                plan[b] = [base + 1 if i < r else base for i in range(spb)]
            want = plan[b].pop(0) if plan[b] else 1  # an order that commits fewer may need extra steps
            out[b] = min(want, int(n_allowed[b]))
        return out


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


def build_decoder(spec) -> Decoder:
    """``"margin"`` or ``{"name": "top_prob", "k": 2, "temperature": 0.7}``."""
    if isinstance(spec, Decoder):
        return spec
    if isinstance(spec, str):
        return DECODERS.get(spec)()
    spec = dict(spec)
    return DECODERS.get(spec.pop("name"))(**spec)


def decode(model, order: Order, x, answer, decoder="top_prob", extra=None, row_seeds=None) -> DecodeResult:
    return build_decoder(decoder).decode(model, order, x, answer, extra=extra, row_seeds=row_seeds)
