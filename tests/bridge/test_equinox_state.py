"""Equinox BatchNorm with eqx.nn.State: StateVariables from the State, training updates equal vmap, exact round trip."""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import pzbridge as pzb
from pzbridge.bridge.equinox.state import EqxBatchNorm, lower_with_state
from pzbridge.core import named_axes as nx
from pzbridge.core.errors import LiftError, LowerError
from pzbridge.core.variables import Parameter, StateVariable
from pzbridge.testing.equinox_strategies import assert_round_trip

pytestmark = pytest.mark.oldest  # also run against .ci/oldest-constraints.txt


def _bn(mode: str, channels: int = 3, affine: bool = True, seed: int = 0, momentum: float = 0.9):
    bn, state = eqx.nn.make_with_state(eqx.nn.BatchNorm)(
        channels, "batch", channelwise_affine=affine, momentum=momentum, mode=mode)
    if affine:  # non-trivial affine so a dropped scale or bias shows
        k1, k2 = jax.random.split(jax.random.key(seed))
        bn = eqx.tree_at(lambda m: (m.weight, m.bias), bn,
                         (jax.random.normal(k1, (channels,)), jax.random.normal(k2, (channels,))))
    return bn, state


def _eqx_train(bn, state, x):
    return jax.vmap(bn, axis_name="batch", in_axes=(0, None), out_axes=(0, None))(x, state)


def _state_leaves_equal(a: eqx.nn.State, b: eqx.nn.State, rtol: float = 0.0) -> None:
    la, ta = jax.tree_util.tree_flatten(a)
    lb, tb = jax.tree_util.tree_flatten(b)
    assert ta == tb
    for x, y in zip(la, lb):
        assert x.dtype == y.dtype and x.shape == y.shape
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=rtol)


def test_batchnorm_without_state_raises_at_lift():
    # Kept Foreign it would lift but fail when called: its statistics live only in the State.
    bn, _ = _bn("batch")
    with pytest.raises(LiftError, match=r"state=state"):
        pzb.lift(bn)


@pytest.mark.parametrize("mode", ["batch", "ema"])
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "plain"])
def test_batchnorm_with_state_lifts_to_state_variables_and_round_trips_exactly(mode, affine):
    bn, state = _bn(mode, affine=affine)
    body = pzb.lift(bn, state=state).body
    assert type(body) is EqxBatchNorm and body.mode == mode
    assert isinstance(body.running_mean, StateVariable) and body.running_mean.label == "running_mean"
    assert dict(body.running_var.value.named_shape) == {"channels": 3}
    index = bn.ema_state_index if mode == "ema" else bn.batch_state_index
    assert body.running_mean.value.data_array is state.get(index)[0]  # no copy
    extra = body.first_call if mode == "ema" else body.counter
    assert isinstance(extra, StateVariable) and extra.label == ("first_call" if mode == "ema" else "counter")
    if affine:
        assert isinstance(body.scale, Parameter) and body.scale.value.data_array is bn.weight
    module, new_state = lower_with_state(pzb.lift(bn, state=state))
    assert_round_trip(bn, module)
    assert jax.tree_util.tree_structure(new_state) == jax.tree_util.tree_structure(state)
    for got, want in zip(jax.tree_util.tree_leaves(new_state), jax.tree_util.tree_leaves(state)):
        assert got is want  # untouched state comes back as the very same arrays


def test_labels_follow_the_path_inside_a_container():
    class Net(eqx.Module):
        norms: tuple

        def __init__(self):
            self.norms = (eqx.nn.BatchNorm(2, "batch", mode="batch"), eqx.nn.BatchNorm(2, "batch", mode="ema"))

    net, state = eqx.nn.make_with_state(Net)()
    lifted = pzb.lift(net, state=state)
    labels = sorted(v.label for v in pzb.select(lifted).at_instances_of(StateVariable).get_sequence())
    assert labels == ["norms.0.counter", "norms.0.running_mean", "norms.0.running_var",
                      "norms.1.first_call", "norms.1.running_mean", "norms.1.running_var"]
    module, new_state = lower_with_state(lifted)
    assert_round_trip(net, module)
    _state_leaves_equal(new_state, state)


@settings(max_examples=15)
@given(st.sampled_from(["batch", "ema"]), st.integers(0, 2), st.booleans(), st.integers(0, 30))
def test_training_call_updates_state_variables_like_eqx_under_vmap(mode, n_spatial, affine, seed):
    bn, state = _bn(mode, affine=affine, seed=seed)
    spatial = (4, 2)[:n_spatial]
    x = jax.random.normal(jax.random.key(seed + 1), (5, 3, *spatial)) * 2 + 1
    lifted = pzb.lift(bn, state=state)
    names = ("batch", "channels", *("height", "width")[2 - n_spatial:])
    for step in range(2):  # two steps: "ema" takes the first-call branch then the running one
        xs = x * (step + 1)
        want_out, state = _eqx_train(bn, state, xs)
        got_out = lifted(nx.wrap(xs, *names), train=True).unwrap(*names)
        np.testing.assert_allclose(got_out, want_out, rtol=1e-5, atol=1e-5)
        _, got_state = lower_with_state(lifted)
        _state_leaves_equal(got_state, state, rtol=1e-5)


@pytest.mark.parametrize("mode", ["batch", "ema"])
def test_inference_outputs_equal_eqx_after_training(mode):
    bn, state = _bn(mode, seed=3)
    x = jax.random.normal(jax.random.key(4), (6, 3, 2)) + 0.5
    _, state = _eqx_train(bn, state, x)
    lifted = pzb.lift(bn, state=state)
    infer = lambda a, s: bn(a, s, inference=True)  # noqa: E731
    want, after = jax.vmap(infer, axis_name="batch", in_axes=(0, None), out_axes=(0, None))(x, state)
    for side in ({"train": False}, {"inference": True}):
        got = lifted(nx.wrap(x, "batch", "channels", "height"), **side).unwrap("batch", "channels", "height")
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    _, unchanged = lower_with_state(lifted)
    _state_leaves_equal(unchanged, after)


def test_training_stats_match_a_pure_jax_reference():
    bn, state = _bn("batch", momentum=0.5, seed=5)
    x = jax.random.normal(jax.random.key(6), (4, 3, 5))
    lifted = pzb.lift(bn, state=state)
    out = lifted(nx.wrap(x, "batch", "channels", "width"), train=True).unwrap("batch", "channels", "width")
    mean, var = x.mean(axis=(0, 2)), x.var(axis=(0, 2))
    np.testing.assert_allclose(lifted.body.running_mean.value.unwrap("channels"), 0.5 * mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(lifted.body.running_var.value.unwrap("channels"), 0.5 + 0.5 * var, rtol=1e-5)
    ref = (x - mean[:, None]) / jnp.sqrt(var[:, None] + 1e-5) * bn.weight[:, None] + bn.bias[:, None]
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)
    assert int(lifted.body.counter.value) == 1


def test_lower_with_state_takes_foreign_entries_from_the_given_state():
    class Net(eqx.Module):
        bn: eqx.nn.BatchNorm
        sn: eqx.nn.SpectralNorm

        def __init__(self):
            self.bn = eqx.nn.BatchNorm(2, "batch", mode="batch")
            self.sn = eqx.nn.SpectralNorm(eqx.nn.Linear(2, 2, key=jax.random.key(0)), "weight",
                                          key=jax.random.key(1))

    net, state = eqx.nn.make_with_state(Net)()
    lifted = pzb.lift(net, state=state)
    with pytest.raises(LowerError, match="state=state"):
        lower_with_state(lifted)
    module, new_state = lower_with_state(lifted, state=state)
    assert_round_trip(net, module)
    _state_leaves_equal(new_state, state)
