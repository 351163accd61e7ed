"""The package's shape: no branch on a registered name, every module imports alone, no import
cycle, every import left inside a function says why, no oversized file.

1. Outside the registries, no code asks which order, task, decoder or objective it holds by
   comparing its name with a string literal (``order.name == "ar"``, ``cfg["task"]["name"] ==
   "linear_regression"``, ``{"block": ...}[order.name]``): each piece answers for itself
   (``order.label()``, ``order.natural_decoder()``, ``task.threshold_for()``, ...). Checked on the
   syntax tree, so docstrings, comments and messages that *mention* a name never count.
2. Every module of the package imports on its own, in a process that has imported no other
   module of the package (one forked child per module).
3. The import graph of the package has no cycle among module-level imports (imports inside
   function bodies run later, lazily, and are listed apart), and nothing in the library proper
   imports :mod:`anyorder.studies`.
4. An import inside a function body stays there only for a reason -- a real cycle, an optional
   or heavy dependency the module does not otherwise need, the ``python -m`` self-import -- and
   says so with a ``# lazy: <why>`` comment on its line; anything else goes to module level.
5. ``experiment.py`` stays a small facade (under 200 lines) and no module exceeds 400 lines.
"""
from __future__ import annotations

import ast
import io
import subprocess
import sys
import textwrap
import tokenize
from pathlib import Path
from typing import Dict, Iterator, List, Set, Tuple, Union

SRC = Path(__file__).resolve().parents[1] / "src"
PKG = "anyorder"
NAME_ATTRS = {"name", "registered_name"}


def package_files() -> Dict[str, Path]:
    """module name -> file, for every module of the package (a package is its ``__init__``)."""
    out = {}
    for f in sorted((SRC / PKG).rglob("*.py")):
        parts = list(f.relative_to(SRC).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = f
    return out


# -- 1. no branch on a registered name --------------------------------------------------------

def _is_name_expr(node: ast.AST) -> bool:
    """``x.name``, ``x.registered_name``, ``x["name"]``, ``x.get("name", ...)``, ``getattr(x, "name", ...)``."""
    if isinstance(node, ast.Attribute):
        return node.attr in NAME_ATTRS
    if isinstance(node, ast.Subscript):
        return isinstance(node.slice, ast.Constant) and node.slice.value == "name"
    if isinstance(node, ast.Call) and len(node.args) >= 1:
        f = node.func
        if isinstance(f, ast.Attribute) and f.attr == "get":
            return isinstance(node.args[0], ast.Constant) and node.args[0].value == "name"
        if isinstance(f, ast.Name) and f.id == "getattr" and len(node.args) >= 2:
            return isinstance(node.args[1], ast.Constant) and node.args[1].value in NAME_ATTRS
    return False


def _is_literal(node: ast.AST) -> bool:
    """A string constant, or a tuple / list / set / dict of them."""
    if isinstance(node, ast.Constant):
        return isinstance(node.value, str)
    if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
        return bool(node.elts) and all(_is_literal(e) for e in node.elts)
    if isinstance(node, ast.Dict):
        return bool(node.keys) and all(k is not None and _is_literal(k) for k in node.keys)
    return False


class _NameBranches(ast.NodeVisitor):
    """Comparisons (==, !=, in, not in, match/case) of a name expression -- or of a variable
    assigned one in the same function -- with string literals, and dispatch tables of string
    literals indexed by one (``{"ar": ...}[order.name]``, ``{...}.get(order.name)``)."""

    def __init__(self):
        self.hits: List[int] = []
        self.scopes: List[Set[str]] = [set()]

    def _named(self, node) -> bool:
        return _is_name_expr(node) or (isinstance(node, ast.Name) and node.id in self.scopes[-1])

    def visit_FunctionDef(self, node):
        self.scopes.append(set())
        self.generic_visit(node)
        self.scopes.pop()

    visit_AsyncFunctionDef = visit_FunctionDef

    def visit_Assign(self, node):
        if _is_name_expr(node.value):
            self.scopes[-1].update(t.id for t in node.targets if isinstance(t, ast.Name))
        self.generic_visit(node)

    def visit_Compare(self, node):
        sides = [node.left, *node.comparators]
        for op, a, b in zip(node.ops, sides, sides[1:]):
            if not isinstance(op, (ast.Eq, ast.NotEq, ast.In, ast.NotIn)):
                continue
            for x, y in ((a, b), (b, a)):
                registered = isinstance(x, ast.Attribute) and x.attr == "registered_name"
                if self._named(x) and (_is_literal(y) or registered):
                    self.hits.append(node.lineno)
        self.generic_visit(node)

    def visit_Match(self, node):
        if self._named(node.subject) and any(isinstance(c.pattern, (ast.MatchValue, ast.MatchOr))
                                             for c in node.cases):
            self.hits.append(node.lineno)
        self.generic_visit(node)

    def visit_Subscript(self, node):
        if isinstance(node.value, ast.Dict) and _is_literal(node.value) and self._named(node.slice):
            self.hits.append(node.lineno)
        self.generic_visit(node)

    def visit_Call(self, node):
        f = node.func
        if (isinstance(f, ast.Attribute) and f.attr == "get" and isinstance(f.value, ast.Dict)
                and _is_literal(f.value) and node.args and self._named(node.args[0])):
            self.hits.append(node.lineno)
        self.generic_visit(node)


def name_branches(source: str) -> List[int]:
    """Line numbers of ``source`` that branch on a registered name (see :class:`_NameBranches`)."""
    v = _NameBranches()
    v.visit(ast.parse(source))
    return sorted(set(v.hits))


def is_registry_module(path: Path) -> bool:
    return path.name == "registry.py"


def test_the_name_branch_check_catches_the_old_patterns_and_passes_legitimate_code():
    caught = {
        'if order.name == "ar":\n    pass': [1],
        'ok = cfg["task"]["name"] == "linear_regression"': [1],
        'is_sudoku = getattr(task, "name", "") == "sudoku"': [1],
        'if spec.get("name") == "left_to_right" or order.name == "ar":\n    pass': [1],
        'if "ar" != order.name:\n    pass': [1],
        'if task.name in ("sudoku", "toy"):\n    pass': [1],
        'if type(o).registered_name == other:\n    pass': [1],
        'def f(order):\n    name = order.name\n    if name == "random":\n        return 1': [3],
        'match order.name:\n    case "ar":\n        pass': [1],
        'spec = {"block": 16}[order.name]': [1],
        'spec = {"block": {"name": "block"}}.get(order_spec["name"], "ar")': [1],
    }
    for src, lines in caught.items():
        assert name_branches(src) == lines, src
    legitimate = [
        'same = [r for r in runs if r["cfg"]["task"]["name"] == name]',  # grouping by a name
        'cls = TASKS.get(cfg["task"]["name"])',
        'msg = f"order {order.name!r} has no plan"',
        'label = order.name if order.block_size == 1 else f"{order.name} {order.block_size}"',
        'names = registry.names()',
        'if a.name == b.name:\n    pass',
        '"""if order.name == "ar": in a docstring"""',
        '# if order.name == "ar": in a comment',
        'def f(order):\n    name = order.name\n    return {"name": name}',
        'def g(x):\n    name = "ar"\n    if name == "ar":\n        pass',   # not a registered name
    ]
    for src in legitimate:
        assert name_branches(src) == [], src


def test_no_branch_on_a_registered_name_outside_the_registries():
    hits = []
    for mod, path in package_files().items():
        if is_registry_module(path):
            continue
        for line in name_branches(path.read_text()):
            hits.append(f"{path.relative_to(SRC.parent)}:{line}: {path.read_text().splitlines()[line - 1].strip()}")
    assert not hits, ("branches on an order's / task's / decoder's name outside the registries (ask the "
                      "piece instead):\n" + "\n".join(hits))


# -- 2. every module imports alone -------------------------------------------------------------

_FORK_IMPORTS = textwrap.dedent(r'''
    import importlib, os, sys, traceback
    import numpy, torch, yaml  # third-party, shared: only the package's own modules are imported fresh
    assert not any(m == "anyorder" or m.startswith("anyorder.") for m in sys.modules)
    failed = []
    for name in sys.argv[1:]:
        pid = os.fork()
        if pid == 0:
            code = 0
            try:
                importlib.import_module(name)
            except BaseException:
                print(f"--- import {name} failed:", file=sys.stderr)
                traceback.print_exc()
                code = 1
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
        _, status = os.waitpid(pid, 0)
        if os.waitstatus_to_exitcode(status) != 0:
            failed.append(name)
    print("FAILED " + " ".join(failed))
''')


def test_every_module_imports_alone_in_a_fresh_process():
    mods = list(package_files())
    proc = subprocess.run([sys.executable, "-c", _FORK_IMPORTS, *mods], capture_output=True, text=True,
                          cwd=str(SRC), env={"PYTHONPATH": str(SRC), "PATH": "", "OMP_NUM_THREADS": "1",
                                             "HF_HUB_OFFLINE": "1", "MPLBACKEND": "Agg"}, timeout=300)
    assert proc.returncode == 0, proc.stderr[-5000:]
    failed = proc.stdout.strip().splitlines()[-1].split()[1:]
    assert not failed, f"modules that do not import alone: {failed}\n{proc.stderr[-5000:]}"


# -- 3. the import graph -----------------------------------------------------------------------

def _ancestors(mod: str) -> Set[str]:
    parts = mod.split(".")
    return {".".join(parts[:i]) for i in range(1, len(parts))}


def _targets(mod: str, is_pkg: bool, node: ast.AST, modules: Set[str]) -> List[str]:
    """The modules an import statement needs executed: ``import a.b.c`` -> a.b.c; ``from X import
    n`` -> X.n where that is a module (a submodule import), else X (an attribute of X is read)."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    if node.level:
        base = mod.split(".") if is_pkg else mod.split(".")[:-1]
        base = base[:len(base) - (node.level - 1)]
        prefix = ".".join(base + ([node.module] if node.module else []))
    else:
        prefix = node.module or ""
    return [f"{prefix}.{a.name}" if f"{prefix}.{a.name}" in modules else prefix for a in node.names]


ImportNode = Union[ast.Import, ast.ImportFrom]


def walk_imports(tree: ast.AST, at_top: bool = True) -> Iterator[Tuple[ImportNode, bool]]:
    """Every import statement under ``tree`` with whether it runs when the module loads (module
    level, including under ``if``/``try`` and in class bodies) or only when a function runs."""
    for child in ast.iter_child_nodes(tree):
        if isinstance(child, (ast.Import, ast.ImportFrom)):
            yield child, at_top
        else:
            yield from walk_imports(child, at_top and not isinstance(
                child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)))


def import_graph() -> Tuple[Dict[str, Set[str]], Dict[str, Set[str]]]:
    """(load-time edges, lazy edges): module -> the package's modules it imports at module level
    (including under ``if``/``try``), and those it imports only inside function bodies.

    Importing ``a.b.c`` first executes the ``__init__`` of every package on the way (a, a.b), so
    those are edges too -- except the importer's own parent packages: Python has already started
    them before the importer runs (a package's ``__init__`` importing its own submodules is no
    cycle). Reading an attribute of a parent package (``from . import build_order``) is an edge."""
    files = package_files()
    modules = set(files)
    load: Dict[str, Set[str]] = {}
    lazy: Dict[str, Set[str]] = {}
    for mod, path in files.items():
        is_pkg = path.name == "__init__.py"
        top: Set[str] = set()
        inner: Set[str] = set()
        for node, at_top in walk_imports(ast.parse(path.read_text())):
            for t in _targets(mod, is_pkg, node, modules):
                if t == PKG or t.startswith(PKG + "."):
                    needed = {t} | (_ancestors(t) - _ancestors(mod))
                    (top if at_top else inner).update(needed - {mod})
        load[mod] = {m for m in top if m in modules}
        lazy[mod] = {m for m in inner if m in modules} - load[mod]
    return load, lazy


def find_cycles(edges: Dict[str, Set[str]]) -> List[List[str]]:
    """One cycle (a -> b -> ... -> a) per strongly connected component with more than one module."""
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    stack: List[str] = []
    on_stack: Set[str] = set()
    comps: List[Set[str]] = []

    def strong(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.add(w)
                if w == v:
                    break
            if len(comp) > 1:
                comps.append(comp)

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))
    for v in sorted(edges):
        if v not in index:
            strong(v)
    cycles = []
    for comp in comps:  # a shortest path back to the start, inside the component
        start = min(comp)
        prev = {start: None}
        frontier = [start]
        while frontier and start not in [w for v in frontier for w in edges[v]]:
            nxt = []
            for v in frontier:
                for w in sorted(edges[v] & comp):
                    if w not in prev:
                        prev[w] = v
                        nxt.append(w)
            frontier = nxt
        last = next(v for v in frontier if start in edges[v])
        path = [last]
        while prev[path[-1]] is not None:
            path.append(prev[path[-1]])
        cycles.append(list(reversed(path)) + [start])
    return cycles


def test_find_cycles_reports_a_cycle_and_nothing_else():
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"]]
    assert find_cycles({"a": {"b"}, "b": set()}) == []


def test_the_import_graph_has_no_load_time_cycle():
    load, lazy = import_graph()
    # the parser sees what Python does: a relative import, the package __init__ on the way to a
    # submodule, not the importer's own package, and an import inside a function as lazy
    assert "anyorder.orders.registry" in load["anyorder.orders.block"]
    assert {"anyorder.decoding", "anyorder.decoding.loop"} <= load["anyorder.evaluation.decode"] | {"anyorder.decoding.loop"}
    assert "anyorder.orders" not in load["anyorder.orders.block"]
    assert "anyorder.analysis.easy_first" in lazy["anyorder.tasks.sudoku"]
    cycles = find_cycles(load)
    both = {m: load[m] | lazy[m] for m in load}
    lazy_cycles = [c for c in find_cycles(both) if c not in cycles]
    if lazy_cycles:  # legal (the import runs when the function is called), listed for the record
        print("cycles closed only by imports inside functions:\n" + "\n".join(" -> ".join(c) for c in lazy_cycles))
    assert not cycles, "import cycles among module-level imports:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_the_library_does_not_import_the_studies():
    load, lazy = import_graph()
    studies = f"{PKG}.studies"
    users = sorted(m for m in load if not (m == studies or m.startswith(studies + ".")) and m != f"{PKG}.cli"
                   and any(t == studies or t.startswith(studies + ".") for t in load[m] | lazy[m]))
    assert not users, f"library modules importing {studies} (study code is not library API): {users}"


# -- 4. an import inside a function says why ----------------------------------------------------

LAZY_TAG = "# lazy:"


def unexplained_lazy_imports(source: str) -> List[int]:
    """First lines of the imports inside function bodies of ``source`` that carry no
    ``# lazy: <why>`` comment (a real comment token, with a reason, on one of the statement's lines)."""
    explained = set()
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            text = tok.string
            at = text.find(LAZY_TAG)
            if at >= 0 and text[at + len(LAZY_TAG):].strip():
                explained.add(tok.start[0])
    return sorted(node.lineno for node, at_top in walk_imports(ast.parse(source)) if not at_top
                  and not explained & set(range(node.lineno, (node.end_lineno or node.lineno) + 1)))


def test_the_lazy_import_check_catches_an_unexplained_import_and_passes_explained_ones():
    caught = {
        "def f():\n    import yaml\n": [2],
        "def f():\n    from .x import y\n    return y\n": [2],
        "class A:\n    def m(self):\n        from . import z\n": [3],
        "def f():\n    def g():\n        import os\n": [3],
        "def f():\n    import os  # lazy:\n": [2],                     # no reason given
        "def f():\n    s = '# lazy: in a string'; import os\n": [2],  # a string is no comment
        "def f():\n    import a  # lazy: optional\n    import b\n": [3],
    }
    for src, lines in caught.items():
        assert unexplained_lazy_imports(src) == lines, src
    explained = [
        "import yaml\nfrom .x import y\n",                             # module level
        "try:\n    import lm_eval\nexcept ImportError:\n    pass\n",  # still module level
        "class A:\n    from .x import y\n",                            # a class body runs at load time
        "def f():\n    from .x import y  # lazy: cycle (x imports this module)\n",
        "def f():\n    import wandb  # noqa: F401  # lazy: optional dependency\n",
        "def f():\n    from .x import (a,  # lazy: cycle\n                    b)\n",
    ]
    for src in explained:
        assert unexplained_lazy_imports(src) == [], src


def test_every_import_inside_a_function_says_why_it_is_lazy():
    hits = []
    for path in package_files().values():
        source = path.read_text()
        for line in unexplained_lazy_imports(source):
            hits.append(f"{path.relative_to(SRC.parent)}:{line}: {source.splitlines()[line - 1].strip()}")
    assert not hits, ("imports inside functions without a '# lazy: <why>' comment: move them to module level, "
                      "or say why they must wait (a real cycle, an optional or heavy dependency the module does "
                      "not otherwise need, the `python -m` self-import):\n" + "\n".join(hits))


# -- 5. file sizes -------------------------------------------------------------------------------

EXPERIMENT_MAX_LINES = 200
MODULE_MAX_LINES = 400


def _lines(path: Path) -> int:
    return len(path.read_text().splitlines())


def test_experiment_stays_a_small_facade():
    n = _lines(SRC / PKG / "experiment.py")
    assert n < EXPERIMENT_MAX_LINES, f"src/{PKG}/experiment.py has {n} lines (limit: under {EXPERIMENT_MAX_LINES})"


def test_no_module_exceeds_the_size_limit():
    big = sorted(f"{path.relative_to(SRC.parent)}: {_lines(path)} lines" for path in package_files().values()
                 if _lines(path) > MODULE_MAX_LINES)
    assert not big, f"modules over {MODULE_MAX_LINES} lines (split them):\n" + "\n".join(big)
