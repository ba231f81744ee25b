"""NNX recurrent cell rules: lifted form, outputs vs NNX, round trips, named batch axes, fallbacks, edits."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st

import pzbridge as pzb
from pzbridge.bridge.nnx.adapter import NnxAdapter
from pzbridge.bridge.nnx.recurrent import NnxCell
from pzbridge.nn.foreign import Foreign
from pzbridge.nn.recurrent import GRUCell, LSTMCell, SimpleCell
from nnx_checks import assert_round_trip


def randomize(module, seed):
    """Every NNX parameter (biases included) random, so bias placement and gate order matter."""
    graphdef, state = nnx.split(module)
    leaves, treedef = jax.tree_util.tree_flatten(state)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    leaves = [jax.random.normal(k, leaf.shape, leaf.dtype) * 0.5 for k, leaf in zip(keys, leaves)]
    return nnx.merge(graphdef, jax.tree_util.tree_unflatten(treedef, leaves))


CASES = {
    "SimpleCell": (lambda: nnx.SimpleCell(3, 4, rngs=nnx.Rngs(0)), SimpleCell, 3),
    "SimpleCell-residual": (lambda: nnx.SimpleCell(3, 4, residual=True, rngs=nnx.Rngs(0)), SimpleCell, 3),
    "GRUCell": (lambda: nnx.GRUCell(3, 4, rngs=nnx.Rngs(0)), GRUCell, 3),
    "GRUCell-activations": (lambda: nnx.GRUCell(3, 4, gate_fn=jax.nn.hard_sigmoid, activation_fn=jax.nn.silu,
                                                rngs=nnx.Rngs(0)), GRUCell, 3),
    "OptimizedLSTMCell": (lambda: nnx.OptimizedLSTMCell(3, 4, rngs=nnx.Rngs(0)), LSTMCell, 3),
    "LSTMCell": (lambda: nnx.LSTMCell(3, 4, rngs=nnx.Rngs(0)), LSTMCell, 12),
    "LSTMCell-activations": (lambda: nnx.LSTMCell(3, 4, gate_fn=jax.nn.hard_sigmoid, activation_fn=jax.nn.relu,
                                                  rngs=nnx.Rngs(0)), LSTMCell, 12),
}


def random_carry(model, batch, seed):
    zeros = model.initialize_carry((*batch, 3), nnx.Rngs(0))
    leaves, treedef = jax.tree_util.tree_flatten(zeros)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return jax.tree_util.tree_unflatten(treedef, [jax.random.normal(k, a.shape) for k, a in zip(keys, leaves)])


def assert_trees_close(got, expected):
    got_leaves, expected_leaves = jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(expected)
    assert jax.tree_util.tree_structure(got) == jax.tree_util.tree_structure(expected)
    for a, b in zip(got_leaves, expected_leaves):
        assert a.shape == b.shape
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("case", sorted(CASES))
def test_nnx_cell_lifts_to_named_cell_and_matches_nnx(case):
    make, cell_type, n_params = CASES[case]
    model = randomize(make(), 7)
    body = pzb.lift(model).body
    assert isinstance(body, NnxCell) and type(body.cell) is cell_type
    assert len(pzb.select(body).at_instances_of(pzb.Parameter).get_sequence()) == n_params
    carry, x = random_carry(model, (2,), 1), jax.random.normal(jax.random.key(2), (2, 3))
    expected = nnx.clone(model)(carry, x)
    assert_trees_close(pzb.lift(model).positional(carry, x), expected)
    assert_round_trip(model)


@settings(max_examples=10)
@given(st.sampled_from(sorted(CASES)), st.lists(st.integers(1, 3), min_size=0, max_size=2), st.integers(0, 99))
def test_nnx_cell_matches_nnx_for_any_batch_shape(case, batch, seed):
    model = randomize(CASES[case][0](), seed)
    carry, x = random_carry(model, tuple(batch), seed + 1), jax.random.normal(jax.random.key(seed), (*batch, 3))
    assert_trees_close(pzb.lift(model).positional(carry, x), nnx.clone(model)(carry, x))


@pytest.mark.parametrize("case", ["SimpleCell", "GRUCell", "LSTMCell", "OptimizedLSTMCell"])
def test_nnx_cell_passes_extra_named_batch_axes_through(case):
    model = randomize(CASES[case][0](), 3)
    carry, x = random_carry(model, (2, 5), 4), jax.random.normal(jax.random.key(5), (2, 5, 3))
    names = ("batch", "seq")
    named_carry = jax.tree_util.tree_map(lambda a: pzb.nx.wrap(a, *names, "features"), carry)
    new_carry, y = pzb.lift(model).body((named_carry, pzb.nx.wrap(x, *names, "features")))
    assert set(y.named_shape) == {"batch", "seq", "features"} and not y.positional_shape
    unwrapped = jax.tree_util.tree_map(lambda a: a.unwrap(*names, "features"), (new_carry, y),
                                       is_leaf=pzb.nx.is_namedarray)
    assert_trees_close(unwrapped, model(carry, x))


def test_lift_leaves_the_nnx_cell_untouched_and_shares_buffers():
    model = nnx.LSTMCell(3, 4, rngs=nnx.Rngs(0))
    before = model.hi.kernel.get_raw_value()
    cell = pzb.lift(model).body.cell
    assert cell.recurrent_weights[0].value.data_array is before
    assert model.hi.kernel.get_raw_value() is before
    gru = nnx.GRUCell(3, 4, rngs=nnx.Rngs(0))
    assert pzb.lift(gru).body.cell.input_weights.value.data_array is gru.dense_i.kernel.get_raw_value()


def test_cells_with_non_default_numerics_stay_foreign_and_exact():
    for model in (nnx.GRUCell(3, 4, dtype=jnp.bfloat16, rngs=nnx.Rngs(0)),
                  nnx.SimpleCell(3, 4, param_dtype=jnp.float32, dtype=jnp.float16, rngs=nnx.Rngs(0))):
        assert isinstance(pzb.lift(model).body, Foreign)
        assert_round_trip(model)
        carry, x = random_carry(model, (2,), 0), jnp.ones((2, 3))
        got = pzb.lower(pzb.lift(model))(carry, x)
        assert_trees_close(got, model(carry, x))


def test_edited_activation_lowers_to_the_native_nnx_cell_with_that_activation():
    model = randomize(nnx.GRUCell(3, 4, rngs=nnx.Rngs(0)), 1)
    lifted = pzb.lift(model)
    edited = pzb.select(lifted).at_instances_of(GRUCell).apply(lambda c: dataclasses.replace(c, activation_fn=jax.nn.relu))
    lowered = pzb.lower(edited)
    assert type(lowered) is nnx.GRUCell and lowered.activation_fn is jax.nn.relu
    reference = nnx.clone(model)
    reference.activation_fn = jax.nn.relu
    carry, x = random_carry(model, (2,), 0), jax.random.normal(jax.random.key(1), (2, 3))
    assert_trees_close(lowered(carry, x), reference(carry, x))


def test_edit_nnx_cannot_express_lowers_to_adapter_with_the_cell_convention():
    model = randomize(nnx.GRUCell(3, 4, rngs=nnx.Rngs(0)), 1)
    edited = pzb.select(pzb.lift(model)).at_instances_of(GRUCell).apply(
        lambda c: dataclasses.replace(c, update="difference"))
    lowered = pzb.lower(edited)
    assert isinstance(lowered, NnxAdapter)
    h, x = random_carry(model, (2,), 0), jax.random.normal(jax.random.key(1), (2, 3))
    # Pure-jax GRU with Equinox's update n + z * (h - n) (mathematically equal to NNX's interpolation).
    wi, wh, b = model.dense_i.kernel[...], model.dense_h.kernel[...], model.dense_i.bias[...]
    xr, xz, xn = jnp.split(x @ wi + b, 3, axis=-1)
    hr, hz, hn = jnp.split(h @ wh, 3, axis=-1)
    r, z = jax.nn.sigmoid(xr + hr), jax.nn.sigmoid(xz + hz)
    n = jnp.tanh(xn + r * hn)
    expected = n + z * (h - n)
    new_h, y = lowered(h, x)
    np.testing.assert_allclose(np.asarray(y), np.asarray(expected), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(new_h), np.asarray(expected), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("reverse,return_carry", [(False, False), (True, True)])
def test_nnx_rnn_stays_foreign_with_its_cell_lifted_and_exact(reverse, return_carry):
    model = nnx.RNN(randomize(nnx.LSTMCell(3, 4, rngs=nnx.Rngs(0)), 2), reverse=reverse, return_carry=return_carry)
    lifted = pzb.lift(model)
    assert isinstance(lifted.body, Foreign)
    assert len(pzb.select(lifted).at_instances_of(NnxCell).get_sequence()) == 1
    assert len(pzb.select(lifted).at_instances_of(pzb.Parameter).get_sequence()) == 12
    xs = jax.random.normal(jax.random.key(0), (2, 5, 3))
    assert_trees_close(pzb.lower(lifted)(xs), nnx.clone(model)(xs))
    assert_trees_close(lifted.positional(xs), nnx.clone(model)(xs))
    assert_round_trip(model)


def test_nnx_bidirectional_stays_foreign_with_both_cells_lifted_and_exact():
    model = nnx.Bidirectional(nnx.RNN(randomize(nnx.GRUCell(3, 4, rngs=nnx.Rngs(0)), 1)),
                              nnx.RNN(randomize(nnx.GRUCell(3, 4, rngs=nnx.Rngs(1)), 2)))
    lifted = pzb.lift(model)
    assert isinstance(lifted.body, Foreign)
    assert len(pzb.select(lifted).at_instances_of(NnxCell).get_sequence()) == 2
    xs = jax.random.normal(jax.random.key(0), (2, 5, 3))
    assert_trees_close(lifted.positional(xs), nnx.clone(model)(xs))
    assert_round_trip(model)
