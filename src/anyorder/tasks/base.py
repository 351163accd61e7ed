"""What a task supplies: batches with a prompt/answer split, position features, a verifier.

A task knows nothing about orders: it hands out clean sequences ``x0`` [B, L] with the
``answer`` mask (True = generated/scored), its vocabulary (with a [MASK] id), optional
per-position embedding ids (``extra()``), and metrics on decoded answers.
"""
from __future__ import annotations

from typing import Dict, Tuple

import torch

from ..registry import Registry

TASKS: Registry = Registry("task")


class Task:
    name = "base"
    vocab_size: int          # including the mask token
    mask_id: int
    seq_len: int
    extra_embeddings: Dict[str, int] = {}

    def extra(self) -> Dict[str, torch.Tensor]:
        """name -> [L] long ids of task embeddings added to the token embedding."""
        return {}

    def train_batch(self, batch_size: int, gen: torch.Generator) -> Tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def eval_set(self, n: int) -> Tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def metrics(self, pred: torch.Tensor, x0: torch.Tensor, answer: torch.Tensor) -> Dict[str, float]:
        correct = (pred == x0) | ~answer
        return {"token_acc": float(((pred == x0) & answer).sum() / answer.sum().clamp_min(1)),
                "seq_acc": float(correct.all(-1).double().mean())}

    def headline(self) -> str:
        """The metric a table leads with."""
        return "seq_acc"

    def describe(self) -> Dict[str, object]:
        return {"name": self.name, "vocab_size": self.vocab_size, "seq_len": self.seq_len}


def build_task(spec) -> Task:
    if isinstance(spec, Task):
        return spec
    if isinstance(spec, str):
        return TASKS.get(spec)()
    spec = dict(spec)
    return TASKS.get(spec.pop("name"))(**spec)
