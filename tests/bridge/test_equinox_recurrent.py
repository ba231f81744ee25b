"""Equinox GRUCell / LSTMCell rules: exact round trip, same buffers, original outputs, batch axis vs vmap."""

from __future__ import annotations

import dataclasses

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import pzbridge as pzb
from pzbridge.bridge.equinox.adapter import EquinoxAdapter
from pzbridge.bridge.equinox.recurrent import EqxCell
from pzbridge.core import named_axes as nx
from pzbridge.core.errors import NamedAxisError
from pzbridge.nn.recurrent import GRUCell, LSTMCell
from pzbridge.testing.equinox_strategies import assert_outputs_close, assert_round_trip, assert_same_buffers
from pzbridge.testing.numerics import assert_outputs_match

KEY = jax.random.key(3)


def _inputs(n_in: int, hidden: int, lstm: bool, seed: int = 0):
    k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
    x = jax.random.normal(k1, (n_in,))
    h = jax.random.normal(k2, (hidden,))
    return (x, (h, jax.random.normal(k3, (hidden,)))) if lstm else (x, h)


def _cell(lstm: bool, n_in: int, hidden: int, use_bias: bool, seed: int = 1):
    cls = eqx.nn.LSTMCell if lstm else eqx.nn.GRUCell
    return cls(n_in, hidden, use_bias=use_bias, key=jax.random.key(seed))


@pytest.mark.parametrize("lstm", [False, True], ids=["gru", "lstm"])
@pytest.mark.parametrize("use_bias", [True, False], ids=["bias", "nobias"])
def test_cell_round_trips_exactly_and_computes_the_original_under_jit(lstm, use_bias):
    cell = _cell(lstm, 3, 5, use_bias)
    lifted = pzb.lift(cell)
    assert type(lifted.body) is EqxCell
    assert isinstance(lifted.body.cell, LSTMCell if lstm else GRUCell)
    assert_same_buffers(cell, lifted)
    assert_round_trip(cell, pzb.lower(lifted))
    x, h = _inputs(3, 5, lstm)
    want = eqx.filter_jit(lambda m, a, b: m(a, b))(cell, x, h)
    got = eqx.filter_jit(lambda m, a, b: m.positional(a, b))(lifted, x, h)
    assert jax.tree_util.tree_structure(want) == jax.tree_util.tree_structure(got)
    # Named-axis contractions: not Equinox's jaxpr, so within a few ulps rather than bitwise on every CPU.
    assert_outputs_match(got, want, same_computation=False)


@given(st.integers(1, 4), st.integers(1, 4), st.booleans(), st.booleans(), st.integers(0, 100))
def test_cell_with_named_batch_axis_matches_vmap_of_original(n_in, hidden, lstm, use_bias, seed):
    cell = _cell(lstm, n_in, hidden, use_bias, seed)
    lifted = pzb.lift(cell)
    xs = jax.random.normal(jax.random.key(seed), (2, n_in))
    hs = jax.random.normal(jax.random.key(seed + 1), (2, hidden))
    carry = (hs, hs * 0.5) if lstm else hs
    want = jax.vmap(cell)(xs, carry)
    named_carry = jax.tree_util.tree_map(lambda a: nx.wrap(a, "batch", "features"), carry)
    out = lifted.body((nx.wrap(xs, "batch", "features"), named_carry))
    got = jax.tree_util.tree_map(lambda a: a.unwrap("batch", "features"), out, is_leaf=nx.is_namedarray)
    assert_outputs_close(want, got, rtol=1e-6)


def test_gru_parameters_are_named_gates_and_features_with_bias_n_as_recurrent_bias():
    cell = _cell(False, 3, 4, True)
    inner = pzb.lift(cell).body.cell
    assert dict(inner.input_weights.value.named_shape) == {"gates": 12, "features": 3}
    assert dict(inner.recurrent_weights.value.named_shape) == {"gates": 12, "features": 4}
    assert dict(inner.input_bias.value.named_shape) == {"gates": 12}
    assert inner.recurrent_bias.value.data_array is cell.bias_n
    assert inner.update == "difference"
    assert inner.recurrent_bias.label == "bias_n"


def test_lstm_cell_keeps_equinox_carry_order_and_bias_placement():
    inner = pzb.lift(_cell(True, 2, 3, True)).body.cell
    assert inner.carry_order == ("h", "c") and inner.bias_placement == "sum"


def test_inner_cell_runs_under_scan_over_a_sequence_like_equinox_scan():
    cell = _cell(False, 3, 4, True)
    xs = jax.random.normal(KEY, (6, 3))
    h0 = jnp.zeros(4)
    want, _ = jax.lax.scan(lambda h, x: (cell(x, h), None), h0, xs)
    inner = pzb.lift(cell).body.cell

    def step(h, x):
        new_h, _ = inner((nx.wrap(h, "features"), nx.wrap(x, "features")))
        return new_h.unwrap("features"), None

    got, _ = jax.lax.scan(step, h0, xs)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


def test_edited_gru_with_interpolate_update_lowers_to_an_adapter_called_like_the_original():
    cell = _cell(False, 3, 4, True)
    lifted = pzb.lift(cell)
    edited = dataclasses.replace(lifted, body=EqxCell(dataclasses.replace(lifted.body.cell, update="interpolate")))
    lowered = pzb.lower(edited)
    assert isinstance(lowered, EquinoxAdapter)
    x, h = _inputs(3, 4, False)
    # Reference: the same GRU with the interpolating update, in plain jax.
    ig = jnp.split(cell.weight_ih @ x + cell.bias, 3)
    hg = jnp.split(cell.weight_hh @ h, 3)
    r, z = jax.nn.sigmoid(ig[0] + hg[0]), jax.nn.sigmoid(ig[1] + hg[1])
    n = jnp.tanh(ig[2] + r * (hg[2] + cell.bias_n))
    np.testing.assert_allclose(lowered(x, h), (1 - z) * n + z * h, rtol=1e-6, atol=1e-6)


def test_edited_lstm_lowers_to_an_adapter_taking_and_returning_the_h_c_tuple():
    cell = _cell(True, 3, 4, True)
    lifted = pzb.lift(cell)
    edited = dataclasses.replace(lifted, body=EqxCell(dataclasses.replace(lifted.body.cell, activation_fn=jax.nn.relu)))
    lowered = pzb.lower(edited)
    assert isinstance(lowered, EquinoxAdapter)
    x, (h, c) = _inputs(3, 4, True)
    lin = cell.weight_ih @ x + cell.weight_hh @ h + cell.bias
    i, f, g, o = jnp.split(lin, 4)
    new_c = jax.nn.sigmoid(f) * c + jax.nn.sigmoid(i) * jax.nn.relu(g)
    new_h = jax.nn.sigmoid(o) * jax.nn.relu(new_c)
    got_h, got_c = lowered(x, (h, c))
    np.testing.assert_allclose(got_h, new_h, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(got_c, new_c, rtol=1e-6, atol=1e-6)


def test_cell_inside_a_user_module_lowers_back_to_the_original_class():
    class Wrapper(eqx.Module):
        cell: eqx.nn.GRUCell

        def __call__(self, x, h):
            return self.cell(x, h)

    model = Wrapper(_cell(False, 2, 3, True))
    lifted = pzb.lift(model)
    assert type(lifted.body.children["cell"]) is EqxCell
    assert_round_trip(model, pzb.lower(lifted))


def test_lifted_cell_called_on_one_array_names_the_expected_pair():
    with pytest.raises(NamedAxisError, match="pair"):
        pzb.lift(_cell(False, 2, 3, True)).body(nx.ones({"features": 2}))
