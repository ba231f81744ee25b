"""Tests for pzbridge/nn/embeddings.py: lookup / decode vs jnp references, tying, nnx parity."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st

from pzbridge.core import named_axes as nx
from pzbridge.core.errors import NamedAxisError
from pzbridge.core.variables import Parameter, ParameterSlot, unbind_params
from pzbridge.nn.combinators import Sequential
from pzbridge.nn.embeddings import EmbeddingDecode, EmbeddingLookup, EmbeddingTable
from pzbridge.testing.numerics import assert_bitwise_reproducible


def make_table(seed, vocab, d, table_first):
    data = np.random.RandomState(seed).normal(size=(vocab, d)).astype(np.float32)
    named = nx.wrap(jnp.asarray(data), "vocabulary", "features") if table_first else nx.wrap(
        jnp.asarray(data.T), "features", "vocabulary")
    return data, EmbeddingTable(Parameter(named, "embed.embeddings"))


@settings(max_examples=8)
@given(st.integers(0, 2**16), st.integers(1, 6), st.integers(1, 4), st.integers(1, 3), st.integers(1, 3), st.booleans())
def test_lookup_equals_take_vmapped_over_batch_names(seed, vocab, d, batch, seq, table_first):
    data, table = make_table(seed, vocab, d, table_first)
    ids = np.random.RandomState(seed + 1).randint(0, vocab, size=(batch, seq)).astype(np.int32)
    y = EmbeddingLookup(table)(nx.wrap(jnp.asarray(ids), "batch", "seq")).unwrap("batch", "seq", "features")
    expected = jax.vmap(jax.vmap(lambda i: jnp.asarray(data)[i]))(ids)
    np.testing.assert_array_equal(y, expected)  # both gather: they round nowhere (checked on the jaxprs)
    assert_bitwise_reproducible(lambda i: EmbeddingLookup(table)(nx.wrap(i, "batch", "seq")).unwrap(
        "batch", "seq", "features"), jax.vmap(jax.vmap(lambda i: jnp.asarray(data)[i])), jnp.asarray(ids))


@settings(max_examples=8)
@given(st.integers(0, 2**16), st.integers(1, 6), st.integers(1, 4), st.integers(1, 3), st.booleans())
def test_decode_equals_dot_with_transposed_table(seed, vocab, d, batch, table_first):
    data, table = make_table(seed, vocab, d, table_first)
    h = np.random.RandomState(seed + 2).normal(size=(batch, d)).astype(np.float32)
    y = EmbeddingDecode(table)(nx.wrap(jnp.asarray(h), "batch", "features")).unwrap("batch", "vocabulary")
    expected = jax.vmap(lambda v: jnp.asarray(data) @ v)(h)
    np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-5)


def test_tied_table_is_one_parameter_and_gradients_add_up():
    table = EmbeddingTable.from_config("embed", jax.random.key(0), 5, {"features": 3})
    model = Sequential([EmbeddingLookup(table), EmbeddingDecode(table)])
    slots, values = unbind_params(model, freeze=True)
    assert [v.label for v in values] == ["embed.embeddings"]
    ids = nx.wrap(jnp.array([1, 4]), "seq")

    def loss(vs):
        return slots.stateless_call(vs, ids)[0].unwrap("seq", "vocabulary").sum()

    grad = jax.jit(jax.grad(loss))(values)[0].value.unwrap("vocabulary", "features")
    w = table.embeddings.value.unwrap("vocabulary", "features")
    expected = jax.grad(lambda w: (w[jnp.array([1, 4])] @ w.T).sum())(w)
    np.testing.assert_allclose(grad, expected, rtol=1e-5, atol=1e-5)


def test_from_config_deterministic_labelled_and_slot():
    a = EmbeddingTable.from_config("tok", jax.random.key(3), 7, {"features": 4})
    b = EmbeddingTable.from_config("tok", jax.random.key(3), 7, {"features": 4})
    np.testing.assert_array_equal(a.embeddings.value.unwrap("vocabulary", "features"),
                                  b.embeddings.value.unwrap("vocabulary", "features"))
    assert a.embeddings.label == "tok.embeddings"
    assert EmbeddingTable.from_config("tok", None, 7, {"features": 4}).embeddings == ParameterSlot("tok.embeddings")


def test_matches_nnx_embed_and_attend():
    ref = nnx.Embed(9, 4, rngs=nnx.Rngs(0))
    table = EmbeddingTable(Parameter(nx.wrap(ref.embedding[...], "vocabulary", "features"), "e"))
    ids = jnp.array([[0, 8, 3]])
    got = EmbeddingLookup(table)(nx.wrap(ids, "batch", "seq")).unwrap("batch", "seq", "features")
    np.testing.assert_array_equal(got, ref(ids))
    assert_bitwise_reproducible(lambda i: EmbeddingLookup(table)(nx.wrap(i, "batch", "seq")).unwrap(
        "batch", "seq", "features"), ref, ids)  # NNX's program
    q = ref(ids)
    logits = jax.jit(lambda q: EmbeddingDecode(table)(nx.wrap(q, "batch", "seq", "features")).unwrap(
        "batch", "seq", "vocabulary"))(q)
    np.testing.assert_allclose(logits, jax.jit(ref.attend)(q), rtol=1e-6, atol=1e-6)


def test_errors_name_table_and_axes():
    _, table = make_table(0, 4, 2, True)
    with pytest.raises(NamedAxisError, match=r"EmbeddingLookup 'embed.embeddings'.*integer token ids"):
        EmbeddingLookup(table)(nx.zeros({"seq": 2}))
    with pytest.raises(NamedAxisError, match=r"already have axes \['features'\]"):
        EmbeddingLookup(table)(nx.wrap(jnp.zeros((2, 2), jnp.int32), "seq", "features"))
    with pytest.raises(NamedAxisError, match=r"EmbeddingDecode 'embed.embeddings'.*\['features'\]"):
        EmbeddingDecode(table)(nx.zeros({"seq": 2, "embed": 2}))
    bad = EmbeddingTable(Parameter(nx.wrap(jnp.zeros((4, 2)), "tokens", "features"), "bad"))
    with pytest.raises(NamedAxisError, match="must be a NamedArray with axis 'vocabulary'"):
        EmbeddingLookup(bad)(nx.wrap(jnp.array([0]), "seq"))
