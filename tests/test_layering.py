"""DESIGN.md layer boundaries: `core` and `nn` never import equinox or flax."""

import ast
import pathlib
import subprocess
import sys

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "pzbridge"
FORBIDDEN = ("equinox", "flax")


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
