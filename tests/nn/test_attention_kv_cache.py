"""KVCachingAttention: prefill + token-by-token decoding equals a full forward pass."""

from __future__ import annotations

import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import pzbridge as pzb
from pzbridge.core import named_axes as nx
from pzbridge.core.errors import NamedAxisError
from pzbridge.nn.attention import Attention
from pzbridge.nn.kv_cache import KVCachingAttention, write_into_cache
from pzbridge.nn.rope import ApplyRoPE


def build(seed: int, heads: int, kv_heads: int, rope: bool) -> Attention:
    attn = Attention.from_config("a", jax.random.key(seed), d_model=6, num_heads=heads, qk_size=4,
                                 num_kv_heads=kv_heads, use_qkv_bias=True, rope=ApplyRoPE() if rope else None)
    # Random biases too (they start at zero).
    for var in jax.tree_util.tree_leaves(attn):
        if isinstance(var, pzb.Parameter):
            key = jax.random.fold_in(jax.random.key(seed), zlib.crc32(var.label.encode()) % 1000)
            var.value = nx.NamedArray(jax.random.normal(key, var.value.data_array.shape), var.value.named_axes)
    return attn


def decode_in_chunks(cached: KVCachingAttention, x: jax.Array, chunks: list[int]) -> tuple[list[jax.Array], tuple]:
    """Runs the caching layer on consecutive chunks of x [B, T, D] via jitted stateless calls."""
    slots, values = pzb.unbind_variables(cached, freeze=True)
    step = jax.jit(lambda vals, xs: slots.stateless_call(vals, nx.wrap(xs, "batch", "seq", "features")))
    outs, start = [], 0
    for size in chunks:
        y, new_state = step(values, x[:, start : start + size])
        new = {v.label: v for v in new_state}
        values = tuple(new.get(v.label, v) for v in values)
        outs.append(y.unwrap("batch", "seq", "features"))
        start += size
    return outs, values


@settings(max_examples=8)
@given(st.sampled_from([(2, 2), (4, 2), (3, 1)]), st.integers(1, 4), st.integers(1, 3), st.integers(0, 3),
       st.booleans(), st.integers(0, 1000))
def test_prefill_then_decode_matches_full_forward(heads_cfg, prompt, steps, spare, rope, seed):
    heads, kv_heads = heads_cfg
    attn = build(seed, heads, kv_heads, rope)
    total = prompt + steps
    x = jax.random.normal(jax.random.key(seed + 1), (2, total, 6))
    full = jax.jit(lambda xs: attn(nx.wrap(xs, "batch", "seq", "features")).unwrap("batch", "seq", "features"))(x)
    kv_name = "heads" if heads == kv_heads else "kv_heads"
    cached = KVCachingAttention.from_uncached(attn, total + spare, {"batch": 2, kv_name: kv_heads, "projection": 4}, "a")
    outs, values = decode_in_chunks(cached, x, [prompt] + [1] * steps)
    np.testing.assert_allclose(jnp.concatenate(outs, axis=1), full, atol=1e-5, rtol=1e-5)
    index = {v.label: v.value for v in values}["a.cache_index"]
    assert int(index) == total


def test_cache_holds_projected_keys_and_zeros_after_index_like_nnx():
    attn = build(0, 2, 2, rope=False)
    cached = KVCachingAttention.from_uncached(attn, 5, {"batch": 1, "heads": 2, "projection": 4}, "a")
    x = jax.random.normal(jax.random.key(1), (1, 3, 6))
    cached(nx.wrap(x, "batch", "seq", "features"))
    w = attn.input_to_key.sublayers[0].sublayers[0].weights.value.unwrap("features", "heads", "projection")
    b = attn.input_to_key.sublayers[0].sublayers[1].bias.value.unwrap("heads", "projection")
    keys = cached.cached_keys.value.unwrap("batch", "kv_seq", "heads", "projection")  # NNX's (B, L, H_kv, hd)
    np.testing.assert_allclose(keys[:, :3], jnp.einsum("btd,dhk->bthk", x, w) + b, atol=1e-5)
    np.testing.assert_array_equal(keys[:, 3:], 0.0)
    assert int(cached.cache_index.value) == 3
    assert cached.to_uncached() == attn


def test_cache_does_not_touch_the_original_attention_and_labels_are_prefixed():
    attn = build(0, 2, 2, rope=True)
    cached = KVCachingAttention.from_uncached(attn, 4, {"heads": 2, "projection": 4}, "blk.attn")
    labels = {v.label for v in pzb.unbind_state_vars(cached, freeze=True)[1]}
    assert labels == {"blk.attn.cached_keys", "blk.attn.cached_values", "blk.attn.cache_index"}
    assert pzb.unbind_state_vars(attn, freeze=True)[1] == ()


def test_write_into_cache_reports_mismatched_axes():
    cache = nx.zeros({"batch": 2, "kv_seq": 4, "heads": 1})
    with pytest.raises(NamedAxisError, match="do not fit the cache"):
        write_into_cache(cache, nx.zeros({"batch": 3, "kv_seq": 1, "heads": 1}), 0, "kv_seq")
    with pytest.raises(NamedAxisError, match="do not fit the cache"):
        write_into_cache(cache, nx.zeros({"batch": 2, "kv_seq": 5, "heads": 1}), 0, "kv_seq")
    with pytest.raises(NamedAxisError, match="must not contain 'kv_seq'"):
        KVCachingAttention.from_uncached(build(0, 2, 2, False), 4, {"kv_seq": 4}, "a")
