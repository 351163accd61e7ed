"""Import the user modules a config lists under ``plugins:`` so their registrations run.

A plugin is a dotted module name or a path to a ``.py`` file; importing it runs its
``@ORDERS.register(...)``-style decorators before the config's names are resolved.
"""
from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path


def load_plugins(plugins) -> None:
    for item in plugins or []:
        item = str(item)
        if item.endswith(".py"):
            path = Path(item)
            if not path.exists():
                raise FileNotFoundError(f"plugin file {item!r} does not exist")
            name = f"anyorder_plugin_{path.stem}"
            if name in sys.modules:
                continue
            spec = importlib.util.spec_from_file_location(name, path)
            module = importlib.util.module_from_spec(spec)
            sys.modules[name] = module
            spec.loader.exec_module(module)
        else:
            importlib.import_module(item)
