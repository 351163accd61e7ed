"""Position scores: which masked positions to commit first (higher = sooner).

Each score sees the step's distribution ``dist`` (:class:`~anyorder.decoding.dist.StepDist`,
computed at the positions this step may commit, ``dist.where``, only: ``dist.prob_of(tokens)``,
``dist.logp_at()`` [N, V] float64, ``dist.rowwise(fn)`` a block of rows at a time; a decoder
with ``needs_all_logits = True`` also gets the whole [B, L, V] ``dist.probs()``), the proposed
tokens ``proposal`` [B, L], the layout, and the per-row generators. A score returns [B, L];
only its values at ``dist.where`` are read (``dist.put`` makes one from [N] values). Register
your own with ``@SCORES.register("name")`` on a function with the same signature.
"""
from __future__ import annotations

import torch

from ..registry import Registry

SCORES: Registry = Registry("score")


@SCORES.register("random")
def random_score(dist, proposal, layout, gens):
    """LLaDA's "random remasking": uniform scores, float64, one draw per row generator."""
    L = dist.shape[1]
    return torch.stack([torch.rand(L, generator=g, dtype=torch.float64, device=g.device) for g in gens])


@SCORES.register("top_prob")
def top_prob(dist, proposal, layout, gens):
    """Probability of the proposed token (LLaDA's "low-confidence remasking")."""
    return dist.prob_of(proposal)


@SCORES.register("margin")
def margin(dist, proposal, layout, gens):
    """Top-1 minus top-2 probability (Kim et al., 2025, "Train for the worst, plan for the best",
    arXiv 2502.06768). exp is monotone, so the top two probabilities are exp of the top two
    log-probabilities: two exps per position instead of V."""
    top2 = dist.rowwise(lambda x, lp, sl: lp.topk(2, dim=-1).values).exp()
    return dist.put(top2[..., 0] - top2[..., 1])


@SCORES.register("entropy")
def neg_entropy(dist, proposal, layout, gens):
    """Negative entropy: the most certain position first."""
    def fn(x, lp, sl):
        probs = lp.exp()
        return (probs * torch.log(probs.clamp_min(1e-300))).sum(-1)

    return dist.put(dist.rowwise(fn))


@SCORES.register("left_to_right")
def left_to_right(dist, proposal, layout, gens):
    """The leftmost masked answer position first."""
    return -layout.aidx.double()
