"""Token sampling: temperature, top-k / top-p, and Gumbel-max in float64 log space.

Low-precision Gumbel noise lowers the effective temperature (Zheng et al., 2024, arXiv
2409.02908; ReMDM's code samples in float64 for this reason: Wang et al., 2025, arXiv
2503.00307), so noise is always float64 and added to float64 log-probabilities. Each batch
row draws from its own generator: a row's sample never depends on which other rows share its
batch (batched decoding == row-by-row decoding).
"""
from __future__ import annotations

from typing import List, Optional

import torch
import torch.nn.functional as F


def row_generators(seeds: List[int], device=None) -> List[torch.Generator]:
    """One generator per row, on ``device`` (the model's: noise is drawn where it is used)."""
    return [torch.Generator(device=device or "cpu").manual_seed(int(s)) for s in seeds]


def gumbel(u: torch.Tensor) -> torch.Tensor:
    """float64 Gumbel(0, 1) noise from float64 uniforms."""
    u = u.clamp(min=torch.finfo(torch.float64).tiny, max=1 - torch.finfo(torch.float64).eps)
    return -torch.log(-torch.log(u))


def gumbel_noise(shape, gens: List[torch.Generator]) -> torch.Tensor:
    """float64 Gumbel(0, 1) noise [B, *shape], row b from gens[b]."""
    return torch.stack([gumbel(torch.rand(*shape, generator=g, dtype=torch.float64, device=g.device))
                        for g in gens])


def filter_logp(logp: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Set to -inf what top-k / nucleus filtering removes (always keeps the top token)."""
    if top_k and top_k > 0:
        kth = logp.topk(min(top_k, logp.shape[-1]), dim=-1).values[..., -1:]
        logp = logp.masked_fill(logp < kth, float("-inf"))
    if top_p < 1.0:
        sorted_lp, idx = logp.sort(dim=-1, descending=True)
        cum = sorted_lp.exp().cumsum(-1)
        remove = (cum - sorted_lp.exp()) >= top_p  # mass before this token already reaches p
        remove[..., 0] = False
        logp = logp.masked_fill(remove.scatter(-1, idx, remove), float("-inf"))
    return logp


def sample_tokens(logits: torch.Tensor, temperature: float, gens: List[torch.Generator],
                  top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """[B, L] token ids: argmax at temperature 0, else Gumbel-max over tempered, filtered log-probs."""
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if temperature == 0:
        return logits.argmax(-1)
    logp = F.log_softmax(logits.double() / temperature, dim=-1)
    logp = filter_logp(logp, top_k, top_p)
    return (logp + gumbel_noise(logits.shape[1:], gens)).argmax(-1)


def sample_at(dist, temperature: float, gens: List[torch.Generator], top_k: int = 0, top_p: float = 1.0,
              draw=None) -> torch.Tensor:
    """[N] token ids at the step's commit candidates ``dist.where`` (row-major), the same tokens
    :func:`sample_tokens` gives there on the whole [B, L, V] logits. Greedy: the argmax. Sampled:
    each row in ``draw`` ([B] bool, or a host list of row indices; default: rows with a
    candidate) draws its full [L, V] float64
    uniforms from its own generator, exactly as :func:`sample_tokens` does, so every stream stays
    the same; the tempered log-softmax, filtering and Gumbel transform run at the candidates only."""
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if temperature == 0:
        return dist.top1()[0]
    logits = dist.logits_at()
    # at temperature 1 the tempered log-probs are the model's (x / 1.0 == x): reuse them
    tempered = dist.logp_at() if temperature == 1 else F.log_softmax(logits.double() / temperature, dim=-1)
    logp = filter_logp(tempered, top_k, top_p)
    b, pos = dist.where.nonzero(as_tuple=True)
    draw = dist.where.any(-1) if draw is None else draw
    L, V = dist.shape[1], logp.shape[-1]
    noise = torch.empty_like(logp)
    rows = draw if isinstance(draw, list) else draw.nonzero().squeeze(-1).tolist()
    for row in rows:  # host loop: one generator per row
        u = torch.rand(L, V, generator=gens[row], dtype=torch.float64, device=gens[row].device)
        sel = b == row
        noise[sel] = gumbel(u[pos[sel]])
    return (logp + noise).argmax(-1)
