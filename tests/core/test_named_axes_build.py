"""Constructors, joins, random keys, scan and treescope rendering of named arrays."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import treescope
from hypothesis import given, settings
from hypothesis import strategies as st

from pzbridge.core import named_axes as nx
from pzbridge.core.errors import NamedAxisError
from pzbridge.testing.named_arrays import named_array_cases, named_shapes


@given(named_shapes(), st.sampled_from(["float32", "int32", "bool"]))
def test_constructors_have_the_requested_named_shape_and_values(shape, dtype):
    for make, value in ((nx.zeros, 0), (nx.ones, 1)):
        x = make(shape, dtype=dtype)
        assert dict(x.named_shape) == shape and x.positional_shape == () and x.dtype == np.dtype(dtype)
        np.testing.assert_array_equal(np.asarray(x.unwrap(*shape)), np.full(tuple(shape.values()), value, dtype))
    filled = nx.full(shape, 3, dtype="int32")
    np.testing.assert_array_equal(np.asarray(filled.unwrap(*shape)), np.full(tuple(shape.values()), 3))


@given(named_array_cases())
def test_like_constructors_keep_layout_and_shape(case):
    z = nx.zeros_like(case.array)
    assert jax.tree_util.tree_structure(z) == jax.tree_util.tree_structure(case.array)
    np.testing.assert_array_equal(np.asarray(nx.ones_like(case.array).unwrap(*case.names)),
                                  np.ones_like(case.reference))


def test_arange_matches_numpy():
    np.testing.assert_array_equal(np.asarray(nx.arange("s", 2, 9, 3).unwrap("s")), np.arange(2, 9, 3))
    assert dict(nx.arange("s", 5).named_shape) == {"s": 5}


def test_random_split_matches_jax_random_split_reshaped():
    key = jax.random.key(3)
    keys = nx.random_split(key, {"b": 2, "h": 3})
    assert dict(keys.named_shape) == {"b": 2, "h": 3}
    want = jax.random.key_data(jax.random.split(key, 6)).reshape(2, 3, -1)
    np.testing.assert_array_equal(np.asarray(jax.random.key_data(keys.unwrap("b", "h"))), np.asarray(want))


def test_random_split_of_named_keys_adds_names():
    keys = nx.random_split(jax.random.key(0), {"b": 2})
    more = nx.random_split(keys, {"h": 3})
    assert dict(more.named_shape) == {"b": 2, "h": 3}
    flat = jax.random.key_data(more.unwrap("b", "h")).reshape(6, -1)
    assert len({tuple(np.asarray(row)) for row in flat}) == 6  # all keys distinct


def test_random_split_of_raw_keys_keeps_trailing_positional_axis():
    keys = nx.random_split(jax.random.PRNGKey(0), {"b": 4})
    assert keys.positional_shape == (2,) and dict(keys.named_shape) == {"b": 4}


@settings(max_examples=25)
@given(named_array_cases(dtype="float32", min_named_axes=1), st.data())
def test_unstack_then_stack_and_concatenate_are_inverses(case, data):
    name = data.draw(st.sampled_from(case.names))
    parts = nx.unstack(case.array, name)
    assert len(parts) == case.array.named_shape[name]
    restacked = nx.stack(parts, name)
    np.testing.assert_array_equal(np.asarray(restacked.unwrap(*case.names)), case.reference)
    cut = data.draw(st.integers(0, len(parts)))
    halves = [case.array[{name: slice(0, cut)}], case.array[{name: slice(cut, None)}]]
    joined = nx.concatenate(halves, name)
    np.testing.assert_array_equal(np.asarray(joined.unwrap(*case.names)), case.reference)


def test_concatenate_aligns_other_axes_by_name():
    a = nx.wrap(jnp.arange(6.0).reshape(2, 3), "b", "s")
    b = nx.wrap(jnp.arange(6.0, 10.0).reshape(2, 2), "s", "b")
    joined = nx.concatenate([a, b], "s")
    want = np.concatenate([np.arange(6.0).reshape(2, 3), np.arange(6.0, 10.0).reshape(2, 2).T], axis=1)
    np.testing.assert_array_equal(np.asarray(joined.unwrap("b", "s")), want)


def test_join_errors_say_which_item():
    with pytest.raises(NamedAxisError, match=r"item 1 lacks axis 's'"):
        nx.concatenate([nx.zeros({"s": 2}), nx.zeros({"t": 2})], "s")
    with pytest.raises(NamedAxisError, match=r"item 0 already has axis 's'"):
        nx.stack([nx.zeros({"s": 2})], "s")


@settings(max_examples=15)
@given(named_array_cases(dtype="float32", min_named_axes=1), st.data())
def test_scan_matches_python_loop(case, data):
    axis = data.draw(st.sampled_from(case.names))
    p = case.reference.ndim - len(case.names)
    rest = [n for n in case.names if n != axis]
    steps = np.moveaxis(case.reference, p + case.names.index(axis), 0)
    carry = np.zeros(steps.shape[1:], np.float32)
    outputs = []
    for step in steps:  # reference: running sum, output = carry * 2 before update
        outputs.append(carry * 2)
        carry = carry + step
    init = nx.zeros_like(case.array[{axis: 0}])
    final, ys = nx.scan(lambda c, x: (c + x, c * 2), axis, init, case.array)
    np.testing.assert_allclose(np.asarray(final.unwrap(*rest)), carry, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(ys.unwrap(*rest, axis)), np.moveaxis(np.stack(outputs), 0, -1), rtol=1e-5,
                               atol=1e-6)


def test_scan_rejects_inputs_without_the_axis():
    with pytest.raises(NamedAxisError, match=r"item 0 lacks axis 't'"):
        nx.scan(lambda c, x: (c, x), "t", 0.0, nx.zeros({"s": 2}))


def test_order_like_fixes_tree_structures_for_tree_functions():
    a = {"w": nx.wrap(jnp.ones((2, 3)), "x", "y")}
    b = {"w": nx.wrap(jnp.ones((3, 2)), "y", "x")}
    ordered = nx.order_like(a, b)
    assert jax.tree_util.tree_structure(ordered) == jax.tree_util.tree_structure(b)


def test_treescope_text_and_html_show_axis_names():
    x = nx.wrap(jnp.arange(6.0).reshape(2, 3), "batch", "seq").untag("seq")
    text = treescope.render_to_text({"activations": x})
    assert "batch:2" in text and "NamedArrayView" in text and "float32(3 | batch:2)" in text
    html = treescope.render_to_html(x, compressed=False)
    assert "batch:2" in html
    figure_html = treescope.render_to_html(treescope.render_array(x), compressed=False)
    assert "batch" in figure_html


def test_treescope_adapter_reports_named_and_positional_axes():
    x = nx.wrap(jnp.zeros((4, 2, 3))).tag_prefix("b")
    adapter = treescope.type_registries.lookup_ndarray_adapter(x)
    infos = adapter.get_axis_info_for_array_data(x)
    assert [getattr(i, "axis_name", None) for i in infos] == ["b", None, None]
    data, mask = adapter.get_array_data_with_truncation(x, nx.wrap(jnp.ones(4, bool), "b"), (None, None, None))
    assert data.shape == (4, 2, 3) and mask.shape == (4, 2, 3) and mask.all()
