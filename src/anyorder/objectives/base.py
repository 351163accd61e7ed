"""What an objective is: how a model of a task is built, trained and scored under an order.

An objective is the piece between an order (which positions are hidden, how they are weighted,
what attends to what) and the training loop. The wiring (:mod:`anyorder.experiment`) never asks
which order or task it holds; it asks the objective:

- :meth:`Objective.build_model`  the network for the task (token transformer, LoMDM, continuous);
- :meth:`Objective.loss`         one micro-batch's (loss, stats), drawing every random number
                                 from the generator it is given (exact resume);
- :meth:`Objective.validation`   a function model -> {metric: float} for periodic evaluation;
- :meth:`Objective.evaluate`     the task's metrics of decoded answers (``anyorder eval``);
- :meth:`Objective.likelihood`   the NELBO / exact NLL bound (``anyorder likelihood``);
- :meth:`Objective.lr_scale`     per-parameter learning-rate factors (None: one lr).

Which objective trains a run is the config's ``objective`` if set, else the one the task names
(``Task.objective``, e.g. a continuous task), else the order's (``Order.objective``): ``nelbo``
for every fixed order, ``lomdm`` for the learned one. A new objective is one file with
``@OBJECTIVES.register("name")`` (see examples/smoothed_objective.py).
"""
from __future__ import annotations

from typing import Any, Callable, Dict, Optional, Tuple

import torch
from torch import nn

from ..registry import Registry, unknown_choice

OBJECTIVES: Registry = Registry("objective")


class Objective:
    """Base class. Subclasses set ``weightings`` (the loss weightings they accept, the first is
    not a default: the order's ``default_weighting`` is) and implement the methods below."""

    weightings: Tuple[str, ...] = ("elbo",)
    weighting_kind = "weighting"   # how an unknown weighting is named in the error message
    has_likelihood = True          # False: :meth:`likelihood` has no bound to give (continuous targets)

    def __init__(self, task, order, weighting: Optional[str] = None):
        self.task, self.order = task, order
        self.weighting = weighting or order.default_weighting
        if self.weighting not in self.weightings:
            raise unknown_choice(self.weighting_kind, self.weighting, list(self.weightings))

    def build_model(self, options: Dict[str, Any]) -> nn.Module:
        """A freshly initialised network for this task; ``options`` is the config's ``model``
        section (seed the global RNG before calling: initialisation draws from it)."""
        raise NotImplementedError

    def loss(self, model: nn.Module, batch_size: int, gen: torch.Generator, step: int):
        """(scalar loss, stats) of one micro-batch drawn from ``gen``; ``stats["tokens"]`` counts
        the input tokens processed (for tokens/s). ``model`` is the bare network."""
        raise NotImplementedError

    def validation(self, n: int, decoder_spec) -> Callable[[nn.Module], Dict[str, float]]:
        """eval_fn(model) -> {"val_<metric>": float} on a fixed held-out set of ``n`` examples."""
        raise NotImplementedError

    def evaluate(self, model: nn.Module, decoder_spec, n: int, batch_size: int = 256,
                 return_results: bool = False):
        """The task's metrics on ``n`` held-out examples decoded with ``decoder_spec`` (plus the
        decode results with ``return_results``)."""
        raise NotImplementedError

    def likelihood(self, model: nn.Module, x0: torch.Tensor, answer: torch.Tensor, samples: int = 8,
                   batch_size: int = 64, seed: int = 0) -> Dict[str, object]:
        """NELBO per answer token with its standard error, or the exact NLL where the order's
        training pass computes it (see :mod:`anyorder.evaluation.likelihood`)."""
        raise NotImplementedError

    def lr_scale(self, lr: float) -> Optional[Callable[[str], float]]:
        """``f(parameter name) -> factor`` on the base lr, or None (every parameter at ``lr``)."""
        return None

    def describe(self) -> Dict[str, str]:
        return {"name": getattr(self, "registered_name", type(self).__name__), "weighting": self.weighting}


def objective_name(task, order, name: Optional[str] = None) -> str:
    """The objective a (task, order) pair trains with: ``name`` if given (the config's
    ``objective``), else the task's if it names one, else the order's."""
    return name or getattr(task, "objective", None) or order.objective


def build_objective(task, order, weighting: Optional[str] = None, name: Optional[str] = None) -> Objective:
    return OBJECTIVES.get(objective_name(task, order, name))(task, order, weighting)
