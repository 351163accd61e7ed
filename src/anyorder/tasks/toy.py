"""The A/B toy of "Why mask diffusion does not work": committing two tokens at once picks AB.

100 sequences of five tokens ``[A|A'] [B|B'] C D E``: 34 × AB, 21 × AB', 35 × A'B, 10 × A'B',
C D shared, E unique per sequence. Given ``_ _ C D _`` an MDM's marginals are P(A) = 0.55,
P(B) = 0.69, so committing both positions at once picks AB (joint 0.34) though the joint mode
is A'B (0.35). The study that trains a model on it and reads these numbers off the model is
:mod:`anyorder.studies.toy` (``anyorder toy``).
"""
from __future__ import annotations

from typing import Dict

import torch

from .base import TASKS, Task

A, A_, B, B_, C, D = range(6)
NAMES = {A: "A", A_: "A'", B: "B", B_: "B'"}
COUNTS = {(A, B): 34, (A, B_): 21, (A_, B): 35, (A_, B_): 10}


@TASKS.register("toy")
class ToyTask(Task):
    name = "toy"
    vocab_size = 6 + 100 + 1
    mask_id = 106
    seq_len = 5

    def __init__(self):
        rows = []
        for (a, b), c in COUNTS.items():
            rows += [[a, b, C, D]] * c
        self.data = torch.tensor([r + [6 + i] for i, r in enumerate(rows)])  # E unique

    def train_batch(self, batch_size, gen):
        # stratified: every sequence equally often (no data-sampling noise), then shuffled
        reps = -(-batch_size // len(self.data))
        idx = torch.arange(len(self.data)).repeat(reps)[torch.randperm(reps * len(self.data), generator=gen)][:batch_size]
        x0 = self.data[idx]
        return x0, torch.ones_like(x0, dtype=torch.bool)

    def eval_set(self, n):
        x0 = self.data[:n]
        return x0, torch.ones_like(x0, dtype=torch.bool)

    def marginal_gap(self, model) -> Dict[str, float]:
        """KL(joint ‖ product of marginals) of the first two positions given ``_ _ C D _``: with
        the data's marginals (the pair's mutual information) and with ``model``'s."""
        from ..analysis.factorization import toy_gap, toy_model_marginals  # lazy: cycle (factorization imports tasks.toy)

        qa, qb = toy_model_marginals(model, self.mask_id)
        return {"data_marginals": toy_gap(), "model_marginals": toy_gap([qa.tolist(), qb.tolist()])}
