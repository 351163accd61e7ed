"""Position scores: which masked positions to commit first (higher = sooner).

Each score sees the model's untempered float64 distribution ``probs`` [B, L, V], the proposed
tokens ``proposal`` [B, L], the layout, and the per-row generators. Register your own with
``@SCORES.register("name")`` on a function with the same signature.
"""
from __future__ import annotations

import torch

from ..registry import Registry

SCORES: Registry = Registry("score")


@SCORES.register("random")
def random_score(probs, proposal, layout, gens):
    """LLaDA's "random remasking": uniform scores, float64, one draw per row generator."""
    return torch.stack([torch.rand(probs.shape[1], generator=g, dtype=torch.float64) for g in gens])


@SCORES.register("top_prob")
def top_prob(probs, proposal, layout, gens):
    """Probability of the proposed token (LLaDA's "low-confidence remasking")."""
    return probs.gather(-1, proposal.unsqueeze(-1)).squeeze(-1)


@SCORES.register("margin")
def margin(probs, proposal, layout, gens):
    """Top-1 minus top-2 probability (Kim et al., 2025, "Train for the worst, plan for the best",
    arXiv 2502.06768)."""
    top2 = probs.topk(2, dim=-1).values
    return top2[..., 0] - top2[..., 1]


@SCORES.register("entropy")
def neg_entropy(probs, proposal, layout, gens):
    """Negative entropy: the most certain position first."""
    return (probs * torch.log(probs.clamp_min(1e-300))).sum(-1)


@SCORES.register("left_to_right")
def left_to_right(probs, proposal, layout, gens):
    """The leftmost masked answer position first."""
    return -layout.aidx.double()
