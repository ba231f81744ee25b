"""``pzb.diff``: layers added / removed / replaced, parameters and state changed, as text and treescope."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import treescope
from hypothesis import given, settings
from hypothesis import strategies as st

import pzbridge as pzb
from pzbridge.testing import equinox_models, nnx_models
from pzbridge.toolshed.diff import LayerChange, ModelDiff, ValueChange

sys.path.insert(0, str(Path(__file__).parent))
import intervention_models as im  # noqa: E402

_LAYER_KINDS = ["linear", "tanh", "identity", "residual"]


def _layer(kind: str, index: int) -> pzb.nn.Layer:
    if kind == "linear":
        return pzb.nn.Linear.from_config(f"l{index}", jax.random.key(index), {"f": 3}, {"f": 3})
    if kind == "tanh":
        return pzb.nn.Elementwise(jnp.tanh)
    if kind == "identity":
        return pzb.nn.Identity()
    return pzb.nn.Residual(pzb.nn.Linear.from_config(f"r{index}", jax.random.key(100 + index), {"f": 3}, {"f": 3}))


models = st.lists(st.sampled_from(_LAYER_KINDS), min_size=1, max_size=5).map(
    lambda kinds: pzb.nn.Sequential([_layer(k, i) for i, k in enumerate(kinds)])
)


def test_two_lifts_of_one_module_compare_equal():
    module = im.tiny_lm(0)
    a, b = (pzb.lift(module, jnp.arange(5) % im.VOCAB) for _ in range(2))
    d = pzb.diff(a, b)
    assert not d and d == ModelDiff()
    assert str(d) == "ModelDiff: no changes"


def test_two_lifts_of_stock_nnx_and_eqx_layers_compare_equal():
    x = im.stream(0, 4, im.D_MODEL)
    assert not pzb.diff(pzb.lift(im.nnx_mha(0), x), pzb.lift(im.nnx_mha(0), x))
    assert not pzb.diff(pzb.lift(im.eqx_mha(0), x, x, x), pzb.lift(im.eqx_mha(0), x, x, x))


def test_differently_initialised_models_list_every_parameter_with_max_change():
    tokens = jnp.arange(5) % im.VOCAB
    a, b = im.tiny_lm(0), im.tiny_lm(1)
    d = pzb.diff(pzb.lift(a, tokens), pzb.lift(b, tokens))
    by_label = {c.label: c for c in d.parameters}
    assert set(by_label) == {"embed", "unembed"} | {f"attns.{i}.W_{n}" for i in (0, 1) for n in "QKVO"}
    assert not (d.added or d.removed or d.replaced or d.modified or d.state)
    assert by_label["embed"].max_abs_change == pytest.approx(float(jnp.max(jnp.abs(a.embed - b.embed))), rel=1e-6)
    assert by_label["attns.1.W_O"].max_abs_change == pytest.approx(
        float(jnp.max(jnp.abs(a.attns[1].W_O - b.attns[1].W_O))), rel=1e-6)


def test_inserted_intervention_in_traced_custom_model_is_one_added_layer():
    _, lifted = im.lifted_tiny_lm(0)
    vector = pzb.nx.wrap(jnp.ones(im.D_MODEL), "features")
    edited = pzb.toolshed.insert_intervention(
        lifted, pzb.toolshed.Where(label="attns.0.W_O"), pzb.toolshed.AddVector(vector))
    d = pzb.diff(lifted, edited)
    assert [c.new_class for c in d.added] == ["AddVector"]
    assert not (d.removed or d.replaced or d.parameters)
    assert [c.old_class for c in pzb.diff(edited, lifted).removed] == ["AddVector"]


def test_replaced_layer_names_both_classes():
    model = im.pzb_attention(0)
    edited = pzb.select(model).at_instances_of(pzb.nn.Residual).apply(lambda r: r.delta)
    assert pzb.diff(model, edited).replaced == (LayerChange("sublayers[0]", "Residual", "Attention"),)


def test_shape_and_dtype_changes_are_reported_without_max_change():
    model = pzb.nn.Linear.from_config("w", jax.random.key(0), {"f": 2}, {"g": 3})
    wider = pzb.nn.Linear.from_config("w", jax.random.key(0), {"f": 4}, {"g": 3})
    (change,) = pzb.diff(model, wider).parameters
    assert (change.old_shape, change.new_shape, change.max_abs_change) == ("{f: 2, g: 3}", "{f: 4, g: 3}", None)
    half = pzb.select(model).at_instances_of(pzb.Parameter).apply(
        lambda p: pzb.Parameter(p.value.astype(jnp.float16), label=p.label))
    (change,) = pzb.diff(model, half).parameters
    assert (change.old_dtype, change.new_dtype) == ("float32", "float16")
    assert "dtype float32 -> float16" in str(pzb.diff(model, half))


def test_state_change_is_reported_in_state():
    counter = pzb.StateVariable(jnp.zeros(2), label="count")
    model = pzb.nn.Sequential([pzb.nn.Identity()])
    a = {"model": model, "count": counter}
    b = {"model": model, "count": pzb.StateVariable(jnp.array([0.0, 3.0]), label="count")}
    assert pzb.diff(a, b).state == (
        ValueChange("['count']", "count", "StateVariable", "(2,)", "(2,)", "float32", "float32", 3.0),)


def test_nan_parameters_compare_equal_to_themselves():
    w = pzb.Parameter(jnp.array([jnp.nan, 1.0]), label="w")
    assert not pzb.diff([w], [pzb.Parameter(jnp.array([jnp.nan, 1.0]), label="w")])
    changed = pzb.diff([w], [pzb.Parameter(jnp.array([jnp.nan, 1.5]), label="w")])
    assert changed.parameters[0].max_abs_change == 0.5


def test_axis_order_is_not_a_change():
    data = jnp.arange(6.0).reshape(2, 3)
    a = pzb.Parameter(pzb.nx.wrap(data, "f", "g"), label="w")
    b = pzb.Parameter(pzb.nx.wrap(data.T, "g", "f"), label="w")
    assert not pzb.diff([a], [b])


def test_static_configuration_change_is_modified():
    a = pzb.nn.Sequential([pzb.nn.Softmax(("f",))])
    b = pzb.nn.Sequential([pzb.nn.Softmax(("g",))])
    (change,) = pzb.diff(a, b).modified
    assert change.path == "sublayers[0]" and "('f',) -> ('g',)" in change.detail


def test_text_and_treescope_renderings():
    model = im.pzb_attention(0)
    edited = pzb.select(model).at_instances_of(pzb.nn.Residual).insert_after(pzb.nn.Identity())
    d = pzb.diff(model, edited)
    assert str(d).splitlines() == ["ModelDiff: 1 added", "  + added      sublayers[1]: Identity"]
    assert "sublayers[1]: Identity" in treescope.render_to_text(d)
    assert "sublayers[1]: Identity" in treescope.render_to_html(d, compressed=False)
    assert treescope.render_to_text(ModelDiff()) == "ModelDiff: no changes"


@settings(max_examples=25, deadline=None, derandomize=True)
@given(models)
def test_diff_of_a_model_with_itself_or_a_copy_is_empty(model):
    assert not pzb.diff(model, model)
    copy = jax.tree_util.tree_map(lambda x: x, model)
    assert not pzb.diff(model, pzb.select(copy).at_instances_of(pzb.Parameter).apply(
        lambda p: pzb.Parameter(p.value, label=p.label)))


@settings(max_examples=6, deadline=None, derandomize=True)
@given(equinox_models())
def test_two_lifts_of_random_equinox_models_compare_equal(example):
    assert not pzb.diff(pzb.lift(example.model, *example.args, **example.kwargs),
                        pzb.lift(example.model, *example.args, **example.kwargs))


@settings(max_examples=6, deadline=None, derandomize=True)
@given(nnx_models())
def test_two_lifts_of_random_nnx_models_compare_equal(model_and_x):
    model, x = model_and_x
    assert not pzb.diff(pzb.lift(model, x), pzb.lift(model, x))


@settings(max_examples=40, deadline=None, derandomize=True)
@given(models, st.data())
def test_diff_reports_exactly_the_selector_edit(model, data):
    n = len(model.sublayers)
    edit = data.draw(st.sampled_from(["insert", "remove", "replace", "scale"]))
    index = data.draw(st.integers(0, n - 1))
    target = pzb.select(model).at(lambda m: m.sublayers[index])
    if edit == "insert":
        edited = target.insert_after(pzb.nn.Elementwise(jnp.exp))
        # An equal neighbour makes the insertion place ambiguous: any one of the equal places is right.
        got = pzb.diff(model, edited)
        assert len(got.added) == 1 and not (got.removed or got.replaced or got.parameters)
        assert got.added[0].new_class == "Elementwise"
        return
    if edit == "remove":
        edited = target.remove_from_parent()
        got = pzb.diff(model, edited)
        assert len(got.removed) == 1 and not (got.added or got.replaced or got.parameters)
        assert got.removed[0].old_class == type(model.sublayers[index]).__name__
        return
    if edit == "replace":
        old = model.sublayers[index]
        new = pzb.nn.Elementwise(jnp.exp) if not isinstance(old, pzb.nn.Elementwise) else pzb.nn.Identity()
        expected = ModelDiff(replaced=(LayerChange(f"sublayers[{index}]", type(old).__name__, type(new).__name__),))
        assert pzb.diff(model, target.set(new)) == expected
        return
    params = pzb.select(model.sublayers[index]).at_instances_of(pzb.Parameter).get_sequence()
    factor = data.draw(st.sampled_from([0.5, 2.0, -1.0]))
    edited = target.apply(lambda layer: pzb.select(layer).at_instances_of(pzb.Parameter).apply(
        lambda p: pzb.Parameter(p.value * factor, label=p.label)))
    got = pzb.diff(model, edited)
    assert not (got.added or got.removed or got.replaced or got.modified)
    want = {p.label: float(np.max(np.abs(np.asarray(p.value.data_array) * (factor - 1)))) for p in params}
    assert {c.label: c.max_abs_change for c in got.parameters} == pytest.approx(
        {k: v for k, v in want.items() if v != 0})


@settings(max_examples=30, deadline=None, derandomize=True)
@given(models, models)
def test_added_one_way_is_removed_the_other_way(a, b):
    forward, backward = pzb.diff(a, b), pzb.diff(b, a)
    assert forward.added == tuple(LayerChange(c.path, None, c.old_class) for c in backward.removed)
    assert forward.removed == tuple(LayerChange(c.path, c.new_class, None) for c in backward.added)
    assert bool(forward) == bool(backward)
    assert math.isclose(
        max((c.max_abs_change or 0.0) for c in forward.parameters) if forward.parameters else 0.0,
        max((c.max_abs_change or 0.0) for c in backward.parameters) if backward.parameters else 0.0,
    )
