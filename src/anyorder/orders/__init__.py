"""Generation orders, registered by name (see :mod:`anyorder.orders.base` for the interface)."""
from .base import Layout, Order, TrainPlan
from .registry import ORDERS
from .schedules import SCHEDULES, Schedule, build_schedule
from . import random, ar, block, prefix_block, jigsaw, scatter, learned  # noqa: F401  (registration)


def build_order(spec) -> Order:
    """``"random"`` or ``{"name": "block", "block_size": 4}``."""
    if isinstance(spec, Order):
        return spec
    if isinstance(spec, str):
        return ORDERS.get(spec)()
    spec = dict(spec)
    name = spec.pop("name")
    return ORDERS.get(name)(**spec)
