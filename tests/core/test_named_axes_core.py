"""Storage forms and metadata moves of named arrays, against numpy references."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from pzbridge.core.errors import NamedAxisError
from pzbridge.core.named_axes import AxisMap, NamedArray, NamedArrayView, is_namedarray, unwrap, wrap
from pzbridge.testing.named_arrays import build_named_array, named_array_cases


def _reference_with_names_last(case, names):
    """numpy: reference (positional..., case.names...) -> (positional..., names...)."""
    p = case.reference.ndim - len(case.names)
    return np.transpose(case.reference, list(range(p)) + [p + case.names.index(n) for n in names])


@given(named_array_cases())
def test_unwrap_with_all_names_matches_numpy_reference(case):
    np.testing.assert_array_equal(np.asarray(case.array.unwrap(*case.names)), case.reference)


@given(named_array_cases(), st.randoms(use_true_random=False))
def test_unwrap_in_any_name_order_is_a_transpose_of_the_reference(case, rnd):
    names = list(case.names)
    rnd.shuffle(names)
    np.testing.assert_array_equal(np.asarray(case.array.unwrap(*names)), _reference_with_names_last(case, names))


@given(named_array_cases(), st.randoms(use_true_random=False))
def test_untag_then_tag_is_identity(case, rnd):
    names = list(case.names)
    rnd.shuffle(names)
    p = len(case.array.positional_shape)
    roundtrip = case.array.untag(*names)
    # The new positional axes come after the existing ones, so name them back with temporaries.
    temps = [f"TMP{i}" for i in range(p)]
    back = roundtrip.tag(*temps, *names).untag(*temps)
    np.testing.assert_array_equal(np.asarray(back.unwrap(*case.names)), case.reference)
    assert dict(back.named_shape) == dict(case.array.named_shape)


@given(named_array_cases(max_named_axes=0, min_positional_axes=1, max_positional_axes=3))
def test_tag_then_untag_round_trips_positional_array(case):
    names = tuple(f"N{i}" for i in range(case.reference.ndim))
    tagged = case.array.tag(*names)
    assert tagged.positional_shape == ()
    assert dict(tagged.named_shape) == dict(zip(names, case.reference.shape))
    np.testing.assert_array_equal(np.asarray(tagged.untag(*names).unwrap()), case.reference)


@given(named_array_cases(min_named_axes=1, min_positional_axes=1))
def test_untag_appends_after_existing_positional_axes(case):
    name = case.names[0]
    moved = case.array.untag(name)
    assert moved.positional_shape == case.array.positional_shape + (case.array.named_shape[name],)
    # The name lands right after the positional axes, which is where the reference has it.
    np.testing.assert_array_equal(np.asarray(moved.unwrap(*case.names[1:])), case.reference)


@given(named_array_cases(min_named_axes=1, min_positional_axes=1))
def test_untag_prefix_puts_axes_before_existing_positional_axes(case):
    name = case.names[-1]
    moved = case.array.untag_prefix(name)
    assert moved.positional_shape == (case.array.named_shape[name],) + case.array.positional_shape
    expected = np.moveaxis(case.reference, case.reference.ndim - 1, 0)
    np.testing.assert_array_equal(np.asarray(moved.unwrap(*case.names[:-1])), expected)


@given(named_array_cases(min_positional_axes=1))
def test_tag_prefix_names_only_leading_axes(case):
    tagged = case.array.tag_prefix("LEAD")
    assert tagged.positional_shape == case.array.positional_shape[1:]
    assert tagged.named_shape["LEAD"] == case.array.positional_shape[0]
    np.testing.assert_array_equal(
        np.asarray(tagged.unwrap(*case.names, "LEAD")),
        np.moveaxis(case.reference, 0, -1),
    )


@given(named_array_cases())
def test_view_and_canonical_forms_hold_the_same_values(case):
    x = case.array
    forms = [x, x.as_namedarrayview(), x.with_positional_prefix(), x.canonicalize(), x.order_as(*reversed(case.names))]
    for form in forms:
        assert form.positional_shape == x.positional_shape
        assert dict(form.named_shape) == dict(x.named_shape)
        np.testing.assert_array_equal(np.asarray(form.unwrap(*case.names)), case.reference)
    assert isinstance(x.with_positional_prefix(), NamedArray)
    assert list(x.canonicalize().named_shape) == sorted(case.names)
    assert list(x.order_as(*reversed(case.names)).named_shape) == list(reversed(case.names))


@given(named_array_cases(dtype="float32"), st.data())
def test_order_like_reproduces_the_reference_layout(case, data):
    perm = data.draw(st.permutations(range(case.reference.ndim)))
    other = build_named_array(np.zeros(case.reference.shape, np.float32), case.names, perm)
    ordered = case.array.order_like(other)
    assert jax.tree_util.tree_structure(ordered) == jax.tree_util.tree_structure(other)
    np.testing.assert_array_equal(np.asarray(ordered.unwrap(*case.names)), case.reference)


@given(named_array_cases())
def test_pytree_flatten_unflatten_round_trips(case):
    leaves, treedef = jax.tree_util.tree_flatten(case.array)
    assert len(leaves) == 1
    rebuilt = jax.tree_util.tree_unflatten(treedef, leaves)
    assert type(rebuilt) is type(case.array)
    assert rebuilt.positional_shape == case.array.positional_shape
    np.testing.assert_array_equal(np.asarray(rebuilt.unwrap(*case.names)), case.reference)


@given(named_array_cases(dtype="float32"))
def test_jit_passes_named_arrays_through(case):
    out = jax.jit(lambda x: x * 2.0)(case.array)
    np.testing.assert_allclose(np.asarray(out.unwrap(*case.names)), case.reference * 2.0, rtol=1e-6)


def test_grad_through_named_array_matches_plain_jax():
    data = jnp.arange(6.0).reshape(2, 3)
    grad = jax.grad(lambda x: (x * x).sum("a", "b").unwrap())(wrap(data, "a", "b"))
    assert isinstance(grad, NamedArray)
    np.testing.assert_allclose(np.asarray(grad.unwrap("a", "b")), 2 * np.asarray(data))


def test_wrap_names_every_axis_and_unwrap_function_accepts_plain_arrays():
    x = wrap(np.ones((2, 3)), "a", "b")
    assert dict(x.named_shape) == {"a": 2, "b": 3} and x.positional_shape == ()
    assert unwrap(jnp.ones(2)).shape == (2,)
    assert is_namedarray(x) and not is_namedarray(np.ones(2))


def test_axis_map_is_hashable_ordered_and_compares_with_dicts():
    a, b = AxisMap({"x": 1, "y": 2}), AxisMap({"y": 2, "x": 1})
    assert a != b and a == {"y": 2, "x": 1} and hash(a) == hash(AxisMap([("x", 1), ("y", 2)]))


def test_tag_with_wrong_count_says_how_many_axes_there_are():
    with pytest.raises(NamedAxisError, match=r"tag got 2 names \['a', 'b'\] for 3 positional axes"):
        wrap(jnp.zeros((2, 3, 4))).tag("a", "b")


def test_untag_unknown_name_lists_the_existing_names():
    with pytest.raises(NamedAxisError, match=r"unknown axis names \['c'\].*\['a', 'b'\]"):
        wrap(jnp.zeros((2, 3)), "a", "b").untag("c")


def test_duplicate_names_are_rejected_everywhere():
    with pytest.raises(NamedAxisError, match="duplicate axis names"):
        wrap(jnp.zeros((2, 3)), "a", "a")
    with pytest.raises(NamedAxisError, match="duplicate axis names"):
        wrap(jnp.zeros((2, 3)), "a", "b").untag("a", "a")
    with pytest.raises(NamedAxisError, match="already used"):
        wrap(jnp.zeros((2, 3))).tag_prefix("a").tag("a")


def test_non_string_names_are_rejected():
    with pytest.raises(NamedAxisError, match="must be strings"):
        wrap(jnp.zeros(2), 3)


def test_invalid_construction_reports_shapes():
    with pytest.raises(NamedAxisError, match=r"trailing axes of data_array with shape \(2, 3\)"):
        NamedArray(jnp.zeros((2, 3)), {"a": 2})
    with pytest.raises(NamedAxisError, match="exactly once"):
        NamedArrayView(jnp.zeros((2, 3)), (2, 3), (1,), {"a": 1})
    with pytest.raises(NamedAxisError, match="differs from data_array.shape"):
        NamedArrayView(jnp.zeros((2, 3)), (3, 2), (1,), {"a": 0})


def test_unwrap_with_remaining_names_says_which():
    with pytest.raises(NamedAxisError, match=r"named axes \['b'\] remain"):
        wrap(jnp.zeros((2, 3)), "a", "b").unwrap("a")


def test_scalar_conversion_needs_no_named_axes():
    assert float(wrap(jnp.array(2.5))) == 2.5
    with pytest.raises(NamedAxisError, match="cannot convert"):
        float(wrap(jnp.ones(1), "a"))
    with pytest.raises(TypeError, match="not iterable"):
        list(wrap(jnp.ones(2)))


def test_tag_and_untag_never_copy_data():
    data = jnp.arange(24.0).reshape(2, 3, 4)
    x = wrap(data, "a", "b", "c").untag("c", "a").tag_prefix("z")
    assert x.as_namedarrayview().data_array is data
