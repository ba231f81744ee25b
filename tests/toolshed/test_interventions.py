"""Interventions (ablate, steer, patch, arbitrary fn) against hand-computed pure-jax references."""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import pzbridge as pzb
from pzbridge.bridge.equinox.linear import EqxLinear
from pzbridge.core.errors import NamedAxisError, PzbridgeError, SelectionError
from pzbridge.nn.linear import Affine
from pzbridge.toolshed.interventions import (
    Ablate,
    AddVector,
    InterveneWith,
    Patch,
    ZeroAblation,
    insert_intervention,
    patch_activations,
)

SIZES = (3, 5, 4, 2)
ACTS = (jax.nn.relu, jnp.tanh)
TOL = dict(rtol=1e-5, atol=1e-6)


def make_mlp(seed: int) -> pzb.nn.Sequential:
    """Affine -> relu -> Affine -> tanh -> Affine on ``features`` (position-wise: ``seq`` passes through)."""
    keys = jax.random.split(jax.random.key(seed), 3)
    layers: list = []
    for i, key in enumerate(keys):
        layers.append(Affine.from_config(f"dense{i}", key, {"features": SIZES[i]}, {"features": SIZES[i + 1]}))
        if i < 2:
            layers.append(pzb.nn.Elementwise(ACTS[i]))
    return pzb.nn.Sequential(layers)


def reference(model: pzb.nn.Sequential, x: np.ndarray, edit_after: int | None = None, edit=None) -> np.ndarray:
    """Pure-jax forward pass; ``edit`` rewrites the output of Affine number ``edit_after``."""
    affines = [l for l in model.sublayers if isinstance(l, Affine)]
    h = jnp.asarray(x)
    for i, layer in enumerate(affines):
        w = layer.sublayers[0].weights.value.unwrap("features", "features_out")
        b = layer.sublayers[1].bias.value.unwrap("features")
        h = h @ w + b
        if i == edit_after:
            h = edit(h)
        if i < 2:
            h = ACTS[i](h)
    return np.asarray(h)


def data(seed: int, *shape: int) -> np.ndarray:
    return np.asarray(jax.random.normal(jax.random.key(seed), shape))


def named(x: np.ndarray, *names: str) -> pzb.nx.NamedArray:
    return pzb.nx.wrap(jnp.asarray(x), *names)


def nth_affine(model: pzb.nn.Sequential, n: int):
    return pzb.select(model).at_instances_of(Affine).pick_nth_selected(n)


def out_of(y: pzb.nx.NamedArray, *names: str) -> np.ndarray:
    return np.asarray(y.unwrap(*names))


@settings(max_examples=12, deadline=None, derandomize=True)
@given(seed=st.integers(0, 2**16), n=st.integers(0, 2), batch=st.integers(1, 3))
def test_zero_ablation_after_affine_equals_zeroing_that_output(seed: int, n: int, batch: int) -> None:
    model = make_mlp(seed)
    x = data(seed + 1, batch, SIZES[0])
    ablated = insert_intervention(model, nth_affine(model, n), ZeroAblation())
    want = reference(model, x, n, jnp.zeros_like)
    np.testing.assert_allclose(out_of(ablated(named(x, "batch", "features")), "batch", "features"), want, **TOL)


@settings(max_examples=10, deadline=None, derandomize=True)
@given(seed=st.integers(0, 2**16), n=st.integers(0, 1), batch=st.integers(2, 4))
def test_mean_ablation_over_batch_equals_replacing_with_batch_mean(seed: int, n: int, batch: int) -> None:
    model = make_mlp(seed)
    x = data(seed + 2, batch, SIZES[0])
    ablated = insert_intervention(model, nth_affine(model, n), Ablate("mean", axes="batch"))
    want = reference(model, x, n, lambda h: jnp.broadcast_to(h.mean(axis=0, keepdims=True), h.shape))
    np.testing.assert_allclose(out_of(ablated(named(x, "batch", "features")), "batch", "features"), want, **TOL)


@settings(max_examples=10, deadline=None, derandomize=True)
@given(seed=st.integers(0, 2**16), bits=st.lists(st.booleans(), min_size=SIZES[1], max_size=SIZES[1]))
def test_masked_zero_ablation_zeroes_only_masked_features(seed: int, bits: list[bool]) -> None:
    model = make_mlp(seed)
    x = data(seed + 3, 2, SIZES[0])
    mask = np.array(bits)
    ablated = insert_intervention(model, nth_affine(model, 0), ZeroAblation(mask=named(mask, "features")))
    want = reference(model, x, 0, lambda h: jnp.where(mask, 0.0, h))
    np.testing.assert_allclose(out_of(ablated(named(x, "batch", "features")), "batch", "features"), want, **TOL)


@settings(max_examples=10, deadline=None, derandomize=True)
@given(seed=st.integers(0, 2**16), scale=st.floats(-3, 3))
def test_add_vector_equals_adding_the_scaled_vector(seed: int, scale: float) -> None:
    model = make_mlp(seed)
    x = data(seed + 4, 3, SIZES[0])
    v = data(seed + 5, SIZES[2])
    steered = insert_intervention(model, nth_affine(model, 1), AddVector(named(v, "features"), scale=scale))
    want = reference(model, x, 1, lambda h: h + np.float32(scale) * v)
    np.testing.assert_allclose(out_of(steered(named(x, "batch", "features")), "batch", "features"), want, **TOL)


@settings(max_examples=10, deadline=None, derandomize=True)
@given(seed=st.integers(0, 2**16), n=st.integers(0, 2))
def test_patching_all_positions_from_source_equals_running_on_source(seed: int, n: int) -> None:
    model = make_mlp(seed)
    src, tgt = data(seed + 6, 2, SIZES[0]), data(seed + 7, 2, SIZES[0])
    out = patch_activations(model, named(src, "batch", "features"), named(tgt, "batch", "features"),
                            at=nth_affine(model, n))
    np.testing.assert_allclose(out_of(out, "batch", "features"), reference(model, src), **TOL)
    assert not np.allclose(reference(model, src), reference(model, tgt))  # the patch did something


@settings(max_examples=10, deadline=None, derandomize=True)
@given(seed=st.integers(0, 2**16), bits=st.lists(st.booleans(), min_size=4, max_size=4))
def test_patching_masked_positions_takes_source_there_and_target_elsewhere(seed: int, bits: list[bool]) -> None:
    model = make_mlp(seed)  # position-wise, so each seq position depends only on its own input
    src, tgt = data(seed + 8, 4, SIZES[0]), data(seed + 9, 4, SIZES[0])
    mask = np.array(bits)
    out = patch_activations(model, named(src, "seq", "features"), named(tgt, "seq", "features"),
                            at=nth_affine(model, 1), mask=named(mask, "seq"))
    want = np.where(mask[:, None], reference(model, src), reference(model, tgt))
    np.testing.assert_allclose(out_of(out, "seq", "features"), want, **TOL)


def test_patch_broadcasts_values_over_axes_they_lack() -> None:
    values = named(np.arange(5.0, dtype=np.float32), "features")
    y = Patch(values)(pzb.nx.zeros({"batch": 2, "features": 5}))
    np.testing.assert_array_equal(out_of(y, "batch", "features"), np.tile(np.arange(5.0), (2, 1)))


def test_intervene_with_applies_the_function() -> None:
    model = make_mlp(0)
    x = data(1, 2, SIZES[0])
    edited = insert_intervention(model, nth_affine(model, 0), InterveneWith(lambda h: h * 3.0))
    want = reference(model, x, 0, lambda h: h * 3.0)
    np.testing.assert_allclose(out_of(edited(named(x, "batch", "features")), "batch", "features"), want, **TOL)


def test_intervene_with_can_receive_side_inputs() -> None:
    layer = InterveneWith(lambda h, *, shift=0.0, **_: h + shift, pass_side_inputs=True)
    y = layer(pzb.nx.zeros({"f": 2}), shift=2.0, train=False)
    np.testing.assert_array_equal(out_of(y, "f"), [2.0, 2.0])


def test_intervention_before_a_layer_edits_its_input() -> None:
    model = make_mlp(2)
    x = data(3, 2, SIZES[0])
    edited = insert_intervention(model, nth_affine(model, 0), ZeroAblation(), where="before")
    np.testing.assert_allclose(out_of(edited(named(x, "batch", "features")), "batch", "features"),
                               reference(model, np.zeros_like(x)), **TOL)


def test_interventions_leave_the_model_unchanged() -> None:
    model = make_mlp(0)
    leaves = pzb.select(model).at_pytree_leaves().get_sequence()
    insert_intervention(model, Affine, ZeroAblation())
    x = named(data(0, 1, SIZES[0]), "batch", "features")
    patch_activations(model, x, x * 2.0, at=Affine)
    assert [type(l).__name__ for l in model.sublayers] == ["Affine", "Elementwise", "Affine", "Elementwise", "Affine"]
    assert all(a is b for a, b in zip(leaves, pzb.select(model).at_pytree_leaves().get_sequence()))


def test_patch_activations_under_jit_matches_eager() -> None:
    model = make_mlp(5)
    src, tgt = named(data(1, 4, SIZES[0]), "seq", "features"), named(data(2, 4, SIZES[0]), "seq", "features")
    mask = named(np.array([True, False, True, False]), "seq")
    eager = patch_activations(model, src, tgt, at=nth_affine(model, 0), mask=mask)
    sel = nth_affine(model, 0)
    jitted = jax.jit(lambda m, s, t, k: patch_activations(m, s, t, at=sel, mask=k))(pzb.freeze_params(model), src, tgt, mask)
    np.testing.assert_allclose(out_of(jitted, "seq", "features"), out_of(eager, "seq", "features"), rtol=1e-6)


def test_steering_vector_held_in_a_parameter_gets_gradients() -> None:
    model = make_mlp(0)
    steer = pzb.Parameter(named(np.zeros(SIZES[2], np.float32), "features"), "steer")
    edited = insert_intervention(model, nth_affine(model, 1), AddVector(steer))
    slots, values = pzb.unbind_params(edited, freeze=True)
    x = named(data(3, 2, SIZES[0]), "batch", "features")
    grads = jax.grad(lambda vs: pzb.stateless_call(slots, vs, x)[0].unwrap("batch", "features").sum())(values)
    (g,) = [g for g in grads if g.label == "steer"]
    # d/dv sum(W3 @ tanh(h + v) + b3) at v=0 = (1 - tanh(h)^2) summed over batch, times W3's row sums.
    pre = []
    reference(model, np.asarray(x.unwrap("batch", "features")), 1, lambda h: pre.append(h) or h)
    w3 = model.sublayers[4].sublayers[0].weights.value.unwrap("features", "features_out")
    want = ((1 - jnp.tanh(pre[0]) ** 2) * w3.sum(axis=1)).sum(axis=0)
    np.testing.assert_allclose(out_of(g.value, "features"), want, rtol=1e-5)


# -- errors ---------------------------------------------------------------------


def test_empty_selection_raises_selection_error() -> None:
    with pytest.raises(SelectionError, match="selects nothing"):
        insert_intervention(make_mlp(0), pzb.nn.Softmax, ZeroAblation())
    with pytest.raises(SelectionError, match="selects nothing"):
        x = named(data(0, 1, SIZES[0]), "batch", "features")
        patch_activations(make_mlp(0), x, x, at=lambda n: False)


def test_non_layer_intervention_raises() -> None:
    with pytest.raises(PzbridgeError, match="InterveneWith"):
        insert_intervention(make_mlp(0), Affine, lambda h: h)


def test_ablate_validates_mode_and_axes() -> None:
    with pytest.raises(PzbridgeError, match="'zero' or 'mean'"):
        Ablate("random")
    with pytest.raises(PzbridgeError, match="axes to average"):
        Ablate("mean")
    with pytest.raises(PzbridgeError, match="takes no axes"):
        Ablate("zero", axes=("batch",))
    with pytest.raises(NamedAxisError, match=r"lacks axes \['batch'\]"):
        Ablate("mean", axes=("batch",))(pzb.nx.zeros({"features": 2}))


def test_add_vector_with_an_axis_the_activation_lacks_raises() -> None:
    vector = pzb.nx.zeros({"heads": 2})
    with pytest.raises(NamedAxisError, match=r"vector has named axes \{'heads': 2\}.*\{'features': 3\}"):
        AddVector(vector)(pzb.nx.zeros({"features": 3}))


def test_patch_with_wrong_size_raises_naming_both_shapes() -> None:
    with pytest.raises(NamedAxisError, match=r"values has named axes \{'features': 4\}.*\{'features': 3\}"):
        Patch(pzb.nx.zeros({"features": 4}))(pzb.nx.zeros({"features": 3}))
    with pytest.raises(NamedAxisError, match=r"mask has named axes \{'seq': 5\}"):
        Patch(pzb.nx.zeros({"features": 3}), mask=pzb.nx.zeros({"seq": 5}, bool))(pzb.nx.zeros({"seq": 2, "features": 3}))


def test_patch_activations_with_mismatched_target_shape_raises() -> None:
    model = make_mlp(0)
    with pytest.raises(NamedAxisError, match="values has named axes"):
        patch_activations(model, named(data(0, 2, SIZES[0]), "batch", "features"),
                          named(data(0, 3, SIZES[0]), "batch", "features"), at=nth_affine(model, 0))


# -- lowering to Equinox -----------------------------------------------------------


def test_lowered_equinox_model_computes_the_intervened_function() -> None:
    keys = jax.random.split(jax.random.key(0), 2)
    seq = eqx.nn.Sequential([eqx.nn.Linear(3, 4, key=keys[0]), eqx.nn.Lambda(jax.nn.relu),
                             eqx.nn.Linear(4, 2, key=keys[1])])
    lifted = pzb.lift(seq)
    first = pzb.select(lifted).at_instances_of(EqxLinear).pick_nth_selected(0)
    mask = np.array([True, False, True, False])
    steer = np.array([0.5, -1.0, 2.0, 3.0], np.float32)
    # Each insertion goes right after the Linear, so the later one runs first: ablate, then steer.
    edited = insert_intervention(lifted, first, AddVector(pzb.Parameter(named(steer, "features"), "steer")))
    edited = insert_intervention(edited, first, ZeroAblation(mask=pzb.StateVariable(named(mask, "features"), "mask")))
    lowered = pzb.lower(edited)
    assert isinstance(lowered, eqx.nn.Sequential)
    assert lowered.layers[0].weight is seq.layers[0].weight  # untouched layers keep their buffers

    def manual(x):  # pure Equinox/jax: zero masked features, then steer, then the rest
        h = jnp.where(mask, 0.0, seq.layers[0](x)) + steer
        return seq.layers[2](jax.nn.relu(h))

    xs = data(7, 5, 3)
    np.testing.assert_allclose(jax.vmap(lowered)(xs), jax.vmap(manual)(xs), **TOL)
    np.testing.assert_allclose(eqx.filter_jit(lowered)(xs[0]), manual(xs[0]), **TOL)
    # The steering Parameter is an ordinary Equinox leaf: eqx.filter_grad reaches it.
    grads = eqx.filter_grad(lambda m: m(xs[0]).sum())(lowered)
    (index,) = [i for i, layer in enumerate(lowered.layers)
                if any(getattr(v, "label", None) == "steer" for v in getattr(layer, "values", ()))]
    got = grads.layers[index].values[0].value.unwrap("features")
    h = jnp.where(mask, 0.0, seq.layers[0](xs[0])) + steer
    np.testing.assert_allclose(got, (h > 0) * seq.layers[2].weight.sum(axis=0), **TOL)


def test_patch_with_a_different_pytree_structure_raises() -> None:
    with pytest.raises(NamedAxisError, match="structure"):
        Patch((pzb.nx.zeros({"f": 2}), pzb.nx.zeros({"f": 2})))(pzb.nx.zeros({"f": 2}))
