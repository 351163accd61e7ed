"""Exact KV cache for decoding: per-position K/V buffers plus the bookkeeping that keeps them exact.

A position's hidden states (every layer) are a function of its token, its attention row, and the
hidden states of the keys in that row. So a K/V written for position i stays exact for as long as
(a) its token is unchanged, (b) its attention row is unchanged, and (c) every key it attends to
still holds an exact entry. The order declares which positions are worth storing
(``Order.frozen``: states that can no longer change); :meth:`KVCache.valid` re-checks (a)-(c)
every step anyway, so a wrong declaration or a decoder that re-masks a token costs a recompute,
never a wrong logit.

Layout: one buffer [2, B, H, L + 1, hd] per layer holding K (after RoPE, at each position's
true position) and V, indexed by sequence position; slot L is scratch for the padding queries
of rows that have fewer queries than others in the batch. Rows therefore freeze independently:
a row's cached set is just a [L] bool mask, and every query attends over all slots under a key
mask.
"""
from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch


class KVCache:
    def __init__(self, model, batch: int, length: int):
        cfg = model.cfg
        hd = cfg.d_model // cfg.n_heads
        p = next(model.parameters())
        self.length = length
        shape = (2, batch, cfg.n_heads, length + 1, hd)
        # one buffer a layer holds K then V (a pass writes both with one copy); k / v: views of it
        self.kv = [torch.zeros(shape, dtype=p.dtype, device=p.device) for _ in range(cfg.n_layers)]
        self.k = [b[0] for b in self.kv]
        self.v = [b[1] for b in self.kv]
        # which slots hold a kept entry, and the token and attention row it was computed with
        self.stored = torch.zeros(batch, length, dtype=torch.bool, device=p.device)
        self.tokens = torch.zeros(batch, length, dtype=torch.long, device=p.device)
        self.rows = torch.zeros(batch, length, length, dtype=torch.bool, device=p.device)

    def select(self, rows: torch.Tensor) -> "KVCache":
        """A copy of the batch rows ``rows`` [R] (indices), which :meth:`put` writes back: a pass
        can run on some rows only (a batched pass pads every row to the largest query count).
        A backbone's own cache state kept on this object (an HF model's slots) comes along."""
        sub = object.__new__(KVCache)
        sub.length = self.length
        sub.kv = [b.index_select(1, rows) for b in self.kv]
        sub.k, sub.v = [b[0] for b in sub.kv], [b[1] for b in sub.kv]
        sub.stored, sub.tokens, sub.rows = self.stored[rows], self.tokens[rows], self.rows[rows]
        for name, part in self.__dict__.items():
            if hasattr(part, "select_rows"):
                sub.__dict__[name] = part.select_rows(rows)
        return sub

    def put(self, rows: torch.Tensor, sub: "KVCache") -> None:
        """Write ``sub`` (:meth:`select` of ``rows``, since run) back into those rows."""
        for b, s in zip(self.kv, sub.kv):
            b.index_copy_(1, rows, s)
        for name in ("stored", "tokens", "rows"):
            getattr(self, name)[rows] = getattr(sub, name)
        for name, part in self.__dict__.items():
            if hasattr(part, "put_rows"):
                part.put_rows(rows, sub.__dict__[name])

    def valid(self, x: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        """[B, L] stored entries that are still exact for tokens ``x`` under ``attn`` [B, L, L];
        drops the others."""
        ok = self.stored & (x == self.tokens) & (self.rows == attn).all(-1)
        while True:  # an entry is exact only if every key it sees is (fixed point, a few rounds)
            new = ok & ~(attn & ~ok.unsqueeze(-2)).any(-1)
            if torch.equal(new, ok):
                break
            ok = new
        self.stored = ok
        return ok

    def store(self, where: torch.Tensor, x: torch.Tensor, attn: torch.Tensor) -> None:
        """Mark the K/V just written at ``where`` [B, L] as cached (they were computed this step)."""
        self.stored = self.stored | where
        self.tokens = torch.where(where, x, self.tokens)
        self.rows = torch.where(where.unsqueeze(-1), attn, self.rows)


def query_set(live: torch.Tensor, valid: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
    """[B, L] positions to run this step: the live ones without a valid entry, plus (transitively)
    every uncached key they attend to, since its K/V in every layer is needed too."""
    q = live & ~valid
    while True:
        new = q | ((attn & q.unsqueeze(-1)).any(-2) & ~valid)
        if torch.equal(new, q):
            return q
        q = new


def pack(q: torch.Tensor, scratch: int,
         known: Optional[Tuple[int, int]] = None) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, bool]:
    """Left-align each row's query positions: ``pos`` [B, Q] (0 on padding), ``slots`` [B, Q]
    (``scratch`` on padding), ``real`` [B, Q] bool, Q = the largest per-row count, and whether any
    row has padding (both counts in one read of the device, or ``known``: (largest, smallest)
    read by the caller with what else it needed)."""
    counts = q.sum(-1)
    if known is not None:
        n, least = known
    else:
        n, least = torch.stack([counts.max(), counts.min()]).tolist() if q.numel() else (0, 0)
    idx = torch.sort((~q).to(torch.int8), dim=-1, stable=True).indices[:, :n]  # True first, in order
    real = torch.arange(n, device=q.device).unsqueeze(0) < counts.unsqueeze(-1)
    pos = torch.where(real, idx, torch.zeros_like(idx))
    return pos, torch.where(real, idx, torch.full_like(idx, scratch)), real, least < n


def query_mask(attn: torch.Tensor, keys: torch.Tensor, pos: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    """[B, Q, L + 1] attention of the packed queries over the cache slots: the order's rows, limited
    to ``keys`` (valid or computed now); a padding query sees only the scratch slot (never all-False,
    which would give NaN, and NaN values in a slot would leak through 0-weight attention)."""
    B, L, _ = attn.shape
    rows = torch.gather(attn, 1, pos.unsqueeze(-1).expand(B, pos.shape[1], L)) & keys.unsqueeze(1)
    rows = rows & real.unsqueeze(-1)
    return torch.cat([rows, ~real.unsqueeze(-1)], dim=-1)


def select_extra(extra: Optional[Dict[str, torch.Tensor]], rows: torch.Tensor) -> Optional[Dict[str, torch.Tensor]]:
    """Task embedding ids ([B, L] or [L], shared by every row) of batch rows ``rows`` only."""
    return {k: v[rows] if v.dim() == 2 else v for k, v in extra.items()} if extra else extra


def gather_extra(extra: Optional[Dict[str, torch.Tensor]], pos: torch.Tensor) -> Optional[Dict[str, torch.Tensor]]:
    """Task embedding ids ([B, L] or [L]) at the packed query positions."""
    if not extra:
        return extra
    B = pos.shape[0]
    return {k: torch.gather(v if v.dim() == 2 else v.unsqueeze(0).expand(B, -1), 1, pos) for k, v in extra.items()}
