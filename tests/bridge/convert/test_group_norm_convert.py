"""GroupNorm / InstanceNorm inside custom modules: lifted, lowered and converted as the frameworks compute them.

NNX's GroupNorm and InstanceNorm reduce every axis between the leading batch
axis and the trailing features, whatever those axes are; in a traced parent
they arrive named (a Conv's ``height, width``), so the lifted layer must know
which names its call gave them (``middle_axes``). Before, the names passed
through as batch axes and a Conv -> GroupNorm block computed something else
silently (max abs difference 0.12 on the first case below). Converted to
Equinox, such a GroupNorm is a native ``eqx.nn.GroupNorm`` called with
``(channels, *middle_axes)``; Equinox has no InstanceNorm, which stays in the
adapter. Conversions compare with float32 tolerance (NNX's default fast
variance against Equinox's two-pass variance); lifts and same-framework
lowerings run NNX's own arithmetic.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from classifier_steps import equinox_plain_classifier_run, nnx_classifier_losses
from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st

import pzbridge as pzb
from pzbridge.bridge.convert import convert_with_report
from pzbridge.bridge.nnx.group_norm import NnxGroupNorm, NnxInstanceNorm
from pzbridge.core.errors import LiftError
from pzbridge.nn.dataflow import Traced

FEW = settings(max_examples=8, deadline=None, derandomize=True, database=None)


class ConvNormBlock(nnx.Module):
    """Conv -> norm -> relu -> global mean -> Linear head, as an image classifier's stem is written."""

    def __init__(self, spatial: int, channels: int, make_norm: Callable[[nnx.Rngs], Any], seed: int) -> None:
        rngs = nnx.Rngs(seed)
        self.conv = nnx.Conv(3, channels, (3,) * spatial, rngs=rngs)
        self.norm = make_norm(rngs)
        self.head = nnx.Linear(channels, 4, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        h = jax.nn.relu(self.norm(self.conv(x)))
        return self.head(h.mean(axis=tuple(range(1, h.ndim - 1))))


class TokenNormBlock(nnx.Module):
    """Linear -> norm -> gelu -> Linear on ``(batch, seq, features)`` (or ``(batch, features)``) inputs."""

    def __init__(self, channels: int, make_norm: Callable[[nnx.Rngs], Any], seed: int) -> None:
        rngs = nnx.Rngs(seed)
        self.inp = nnx.Linear(5, channels, rngs=rngs)
        self.norm = make_norm(rngs)
        self.out = nnx.Linear(channels, 3, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.out(jax.nn.gelu(self.norm(self.inp(x))))


def _norm_maker(kind: str, channels: int, groups: int, fast: bool) -> Callable[[nnx.Rngs], Any]:
    if kind == "group":
        return lambda rngs: nnx.GroupNorm(channels, num_groups=groups, use_fast_variance=fast, rngs=rngs)
    return lambda rngs: nnx.InstanceNorm(channels, use_fast_variance=fast, rngs=rngs)


@st.composite
def _blocks(draw: st.DrawFn) -> tuple[nnx.Module, jax.Array]:
    kind = draw(st.sampled_from(["group", "instance"]))
    channels = draw(st.sampled_from([4, 6]))
    groups = draw(st.sampled_from([g for g in (1, 2, channels) if channels % g == 0]))
    make = _norm_maker(kind, channels, groups, draw(st.booleans()))
    seed = draw(st.integers(0, 2**16))
    key = jax.random.key(draw(st.integers(0, 2**16)))
    if draw(st.booleans()):
        spatial = draw(st.integers(1, 2))
        return ConvNormBlock(spatial, channels, make, seed), jax.random.normal(key, (2, *(5,) * spatial, 3))
    shape = (2, 5) if draw(st.booleans()) else (2, draw(st.integers(2, 4)), 5)
    return TokenNormBlock(channels, make, seed), jax.random.normal(key, shape)


def _norm_of(lifted: Any) -> Any:
    return pzb.select(lifted.body).at_instances_of((NnxGroupNorm, NnxInstanceNorm)).get()


@FEW
@given(_blocks())
def test_traced_norm_reduces_what_nnx_reduces(example: tuple[nnx.Module, jax.Array]) -> None:
    """Law: a traced parent's GroupNorm / InstanceNorm computes NNX's reduction on the named axes it is given."""
    model, x = example
    want = nnx.clone(model)(x)
    lifted = pzb.lift(model, x, strict=True)
    assert isinstance(lifted.body, Traced)
    assert _norm_of(lifted).middle_axes == (("height", "width")[-(x.ndim - 2):] if x.ndim > 2 else ())
    np.testing.assert_allclose(lifted.positional(x), want, rtol=1e-6, atol=1e-6)
    lowered = pzb.lower(lifted)
    assert type(lowered) is type(model) and type(lowered.norm) is type(model.norm)
    np.testing.assert_allclose(lowered(x), want, rtol=1e-6, atol=1e-6)


@FEW
@given(_blocks())
def test_converted_to_equinox_and_back(example: tuple[nnx.Module, jax.Array]) -> None:
    """A GroupNorm becomes a native ``eqx.nn.GroupNorm`` (an InstanceNorm stays in the adapter); back, NNX's classes."""
    model, x = example
    model.eval()
    want = model(x)
    converted, report = convert_with_report(model, x, to="equinox")
    natives = [part.module for part in report.natives]
    assert ("GroupNorm" in natives) == isinstance(model.norm, nnx.GroupNorm)
    np.testing.assert_allclose(jax.vmap(converted)(x), want, rtol=1e-5, atol=1e-5)
    back = pzb.convert(converted, x[0], to="nnx")
    assert type(back) is type(model) and type(back.norm) is type(model.norm)
    np.testing.assert_allclose(back(x), want, rtol=1e-5, atol=1e-5)


def test_converted_group_norm_trains_in_equinox() -> None:
    """The converted model's native GroupNorm is trained by ``eqx.filter_value_and_grad`` + optax; loss falls."""
    model = ConvNormBlock(2, 4, _norm_maker("group", 4, 2, True), 0)
    xs = jax.random.normal(jax.random.key(1), (8, 5, 5, 3))
    labels = jnp.arange(8) % 4
    converted = pzb.convert(model, xs, to="equinox")
    converted, losses = equinox_plain_classifier_run(converted, xs, labels, 12)
    assert losses[-1] < losses[0]
    norms = [leaf for leaf in jax.tree_util.tree_leaves(converted, is_leaf=lambda m: isinstance(m, eqx.nn.GroupNorm))
             if isinstance(leaf, eqx.nn.GroupNorm)]
    assert len(norms) == 1 and not np.allclose(norms[0].weight, 1.0)  # the native's own weight was trained


def test_equinox_group_norm_block_converted_trains_in_nnx() -> None:
    """The reverse: NNX -> Equinox -> NNX gives nnx.GroupNorm back, trained by ``nnx.Optimizer``; loss falls."""
    model = ConvNormBlock(2, 4, _norm_maker("group", 4, 2, False), 3)
    xs = jax.random.normal(jax.random.key(2), (8, 5, 5, 3))
    back = pzb.convert(pzb.convert(model, xs, to="equinox"), xs[0], to="nnx")
    assert type(back.norm) is nnx.GroupNorm
    losses = nnx_classifier_losses(back, xs, jnp.arange(8) % 4, 12)
    assert losses[-1] < losses[0]


@pytest.mark.parametrize("shape", [(6,), (6, 5), (6, 3, 3)])
def test_equinox_group_norm_root_comes_back_native(shape: tuple[int, ...]) -> None:
    """``eqx.nn.GroupNorm`` roots convert to NNX and back to ``eqx.nn.GroupNorm`` (the one-axis one was an adapter)."""
    norm = eqx.nn.GroupNorm(2, 6)
    x = jax.random.normal(jax.random.key(0), shape)
    xs = jnp.stack([x, -2 * x])
    converted = pzb.convert(norm, x, to="nnx")
    back, report = convert_with_report(converted, xs, to="equinox")
    assert type(back) is eqx.nn.GroupNorm and not report.adapters
    np.testing.assert_allclose(jax.vmap(back)(xs), jax.vmap(norm)(xs), rtol=1e-5, atol=1e-5)


def test_nnx_group_norm_root_on_features_is_native() -> None:
    """An ``nnx.GroupNorm`` root on ``(batch, channels)`` converts to a native ``eqx.nn.GroupNorm`` root."""
    norm = nnx.GroupNorm(6, num_groups=3, rngs=nnx.Rngs(0))
    xs = jax.random.normal(jax.random.key(0), (3, 6))
    converted, report = convert_with_report(norm, xs, to="equinox")
    assert type(converted) is eqx.nn.GroupNorm and not report.adapters
    np.testing.assert_allclose(jax.vmap(converted)(xs), norm(xs), rtol=1e-5, atol=1e-5)


class TwoRanks(nnx.Module):
    """Calls one GroupNorm on a ``(batch, seq, C)`` and a ``(batch, C)`` array: two different reductions."""

    def __init__(self) -> None:
        self.norm = nnx.GroupNorm(4, num_groups=2, rngs=nnx.Rngs(0))

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.norm(x).mean(axis=1) + self.norm(x[:, 0])


def test_norm_called_at_two_ranks_stays_foreign_naming_why() -> None:
    """One lifted layer cannot hold two calls' middle axes: the parent stays Foreign (strict: a LiftError says why)."""
    model, x = TwoRanks(), jax.random.normal(jax.random.key(0), (2, 3, 4))
    with pytest.raises(LiftError, match="different ranks"):
        pzb.lift(model, x, strict=True)
    lifted = pzb.lift(model, x)
    np.testing.assert_allclose(lifted.positional(x), model(x), rtol=1e-6, atol=1e-6)
