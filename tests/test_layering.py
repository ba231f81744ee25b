"""Layer boundaries and the import graph (see docs/architecture.md, "Layers of the package").

Two kinds of checks read the source files' import statements:

- ``core`` and ``nn`` never import equinox or flax;
- the import graph of every module under ``pzbridge/`` has no cycle, and no
  module imports one of a higher level:
  ``core`` (0) < ``nn`` (1) < ``bridge``, ``toolshed``, ``testing``, ``models``
  (2; imports between them are allowed, cycles are not) < ``checkpoint`` (3)
  < ``demo`` (4) < the root package and ``__main__`` (5).

The edges of the graph: every ``import`` / ``from ... import`` anywhere in a
file, in functions too (a deferred import is still a dependency), except in
``if TYPE_CHECKING:`` blocks. ``from a.b import c`` is an edge to ``a.b.c``
when that is a module, else to ``a.b``; importing ``a.b.c`` implicitly runs
``a/__init__.py`` and ``a/b/__init__.py``, but those are not edges (a package
``__init__`` that wires its modules together does not make every module
depend on its siblings).

The root ``pzbridge/__init__.py`` is a lazy namespace: its own import
statements load nothing of the package, and ``pzb.<name>`` loads the module
that its ``_EXPORTS`` table names on first use. So the root's edges are its
``_EXPORTS`` targets (read from the dict literal), at level 5; and an import
*of* the root is checked as imports of those targets: ``import pzbridge as
pzb`` in the demo (level 4) is fine because everything ``pzb.*`` can load
sits below the demo, while the same import in ``nn`` would reach ``bridge``
and is reported. A cycle through the root (an export of a module that
imports ``pzbridge``) is reported like any other.
"""

from __future__ import annotations

import ast
import pathlib
import subprocess
import sys
from collections.abc import Mapping

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "pzbridge"
FORBIDDEN = ("equinox", "flax")

# Level of each top-level part of the package (a subpackage or a module); the
# root package itself is at ROOT_LEVEL.
LEVELS: dict[str, int] = {
    "core": 0,
    "nn": 1,
    "bridge": 2,
    "toolshed": 2,
    "testing": 2,
    "models": 2,
    "checkpoint": 3,
    "demo": 4,
    "cli_summary": 5,  # python -m pzbridge show: what __main__ runs.
    "cli_show": 5,
    "__main__": 5,
}
ROOT_LEVEL = 5

Graph = dict[str, set[str]]


def _imported_modules(path: pathlib.Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


@pytest.mark.parametrize("layer", ["core", "nn"])
def test_layer_sources_do_not_import_frameworks(layer):
    offenders = []
    for path in sorted((PACKAGE / layer).rglob("*.py")):
        for name in _imported_modules(path):
            if name.split(".")[0] in FORBIDDEN:
                offenders.append(f"{path.relative_to(PACKAGE)} imports {name}")
    assert not offenders, offenders


def test_importing_core_loads_no_framework():
    code = (
        "import sys, pkgutil, importlib, pzbridge.core as core\n"
        "for m in pkgutil.iter_modules(core.__path__):\n"
        "    importlib.import_module('pzbridge.core.' + m.name)\n"
        "try:\n"
        "    import pzbridge.nn\n"
        "except ImportError:\n"
        "    pass\n"
        "bad = [m for m in sys.modules if m.split('.')[0] in ('equinox', 'flax')]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# The import graph. --------------------------------------------------------------


def module_files(package_dir: pathlib.Path) -> dict[str, pathlib.Path]:
    """Dotted name -> source file of every module under ``package_dir`` (packages included)."""
    modules: dict[str, pathlib.Path] = {}
    for path in sorted(package_dir.rglob("*.py")):
        parts = list(path.relative_to(package_dir.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    return modules


def _is_type_checking(test: ast.expr) -> bool:
    """True for the condition of ``if TYPE_CHECKING:`` / ``if typing.TYPE_CHECKING:``."""
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _import_statements(tree: ast.AST) -> list[ast.Import | ast.ImportFrom]:
    """Every import statement of ``tree``, nested ones included, except under ``if TYPE_CHECKING:``."""
    found: list[ast.Import | ast.ImportFrom] = []
    pending: list[ast.AST] = [tree]
    while pending:
        node = pending.pop()
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            pending.extend(node.orelse)
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            found.append(node)
        pending.extend(ast.iter_child_nodes(node))
    return found


def _from_base(node: ast.ImportFrom, package: str) -> str:
    """The absolute module named by ``from <base> import ...`` (relative imports resolved)."""
    if not node.level:
        return node.module or ""
    parts = package.split(".")
    parts = parts[: len(parts) - (node.level - 1)]
    return ".".join(parts + ([node.module] if node.module else []))


def import_edges(name: str, path: pathlib.Path, modules: Mapping[str, pathlib.Path]) -> set[str]:
    """The modules of ``modules`` that module ``name`` (source ``path``) imports.

    ``from a.b import c`` counts as importing ``a.b.c`` if that is a module,
    else ``a.b``; modules outside ``modules`` and the module itself are dropped.
    """
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    targets: set[str] = set()
    for node in _import_statements(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            targets.update(alias.name for alias in node.names)
            continue
        base = _from_base(node, package)
        for alias in node.names:
            submodule = f"{base}.{alias.name}"
            targets.add(submodule if submodule in modules else base)
    return {target for target in targets if target in modules and target != name}


def _exports_table(path: pathlib.Path) -> dict[str, tuple[str, str | None]]:
    """The literal ``_EXPORTS = {...}`` of a module (empty when it has none)."""
    for node in ast.parse(path.read_text(), filename=str(path)).body:
        if isinstance(node, ast.AnnAssign):
            targets, value = [node.target], node.value
        elif isinstance(node, ast.Assign):
            targets, value = node.targets, node.value
        else:
            continue
        if value is not None and any(isinstance(t, ast.Name) and t.id == "_EXPORTS" for t in targets):
            return ast.literal_eval(value)
    return {}


def lazy_exports(path: pathlib.Path, modules: Mapping[str, pathlib.Path]) -> set[str]:
    """The modules a lazy package loads on attribute access: the targets of its ``_EXPORTS``.

    ``_EXPORTS`` maps a public name to ``(module, attribute or None)``; an
    entry counts as an import of ``module.attribute`` when that is a module,
    else of ``module`` (like ``from module import attribute``).
    """
    targets = set()
    for module, attribute in _exports_table(path).values():
        submodule = f"{module}.{attribute}"
        targets.add(submodule if attribute is not None and submodule in modules else module)
    return {target for target in targets if target in modules}


def module_graph(package_dir: pathlib.Path) -> Graph:
    """Module -> imported modules, for every module under ``package_dir``.

    The root package's edges are its import statements plus its ``_EXPORTS``
    targets (see the module docstring).
    """
    modules = module_files(package_dir)
    graph = {name: import_edges(name, path, modules) for name, path in modules.items()}
    root = package_dir.name
    graph[root] |= lazy_exports(modules[root], modules)
    return graph


def _reachable(graph: Mapping[str, set[str]], start: str) -> set[str]:
    """The nodes reachable from ``start`` by one edge or more."""
    seen: set[str] = set()
    pending = list(graph.get(start, ()))
    while pending:
        node = pending.pop()
        if node not in seen:
            seen.add(node)
            pending.extend(graph.get(node, ()))
    return seen


def import_cycles(graph: Mapping[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module, each sorted."""
    reach = {node: _reachable(graph, node) for node in graph}
    cycles: list[list[str]] = []
    placed: set[str] = set()
    for node in sorted(graph):
        if node in placed:
            continue
        component = {node} | {other for other in reach[node] if node in reach.get(other, ())}
        placed |= component
        if len(component) > 1:
            cycles.append(sorted(component))
    return cycles


def level_of(module: str, root: str, levels: Mapping[str, int] = LEVELS, root_level: int = ROOT_LEVEL) -> int:
    """The layer of ``module``, by its top-level part under ``root``.

    Raises:
      KeyError: For a top-level part that has no level yet (give it one in ``LEVELS``).
    """
    if module == root:
        return root_level
    part = module.split(".")[1]
    if part not in levels:
        raise KeyError(f"{module}: {root}.{part} has no level. Fix: add {part!r} to LEVELS in tests/test_layering.py.")
    return levels[part]


def upward_imports(
    graph: Mapping[str, set[str]], root: str, levels: Mapping[str, int] = LEVELS, root_level: int = ROOT_LEVEL
) -> list[str]:
    """Describes every import of a module at a higher level than the importer.

    An import of the lazy ``root`` package is checked as imports of the
    root's own targets (its ``_EXPORTS``), which are what it can load.
    """

    def level(module: str) -> int:
        return level_of(module, root, levels, root_level)

    offenders = []
    for importer in sorted(graph):
        for target in sorted(graph[importer]):
            if target == root:
                above = [f"{reached} (level {level(reached)})" for reached in sorted(graph[root])
                         if level(reached) > level(importer)]
                if above:
                    offenders.append(f"{importer} (level {level(importer)}) imports {root}, "
                                     f"whose _EXPORTS reach {', '.join(above)}")
            elif level(target) > level(importer):
                offenders.append(f"{importer} (level {level(importer)}) imports {target} (level {level(target)})")
    return offenders


def test_import_graph_has_no_cycles() -> None:
    cycles = import_cycles(module_graph(PACKAGE))
    assert not cycles, "import cycles (each a strongly connected component):\n" + "\n".join(
        " <-> ".join(component) for component in cycles
    )


def test_no_module_imports_a_higher_layer() -> None:
    offenders = upward_imports(module_graph(PACKAGE), PACKAGE.name)
    assert not offenders, "upward imports:\n" + "\n".join(offenders)


def test_graph_helpers_report_cycles_and_upward_imports() -> None:
    graph = {
        "p": {"p.mid"},  # the lazy root: exports p.mid
        "p.low.a": {"p.low.b"},
        "p.low.b": {"p.low.a", "p.mid"},  # a cycle with p.low.a, and an upward import
        "p.mid": {"p.low.a"},  # closes a longer cycle through p.low.b
        "p.top": {"p"},  # may import the root: everything it exports is below p.top
        "p.side": {"p"},  # may not: p.mid is above p.side
    }
    levels = {"low": 0, "side": 0, "mid": 1, "top": 2}
    assert import_cycles(graph) == [["p.low.a", "p.low.b", "p.mid"]]
    assert upward_imports(graph, "p", levels, 3) == [
        "p.low.b (level 0) imports p.mid (level 1)",
        "p.side (level 0) imports p, whose _EXPORTS reach p.mid (level 1)",
    ]
    assert import_cycles({"p": {"p.a"}, "p.a": {"p"}}) == [["p", "p.a"]]  # through the root too
    assert import_cycles({"a": {"b"}, "b": {"c"}, "c": set()}) == []
    with pytest.raises(KeyError, match="add 'new'"):
        upward_imports({"p.new": set(), "p": {"p.new"}}, "p", levels, 3)


def test_module_graph_follows_the_edge_rules(tmp_path: pathlib.Path) -> None:
    files = {
        "pkg/__init__.py": '_EXPORTS = {"A": ("pkg.low.a", "A"), "high": ("pkg.high", None)}\n',
        "pkg/low/__init__.py": "",
        "pkg/low/a.py": (
            "from typing import TYPE_CHECKING\n"
            "import json\n"  # outside the package: no edge
            "from pkg.low import b\n"  # a module: edge to pkg.low.b
            "from pkg.low.c import thing\n"  # a name: edge to pkg.low.c
            "if TYPE_CHECKING:\n"
            "    from pkg import high\n"  # typing only: no edge
            "else:\n"
            "    from . import d\n"  # relative, taken branch: edge to pkg.low.d
            "def later():\n"
            "    import pkg.high.deep\n"  # deferred: still an edge, to pkg.high.deep only
        ),
        "pkg/low/b.py": "from .. import low\n",  # edge to the package pkg.low
        "pkg/low/c.py": "thing = 1\n",
        "pkg/low/d.py": "",
        "pkg/high/__init__.py": "",
        "pkg/high/deep.py": "from pkg.low.a import later\n",
    }
    for relative, text in files.items():
        (tmp_path / relative).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / relative).write_text(text)
    assert module_graph(tmp_path / "pkg") == {
        "pkg": {"pkg.low.a", "pkg.high"},
        "pkg.low": set(),
        "pkg.low.a": {"pkg.low.b", "pkg.low.c", "pkg.low.d", "pkg.high.deep"},
        "pkg.low.b": {"pkg.low"},
        "pkg.low.c": set(),
        "pkg.low.d": set(),
        "pkg.high": set(),
        "pkg.high.deep": {"pkg.low.a"},
    }
    assert import_cycles(module_graph(tmp_path / "pkg")) == [["pkg.high.deep", "pkg.low.a"]]
