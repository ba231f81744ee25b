"""The optax trainer on lifted models, the step builder, and the Checkpointed combinator."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import pzbridge as pzb
from pzbridge.nn.linear import Affine, Linear
from pzbridge.toolshed.lora import loraify_linears_in_selection
from pzbridge.toolshed.training import Checkpointed, Trainer, TrainingError, build_train_step, lora_trainable


def _regression():
    x = jax.random.normal(jax.random.key(0), (16, 3))
    y = x @ jnp.array([[1.0], [-2.0], [0.5]]) + 0.3
    return pzb.nx.wrap(x, "batch", "features"), pzb.nx.wrap(y, "batch", "features")


def _mse(model, x, y):
    return jnp.mean((model(x) - y).unwrap("batch", "features") ** 2)


def test_trainer_matches_hand_written_sgd_in_pure_jax():
    model = Affine.from_config("dense", jax.random.key(1), {"features": 3}, {"features": 1})
    w0 = model.sublayers[0].weights.value.unwrap("features", "features_out")
    b0 = model.sublayers[1].bias.value.unwrap("features")
    x, y = _regression()
    trainer = Trainer(model, _mse, optax.sgd(0.1))
    losses = trainer.fit([(x, y)] * 5, log_every=0).losses

    def loss(params):
        w, b = params
        return jnp.mean((x.unwrap("batch", "features") @ w + b - y.unwrap("batch", "features")) ** 2)

    params, reference_losses = (w0, b0), []
    for _ in range(5):
        value, grads = jax.value_and_grad(loss)(params)
        reference_losses.append(float(value))
        params = jax.tree_util.tree_map(lambda p, g: p - 0.1 * g, params, grads)
    np.testing.assert_allclose(losses, reference_losses, rtol=1e-5)
    np.testing.assert_allclose(model.sublayers[0].weights.value.unwrap("features", "features_out"), params[0],
                               rtol=1e-5, atol=1e-6)
    assert trainer.step_count == 5


def test_lora_only_training_keeps_base_weights_bitwise():
    model = Affine.from_config("dense", jax.random.key(1), {"features": 3}, {"features": 1})
    base = np.asarray(model.sublayers[0].weights.value.data_array)
    adapted = loraify_linears_in_selection(pzb.select(model).at_instances_of(Linear), 2, jax.random.key(2))
    x, y = _regression()
    losses = Trainer(adapted, _mse, optax.adam(5e-2), trainable=lora_trainable).fit([(x, y)] * 20, log_every=0).losses
    assert losses[-1] < losses[0]
    assert np.array_equal(np.asarray(adapted.sublayers[0].base.weights.value.data_array), base)
    assert np.any(np.asarray(adapted.sublayers[0].lora_b.value.data_array) != 0)


def test_state_variables_assigned_in_the_loss_are_written_back():
    counter = pzb.StateVariable(jnp.int32(0), "count")
    w = pzb.Parameter(jnp.float32(1.0), "w")

    def loss_fn(model):
        model["count"].value = model["count"].value + 1
        return model["w"].value ** 2

    trainer = Trainer({"w": w, "count": counter}, loss_fn, optax.sgd(0.1))
    trainer.fit([()] * 3, log_every=0)
    assert int(counter.value) == 3


def test_step_without_trainable_parameters_raises():
    step = build_train_step(lambda m: m.value, optax.sgd(0.1), trainable=lambda v: False)
    with pytest.raises(TrainingError, match="no trainable Parameter"):
        step(pzb.Parameter(jnp.float32(1.0), "w"), ())


def test_diverging_loss_raises_naming_the_step():
    trainer = Trainer(pzb.Parameter(jnp.float32(1.0), "w"), lambda m: jnp.log(-m.value - 1.0), optax.sgd(0.1))
    with pytest.raises(TrainingError, match="step 1"):
        trainer.fit([()], log_every=0)


def test_checkpointed_gives_same_values_and_gradients_and_uses_remat():
    layer = pzb.nn.Sequential([
        Linear.from_config("a", jax.random.key(0), {"features": 3}, {"features": 4}),
        pzb.nn.Elementwise(jnp.tanh),
        Linear.from_config("b", jax.random.key(1), {"features": 4}, {"features": 2}),
    ])
    x = pzb.nx.wrap(jax.random.normal(jax.random.key(2), (5, 3)), "batch", "features")
    slots, values = pzb.unbind_params(pzb.nn.Sequential([Checkpointed(layer)]), freeze=True)
    plain_slots, plain_values = pzb.unbind_params(layer, freeze=True)

    def loss(s, vs):
        return jnp.sum(pzb.stateless_call(s, vs, x)[0].unwrap("batch", "features") ** 2)

    np.testing.assert_allclose(loss(slots, values), loss(plain_slots, plain_values), rtol=1e-6)
    g_ckpt = jax.grad(lambda vs: loss(slots, vs))(values)
    g_plain = jax.grad(lambda vs: loss(plain_slots, vs))(plain_values)
    for a, b in zip(g_ckpt, g_plain):
        np.testing.assert_allclose(a.value.data_array, b.value.data_array, rtol=1e-5, atol=1e-6)
    jaxpr = str(jax.make_jaxpr(jax.grad(lambda vs: loss(slots, vs)))(values))
    assert "remat" in jaxpr or "checkpoint" in jaxpr
