"""What happened during a decode, and the two numbers read off it in "Parallelism and
Generation Order in Masked Diffusion Language Models: Limits Today, Potential Tomorrow".

``finalize_step[b, i]`` is the step at which position i took its final value (-1 on prompt);
``confidence[b, i]`` the model's probability of that value then. ``events`` holds every
commit, re-mask and edit of the decode, from which both are rebuilt (:meth:`Events.finalize`).

- AFP (Average Finalization Parallelism) = n / #{steps that finalise >= 1 token};
- Kendall's τ_b (ties counted) between finalisation step and left-to-right position:
  1 = strictly left to right (AR-like), -1 = right to left, NaN if every token was
  finalised in one step (no ordering to correlate).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from .events import Events


@dataclass
class Trace:
    finalize_step: torch.Tensor   # [B, L] long
    confidence: torch.Tensor      # [B, L] float64
    answer: torch.Tensor          # [B, L] bool
    nfe: torch.Tensor             # [B] forward passes until the row was complete
    events: Optional[Events] = None  # every commit / re-mask / edit (decoding/events.py)

    def afp(self) -> torch.Tensor:
        return afp(self.finalize_step, self.answer)

    def kendall_tau(self) -> torch.Tensor:
        return kendall_tau_b(self.finalize_step, self.answer)

    def summary(self) -> dict:
        tau = self.kendall_tau()
        ok = ~torch.isnan(tau)
        return {"afp": float(self.afp().mean()), "kendall_tau": float(tau[ok].mean()) if ok.any() else float("nan"),
                "nfe": float(self.nfe.double().mean())}


def afp(finalize_step: torch.Tensor, answer: torch.Tensor) -> torch.Tensor:
    out = []
    for s, a in zip(finalize_step, answer):
        steps = s[a]
        out.append(len(steps) / max(len(torch.unique(steps)), 1))
    return torch.tensor(out, dtype=torch.float64)


def kendall_tau_b(finalize_step: torch.Tensor, answer: torch.Tensor) -> torch.Tensor:
    """Per-row τ_b between the answer positions' left-to-right index and their finalisation step."""
    out = []
    for s, a in zip(finalize_step, answer):
        y = s[a].double()
        x = torch.arange(len(y), dtype=torch.float64)
        out.append(tau_b(x, y))
    return torch.tensor(out, dtype=torch.float64)


def tau_b(x: torch.Tensor, y: torch.Tensor) -> float:
    n = len(x)
    if n < 2:
        return float("nan")
    dx = torch.sign(x.unsqueeze(0) - x.unsqueeze(1))
    dy = torch.sign(y.unsqueeze(0) - y.unsqueeze(1))
    iu = torch.triu_indices(n, n, offset=1)
    dx, dy = dx[iu[0], iu[1]], dy[iu[0], iu[1]]
    num = float((dx * dy).sum())
    den = float(((dx != 0).sum() * (dy != 0).sum()).double().sqrt())
    return num / den if den > 0 else float("nan")
