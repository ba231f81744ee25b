"""Tests for pzbridge/nn/dataflow.py: branches, picks, side inputs, child calls and the Traced root."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from pzbridge.core import named_axes as nx
from pzbridge.core.errors import NamedAxisError
from pzbridge.core.struct import pytree_dataclass
from pzbridge.nn.basic import Elementwise
from pzbridge.nn.combinators import Identity, Sequential
from pzbridge.nn.dataflow import Branch, CallChild, Pick, SideInput, Traced
from pzbridge.nn.layer import Layer
from pzbridge.nn.named_ops import AXIS_SIZES, Iota


@pytree_dataclass
class Echo(Layer):
    """Returns its input and the side inputs it received."""

    def __call__(self, x, /, **side_inputs):
        return x, dict(side_inputs)


@pytree_dataclass
class AddSide(Layer):
    """``x + side_inputs[name]`` for every side input (order-independent)."""

    def __call__(self, x, /, **side_inputs):
        for value in side_inputs.values():
            x = x + value
        return x


# Branch / Pick ----------------------------------------------------------------------------

def test_branch_runs_every_branch_on_the_same_input_and_side_inputs():
    x = nx.wrap(jnp.array([1.0, -2.0]), "features")
    out = Branch([Echo(), Elementwise(jnp.negative), AddSide()])(x, offset=10.0)
    assert isinstance(out, tuple) and len(out) == 3
    (echoed, side), negated, shifted = out
    assert echoed is x and side == {"offset": 10.0}
    np.testing.assert_array_equal(negated.unwrap("features"), [-1.0, 2.0])
    np.testing.assert_array_equal(shifted.unwrap("features"), [11.0, 8.0])
    assert Branch([])(x) == ()


@given(st.lists(st.integers(-100, 100), min_size=1, max_size=6), st.data())
def test_pick_returns_the_indexed_element(values, data):
    index = data.draw(st.integers(-len(values), len(values) - 1))
    assert Pick(index)(tuple(values)) == values[index]


def test_branch_then_pick_selects_one_path():
    model = Sequential([Branch([Elementwise(jnp.exp), Identity(), Elementwise(jnp.negative)]), Pick(2)])
    x = nx.wrap(jnp.array([0.5, 3.0]), "seq")
    np.testing.assert_array_equal(model(x).unwrap("seq"), [-0.5, -3.0])


# SideInput --------------------------------------------------------------------------------

def test_side_input_returns_the_named_argument_and_ignores_x():
    mask = nx.wrap(jnp.array([True, False]), "seq")
    assert SideInput("mask")(nx.wrap(jnp.zeros(3), "features"), mask=mask, positions=1) is mask


def test_missing_side_input_error_names_it_and_what_was_passed():
    with pytest.raises(NamedAxisError) as info:
        SideInput("mask")(None, positions=1, key=2, **{AXIS_SIZES: (("seq", 3),)})
    message = str(info.value)
    assert "'mask'" in message
    assert "['key', 'positions']" in message
    assert AXIS_SIZES not in message  # the bookkeeping side input is not the user's argument
    assert "mask=..." in message
    assert isinstance(info.value, ValueError)


# CallChild --------------------------------------------------------------------------------

def test_call_child_passes_a_single_argument_directly_and_no_outer_side_inputs():
    x = nx.wrap(jnp.ones(2), "features")
    out, side = CallChild(Echo(), name="hook")(x, mask=1, **{AXIS_SIZES: (("features", 2),)})
    # The child sees exactly the side inputs of the original call: none here.
    assert out is x and side == {}


def test_call_child_splits_data_and_keyword_arrays_and_adds_static_keywords():
    x = nx.wrap(jnp.arange(3.0), "seq")
    mask = nx.wrap(jnp.array([True, True, False]), "seq")
    call = CallChild(Echo(), 1, ("mask",), (("deterministic", True),), name="attn")
    out, side = call((x, mask), outer=5)
    assert out is x
    assert side.keys() == {"mask", "deterministic"}
    assert side["mask"] is mask and side["deterministic"] is True


def test_call_child_with_two_positional_inputs_passes_a_tuple():
    a, b = nx.wrap(jnp.ones(2), "seq"), nx.wrap(jnp.zeros(3), "kv_seq")
    (data, side) = CallChild(Echo(), 2, ("bias",))((a, b, 7.0))
    assert data == (a, b) and side == {"bias": 7.0}


def test_call_child_renames_arguments_per_position_and_the_result():
    x = nx.wrap(jnp.arange(6.0).reshape(2, 3), "seq", "embedding")
    memory = {"k": nx.wrap(jnp.ones((4, 3)), "seq", "embedding"), "step": 3}
    call = CallChild(
        Echo(),
        1,
        ("memory",),
        in_renames=((("embedding", "features"),), (("seq", "kv_seq"), ("absent", "other"))),
        out_renames=(("features", "channels"),),
    )
    out, side = call((x, memory))
    # The result (a tuple tree holding the renamed input and the side dict) is renamed throughout.
    assert dict(out.named_shape) == {"seq": 2, "channels": 3}
    np.testing.assert_array_equal(out.unwrap("seq", "channels"), np.arange(6.0).reshape(2, 3))
    # Side input renames reach named leaves of a pytree; other leaves are untouched.
    assert dict(side["memory"]["k"].named_shape) == {"kv_seq": 4, "embedding": 3}
    assert side["memory"]["step"] == 3


def test_call_child_runs_a_real_layer_with_the_calls_keywords():
    x = nx.wrap(jnp.array([1.0, 2.0]), "features")
    call = CallChild(AddSide(), 1, ("bias",), (("offset", 100.0),))
    # AddSide adds every side input it receives: exactly bias and offset, not the outer extra.
    np.testing.assert_array_equal(call((x, 0.5), extra=1e6).unwrap("features"), [101.5, 102.5])


# Traced -----------------------------------------------------------------------------------

def test_traced_passes_the_inputs_axis_sizes_and_other_side_inputs():
    x = nx.wrap(jnp.ones((2, 3)), "seq", "features")
    y = {"kv": nx.wrap(jnp.ones(5), "kv_seq"), "raw": jnp.ones(4)}
    (got, side) = Traced(Echo(), None)((x, y), mask=1)
    assert got[0] is x
    assert side["mask"] == 1
    assert dict(side[AXIS_SIZES]) == {"seq": 2, "features": 3, "kv_seq": 5}
    (_, side) = Traced(Echo(), None)(jnp.ones(3))
    assert dict(side[AXIS_SIZES]) == {}


@given(st.integers(1, 6), st.integers(1, 3))
def test_traced_iota_follows_each_calls_sequence_length(seq, batch):
    traced = Traced(Iota("seq", (("seq", 2),), jnp.int32), None)
    out = traced(nx.wrap(jnp.zeros((batch, seq)), "batch", "seq"))
    np.testing.assert_array_equal(out.unwrap("seq"), np.arange(seq))


def test_traced_under_jit_reads_sizes_at_trace_time_per_shape():
    body = Sequential([Branch([Identity(), Iota("seq", (("seq", 1),), jnp.float32)]), Pick(1)])
    traced = jax.jit(Traced(body, None).__call__)
    assert traced(nx.wrap(jnp.zeros(3), "seq")).unwrap("seq").tolist() == [0.0, 1.0, 2.0]
    assert traced(nx.wrap(jnp.zeros(5), "seq")).unwrap("seq").tolist() == [0.0, 1.0, 2.0, 3.0, 4.0]


def test_traced_side_inputs_reach_a_side_input_layer():
    body = Sequential([Branch([Identity(), SideInput("mask")]), Pick(1)])
    assert Traced(body, None)(nx.wrap(jnp.zeros(2), "seq"), mask="m") == "m"
    with pytest.raises(NamedAxisError, match="'mask'"):
        Traced(body, None)(nx.wrap(jnp.zeros(2), "seq"))
