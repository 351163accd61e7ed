"""Token sampling: temperature, top-k / top-p, and Gumbel-max in float64 log space.

Low-precision Gumbel noise lowers the effective temperature (Zheng et al., 2024, arXiv
2409.02908; ReMDM's code samples in float64 for this reason: Wang et al., 2025, arXiv
2503.00307), so noise is always float64 and added to float64 log-probabilities. Each batch
row draws from its own generator: a row's sample never depends on which other rows share its
batch (batched decoding == row-by-row decoding).
"""
from __future__ import annotations

from typing import List

import torch
import torch.nn.functional as F


def row_generators(seeds: List[int]) -> List[torch.Generator]:
    return [torch.Generator().manual_seed(int(s)) for s in seeds]


def gumbel_noise(shape, gens: List[torch.Generator]) -> torch.Tensor:
    """float64 Gumbel(0, 1) noise [B, *shape], row b from gens[b]."""
    out = []
    for g in gens:
        u = torch.rand(*shape, generator=g, dtype=torch.float64)
        u = u.clamp(min=torch.finfo(torch.float64).tiny, max=1 - torch.finfo(torch.float64).eps)
        out.append(-torch.log(-torch.log(u)))
    return torch.stack(out)


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
