"""Indexing named arrays by position and by name, and .at updates, against numpy."""

import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pzbridge.core.errors import NamedAxisError
from pzbridge.core.named_axes import wrap
from pzbridge.testing.named_arrays import named_array_cases

# Eager vmapped gathers/scatters compile per shape: fewer examples keep this file fast.
FEWER = settings(max_examples=20)


@given(named_array_cases(dtype="int32", min_named_axes=1), st.data())
def test_dict_indexing_with_ints_slices_and_new_axes_matches_numpy(case, data):
    p = case.reference.ndim - len(case.names)
    index, np_index, kept = {}, [slice(None)] * case.reference.ndim, []
    for axis, name in enumerate(case.names):
        size = case.reference.shape[p + axis]
        kind = data.draw(st.sampled_from(["int", "slice", "skip"]))
        if kind == "int":
            index[name] = np_index[p + axis] = data.draw(st.integers(-size, size - 1))
        elif kind == "slice":
            start = data.draw(st.integers(0, size - 1))
            index[name] = np_index[p + axis] = slice(start, size, data.draw(st.integers(1, 2)))
            kept.append(name)
        else:
            kept.append(name)
    index["NEW"] = None
    got = case.array[index]
    assert got.named_shape["NEW"] == 1
    np.testing.assert_array_equal(np.asarray(got.unwrap(*kept, "NEW"))[..., 0], case.reference[tuple(np_index)])


@FEWER
@given(named_array_cases(dtype="float32", min_named_axes=1), st.data())
def test_dict_indexing_with_named_index_array_gathers_and_adds_its_names(case, data):
    name = data.draw(st.sampled_from(case.names))
    size = case.array.named_shape[name]
    picks = data.draw(st.lists(st.integers(0, size - 1), min_size=1, max_size=4))
    idx = wrap(jnp.asarray(picks), "K")
    got = case.array[{name: idx}]
    p = case.reference.ndim - len(case.names)
    kept = [n for n in case.names if n != name]
    want = np.take(case.reference, picks, axis=p + case.names.index(name))  # axis replaced by K in place
    want = np.moveaxis(want, p + case.names.index(name), -1)
    np.testing.assert_allclose(np.asarray(got.unwrap(*kept, "K")), want)


@FEWER
@given(named_array_cases(dtype="float32", min_positional_axes=1), st.data())
def test_positional_indexing_is_vectorised_over_names(case, data):
    size = case.array.positional_shape[0]
    i = data.draw(st.integers(-size, size - 1))
    np.testing.assert_allclose(np.asarray(case.array[i].unwrap(*case.names)), case.reference[i])
    picks = np.asarray(data.draw(st.lists(st.integers(0, size - 1), min_size=1, max_size=3)))
    np.testing.assert_allclose(np.asarray(case.array[picks].unwrap(*case.names)), case.reference[picks])


@FEWER
@given(named_array_cases(dtype="float32", min_named_axes=1), st.data())
def test_at_set_and_add_on_a_named_slice_match_numpy(case, data):
    name = data.draw(st.sampled_from(case.names))
    size = case.array.named_shape[name]
    p = case.reference.ndim - len(case.names)
    axis = p + case.names.index(name)
    i = data.draw(st.integers(0, size - 1))
    np_index = [slice(None)] * case.reference.ndim
    np_index[axis] = i
    expected = case.reference.copy()
    expected[tuple(np_index)] = 7.0
    got = case.array.at[{name: i}].set(7.0)
    np.testing.assert_allclose(np.asarray(got.unwrap(*case.names)), expected)
    # Named values: broadcast by name over the remaining axes.
    other = [n for n in case.names if n != name]
    values_ref = np.arange(int(np.prod([case.array.named_shape[n] for n in other])), dtype=np.float32)
    values_ref = values_ref.reshape([case.array.named_shape[n] for n in other])
    values = wrap(jnp.asarray(values_ref), *other)
    expected = case.reference.copy()
    np_index[axis] = slice(0, 1)
    expected[tuple(np_index)] += np.expand_dims(values_ref, axis=tuple(range(p)) + (axis,))
    got = case.array.at[{name: slice(0, 1)}].add(values)
    np.testing.assert_allclose(np.asarray(got.unwrap(*case.names)), expected, rtol=1e-6)


def test_at_positional_multiply_matches_numpy():
    x = wrap(jnp.ones((3, 2))).tag_prefix()  # positional (3, 2)
    got = x.at[1].multiply(4.0)
    want = np.ones((3, 2))
    want[1] *= 4.0
    np.testing.assert_allclose(np.asarray(got.unwrap()), want)


def test_indexing_errors_name_the_axes():
    x = wrap(jnp.zeros((2, 3)), "a", "b")
    with pytest.raises(NamedAxisError, match=r"unknown axis names \['c'\]"):
        x[{"c": 0}]
    with pytest.raises(NamedAxisError, match=r"None adds a new axis, but \['a'\] already exist"):
        x[{"a": None}]
