"""Packaging and the typed API: metadata, LICENSE, py.typed, the typed lazy namespace, jaxtyping annotations."""

from __future__ import annotations

import ast
import importlib.metadata
import pathlib
import shutil
import subprocess
import sys
import tomllib
import types
import typing

import jax
import jax.numpy as jnp
import jaxtyping
import numpy as np
import pytest

import pzbridge as pzb

ROOT = pathlib.Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


# --- metadata ---------------------------------------------------------------------------------------------------


def test_license_file_is_the_apache_2_text():
    text = (ROOT / "LICENSE").read_text()
    assert text.lstrip().startswith("Apache License") and "Version 2.0, January 2004" in text
    assert "TERMS AND CONDITIONS FOR USE, REPRODUCTION, AND DISTRIBUTION" in text and len(text) > 10_000
    # An SPDX expression plus the file (PEP 639): the wheel gets License-Expression and License-File.
    assert PYPROJECT["project"]["license"] == "Apache-2.0" and PYPROJECT["project"]["license-files"] == ["LICENSE"]


def test_classifiers_and_urls():
    project = PYPROJECT["project"]
    assert not [c for c in project["classifiers"] if c.startswith("License ::")]  # superseded by `license`
    assert "Typing :: Typed" in project["classifiers"]
    minimum = project["requires-python"].removeprefix(">=")
    assert f"Programming Language :: Python :: {minimum}" in project["classifiers"]
    assert project["urls"]["Homepage"].startswith("https://github.com/pzbridge/pzbridge")
    assert {"Homepage", "Source", "Issues", "Documentation"} <= set(project["urls"])


def test_py_typed_is_shipped():
    assert (ROOT / "pzbridge" / "py.typed").is_file()
    assert "py.typed" in PYPROJECT["tool"]["setuptools"]["package-data"]["pzbridge"]


def test_installed_metadata_matches_the_package():
    assert importlib.metadata.version("pzbridge") == pzb.__version__ == PYPROJECT["project"]["version"]


def test_readme_gives_clone_and_venv_steps_and_keeps_the_ci_commands():
    readme = (ROOT / "README.md").read_text()
    assert "git clone https://github.com/pzbridge/pzbridge.git" in readme and "python3 -m venv .venv" in readme
    assert readme.index("python3 -m venv") < readme.index('pip install -e ".[test]" && python -m pzbridge demo')
    assert 'pip install -e ".[test]" && python -m pytest\n' in readme  # .ci/run runs exactly this


# --- the lazy namespace, typed --------------------------------------------------------------------------------------


def _type_checking_imports() -> dict[str, tuple[str, str | None]]:
    """Name -> (module, attribute) of the imports in pzbridge/__init__.py's ``if TYPE_CHECKING:`` block."""
    tree = ast.parse((ROOT / "pzbridge" / "__init__.py").read_text())
    blocks = [n for n in tree.body if isinstance(n, ast.If) and getattr(n.test, "id", None) == "TYPE_CHECKING"]
    assert len(blocks) == 1
    found: dict[str, tuple[str, str | None]] = {}
    for node in blocks[0].body:
        assert isinstance(node, ast.ImportFrom), ast.dump(node)
        for alias in node.names:
            module = f"{node.module}.{alias.name}"
            source = ROOT.joinpath(*module.split("."))
            is_module = source.with_suffix(".py").is_file() or (source / "__init__.py").is_file()
            found[alias.asname or alias.name] = (module, None) if is_module else (node.module, alias.name)
            assert alias.asname, f"{alias.name}: write `import X as X` so checkers treat it as a re-export"
    return found


def test_type_checking_block_names_exactly_the_exports():
    found, exports = _type_checking_imports(), pzb._EXPORTS
    missing = {k: v for k, v in exports.items() if found.get(k) != v}
    extra = {k: v for k, v in found.items() if exports.get(k) != v}
    assert not missing and not extra, (
        f"pzbridge/__init__.py: _EXPORTS entries without a matching TYPE_CHECKING import: {missing}; imports "
        f"there that _EXPORTS does not name: {extra}. Fix: add `from MODULE import ATTR as NAME` (or "
        "`from PACKAGE import MODULE as NAME`) to the `if TYPE_CHECKING:` block for each new export."
    )


def test_dir_lists_only_public_names():
    names = dir(pzb)
    assert set(pzb._EXPORTS) <= set(names) and "__version__" in names
    assert not {"Any", "annotations", "importlib", "TYPE_CHECKING"} & set(names)
    assert [n for n in names if n.startswith("_") and not n.startswith("__")] == []


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("mypy") is None and importlib.util.find_spec("mypy") is None,
                    reason="mypy is not installed (it comes with the test extra)")
def test_mypy_sees_the_real_types(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text("import pzbridge as pzb\nreveal_type(pzb.lift)\nreveal_type(pzb.Parameter)\n"
                     "reveal_type(pzb.nx.wrap)\n")
    result = subprocess.run(
        [sys.executable, "-m", "mypy", "--follow-imports=silent", "--no-incremental", "--cache-dir", str(tmp_path),
         "--python-version", f"{sys.version_info.major}.{sys.version_info.minor}", str(probe)],
        capture_output=True, text=True, timeout=300, cwd=ROOT, check=False, env={**_env(), "MYPYPATH": str(ROOT)})
    notes = [line for line in result.stdout.splitlines() if "Revealed type" in line]
    assert len(notes) == 3, result.stdout + result.stderr
    assert "def (module: Any" in notes[0] and "pzbridge.bridge.lifted.LiftedModel" in notes[0]
    assert "pzbridge.core.variables_kinds.Parameter" in notes[1]
    assert '"Any"' not in notes[2]


def _env() -> dict[str, str]:
    import os

    return dict(os.environ)


def test_testing_without_hypothesis_names_the_extra():
    code = "import sys; sys.modules['hypothesis'] = None\nimport pzbridge.testing"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                            check=False)
    assert result.returncode != 0
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("ImportError: pzbridge.testing needs hypothesis") and "pzbridge[test]" in last


# --- jaxtyping: shapes where plain arrays cross the boundary --------------------------------------------------------


def _checked(fn):
    beartype = pytest.importorskip("beartype")
    return jaxtyping.jaxtyped(typechecker=beartype.beartype)(fn)


def _hint(fn, name):
    return typing.get_type_hints(fn)[name]


def test_gpt_reference_annotations_and_checked_call():
    from pzbridge.models.gpt_reference import gpt_forward

    assert _hint(gpt_forward, "tokens").dim_str == "batch seq"
    assert _hint(gpt_forward, "return").dim_str == "batch seq vocab"
    assert _hint(gpt_forward, "tokens").array_type is jax.Array and "int32" in _hint(gpt_forward, "tokens").dtypes
    # No blocks: embedding, final norm and the tied decode are enough to check the boundary (and fast).
    params = {"embed": jnp.eye(5, 3), "blocks": [], "final_norm": {"scale": jnp.ones(3)}}
    config = types.SimpleNamespace(norm="rms", epsilon=1e-6, rope_max_wavelength=1e4)
    checked = _checked(gpt_forward)
    assert checked(params, jnp.array([[1, 2, 3], [0, 4, 4]]), config).shape == (2, 3, 5)
    with pytest.raises(jaxtyping.TypeCheckError):
        checked(params, jnp.array([1.0, 2.0]), config)  # float ids of rank 1


def test_rope_annotations_and_checked_call():
    from pzbridge.nn.rope import rope_positional

    assert _hint(rope_positional, "x").dim_str == "*batch d" and _hint(rope_positional, "position").dim_str == ""
    checked = _checked(rope_positional)
    assert checked(jnp.ones((3, 4)), jnp.array(2), 1e4, "rotate_half").shape == (3, 4)
    with pytest.raises(jaxtyping.TypeCheckError):
        checked(jnp.ones(4), jnp.array([1, 2]), 1e4, "rotate_half")  # a position per element is not a scalar


def test_key_annotations_accept_typed_and_raw_keys():
    from pzbridge.models.gpt import build_gpt
    from pzbridge.nn.initializers import key_for_label

    assert _hint(key_for_label, "init_base_rng") is jaxtyping.PRNGKeyArray
    assert _hint(build_gpt, "init_base_rng") == jaxtyping.PRNGKeyArray | None
    checked = _checked(key_for_label)
    checked(jax.random.key(0), "a")
    checked(jax.random.PRNGKey(0), "a")
    with pytest.raises(jaxtyping.TypeCheckError):
        checked(jnp.ones(3), "a")


def test_testing_helper_annotation_accepts_numpy_only():
    from pzbridge.testing.named_arrays import build_named_array

    checked = _checked(build_named_array)
    assert dict(checked(np.zeros((2, 3)), ["f"]).named_shape) == {"f": 3}
    with pytest.raises(jaxtyping.TypeCheckError):
        checked([[0.0, 1.0]], ["f"])
