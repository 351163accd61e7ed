"""What an order is: a corruption for training, an attention rule, and a decoding policy.

The mental model of an order, in code. The answer (the non-prompt positions of a row) is read as a
matrix of blocks (rows of the matrix) × offsets (columns), via :class:`Layout`:

    aidx  = index of a position among the answer positions of its row (-1 for prompt)
    block = aidx // S,   offset = aidx % S

Every order states, with these three numbers, (a) which positions it masks during training
and how the masked cross-entropy is weighted, (b) which keys each query may attend to, and
(c) which masked positions a decoder may commit next. Prompt positions are always visible and
never scored, whatever the order.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional

import torch

from ..checks import check_int


@dataclass
class Layout:
    answer: torch.Tensor   # [B, L] bool: positions the model generates/scored
    aidx: torch.Tensor     # [B, L] long: index among answer positions, -1 on prompt
    block: torch.Tensor    # [B, L] long: aidx // S, -1 on prompt
    offset: torch.Tensor   # [B, L] long: aidx % S, -1 on prompt
    block_size: int

    @classmethod
    def from_answer(cls, answer: torch.Tensor, block_size: int = 1) -> "Layout":
        answer = answer.bool()
        aidx = torch.where(answer, answer.long().cumsum(-1) - 1, torch.full_like(answer, -1, dtype=torch.long))
        S = max(int(block_size), 1)
        block = torch.where(answer, aidx // S, -1)
        offset = torch.where(answer, aidx % S, -1)
        return cls(answer, aidx, block, offset, S)

    @property
    def prompt(self) -> torch.Tensor:
        return ~self.answer

    def select(self, rows: torch.Tensor) -> "Layout":
        """The layout of batch rows ``rows`` [R] only (a decode that forwards its unfinished rows)."""
        return Layout(self.answer[rows], self.aidx[rows], self.block[rows], self.offset[rows], self.block_size)

    @property
    def n_answer(self) -> torch.Tensor:
        return self.answer.sum(-1)

    @property
    def n_blocks(self) -> torch.Tensor:
        return (self.n_answer + self.block_size - 1) // self.block_size


@dataclass
class TrainPlan:
    """One training forward pass, as an order lays it out.

    ``tokens``/``attn`` may be longer than the sequence (two-stream passes): ``index`` maps every
    input slot back to its sequence position (for RoPE positions and task embeddings); the
    first L query rows carry the logits that are scored.
    """

    tokens: torch.Tensor                 # [B, L'] input ids
    attn: Optional[torch.Tensor]         # [B, L', L'] bool (True = may attend) or None = full
    targets: torch.Tensor                # [B, L] clean tokens
    scored: torch.Tensor                 # [B, L] bool: positions whose CE enters the loss
    elbo_weight: torch.Tensor            # [B, L] float: A_i(t) (the ELBO weight) on scored positions
    t: torch.Tensor                      # [B, L] float: per-position noise level (for 1/t weightings)
    index: Optional[torch.Tensor] = None  # [L'] long: sequence position of each input slot
    time: Optional[torch.Tensor] = None   # [B] float: t fed to a time-conditioned model
    answer: Optional[torch.Tensor] = None  # [B, L] bool: answer positions (the loss normaliser)

    def to(self, device: torch.device) -> "TrainPlan":
        """This plan with its tensors on ``device`` (plans are drawn on the CPU from CPU generators,
        so a run's batches do not depend on its device)."""
        return TrainPlan(**{k: (v.to(device) if torch.is_tensor(v) else v) for k, v in vars(self).items()})


class Order:
    """Base class. Subclasses set ``name``, ``attention`` (a word for the table) and implement
    :meth:`train_plan`, :meth:`decode_attention` and :meth:`allowed`."""

    name = "base"
    attention = "?"
    default_weighting = "elbo"
    default_decoder = "top_prob"
    objective = "nelbo"          # the objective that trains it (anyorder.objectives): train_plan + NELBO
    exact_likelihood = False     # True where train_plan's loss is the exact NLL, not an upper bound
    # whether allowed() reads its logp argument; when False a decoder passes None and never computes
    # the full-vocabulary log-probs of every position (True is the safe default for a new order)
    reads_logp = True

    def __init__(self, block_size: int = 1):
        self.block_size = check_int("order.block_size", block_size, 1)

    def layout(self, answer: torch.Tensor) -> Layout:
        return Layout.from_answer(answer, self.block_size)

    # -- training -------------------------------------------------------------------------
    def train_plan(self, x0: torch.Tensor, layout: Layout, mask_id: int, gen: torch.Generator) -> TrainPlan:
        raise NotImplementedError

    # -- decoding -------------------------------------------------------------------------
    def decode_attention(self, masked: torch.Tensor, layout: Layout) -> Optional[torch.Tensor]:
        """[B, L, L] bool attention for the current decoding state (None = bidirectional)."""
        raise NotImplementedError

    def allowed(self, masked: torch.Tensor, layout: Layout, logp: torch.Tensor) -> torch.Tensor:
        """[B, L] bool: masked positions this order lets a decoder commit now."""
        return masked

    # -- exact KV caching (decoding/forward.py::cached_forward) --------------------------------
    def frozen(self, masked: torch.Tensor, layout: Layout) -> torch.Tensor:
        """[B, L] bool: positions whose hidden states (in every layer) can no longer change from
        this state on, given the attention rule: their K/V may be cached exactly. Default: none
        (safe for any attention rule; ``random`` keeps it: its prompt attends to the answer)."""
        return torch.zeros_like(masked, dtype=torch.bool)

    def live(self, masked: torch.Tensor, layout: Layout) -> Optional[torch.Tensor]:
        """[B, L] bool: positions whose logits :meth:`allowed` may read or permit at this state,
        or None for all. A cached forward computes only these (plus what they attend to that is
        not cached); the others keep the last logits computed for them."""
        return None

    # -- what tables, reports and samplers ask of an order ----------------------------------
    def label(self) -> str:
        """A short human-readable name for tables and plots."""
        return self.name if self.block_size == 1 else f"{self.name} {self.block_size}"

    def natural_decoder(self, seq_len: int, steps: Optional[int] = None) -> Dict[str, object]:
        """The sampler this order is trained for, with a budget of ``steps`` forward passes
        (default ``seq_len``: one token per step in expectation), as a decoder spec."""
        return {"name": self.default_decoder, "steps": int(steps or seq_len)}

    def describe(self) -> Dict[str, str]:
        return {"name": self.name, "attention": self.attention, "block_size": str(self.block_size)}


def low_discrepancy_t(batch: int, gen: torch.Generator, eps: float = 1e-3) -> torch.Tensor:
    """MDLM's antithetic time: one jittered draw per stratum [i/B, (i+1)/B), in (eps, 1]."""
    u = (torch.rand(batch, generator=gen, dtype=torch.float64) + torch.arange(batch, dtype=torch.float64)) / batch
    return ((1 - eps) * u + eps).float()


def lowest_open(masked: torch.Tensor, layout: Layout, key: torch.Tensor) -> torch.Tensor:
    """[B, L] bool: the masked answer positions whose ``key`` (e.g. aidx, offset, block) is the
    smallest among the row's masked answer positions: "the next group" of a sequential order."""
    m = masked & layout.answer
    big = torch.iinfo(torch.long).max
    first = torch.where(m, key, torch.full_like(key, big)).min(-1, keepdim=True).values
    return m & (key == first)


def first_open_block(masked: torch.Tensor, layout: Layout) -> torch.Tensor:
    """[B] index of the first block that still holds a masked answer position (n_blocks if none)."""
    big = torch.iinfo(torch.long).max
    blk = torch.where(masked & layout.answer, layout.block, torch.full_like(layout.block, big))
    first = blk.min(-1).values
    return torch.where(first == big, layout.n_blocks, first)
