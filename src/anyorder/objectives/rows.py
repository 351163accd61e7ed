"""The output head and the cross-entropy on the rows a loss reads, not on every position.

A training plan scores only its masked answer positions: about half the rows under random
masking, and never the clean half of a two-stream ``[x_t ⊕ x_0]`` pass (block, AR, Jigsaw).
Applying the head to every query row, copying all logits to fp32 and taking a log-softmax and
an argmax over all of them (then keeping the scored rows) spends most of the head's FLOPs and
memory on rows whose loss weight is 0. Here the backbone runs every row through its blocks but
the last one, whose attention still reads every row (they are its keys) while its output
projection, residual and MLP, which act row by row, run on the scored rows only (a backbone's
``hidden_rows``); then the head, the log-softmax and the accuracy statistic run on those rows, in chunks of at most :data:`CHUNK_LOGITS` logits, so that a large vocabulary
never holds a [rows, V] fp32 tensor for the whole batch: each chunk's logits are recomputed in
the backward pass instead of kept (activation checkpointing: Chen et al., 2016, arXiv 1604.06174).

Row by row this is the arithmetic of the full pass; the loss and the gradients agree with it
within float rounding (a matrix product over fewer rows may round differently, and weight
gradients sum over fewer rows; tests/test_lean_loss.py checks both).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from ..model.transformer import pad_rows

# logits per chunk: 2^25 fp32 values = 128 MiB (e.g. 256 rows of a 126k vocabulary)
CHUNK_LOGITS = 1 << 25


def _target_logp(head_logits, h: torch.Tensor, targets: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """log p(target) [N] and whether the target is the argmax [N] of the rows ``h`` [N, D]."""
    n = len(h)
    # under CPU autocast, zero rows up to a multiple of ROW_MULTIPLE (a few matrix shapes), dropped
    # from the per-row results only: slicing the [N', V] logits would copy them in the backward pass
    logits, targets = head_logits(pad_rows(h)), pad_rows(targets)  # fp32 [N', V], [N']
    with torch.no_grad():
        correct = is_argmax(logits, targets)[:n]
    logp = F.log_softmax(logits, dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)[:n]
    return logp, correct


def is_argmax(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """``logits.argmax(-1) == targets`` [N] bool, from a row max (a fast vectorised reduction;
    argmax ran 9x slower on [1024, 8193] fp32 here): the target is the argmax iff its logit is
    the row's max and no earlier index ties it. Rows with a tie go through argmax itself."""
    top = logits.amax(-1)
    correct = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) == top
    rows = correct.nonzero().squeeze(-1)
    tied = rows[(logits[rows] == top[rows].unsqueeze(-1)).sum(-1) > 1]
    if len(tied):
        correct[tied] = logits[tied].argmax(-1) == targets[tied]
    return correct


def rows_target_logp(head_logits, h: torch.Tensor, targets: torch.Tensor, vocab: int,
                     chunk_logits: int = CHUNK_LOGITS) -> Tuple[torch.Tensor, torch.Tensor]:
    """:func:`_target_logp` over ``h`` [N, D] in chunks of ``chunk_logits // vocab`` rows; when
    there is more than one chunk, each one's logits are recomputed in the backward pass."""
    rows = max(1, chunk_logits // max(1, vocab))
    if len(h) <= rows:
        return _target_logp(head_logits, h, targets)
    parts = [checkpoint(_target_logp, head_logits, h[i:i + rows], targets[i:i + rows], use_reentrant=False)
             for i in range(0, len(h), rows)]
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


def scored_target_logp(model, plan, extra=None, logits_fn=None,
                       chunk_logits: int = CHUNK_LOGITS) -> Tuple[torch.Tensor, torch.Tensor]:
    """(log p(target) [B, L], 0 where not scored; the number of scored rows whose argmax is the target).

    Models that expose ``hidden_rows`` and ``head_logits`` (the :class:`~anyorder.model.Transformer`)
    run their last block's row-wise part and the head on the scored rows only; those with
    ``hidden`` and ``head_logits`` (Hugging Face backbones) the head; any other model is run in
    full by ``logits_fn(model, plan, extra)`` and its scored rows selected.
    """
    scored = plan.scored
    L = plan.targets.shape[1]
    targets = plan.targets[scored]
    head_logits = getattr(model, "head_logits", None)
    hidden_rows = getattr(model, "hidden_rows", None)
    if callable(head_logits) and (callable(hidden_rows) or callable(getattr(model, "hidden", None))):
        kw = dict(attn_mask=plan.attn, positions=plan.index, extra=expand_extra(extra, plan.index),
                  t=plan_time(model, plan))
        if callable(hidden_rows):
            # the scored rows among all query rows (a two-stream pass has 2L; only the first L score)
            rows = torch.cat([scored, scored.new_zeros(len(scored), plan.tokens.shape[1] - L)], dim=1)
            h = hidden_rows(plan.tokens, rows, **kw)
        else:
            h = model.hidden(plan.tokens, **kw)[:, :L][scored]
        logp, correct = rows_target_logp(head_logits, h, targets, model.cfg.vocab_size, chunk_logits)
    else:
        logits = logits_fn(model, plan, extra)[scored]
        with torch.no_grad():
            correct = logits.argmax(-1) == targets
        logp = F.log_softmax(logits.float(), dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    full = torch.zeros(scored.shape, dtype=logp.dtype, device=logp.device).masked_scatter(scored, logp)
    return full, correct.sum()


def extra_to(extra, device):
    """Task embedding ids moved to ``device`` (None stays None): batches are drawn on the CPU."""
    return None if extra is None else {k: v.to(device) for k, v in extra.items()}


def expand_extra(extra, index: Optional[torch.Tensor]):
    """Task embedding ids [.., L] laid out like a plan's input slots (``index``: slot -> position)."""
    if not extra or index is None:
        return extra
    return {k: v.index_select(-1, index) for k, v in extra.items()}


def plan_time(model, plan):
    """The plan's t for a time-conditioned model, else None."""
    cfg = getattr(model, "cfg", None)
    return plan.time if cfg is not None and cfg.time_conditioning else None
