"""eqx.nn.WeightNorm / SpectralNorm: Foreign wrappers whose wrapped layer is lifted, exact round trip, same outputs.

Observed behaviour pinned here (Equinox 0.13.8):

- Neither wrapper has a rule, so each lifts to ``Foreign``; the wrapped
  ``eqx.nn.Linear`` is lifted by its own rule, so its ``weight`` is a
  ``Parameter`` holding the very buffer (reachable by selectors, LoRA, ...).
- ``WeightNorm``'s ``g`` is a ``Parameter`` over its plain array; the lifted
  model computes the original's output bitwise.
- ``SpectralNorm`` is stateful: its ``uv_index`` (a ``StateIndex`` whose
  init was deleted by ``make_with_state``) is kept as an array-less child,
  and the power-iteration vectors are *not* lifted, even with
  ``pzb.lift(..., state=state)`` (only BatchNorm state becomes
  StateVariables). The lifted model is called like the original, with the
  State: ``lifted.positional(x, state)`` returns ``(y, new_state)`` equal to
  ``sn(x, state)``; without the State it raises the original's ``TypeError``.
"""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import pzbridge as pzb
from pzbridge.bridge.equinox.linear import EqxLinear
from pzbridge.core.variables import Parameter, StateVariable
from pzbridge.nn.foreign import Foreign
from pzbridge.testing.equinox_strategies import assert_round_trip, assert_same_buffers
from pzbridge.testing.numerics import assert_same_computation, assert_same_outputs


def _linear(seed: int, n_in: int = 3, n_out: int = 4) -> eqx.nn.Linear:
    return eqx.nn.Linear(n_in, n_out, key=jax.random.key(seed))


def _clone(state: eqx.nn.State) -> eqx.nn.State:
    # eqx invalidates a State once a call returns its successor; each call here gets its own copy.
    leaves, treedef = jax.tree_util.tree_flatten(state)
    return jax.tree_util.tree_unflatten(treedef, leaves)


def _assert_wrapped_weight_is_the_buffer(lifted, linear: eqx.nn.Linear) -> None:
    body = lifted.body
    assert type(body) is Foreign
    inner = body.children["layer"]
    assert isinstance(inner, EqxLinear)
    params = pzb.select(lifted).at_instances_of(Parameter).get_sequence()
    weight = next(p for p in params if p.label == "layer.weight")
    assert weight.value.data_array is linear.weight


@settings(max_examples=10)
@given(st.integers(0, 20), st.integers(0, 1))
def test_weight_norm_lifts_to_foreign_round_trips_and_matches_outputs(seed, axis):
    linear = _linear(seed)
    wn = eqx.nn.WeightNorm(linear, axis=axis)
    lifted = pzb.lift(wn)
    _assert_wrapped_weight_is_the_buffer(lifted, linear)
    assert_same_buffers(wn, lifted)
    assert_round_trip(wn, pzb.lower(lifted))
    x = jax.random.normal(jax.random.key(seed + 100), (3,))
    # Bitwise: the wrapper stays Foreign and runs Equinox's own program (the jaxprs are compared).
    assert_same_outputs(lifted.positional, wn, x, bitwise=True)
    xs = jax.random.normal(jax.random.key(seed + 200), (5, 3))
    assert_same_outputs(jax.vmap(lifted.positional), jax.vmap(wn), xs, bitwise=True)


@pytest.mark.parametrize("with_state", [False, True], ids=["lift", "lift_with_state"])
def test_spectral_norm_lifts_to_foreign_and_runs_with_its_state(with_state):
    linear = _linear(1)
    sn, state = eqx.nn.make_with_state(eqx.nn.SpectralNorm)(linear, "weight", key=jax.random.key(2))
    lifted = pzb.lift(sn, state=state) if with_state else pzb.lift(sn)
    _assert_wrapped_weight_is_the_buffer(lifted, linear)
    assert sorted(lifted.body.children) == ["layer", "uv_index"]
    assert pzb.select(lifted).at_instances_of(StateVariable).is_empty()  # u, v stay in the eqx State
    assert_round_trip(sn, pzb.lower(lifted))
    x = jax.random.normal(jax.random.key(3), (3,))
    assert_same_computation(lambda a: lifted.positional(a, _clone(state)), lambda a: sn(a, _clone(state)), x)
    want_y, want_state = sn(x, _clone(state))
    got_y, got_state = lifted.positional(x, _clone(state))
    np.testing.assert_array_equal(got_y, want_y)
    for got, want in zip(jax.tree_util.tree_leaves(got_state), jax.tree_util.tree_leaves(want_state), strict=True):
        np.testing.assert_array_equal(got, want)
    with pytest.raises(TypeError, match="state"):
        lifted.positional(x)


def test_spectral_norm_edit_of_the_wrapped_weight_reaches_the_lowered_module():
    linear = _linear(4)
    sn, state = eqx.nn.make_with_state(eqx.nn.SpectralNorm)(linear, "weight", key=jax.random.key(5))
    lifted = pzb.lift(sn)
    weight = next(p for p in pzb.select(lifted).at_instances_of(Parameter).get_sequence()
                  if p.label == "layer.weight")
    weight.value = weight.value * 2.0
    lowered = pzb.lower(lifted)
    np.testing.assert_array_equal(lowered.layer.weight, linear.weight * 2.0)
    assert jnp.all(sn.layer.weight == linear.weight)  # the original is untouched
