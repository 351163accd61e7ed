"""LoMDM's decoders: sampling with the learned reverse schedule α̂_ψ = 1 − t^{k̂} of
"Unifying Masked Diffusion Models with Various Generation Orders and Beyond" (arXiv 2602.02112).

- ``learned_ancestral``: time runs down a grid of T steps (t = 1 − i/T, s = t − 1/T); between
  t and s every masked position i unmasks independently with the posterior probability of its
  own schedule,

      P(unmask) = (α̂_s − α̂_t) / (1 − α̂_t) = 1 − (s/t)^{k̂_i},

  with k̂ computed by g_ψ from the current z (same backbone pass as the logits). At s = 0 the
  probability is 1, so the grid ends with nothing masked. A row whose input did not change
  reuses its logits and k̂ (MDLM's cache: neither depends on t), so NFE ≤ T. It is
  ``ancestral``'s loop (one window) with this unmasking probability.
- ``learned_velocity``: the commit-by-score loop (k per step or LLaDA's ``steps`` split)
  ranking masked positions by the learned velocity Â = k̂/t — within a step t is shared by the
  row, so this is the order of k̂: highest first (ties: leftmost).

On a model without a g_ψ head (a plain backbone, an HF model) k̂ = 1 everywhere: then
``learned_ancestral`` is MDLM's ancestral sampler and ``learned_velocity`` is left to right.
"""
from __future__ import annotations

import torch

from ..model.kv_cache import select_extra
from .ancestral import AncestralDecoder
from .loop import DECODERS, DecodeResult, Decoder


def forward_with_exponent(model, order, layout, answer, extra=None):
    """``forward(x, masked, rows=None) -> (logits, k̂ float64 [B, L])`` under the order's attention
    (of batch rows ``rows`` only, when given)."""
    def forward(x, masked, rows=None, where=None):  # every position's logits: where is not used
        if rows is not None:  # rows never mix: run those only
            x, masked, ans, lay = x[rows], masked[rows], answer[rows], layout.select(rows)
            ex = select_extra(extra, rows)
        else:
            ans, lay, ex = answer, layout, extra
        attn = order.decode_attention(masked, lay)
        if hasattr(model, "logits_and_exponent"):
            return model.logits_and_exponent(x, ans, attn_mask=attn, extra=ex)
        logits = model(x, attn_mask=attn, extra=ex)
        return logits, torch.ones(x.shape, dtype=torch.float64, device=x.device)

    return forward


@DECODERS.register("learned_ancestral")
class LearnedAncestralDecoder(AncestralDecoder):
    """Ancestral sampling with the learned per-position schedule: a masked position unmasks
    between t and s with probability 1 − (s/t)^{k̂_i}."""

    def __init__(self, skip_unchanged: bool = True, **kw):
        if kw.get("k") is not None:
            raise ValueError("decoder 'learned_ancestral' unmasks by the time grid; give decoder.steps, not decoder.k")
        if kw.get("window") is not None:
            raise ValueError("decoder 'learned_ancestral' runs one grid over the whole answer; drop decoder.window")
        if kw.get("cache"):
            raise ValueError("decoder 'learned_ancestral' has no KV cache (bidirectional order); drop decoder.cache")
        super().__init__(skip_unchanged=skip_unchanged, **kw)

    @torch.no_grad()
    def decode(self, model, order, x, answer, extra=None, row_seeds=None, max_steps=None):
        st = self.start(model, order, x, answer, extra, row_seeds, max_steps)
        self.run(st, forward_with_exponent(model, order, st.layout, st.answer, extra))
        return DecodeResult(st.x, st.trace())

    def unmask_probability(self, st, grid_pos, T, aux):
        """1 − (s/t)^{k̂} with t = 1 − i/T, s = t − 1/T; 1 once s reaches 0."""
        (k_hat,) = aux
        t = (1 - grid_pos / T.double()).clamp_min(0)            # [B]
        s = (1 - (grid_pos + 1) / T.double()).clamp_min(0)
        ratio = (s / t.clamp_min(1e-12)).unsqueeze(-1)
        return torch.where(s.unsqueeze(-1) <= 0, torch.ones_like(k_hat), 1 - ratio ** k_hat)


@DECODERS.register("learned_velocity")
class LearnedVelocityDecoder(Decoder):
    """Commit the masked positions with the highest learned velocity Â = k̂/t first."""

    def __init__(self, **kw):
        if kw.get("cache"):
            raise ValueError("decoder 'learned_velocity' has no KV cache (bidirectional order); drop decoder.cache")
        super().__init__(**kw)

    @torch.no_grad()
    def decode(self, model, order, x, answer, extra=None, row_seeds=None, max_steps=None):
        st = self.start(model, order, x, answer, extra, row_seeds, max_steps)
        self.run(st, forward_with_exponent(model, order, st.layout, st.answer, extra))
        return DecodeResult(st.x, st.trace())

    def step(self, st, forward) -> None:
        active = st.masked.any(-1)
        out = {}

        def logits_only(x, masked, rows=None, where=None):  # keep k̂ [B, L] (1 on rows that did not run)
            logits, k_hat = forward(x, masked, rows)
            out["k"] = k_hat if rows is None else torch.ones(
                st.x.shape, dtype=k_hat.dtype, device=k_hat.device).index_copy_(0, rows, k_hat)
            return logits

        dist = self.step_dist(st, logits_only)
        proposal = self.propose(dist, st)
        commit = self.select(out["k"], dist.where, self.counts(st, dist.where))
        st.commit(commit, *self.fill(st, commit, dist, proposal))
        st.nfe += active.long()
