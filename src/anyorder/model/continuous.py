"""The transformer of model/transformer.py with a continuous read-in and read-out, for in-context
linear regression (Garg et al., 2022, arXiv 2208.01066).

Same blocks, RMSNorm and RoPE as the token model (reused, not copied); only the ends differ:

- read-in ``Linear(d_in, width)`` shared by x and ỹ = [y, 0, …, 0] (Garg et al.);
- a learned mask vector *replaces* the read-in output at masked slots, so a masked value can
  never leak into the network;
- a learned 2-entry slot-type embedding (x slot / y slot). Garg's GPT-2 needs none because its
  learned absolute positions tell x from y; RoPE only sees relative offsets, and with
  bidirectional attention a slot could not otherwise tell its own parity. ``type_embedding=False``
  turns it off (Garg et al.'s read-in alone);
- read-out ``Linear(width, 1)``: one scalar prediction of y per slot.

Attention masks and RoPE positions come from the order's plan exactly as for the token model.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Optional

import torch
import torch.nn as nn

from ..checks import check_bool, check_int
from .transformer import Block, ModelConfig, RMSNorm, Transformer, rope_tables


@dataclass
class ContinuousConfig:
    d_in: int = 20
    d_model: int = 128
    n_layers: int = 4
    n_heads: int = 4
    mlp: str = "swiglu"
    mlp_ratio: float = 4.0
    max_len: int = 1024
    rope_base: float = 10000.0
    type_embedding: bool = True

    def __post_init__(self):
        self.d_in = check_int("model.d_in", self.d_in, 1)
        check_bool("model.type_embedding", self.type_embedding)
        self.block_config()  # validates width/heads/mlp with the token model's rules

    def block_config(self) -> ModelConfig:
        return ModelConfig(vocab_size=2, mask_id=1, d_model=self.d_model, n_layers=self.n_layers,
                           n_heads=self.n_heads, mlp=self.mlp, mlp_ratio=self.mlp_ratio,
                           max_len=self.max_len, rope_base=self.rope_base)

    def to_dict(self):
        return asdict(self)


class ContinuousTransformer(nn.Module):
    def __init__(self, cfg: ContinuousConfig):
        super().__init__()
        self.cfg = cfg
        bcfg = cfg.block_config()
        self.read_in = nn.Linear(cfg.d_in, cfg.d_model)
        self.mask_vec = nn.Parameter(torch.zeros(cfg.d_model))
        self.slot_type = nn.Embedding(2, cfg.d_model) if cfg.type_embedding else None
        self.blocks = nn.ModuleList(Block(bcfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.d_model)
        self.read_out = nn.Linear(cfg.d_model, 1)
        self.apply(Transformer._init)  # the token model's init: N(0, 0.02), zero biases
        nn.init.normal_(self.mask_vec, std=0.02)
        for name, p in self.named_parameters():  # GPT-2 scaled init of residual projections
            if name.endswith("proj.weight") or name.endswith("down.weight"):
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * cfg.n_layers))

    def forward(self, values: torch.Tensor, masked: torch.Tensor, attn_mask: Optional[torch.Tensor] = None,
                positions: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Predictions [B, L'] for slot values [B, L', d_in]; ``masked`` [B, L'] bool slots get the
        mask vector; ``positions`` [L'] or [B, L'] sequence positions (RoPE; default 0..L'−1);
        ``attn_mask`` [B, L', L'] bool (True = may attend) or None = full."""
        B, L, _ = values.shape
        if positions is None:
            positions = torch.arange(L, device=values.device)
        if positions.dim() == 1:
            positions = positions.unsqueeze(0).expand(B, L)
        if int(positions.max()) >= self.cfg.max_len:
            raise ValueError(f"position {int(positions.max())} exceeds model.max_len={self.cfg.max_len}")
        h = self.read_in(values.to(self.read_in.weight.dtype))
        h = torch.where(masked.unsqueeze(-1), self.mask_vec.to(h.dtype).expand_as(h), h)
        if self.slot_type is not None:
            h = h + self.slot_type(positions % 2)  # even positions hold x, odd ones y
        cos, sin = rope_tables(positions, self.cfg.d_model // self.cfg.n_heads, self.cfg.rope_base)
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        if attn_mask is not None and attn_mask.dim() == 3:
            attn_mask = attn_mask.unsqueeze(1)
        for blk in self.blocks:
            h = blk(h, cos, sin, attn_mask)
        return self.read_out(self.norm(h)).squeeze(-1).float()

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())
