"""NNX models whose examples interact, converted to Equinox: called under ``jax.vmap(..., axis_name="batch")``.

An NNX module computes on a batch; an Equinox model on one example. Where
the examples meet (``nnx.BatchNorm`` in training mode normalises by the
batch's statistics and writes running statistics; ``nnx.MultiHeadAttention``
on a 2-D input attends along the batch axis), the converted model sees the
whole batch under a ``vmap`` naming ``"batch"`` (Equinox's own BatchNorm
convention) and refuses any other call. References are the NNX modules, run
on clones.
"""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st

from pzbridge.bridge.convert import convert
from pzbridge.bridge.equinox.adapter import EquinoxAdapter
from pzbridge.core.errors import LowerError

TOL = {"atol": 1e-5, "rtol": 1e-5}


def _named_vmap(model: object) -> object:
    return jax.vmap(model, axis_name="batch", in_axes=(0, None), out_axes=(0, None))


def _normed(width: int, momentum: float, seed: int) -> nnx.Module:
    rngs = nnx.Rngs(seed)
    return nnx.Sequential(nnx.Linear(width, width, rngs=rngs), nnx.BatchNorm(width, momentum=momentum, rngs=rngs),
                          jax.nn.relu)


@settings(max_examples=8, derandomize=True, deadline=None)
@given(width=st.integers(2, 4), batch=st.integers(2, 5), momentum=st.sampled_from([0.0, 0.5, 0.9, 0.99]),
       calls=st.integers(1, 3), seed=st.integers(0, 9))
def test_batch_norm_in_training_mode_normalises_by_the_batch_and_keeps_statistics_in_the_state(width, batch,
                                                                                              momentum, calls, seed):
    model = _normed(width, momentum, seed)
    x = jax.random.normal(jax.random.key(seed), (batch, width))
    converted = convert(model, x, to="equinox")
    assert isinstance(converted, EquinoxAdapter) and converted.needs_batch_axis and converted.is_stateful()
    assert sorted(v.label for v in converted.written) == ["layers.1.mean", "layers.1.var"]
    state = eqx.nn.State(converted)
    step = eqx.filter_jit(lambda m, *a: _named_vmap(m)(*a))
    reference = nnx.clone(model)
    for i in range(calls):
        y, state = step(converted, x + i, state)
        np.testing.assert_allclose(y, reference(x + i), **TOL)
    entry = state.get(converted.state_index)
    np.testing.assert_allclose(entry["layers.1.mean"], reference.layers[1].mean[...], **TOL)
    np.testing.assert_allclose(entry["layers.1.var"], reference.layers[1].var[...], **TOL)

    back = convert(converted, x[0], to="nnx", state=state)
    assert nnx.graphdef(back) == nnx.graphdef(model)
    np.testing.assert_allclose(back.layers[1].mean[...], reference.layers[1].mean[...], **TOL)
    np.testing.assert_allclose(back(x), reference(x), **TOL)
    assert float(jnp.abs(model.layers[1].mean[...]).max()) == 0.0  # the user's model never ran


def test_a_batch_coupled_model_refuses_calls_that_do_not_see_the_batch():
    model = _normed(3, 0.9, 0)
    x = jax.random.normal(jax.random.key(1), (4, 3))
    converted = convert(model, x, to="equinox")
    state = eqx.nn.State(converted)
    with pytest.raises(LowerError, match="mixes the examples of a batch.*axis_name='batch'.*Fix"):
        jax.vmap(converted, in_axes=(0, None), out_axes=(0, None))(x, state)
    with pytest.raises(LowerError, match="mixes the examples of a batch.*Fix"):
        converted(x[0], state)


class Centred(nnx.Module):
    """A custom block centring by an EMA of the batch mean that its own code writes (traced, not a stock layer)."""

    def __init__(self, width: int, seed: int) -> None:
        self.linear = nnx.Linear(width, width, rngs=nnx.Rngs(seed))
        self.mean = nnx.BatchStat(jnp.zeros(width))

    def __call__(self, x: jax.Array) -> jax.Array:
        h = self.linear(x)
        self.mean[...] = 0.9 * self.mean[...] + 0.1 * h.mean(axis=0)
        return jnp.tanh(h - self.mean[...])


@pytest.mark.parametrize(("make", "statistic"), [
    (lambda: _normed(3, 0.9, 2), "layers.1.var"),
    (lambda: Centred(3, 2), "mean"),
])
def test_training_updates_parameters_by_gradients_and_statistics_as_nnx_does(make, statistic):
    model = make()
    x, target = jax.random.normal(jax.random.key(3), (8, 3)), jax.random.normal(jax.random.key(4), (8, 3))
    converted = convert(model, x, to="equinox")
    state = eqx.nn.State(converted)
    optimizer = optax.sgd(0.05)
    opt_state = optimizer.init(eqx.filter(converted, eqx.is_inexact_array))

    @eqx.filter_jit
    def train_step(model, state, opt_state):
        def loss_fn(model):
            y, new_state = _named_vmap(model)(x, state)
            return jnp.mean((y - target) ** 2), new_state

        (loss, state), grads = eqx.filter_value_and_grad(loss_fn, has_aux=True)(model)
        updates, opt_state = optimizer.update(grads, opt_state, model)
        return eqx.apply_updates(model, updates), state, opt_state, loss

    reference = nnx.clone(model)
    nnx_optimizer = nnx.Optimizer(reference, optax.sgd(0.05), wrt=nnx.Param)

    @nnx.jit
    def nnx_step(model, optimizer):
        loss, grads = nnx.value_and_grad(lambda m: jnp.mean((m(x) - target) ** 2))(model)
        optimizer.update(model, grads)
        return loss

    losses = []
    for _ in range(20):
        converted, state, opt_state, loss = train_step(converted, state, opt_state)
        losses.append(float(loss))
        np.testing.assert_allclose(loss, nnx_step(reference, nnx_optimizer), rtol=1e-4, atol=1e-5)
    assert losses[-1] < losses[0]
    want = dict(nnx.to_flat_state(nnx.state(reference, nnx.BatchStat)))
    want = {".".join(map(str, path)): variable[...] for path, variable in want.items()}
    got = state.get(converted.state_index)[statistic]
    np.testing.assert_allclose(got, want[statistic], rtol=1e-4, atol=1e-5)


def test_in_inference_mode_batch_norm_converts_stateless_and_its_statistics_do_not_train():
    model = _normed(3, 0.9, 5)
    model.eval()
    x = jax.random.normal(jax.random.key(6), (4, 3))
    converted = convert(model, x, to="equinox")
    assert not converted.is_stateful() and not converted.needs_batch_axis
    np.testing.assert_allclose(jax.vmap(converted)(x), model(x), **TOL)
    grads = eqx.filter_grad(lambda m: jnp.sum(jax.vmap(m)(x) ** 2))(converted)
    statistics = [v for v in grads.values if v.label.endswith(("mean", "var"))]
    assert len(statistics) == 2 and all(float(jnp.abs(v.value.data_array).max()) == 0.0 for v in statistics)


def test_nnx_attention_along_the_batch_axis_converts_to_a_model_called_under_a_named_vmap():
    # NNX reads a 2-D input's leading axis as the sequence: every example attends to the others.
    model = nnx.MultiHeadAttention(2, 4, qkv_features=4, decode=False, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), (5, 4))
    converted = convert(model, x, to="equinox")
    assert converted.needs_batch_axis and not converted.is_stateful()
    np.testing.assert_allclose(jax.vmap(converted, axis_name="batch")(x), model(x), **TOL)
    np.testing.assert_allclose(jax.jit(jax.vmap(converted, axis_name="batch"))(x), model(x), **TOL)
    with pytest.raises(LowerError, match="mixes the examples of a batch.*Fix"):
        jax.vmap(converted)(x)
    back = convert(converted, x[0], to="nnx")
    assert type(back) is nnx.MultiHeadAttention
    np.testing.assert_allclose(back(x), model(x), **TOL)
