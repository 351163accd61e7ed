"""The LoMDM network: a backbone plus two schedule heads that predict per-position exponents.

"Unifying Masked Diffusion Models with Various Generation Orders and Beyond" (arXiv 2602.02112)
learns the generation order with the model. Every answer position gets a polynomial schedule
α^i(t) = 1 − t^{k_i} whose exponent is predicted:

    k_i = c1 + c2 · NormSig(g(f))_i,     NormSig(v)_i = σ(v_i) − mean_j σ(v_j)

(the mean over the row's answer positions). NormSig lies in (−1, 1), so ``c1 > c2 >= 0`` keeps
every exponent positive; ``c2 = 0`` is the fixed polynomial schedule and ``(c1, c2) = (1, 0)``
is MDLM's linear one. g_φ reads the clean sequence (training), g_ψ the noisy one (decoding);
f = the backbone's final hidden states under stop-gradient; each g is one transformer block and
an MLP (:class:`ScheduleHead`). A large k_i keeps position i unmasked until t nears 1 in the
forward process, so it is generated early. The training objective (main NELBO term, velocity
matching, RLOO) is :mod:`anyorder.objectives.lomdm`.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch
import torch.nn as nn

from ..checks import check_float
from .transformer import Block, ModelConfig, RMSNorm, Transformer, rope_tables


def check_c(c1: float, c2: float) -> Tuple[float, float]:
    c1, c2 = check_float("order.c1", c1), check_float("order.c2", c2)  # finite numbers; the range below
    if not (c2 >= 0 and c1 > c2):
        raise ValueError(f"LoMDM needs c1 > c2 >= 0 so that every exponent c1 + c2·NormSig is positive; "
                         f"got c1={c1}, c2={c2} (c2 = 0 is the polynomial schedule, (1, 0) is MDLM)")
    return c1, c2


def normsig(v: torch.Tensor, answer: torch.Tensor, center: bool = False) -> torch.Tensor:
    """σ(v_i) − mean over the row's answer positions of σ(v_j); 0 off the answer.

    ``center=True`` first subtracts the row's mean logit over the answer (σ(v_i − v̄) − mean σ(v_j − v̄)),
    an option beyond the paper: it makes a common shift of the logits an exact no-op. Without it the
    head's output bias is nearly a null direction (NormSig removes the mean *after* σ), and Adam's
    normalised steps random-walk it into σ's saturation, where every k collapses to c1 and the
    gradient vanishes -- measured on the CPU text comparison with a 10x head lr (docs/lomdm.md)."""
    a = answer.double()
    v = v.double()
    if center:
        v = v - (v * a).sum(-1, keepdim=True) / a.sum(-1, keepdim=True).clamp_min(1)
    s = torch.sigmoid(v)
    mean = (s * a).sum(-1, keepdim=True) / a.sum(-1, keepdim=True).clamp_min(1)
    return (s - mean) * a


def exponents(v: torch.Tensor, answer: torch.Tensor, c1: float, c2: float, center: bool = False) -> torch.Tensor:
    """k = c1 + c2·NormSig(v), float64 [B, L] (c1 off the answer, where it is never used)."""
    return c1 + c2 * normsig(v, answer, center)


class ScheduleHead(nn.Module):
    """g: one transformer block (bidirectional) + an MLP to one logit per position."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.block = Block(cfg)
        self.norm = RMSNorm(cfg.d_model)
        self.mlp = nn.Sequential(nn.Linear(cfg.d_model, cfg.d_model), nn.SiLU(), nn.Linear(cfg.d_model, 1))
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        B, L, _ = h.shape
        pos = torch.arange(L, device=h.device).unsqueeze(0).expand(B, L)
        cos, sin = rope_tables(pos, self.cfg.d_model // self.cfg.n_heads, self.cfg.rope_base)
        h = self.block(h, cos.unsqueeze(1), sin.unsqueeze(1), None)
        return self.mlp(self.norm(h)).squeeze(-1).float()


class LoMDM(nn.Module):
    """The backbone θ plus the schedule heads φ (clean x) and ψ (noisy z_t).

    Drop-in for the backbone wherever a model is called: ``forward``/``hidden``/``cfg`` delegate
    to it, so every decoder, likelihood and analysis runs on a LoMDM unchanged;
    :meth:`logits_and_exponent` adds the reverse exponents k̂ from the same pass (the learned
    decoders use it). Training: :func:`anyorder.objectives.lomdm.lomdm_loss`; optimiser:
    :meth:`param_groups`.
    """

    def __init__(self, backbone: Transformer, c1: float = 0.7, c2: float = 0.65, center: bool = False):
        super().__init__()
        if not isinstance(backbone.cfg, ModelConfig):  # the heads are native blocks; _logits reads .head
            raise ValueError(f"order 'learned' (LoMDM) needs the native backbone, got {type(backbone).__name__}: "
                             f"set model.backbone=native")
        self.c1, self.c2 = check_c(c1, c2)
        self.center = bool(center)
        self.backbone = backbone
        self.g_phi = ScheduleHead(backbone.cfg)
        self.g_psi = ScheduleHead(backbone.cfg)

    @property
    def cfg(self) -> ModelConfig:
        return self.backbone.cfg

    def forward(self, tokens, attn_mask=None, positions=None, extra=None, t=None):
        return self.backbone(tokens, attn_mask=attn_mask, positions=positions, extra=extra, t=t)

    def hidden(self, *a, **kw):
        return self.backbone.hidden(*a, **kw)

    def hidden_rows(self, *a, **kw):
        return self.backbone.hidden_rows(*a, **kw)

    def forward_cached(self, *a, **kw):
        return self.backbone.forward_cached(*a, **kw)

    @property
    def cached_mask_optional(self) -> bool:
        return getattr(self.backbone, "cached_mask_optional", False)

    def hidden_cached(self, *a, **kw):
        return self.backbone.hidden_cached(*a, **kw)

    def head_logits(self, h: torch.Tensor) -> torch.Tensor:
        return self.backbone.head_logits(h)

    def logits_at(self, *a, **kw):
        return self.backbone.logits_at(*a, **kw)

    def _logits(self, h: torch.Tensor) -> torch.Tensor:
        logits = self.backbone.head(h).float()
        logits[..., self.cfg.mask_id] = float("-inf")
        return logits

    def _t_arg(self, t):
        return t if self.cfg.time_conditioning else None

    def forward_exponent(self, x0, answer, extra=None) -> torch.Tensor:
        """k_φ [B, L] from the clean sequence (f under stop-gradient: no backbone graph)."""
        with torch.no_grad():
            f = self.backbone.hidden(x0, extra=extra, t=self._t_arg(torch.zeros(x0.shape[0])))
        return exponents(self.g_phi(f), answer, self.c1, self.c2, self.center)

    def logits_and_exponent(self, z, answer, attn_mask=None, extra=None, t=None):
        """(logits [B, L, V], k̂_ψ [B, L] float64) from one backbone pass over z."""
        h = self.backbone.hidden(z, attn_mask=attn_mask, extra=extra, t=self._t_arg(t))
        return self._logits(h), exponents(self.g_psi(h.detach()), answer, self.c1, self.c2, self.center)

    def param_groups(self, lr: float, head_lr: Optional[float] = None, weight_decay: float = 0.0) -> List[Dict]:
        """Backbone and heads as separate optimiser groups (the heads usually want their own lr)."""
        head_lr = lr if head_lr is None else head_lr
        heads = list(self.g_phi.parameters()) + list(self.g_psi.parameters())
        return [{"params": list(self.backbone.parameters()), "lr": lr, "weight_decay": weight_decay},
                {"params": heads, "lr": head_lr, "weight_decay": weight_decay}]

    @staticmethod
    def is_head(param_name: str) -> bool:
        """True for a parameter of g_φ / g_ψ (named as in ``named_parameters()``): a trainer that
        builds its own groups (decay / no decay) splits each by this to give the heads their lr."""
        return param_name.startswith(("g_phi.", "g_psi."))
