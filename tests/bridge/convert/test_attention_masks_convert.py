"""Equinox attention called with a mask converts to NNX and back (issue 12).

Equinox's ``MultiheadAttention`` takes its mask as the fourth positional
argument, ``(q, kv)`` or ``(heads, q, kv)`` per example; NNX's takes
``mask=`` in the layout ``(batch..., heads | 1, q, kv)``. Each case converts
an Equinox model to NNX, checks the NNX model on a batch against
``jax.vmap`` of the original, converts it back on that batch and checks the
Equinox result has the original's structure and outputs. Projections and
masking run the same primitives in a different order (NNX scales logits
after the product, fills masked logits with another value), hence a
tolerance instead of bitwise equality.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hypothesis import example, given, settings
from hypothesis import strategies as st

import pzbridge as pzb
from pzbridge.bridge.convert import convert
from pzbridge.bridge.lifted import CallingConvention
from pzbridge.bridge.native_calls import NativeCall, NativeConvention
from pzbridge.core.errors import NamedAxisError, PzbridgeError
from pzbridge.testing.equinox_strategies import SelfAttention, SequenceModel

ATOL = 1e-5


class KeywordMask(eqx.Module):
    """Causal self-attention passing its mask by keyword."""

    attn: eqx.nn.MultiheadAttention

    def __call__(self, x: jax.Array) -> jax.Array:
        mask = jnp.tril(jnp.ones((x.shape[0], x.shape[0]), bool))
        return self.attn(x, x, x, mask=mask)


class PerHeadMask(eqx.Module):
    """Head 0 causal, the other heads see everything: a ``(heads, q, kv)`` mask built in ``__call__``."""

    attn: eqx.nn.MultiheadAttention
    heads: int = eqx.field(static=True)

    def __call__(self, x: jax.Array) -> jax.Array:
        t = x.shape[0]
        causal = jnp.tril(jnp.ones((t, t), bool))
        mask = jnp.stack([causal] + [jnp.ones((t, t), bool)] * (self.heads - 1))
        return self.attn(x, x, x, mask) + x


class MaskInput(eqx.Module):
    """The mask is an input of the model; the attention's output is scaled by a raw weight per feature."""

    attn: eqx.nn.MultiheadAttention
    scale: jax.Array

    def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
        return self.attn(x, x, x, mask) * self.scale


class VmappedAttention(eqx.Module):
    """Its own batch axis, mapped with ``jax.vmap`` inside ``__call__``."""

    attn: eqx.nn.MultiheadAttention

    def __call__(self, x: jax.Array) -> jax.Array:
        t = x.shape[1]
        mask = jnp.tril(jnp.ones((t, t), bool))
        return jax.vmap(lambda xi: self.attn(xi, xi, xi, mask))(x)


def _structure(node: Any) -> Any:
    """Module classes, every field (static ones included) and array shapes, as a comparable value."""
    if isinstance(node, eqx.Module):
        return type(node).__name__, tuple((f.name, _structure(getattr(node, f.name)))
                                          for f in dataclasses.fields(node))
    if isinstance(node, (list, tuple)):
        return type(node).__name__, tuple(_structure(item) for item in node)
    if eqx.is_array(node):
        return "array", tuple(node.shape), str(node.dtype)
    return node


def _batched(x: jax.Array) -> jax.Array:
    """Two different examples; boolean masks repeat (and stay valid)."""
    return jnp.stack([x, x if x.dtype.kind in "iub" else x * 0.5 - 0.25])


def _round_trip(model: eqx.Module, *args: jax.Array) -> nnx.Module:
    """Equinox -> NNX -> Equinox, checking outputs on both sides and the structure at home; returns the NNX model."""
    converted = convert(model, *args, to="nnx")
    assert isinstance(converted, nnx.Module)
    batched = [_batched(a) for a in args]
    want = jax.vmap(model)(*batched)
    np.testing.assert_allclose(converted(*batched), want, atol=ATOL, rtol=ATOL)
    back = convert(converted, *batched, to="equinox")
    assert type(back) is type(model)
    assert _structure(back) == _structure(model)
    np.testing.assert_allclose(back(*args), model(*args), atol=ATOL, rtol=ATOL)
    np.testing.assert_allclose(jax.vmap(back)(*batched), want, atol=ATOL, rtol=ATOL)
    return converted


def _mha(heads: int, d: int, key: int = 0, **kwargs: Any) -> eqx.nn.MultiheadAttention:
    return eqx.nn.MultiheadAttention(heads, d, key=jax.random.key(key), **kwargs)


def _tokens(seq: int, d: int, phase: float = 0.7) -> jax.Array:
    return jnp.sin(jnp.arange(seq * d, dtype=jnp.float32) * phase).reshape(seq, d)


def _pattern(shape: tuple[int, ...]) -> jax.Array:
    """A boolean mask with no fully masked row (index 0 of the last axis is always kept)."""
    mask = jnp.arange(int(np.prod(shape))).reshape(shape) % 3 != 1
    return mask.at[..., 0].set(True)


def _native_attentions(module: nnx.Module) -> list[nnx.MultiHeadAttention]:
    return [m for _, m in nnx.iter_modules(module) if isinstance(m, nnx.MultiHeadAttention)]


@pytest.mark.parametrize("heads", [1, 2])
def test_causal_self_attention_in_a_sequence_model_runs_a_native_nnx_attention_with_its_mask(heads):
    model = SequenceModel([SelfAttention(_mha(heads, 4), causal=True)])
    converted = _round_trip(model, _tokens(3, 4))
    assert len(_native_attentions(converted)) == 1


@pytest.mark.parametrize("heads", [1, 2])
def test_a_mask_passed_by_keyword_reaches_the_native_attention(heads):
    converted = _round_trip(KeywordMask(_mha(heads, 4)), _tokens(3, 4))
    assert len(_native_attentions(converted)) == 1


@pytest.mark.parametrize("heads", [1, 2])
def test_a_per_head_mask_built_in_call_masks_each_head(heads):
    model = PerHeadMask(_mha(heads, 4), heads)
    _round_trip(model, _tokens(3, 4))


@pytest.mark.parametrize("per_head", [False, True])
def test_a_mask_given_as_a_model_input(per_head):
    mask = jnp.tril(jnp.ones((3, 3), bool))
    if per_head:
        mask = jnp.stack([mask, jnp.ones((3, 3), bool)])
    model = MaskInput(_mha(2, 4), jnp.linspace(0.5, 1.5, 4))
    _round_trip(model, _tokens(3, 4), mask)


def test_attention_vmapped_inside_call():
    _round_trip(VmappedAttention(_mha(2, 4)), jnp.stack([_tokens(3, 4), _tokens(3, 4, 0.3)]))


@pytest.mark.parametrize("heads,mask_shape", [(1, (3, 4)), (1, (1, 3, 4)), (2, (3, 4)), (2, (2, 3, 4))])
def test_plain_multihead_attention_with_a_mask_argument(heads, mask_shape):
    mha = _mha(heads, 2, qk_size=3, vo_size=3, use_key_bias=True)
    kv = jnp.cos(jnp.arange(8, dtype=jnp.float32)).reshape(4, 2)
    _round_trip(mha, _tokens(3, 2), kv, kv, _pattern(mask_shape))


def test_a_single_head_mask_is_shared_by_every_head_in_the_converted_model():
    mha = _mha(2, 2, qk_size=3, vo_size=3)
    kv = jnp.cos(jnp.arange(8, dtype=jnp.float32)).reshape(4, 2)
    q = _tokens(3, 2)
    converted = convert(mha, q, kv, kv, _pattern((2, 3, 4)), to="nnx")
    shared = _pattern((1, 3, 4))
    batched = [_batched(a) for a in (q, kv, kv)]
    # NNX broadcasts a size-1 heads axis; Equinox needs the mask repeated per head.
    got = converted(*batched, _batched(shared))
    want = jax.vmap(mha)(*batched, _batched(jnp.concatenate([shared, shared])))
    np.testing.assert_allclose(got, want, atol=ATOL, rtol=ATOL)


def test_the_lifted_converted_model_keeps_the_mask():
    model = SequenceModel([SelfAttention(_mha(2, 4), causal=True)])
    x = _tokens(3, 4)
    converted = convert(model, x, to="nnx")
    batch = _batched(x)
    lifted = pzb.lift(converted, batch)
    np.testing.assert_allclose(lifted.positional(batch), converted(batch), atol=ATOL, rtol=ATOL)
    # Without its mask the attention would compute something else: the check can fail.
    unmasked = jax.vmap(SequenceModel([SelfAttention(model.blocks[0].attn, causal=False)]))(batch)
    assert not np.allclose(converted(batch), unmasked, atol=1e-3)


def test_the_converted_model_does_not_change_the_original():
    model = SequenceModel([SelfAttention(_mha(2, 4), causal=True)])
    before = jax.tree.map(np.asarray, eqx.filter(model, eqx.is_array))
    _round_trip(model, _tokens(3, 4))
    after = eqx.filter(model, eqx.is_array)
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(after)))


def _masked(x: jax.Array, *, mask: jax.Array | None = None) -> jax.Array:
    return x if mask is None else jnp.where(mask, x, 0.0)


def test_native_call_passes_extra_inputs_as_keywords_with_size_one_axes_for_missing_names():
    convention = NativeConvention((("h", "s"),), ("h", "s"), keywords=(("mask", ("h", "s")),))
    call = NativeCall(_masked, convention, batched=True)
    x = pzb.nx.wrap(jnp.ones((2, 3, 4)), "b", "h", "s")
    mask = pzb.nx.wrap(jnp.arange(4) % 2 == 0, "s")  # No b, no h: broadcast by the native.
    out = call((x, mask))
    assert dict(out.named_shape) == {"b": 2, "h": 3, "s": 4}
    np.testing.assert_array_equal(out.unwrap("b", "h", "s")[1, 2], [1.0, 0.0, 1.0, 0.0])
    by_keyword = call(x, mask=mask)
    np.testing.assert_array_equal(by_keyword.unwrap("b", "h", "s"), out.unwrap("b", "h", "s"))


def test_native_call_refuses_more_inputs_than_it_takes_naming_a_fix():
    call = NativeCall(_masked, CallingConvention((("s",),), ("s",)), batched=True, path="blocks.0")
    x = pzb.nx.wrap(jnp.ones(4), "s")
    with pytest.raises(NamedAxisError, match=r"blocks\.0.*takes 1 inputs.*found 2.*Fix"):
        call((x, x))


def test_nnx_attention_refuses_a_mask_given_twice():
    mha = nnx.MultiHeadAttention(2, 4, decode=False, rngs=nnx.Rngs(0))
    lifted = pzb.lift(mha).body
    x = pzb.nx.wrap(jnp.ones((3, 4)), "seq", "features")
    mask = pzb.nx.wrap(jnp.ones((3, 3), bool), "seq", "kv_seq")
    with pytest.raises(PzbridgeError, match="Fix"):
        lifted((x, x, x, mask), mask=mask)


def test_nnx_attention_takes_a_named_mask_as_fourth_input_like_mask_keyword():
    mha = nnx.MultiHeadAttention(2, 4, decode=False, rngs=nnx.Rngs(0))
    lifted = pzb.lift(mha).body
    x = pzb.nx.wrap(jnp.sin(jnp.arange(12.0)).reshape(3, 4), "seq", "features")
    causal = jnp.tril(jnp.ones((3, 3), bool))
    out = lifted((x, x, x, pzb.nx.wrap(causal, "seq", "kv_seq")))
    want = mha(x.unwrap("seq", "features"), mask=causal[None])
    np.testing.assert_allclose(out.unwrap("seq", "features"), want, atol=1e-6)


@st.composite
def _cases(draw: st.DrawFn) -> tuple[eqx.Module, tuple[jax.Array, ...]]:
    heads = draw(st.sampled_from([1, 2]))
    d = draw(st.sampled_from([2, 4]))
    seq = draw(st.integers(1, 3))
    kind = draw(st.sampled_from(["none", "shared", "per_head"]))
    mha = _mha(heads, d, key=draw(st.integers(0, 3)), qk_size=draw(st.integers(1, 3)),
               vo_size=draw(st.integers(1, 3)), use_query_bias=draw(st.booleans()),
               use_output_bias=draw(st.booleans()))
    if draw(st.booleans()):
        # Plain attention on (query, key, value[, mask]); keys one longer than queries.
        kv = jnp.cos(jnp.arange((seq + 1) * d, dtype=jnp.float32)).reshape(seq + 1, d)
        shape = {"none": None, "shared": (seq, seq + 1), "per_head": (heads, seq, seq + 1)}[kind]
        args = (_tokens(seq, d), kv, kv) + (() if shape is None else (_pattern(shape),))
        return mha, args
    if kind == "per_head":
        return PerHeadMask(mha, heads), (_tokens(seq, d),)
    return SequenceModel([SelfAttention(mha, causal=kind == "shared")]), (_tokens(seq, d),)


@settings(max_examples=6, deadline=None, derandomize=True, database=None)
@given(_cases())
def test_attention_with_any_mask_kind_comes_back_from_nnx(case):
    model, args = case
    _round_trip(model, *args)


class NnxCausal(nnx.Module):
    """A custom NNX module passing a causal ``mask=`` (``(1, 1, q, kv)``, broadcast by NNX) to its attention."""

    def __init__(self, heads: int, d: int, rngs: nnx.Rngs) -> None:
        self.attn = nnx.MultiHeadAttention(heads, d, decode=False, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        t = x.shape[-2]
        return self.attn(x, mask=jnp.tril(jnp.ones((t, t), bool))[None, None])


@pytest.mark.parametrize("heads", [1, 2])
def test_a_traced_nnx_module_passing_mask_keyword_lifts_with_the_mask_on_kv_seq(heads):
    model = NnxCausal(heads, 4, nnx.Rngs(0))
    x = jnp.sin(jnp.arange(24, dtype=jnp.float32)).reshape(2, 3, 4)
    lifted = pzb.lift(model, x)
    np.testing.assert_allclose(lifted.positional(x), model(x), atol=1e-6)
    unmasked = model.attn(x)
    assert not np.allclose(lifted.positional(x), unmasked, atol=1e-3)  # The mask is applied.


@pytest.mark.parametrize("heads", [1, 2])
def test_a_masked_nnx_attention_call_converts_to_equinox_and_back(heads):
    model = NnxCausal(heads, 4, nnx.Rngs(0))
    x = jnp.sin(jnp.arange(24, dtype=jnp.float32)).reshape(2, 3, 4)
    converted = convert(model, x, to="equinox")
    np.testing.assert_allclose(jax.vmap(converted)(x), model(x), atol=ATOL, rtol=ATOL)
    back = convert(converted, x[0], to="nnx")
    assert type(back) is NnxCausal
    np.testing.assert_allclose(back(x), model(x), atol=ATOL, rtol=ATOL)


# NNX blocks that take the mask as an argument and pass it on, in NNX's layout [batch, heads | 1, q, kv].


class MaskedBlock(nnx.Module):
    """A pre-norm attention block as NNX code writes it: the mask is the caller's."""

    def __init__(self, d: int, heads: int, rngs: nnx.Rngs) -> None:
        self.norm = nnx.LayerNorm(d, rngs=rngs)
        self.attn = nnx.MultiHeadAttention(heads, d, d, decode=False, rngs=rngs)

    def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
        return x + self.attn(self.norm(x), mask=mask)


def _nnx_mask(key: jax.Array, batch: int, heads: int, length: int, layout: str) -> jax.Array:
    """A boolean mask in one of NNX's layouts (batch 1: one mask for the batch); every query keeps itself."""
    rows = 1 if layout == "shared" else batch
    keep = jax.random.bernoulli(key, 0.6, (rows, heads if layout == "per_head" else 1, length, length))
    return keep | jnp.eye(length, dtype=bool)


@pytest.mark.parametrize("layout", ["per_example", "per_head", "shared"])
@settings(max_examples=2, deadline=None, database=None, derandomize=True)
@given(heads=st.sampled_from([1, 2, 4]), batch=st.integers(1, 3), length=st.integers(2, 6), seed=st.integers(0, 3))
@example(heads=2, batch=3, length=4, seed=1)  # Several heads and examples in every layout, whatever is drawn.
def test_a_nnx_block_taking_its_mask_converts_to_equinox_and_back(layout, heads, batch, length, seed):
    block = MaskedBlock(8, heads, nnx.Rngs(seed))
    kx, km = jax.random.split(jax.random.key(seed))
    x = jax.random.normal(kx, (batch, length, 8))
    mask = _nnx_mask(km, batch, heads, length, layout)
    want = block(x, mask)
    np.testing.assert_allclose(pzb.lift(block, x, mask).positional(x, mask), want, atol=ATOL, rtol=ATOL)
    converted = convert(block, x, mask, to="equinox")
    # Per example, as Equinox calls it: a mask shared by the batch is passed once, unmapped.
    one, axis = (mask[0], None) if mask.shape[0] == 1 and batch > 1 else (mask, 0)
    np.testing.assert_allclose(jax.vmap(converted, in_axes=(0, axis))(x, one), want, atol=ATOL, rtol=ATOL)
    back = convert(converted, x[0], one if axis is None else mask[0], to="nnx")
    assert type(back) is MaskedBlock
    np.testing.assert_allclose(back(x, mask), want, atol=ATOL, rtol=ATOL)


def test_the_mask_input_of_a_traced_nnx_root_is_named_by_the_input_batch_axis():
    block = MaskedBlock(8, 2, nnx.Rngs(0))
    mask = nnx.make_causal_mask(jnp.ones((3, 4)))  # [batch, 1, q, kv]
    convention = pzb.lift(block, jnp.ones((3, 4, 8)), mask).convention
    assert convention.inputs[1][0] == "batch"
    assert convention.inputs[1][1] is None  # The broadcast heads axis stays positional (size 1).


def test_a_per_example_native_attention_takes_mask_keyword_per_head_and_refuses_other_axes_naming_a_fix():
    tokens = ("seq", "features")
    call = NativeCall(_mha(2, 8), CallingConvention((tokens,) * 3 + (("seq", "kv_seq"),), tokens), batched=False)
    x = pzb.nx.wrap(jnp.sin(jnp.arange(64.0)).reshape(2, 4, 8), "batch", "seq", "features")
    causal = jnp.tril(jnp.ones((4, 4), bool))
    per_head = pzb.nx.wrap(jnp.stack([causal, jnp.ones((4, 4), bool)])[None].repeat(2, 0),
                           "batch", "heads", "seq", "kv_seq")
    got = call(x, mask=per_head).unwrap("batch", "seq", "features")
    unbatched = x.unwrap("batch", "seq", "features")
    want = jax.vmap(lambda q: _mha(2, 8)(q, q, q, per_head.unwrap("batch", "heads", "seq", "kv_seq")[0]))(unbatched)
    np.testing.assert_allclose(got, want, atol=ATOL, rtol=ATOL)
    other = pzb.nx.wrap(jnp.ones((2, 3, 4, 4), bool), "batch", "other", "seq", "kv_seq")
    with pytest.raises(PzbridgeError, match="Fix: pass a mask"):
        call(x, mask=other)
