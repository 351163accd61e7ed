"""Plugins: user modules a config lists under ``plugins:`` so their registrations run.

A plugin is a dotted module name or a path to a ``.py`` file; importing it runs its
``@ORDERS.register(...)``-style decorators before the config's names are resolved. Importing
runs code, so it happens only when the user asked for it:

* ``anyorder train CONFIG.yaml`` (and ``train(cfg, config_dir=...)``, sweeps): the config is the
  user's own, its plugins are imported. A relative path is resolved against the config file's
  directory; if it is not there, against the current directory (configs written before this rule,
  e.g. the repository's ``configs/examples/*.yaml``, name ``examples/...`` from the repository root).
* Loading a run (``load_run``, ``anyorder eval/sample/likelihood/analyze/report/text-compare``)
  never imports what the run's ``config.yaml`` lists. Plugins already imported in this process
  are fine; any other one is refused (:class:`PluginsNotAllowed`) unless the user names plugins to
  load instead (``--plugin PATH_OR_MODULE``, ``load_run(..., plugins=[...])``) or trusts the run
  (``--trust-plugins``, ``trust_plugins=True``: import exactly what the run lists, at the absolute
  paths recorded in its ``plugins.json``).
"""
from __future__ import annotations

import contextlib
import hashlib
import importlib
import importlib.util
import json
import sys
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Union

PLUGINS_FILE = "plugins.json"  # in a run directory: the plugins as written and as resolved

_LOADED: Dict[str, str] = {}  # resolved plugin (absolute path or module name) -> module name
# what the command line allows for the runs it loads (see :func:`allowed`); Python callers pass
# load_run(plugins=..., trust_plugins=...) instead
_ALLOWED = {"plugins": None, "trust": False}


class PluginsNotAllowed(ValueError):
    """A run lists plugins that are not imported, and the user did not allow importing them."""


def _is_file(item: str) -> bool:
    return item.endswith(".py")


def resolve(item, base_dir: Optional[Union[str, Path]] = None) -> str:
    """A plugin's absolute path (a ``.py`` file; relative: against ``base_dir``, then the
    current directory) or its module name. Imports nothing."""
    item = str(item)
    if not _is_file(item):
        return item
    path = Path(item).expanduser()
    if path.is_absolute():
        tried = [path]
    else:
        tried = ([Path(base_dir) / path] if base_dir is not None else []) + [Path.cwd() / path]
    for p in tried:
        if p.is_file():
            return str(p.resolve())
    raise FileNotFoundError(f"plugin file {item!r} does not exist (looked at {', '.join(map(str, tried))})")


def _import(resolved: str) -> None:
    if resolved in _LOADED:
        return
    if not _is_file(resolved):
        importlib.import_module(resolved)
        _LOADED[resolved] = resolved
        return
    path = Path(resolved)
    name = f"anyorder_plugin_{path.stem}"
    if name in sys.modules and getattr(sys.modules[name], "__file__", None) != resolved:
        name += "_" + hashlib.sha1(resolved.encode()).hexdigest()[:8]  # another file of that name
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        try:
            spec.loader.exec_module(module)
        except BaseException:
            del sys.modules[name]
            raise
    _LOADED[resolved] = name


def load_plugins(plugins: Optional[Iterable], base_dir: Optional[Union[str, Path]] = None) -> List[str]:
    """Import ``plugins`` (resolved with :func:`resolve`); the resolved list."""
    resolved = [resolve(item, base_dir) for item in plugins or []]
    for r in resolved:
        _import(r)
    return resolved


def is_loaded(resolved: str) -> bool:
    """Imported in this process (a module imported by anyone counts: importing it again runs nothing)."""
    return resolved in _LOADED or (not _is_file(resolved) and resolved in sys.modules)


def record(run_dir: Path, plugins: Sequence, base_dir: Optional[Union[str, Path]] = None) -> None:
    """Write ``plugins.json`` into a run directory (the plugins as written and as resolved); remove
    a stale one when the config lists none."""
    path = Path(run_dir) / PLUGINS_FILE
    if plugins:
        data = {"plugins": [str(p) for p in plugins], "resolved": [resolve(p, base_dir) for p in plugins]}
        path.write_text(json.dumps(data, indent=1) + "\n")
    elif path.exists():
        path.unlink()


def recorded(run_dir: Path, plugins: Sequence) -> List[str]:
    """The run's plugins as resolved when it was trained: ``plugins.json`` if it matches the
    config's list, else each one against the run directory, then the current directory (a missing
    file stays as written)."""
    path = Path(run_dir) / PLUGINS_FILE
    if path.exists():
        data = json.loads(path.read_text())
        if data.get("plugins") == [str(p) for p in plugins]:
            return list(data["resolved"])
    out = []
    for p in plugins:
        try:
            out.append(resolve(p, run_dir))
        except FileNotFoundError:
            out.append(str(p))
    return out


@contextlib.contextmanager
def allowed(plugins: Optional[Sequence[str]] = None, trust: bool = False):
    """Within the block, runs loaded without explicit arguments use these (the command line's
    ``--plugin`` and ``--trust-plugins``)."""
    old = dict(_ALLOWED)
    _ALLOWED.update(plugins=list(plugins) if plugins else None, trust=bool(trust))
    try:
        yield
    finally:
        _ALLOWED.update(old)


def for_run(run_dir: Path, listed: Sequence, plugins: Optional[Sequence] = None,
            trust: Optional[bool] = None) -> None:
    """Import what loading the run ``run_dir`` (whose config lists ``listed``) may import:
    ``plugins`` (the user's, instead of the run's list), the run's own list if ``trust``, else
    nothing, and refuse a listed plugin that is not imported yet."""
    plugins = _ALLOWED["plugins"] if plugins is None else plugins
    trust = _ALLOWED["trust"] if trust is None else trust
    if plugins:
        load_plugins(plugins)            # the user's own: relative to the current directory
    if not listed or plugins and not trust:
        return
    wanted = recorded(Path(run_dir), listed)
    if trust:
        for r in wanted:
            if _is_file(r) and not Path(r).is_file():
                raise FileNotFoundError(f"plugin file {r!r} listed by {run_dir} does not exist; "
                                        f"name the plugin with --plugin PATH_OR_MODULE")
            _import(r)
        return
    missing = [str(p) for p, r in zip(listed, wanted) if not is_loaded(r)]
    if missing:
        raise PluginsNotAllowed(
            f"{run_dir} lists plugins that loading it would import (run their code): {', '.join(missing)}; "
            f"not imported. Name the ones to load with --plugin PATH_OR_MODULE (repeatable; "
            f"load_run(run_dir, plugins=[...])) or import exactly what it lists with --trust-plugins "
            f"(trust_plugins=True)")
