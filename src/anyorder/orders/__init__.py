"""Generation orders, registered by name (see :mod:`anyorder.orders.base` for the interface).

The order's vocabulary lives here too: :class:`Layout` (blocks × offsets of the answer),
:class:`TrainPlan` (one training pass), the attention-mask builders (:mod:`.masks`) and the
single- and two-stream training passes (:mod:`.plans`).
"""
from .base import Layout, Order, TrainPlan
from .registry import ORDERS
from .schedules import SCHEDULES, Schedule, build_schedule
from . import random, ar, block, prefix_block, jigsaw, scatter, learned  # noqa: F401  (registration)


def build_order(spec) -> Order:
    """``"random"``, ``{"name": "block", "block_size": 4}`` or an :class:`Order` instance."""
    return ORDERS.build(spec)
