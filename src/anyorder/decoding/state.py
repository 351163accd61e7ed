"""What a decode carries from step to step (:class:`DecodeState`) and what it returns
(:class:`DecodeResult`). The loop that drives them is :mod:`anyorder.decoding.loop`.

Everything lives on the device of the tokens being decoded; ``commit``/``remask`` keep the trace
right (``finalize_step`` = step of the last commit) and feed the event log the viewer replays.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

import torch

from ..orders.base import Layout, Order
from .events import EventLog
from .sampling import row_generators
from .trace import Trace

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
    masked: torch.Tensor          # [B, L] bool: answer positions still masked (replaced, never written in place)
    answer: torch.Tensor          # [B, L] bool
    gens: List[torch.Generator]   # one generator per row
    window: torch.Tensor          # [B, L] semi-AR window of each answer position (-1 on prompt)
    n_windows: torch.Tensor       # [B]
    plan: torch.Tensor            # [B, 2] steps mode: masked count to split over the current window, steps taken there
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
    _active: Optional[tuple] = field(default=None, repr=False)  # (masked, active, rows, live)

    def active(self):
        """(active [B] bool: the rows with a hole; rows [R]: their indices, None when every row has
        one; live: the same indices as a host list). One host read per state of ``masked`` (a GPU
        decode syncs once per step for it: the loop needs to know whether to go on, which rows to
        forward, and which rows' generators draw)."""
        if self._active is None or self._active[0] is not self.masked:
            act = self.masked.any(-1)
            live = [b for b, a in enumerate(act.tolist()) if a]
            rows = None if len(live) == len(act) else torch.tensor(live, dtype=torch.long, device=act.device)
            self._active = (self.masked, act, rows, live)
        return self._active[1:]

    def reseed(self, phase: int) -> None:
        """Fresh per-row generators for a new phase of a decode (an edit round). A batched row
        that finished a phase early keeps drawing (unused) noise while the others go on; a
        row-by-row decode does not, so a later phase must not continue those streams."""
        self.gens = row_generators([(s * 1_000_003 + phase) % (2 ** 63) for s in self.seeds], self.x.device)

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
