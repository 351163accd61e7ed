"""Learning-rate schedule: linear warm-up, then cosine decay to ``min_lr_ratio``.

A pure function of the step (no scheduler object with its own state) so a resumed run recomputes
exactly the lr an uninterrupted run would have used; nothing about it needs checkpointing.
"""
from __future__ import annotations

import math


def lr_multiplier(step: int, total_steps: int, warmup_steps: int = 0, min_lr_ratio: float = 0.1) -> float:
    """Multiplier applied to the peak lr for the optimizer update with 0-based index ``step``.

    - warm-up, ``step < warmup_steps``: ``(step + 1) / (warmup_steps + 1)`` -- never exactly 0 (a
      zero-lr update would waste a step) and it reaches 1.0 at ``step == warmup_steps``, where the
      cosine begins, so the ramp joins the peak without a plateau.
    - cosine from 1.0 at ``step == warmup_steps`` down to ``min_lr_ratio`` at the final update
      ``step == total_steps - 1``; steps past the end stay at ``min_lr_ratio``.
    """
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    decay_steps = total_steps - 1 - warmup_steps
    if decay_steps <= 0:
        # all of training is warm-up (or one step after it): there is no room to decay
        return 1.0
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    cosine = 0.5 * (1.0 + math.cos(math.pi * progress))
    return min_lr_ratio + (1.0 - min_lr_ratio) * cosine


__all__ = ["lr_multiplier"]
