"""Steering at sites and absolute positions: no-op laws, cached decode == recomputation (GPT, NNX, Equinox).

References: numpy formulas for the steered activation, full recomputation of
the growing sequence (pzbridge's uncached GPT), and the original NNX /
Equinox models with the steering written into their own code.
"""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st

import pzbridge as pzb
from pzbridge.core.errors import NamedAxisError, PzbridgeError
from pzbridge.models.gpt import build_gpt, greedy_decode, make_kv_cached
from pzbridge.nn.kv_cache import KVCachingAttention
from pzbridge.toolshed.decoding import (
    add_kv_caches,
    cached_greedy_decode,
    recompute_greedy_decode,
)
from pzbridge.toolshed.steering import Steer, cache_start, resolve_last, steer
from pzbridge.toolshed.where import AxisSlice, Where

TOL = {"rtol": 1e-5, "atol": 1e-5}
D, V, STEPS = 8, 13, 3
BLOCK_1 = Where(layer="TransformerBlock", path="sublayers[1]")


def vector(seed: int = 1, size: int = D) -> pzb.nx.NamedArray:
    return pzb.nx.wrap(3.0 * jax.random.normal(jax.random.key(seed), (size,)), "features")


@pytest.fixture(scope="module")
def gpt():
    return build_gpt("g", jax.random.key(0), V, 2, 2, D, 16, 16)


PROMPT = pzb.nx.wrap(jnp.array([[1, 2, 3], [4, 5, 6]]), "batch", "seq")


def unwrap(decoded):
    return decoded.tokens.unwrap("batch", "seq"), decoded.logits.unwrap("batch", "seq", "vocabulary")


# -- laws on a transparent model -------------------------------------------------------


IDENTITY = pzb.nn.Sequential([pzb.nn.Identity()])


@settings(max_examples=30, deadline=None, derandomize=True)
@given(scale=st.floats(-4, 4, allow_nan=False, width=32),
       positions=st.one_of(st.sampled_from(["all", "last"]), st.lists(st.integers(-5, 7), min_size=1, max_size=3),
                           st.builds(slice, st.integers(0, 4), st.one_of(st.none(), st.integers(0, 6)))))
def test_steer_adds_scale_times_vector_exactly_at_the_positions(scale, positions):
    x = np.asarray(jax.random.normal(jax.random.key(2), (5, 3)), np.float32)
    v = np.array([1.0, -2.0, 0.5], np.float32)
    out = steer(IDENTITY, pzb.nn.Identity, pzb.nx.wrap(v, "features"), positions=positions, scale=scale)(
        pzb.nx.wrap(x, "seq", "features")).unwrap("seq", "features")
    if positions == "all":
        chosen = list(range(5))
    elif positions == "last":
        chosen = [4]
    elif isinstance(positions, slice):
        chosen = list(range(5))[positions]
    else:
        chosen = [p % 5 for p in positions if p < 5]
    expected = x.copy()
    expected[chosen] = x[chosen] + np.float32(scale) * v
    np.testing.assert_array_equal(np.asarray(out), expected)


@settings(max_examples=10, deadline=None, derandomize=True)
@given(chunks=st.lists(st.integers(1, 3), min_size=1, max_size=4),
       positions=st.one_of(st.lists(st.integers(0, 9), min_size=1, max_size=3),
                           st.builds(slice, st.integers(0, 5), st.one_of(st.none(), st.integers(0, 9)),
                                     st.integers(1, 3))),
       scale=st.floats(-2, 2, allow_nan=False, width=32))
def test_counting_positions_across_calls_equals_one_call_on_the_whole_sequence(chunks, positions, scale):
    total = sum(chunks)
    x = pzb.nx.wrap(jax.random.normal(jax.random.key(3), (total, 2)), "seq", "features")
    v = pzb.nx.wrap(jnp.array([1.5, -1.0]), "features")
    whole = steer(IDENTITY, pzb.nn.Identity, v, positions=positions, scale=scale, decoding=False)(x)
    counted = steer(IDENTITY, pzb.nn.Identity, v, positions=positions, scale=scale, decoding=True)
    pieces, start = [], 0
    for size in chunks:
        pieces.append(counted(x[{"seq": pzb.nx.wrap(jnp.arange(start, start + size), "seq")}]))
        start += size
    np.testing.assert_array_equal(np.asarray(pzb.nx.concatenate(pieces, "seq").unwrap("seq", "features")),
                                  np.asarray(whole.unwrap("seq", "features")))


@pytest.mark.parametrize("positions", ["all", "last", (0, 2), slice(1, None)])
def test_zero_vector_steering_is_a_bitwise_no_op(gpt, positions):
    zero = pzb.nx.wrap(jnp.zeros(D), "features")
    steered = steer(gpt, BLOCK_1, zero, positions=positions, scale=5.0)
    assert pzb.select(steered).at_instances_of(Steer).count() == 1
    np.testing.assert_array_equal(np.asarray(steered(PROMPT).unwrap("batch", "seq", "vocabulary")),
                                  np.asarray(gpt(PROMPT).unwrap("batch", "seq", "vocabulary")))


def test_steered_call_under_jit_equals_eager(gpt):
    steered = steer(make_kv_cached(gpt, {"batch": 2}, 8), BLOCK_1, vector(), positions=(1, 2), scale=0.5)
    slots, values = pzb.unbind_variables(steered, freeze=True)
    jitted, state = jax.jit(slots.stateless_call)(values, PROMPT)
    eager, eager_state = slots.stateless_call(values, PROMPT)
    # Not bitwise: XLA fuses the jitted program (layer norms, softmax) differently from op-by-op dispatch.
    np.testing.assert_allclose(np.asarray(jitted.unwrap("batch", "seq", "vocabulary")),
                               np.asarray(eager.unwrap("batch", "seq", "vocabulary")), **TOL)
    counters = {s.label: int(s.value) for s in state if s.label.startswith("steer.")}
    assert counters == {s.label: int(s.value) for s in eager_state if s.label.startswith("steer.")}
    assert list(counters.values()) == [3]


# -- pzbridge's GPT -----------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("positions", ["last", slice(2, None, 2)])
def test_gpt_cached_steered_decode_equals_steered_recomputation(gpt, positions):
    absolute = resolve_last(positions, 0, 3)
    cached = unwrap(cached_greedy_decode(steer(make_kv_cached(gpt, {"batch": 2}, 8), BLOCK_1, vector(),
                                                positions=absolute), PROMPT, STEPS))
    recomputed = unwrap(recompute_greedy_decode(steer(gpt, BLOCK_1, vector(), positions=absolute), PROMPT, STEPS))
    np.testing.assert_array_equal(cached[0], recomputed[0])
    # Not bitwise: attention over the 8-slot cache (masked) vs over the sequence's own length.
    np.testing.assert_allclose(cached[1], recomputed[1], **TOL)
    if positions == "last":  # steering composes with the GPT's own decoding loop
        composed = greedy_decode(steer(gpt, BLOCK_1, vector(), positions=absolute, decoding=True), PROMPT, STEPS)
        np.testing.assert_array_equal(composed.unwrap("batch", "seq"), cached[0])


def test_gpt_steering_changes_the_decode(gpt):
    plain = recompute_greedy_decode(gpt, PROMPT, STEPS).tokens.unwrap("batch", "seq")
    steered = recompute_greedy_decode(steer(gpt, BLOCK_1, vector(), scale=3.0), PROMPT, STEPS)
    assert not np.array_equal(plain, steered.tokens.unwrap("batch", "seq"))


def test_steering_a_copy_leaves_the_original_cache_alone(gpt):
    cached = make_kv_cached(gpt, {"batch": 2}, 8)
    steered = steer(cached, BLOCK_1, vector(), positions="last")
    steered(PROMPT)  # an eager call writes the copy's caches and counter
    indices = [int(a.cache_index.value) for a in pzb.select(cached).at_instances_of(KVCachingAttention).get_sequence()]
    assert indices == [0, 0]
    assert cache_start(steered) == 3 and cache_start(cached) == 0
    (layer,) = pzb.select(steered).at_instances_of(Steer).get_sequence()
    assert int(layer.position.value) == 3


def test_steering_a_partly_filled_cache_counts_from_its_index(gpt):
    cached = make_kv_cached(gpt, {"batch": 2}, 8)
    cached(PROMPT)
    steered = steer(cached, BLOCK_1, vector(), positions=(3,))
    (layer,) = pzb.select(steered).at_instances_of(Steer).get_sequence()
    assert int(layer.position.value) == 3


# -- NNX: traced lifting of a custom module with nnx.MultiHeadAttention's decode cache ----


class NnxBlock(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.norm = nnx.RMSNorm(D, rngs=rngs)
        self.attn = nnx.MultiHeadAttention(num_heads=2, in_features=D, use_bias=False, decode=False, rngs=rngs)
        self.mlp = nnx.Sequential(nnx.Linear(D, 16, rngs=rngs), nnx.gelu, nnx.Linear(16, D, rngs=rngs))

    def __call__(self, x, mask=None):
        x = x + self.attn(self.norm(x), mask=mask)
        return x + self.mlp(x)


class NnxLM(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.embed = nnx.Embed(V, D, rngs=rngs)
        self.blocks = nnx.List([NnxBlock(rngs) for _ in range(2)])
        self.decode = False

    def __call__(self, tokens, steering=None):  # steering: (vector, positions) written into the code, the reference
        x = self.embed(tokens)
        mask = None if self.decode else nnx.make_causal_mask(tokens)
        for i, block in enumerate(self.blocks):
            x = block(x, mask=mask)
            if i == 0 and steering is not None:
                v, keep = steering
                x = x + keep(jnp.arange(tokens.shape[-1]))[:, None] * v
        return self.embed.attend(x)


def native_recompute(model, ids, steps, steering=None):
    """Greedy decoding by running the original model on the whole growing sequence at every step."""
    sequence, tokens, logits = ids, [], []
    for _ in range(steps):
        last = model(sequence, steering)[:, -1]
        tokens.append(last.argmax(-1))
        logits.append(last)
        sequence = jnp.concatenate([sequence, tokens[-1][:, None]], axis=1)
    return np.stack(tokens, 1), np.stack(logits, 1)


@pytest.fixture(scope="module")
def nnx_models():
    model = NnxLM(nnx.Rngs(0))
    decoding = nnx.clone(model)
    decoding.decode = True
    for block in decoding.blocks:
        block.attn.decode = True
        block.attn.init_cache((2, 8, D))
    lifted = pzb.lift(decoding, PROMPT.unwrap("batch", "seq")[:, :1], strict=True)
    return model, decoding, lifted


@pytest.mark.slow
@pytest.mark.parametrize(("positions", "keep"), [("last", lambda p: p >= 2), ((1, 4), lambda p: (p == 1) | (p == 4))])
def test_nnx_cached_steered_decode_equals_the_original_recomputing_with_the_steering(nnx_models, positions, keep):
    model, decoding, lifted = nnx_models
    v = vector()
    steered = steer(lifted, Where(module="blocks.0"), v, positions=resolve_last(positions, 0, 3))
    tokens, logits = unwrap(cached_greedy_decode(steered, PROMPT, STEPS, prefill=False))
    expected_tokens, expected_logits = native_recompute(model, PROMPT.unwrap("batch", "seq"), STEPS,
                                                        (v.unwrap("features"), keep))
    np.testing.assert_array_equal(tokens, expected_tokens)
    np.testing.assert_allclose(logits, expected_logits, **TOL)  # cache + NNX decode mask vs a causal full pass
    if positions == "last":  # the same steered model recomputing every step from empty caches
        again = unwrap(recompute_greedy_decode(steered, PROMPT, STEPS, prefill=False))
        np.testing.assert_array_equal(again[0], tokens)
        np.testing.assert_allclose(again[1], logits, **TOL)
    assert int(decoding.blocks[0].attn.cache_index[...]) == 0  # neither the NNX module ...
    assert cache_start(lifted) == 0  # ... nor the lifted model moved


# -- Equinox: a custom module with eqx.nn.MultiheadAttention, cached by KVCachingAttention ----


class EqxBlock(eqx.Module):
    attn: eqx.nn.MultiheadAttention
    mlp: eqx.nn.MLP

    def __call__(self, x):
        causal = jnp.tril(jnp.ones((x.shape[0], x.shape[0]), bool))
        x = x + self.attn(x, x, x, mask=causal)
        return x + jax.vmap(self.mlp)(x)


class EqxLM(eqx.Module):
    embed: jax.Array
    blocks: list

    def __call__(self, tokens, steering=None):
        x = self.embed[tokens]
        for i, block in enumerate(self.blocks):
            x = block(x)
            if i == 0 and steering is not None:
                v, keep = steering
                x = x + keep(jnp.arange(tokens.shape[0]))[:, None] * v
        return x @ self.embed.T


@pytest.fixture(scope="module")
def eqx_models():
    keys = jax.random.split(jax.random.key(4), 5)
    model = EqxLM(jax.random.normal(keys[0], (V, D)),
                  [EqxBlock(eqx.nn.MultiheadAttention(2, D, key=keys[1 + 2 * i]),
                            eqx.nn.MLP(D, D, 16, 1, key=keys[2 + 2 * i])) for i in range(2)])
    lifted = pzb.lift(model, jnp.arange(4), strict=True)
    return model, lifted


@pytest.mark.slow
def test_equinox_cached_steered_decode_equals_the_original_recomputing_with_the_steering(eqx_models):
    model, lifted = eqx_models
    cached = add_kv_caches(lifted, {"batch": 2}, 8)
    assert pzb.select(cached).at_instances_of(KVCachingAttention).count() == 2
    v = vector(5)
    steered = steer(cached, Where(module="blocks.0"), v, positions=slice(1, None), scale=2.0)
    tokens, logits = unwrap(cached_greedy_decode(steered, PROMPT, STEPS))
    ids, sequence, expected_tokens, expected_logits = PROMPT.unwrap("batch", "seq"), None, [], []
    sequence = ids
    for _ in range(STEPS):
        last = jax.vmap(lambda t: model(t, (2.0 * v.unwrap("features"), lambda p: p >= 1)))(sequence)[:, -1]
        expected_tokens.append(last.argmax(-1))
        expected_logits.append(last)
        sequence = jnp.concatenate([sequence, expected_tokens[-1][:, None]], axis=1)
    np.testing.assert_array_equal(tokens, np.stack(expected_tokens, 1))
    np.testing.assert_allclose(logits, np.stack(expected_logits, 1), **TOL)


# -- errors ------------------------------------------------------------------------------------


def test_errors_name_the_fix(gpt):
    cached = make_kv_cached(gpt, {"batch": 2}, 8)
    with pytest.raises(PzbridgeError, match=r"pzb.nx.wrap\(v, 'features'\)"):
        steer(gpt, BLOCK_1, jnp.ones(D))
    with pytest.raises(PzbridgeError, match="put the scale inside the function"):
        steer(gpt, BLOCK_1, lambda x: x, scale=2.0)
    with pytest.raises(PzbridgeError, match="positions='last'"):
        steer(gpt, BLOCK_1, vector(), positions="first")
    with pytest.raises(PzbridgeError, match="absolute positions"):
        steer(cached, BLOCK_1, vector(), positions=-1)
    with pytest.raises(PzbridgeError, match="given twice"):
        steer(gpt, Where(layer="TransformerBlock", index={"seq": 1}), vector(), positions=2)
    with pytest.raises(NamedAxisError, match="missing or differ"):
        steer(gpt, BLOCK_1, pzb.nx.wrap(jnp.ones(3), "features"))(PROMPT)
    half = pzb.select(cached).at_instances_of(KVCachingAttention).pick_nth_selected(0).apply(
        lambda a: a, share_state=False)
    (first, _) = pzb.select(half).at_instances_of(KVCachingAttention).get_sequence()
    first.cache_index.value = jnp.int32(2)
    with pytest.raises(PzbridgeError, match="different positions"):
        steer(half, BLOCK_1, vector())


def test_where_index_on_seq_gives_positions_and_other_axes_limit_the_edit(gpt):
    x = pzb.nx.zeros({"seq": 3, "features": 2})
    v = pzb.nx.wrap(jnp.array([1.0, 2.0]), "features")
    out = steer(IDENTITY, Where(layer="Identity", index={"seq": 1, "features": 1}), v)(x)
    assert out.unwrap("seq", "features").tolist() == [[0.0, 0.0], [0.0, 2.0], [0.0, 0.0]]
    assert isinstance(AxisSlice(1, None), AxisSlice)


def test_a_function_steers_like_the_vector_it_adds():
    v = pzb.nx.wrap(jnp.array([1.0, -2.0]), "features")
    x = pzb.nx.wrap(jax.random.normal(jax.random.key(6), (4, 2)), "seq", "features")
    by_vector = steer(IDENTITY, pzb.nn.Identity, v, positions=(1, 3), scale=2.0)(x)
    by_function = steer(IDENTITY, pzb.nn.Identity, lambda a: a + 2.0 * v, positions=(1, 3))(x)
    np.testing.assert_array_equal(np.asarray(by_function.unwrap("seq", "features")),
                                  np.asarray(by_vector.unwrap("seq", "features")))
    with pytest.raises(NamedAxisError, match="keep the activation's shape"):
        steer(IDENTITY, pzb.nn.Identity, lambda a: a.sum("seq"), positions="last")(x)
