"""``random_init``: "A random initialization strategy inspired by SEDD", §3.3 of
"Why mask diffusion does not work".

Each step, per row:
1. fill a fraction ``ratio`` of the still-masked answer positions (floor(ratio * m), at most
   m - 1 so one hole is always left to decode) with uniformly random tokens -- from
   ``fill_tokens`` if given (e.g. the digits of a Sudoku), else any token but [MASK];
2. run the model with those random tokens *visible* (the order's attention and ``allowed``
   see them as committed), so the remaining masks are predicted from sparse, noisy signals;
3. commit the best of the remaining masked positions as the score decoders do (``k`` per step
   or ``steps``; ``score``, default ``top_prob``);
4. re-mask the random fills (they never reach the output or the trace).
Repeat until the answer is complete. ``ratio = 0`` is the plain score decoder, exactly.

That paper expects this to be inefficient (one forward per step as usual, and only the masks'
outputs are used) and the ratio to matter: it sets how much of the context is noise.
Positions and tokens are drawn from each row's own generator.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from ..checks import check_int, show
from .loop import DECODERS, Decoder, check_range


@DECODERS.register("random_init")
class RandomInitDecoder(Decoder):
    """Fill a fraction `ratio` of the masks with random tokens, decode the rest from them,
    re-mask the random ones, repeat."""

    def __init__(self, ratio: float = 0.25, fill_tokens: Optional[Sequence[int]] = None, **kw):
        super().__init__(**kw)
        self.ratio = check_range("ratio", ratio, 0.0, 1.0, hi_open=True)
        if fill_tokens is not None:
            if not isinstance(fill_tokens, (list, tuple)) or not fill_tokens:
                raise ValueError(f"decoder.fill_tokens must be a non-empty list of token ids (or null), "
                                 f"got {show(fill_tokens)}")
            fill_tokens = [check_int("decoder.fill_tokens[]", t, 0) for t in fill_tokens]
        self.fill_tokens = fill_tokens

    def random_fill(self, st):
        """[B, L] bool positions to fill and [B, L] random tokens, from each row's generator."""
        B, L = st.x.shape
        V = st.model.cfg.vocab_size
        if self.ratio == 0:  # nothing to fill, and no draws: exactly the score decoder
            return torch.zeros_like(st.masked), st.x
        if self.fill_tokens is not None:
            bad = [t for t in self.fill_tokens if not 0 <= t < V or t == st.mask_id]
            if bad:
                raise ValueError(f"decoder.fill_tokens {bad} are not tokens of this model (ids 0..{V - 1}, "
                                 f"not the mask {st.mask_id})")
            pool = torch.tensor(self.fill_tokens, device=st.x.device)
        else:
            pool = torch.arange(V - 1, device=st.x.device)
            pool = pool + (pool >= st.mask_id).long()  # every token but the mask, in order
        m = st.masked.sum(-1)
        n_fill = torch.minimum(torch.floor(self.ratio * m.double()).long(), (m - 1).clamp_min(0))
        keys, toks = [], []
        for g in st.gens:
            keys.append(torch.rand(L, generator=g, dtype=torch.float64, device=g.device))
            toks.append(pool[torch.randint(len(pool), (L,), generator=g, device=g.device)])
        key = torch.where(st.masked, torch.stack(keys), torch.full((B, L), 2.0, dtype=torch.float64, device=st.x.device))
        rank = key.argsort(dim=-1, stable=True).argsort(dim=-1)
        return st.masked & (rank < n_fill.unsqueeze(-1)), torch.stack(toks)

    def step(self, st, forward) -> None:
        active = st.masked.any(-1)
        fill, noise = self.random_fill(st)
        xf, mf = torch.where(fill, noise, st.x), st.masked & ~fill
        dist = self.step_dist(st, self.probe_forward(st), xf, mf)  # a state that is undone right after
        proposal = self.propose(dist, st)
        commit = self.choose(st, dist, proposal, dist.where)
        st.commit(commit, *self.fill(st, commit, dist, proposal))  # on the real x: the fills are gone
        st.nfe += active.long()
