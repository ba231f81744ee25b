"""Equinox GroupNorm rule: exact round trip, same buffers, original outputs at every spatial rank, batch vs vmap."""

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
from pzbridge.bridge.equinox.group_norm import EqxGroupNormNd
from pzbridge.core import named_axes as nx
from pzbridge.core.errors import NamedAxisError
from pzbridge.testing.equinox_strategies import assert_outputs_close, assert_round_trip, assert_same_buffers
from pzbridge.testing.numerics import assert_outputs_match


def _norm(groups: int, channels: int, affine: bool, seed: int) -> eqx.nn.GroupNorm:
    norm = eqx.nn.GroupNorm(groups, channels, eps=1e-4, channelwise_affine=affine)
    if affine:  # non-trivial affine so a dropped scale or bias shows
        k1, k2 = jax.random.split(jax.random.key(seed))
        norm = eqx.tree_at(lambda m: (m.weight, m.bias), norm,
                           (jax.random.normal(k1, (channels,)), jax.random.normal(k2, (channels,))))
    return norm


@pytest.mark.parametrize("spatial", [(), (5,), (3, 4), (2, 3, 2)], ids=["0d", "1d", "2d", "3d"])
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "plain"])
def test_groupnorm_round_trips_exactly_and_computes_the_original_under_jit(spatial, affine):
    norm = _norm(2, 6, affine, 0)
    lifted = pzb.lift(norm)
    assert type(lifted.body) is EqxGroupNormNd
    assert_same_buffers(norm, lifted)
    assert_round_trip(norm, pzb.lower(lifted))
    x = jnp.sin(jnp.arange(6 * int(np.prod(spatial)), dtype=jnp.float32)).reshape((6, *spatial)) * 3 + 1
    want = eqx.filter_jit(lambda m, a: m(a))(norm, x)
    got = eqx.filter_jit(lambda m, a: m.positional(a))(lifted, x)
    assert got.shape == want.shape
    # Not Equinox's program (its jaxpr differs: reshapes, reduction order), so not bitwise on every CPU.
    assert_outputs_match(got, want, same_computation=False)


@given(st.sampled_from([(1, 3), (2, 4), (3, 6), (4, 4)]), st.integers(0, 2), st.booleans(), st.integers(0, 50))
def test_groupnorm_on_named_batch_and_spatial_axes_matches_vmap_of_original(gc, n_spatial, affine, seed):
    groups, channels = gc
    norm = _norm(groups, channels, affine, seed)
    spatial = (3, 2)[:n_spatial]
    x = jax.random.normal(jax.random.key(seed), (2, channels, *spatial))
    want = jax.vmap(norm)(x)
    names = ("batch", "channels", *("height", "width")[2 - n_spatial:])
    got = pzb.lift(norm).body(nx.wrap(x, *names)).unwrap(*names)
    assert_outputs_close(want, got, rtol=1e-6)


def test_groupnorm_against_a_pure_jax_reference():
    norm = _norm(3, 6, True, 1)
    x = jax.random.normal(jax.random.key(2), (6, 4))
    y = x.reshape(3, 2, 4)
    ref = ((y - y.mean(axis=(1, 2), keepdims=True)) / jnp.sqrt(y.var(axis=(1, 2), keepdims=True) + 1e-4))
    ref = ref.reshape(6, 4) * norm.weight[:, None] + norm.bias[:, None]
    np.testing.assert_allclose(pzb.lift(norm).positional(x), ref, rtol=1e-5, atol=1e-5)


def test_groupnorm_parameters_are_named_channels():
    norm = _norm(2, 4, True, 0)
    body = pzb.lift(norm).body
    assert dict(body.scale.value.named_shape) == {"channels": 4}
    assert body.scale.value.data_array is norm.weight and body.groups == 2


def test_edited_groupnorm_with_fast_variance_lowers_to_an_adapter_called_like_the_original():
    norm = _norm(2, 4, True, 0)
    lifted = pzb.lift(norm)
    edited = dataclasses.replace(lifted, body=dataclasses.replace(lifted.body, use_fast_variance=True))
    lowered = pzb.lower(edited)
    assert isinstance(lowered, EquinoxAdapter)
    x = jax.random.normal(jax.random.key(0), (4, 3, 2))
    np.testing.assert_allclose(lowered(x), norm(x), rtol=1e-5, atol=1e-5)


def test_positional_input_with_too_many_axes_raises_a_named_axis_error():
    with pytest.raises(NamedAxisError, match="spatial"):
        pzb.lift(_norm(2, 4, False, 0)).positional(jnp.ones((4, 2, 2, 2, 2)))
