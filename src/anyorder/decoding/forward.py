"""The forward pass a decoder calls each step: ``forward(x, masked, rows=None, where=None) -> logits``.

``logits`` is [B, L, V]; with ``rows`` [R] it is [R, L, V], those batch rows only (the loop leaves
finished rows out: rows never mix, so the others' logits do not change); with ``where`` [B, L]
bool a forward may return the [N, V] logits of those positions only, row-major (the output head
runs there only), or ignore it and return every position's.

``uncached_forward`` runs the whole sequence under the order's attention for the current state.
``cached_forward`` (``Decoder(cache=True)``) is the exact KV-cached variant: each step it runs
only the positions whose logits the order can use now (``Order.live``) plus, transitively, the
uncached keys they attend to; positions the order declares frozen (``Order.frozen``) are stored
after they are computed in their final state and never run again. See model/kv_cache.py for why
that is exact, and docs/kv_cache.md for which orders cache what.
"""
from __future__ import annotations

import torch

from ..model.kv_cache import KVCache, gather_extra, pack, query_mask, query_set, select_extra


def uncached_forward(model, order, layout, extra=None):
    def forward(x, masked, rows=None, where=None):
        lay, ex = layout, extra
        if rows is not None:  # only these rows run
            x, masked, lay = x[rows], masked[rows], layout.select(rows)
            ex = select_extra(extra, rows)
            where = None if where is None else where[rows]
        attn = order.decode_attention(masked, lay)
        if where is not None and hasattr(model, "logits_at"):
            return model.logits_at(x, where, attn_mask=attn, extra=ex)
        return model(x, attn_mask=attn, extra=ex)

    return forward


class CachedForward:
    """``forward(x, masked) -> logits [B, L, V]``, exact at live and frozen positions.

    The first call runs every position (one full pass), so its logits are exact everywhere and a
    forward used once (``Decoder.probe_forward``) is a plain exact pass. Later calls run only
    the order's live positions and what they need: live positions get this state's logits; a
    frozen position keeps the logits computed when it froze (its state cannot change, so they
    are this state's too); any other position keeps the last logits computed for it. The
    decoding loop reads only what the order's ``allowed`` reads and permits, which
    ``Order.live`` covers. Rows with nothing left to commit run nothing after the first call.
    ``query_tokens`` / ``calls`` count the work done (for tests and benchmarks).
    """

    def __init__(self, model, order, layout, extra=None):
        self.model, self.order, self.layout, self.extra = model, order, layout, extra
        self.cache = None
        self.out = None
        self.counts = QueryCounts()

    query_tokens = property(lambda self: self.counts.tokens)
    calls = property(lambda self: self.counts.calls)

    def __call__(self, x: torch.Tensor, masked: torch.Tensor, rows=None, where=None) -> torch.Tensor:
        B, L = x.shape
        if self.cache is None:
            self.cache = KVCache(self.model, B, L)
            self.out = SlotOutputs(self.model, B, L, x.device)
        attn = full_attention(self.order.decode_attention(masked, self.layout), B, L, x.device)
        if self.counts.calls == 0:  # a full pass
            live = torch.ones_like(masked)
        else:
            live = self.order.live(masked, self.layout)
            live = torch.ones_like(masked) if live is None else live
            live = live & masked.any(-1, keepdim=True)  # a finished row needs no logits
        valid = self.cache.valid(x, attn)
        q = query_set(live, valid, attn)
        self.counts.add(run_queries(self.model, self.cache, self.out, x, q, attn, valid | q, self.extra))
        # K/V just computed in a state they can no longer leave: keep them
        self.cache.store(q & self.order.frozen(masked, self.layout), x, attn)
        return self.out.read(rows, where)  # finished rows ran nothing


class QueryCounts:
    """Query tokens run and passes made by a cached forward, kept as a tensor (reading a count
    every step would be a host sync on a GPU; it is read when asked)."""

    def __init__(self):
        self.calls, self._tokens = 0, 0

    def add(self, n) -> None:
        if n is not None:
            self.calls += 1
            self._tokens = self._tokens + n

    @property
    def tokens(self) -> int:
        return int(self._tokens)


class SlotOutputs:
    """What a cached forward keeps of each position's last pass: its final hidden state (a
    [B, L + 1, D] buffer, slot L scratch for padding queries), and the output head applied only
    where a step reads. A decoder reads the positions it may commit (``where``); at a large
    vocabulary the head is much of a small pass, and the positions a pass runs but no step reads
    (a window's committed tokens, a refresh's other windows) never pay for it. Logits of every
    position (a read without ``where``) are kept in a [B, L, V] buffer made on the first such
    read and updated only where a pass has run since: row by row the same logits as applying the
    head right after each pass."""

    def __init__(self, model, B: int, L: int, device):
        self.model, self.L = model, L
        self.h = None                                    # made by the first write (its dtype, width)
        self.logits = None
        self.stale = torch.ones(B, L, dtype=torch.bool, device=device)  # logits behind h
        self.row_start = torch.arange(B, device=device).unsqueeze(-1) * (L + 1)  # each row's first slot in h

    def write(self, slots: torch.Tensor, h: torch.Tensor, ran: torch.Tensor, rows=None) -> None:
        """Hidden states ``h`` [B, Q, D] of the queries at ``slots`` [B, Q] (L: padding), which
        are the positions ``ran`` [B, L]; with ``rows`` [R] (indices), of those batch rows only
        (``h`` [R, Q, D], ``slots`` [R, Q], ``ran`` [R, L])."""
        B, D = self.stale.shape[0], h.shape[-1]
        if self.h is None:
            self.h = h.new_zeros(B, self.L + 1, D)
        flat = (slots + (self.row_start if rows is None else self.row_start[rows])).flatten()
        self.h.view(B * (self.L + 1), D).index_copy_(0, flat, h.flatten(0, 1).to(self.h.dtype))
        if self.logits is not None:
            if rows is None:
                self.stale |= ran
            else:
                self.stale[rows] |= ran

    def read(self, rows=None, where=None) -> torch.Tensor:
        """By the forward protocol: [N, V] at ``where`` (the head there only), else [R, L, V] of
        ``rows``, else [B, L, V] (a copy: the buffer changes on the next pass)."""
        h = self.h[:, :self.L]
        if where is not None:
            return self.model.head_logits(h[where])
        if self.logits is None:
            self.logits = self.model.head_logits(h)
            self.stale.zero_()
        elif bool(self.stale.any()):
            self.logits[self.stale] = self.model.head_logits(h[self.stale])
            self.stale.zero_()
        return self.logits.clone() if rows is None else self.logits[rows]


def full_attention(attn, B: int, L: int, device) -> torch.Tensor:
    """[B, L, L] bool attention rows (an order's ``None`` = every position sees every other)."""
    return torch.ones(B, L, L, dtype=torch.bool, device=device) if attn is None else attn.expand(B, L, L)


def run_queries(model, cache, out, x, q, attn, keys, extra=None, rows=None, known=None):
    """Run the positions ``q`` [B, L] of ``x`` against ``cache`` (their K/V are written into it
    in every layer; they attend to the slots ``keys`` [B, L] under the rows of ``attn``
    [B, L, L]) and write their final hidden states into ``out`` (:class:`SlotOutputs`; padding
    queries into slot L). ``attn=None`` and ``keys=None``: every slot visible to every query
    (then, if no row has padding and the model allows it, no mask is built at all). With ``rows``
    [R] (indices), ``cache`` holds those batch rows only (``KVCache.select``), as do ``x``, ``q``,
    ``attn``, ``keys`` and ``extra``, and their states go to those rows of ``out``. ``known``:
    the largest and smallest per-row query counts, if the caller has read them. Returns how
    many ran (a 0-dim tensor), or None when nothing did."""
    B, L = x.shape
    pos, slots, real, padded = pack(q, scratch=L, known=known)
    if pos.shape[1] == 0:  # no row has a query (pack read the largest count)
        return None
    if attn is None and keys is None and not padded and getattr(model, "cached_mask_optional", False):
        mask = None
    else:
        mask = query_mask(full_attention(attn, B, L, x.device), torch.ones_like(q) if keys is None else keys,
                          pos, real)
    out.write(slots, model.hidden_cached(torch.gather(x, 1, pos), pos, cache, slots, mask,
                                         extra=gather_extra(extra, pos)), q, rows)
    return real.sum()


def cached_forward(model, order, layout, extra=None):
    return CachedForward(model, order, layout, extra)
