"""Training loops the conversion tests share: a classifier trained in NNX, and one threading an eqx.nn.State.

Both are what a user's training code does with a converted model:
``nnx.Optimizer`` + ``nnx.value_and_grad`` under ``nnx.jit``, and
``eqx.filter_value_and_grad`` + optax under ``eqx.filter_jit`` with the State
threaded through Equinox's named ``vmap`` (:func:`~pzbridge.testing.stateful_equinox.run_batch`).
"""

from __future__ import annotations

from typing import Any

import equinox as eqx
import jax
import optax
from flax import nnx

from pzbridge.testing.stateful_equinox import run_batch


def nnx_classifier_losses(module: Any, xs: jax.Array, labels: jax.Array, steps: int) -> list[float]:
    """Trains ``module`` (called on the batch ``xs``) with adam on softmax cross-entropy; the loss per step."""
    optimizer = nnx.Optimizer(module, optax.adam(1e-2), wrt=nnx.Param)

    @nnx.jit
    def step(model: Any, opt: Any) -> jax.Array:
        def loss(m: Any) -> jax.Array:
            return optax.softmax_cross_entropy_with_integer_labels(m(xs), labels).mean()

        value, grads = nnx.value_and_grad(loss)(model)
        opt.update(model, grads)
        return value

    return [float(step(module, optimizer)) for _ in range(steps)]


def equinox_classifier_run(module: Any, state: eqx.nn.State, xs: jax.Array, labels: jax.Array,
                           steps: int) -> tuple[Any, eqx.nn.State, list[float]]:
    """Trains a stateful Equinox ``module`` on ``xs`` under the named vmap; the trained module, State, losses."""
    optimizer = optax.adam(1e-2)
    opt_state = optimizer.init(eqx.filter(module, eqx.is_inexact_array))

    @eqx.filter_jit
    def step(model: Any, st: Any, opt: Any) -> tuple[Any, Any, Any, jax.Array]:
        def loss(m: Any) -> tuple[jax.Array, Any]:
            logits, new = run_batch(m, xs, st)
            return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean(), new

        (value, new), grads = eqx.filter_value_and_grad(loss, has_aux=True)(model)
        updates, opt = optimizer.update(grads, opt, eqx.filter(model, eqx.is_inexact_array))
        return eqx.apply_updates(model, updates), new, opt, value

    losses = []
    for _ in range(steps):
        module, state, opt_state, value = step(module, state, opt_state)
        losses.append(float(value))
    return module, state, losses


def equinox_plain_classifier_run(module: Any, xs: jax.Array, labels: jax.Array,
                                 steps: int) -> tuple[Any, list[float]]:
    """Trains a stateless Equinox ``module`` (called per example, under ``jax.vmap``); the trained module, losses."""
    optimizer = optax.adam(1e-2)
    opt_state = optimizer.init(eqx.filter(module, eqx.is_inexact_array))

    @eqx.filter_jit
    def step(model: Any, opt: Any) -> tuple[Any, Any, jax.Array]:
        def loss(m: Any) -> jax.Array:
            return optax.softmax_cross_entropy_with_integer_labels(jax.vmap(m)(xs), labels).mean()

        value, grads = eqx.filter_value_and_grad(loss)(model)
        updates, opt = optimizer.update(grads, opt, eqx.filter(model, eqx.is_inexact_array))
        return eqx.apply_updates(model, updates), opt, value

    losses = []
    for _ in range(steps):
        module, opt_state, value = step(module, opt_state)
        losses.append(float(value))
    return module, losses
