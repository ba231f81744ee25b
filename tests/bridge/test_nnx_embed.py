"""NNX Embed rule: shared lookup / tied decode table, exact outputs, round trips, named batch axes."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st

import pzbridge as pzb
from pzbridge.bridge.nnx.adapter import NnxAdapter
from pzbridge.bridge.nnx.embed import NnxEmbed
from pzbridge.core.variables import Parameter
from pzbridge.nn.basic import Elementwise
from pzbridge.nn.combinators import Sequential
from pzbridge.nn.embeddings import EmbeddingDecode, EmbeddingLookup
from pzbridge.nn.foreign import Foreign
from nnx_checks import assert_round_trip, assert_same_outputs
from pzbridge.testing import numerics


@settings(max_examples=15)
@given(st.integers(2, 9), st.integers(1, 5), st.integers(0, 99))
def test_embed_lookup_and_attend_share_one_table_and_match_nnx(vocab, features, seed):
    model = nnx.Embed(vocab, features, rngs=nnx.Rngs(seed))
    body = pzb.lift(model).body
    assert isinstance(body, NnxEmbed)
    assert isinstance(body.lookup, EmbeddingLookup) and isinstance(body.decode, EmbeddingDecode)
    table = body.lookup.table.embeddings
    assert isinstance(table, Parameter) and table is body.decode.table.embeddings
    assert table.value.data_array is model.embedding.get_raw_value()  # the very buffer
    assert dict(table.value.named_shape) == {"vocabulary": vocab, "features": features}
    tokens = jax.random.randint(jax.random.key(seed), (2, 3), 0, vocab)
    assert_same_outputs(model, tokens)
    query = jax.random.normal(jax.random.key(seed + 1), (2, 3, features))
    got = body.attend(pzb.nx.wrap(query, "batch", "seq", "features"))
    # One einsum instead of NNX's dot with a transposed table: equal up to float rounding.
    np.testing.assert_allclose(got.unwrap("batch", "seq", "vocabulary"), model.attend(query), rtol=1e-6, atol=1e-6)
    assert_round_trip(model)


def test_embed_lookup_keeps_named_batch_axes():
    model = nnx.Embed(5, 3, rngs=nnx.Rngs(0))
    tokens = jnp.array([[0, 4], [2, 2]])
    names = ("batch", "seq")
    out = pzb.lift(model).body(pzb.nx.wrap(tokens, *names))
    assert np.array_equal(out.unwrap(*names, "features"), model(tokens))
    # Bitwise on any CPU: NNX's own program (and a lookup rounds nowhere); the jaxprs are compared.
    numerics.assert_bitwise_reproducible(
        lambda t: pzb.lift(model).body(pzb.nx.wrap(t, *names)).unwrap(*names, "features"), model, tokens)


def test_one_token_vocabulary_and_dtype_casts_stay_foreign():
    for model in (nnx.Embed(1, 3, rngs=nnx.Rngs(0)), nnx.Embed(4, 3, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))):
        assert isinstance(pzb.lift(model).body, Foreign)
        assert_round_trip(model)


def test_editing_the_table_reaches_lookup_and_decode_and_lowers_into_nnx_embed():
    model = nnx.Embed(4, 2, rngs=nnx.Rngs(0))
    lifted = pzb.lift(model)
    table = lifted.body.lookup.table.embeddings
    table.value = pzb.nx.wrap(jnp.arange(8.0).reshape(4, 2), "vocabulary", "features")
    lowered = pzb.lower(lifted)
    assert type(lowered) is nnx.Embed
    assert np.array_equal(lowered.embedding[...], np.arange(8.0).reshape(4, 2))
    assert np.array_equal(lowered.attend(jnp.ones((1, 2))), [[1.0, 5.0, 9.0, 13.0]])
    assert np.array_equal(model.embedding[...], nnx.Embed(4, 2, rngs=nnx.Rngs(0)).embedding[...])


def test_edited_lookup_lowers_to_an_adapter():
    lifted = pzb.lift(nnx.Embed(4, 2, rngs=nnx.Rngs(0)))
    body = lifted.body
    edited = NnxEmbed(Sequential([body.lookup, Elementwise(jnp.tanh)]), body.decode, config=body.config)
    assert isinstance(pzb.lower(edited, framework="nnx"), NnxAdapter)
