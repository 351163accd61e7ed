"""Every event of a decode: which positions were committed, re-masked or edited at each step,
with the token, its confidence and (optionally) the model's top alternatives there.

Recording is cheap: :class:`EventLog` keeps the dense ``[B, L]`` tensors the loop already made
(no ``.item()``, no ``nonzero``) and compacts them to a sparse list once every ``flush_every``
records and at the end -- so a GPU decode syncs with the host once per ``flush_every`` steps,
not every step -- and the pending memory stays bounded.

Kinds (one event per (row, position) and record call):

- ``COMMIT`` (0): a token was written at a position that held none, or held the same token
  before it was re-masked;
- ``REMASK`` (1): [MASK] was put back at a committed position (``remask``, ``edit``);
- ``EDIT`` (2): a token was written at a position whose previous committed token was different
  (an ``edit`` correction, a ``remask`` re-decode that changed its mind).

``step`` is the row's own step count (the ``finalize_step`` of the trace); events of one step
are applied in record order. The trace's ``finalize_step`` is the step of a position's last
COMMIT/EDIT and ``confidence`` its probability then: :meth:`Events.finalize` rebuilds both.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

import torch

COMMIT, REMASK, EDIT = 0, 1, 2
KIND_NAMES = ("commit", "remask", "edit")
FIELDS = ("row", "step", "pos", "kind", "token", "conf", "order")
HOST = torch.device("cpu")  # where the compacted events are kept


@dataclass
class Events:
    """A decode's events, sparse, sorted by (row, record order). ``alt_token``/``alt_prob``
    [E, K]: the K most probable tokens at the position when it was committed (K = 0: not kept;
    -1 / 0 on re-mask events)."""

    row: torch.Tensor        # [E] long
    step: torch.Tensor       # [E] long: the row's step
    pos: torch.Tensor        # [E] long
    kind: torch.Tensor       # [E] long: COMMIT / REMASK / EDIT
    token: torch.Tensor      # [E] long (-1 on REMASK)
    conf: torch.Tensor       # [E] float64 (0 on REMASK)
    order: torch.Tensor      # [E] long: record index (ties inside a step keep this order)
    alt_token: torch.Tensor  # [E, K] long
    alt_prob: torch.Tensor   # [E, K] float32

    def finalize(self, shape: Tuple[int, int]) -> Tuple[torch.Tensor, torch.Tensor]:
        """(finalize_step [B, L], confidence [B, L]) from the events: each position's last
        commit or edit (-1 / 0 where none)."""
        fin = torch.full(shape, -1, dtype=torch.long)
        conf = torch.zeros(shape, dtype=torch.float64)
        keep = self.kind != REMASK
        idx = torch.argsort(self.order[keep], stable=True)
        step, c = self.step[keep][idx], self.conf[keep][idx]
        flat = self.row[keep][idx] * shape[1] + self.pos[keep][idx]
        # per position, the index of its last write (a later record wins)
        last = torch.full((shape[0] * shape[1],), -1, dtype=torch.long).scatter_reduce_(
            0, flat, torch.arange(len(flat)), reduce="amax", include_self=True)
        hit = last >= 0
        fin.view(-1)[hit] = step[last[hit]]
        conf.view(-1)[hit] = c[last[hit]]
        return fin, conf

    def committed_count(self, b: int, step: int, answer_len: Optional[int] = None) -> int:
        """Positions of row ``b`` holding a committed token after every event of steps <= ``step``."""
        sel = (self.row == b) & (self.step <= step)
        state: Dict[int, bool] = {}
        for o, p, k in sorted(zip(self.order[sel].tolist(), self.pos[sel].tolist(), self.kind[sel].tolist())):
            state[p] = k != REMASK
        return sum(state.values())

    def rows(self, b: int) -> "Events":
        sel = self.row == b
        return Events(*(getattr(self, f)[sel] for f in FIELDS), self.alt_token[sel], self.alt_prob[sel])

    def tensors(self, prefix: str = "events.") -> Dict[str, torch.Tensor]:
        out = {prefix + f: getattr(self, f).contiguous() for f in FIELDS}
        out[prefix + "alt_token"] = self.alt_token.contiguous()
        out[prefix + "alt_prob"] = self.alt_prob.contiguous()
        return out

    @classmethod
    def from_tensors(cls, t: Dict[str, torch.Tensor], prefix: str = "events.") -> "Events":
        return cls(*(t[prefix + f] for f in FIELDS), t[prefix + "alt_token"], t[prefix + "alt_prob"])

    @classmethod
    def cat(cls, parts: List["Events"], row_offsets: List[int]) -> "Events":
        """Concatenate the events of consecutive batches (row b of part i becomes row b + offset i)."""
        off = 0
        orders = []
        for e in parts:  # record indices stay increasing across the parts
            orders.append(e.order + off)
            off += int(e.order.max()) + 1 if len(e.order) else 0
        return cls(torch.cat([e.row + o for e, o in zip(parts, row_offsets)]), *(torch.cat([getattr(e, f) for e in parts])
                   for f in ("step", "pos", "kind", "token", "conf")), torch.cat(orders),
                   torch.cat([e.alt_token for e in parts]), torch.cat([e.alt_prob for e in parts]))


class EventLog:
    """Collects a decode's events (see the module docstring). ``alternatives`` = K top tokens kept
    per committed position (0: none); ``on_step(state)`` is called at the end of each step (a
    live viewer; it may call :meth:`drain`)."""

    def __init__(self, shape: Tuple[int, int], device, alternatives: int = 0,
                 on_step: Optional[Callable] = None, flush_every: int = 16, initial: Optional[torch.Tensor] = None):
        self.shape, self.alternatives, self.on_step, self.flush_every = shape, int(alternatives), on_step, flush_every
        # the last committed token per position (-1: none; answer tokens given in the input count)
        self.last_token = torch.full(shape, -1, dtype=torch.long, device=device) if initial is None else initial
        self.pending: List[tuple] = []
        self.parts: List[Events] = []
        self.drained = 0
        self.n_records = 0
        self.alt: Optional[Tuple[torch.Tensor, torch.Tensor]] = None  # top-K of the last proposal

    def propose(self, dist) -> None:
        """Remember the top-K tokens and probabilities of this step's distribution (a
        :class:`~anyorder.decoding.dist.StepDist`) at its commit candidates, the only positions a
        step commits (only when K > 0: it costs a top-K over the vocabulary there)."""
        if self.alternatives > 0:
            where = dist.where
            k = min(self.alternatives, dist.shape[-1])
            v, i = dist.logits_at(where).topk(k, dim=-1)
            # probabilities as the trace's confidences are computed (StepDist.normaliser), so the
            # top alternative of a greedy commit carries exactly the committed confidence
            m, z = dist.normaliser(where, top=v[:, 0])
            p = torch.exp((v.double() - m.double().unsqueeze(-1)) - torch.log(z).unsqueeze(-1))
            tok = torch.full((*where.shape, k), -1, dtype=torch.long, device=where.device)
            prob = torch.zeros((*where.shape, k), dtype=torch.float32, device=where.device)
            tok[where], prob[where] = i, p.float()
            self.alt = (tok, prob)

    def commit(self, where: torch.Tensor, tokens: torch.Tensor, conf: torch.Tensor, step: torch.Tensor) -> None:
        changed = (self.last_token >= 0) & (self.last_token != tokens)
        kind = torch.where(changed, EDIT, COMMIT)
        self.last_token = torch.where(where, tokens, self.last_token)
        alt = self.alt if self.alternatives > 0 else None
        self._record(where, kind, tokens, conf.double(), step, alt)

    def remask(self, where: torch.Tensor, step: torch.Tensor) -> None:
        self._record(where, torch.full_like(self.last_token, REMASK), torch.full_like(self.last_token, -1),
                     torch.zeros(self.shape, dtype=torch.float64, device=where.device), step, None)

    def _record(self, where, kind, token, conf, step, alt) -> None:
        self.pending.append((where, kind, token, conf, step, alt, self.n_records))
        self.n_records += 1
        if len(self.pending) >= self.flush_every:
            self.flush()

    def flush(self) -> None:
        """Compact the pending dense records into sparse events (one host sync)."""
        if not self.pending:
            return
        K = max(self.alternatives, 0)
        where = torch.stack([p[0] for p in self.pending])                      # [N, B, L]
        n, r, pos = where.nonzero(as_tuple=True)

        def pick(i, fill_dtype):
            return torch.stack([p[i] for p in self.pending])[n, r, pos].cpu().to(fill_dtype)

        kind, token = pick(1, torch.long), pick(2, torch.long)
        conf = pick(3, torch.float64)
        step = torch.stack([p[4] for p in self.pending])[n, r].cpu().long()
        # the sparse events live on the host (they are read there: saved, viewed, summarised)
        order = torch.tensor([p[6] for p in self.pending], dtype=torch.long, device=HOST)[n.cpu()]
        alt_t = torch.full((len(n), K), -1, dtype=torch.long, device=HOST)
        alt_p = torch.zeros(len(n), K, dtype=torch.float32, device=HOST)
        if K:
            for j, p in enumerate(self.pending):
                if p[5] is None:
                    continue
                m = (n == j)
                ai, ap = p[5]
                kk = ai.shape[-1]
                alt_t[m.cpu(), :kk] = ai[r[m], pos[m]].cpu().long()
                alt_p[m.cpu(), :kk] = ap[r[m], pos[m]].cpu().float()
        self.parts.append(Events(r.cpu(), step, pos.cpu(), kind, token, conf, order, alt_t, alt_p))
        self.pending = []

    def end_step(self, state) -> None:
        if self.on_step is not None:
            self.on_step(state)

    def drain(self) -> Events:
        """The events recorded since the last drain (for streaming)."""
        self.flush()
        new = self.parts[self.drained:]
        self.drained = len(self.parts)
        return _join(new, self.alternatives)

    def finish(self) -> Events:
        self.flush()
        out = _join(self.parts, self.alternatives)
        idx = torch.argsort(out.row * (self.n_records + 1) + out.order, stable=True)
        return Events(*(getattr(out, f)[idx] for f in FIELDS), out.alt_token[idx], out.alt_prob[idx])


def _join(parts: List[Events], K: int) -> Events:
    if not parts:
        e = torch.zeros(0, dtype=torch.long, device=HOST)
        return Events(e, e, e, e, e, torch.zeros(0, dtype=torch.float64, device=HOST), e,
                      torch.zeros(0, K, dtype=torch.long, device=HOST), torch.zeros(0, K, dtype=torch.float32, device=HOST))
    return Events(*(torch.cat([getattr(p, f) for p in parts]) for f in FIELDS),
                  torch.cat([p.alt_token for p in parts]), torch.cat([p.alt_prob for p in parts]))
