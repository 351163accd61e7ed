"""Objectives, registered by name: how a model is trained and scored under an order.

``nelbo`` (every fixed order), ``lomdm`` (the learned order) and ``regression`` (continuous
tasks); see :mod:`anyorder.objectives.base` for the interface.
"""
from .base import OBJECTIVES, Objective, build_objective, objective_name
from . import nelbo, lomdm, regression  # noqa: F401  (registration)

__all__ = ["OBJECTIVES", "Objective", "build_objective", "objective_name"]
