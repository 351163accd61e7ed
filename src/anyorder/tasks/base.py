"""What a task supplies: batches with a prompt/answer split, position features, a verifier.

A task knows nothing about orders: it hands out clean sequences ``x0`` [B, L] with the
``answer`` mask (True = generated/scored), its vocabulary (with a [MASK] id), optional
per-position embedding ids (``extra()``), and metrics on decoded answers. It also says what a
study should read off it: the threshold τ that counts as "learned" and a second metric.

A task whose data are not token sequences (e.g. continuous values) names the objective that
consumes its batches (``objective``); :meth:`train_batch`, :meth:`eval_set` and :meth:`metrics`
then hand out and score whatever that objective expects.
"""
from __future__ import annotations

from typing import Any, Dict, Optional, Tuple

import torch

from ..registry import Registry

TASKS: Registry = Registry("task")


class Task:
    name = "base"
    vocab_size: int          # including the mask token
    mask_id: int
    seq_len: int
    extra_embeddings: Dict[str, int] = {}
    objective: Optional[str] = None   # None: the order's objective trains it (anyorder.objectives)
    # (metric logged as val_<metric>, comparison, τ): a run has "learned" the task once it crosses τ
    threshold: Optional[Tuple[str, str, float]] = None
    secondary_metric: Optional[str] = None   # a second final metric shown beside the threshold metric
    # regular expressions over metric names a study report tabulates at the end of training
    detail_metrics: Tuple[str, ...] = ()
    detail_curves: Tuple[str, ...] = ()    # ... and of those, the ones it also plots against training FLOPs
    grid_shape: Optional[Tuple[int, int]] = None  # (rows, columns) to draw an answer as a grid; None: a line
    unique_solution = False  # each prompt's only right answer is its x0: a decode's factorisation gap is exact

    @classmethod
    def threshold_for(cls, options: Dict[str, Any]) -> Tuple[Optional[str], Optional[str], Optional[float]]:
        """(metric, comparison, τ) for a run whose ``task`` config section is ``options`` (read
        without building the task: a study report reads hundreds of configs)."""
        return cls.threshold or (None, None, None)

    def extra(self) -> Dict[str, torch.Tensor]:
        """name -> [L] long ids of task embeddings added to the token embedding."""
        return {}

    def prepare(self) -> None:
        """Make the data now if the task makes it on first use (training calls this before it
        writes anything, so that an impossible request fails first). Default: nothing to do."""

    def train_batch(self, batch_size: int, gen: torch.Generator) -> Tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def eval_set(self, n: int) -> Tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def metrics(self, pred: torch.Tensor, x0: torch.Tensor, answer: torch.Tensor) -> Dict[str, float]:
        correct = (pred == x0) | ~answer
        return {"token_acc": float(((pred == x0) & answer).sum() / answer.sum().clamp_min(1)),
                "seq_acc": float(correct.all(-1).double().mean())}

    def row_correct(self, pred: torch.Tensor, x0: torch.Tensor, answer: torch.Tensor) -> torch.Tensor:
        """[B] bool: the decoded row is right (default: every answer token equals the target)."""
        return ((pred == x0) | ~answer.bool()).all(-1)

    def easy_first(self, x0: torch.Tensor, pred: torch.Tensor, finalize_step: torch.Tensor) -> Optional[Dict[str, float]]:
        """Did a decode fill the easiest positions first? None where the task has no notion of easy."""
        return None

    def model_metrics(self, model, order, x0: torch.Tensor, answer: torch.Tensor) -> Dict[str, float]:
        """Metrics read off the model itself (not off decoded answers) on held-out rows ``x0``,
        added to every evaluation; e.g. teacher-forced accuracy per answer step. Default: none."""
        return {}

    def load_eval(self, path) -> int:
        """Replace the held-out set with the examples in the file at ``path`` (``anyorder eval
        --puzzles``); returns how many. Tasks without a file format refuse."""
        raise ValueError(f"task {self.name!r} does not read evaluation files")

    def marginal_gap(self, model) -> Optional[Dict[str, float]]:
        """KL(joint ‖ product of marginals) where the task can enumerate the joint; else None."""
        return None

    def token_str(self, token: int) -> str:
        """How a viewer shows one token id (default: the id; [MASK] as ``_``)."""
        return "_" if token == self.mask_id else str(token)

    def headline(self) -> str:
        """The metric a table leads with."""
        return "seq_acc"

    def describe(self) -> Dict[str, object]:
        return {"name": self.name, "vocab_size": self.vocab_size, "seq_len": self.seq_len}


def build_task(spec) -> Task:
    """``"sudoku"``, ``{"name": "sudoku", "size": 9}`` or a :class:`Task` instance."""
    return TASKS.build(spec)
