"""capture_intermediates / SaveIntermediate / collect_saved against pure-jax references."""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import pzbridge as pzb
from pzbridge.core.errors import PzbridgeError, SelectionError
from pzbridge.nn.linear import Affine
from pzbridge.testing.numerics import assert_bitwise_reproducible
from pzbridge.toolshed.intermediates import (
    Captured,
    SaveIntermediate,
    capture_intermediates,
    collect_saved,
    insert_layers,
    resolve_selection,
)

SIZES = (3, 5, 4, 2)
ACTS = (jax.nn.relu, jnp.tanh)


def make_mlp(seed: int) -> pzb.nn.Sequential:
    """Affine -> relu -> Affine -> tanh -> Affine on the ``features`` axis."""
    keys = jax.random.split(jax.random.key(seed), 3)
    layers: list = []
    for i, key in enumerate(keys):
        layers.append(Affine.from_config(f"dense{i}", key, {"features": SIZES[i]}, {"features": SIZES[i + 1]}))
        if i < 2:
            layers.append(pzb.nn.Elementwise(ACTS[i]))
    return pzb.nn.Sequential(layers)


def weights_of(model: pzb.nn.Sequential) -> list[tuple[np.ndarray, np.ndarray]]:
    """(W[in, out], b[out]) of each Affine, read straight from the Parameters."""
    out = []
    for layer in model.sublayers:
        if isinstance(layer, Affine):
            w = layer.sublayers[0].weights.value.unwrap("features", "features_out")
            b = layer.sublayers[1].bias.value.unwrap("features")
            out.append((np.asarray(w), np.asarray(b)))
    return out


def reference_pre_activations(model: pzb.nn.Sequential, x: np.ndarray) -> list[np.ndarray]:
    """Pure-jax forward pass returning each Affine's output."""
    pre = []
    h = jnp.asarray(x)
    for i, (w, b) in enumerate(weights_of(model)):
        h = h @ w + b
        pre.append(h)
        if i < 2:
            h = ACTS[i](h)
    return pre


def batch_input(seed: int, batch: int) -> np.ndarray:
    return np.asarray(jax.random.normal(jax.random.key(seed + 1000), (batch, SIZES[0])))


def named(x: np.ndarray) -> pzb.nx.NamedArray:
    return pzb.nx.wrap(jnp.asarray(x), "batch", "features")


@settings(max_examples=15, deadline=None, derandomize=True)
@given(seed=st.integers(0, 2**16), batch=st.integers(1, 3))
def test_capture_values_equal_manually_computed_affine_outputs(seed: int, batch: int) -> None:
    model = make_mlp(seed)
    x = batch_input(seed, batch)
    out, acts = capture_intermediates(model, Affine, named(x))
    expected = reference_pre_activations(model, x)
    assert list(acts) == ["sublayers[0]", "sublayers[2]", "sublayers[4]"]
    for got, want in zip(acts.values(), expected):
        np.testing.assert_allclose(got.unwrap("batch", "features"), want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out.unwrap("batch", "features"), expected[-1], rtol=1e-5, atol=1e-6)


@settings(max_examples=10, deadline=None, derandomize=True)
@given(seed=st.integers(0, 2**16), index=st.sampled_from([0, 2, 4]))
def test_capture_before_records_the_selected_layers_input(seed: int, index: int) -> None:
    model = make_mlp(seed)
    x = batch_input(seed, 2)
    target = model.sublayers[index]
    _, acts = capture_intermediates(model, lambda node: node is target, named(x), where="before")
    pre = reference_pre_activations(model, x)
    want = x if index == 0 else ACTS[index // 2 - 1](pre[index // 2 - 1])
    (got,) = acts.values()
    np.testing.assert_allclose(got.unwrap("batch", "features"), want, rtol=1e-5, atol=1e-6)


def test_selection_class_and_predicate_select_the_same_activations() -> None:
    model = make_mlp(0)
    x = named(batch_input(0, 2))
    by_class = capture_intermediates(model, Affine, x)[1]
    by_selection = capture_intermediates(model, pzb.select(model).at_instances_of(Affine), x)[1]
    by_predicate = capture_intermediates(model, lambda n: isinstance(n, Affine), x)[1]
    assert list(by_class) == list(by_selection) == list(by_predicate)
    # The same program whichever way the layers are picked (the jaxprs are compared): bitwise on any CPU.
    captured = lambda how: lambda v: capture_intermediates(model, how, v)[1]  # noqa: E731
    assert_bitwise_reproducible(captured(Affine), captured(pzb.select(model).at_instances_of(Affine)), x)
    assert_bitwise_reproducible(captured(Affine), captured(lambda n: isinstance(n, Affine)), x)
    for key in by_class:
        np.testing.assert_array_equal(by_class[key].unwrap("batch", "features"),
                                      by_selection[key].unwrap("batch", "features"))
        np.testing.assert_array_equal(by_class[key].unwrap("batch", "features"),
                                      by_predicate[key].unwrap("batch", "features"))


def test_capture_leaves_the_model_and_its_variables_unchanged() -> None:
    counter = pzb.StateVariable(jnp.zeros(()), "count")

    @pzb.pytree_dataclass
    class Count(pzb.nn.Layer):
        n: object

        def __call__(self, x, /, **side_inputs):
            self.n.value = self.n.value + 1
            return x

    model = pzb.nn.Sequential([Count(counter), *make_mlp(1).sublayers])
    params_before = [p.value for p in pzb.unbind_params(model)[1]]
    before = pzb.select(model).at_pytree_leaves().get_sequence()
    capture_intermediates(model, Affine, named(batch_input(1, 2)))
    assert counter.value == 0
    assert len(model.sublayers) == 6
    after = pzb.select(model).at_pytree_leaves().get_sequence()
    assert all(a is b for a, b in zip(before, after))
    assert all(p.value is v for p, v in zip(pzb.unbind_params(model)[1], params_before))


def test_capture_under_jit_matches_eager_capture() -> None:
    model = make_mlp(3)
    x = named(batch_input(3, 2))
    eager_out, eager = capture_intermediates(model, Affine, x)
    jitted = jax.jit(lambda m, v: capture_intermediates(m, Affine, v))
    out, acts = jitted(pzb.freeze_params(model), x)
    np.testing.assert_allclose(out.unwrap("batch", "features"), eager_out.unwrap("batch", "features"), rtol=1e-6)
    for key in eager:
        np.testing.assert_allclose(acts[key].unwrap("batch", "features"),
                                   eager[key].unwrap("batch", "features"), rtol=1e-6)


def test_capture_under_jit_accepts_a_selection_of_the_unfrozen_model() -> None:
    model = make_mlp(4)
    sel = pzb.select(model).at_instances_of(Affine).pick_nth_selected(1)
    x = named(batch_input(4, 1))
    _, acts = jax.jit(lambda m, v: capture_intermediates(m, sel, v))(pzb.freeze_params(model), x)
    np.testing.assert_allclose(acts["sublayers[2]"].unwrap("batch", "features"),
                               reference_pre_activations(model, np.asarray(x.unwrap("batch", "features")))[1],
                               rtol=1e-5, atol=1e-6)


def test_capture_at_a_struct_field_wraps_the_layer() -> None:
    square = Affine.from_config("sq", jax.random.key(9), {"features": 4}, {"features": 4})
    model = pzb.nn.Sequential([pzb.nn.Residual(square)])
    x = np.asarray(jax.random.normal(jax.random.key(2), (2, 4)))
    out, acts = capture_intermediates(model, lambda n: n is square, named(x))
    w = np.asarray(square.sublayers[0].weights.value.unwrap("features", "features_out"))
    b = np.asarray(square.sublayers[1].bias.value.unwrap("features"))
    np.testing.assert_allclose(acts["sublayers[0].delta"].unwrap("batch", "features"), x @ w + b, rtol=1e-5)
    np.testing.assert_allclose(out.unwrap("batch", "features"), x + x @ w + b, rtol=1e-5)


def test_insert_layers_before_splices_into_list_parent() -> None:
    model = make_mlp(0)
    edited = insert_layers(model, Affine, lambda path, node: pzb.nn.Identity(), where="before")
    assert [type(l).__name__ for l in edited.sublayers] == [
        "Identity", "Affine", "Elementwise", "Identity", "Affine", "Elementwise", "Identity", "Affine"]


def test_empty_selection_raises_selection_error_naming_the_selector() -> None:
    with pytest.raises(SelectionError, match="selects nothing.*class Softmax"):
        capture_intermediates(make_mlp(0), pzb.nn.Softmax, named(batch_input(0, 1)))


def test_selection_with_paths_missing_from_the_model_raises() -> None:
    sel = pzb.select([1, [2, 3]]).at(lambda t: t[1][1])
    with pytest.raises(SelectionError, match=r"missing: \['\[1\]\[1\]'\]"):
        resolve_selection([1, 2], sel)


def test_invalid_selector_and_where_raise() -> None:
    with pytest.raises(SelectionError, match="must be a Where, a pzb.Selection"):
        resolve_selection(make_mlp(0), 3)
    with pytest.raises(SelectionError, match="'after' or 'before'"):
        capture_intermediates(make_mlp(0), Affine, named(batch_input(0, 1)), where="inside")


def test_collect_saved_without_savers_raises() -> None:
    with pytest.raises(PzbridgeError, match="no SaveIntermediate"):
        collect_saved(pzb.nn.Identity(), 1)


def test_stateful_saver_records_its_input_on_a_plain_call() -> None:
    var = pzb.StateVariable(None, "probe")
    model = pzb.nn.Sequential([pzb.nn.Residual(pzb.nn.Identity()), SaveIntermediate("probe", saved=var)])
    assert model(3) == 6 and var.value == 6


def test_saver_label_must_match_its_variable() -> None:
    with pytest.raises(PzbridgeError, match="labelled 'other'"):
        SaveIntermediate("probe", saved=pzb.StateVariable(None, "other"))


class _Doubler(eqx.Module):
    inner: eqx.nn.Linear

    def __call__(self, x):
        return self.inner(x) * 2


def test_capture_on_lifted_equinox_model_equals_equinox_intermediate() -> None:
    keys = jax.random.split(jax.random.key(0), 2)
    seq = eqx.nn.Sequential([eqx.nn.Linear(3, 4, key=keys[0]), eqx.nn.Lambda(jax.nn.relu),
                             eqx.nn.Linear(4, 2, key=keys[1])])
    lifted = pzb.lift(seq)
    x = np.asarray(jax.random.normal(jax.random.key(5), (3,)))
    first = pzb.select(lifted).at(lambda t: t.body.sublayers[0])
    out, acts = capture_intermediates(lifted, first, pzb.nx.wrap(jnp.asarray(x), "features"))
    np.testing.assert_allclose(acts["body.sublayers[0]"].unwrap("features"), seq.layers[0](x), rtol=1e-6)
    np.testing.assert_allclose(out.unwrap("features"), seq(x), rtol=1e-6)


def test_saver_inside_foreign_code_records_the_childs_activation() -> None:
    # A Foreign runs its original code; the capture inside its lifted child now reaches the caller.
    linear = eqx.nn.Linear(2, 2, key=jax.random.key(0))
    lifted = pzb.lift(_Doubler(linear))
    _, acts = capture_intermediates(lifted, pzb.nn.Linear, pzb.nx.wrap(jnp.ones(2)))
    (act,) = acts.values()
    np.testing.assert_allclose(np.asarray(pzb.nx.unwrap(act, *act.named_shape)),
                               np.asarray(linear.weight @ jnp.ones(2)), rtol=1e-6)


# -- Captured: repeated values are one pytree child -------------------------------------------------


@settings(max_examples=25, deadline=None, derandomize=True)
@given(pattern=st.lists(st.integers(0, 3), min_size=1, max_size=8))
def test_captured_has_one_child_per_distinct_value_and_puts_it_back_at_every_path(pattern: list[int]) -> None:
    sources = [pzb.nx.wrap(jnp.arange(3.0) + i, "f") for i in range(4)]
    acts = Captured((f"p{n}", sources[i]) for n, i in enumerate(pattern))
    leaves, treedef = jax.tree_util.tree_flatten(acts)
    assert len(leaves) == len(set(pattern))
    for back in (jax.tree_util.tree_unflatten(treedef, leaves), jax.jit(lambda c: c)(acts)):
        assert type(back) is Captured and list(back) == list(acts)
        for a in back:
            np.testing.assert_array_equal(back[a].unwrap("f"), acts[a].unwrap("f"))
            for b in back:  # the same value where (and only where) the input had the same value
                assert (back[a] is back[b]) == (acts[a] is acts[b])
    doubled = jax.tree_util.tree_map(lambda v: v * 2, acts)
    assert type(doubled) is Captured and [doubled[k].unwrap("f").tolist() for k in acts] == [
        (2 * acts[k].unwrap("f")).tolist() for k in acts]


def test_captured_merges_an_equal_structure_around_the_same_arrays_only() -> None:
    data = jnp.ones((2, 3))
    same = Captured(a=pzb.nx.wrap(data, "x", "y"), b=pzb.nx.wrap(data, "x", "y"))  # two wrappers, one array
    renamed = Captured(a=pzb.nx.wrap(data, "x", "y"), b=pzb.nx.wrap(data, "x", "z"))  # other names: kept apart
    assert len(jax.tree_util.tree_leaves(same)) == 1 and len(jax.tree_util.tree_leaves(renamed)) == 2
    assert dict(jax.jit(lambda c: c)(renamed)["b"].named_shape) == {"x": 2, "z": 3}
    assert [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(same)[0]] == ["['a'].data_array"]
    assert same == {"a": same["a"], "b": same["b"]}  # still a dict


def test_capture_under_jit_returns_a_repeated_value_once() -> None:
    # A fan-out and a pass-through make three paths hold one value; the compiled program returns it once.
    model = pzb.nn.Sequential([pzb.nn.Elementwise(jnp.exp), pzb.nn.Identity(), pzb.nn.Identity(),
                               pzb.nn.Elementwise(jnp.negative)])
    x = pzb.nx.wrap(jnp.arange(3.0), "f")
    every = (pzb.nn.Elementwise, pzb.nn.Identity)
    jaxpr = jax.make_jaxpr(lambda m, v: capture_intermediates(m, every, v)[1])(model, x).jaxpr
    assert len(jaxpr.outvars) == 2  # exp's output (three paths), negative's output
    _, acts = jax.jit(lambda m, v: capture_intermediates(m, every, v))(model, x)
    assert list(acts) == ["sublayers[0]", "sublayers[1]", "sublayers[2]", "sublayers[3]"]
    assert acts["sublayers[0]"] is acts["sublayers[2]"]
    np.testing.assert_allclose(acts["sublayers[3]"].unwrap("f"), -np.exp(np.arange(3.0)), rtol=1e-6)


def test_captures_with_other_repeats_combine_as_dicts_and_otherwise_fail_naming_the_fix() -> None:
    data = jnp.arange(3.0)
    shared = Captured(a=pzb.nx.wrap(data, "f"), b=pzb.nx.wrap(data, "f"))
    apart = Captured(a=pzb.nx.wrap(data, "f"), b=pzb.nx.wrap(data + 0, "f"))
    with pytest.raises(ValueError, match=r"Captured"):  # jax names the type when the child counts differ ...
        jax.tree_util.tree_map(lambda u, v: u - v, shared, apart)
    other = Captured(a=pzb.nx.wrap(data + 0, "f"), b=pzb.nx.wrap(data + 0, "f"))
    regrouped = Captured(c=other["a"], a=shared["a"], b=other["a"])  # ... and the fix when only the grouping does
    with pytest.raises(ValueError, match=r"convert both with dict"):
        jax.tree_util.tree_map(lambda u, v: u, Captured(c=other["a"], a=shared["a"], b=shared["a"]), regrouped)
    diff = jax.tree_util.tree_map(lambda u, v: u - v, dict(shared), dict(apart))
    assert [d.unwrap("f").tolist() for d in diff.values()] == [[0.0, 0.0, 0.0]] * 2
