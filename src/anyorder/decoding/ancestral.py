"""``ancestral``: MDLM's ancestral sampler (Sahoo et al., 2024, arXiv 2406.07524) with its
"skip the forward pass" cache.

Time runs down a grid of ``T`` steps, t_i = 1 - i/T, s = t_i - 1/T (the linear schedule
alpha_t = 1 - t). Between t and s every masked position independently unmasks with the
posterior probability

    P(unmask) = (alpha_s - alpha_t) / (1 - alpha_t) = (t - s) / t = 1 / (T - i),

so the last grid step unmasks everything still masked; an unmasked position takes a token
drawn from the model (``temperature``/``top_k``/``top_p``; greedy at 0). Only positions the
order allows now may unmask (AR: the leftmost hole), so an order that allows fewer than all
holes may need steps past the grid; there every allowed position unmasks (P = 1).

The cache (MDLM's ``ddpm_cache``): the model is not time-conditioned, so when a step unmasked
nothing in a row, that row's input is unchanged and its logits are reused -- no forward pass,
no NFE. A row's NFE is therefore the number of steps that follow a change (plus the first
one), not ``T``; a whole forward call is skipped when no row changed. ``skip_unchanged=False``
switches the cache off (one pass per step), for comparison.

Options: ``steps`` (the grid, default: the answer length, so each step unmasks one token in
expectation; with ``window`` the grid restarts in every semi-AR window with
steps / #windows steps), ``skip_unchanged`` (default True), the sampling options.
"""
from __future__ import annotations

import torch

from ..checks import check_bool
from .dist import StepDist
from .loop import DECODERS, Decoder


@DECODERS.register("ancestral")
class AncestralDecoder(Decoder):
    """MDLM ancestral sampling: each masked position unmasks between t and s with probability
    (t - s)/t on a linear grid; logits are reused while the input does not change."""

    def __init__(self, skip_unchanged: bool = True, **kw):
        if kw.get("k") is not None:
            raise ValueError("decoder 'ancestral' unmasks by the time grid; give decoder.steps, not decoder.k")
        super().__init__(**kw)
        self.skip_unchanged = check_bool("decoder.skip_unchanged", skip_unchanged)

    def grid_length(self, st) -> torch.Tensor:
        """[B] steps on the grid of each row's current window."""
        if self.steps is not None:
            return (self.steps // st.n_windows.clamp_min(1)).clamp_min(1)
        win = st.current_window()
        return (st.answer & (st.window == win.unsqueeze(-1))).sum(-1).clamp_min(1)

    def unmask_probability(self, st, grid_pos: torch.Tensor, T: torch.Tensor, aux) -> torch.Tensor:
        """[B, 1] or [B, L] probability that a masked position unmasks at grid step ``grid_pos``
        of ``T`` [B]: (t - s)/t = 1/(T - i) on the linear schedule, 1 from the last grid step on.
        ``aux`` holds the forward's outputs after the logits (none here)."""
        p = torch.where(grid_pos >= T - 1, torch.ones(len(T), dtype=torch.float64, device=T.device),
                        1.0 / (T - grid_pos).clamp_min(1).double())
        return p.unsqueeze(-1)

    def run(self, st, forward) -> None:
        """The grid loop with the skip cache. ``forward`` returns the logits, or a tuple whose
        first element is the logits (the others are reused alongside and passed on as ``aux``)."""
        B, L = st.x.shape
        dev = st.x.device
        out = None                                       # the last forward outputs of every row
        stale = torch.ones(B, dtype=torch.bool, device=dev)      # row changed since its last forward pass
        grid_pos = torch.zeros(B, dtype=torch.long, device=dev)  # steps taken on the current window's grid
        grid_win = torch.full((B,), -1, dtype=torch.long, device=dev)
        while st.active()[2]:  # rows with a hole left (one host read a step: DecodeState.active)
            st.check_limit()
            active, rows, _ = st.active()
            need = (stale if self.skip_unchanged else torch.ones_like(stale)) & active
            if need.any():
                # the unfinished rows run (finished ones cost nothing); only the rows that changed
                # take the new outputs. Running just those would also be exact in exact arithmetic,
                # but a different batch shape can round differently in the matmuls (MKL), which
                # would move the trace's confidences in the last bits
                fresh = forward(st.x, st.masked) if rows is None else forward(st.x, st.masked, rows)
                fresh = (fresh,) if torch.is_tensor(fresh) else tuple(fresh)
                if out is None and rows is None:
                    out = tuple(f.contiguous() for f in fresh)  # written in place below: no expanded views
                else:  # in place: no copy of the rows that keep their outputs
                    out = out or tuple(f.new_zeros((B, *f.shape[1:])) for f in fresh)
                    take = need.nonzero().squeeze(-1)
                    for f, o in zip(fresh, out):
                        o[take] = f[need if rows is None else need[rows]]
                st.nfe += need.long()
            logits, *aux = out
            dist = StepDist(logits, B)
            allowed = dist.where = self.allowed(st, dist) & active.unsqueeze(-1)
            proposal = self.propose(dist, st)
            win = st.current_window()
            grid_pos = torch.where(win != grid_win, torch.zeros_like(grid_pos), grid_pos)  # a new window
            grid_win = win
            p_unmask = self.unmask_probability(st, grid_pos, self.grid_length(st), aux)
            u = torch.stack([torch.rand(L, generator=g, dtype=torch.float64, device=g.device) for g in st.gens])
            commit = allowed & (u < p_unmask)
            st.commit(commit, proposal, dist.prob_of(proposal))
            stale = commit.any(-1)
            grid_pos = grid_pos + 1
            st.advance(active)
