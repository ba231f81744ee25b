"""``python -m pzbridge``: show MODULE:FACTORY (summary, Foreign reasons, HTML, errors), --version, the demo's hints."""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys
import textwrap

import equinox as eqx
import jax
import numpy as np
import pytest
from hypothesis import given, settings

import pzbridge as pzb
import pzbridge.testing as pzt
from pzbridge.__main__ import _print_html_files, build_parser, main
from pzbridge.cli_show import (
    CommandLineError,
    example_inputs,
    load_factory,
    show_factory,
)
from pzbridge.cli_summary import summarize

MODELS = textwrap.dedent('''
    import jax, jax.numpy as jnp, equinox as eqx
    from flax import nnx

    class Pair(eqx.Module):
        def __call__(self, xs):  # a tuple input: traced lifting cannot follow it
            return xs[0] + xs[1]

    class Weird(eqx.Module):
        lin: eqx.nn.Linear
        pair: Pair
        def __init__(self, key):
            self.lin = eqx.nn.Linear(4, 4, key=key)
            self.pair = Pair()
        def __call__(self, x):
            return self.pair((self.lin(x), x))

    class Block(eqx.Module):
        a: eqx.nn.Linear
        w: Weird
        def __init__(self, key):
            k1, k2 = jax.random.split(key)
            self.a, self.w = eqx.nn.Linear(4, 4, key=k1), Weird(k2)
        def __call__(self, x):
            return self.w(jax.nn.relu(self.a(x))) + x

    class Net(eqx.Module):
        blocks: list
        def __init__(self, key):
            self.blocks = [Block(k) for k in jax.random.split(key, 2)]
        def __call__(self, x):
            for b in self.blocks:
                x = b(x)
            return x

    def build_net(key):
        return Net(key)

    def build_nnx(width, rngs):
        assert isinstance(rngs, nnx.Rngs)
        return nnx.Sequential(nnx.Linear(width, width, rngs=rngs), nnx.Linear(width, 2, rngs=rngs))

    def explode(width=1):
        raise RuntimeError("no GPU here")
''')


@pytest.fixture()
def models_file(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> pathlib.Path:
    path = tmp_path / "cli_models.py"
    path.write_text(MODELS)
    monkeypatch.chdir(tmp_path)
    return path


def _run(*argv: str, cwd: pathlib.Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pzbridge", *argv], capture_output=True, text=True, cwd=cwd, check=False,
                          timeout=300)


def test_show_mlp_counts_layers_and_parameters_per_block():
    text = show_factory("equinox.nn:MLP", json.dumps({"in_size": 4, "out_size": 2, "width_size": 8, "depth": 2}))
    model = eqx.nn.MLP(4, 2, width_size=8, depth=2, key=jax.random.key(0))
    total = sum(x.size for x in jax.tree_util.tree_leaves(eqx.filter(model, eqx.is_inexact_array)))
    assert f"parameters: {total:,} in 6 Parameter objects" in text
    assert "  EqxLinear    3" in text and "Elementwise  3" in text
    for i, layer in enumerate(model.layers):  # Independent figures: the Equinox layers' own arrays.
        assert f"layers.{i}" in text and f"  {layer.weight.size + layer.bias.size}\n" in text + "\n"
    assert "Foreign: none" in text


def test_show_file_factory_names_foreign_modules_and_why_untraced(models_file):
    text = show_factory(f"{models_file.name}:build_net")
    assert text.splitlines()[0] == "cli_models.py:build_net -> Net (equinox), lifted without tracing"
    for path, cls in [("<root>", "Net"), ("blocks[0]", "Block"), ("blocks[1].w", "Weird"), ("blocks[0].w.pair", "Pair")]:
        assert f"  {path}: {cls} (" in text
    assert "why: no lifting rule for these classes, and nothing was traced" in text and "--example-shapes" in text


def test_show_traced_gives_the_lifters_reason_at_its_path(models_file):
    text = show_factory("cli_models:build_net", shapes_json="[[4]]")
    assert "lifted traced on float32[4]" in text
    assert "  blocks[0]  Traced(Block)  40" in text  # 2 Linear(4, 4): 2 * (16 + 4)
    lines = text.splitlines()
    pair = lines.index("  blocks[0].w.pair: Pair (no children)")
    assert lines[pair + 1].startswith("    why: no Equinox lifting rule for cli_models.Pair (not traceable: its first ")
    assert "<root>: Net" not in text  # Net and Block were traced into layers


def test_show_nnx_factory_gets_default_rngs_and_writes_html(models_file, tmp_path):
    out = tmp_path / "sub" / "nnx.html"
    text = show_factory("cli_models:build_nnx", '{"width": 3}', html=str(out), seed=1)
    assert "(nnx)" in text and "parameters: 20 in 4 Parameter objects" in text  # 3*3+3 + 3*2+2
    assert out.read_text().lstrip().lower().startswith(("<!doctype html", "<html", "<div", "<script", "<style"))
    assert f"wrote {out} (open {out.resolve().as_uri()}" in text


def test_example_shapes_accept_dtype_objects():
    a, b = example_inputs([[2, 3], {"shape": [5], "dtype": "int32"}])
    assert (a.shape, a.dtype, b.shape, b.dtype) == ((2, 3), np.float32, (5,), np.int32)


@pytest.mark.parametrize(
    ("argv", "fragment"),
    [
        (["show", "nocolon"], "expected MODULE:FACTORY"),
        (["show", "no_such_module_xyz:f"], "importing 'no_such_module_xyz' failed"),
        (["show", "cli_models:nothing"], "has no callable 'nothing'"),
        (["show", "missing.py:f"], "no file 'missing.py'"),
        (["show", "cli_models:explode"], "explode(**{}) raised RuntimeError: no GPU here"),
        (["show", "cli_models:build_nnx", "--args", "{width: 3}"], "--args is not valid JSON"),
        (["show", "cli_models:build_nnx", "--args", "[3]"], "--args must be a JSON object"),
        (["show", "cli_models:build_nnx", "--args", '{"depth": 3}'], "required: width, rngs"),
        (["show", "cli_models:build_net", "--example-shapes", '[["a"]]'], "--example-shapes entry 0"),
        (["show", "cli_models:build_net", "--example-shapes", '[{"shape": [4], "dtype": "nope"}]'], "unknown dtype"),
    ],
)
def test_mistakes_exit_2_with_one_line_naming_the_fix(models_file, capsys, argv, fragment):
    assert main(argv) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and fragment in lines[0] and "Fix:" in lines[0], captured.err
    assert captured.out == ""


def test_errors_are_pzbridge_errors():
    with pytest.raises(CommandLineError) as info:
        load_factory("pzbridge.models.gpt:not_there")
    assert isinstance(info.value, pzb.PzbridgeError)


def test_python_dash_m_exit_status_and_version(models_file):
    bad = _run("show", "cli_models:explode", cwd=models_file.parent)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "no GPU here" in bad.stderr
    version = _run("--version")
    assert version.returncode == 0 and version.stdout.strip() == f"pzbridge {pzb.__version__}"


def test_show_builtin_core_still_works(capsys, tmp_path):
    assert main(["show", "core", "--html", str(tmp_path / "core.html")]) == 0
    out = capsys.readouterr().out
    assert "layers by class:" in out and (tmp_path / "core.html").stat().st_size > 0


def _help_texts(parser) -> list[str]:
    texts = [parser.description or "", parser.epilog or ""]
    for action in parser._actions:
        texts.append(action.help or "")
        for sub in getattr(action, "choices", None) or {}:
            if hasattr(action.choices[sub], "_actions"):
                texts += _help_texts(action.choices[sub])
        texts += [getattr(a, "help", "") or "" for a in getattr(action, "_choices_actions", [])]
    return texts


def test_help_texts_have_no_rst_markup():
    texts = _help_texts(build_parser())
    assert len(texts) > 10
    offenders = [t for t in texts if "``" in t or ":func:" in t or ":class:" in t]
    assert not offenders, offenders


def test_demo_prints_where_its_html_files_are(tmp_path, capsys):
    for name in ("b.html", "a.html"):
        (tmp_path / name).write_text("<html></html>")
    _print_html_files(tmp_path)
    out = capsys.readouterr().out.splitlines()
    assert str(tmp_path.resolve()) in out[1] and "web browser" in out[1]
    assert out[2:] == [f"  {(tmp_path / n).resolve().as_uri()}" for n in ("a.html", "b.html")]


@settings(max_examples=8)
@given(pzt.equinox_models())
def test_summary_counts_every_parameter_once_and_blocks_add_up(example):
    lifted = pzb.lift(example.model)
    summary = summarize(lifted)
    arrays = {id(x): x for x in jax.tree_util.tree_leaves(eqx.filter(example.model, eqx.is_inexact_array))}
    assert summary.parameter_count + summary.state_count == sum(x.size for x in arrays.values())
    assert sum(b.parameter_count for b in summary.blocks) >= summary.parameter_count  # Shared ones count per block.
