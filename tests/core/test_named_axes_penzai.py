"""Penzai 0.2.5 named-axis features: pzb.slice, .at[{...: None}] updates, pzbridge errors on bad construction."""

import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import pzbridge as pzb
from pzbridge.core.errors import NamedAxisError, PzbridgeError


def test_slice_helper_builds_slices():
    assert pzb.slice[1:3] == slice(1, 3) and pzb.slice[::2, 0] == (slice(None, None, 2), 0)
    assert pzb.nx.slice is pzb.slice
    x = pzb.nx.wrap(jnp.arange(10).reshape(2, 5), "b", "seq")
    assert x[{"seq": pzb.slice[1:4:2]}].unwrap("b", "seq").tolist() == [[1, 3], [6, 8]]


def test_at_update_with_a_none_index_adds_a_unit_axis_to_the_region():
    x = pzb.nx.wrap(jnp.arange(6.0).reshape(2, 3), "a", "b")
    values = pzb.nx.wrap(jnp.full((1, 3), 7.0), "new", "b")
    out = x.at[{"a": 0, "new": None}].set(values)
    assert dict(out.named_shape) == {"a": 2, "b": 3}
    assert out.unwrap("a", "b").tolist() == [[7.0, 7.0, 7.0], [3.0, 4.0, 5.0]]
    assert x.at[{"new": None}].add(1.0).unwrap("a", "b").tolist() == [[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]]
    with pytest.raises(NamedAxisError, match=r"have sizes \{'new': 2\} there"):
        x.at[{"a": 0, "new": None}].set(pzb.nx.wrap(jnp.ones((2, 3)), "new", "b"))
    with pytest.raises(NamedAxisError, match="already exist"):
        x.at[{"a": None}].set(0.0)


@settings(max_examples=20, derandomize=True)
@given(st.integers(0, 2), st.floats(-3, 3, allow_nan=False))
def test_none_axes_in_an_update_do_not_change_the_result(row, value):
    x = pzb.nx.wrap(jnp.arange(6.0).reshape(3, 2), "a", "b")
    plain = x.at[{"a": row}].set(value)
    with_unit = x.at[{"a": row, "u": None}].set(pzb.nx.full({"u": 1}, value))
    np.testing.assert_array_equal(plain.unwrap("a", "b"), with_unit.unwrap("a", "b"))


@pytest.mark.parametrize("build, message", [
    (lambda: pzb.nx.NamedArray(jnp.ones(3), named_axes=None), "named_axes must map axis names to sizes"),
    (lambda: pzb.nx.NamedArray(jnp.ones(3), {"a": 3.0}), r"values must be non-negative ints .*\{'a': 3.0\}"),
    (lambda: pzb.nx.NamedArray([1, 2, 3], {"a": 3}), "data_array must be an array, found a Python list"),
    (lambda: pzb.nx.NamedArray(jnp.ones(3), {3: 3}), "axis names must be strings"),
    (lambda: pzb.nx.NamedArrayView(jnp.ones(3), None, (0,), {}), "data_shape must be a tuple of non-negative ints"),
    (lambda: pzb.nx.NamedArrayView(jnp.ones(3), (3,), None, {}), "data_axis_for_logical_axis must be a tuple"),
    (lambda: pzb.nx.NamedArrayView(jnp.ones(3), (3,), (), None), "data_axis_for_name must map axis names"),
])
def test_bad_construction_raises_a_pzbridge_error(build, message):
    with pytest.raises(NamedAxisError, match=message) as info:
        build()
    assert isinstance(info.value, PzbridgeError) and "Fix:" in str(info.value)
