from ..registry import Registry

ORDERS: Registry = Registry("order")
