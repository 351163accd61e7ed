"""Name -> class registries for orders, decoders, scores and tasks.

Configs and the CLI refer to every swappable piece by name; a user adds their own with
``@ORDERS.register("my_order")`` without editing the library.
"""
from __future__ import annotations

import difflib
from typing import Any, Callable, Dict, Generic, List, TypeVar

T = TypeVar("T")


def unknown_choice(kind: str, name: str, choices: List[str]) -> ValueError:
    """A ValueError naming the bad value, the valid choices and the closest match."""
    close = difflib.get_close_matches(str(name), choices, n=1, cutoff=0.5)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    return ValueError(f"unknown {kind} {name!r}.{hint} Valid choices: {', '.join(sorted(choices))}")


class Registry(Generic[T]):
    def __init__(self, kind: str):
        self.kind = kind
        self._items: Dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        def deco(obj: T) -> T:
            if name in self._items and self._items[name] is not obj:
                raise ValueError(f"{self.kind} {name!r} is already registered")
            self._items[name] = obj
            try:
                obj.registered_name = name  # type: ignore[attr-defined]
                if isinstance(obj, type) and hasattr(obj, "name"):
                    obj.name = name  # an order/task reports the name it was registered under
            except (AttributeError, TypeError):
                pass
            return obj

        return deco

    def get(self, name: str) -> T:
        if name not in self._items:
            raise unknown_choice(self.kind, name, list(self._items))
        return self._items[name]

    def build(self, name: str, **kwargs: Any):
        return self.get(name)(**kwargs)

    def names(self) -> List[str]:
        return sorted(self._items)

    def __contains__(self, name: str) -> bool:
        return name in self._items
