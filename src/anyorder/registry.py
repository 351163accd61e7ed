"""Name -> class registries for orders, objectives, decoders, scores, schedules and tasks.

Configs and the CLI refer to every swappable piece by name; a user adds their own with
``@ORDERS.register("my_order")`` without editing the library. ``REGISTRY.build(spec)`` turns a
name, a ``{"name": ..., option: value}`` dict or an already built instance into the piece, and
refuses an unknown name or option with the valid choices.
"""
from __future__ import annotations

import difflib
import inspect
from typing import Any, Callable, Dict, Generic, List, Optional, Set, TypeVar

T = TypeVar("T")


def unknown_choice(kind: str, name: str, choices: List[str]) -> ValueError:
    """A ValueError naming the bad value, the valid choices and the closest match."""
    close = difflib.get_close_matches(str(name), choices, n=1, cutoff=0.5)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    return ValueError(f"unknown {kind} {name!r}.{hint} Valid choices: {', '.join(sorted(choices))}")


def options_of(cls) -> Optional[Set[str]]:
    """The keyword options ``cls(...)`` accepts, following ``**kwargs`` passed up the MRO; None
    if some ``__init__`` takes ``**kwargs`` and no base class bounds them (anything goes)."""
    names: Set[str] = set()
    for klass in getattr(cls, "__mro__", (cls,)):
        init = klass.__dict__.get("__init__")
        if init is None or klass is object:
            continue
        params = list(inspect.signature(init).parameters.values())[1:]  # drop self
        names |= {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
        if not any(p.kind == p.VAR_KEYWORD for p in params):
            return names
    return None


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
        if not isinstance(name, str) or name not in self._items:
            raise unknown_choice(self.kind, name, list(self._items))
        return self._items[name]

    def resolve(self, spec: Any, **kwargs: Any):
        """``(class, options)`` of a ``"name"`` or ``{"name": "name", **options}`` spec, with
        options the class does not take refused (a ValueError naming the valid ones)."""
        if isinstance(spec, str):
            name, options = spec, {}
        elif isinstance(spec, dict):
            options = dict(spec)
            if "name" not in options:
                raise ValueError(f"a {self.kind} spec needs a 'name' (valid: {', '.join(self.names())}); got {spec!r}")
            name = options.pop("name")
        else:
            raise ValueError(f"a {self.kind} spec is a name or a dict with a 'name'; got {spec!r}")
        options.update(kwargs)
        cls = self.get(name)
        valid = options_of(cls)
        unknown = sorted(set(options) - valid) if valid is not None else []
        if unknown:
            close = difflib.get_close_matches(unknown[0], sorted(valid), n=1, cutoff=0.5)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise ValueError(f"{self.kind} {name!r} got unknown option(s) {', '.join(map(repr, unknown))}.{hint} "
                             f"Valid options: {', '.join(sorted(valid)) or '(none)'}")
        return cls, options

    def build(self, spec: Any, **kwargs: Any):
        """Build from ``"name"`` or ``{"name": "name", **options}`` (see :meth:`resolve`), or return
        an already built instance as is. Errors raised inside the constructor propagate unchanged."""
        if isinstance(spec, (int, float, list, tuple, type(None))):  # config data, but not a spec
            raise ValueError(f"a {self.kind} spec is a name or a dict with a 'name' (valid: {', '.join(self.names())}); "
                             f"got {spec!r}")
        if not isinstance(spec, (str, dict)):
            return spec
        cls, options = self.resolve(spec, **kwargs)
        return cls(**options)  # constructors validate their options (ValueError); anything else is a bug

    def names(self) -> List[str]:
        return sorted(self._items)

    def __contains__(self, name: str) -> bool:
        return name in self._items
