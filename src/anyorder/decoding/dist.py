"""The model's distribution at one decoding step, computed only where a decoder reads it.

A step needs the distribution at the positions it may commit (``where``: masked ∩ what the
order allows ∩ the semi-AR window), not at every position: a semi-AR window of 32 out of 160
positions, and often one. So the loop keeps the float32 logits as the forward returned them and
works at the ``where`` rows only:

- the probability of a token (``top_prob``, ``threshold``, the trace's confidence) is
  exp((logit - max) - log sum exp(logit - max)) with the exps in float32 and the rest in float64
  (:meth:`normaliser`, once a step): within about 1e-7 relative of the float64 softmax of the
  same logits -- the logits' own precision -- at a tenth of its cost at a 126k vocabulary; the
  greedy token is the first maximum found in two vectorised passes (:func:`first_max`), and its
  probability is reused, not recomputed, when the decoder scores or records it;
- scores that read the whole distribution (``margin``, ``entropy``) and sampling get float64
  ``F.log_softmax`` rows (:meth:`logp_at`, :meth:`rowwise`): a subset of rows gives bit for bit
  the rows of the full call, since each row is reduced on its own.

Hooks that need everything (an order whose ``allowed`` reads log-probs, like Jigsaw's entropy
probe; beam search) ask for :meth:`logp`.

``logits`` may hold only the rows that were forwarded (``rows``: their batch indices): a row that
has finished is not run through the model at all. When the commit candidates are known before the
forward pass (the order's rule does not read logits), ``logits`` is [N, V]: the output head ran
at the candidates only (``Transformer.logits_at``).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F


CHUNK_BYTES = 2 ** 21  # float64 log-probs worked on at a time: a block of rows that stays in cache


BLOCK = 256  # first_max: the columns reduced per block


def first_max(x: torch.Tensor):
    """``x.max(-1)`` of [N, V] float logits (values, indices: the first of equal maxima; NaN counts
    as the largest, as in Tensor.max), in two vectorised passes at a large vocabulary: the max of
    each block of ``BLOCK`` columns (``amax``, several times faster than ``max`` with indices),
    the first block holding the row's max, and the first maximum inside it."""
    N, V = x.shape
    n = V // BLOCK * BLOCK
    if n < 4 * BLOCK or N == 0:  # small: the plain reduction is as fast
        return x.max(-1)
    bm = x[:, :n].view(N, n // BLOCK, BLOCK).amax(-1)
    if n < V:
        bm = torch.cat([bm, x[:, n:].amax(-1, keepdim=True)], -1)
    idx = bm.argmax(-1, keepdim=True) * BLOCK + torch.arange(BLOCK, device=x.device)
    vals = x.gather(1, idx.clamp_max(V - 1)).masked_fill_(idx >= V, float("-inf"))
    top, at = vals.max(-1, keepdim=True)
    return top.squeeze(-1), idx.gather(1, at).squeeze(-1)


class StepDist:
    """logits [R, L, V] of batch rows ``rows`` [R] (None: all B rows), or [N, V] at the True
    positions of ``where`` (row-major); ``where`` [B, L] bool the positions this step may commit
    (set by the loop once it knows them)."""

    def __init__(self, logits: torch.Tensor, batch: int, rows: Optional[torch.Tensor] = None,
                 where: Optional[torch.Tensor] = None):
        self.logits, self.rows, self.batch, self.where = logits, rows, batch, where
        self.packed = logits.dim() == 2   # logits of the candidates only
        if self.packed and where is None:
            raise ValueError("StepDist: [N, V] logits need the positions they belong to (where)")
        if not self.packed and logits.shape[0] != (batch if rows is None else len(rows)):
            raise ValueError(f"the forward returned logits of {logits.shape[0]} rows for "
                             f"{batch if rows is None else len(rows)} asked (a forward takes rows=)")
        self._lp = None            # (where, log-probs at where)
        self._full = None
        self._top1 = None          # (where, argmax [N], its probability [N]) from top1()
        self._prob = None          # (where, tokens, probabilities [B, L]) from prob_of()
        self._norm = None          # (where, max [N], sum of exps [N]) from normaliser()

    @property
    def shape(self):
        """(B, L, V)."""
        if self.packed:
            return (*self.where.shape, self.logits.shape[-1])
        return (self.batch, *self.logits.shape[1:])

    @property
    def device(self):
        return self.logits.device

    def index(self, where: torch.Tensor):
        """Where the logits of every True entry of ``where`` (row-major) are in ``logits``."""
        if self.packed:  # where ⊆ self.where: the entry's rank among self.where's
            return ((self.where.flatten().cumsum(0) - 1).view(self.where.shape)[where],)
        b, pos = where.nonzero(as_tuple=True)
        if self.rows is not None:
            slot = torch.full((self.batch,), -1, dtype=torch.long, device=where.device)
            slot[self.rows] = torch.arange(len(self.rows), device=where.device)
            b = slot[b]
        return b, pos

    def logits_at(self, where: Optional[torch.Tensor] = None) -> torch.Tensor:
        """[N, V] float32 logits at ``where`` (default: the step's commit candidates)."""
        where = self.where if where is None else where
        if self.packed and where is self.where:
            return self.logits
        return self.logits[self.index(where)]

    def logp_at(self, where: Optional[torch.Tensor] = None) -> torch.Tensor:
        """[N, V] float64 log-probabilities at ``where`` (computed once per ``where``)."""
        where = self.where if where is None else where
        if self._lp is None or self._lp[0] is not where:
            self._lp = (where, F.log_softmax(self.logits_at(where).double(), dim=-1))
        return self._lp[1]

    def rowwise(self, fn, where: Optional[torch.Tensor] = None):
        """``fn(logits [n, V] float32, logp [n, V] float64, sl)`` on the rows at ``where`` (``sl``:
        their slice of the N rows), a block of rows at a time, results concatenated (a tensor or a
        tuple of tensors). At a large vocabulary a row's float64 log-probs are 1 MB: made and used
        a few rows at a time, they stay in cache instead of streaming through memory twice."""
        where = self.where if where is None else where
        x = self.logits_at(where)
        if self._lp is not None and self._lp[0] is where:       # already made in one piece
            return fn(x, self._lp[1], slice(None))
        step = max(1, CHUNK_BYTES // (8 * x.shape[-1]))
        if len(x) <= 8 * step:  # small enough: make them once, for every later use this step
            return fn(x, self.logp_at(where), slice(None))
        parts = [fn(x[i:i + step], F.log_softmax(x[i:i + step].double(), dim=-1), slice(i, i + step))
                 for i in range(0, len(x), step)]
        if torch.is_tensor(parts[0]):
            return torch.cat(parts)
        return tuple(torch.cat(p) for p in zip(*parts))

    def normaliser(self, where: Optional[torch.Tensor] = None, top: Optional[torch.Tensor] = None):
        """([N] float32 max logit, [N] float64 sum of exp(logit - max)) at ``where``, a block of rows
        at a time. The exps are float32 (each within an ulp; the max term is exactly 1) and summed
        in float64: log p = (logit - max) - log(sum) is then the float64 log-probability of the
        float32 logits to about 1e-7 relative, the precision of the logits themselves, at a tenth of
        the cost of a float64 log-softmax (which converts and writes every entry). ``top``: the
        [N] max logits if known. Computed once per step at the candidates (kept for ``prob_of``)."""
        where = self.where if where is None else where
        if self._norm is not None and self._norm[0] is where:
            return self._norm[1], self._norm[2]
        x = self.logits_at(where)
        m = x.amax(-1) if top is None else top
        step = max(1, CHUNK_BYTES // (4 * x.shape[-1]))
        # one scratch block for every block of rows: a fresh multi-MB tensor per block would be a
        # fresh mapping from the OS, paid in page faults (a third of the normaliser's time at 126k)
        buf = x.new_empty(min(step, len(x)), x.shape[-1])
        s = [torch.sub(x[i:i + step], m[i:i + step, None], out=buf[:len(x[i:i + step])]).exp_().sum(-1)
             for i in range(0, len(x), step)]
        s = (torch.cat(s) if s else m.new_zeros(0)).double()  # float32 cascade sum: ~1e-7 too
        self._norm = (where, m, s)
        return m, s

    def top1(self):
        """([N] argmax token, [N] its float64 probability 1 / sum exp(logit - max)) at the commit
        candidates."""
        if self._top1 is None or self._top1[0] is not self.where:
            top, tok = first_max(self.logits_at())  # the first of equal maxima, as Tensor.max
            _, s = self.normaliser(top=top)
            self._top1 = (self.where, tok, torch.exp(-torch.log(s)))
        return self._top1[1], self._top1[2]

    def put(self, values: torch.Tensor, fill=0.0, where: Optional[torch.Tensor] = None) -> torch.Tensor:
        """[B, L]: ``values`` [N] at ``where`` (default: the commit candidates), ``fill`` elsewhere
        (a number or a [B, L] tensor)."""
        where = self.where if where is None else where
        out = (torch.full(where.shape, fill, dtype=values.dtype, device=where.device) if not torch.is_tensor(fill)
               else fill.to(values.dtype).clone())
        out[where] = values
        return out

    def put_proposal(self, tokens: torch.Tensor, fill: torch.Tensor) -> torch.Tensor:
        """[B, L]: the step's proposed ``tokens`` [N] at the candidates, ``fill`` elsewhere. When they
        are :meth:`top1`'s (greedy: the same tensor), ``prob_of`` of the result is top1's
        probabilities, bit for bit what it would compute (for the argmax, logit - max is exactly 0)."""
        out = self.put(tokens, fill)
        if self._top1 is not None and self._top1[0] is self.where and tokens is self._top1[1]:
            self._prob = (self.where, out, self.put(self._top1[2], 0.0))
        return out

    def prob_of(self, tokens: torch.Tensor, where: Optional[torch.Tensor] = None) -> torch.Tensor:
        """[B, L] float64: the model's probability of ``tokens`` [B, L] at ``where`` (0 elsewhere)."""
        where = self.where if where is None else where
        if self._prob is not None and self._prob[0] is where and self._prob[1] is tokens:
            return self._prob[2]
        tok = tokens[where]
        # no test of tok against the argmax (a host sync on a GPU): for the argmax, logit - max is
        # exactly 0, so this is bit for bit top1()'s exp(-log(sum)); the normaliser is computed once
        m, s = self.normaliser(where)
        x_tok = self.logits_at(where).gather(-1, tok.unsqueeze(-1)).squeeze(-1)
        p = torch.exp((x_tok.double() - m.double()) - torch.log(s))
        self._prob = (where, tokens, self.put(p, 0.0, where))
        return self._prob[2]

    def logp(self) -> torch.Tensor:
        """[B, L, V] float64 log-probabilities of every position (rows not forwarded: uniform).
        The whole-vocabulary tensor, for hooks whose rule reads everything."""
        if self.packed:
            raise ValueError("this step computed logits at its commit candidates only; a decoder whose "
                             "hooks read every position sets needs_all_logits = True")
        if self._full is None:
            lp = F.log_softmax(self.logits.double(), dim=-1)
            if self.rows is not None:
                uniform = -math.log(lp.shape[-1])
                lp = torch.full(self.shape, uniform, dtype=lp.dtype, device=lp.device).index_copy_(0, self.rows, lp)
            self._full = lp
        return self._full

    def probs(self) -> torch.Tensor:
        """[B, L, V] float64 probabilities of every position (see :meth:`logp`)."""
        return self.logp().exp()
