"""NNX MultiHeadAttention rule: per-head named kernels, GQA, normalize_qk, masks, decode cache, sow_weights."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st

import pzbridge as pzb
from pzbridge.bridge.nnx.attention import NnxAttention
from pzbridge.bridge.nnx.adapter import NnxAdapter
from pzbridge.core.errors import PzbridgeError
from pzbridge.core.variables import StateVariable
from pzbridge.nn.combinators import Identity
from pzbridge.nn.foreign import Foreign
from nnx_checks import assert_round_trip, assert_same_outputs
from pzbridge.testing.numerics import assert_outputs_match


def mha(heads=4, kv_heads=None, features=8, **kwargs):
    return nnx.MultiHeadAttention(heads, features, num_kv_heads=kv_heads, decode=kwargs.pop("decode", False),
                                  rngs=nnx.Rngs(kwargs.pop("seed", 0)), **kwargs)


@settings(max_examples=20)
@given(st.sampled_from([(4, 4), (4, 2), (4, 1), (2, 2), (1, 1)]), st.booleans(), st.booleans(),
       st.sampled_from([None, 12]), st.integers(0, 99))
def test_attention_lifts_to_named_heads_and_matches_nnx(heads, normalize_qk, use_bias, qkv, seed):
    num_heads, kv_heads = heads
    model = mha(num_heads, kv_heads, normalize_qk=normalize_qk, use_bias=use_bias, qkv_features=qkv, seed=seed)
    body = pzb.lift(model).body
    assert isinstance(body, NnxAttention)
    head_dim = (qkv or 8) // num_heads
    kv_name = "heads" if kv_heads == num_heads else "kv_heads"
    assert dict(body.query.sublayers[0].weights.value.named_shape) == {
        "features": 8, "heads": num_heads, "projection": head_dim}
    assert dict(body.key.sublayers[0].weights.value.named_shape) == {
        "features": 8, kv_name: kv_heads, "projection": head_dim}
    assert dict(body.out.sublayers[0].weights.value.named_shape) == {
        "heads": num_heads, "projection": head_dim, "features": 8}
    assert (body.query_ln is None) == (not normalize_qk)
    x = jax.random.normal(jax.random.key(seed), (2, 5, 8))
    # Same op order as NNX's default kernel; grouped contractions may round differently in the last bit.
    assert_same_outputs(model, x, exact=False)
    mask = jax.random.bernoulli(jax.random.key(seed + 1), 0.7, (2, 1, 5, 5))
    assert_same_outputs(model, x, exact=False, mask=mask)
    assert_same_outputs(model, x, exact=False, is_causal=True)
    assert_round_trip(model)


def test_default_attention_matches_nnx_within_ulps_with_and_without_masks():
    model = mha(4, normalize_qk=True)
    x = jax.random.normal(jax.random.key(0), (2, 5, 8))
    # Named-head einsums and the lifted qk LayerNorm are not NNX's program (the jaxprs differ), so the outputs
    # may differ in the last bits on other CPUs (1 ulp on AMD EPYC): a few ulps, not bitwise.
    assert_same_outputs(model, x, ulps=4)
    assert_same_outputs(model, x, ulps=4, mask=nnx.make_causal_mask(jnp.ones((2, 5))))
    assert_same_outputs(model, x, ulps=4, is_causal=True)


def test_cross_attention_takes_separate_key_inputs():
    model = mha(2, features=4)
    q = jax.random.normal(jax.random.key(0), (3, 2, 4))
    kv = jax.random.normal(jax.random.key(1), (3, 6, 4))
    expected = model(q, kv)
    assert_outputs_match(pzb.lift(model).positional(q, kv), expected, same_computation=False)  # not NNX's jaxpr


def test_attention_with_named_batch_axes_and_named_mask():
    model = mha(2, features=4)
    x = jax.random.normal(jax.random.key(0), (2, 3, 4))
    mask = nnx.make_causal_mask(jnp.ones((2, 3)))
    named_mask = pzb.nx.wrap(mask[:, 0], "batch", "seq", "kv_seq")
    out = pzb.lift(model).body(pzb.nx.wrap(x, "batch", "seq", "features"), mask=named_mask)
    np.testing.assert_allclose(out.unwrap("batch", "seq", "features"), model(x, mask=mask), rtol=1e-6, atol=1e-6)


def test_decode_cache_becomes_state_variables_and_matches_nnx_step_by_step():
    model = mha(4, 2, decode=True)
    model.init_cache((2, 4, 8))
    reference = nnx.clone(model)
    lifted = pzb.lift(model)
    body = lifted.body
    assert all(isinstance(v, StateVariable) for v in (body.cached_key, body.cached_value, body.cache_index))
    assert body.cached_key.metadata["nnx_type"] is nnx.Cache
    x = jax.random.normal(jax.random.key(3), (2, 4, 8))
    for t in range(4):  # not NNX's program (the jaxprs differ): within a few ulps
        assert_outputs_match(lifted.positional(x[:, t:t + 1]), reference(x[:, t:t + 1]), same_computation=False)
    assert int(body.cache_index.value) == 4 and int(model.cache_index[...]) == 0
    lowered = pzb.lower(lifted)
    assert nnx.graphdef(lowered) == nnx.graphdef(reference)
    assert_outputs_match(lowered.cached_value[...], reference.cached_value[...], same_computation=False)
    assert_round_trip(model)


def test_decode_without_cache_explains_the_fix():
    lifted = pzb.lift(mha(2, features=4))
    with pytest.raises(PzbridgeError, match="init_cache"):
        lifted.positional(jnp.ones((1, 1, 4)), decode=True)


def test_sow_weights_works_after_lowering_and_explains_the_lifted_alternative():
    model = mha(2, features=4)
    x = jnp.ones((1, 3, 4))
    with pytest.raises(PzbridgeError, match="logits_to_weights"):
        pzb.lift(model).positional(x, sow_weights=True)
    lowered = pzb.lower(pzb.lift(model))
    lowered(x, sow_weights=True)
    assert lowered.attention_weights.get_raw_value()[0].shape == (1, 2, 3, 3)
    # A module holding sown weights has an extra attribute: it stays Foreign and round-trips exactly.
    assert isinstance(pzb.lift(lowered).body, Foreign)
    assert_round_trip(lowered)


def test_dropout_rate_and_custom_numerics_stay_foreign():
    for model in (mha(2, features=4, dropout_rate=0.1), mha(2, features=4, precision=jax.lax.Precision.HIGHEST)):
        assert isinstance(pzb.lift(model).body, Foreign)
        assert_round_trip(model)


def test_replacing_the_mask_lowers_to_an_adapter_that_runs_the_edit():
    model = mha(2, features=4)
    lifted = pzb.lift(model)
    edited = pzb.select(lifted).at_instances_of(NnxAttention).apply(
        lambda a: __import__("dataclasses").replace(a, mask=Identity()))
    lowered = pzb.lower(edited)
    assert isinstance(lowered, NnxAdapter)
    x = jax.random.normal(jax.random.key(0), (1, 3, 4))
    mask = jnp.zeros((1, 1, 3, 3), bool)
    assert np.allclose(lowered(x, mask=mask), model(x), atol=1e-6)  # the mask is ignored, as edited
