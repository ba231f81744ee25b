"""Glue that works on axis positions: hand-written convolutions and pooling, cumsum, sort, pad, scatters,
dynamic slices (a hand-written KV cache). Each becomes one ``ApplyPositional`` node, so the module is traced
instead of kept ``Foreign``; names flow by position and extra named axes pass through.
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
from pzbridge.core.errors import LiftError
from pzbridge.nn.positional_ops import ApplyPositional
from pzbridge.testing.numerics import assert_outputs_match

IMAGE_NAMES = ("channels", "height", "width")


class HandConv(eqx.Module):
    """A residual conv block on raw arrays, as research code writes it (NCHW through ``lax``)."""

    kernel: jax.Array  # (out, in, kh, kw)
    bias: jax.Array  # (out,)

    def __call__(self, x: jax.Array) -> jax.Array:  # (channels, height, width)
        y = jax.lax.conv_general_dilated(x[None], self.kernel, (1, 1), "SAME")[0]
        return x + jax.nn.relu(y + self.bias[:, None, None])


class Downsample(eqx.Module):
    """A strided conv to more channels, then 2x2 average pooling by ``reduce_window``."""

    kernel: jax.Array

    def __call__(self, x: jax.Array) -> jax.Array:
        y = jax.lax.conv_general_dilated(x[None], self.kernel, (2, 2), ((1, 1), (1, 1)))[0]
        return jax.lax.reduce_window(y, 0.0, jax.lax.add, (1, 2, 2), (1, 2, 2), "VALID") / 4.0


class Encoder(eqx.Module):
    block: HandConv
    down: Downsample

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.down(self.block(x))


def _encoder() -> Encoder:
    k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
    block = HandConv(0.3 * jax.random.normal(k1, (3, 3, 3, 3)), 0.1 * jax.random.normal(k2, (3,)))
    return Encoder(block, Downsample(0.3 * jax.random.normal(k3, (5, 3, 3, 3))))


def _image(size: int, seed: int = 1) -> jax.Array:
    return jax.random.normal(jax.random.key(seed), (3, size, size))


@pytest.fixture(scope="module")
def encoder() -> Encoder:
    return _encoder()


@pytest.fixture(scope="module")
def lifted(encoder: Encoder) -> pzb.LiftedModel:
    return pzb.lift(encoder, _image(8), input_names=(IMAGE_NAMES,), strict=True)


def test_hand_written_convs_and_pooling_trace_and_match_at_two_sizes_eager_and_jit(encoder, lifted):
    assert pzb.select(lifted).at_instances_of(pzb.nn.Foreign).count() == 0
    assert pzb.select(lifted).at_instances_of(ApplyPositional).count() == 3  # two convs and the pooling
    assert pzb.select(lifted).at_instances_of(pzb.nn.Residual).count() == 1
    jitted = jax.jit(lambda m, x: m.positional(x))
    for size in (8, 12):
        x = _image(size, size)
        assert_outputs_match(lifted.positional(x), encoder(x), same_computation=False)
        assert_outputs_match(jitted(pzb.freeze_variables(lifted), x), encoder(x), same_computation=False)


def test_kernels_are_parameters_with_named_channels_and_a_batch_axis_passes_through(encoder, lifted):
    shapes = {v.label: dict(v.value.named_shape)
              for v in pzb.select(lifted).at_instances_of(pzb.Parameter).get_sequence()}
    assert set(shapes) == {"block.kernel", "block.bias", "down.kernel"}
    assert shapes["block.kernel"]["channels"] == 3 and shapes["down.kernel"]["kernel_height"] == 3
    assert lifted.convention.output == ("channels", "height", "width")
    batch = jax.random.normal(jax.random.key(5), (2, 3, 8, 8))
    out = lifted(pzb.nx.wrap(batch, "batch", *IMAGE_NAMES))
    expected = jax.vmap(encoder)(batch)
    assert_outputs_match(out.unwrap("batch", *lifted.convention.output), expected, same_computation=False)


def test_lower_of_lift_is_the_encoder_and_an_edited_kernel_lowers_to_an_adapter(encoder, lifted):
    lowered = pzb.lower(lifted)
    assert type(lowered) is Encoder and type(lowered.block) is HandConv
    assert all(a is b for a, b in zip(jax.tree_util.tree_leaves(lowered), jax.tree_util.tree_leaves(encoder)))
    zeroed = pzb.select(lifted).at_instances_of(pzb.Parameter).where(lambda p: p.label == "block.kernel").apply(
        lambda p: pzb.Parameter(p.value * 0.0, p.label))
    x = _image(8)
    reference = eqx.tree_at(lambda m: m.block.kernel, encoder, jnp.zeros_like(encoder.block.kernel))(x)
    edited = pzb.lower(zeroed)
    assert_outputs_match(edited(x), reference, same_computation=False)
    grads = eqx.filter_grad(lambda m: jnp.sum(m(x) ** 2))(edited)
    assert any(float(jnp.abs(g).sum()) > 0 for g in jax.tree_util.tree_leaves(grads))
    assert type(edited.block) is HandConv and not np.any(np.asarray(edited.block.kernel))  # only a value changed


class Glue(eqx.Module):
    """``x @ w`` followed by one position-based operation, as in the property test below."""

    w: jax.Array
    op: str = eqx.field(static=True)

    def __call__(self, x: jax.Array) -> jax.Array:
        return GLUE_OPS[self.op](x @ self.w)


GLUE_OPS = {
    "cumsum": lambda h: jnp.cumsum(h, axis=0),
    "sort": lambda h: jnp.sort(h, axis=-1),
    "argsort": lambda h: jnp.argsort(h, axis=0).astype(h.dtype),
    "top_k": lambda h: jax.lax.top_k(h, 2)[0],
    "pad": lambda h: jnp.pad(h, ((1, 2), (0, 0))),
    "flip": lambda h: jnp.flip(h, 0),
    "take_along_axis": lambda h: jnp.take_along_axis(h, jnp.argsort(h, axis=1), axis=1),
    "scatter_add": lambda h: h.at[jnp.array([0, 2])].add(1.0),
    "dynamic_update_slice": lambda h: jax.lax.dynamic_update_slice(h, jnp.ones((1, h.shape[1])), (2, 0)),
    "sum_pool": lambda h: jax.lax.reduce_window(h, 0.0, jax.lax.add, (2, 1), (2, 1), "VALID"),
    "cummax": lambda h: jax.lax.cummax(h, axis=0),
    "row_at_argmax": lambda h: h[jnp.argmax(h[:, 0])],
    "causal_mix": lambda h: jnp.tril(h @ h.T) @ h,
}


@settings(max_examples=25, deadline=None)
@given(op=st.sampled_from(sorted(GLUE_OPS)), length=st.integers(4, 7), other=st.integers(4, 10))
def test_position_based_glue_lifts_and_equals_the_original_at_other_lengths_and_under_a_batch(op, length, other):
    model = Glue(jax.random.normal(jax.random.key(0), (4, 4)), op)
    x = jax.random.normal(jax.random.key(length), (length, 4))
    lifted = pzb.lift(model, x, strict=True)
    for value in (x, jax.random.normal(jax.random.key(other), (other, 4))):
        assert_outputs_match(lifted.positional(value), model(value), same_computation=False)
    batch = jax.random.normal(jax.random.key(3), (2, length, 4))
    out = lifted(pzb.nx.wrap(batch, "batch", *lifted.convention.inputs[0]))
    assert_outputs_match(out.unwrap("batch", *lifted.convention.output), jax.vmap(model)(batch),
                         same_computation=False)


class CachedAttention(eqx.Module):
    """One decode step writing its key into a cache at ``pos`` with ``dynamic_update_slice``."""

    wk: jax.Array
    wq: jax.Array

    def __call__(self, x: jax.Array, cache: jax.Array, pos: jax.Array) -> tuple[jax.Array, jax.Array]:
        k = x @ self.wk  # (1, d)
        cache = jax.lax.dynamic_update_slice(cache, k, (pos, 0))
        scores = (x @ self.wq) @ cache.T
        return jax.nn.softmax(scores, axis=-1) @ cache, cache


def test_a_hand_written_kv_cache_update_traces_and_follows_the_position_side_input():
    d, length = 4, 6
    model = CachedAttention(*(jax.random.normal(k, (d, d)) for k in jax.random.split(jax.random.key(2))))
    x, cache = jax.random.normal(jax.random.key(3), (1, d)), jnp.zeros((length, d))
    lifted = pzb.lift(model, x, cache, jnp.int32(0), strict=True)
    assert pzb.select(lifted).at_instances_of(pzb.nn.Foreign).count() == 0
    assert pzb.select(lifted).at_instances_of(ApplyPositional).count() >= 1
    for pos in (0, 3, 5):
        got = lifted.positional(x, cache, jnp.int32(pos))
        expected = model(x, cache, jnp.int32(pos))
        for a, b in zip(got, expected):
            assert_outputs_match(a, b, same_computation=False)
    assert np.count_nonzero(np.asarray(lifted.positional(x, cache, jnp.int32(3))[1]).any(axis=1)) == 1


def test_a_while_loop_stays_foreign_and_strict_names_it():
    class Loop(eqx.Module):
        w: jax.Array

        def __call__(self, x):
            return jax.lax.while_loop(lambda h: jnp.max(jnp.abs(h)) < 10.0, lambda h: 2.0 * h @ self.w, x)

    model, x = Loop(jnp.eye(3)), jnp.ones((2, 3))
    assert isinstance(pzb.lift(model, x).body, pzb.nn.Foreign)
    with pytest.raises(LiftError, match="`while`"):
        pzb.lift(model, x, strict=True)
