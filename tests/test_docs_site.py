"""The documentation site builds cleanly and documents the whole public API.

``mkdocs build --strict`` (mkdocs.yml at the repository root) runs in a
subprocess into a temporary directory: any warning (a broken link, a
docstring griffe cannot parse, an unresolved cross-reference, a page left
out of the nav) fails the build. The built inventory (``objects.inv``, every
object mkdocstrings rendered) must then hold every public object of the
areas a user imports from, and the nav must list every page under ``docs/``.

The griffe extension that adapts the codebase's docstrings for the site
(``docs/reference/griffe_docstrings.py``) has its laws tested here too.
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import os
import subprocess
import sys
import types
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import pzbridge

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"

# Modules whose public names a user imports; each must be fully documented
# under docs/reference. Public: ``__all__`` where a module has one, else the
# classes and functions defined in it (or, for a package, in its submodules).
AREAS = [
    "pzbridge.nn",
    "pzbridge.core.struct", "pzbridge.core.tree_util", "pzbridge.core.named_axes", "pzbridge.core.named_slice",
    "pzbridge.core.selectors", "pzbridge.core.variables", "pzbridge.core.variable_jit",
    "pzbridge.core.random_stream", "pzbridge.core.chk", "pzbridge.core.errors",
    "pzbridge.bridge", "pzbridge.bridge.convert", "pzbridge.bridge.equinox", "pzbridge.bridge.nnx",
    "pzbridge.toolshed",
    "pzbridge.checkpoint",
    "pzbridge.testing", "pzbridge.testing.named_arrays", "pzbridge.testing.numerics", "pzbridge.testing.trees",
    "pzbridge.testing.equinox_strategies", "pzbridge.testing.nnx_strategies", "pzbridge.testing.deep_models",
    "pzbridge.testing.stateful_equinox",
    "pzbridge.models.gpt", "pzbridge.models.gpt_reference",
]


def _load_extension() -> types.ModuleType:
    spec = importlib.util.spec_from_file_location("griffe_docstrings", DOCS / "reference" / "griffe_docstrings.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# --- the docstring rewrite --------------------------------------------------------------------------------------

rewrite = _load_extension().rewrite_docstring

_plain_text = st.text(alphabet=st.sampled_from("abcXYZ _.,()\n\t>"), max_size=60)
_identifier = st.from_regex(r"[a-z][a-z_]{0,6}(\.[a-z][a-z_]{0,6}){0,3}", fullmatch=True)


@settings(derandomize=True, max_examples=200, deadline=None)
@given(_plain_text)
def test_rewrite_leaves_text_without_sections_roles_or_wrapped_names_unchanged(text: str) -> None:
    # No colon in the alphabet: no section header, no role and no "names:" can occur.
    assert rewrite(text) == text


@settings(derandomize=True, max_examples=200, deadline=None)
@given(st.lists(st.one_of(_plain_text, st.just("Example:"), st.just("    Example:"),
                          _identifier.map(lambda t: f":class:`~{t}`"), _identifier.map(lambda t: f":func:`{t}`"),
                          st.just("  a, b,\n    c: names.")), max_size=6).map("\n".join))
def test_rewrite_is_idempotent(text: str) -> None:
    once = rewrite(text)
    assert rewrite(once) == once


@settings(derandomize=True, max_examples=100, deadline=None)
@given(_identifier, st.booleans())
def test_roles_become_optional_references_to_their_target(target: str, tilde: bool) -> None:
    out = rewrite(f"See :meth:`{'~' if tilde else ''}{target}` here.")
    shown = target.rsplit(".", 1)[-1] if tilde else target
    assert out == f'See <autoref identifier="{target}" optional><code>{shown}</code></autoref> here.'


def test_example_sections_become_examples_and_wrapped_names_join() -> None:
    assert rewrite("Sum.\n\n  Example:\n    >>> 1\n    1") == "Sum.\n\n  Examples:\n    >>> 1\n    1"
    assert rewrite("Args:\n  a, b,\n    c: Axis names.") == "Args:\n  a, b, c: Axis names."
    assert rewrite("Title: <x>, not a role: `y`.") == "Title: <x>, not a role: `y`."


def test_extension_examples_run() -> None:
    # docs/ is outside pytest's doctest paths, so the extension's examples are run here.
    import doctest

    result = doctest.testmod(_load_extension(), optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0


# --- the built site ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if importlib.util.find_spec("mkdocs") is None:
        pytest.fail("mkdocs is not installed. Fix: pip install -e '.[test]' (or '.[docs]'), which pins it.")
    out = tmp_path_factory.mktemp("site")
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}  # the theme's release banner, not a build warning
    run = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(out)],
                         check=False, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    problems = [line for line in run.stderr.splitlines() if line.startswith(("WARNING", "ERROR"))]
    assert run.returncode == 0, "mkdocs build --strict failed:\n" + ("\n".join(problems) or run.stderr[-4000:])
    return out


def inventory(site_dir: Path) -> set[str]:
    """The identifiers of every object rendered on the site, read from its Sphinx-format ``objects.inv``."""
    data = (site_dir / "objects.inv").read_bytes()
    header_end = 0
    for _ in range(4):  # four text lines, then the zlib-compressed body
        header_end = data.index(b"\n", header_end) + 1
    body = zlib.decompress(data[header_end:]).decode()
    return {line.split(" ", 1)[0] for line in body.splitlines() if line.strip()}


def _public_names(module: types.ModuleType) -> list[str]:
    exported = getattr(module, "__all__", None)
    if exported is not None:
        return list(exported)
    names = []
    for name, value in vars(module).items():
        if name.startswith("_") or isinstance(value, types.ModuleType):
            continue
        defined_in = getattr(value, "__module__", None)
        if isinstance(defined_in, str) and (defined_in == module.__name__
                                            or defined_in.startswith(module.__name__ + ".")):
            names.append(name)
    return names


def _toolshed_submodules() -> list[str]:
    """The submodules ``pzbridge/toolshed/__init__.py`` imports as modules (public workflows)."""
    tree = ast.parse((ROOT / "pzbridge" / "toolshed" / "__init__.py").read_text())
    names = [alias.name for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)
             and node.module == "pzbridge.toolshed" for alias in node.names]
    return [f"pzbridge.toolshed.{name}" for name in names]


def _resolve(identifier: str) -> Any:
    """The object a documented identifier names (``pzbridge.nn.Linear``), or None if it is not importable."""
    parts = identifier.split(".")
    for split in range(len(parts), 0, -1):
        try:
            value: Any = importlib.import_module(".".join(parts[:split]))
        except ImportError:
            continue
        for part in parts[split:]:
            value = getattr(value, part, _MISSING)
        return None if value is _MISSING else value
    return None


_MISSING = object()


def public_objects() -> Iterator[tuple[str, Any]]:
    """``(public path, object)`` for every public object."""
    for name, (module_name, attribute) in pzbridge._EXPORTS.items():
        target = importlib.import_module(module_name)
        yield f"pzbridge.{name}", target if attribute is None else getattr(target, attribute)
    for area in AREAS + _toolshed_submodules():
        module = importlib.import_module(area)
        for name in _public_names(module):
            yield f"{area}.{name}", getattr(module, name)


def undocumented(documented: set[str]) -> list[str]:
    """Public paths whose object no documented identifier names (by identity, wherever it is documented)."""
    by_name: dict[str, list[str]] = {}
    for identifier in documented:
        by_name.setdefault(identifier.rsplit(".", 1)[-1], []).append(identifier)
    missing = []
    for path, obj in public_objects():
        name = obj.__name__.rsplit(".", 1)[-1] if isinstance(obj, types.ModuleType) else path.rsplit(".", 1)[-1]
        candidates = by_name.get(name, []) + by_name.get(getattr(obj, "__name__", name), [])
        if path in documented or any(_resolve(c) is obj for c in candidates):
            continue
        missing.append(path)
    return sorted(missing)


def test_site_builds_strict_and_documents_every_public_object(site: Path) -> None:
    # One test uses the built site, so pytest-xdist never builds it twice.
    page = (site / "reference" / "nn" / "index.html").read_text()
    assert 'id="pzbridge.nn.Sequential"' in page and "<autoref" not in page  # references resolved or dropped
    missing = undocumented(inventory(site))
    assert not missing, (
        f"{len(missing)} public objects are not in the API reference: {missing}. "
        "Fix: add a `::: module` (or `::: module.NAME`) directive for them to the matching docs/reference/*.md page."
    )


def test_the_reference_check_catches_an_undocumented_object() -> None:
    # Without the inventory entry for one object, exactly that object (and its re-exports) is reported.
    everything = {path for path, _ in public_objects()} | {"pzbridge.nn.combinators.Sequential"}
    assert undocumented(everything) == []
    without = everything - {"pzbridge.nn.Sequential", "pzbridge.nn.combinators.Sequential"}
    assert undocumented(without) == ["pzbridge.nn.Sequential"]


def test_top_level_page_lists_every_pzb_name() -> None:
    page = (DOCS / "reference" / "pzbridge.md").read_text()
    missing = sorted(name for name in pzbridge._EXPORTS if f"[`pzb.{name}`]" not in page)
    assert not missing, f"docs/reference/pzbridge.md has no row linking {missing}"


def _nav_pages(nav: Any) -> Iterator[str]:
    if isinstance(nav, str):
        yield nav
    elif isinstance(nav, list):
        for item in nav:
            yield from _nav_pages(item)
    elif isinstance(nav, dict):
        for value in nav.values():
            yield from _nav_pages(value)


def test_nav_lists_every_docs_page() -> None:
    import yaml  # installed with mkdocs
    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text())
    listed = set(_nav_pages(config["nav"]))
    pages = {p.relative_to(DOCS).as_posix() for p in DOCS.rglob("*.md")}
    assert not pages - listed, f"docs pages missing from the nav of mkdocs.yml: {sorted(pages - listed)}"
    assert not listed - pages, f"mkdocs.yml's nav names pages that do not exist: {sorted(listed - pages)}"


def test_test_extra_installs_the_docs_extra() -> None:
    import tomllib

    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    # CI runs the README's test command, `pip install -e ".[test]"`: it must bring what the docs build needs.
    missing = set(extras["docs"]) - set(extras["test"])
    assert not missing, f"pyproject.toml: the test extra lacks {sorted(missing)} of the docs extra"
