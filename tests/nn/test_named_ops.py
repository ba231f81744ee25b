"""Tests for pzbridge/nn/named_ops.py: the glue layers of traced modules, against numpy on aligned axes.

Every property draws named arrays in random storage layouts
(``pzbridge.testing.named_arrays``) and compares with numpy computed on the
strategies' independent canonical references, so a layer that reads axes by
storage position instead of by name fails.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import pzbridge as pzb
from pzbridge.core import named_axes as nx
from pzbridge.core.errors import NamedAxisError
from pzbridge.core.named_axes_ops import map_data
from pzbridge.core.variables_kinds import ParameterValue
from pzbridge.nn.named_ops import (
    AXIS_SIZES,
    AddAxes,
    ApplyPrimitive,
    Concatenate,
    Constant,
    ContractInputs,
    Iota,
    MergeAxes,
    ParameterUse,
    ReduceAxes,
    SliceAxes,
    SplitAxis,
    SqueezeAxes,
    TakeAlongAxis,
    constant_value,
    static_params,
)
from pzbridge.testing.named_arrays import (
    broadcastable_named_array_cases,
    build_named_array,
    named_array_cases,
)

TWO_INPUTS = (("input", 0), ("input", 1))


def _values(x, *names):
    """Plain numpy data of ``x`` with named axes ``names`` trailing (a plain array passes through)."""
    return np.asarray(x.unwrap(*names) if nx.is_namedarray(x) else x)


def _aligned(case, union, rank):
    """The case's reference laid out as ``(positional padded to rank..., union names...)`` with 1 for missing names."""
    ref = case.reference
    p = ref.ndim - len(case.names)
    present = [n for n in union if n in case.names]
    ref = np.transpose(ref, list(range(p)) + [p + case.names.index(n) for n in present])
    shape = (1,) * (rank - p) + ref.shape[:p] + tuple(union[n] if n in case.names else 1 for n in union)
    return ref.reshape(shape)


def _rank(*cases):
    """The broadcast positional rank of the cases (their widest positional shape)."""
    return max(c.reference.ndim - len(c.names) for c in cases)


def _primitive_of(fn, *example):
    """The single primitive (and its static params) ``fn`` traces to."""
    (eqn,) = jax.make_jaxpr(fn)(*example).eqns
    return eqn.primitive, static_params(eqn.params)


def test_axis_sizes_is_the_side_input_name():
    assert AXIS_SIZES == "axis_sizes"


# ApplyPrimitive ---------------------------------------------------------------------------

BINARY = {
    "add": (jax.lax.add_p, np.add),
    "sub": (jax.lax.sub_p, np.subtract),
    "mul": (jax.lax.mul_p, np.multiply),
    "max": (jax.lax.max_p, np.maximum),
    "min": (jax.lax.min_p, np.minimum),
    "lt": (jax.lax.lt_p, np.less),
}


@given(st.sampled_from(sorted(BINARY)), broadcastable_named_array_cases(count=2, dtype="float32"))
def test_binary_primitive_equals_numpy_after_aligning_by_name(op, drawn):
    primitive, reference = BINARY[op]
    union, positional, (a, b) = drawn
    out = ApplyPrimitive(primitive, (), TWO_INPUTS)((a.array, b.array))
    rank = _rank(a, b)
    expected = reference(_aligned(a, union, rank), _aligned(b, union, rank))
    if union:
        assert dict(out.named_shape) == union
    got = _values(out, *union)
    assert got.dtype == expected.dtype
    assert got.shape == expected.shape
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=0)


@given(broadcastable_named_array_cases(count=3, dtype="float32"))
def test_select_n_broadcasts_its_operands_by_name(drawn):
    # select_n needs equal shapes, unlike most lax primitives: the operands meet with size-one axes.
    union, positional, (p, x, y) = drawn
    pred = map_data(lambda d: d > 0, p.array)  # keeps the drawn storage layout
    out = ApplyPrimitive(jax.lax.select_n_p, (), (("input", 0), ("input", 1), ("input", 2)))((pred, x.array, y.array))
    rank = _rank(p, x, y)
    # select_n(pred, on_false, on_true)
    expected = np.where(_aligned(p, union, rank) > 0, _aligned(y, union, rank), _aligned(x, union, rank))
    got = _values(out, *union)
    assert got.shape == expected.shape
    np.testing.assert_array_equal(got, expected)


UNARY = {
    "exp": jnp.exp,
    "tanh": jnp.tanh,
    "cube": lambda v: v**3,  # integer_pow, param y=3
    "to_int32": lambda v: v.astype(jnp.int32),  # convert_element_type, params new_dtype / weak_type
    "negative": jnp.negative,
}


@given(st.sampled_from(sorted(UNARY)), named_array_cases(dtype="float32", max_positional_axes=1))
def test_unary_primitives_with_params_match_jnp(op, case):
    fn = UNARY[op]
    primitive, params = _primitive_of(fn, jnp.float32(1.0))
    out = ApplyPrimitive(primitive, params, (("input", 0),))(case.array)
    expected = np.asarray(fn(jnp.asarray(case.reference)))
    got = _values(out, *case.names)
    assert got.dtype == expected.dtype
    np.testing.assert_allclose(got, expected, rtol=2e-6, atol=1e-6)


def test_clamp_broadcasts_scalar_bounds_to_the_operand():
    x = nx.wrap(jnp.array([[-2.0, 0.1, 3.0], [0.4, -0.6, 0.0]]), "seq", "features")
    out = ApplyPrimitive(jax.lax.clamp_p, (), (("constant", 0), ("input", 0), ("constant", 1)), (-0.5, 0.5))(x)
    np.testing.assert_array_equal(out.unwrap("seq", "features"), np.float32([[-0.5, 0.1, 0.5], [0.4, -0.5, 0.0]]))


def test_operand_order_places_constants_where_the_code_had_them():
    x = nx.wrap(jnp.array([1.0, 2.0, 4.0]), "features")
    minus = ApplyPrimitive(jax.lax.sub_p, (), (("constant", 0), ("input", 0)), (10.0,))
    np.testing.assert_array_equal(minus(x).unwrap("features"), [9.0, 8.0, 6.0])
    flipped = ApplyPrimitive(jax.lax.sub_p, (), (("input", 0), ("constant", 0)), (10.0,))
    np.testing.assert_array_equal(flipped(x).unwrap("features"), [-9.0, -8.0, -6.0])
    # The second element of a tuple input, twice.
    square = ApplyPrimitive(jax.lax.mul_p, (), (("input", 1), ("input", 1)))
    np.testing.assert_array_equal(square((None, x)).unwrap("features"), [1.0, 4.0, 16.0])


def test_named_constant_broadcasts_by_name():
    x = nx.wrap(jnp.arange(6.0).reshape(2, 3), "seq", "features")
    bias = nx.wrap(jnp.array([10.0, 20.0, 30.0]), "features")
    out = ApplyPrimitive(jax.lax.add_p, (), (("constant", 0), ("input", 0)), (bias,))(x)
    np.testing.assert_array_equal(out.unwrap("seq", "features"), [[10.0, 21.0, 32.0], [13.0, 24.0, 35.0]])


def test_renames_align_operands_before_the_primitive():
    a = nx.wrap(jnp.array([1.0, 2.0, 3.0]), "seq")
    b = nx.wrap(jnp.array([10.0, 20.0, 30.0]), "kv_seq")
    joined = ApplyPrimitive(jax.lax.add_p, (), TWO_INPUTS, renames=((), (("kv_seq", "seq"),)))((a, b))
    assert dict(joined.named_shape) == {"seq": 3}
    np.testing.assert_array_equal(joined.unwrap("seq"), [11.0, 22.0, 33.0])
    # Without the rename the two axes are distinct: an outer sum.
    outer = ApplyPrimitive(jax.lax.add_p, (), TWO_INPUTS)((a, b))
    np.testing.assert_array_equal(outer.unwrap("seq", "kv_seq"), np.add.outer([1.0, 2.0, 3.0], [10.0, 20.0, 30.0]))
    # A rename of an axis the operand lacks is ignored.
    kept = ApplyPrimitive(jax.lax.add_p, (), TWO_INPUTS, renames=((("absent", "x"),), ()))((a, a))
    np.testing.assert_array_equal(kept.unwrap("seq"), [2.0, 4.0, 6.0])


def test_mismatched_sizes_of_one_name_raise_named_axis_error():
    add = ApplyPrimitive(jax.lax.add_p, (), TWO_INPUTS)
    with pytest.raises(NamedAxisError):
        add((nx.wrap(jnp.ones(2), "seq"), nx.wrap(jnp.ones(3), "seq")))


def test_axes_the_op_does_not_use_pass_through_under_jit():
    scale = ApplyPrimitive(jax.lax.mul_p, (), (("input", 0), ("constant", 0)), (3.0,))
    x = nx.wrap(jnp.arange(8.0).reshape(2, 4), "batch", "features")
    out = jax.jit(lambda v: scale(v))(x)
    np.testing.assert_array_equal(out.unwrap("batch", "features"), 3.0 * np.arange(8.0).reshape(2, 4))


# ParameterUse / Constant ------------------------------------------------------------------

def test_parameter_use_renames_storage_axes_for_this_use():
    table = np.arange(6.0).reshape(2, 3)
    p = pzb.Parameter(nx.wrap(jnp.asarray(table), "vocabulary", "features"), "table")
    value = ParameterUse(p, ("vocabulary", "features"), ("features_out", "features")).named_value()
    assert dict(value.named_shape) == {"features_out": 2, "features": 3}
    np.testing.assert_array_equal(value.unwrap("features_out", "features"), table)
    # Naming by storage axis name, not position: a stored view in another data order.
    view = build_named_array(table, ["vocabulary", "features"], permutation=[1, 0])
    q = pzb.Parameter(view, "table")
    again = ParameterUse(q, ("vocabulary", "features"), ("tokens", "embedding")).named_value()
    np.testing.assert_array_equal(again.unwrap("tokens", "embedding"), table)


def test_parameter_use_drops_unit_axes():
    data = np.array([[1.0, 2.0, 3.0]])
    named = pzb.Parameter(nx.wrap(jnp.asarray(data), "one", "features"), "bias")
    value = ParameterUse(named, ("one", "features"), (None, "features")).named_value()
    assert dict(value.named_shape) == {"features": 3}
    np.testing.assert_array_equal(value.unwrap("features"), [1.0, 2.0, 3.0])
    raw = pzb.Parameter(jnp.asarray(data), "bias")
    value = ParameterUse(raw, None, (None, "features")).named_value()
    assert dict(value.named_shape) == {"features": 3}
    np.testing.assert_array_equal(value.unwrap("features"), [1.0, 2.0, 3.0])


def test_parameter_use_names_a_raw_value_positionally():
    raw = pzb.Parameter(jnp.arange(6.0).reshape(3, 2), "w")
    value = ParameterUse(raw, None, ("features", "features_out")).named_value()
    assert dict(value.named_shape) == {"features": 3, "features_out": 2}
    np.testing.assert_array_equal(value.unwrap("features", "features_out"), np.arange(6.0).reshape(3, 2))


def test_parameter_use_follows_value_changes_and_frozen_values():
    p = pzb.Parameter(nx.wrap(jnp.array([1.0, 2.0]), "features"), "scale")
    use = ParameterUse(p, ("features",), ("channels",))
    layer = ApplyPrimitive(jax.lax.mul_p, (), (("input", 0), ("constant", 0)), (use,))
    x = nx.wrap(jnp.array([3.0, 5.0]), "channels")
    np.testing.assert_array_equal(layer(x).unwrap("channels"), [3.0, 10.0])
    p.value = nx.wrap(jnp.array([-1.0, 4.0]), "features")
    np.testing.assert_array_equal(layer(x).unwrap("channels"), [-3.0, 20.0])
    np.testing.assert_array_equal(Constant(use)(None).unwrap("channels"), [-1.0, 4.0])
    frozen = ParameterUse(ParameterValue(nx.wrap(jnp.array([7.0, 8.0]), "features"), "scale", {}), ("features",),
                          ("channels",))
    np.testing.assert_array_equal(frozen.named_value().unwrap("channels"), [7.0, 8.0])


def test_parameters_inside_glue_stay_selectable():
    p = pzb.Parameter(nx.wrap(jnp.ones(2), "features"), "glue.scale")
    layer = ApplyPrimitive(jax.lax.mul_p, (), (("input", 0), ("constant", 0)),
                           (ParameterUse(p, ("features",), ("features",)),))
    found = pzb.select(layer).at_instances_of(pzb.Parameter).get_sequence()
    assert [q.label for q in found] == ["glue.scale"]


def test_constant_returns_its_value_and_ignores_the_input():
    value = nx.wrap(jnp.array([1.0, 2.0]), "features")
    assert Constant(value)(nx.wrap(jnp.zeros(5), "seq")) is value
    assert constant_value(2.5) == 2.5
    np.testing.assert_array_equal(Constant(jnp.arange(3))("ignored"), [0, 1, 2])


def test_static_params_are_hashable_tuples():
    params = static_params({"dimensions": np.array([0, 2]), "y": 3, "dtype": jnp.float32})
    assert params == (("dimensions", (0, 2)), ("y", 3), ("dtype", jnp.float32))
    hash(params)


# ContractInputs ----------------------------------------------------------------------------

@given(st.integers(1, 3), st.integers(1, 4), st.integers(1, 3), st.integers(1, 4),
       st.permutations(range(3)), st.permutations(range(3)), st.integers(0, 2**32 - 1))
def test_contract_inputs_equals_einsum(heads, seq, kv_seq, proj, perm_q, perm_k, seed):
    rng = np.random.default_rng(seed)
    q_ref = rng.standard_normal((heads, seq, proj)).astype(np.float32)
    k_ref = rng.standard_normal((heads, kv_seq, proj)).astype(np.float32)
    q = build_named_array(q_ref, ["heads", "seq", "projection"], permutation=list(perm_q))
    # The key side arrives with the caller's "seq"; the rename makes it a distinct axis.
    k = build_named_array(k_ref, ["heads", "seq", "projection"], permutation=list(perm_k))
    layer = ContractInputs(("projection",), renames=((), (("seq", "kv_seq"),)))
    out = layer((q, k))
    assert dict(out.named_shape) == {"heads": heads, "seq": seq, "kv_seq": kv_seq}
    expected = np.einsum("hsp,hkp->hsk", q_ref.astype(np.float64), k_ref.astype(np.float64))
    np.testing.assert_allclose(out.unwrap("heads", "seq", "kv_seq"), expected, rtol=1e-5, atol=1e-5)


def test_contract_inputs_probabilities_times_values():
    p_ref = np.arange(6.0, dtype=np.float32).reshape(2, 3)  # (seq, kv_seq)
    v_ref = np.arange(12.0, dtype=np.float32).reshape(3, 4)  # (kv_seq, projection)
    p = nx.wrap(jnp.asarray(p_ref), "seq", "kv_seq")
    v = nx.wrap(jnp.asarray(v_ref), "kv_seq", "projection")
    out = ContractInputs(("kv_seq",))((p, v))
    np.testing.assert_allclose(out.unwrap("seq", "projection"), p_ref @ v_ref, rtol=1e-6)
    # Contracting everything gives a scalar.
    full = ContractInputs(("seq", "kv_seq"))((p, p))
    np.testing.assert_allclose(_values(full), float((p_ref * p_ref).sum()), rtol=1e-6)


# SplitAxis / MergeAxes ----------------------------------------------------------------------

@st.composite
def split_cases(draw):
    first, second = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    others = draw(st.dictionaries(st.sampled_from(["batch", "seq", "kv"]), st.integers(1, 3), max_size=2))
    named = {**others, "flat": first * second}
    order = draw(st.permutations(list(named)))
    case = draw(named_array_cases(dtype="float32", named_shape={n: named[n] for n in order},
                                  max_positional_axes=1))
    return case, first, second


def _move_last(case, name):
    ref = case.reference
    p = ref.ndim - len(case.names)
    axis = p + case.names.index(name)
    rest = [n for n in case.names if n != name]
    return np.moveaxis(ref, axis, -1), rest


@given(split_cases())
def test_split_axis_is_a_major_first_reshape_and_merge_undoes_it(drawn):
    case, first, second = drawn
    split = SplitAxis("flat", "heads", first, "projection")(case.array)
    moved, rest = _move_last(case, "flat")
    expected = moved.reshape(moved.shape[:-1] + (first, second))
    np.testing.assert_array_equal(split.unwrap(*rest, "heads", "projection"), expected)
    merged = MergeAxes("heads", "projection", "flat")(split)
    assert dict(merged.named_shape) == dict(case.array.named_shape)
    np.testing.assert_array_equal(merged.unwrap(*case.names), case.reference)


@given(split_cases(), st.data())
def test_merge_then_split_is_the_identity(drawn, data):
    case, first, second = drawn
    moved, rest = _move_last(case, "flat")
    # An array holding (heads, projection) in a random storage order; "kv" sorts between them, so some
    # draws also take the path where the merged names are not adjacent.
    ref = moved.reshape(moved.shape[:-1] + (first, second))
    names = rest + ["heads", "projection"]
    x = build_named_array(ref, names, permutation=data.draw(st.permutations(range(ref.ndim))))
    merged = MergeAxes("heads", "projection", "flat")(x)
    np.testing.assert_array_equal(merged.unwrap(*rest, "flat"), moved)
    back = SplitAxis("flat", "heads", first, "projection")(merged)
    np.testing.assert_array_equal(back.unwrap(*names), ref)


def test_split_axis_rejects_a_size_that_does_not_divide():
    with pytest.raises(NamedAxisError):
        SplitAxis("projection", "heads", 4, "projection")(nx.ones({"projection": 6}))


# ReduceAxes ---------------------------------------------------------------------------------

REDUCTIONS = {
    "reduce_sum": (np.sum, "float32"),
    "reduce_max": (np.max, "float32"),
    "reduce_min": (np.min, "int32"),
    "reduce_prod": (np.prod, "float32"),
    "reduce_and": (np.all, "bool"),
    "reduce_or": (np.any, "bool"),
}


@st.composite
def reduce_cases(draw, dtype):
    case = draw(named_array_cases(dtype=dtype, min_named_axes=1, max_positional_axes=1))
    axes = draw(st.lists(st.sampled_from(case.names), min_size=1, unique=True))
    return case, tuple(axes)


@given(st.sampled_from(sorted(REDUCTIONS)), st.data())
def test_reduce_axes_equals_numpy_reductions(reduction, data):
    reference, dtype = REDUCTIONS[reduction]
    case, axes = data.draw(reduce_cases(dtype))
    out = ReduceAxes(reduction, axes)(case.array)
    p = case.reference.ndim - len(case.names)
    expected = reference(case.reference, axis=tuple(p + case.names.index(a) for a in axes))
    rest = [n for n in case.names if n not in axes]
    assert set(_named_shape(out)) == set(rest)
    got = _values(out, *rest)
    assert got.dtype == expected.dtype
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def _named_shape(x):
    return dict(x.named_shape) if nx.is_namedarray(x) else {}


@given(st.sampled_from(["argmax", "argmin"]), st.sampled_from([None, jnp.int16]), st.data())
def test_argmax_argmin_take_the_first_extreme_along_the_named_axis(reduction, index_dtype, data):
    # int32 data from -5..5 has ties: numpy and lax both take the first index.
    case, axes = data.draw(reduce_cases("int32"))
    axis = axes[0]
    out = ReduceAxes(reduction, (axis,), index_dtype)(case.array)
    p = case.reference.ndim - len(case.names)
    expected = getattr(np, reduction)(case.reference, axis=p + case.names.index(axis))
    rest = [n for n in case.names if n != axis]
    got = _values(out, *rest)
    assert got.dtype == np.dtype(index_dtype or np.int32)
    np.testing.assert_array_equal(got, expected)


def test_reduce_axes_names_the_missing_axis():
    with pytest.raises(NamedAxisError, match="heads"):
        ReduceAxes("reduce_sum", ("heads",))(nx.ones({"seq": 2}))


# Concatenate ---------------------------------------------------------------------------------

@given(st.lists(st.integers(1, 3), min_size=1, max_size=3), st.dictionaries(
    st.sampled_from(["batch", "width"]), st.integers(1, 3), max_size=2), st.data())
def test_concatenate_equals_numpy_after_ordering_axes(sizes, others, data):
    cases = []
    for size in sizes:
        named = {**others, "channels": size}
        order = data.draw(st.permutations(list(named)))
        cases.append(data.draw(named_array_cases(dtype="float32", named_shape={n: named[n] for n in order},
                                                 positional_shape=())))
    out = Concatenate("channels")(tuple(c.array for c in cases))
    names = [*others, "channels"]
    refs = [np.transpose(c.reference, [c.names.index(n) for n in names]) for c in cases]
    expected = np.concatenate(refs, axis=-1)
    assert dict(out.named_shape) == {**others, "channels": sum(sizes)}
    np.testing.assert_array_equal(out.unwrap(*names), expected)


def test_concatenate_renames_operands_and_treats_a_missing_axis_as_one_slice():
    a = nx.wrap(jnp.array([[1.0, 2.0], [3.0, 4.0]]), "seq", "width")
    b = nx.wrap(jnp.array([[5.0, 6.0]]), "kv_seq", "width")
    joined = Concatenate("seq", renames=((), (("kv_seq", "seq"),)))((a, b))
    np.testing.assert_array_equal(joined.unwrap("seq", "width"), [[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]])
    row = nx.wrap(jnp.array([7.0, 8.0]), "width")  # the unit axis was dropped by tracing
    joined = Concatenate("seq")((a, row))
    np.testing.assert_array_equal(joined.unwrap("seq", "width"), [[1.0, 2.0], [3.0, 4.0], [7.0, 8.0]])


# SliceAxes / SqueezeAxes ------------------------------------------------------------------------

@given(named_array_cases(dtype="int32", min_named_axes=1, max_positional_axes=1), st.data())
def test_slice_axes_equals_numpy_slicing(case, data):
    p = case.reference.ndim - len(case.names)
    slices, index = [], [slice(None)] * case.reference.ndim
    for name in data.draw(st.lists(st.sampled_from(case.names), min_size=1, unique=True)):
        size = case.reference.shape[p + case.names.index(name)]
        start = data.draw(st.integers(0, size - 1))
        stop = data.draw(st.integers(start + 1, size))
        step = data.draw(st.integers(1, 3))
        slices.append((name, start, stop, step))
        index[p + case.names.index(name)] = slice(start, stop, step)
    out = SliceAxes(tuple(slices))(case.array)
    np.testing.assert_array_equal(out.unwrap(*case.names), case.reference[tuple(index)])


def test_slice_axes_can_follow_the_calls_length_of_another_axis():
    table = nx.wrap(jnp.arange(8), "pos")
    layer = SliceAxes((("pos", 1, 3, 1, "seq"),))
    assert layer(table, **{AXIS_SIZES: (("seq", 5),)}).unwrap("pos").tolist() == [1, 2, 3, 4, 5]
    # Without the side input (or the followed axis) the traced bounds hold.
    assert layer(table).unwrap("pos").tolist() == [1, 2]
    assert layer(table, **{AXIS_SIZES: (("batch", 5),)}).unwrap("pos").tolist() == [1, 2]


@given(named_array_cases(dtype="float32", max_named_axes=2, max_positional_axes=1), st.data())
def test_squeeze_axes_removes_unit_axes(case, data):
    names = [*case.names, "one"]
    x = build_named_array(case.reference[..., None], names,
                          permutation=data.draw(st.permutations(range(case.reference.ndim + 1))))
    out = SqueezeAxes(("one",))(x)
    assert dict(out.named_shape) == dict(case.array.named_shape)
    np.testing.assert_array_equal(out.unwrap(*case.names), case.reference)


# AddAxes / Iota ----------------------------------------------------------------------------------

def test_add_axes_broadcasts_over_new_named_axes():
    x = nx.wrap(jnp.array([1.0, 2.0]), "features")
    out = AddAxes((("seq", 3), ("batch", 2)))(x)
    assert dict(out.named_shape) == {"seq": 3, "batch": 2, "features": 2}
    np.testing.assert_array_equal(out.unwrap("batch", "seq", "features"), np.broadcast_to([1.0, 2.0], (2, 3, 2)))
    scalar = AddAxes((("seq", 2),))(jnp.float32(5.0))  # a raw input is wrapped
    np.testing.assert_array_equal(scalar.unwrap("seq"), [5.0, 5.0])


def test_add_axes_reads_input_dependent_sizes_from_axis_sizes():
    x = nx.wrap(jnp.array([1.0, 2.0]), "features")
    layer = AddAxes((("seq", 3), ("kv_seq", 3, "seq"), ("heads", 2)))
    out = layer(x, **{AXIS_SIZES: (("seq", 5), ("heads", 7))})
    # seq and heads follow the call, kv_seq follows its source axis seq.
    assert dict(out.named_shape) == {"seq": 5, "kv_seq": 5, "heads": 7, "features": 2}
    np.testing.assert_array_equal(out.unwrap("seq", "kv_seq", "heads", "features"),
                                  np.broadcast_to([1.0, 2.0], (5, 5, 7, 2)))
    # Without the side input the static sizes hold.
    assert dict(layer(x).named_shape) == {"seq": 3, "kv_seq": 3, "heads": 2, "features": 2}


@given(st.integers(1, 5), st.integers(1, 4), st.sampled_from([jnp.int32, jnp.float32]), st.booleans())
def test_iota_counts_along_its_axis_with_sizes_of_the_call(seq, batch, dtype, pass_sizes):
    layer = Iota("kv_seq", (("batch", 2), ("kv_seq", 3, "seq")), dtype)
    side = {AXIS_SIZES: (("seq", seq), ("batch", batch))} if pass_sizes else {}
    out = layer(nx.wrap(jnp.ones(4), "ignored"), **side)
    seq, batch = (seq, batch) if pass_sizes else (3, 2)
    assert dict(out.named_shape) == {"batch": batch, "kv_seq": seq}
    assert out.dtype == np.dtype(dtype)
    np.testing.assert_array_equal(out.unwrap("kv_seq", "batch"), np.broadcast_to(np.arange(seq)[:, None], (seq, batch)))


def test_iota_under_jit_follows_each_calls_sequence_length():
    layer = Iota("seq", (("seq", 1),), jnp.int32)
    run = jax.jit(lambda sizes: layer(None, axis_sizes=sizes), static_argnums=0)
    assert run((("seq", 2),)).unwrap("seq").tolist() == [0, 1]
    assert run((("seq", 4),)).unwrap("seq").tolist() == [0, 1, 2, 3]


# TakeAlongAxis ------------------------------------------------------------------------------

@given(st.integers(1, 4), st.sampled_from([{}, {"features": 2}, {"features": 3, "heads": 2}]),
       st.sampled_from([{"seq": 3}, {"batch": 2, "seq": 2}]), st.booleans(), st.data())
def test_take_along_axis_equals_numpy_take(vocab, others, id_shape, as_parameter, data):
    named = {"vocabulary": vocab, **others}
    order = data.draw(st.permutations(list(named)))
    table = data.draw(named_array_cases(dtype="float32", named_shape={n: named[n] for n in order},
                                        positional_shape=()))
    ids_ref = np.asarray(data.draw(st.lists(st.integers(0, vocab - 1), min_size=int(np.prod(list(id_shape.values()))),
                                            max_size=int(np.prod(list(id_shape.values()))))),
                         np.int32).reshape(tuple(id_shape.values()))
    ids = build_named_array(ids_ref, list(id_shape), permutation=data.draw(st.permutations(range(ids_ref.ndim))))
    if as_parameter:
        use = ParameterUse(pzb.Parameter(table.array, "embedding"), tuple(table.names), tuple(table.names))
        out = TakeAlongAxis("vocabulary", use)(ids)
    else:
        out = TakeAlongAxis("vocabulary")((table.array, ids))
    moved = np.transpose(table.reference, [table.names.index(n) for n in ["vocabulary", *others]])
    expected = moved[ids_ref]  # (*id axes, *other axes)
    assert dict(out.named_shape) == {**id_shape, **others}
    np.testing.assert_array_equal(out.unwrap(*id_shape, *others), expected)


def test_take_along_axis_clips_out_of_bounds_ids_like_jnp_indexing():
    table = nx.wrap(jnp.array([[1.0, 2.0], [3.0, 4.0]]), "vocabulary", "features")
    ids = nx.wrap(jnp.array([5, -1, 0]), "seq")
    out = TakeAlongAxis("vocabulary", mode="clip")((table, ids))
    # As table[ids] in jnp: 5 clips to the last row, -1 counts from the end.
    np.testing.assert_array_equal(out.unwrap("seq", "features"), [[3.0, 4.0], [3.0, 4.0], [1.0, 2.0]])
