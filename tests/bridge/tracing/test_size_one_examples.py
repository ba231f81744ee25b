"""Examples with size-1 axes: a traced lift is made on a widened example and checked on the original one.

References are the original modules run on the original examples (and, for
conversions, the round trip back home). Which axes have size 1 is drawn by
hypothesis; models are written as real code is: einsums on raw arrays,
``jax.vmap`` inside ``__call__``, tied embeddings, NNX einsums.
"""

from __future__ import annotations

import warnings

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st

import pzbridge as pzb
from pzbridge.bridge import output_check
from pzbridge.bridge.convert import convert
from pzbridge.bridge.tracing.example import Example
from pzbridge.bridge.tracing.widening import (
    fresh_sizes,
    size_one_count,
    widened_examples,
)
from pzbridge.testing import nnx_strategies
from pzbridge.testing.equinox_strategies import (
    AttentionBlock,
    PerToken,
    ScaledByWeight,
    SelfAttention,
    SequenceModel,
    TiedLanguageModel,
)

SMALL = settings(max_examples=4, deadline=None, derandomize=True)


class EinsumAttention(eqx.Module):
    """Masked single-head attention on raw arrays, then a per-token MLP with ``jax.vmap``."""

    w_q: jax.Array
    w_k: jax.Array
    mlp: eqx.nn.MLP

    def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
        q, k = jnp.einsum("sd,dk->sk", x, self.w_q), jnp.einsum("sd,dk->sk", x, self.w_k)
        scores = jnp.where(mask, jnp.einsum("qk,sk->qs", q, k), -1e9)
        x = x + jnp.einsum("qs,sd->qd", jax.nn.softmax(scores, axis=-1), x)
        return x + jax.vmap(self.mlp)(x)


class Grouped(eqx.Module):
    """Runs the attention on every group of ``(groups, seq, features)`` with ``jax.vmap``."""

    attn: EinsumAttention

    def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
        return jax.vmap(self.attn, in_axes=(0, None))(x, mask)


def _grouped(d: int = 4) -> Grouped:
    k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
    return Grouped(EinsumAttention(0.5 * jax.random.normal(k1, (d, d)), 0.5 * jax.random.normal(k2, (d, d)),
                                   eqx.nn.MLP(d, d, 8, 1, key=k3)))


@SMALL
@given(groups=st.sampled_from([1, 3]), seq=st.sampled_from([1, 5]))
def test_equinox_lift_with_size_one_axes_computes_the_module_on_the_original_example(groups, seq):
    model = _grouped()
    x = jnp.sin(jnp.arange(groups * seq * 4, dtype=jnp.float32)).reshape(groups, seq, 4)
    mask = jnp.tril(jnp.ones((seq, seq), bool))
    lifted = pzb.lift(model, x, mask, strict=True)
    assert pzb.select(lifted).at_instances_of(pzb.nn.Foreign).count() == 0
    np.testing.assert_allclose(lifted.positional(x, mask), model(x, mask), atol=1e-5, rtol=1e-5)
    # Traced, not frozen at the example's sizes: it runs at other sizes too.
    longer = jnp.cos(jnp.arange(2 * 3 * 4, dtype=jnp.float32)).reshape(2, 3, 4)
    causal = jnp.tril(jnp.ones((3, 3), bool))
    np.testing.assert_allclose(lifted.positional(longer, causal), model(longer, causal), atol=1e-5, rtol=1e-5)


class NnxMixer(nnx.Module):
    """Token mixing by an einsum on a raw ``nnx.Param``, then an ``nnx.Linear`` on features."""

    def __init__(self, d: int, rngs: nnx.Rngs) -> None:
        self.gate = nnx.Param(0.3 * jax.random.normal(rngs.params(), (d, d)))
        self.out = nnx.Linear(d, d, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        h = jnp.einsum("bsd,de->bse", x, self.gate[...])
        pooled = jnp.mean(h, axis=1, keepdims=True)
        return x + self.out(jax.nn.gelu(h + pooled))


@SMALL
@given(batch=st.sampled_from([1, 2]), seq=st.sampled_from([1, 3]))
def test_nnx_lift_with_size_one_axes_computes_the_module_and_leaves_it_untouched(batch, seq):
    model = NnxMixer(4, nnx.Rngs(0))
    before = jax.tree_util.tree_leaves(nnx.state(model))
    x = jnp.cos(jnp.arange(batch * seq * 4, dtype=jnp.float32)).reshape(batch, seq, 4)
    lifted = pzb.lift(model, x, strict=True)
    assert lifted.convention.inputs[0] == ("batch", "seq", "features")
    np.testing.assert_allclose(lifted.positional(x), model(x), atol=1e-5, rtol=1e-5)
    assert all(a is b for a, b in zip(jax.tree_util.tree_leaves(nnx.state(model)), before))


@pytest.mark.parametrize("seq,body", [(1, "scaled"), (1, "attention_block"), (1, "self_attention"), (1, "rope"),
                                      (3, "scaled")])
def test_tied_language_models_lift_on_single_tokens_with_their_sequence_axis(seq, body):
    d, vocab = 4, 5
    k = jax.random.key(1)
    blocks = {
        "scaled": lambda: PerToken(ScaledByWeight(eqx.nn.Linear(d, d, key=k), jnp.linspace(0.5, 1.5, d))),
        "attention_block": lambda: AttentionBlock(eqx.nn.LayerNorm(d), eqx.nn.MultiheadAttention(2, d, key=k),
                                                  eqx.nn.RMSNorm(d), eqx.nn.MLP(d, d, 2 * d, 1, key=k)),
        "self_attention": lambda: SelfAttention(eqx.nn.MultiheadAttention(2, d, key=k), True),
        "rope": lambda: eqx.nn.RotaryPositionalEmbedding(d),
    }
    model = TiedLanguageModel.build(vocab, d, SequenceModel([blocks[body]()]), k)
    tokens = jnp.arange(seq, dtype=jnp.int32) % vocab
    lifted = pzb.lift(model, tokens, strict=True)
    assert lifted.convention.output == ("seq", "vocabulary")
    np.testing.assert_allclose(lifted.positional(tokens), model(tokens), atol=1e-5, rtol=1e-5)


def _batched(x: jax.Array) -> jax.Array:
    return jnp.stack([x, x if x.dtype.kind in "iub" else x * 0.5 - 0.25])


@pytest.mark.parametrize("body", ["scaled", "attention_block", "rope"])
def test_equinox_models_on_one_token_convert_to_nnx_and_back(body):
    d, vocab = 2 if body != "rope" else 4, 5
    k = jax.random.key(2)
    block = {"scaled": lambda: PerToken(ScaledByWeight(eqx.nn.Linear(d, d, key=k), jnp.linspace(0.5, 1.5, d))),
             "attention_block": lambda: AttentionBlock(eqx.nn.LayerNorm(d), eqx.nn.MultiheadAttention(2, d, key=k),
                                                       eqx.nn.RMSNorm(d), eqx.nn.MLP(d, d, 2 * d, 1, key=k)),
             "rope": lambda: eqx.nn.RotaryPositionalEmbedding(d)}[body]()
    model = TiedLanguageModel.build(vocab, d, SequenceModel([block]), k)
    tokens = jnp.zeros((1,), jnp.int32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        converted = convert(model, tokens, to="nnx")
        back = convert(converted, _batched(tokens), to="equinox")
    assert isinstance(converted, nnx.Module) and isinstance(back, eqx.Module)
    np.testing.assert_allclose(converted(tokens[None])[0], model(tokens), atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(back(tokens), model(tokens), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("batch,width", [(1, 2), (2, 3)])
def test_nnx_residual_einsum_converts_to_equinox_and_back(batch, width):
    model = nnx_strategies.Residual(nnx.Einsum("ba,ac->bc", (width, width), (width,), rngs=nnx.Rngs(0)))
    x = jax.random.normal(jax.random.key(3), (batch, width))
    converted = convert(model, x, to="equinox")
    back = convert(converted, x[0], to="nnx")
    np.testing.assert_allclose(jax.vmap(converted)(x), model(x), atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(back(x), model(x), atol=1e-5, rtol=1e-5)
    assert type(back) is nnx_strategies.Residual and type(back.inner) is nnx.Einsum


class NeedsOne(eqx.Module):
    """Code that only runs on a size-1 leading axis: the widened trace fails, the original one is used."""

    linear: eqx.nn.Linear

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.linear(jnp.squeeze(x, axis=0))


class BranchesOnShape(eqx.Module):
    """Python that reads a shape: at size 1 it doubles, so a trace at another size computes something else."""

    scale: jax.Array

    def __call__(self, x: jax.Array) -> jax.Array:
        y = x * self.scale
        return 2.0 * y if x.shape[0] == 1 else y


def test_a_module_that_needs_the_size_one_axis_is_traced_on_the_original_example():
    model = NeedsOne(eqx.nn.Linear(3, 2, key=jax.random.key(4)))
    x = jnp.ones((1, 3))
    lifted = pzb.lift(model, x, strict=True)
    np.testing.assert_allclose(lifted.positional(x), model(x), atol=1e-6)


def test_a_widened_trace_that_disagrees_on_the_original_example_is_not_taken():
    model = BranchesOnShape(jnp.linspace(0.5, 1.5, 3))
    x = jnp.ones((1, 3))
    lifted = pzb.lift(model, x, strict=True)
    np.testing.assert_allclose(lifted.positional(x), model(x), atol=1e-6)  # 2 * x * scale, not x * scale


def test_a_traced_lift_checks_its_output_shapes_without_evaluating_the_module_again(monkeypatch):
    evaluated = []
    original = output_check._original_shapes
    monkeypatch.setattr(output_check, "_original_shapes", lambda *a: evaluated.append(1) or original(*a))
    model = _grouped()
    x, mask = jnp.ones((2, 3, 4)), jnp.tril(jnp.ones((3, 3), bool))
    lifted = pzb.lift(model, x, mask, strict=True)
    assert evaluated == []  # the root trace's out_shape answered the check
    np.testing.assert_allclose(lifted.positional(x, mask), model(x, mask), atol=1e-5, rtol=1e-5)


@given(taken=st.sets(st.integers(1, 200), max_size=8), count=st.integers(1, 4))
def test_fresh_sizes_are_distinct_primes_dividing_no_taken_size(taken, count):
    sizes = fresh_sizes(taken, count)
    assert len(sizes) == len(set(sizes)) == count
    for size in sizes:
        assert size >= 3 and all(size % p for p in range(2, size))
        assert all(t % size for t in taken if t > 1)


@given(shapes=st.lists(st.lists(st.sampled_from([1, 2, 4]), min_size=0, max_size=3), min_size=1, max_size=3))
def test_widened_examples_grow_exactly_the_size_one_axes(shapes):
    dtypes = ["float32", "int32", "bool"]
    args = tuple(jnp.zeros(tuple(s), dtypes[i % 3]) for i, s in enumerate(shapes))
    example = Example.of(args, {})
    candidates = widened_examples(example, {6})
    ones = size_one_count(example)
    assert len(candidates) == (0 if not ones else 1 if ones == 1 else 2)
    for candidate in candidates:
        assert size_one_count(candidate) == 0
        for before, after in zip(example.args, candidate.args):
            assert after.dtype == before.dtype and len(after.shape) == len(before.shape)
            for a, b in zip(before.shape, after.shape):
                assert b == a if a != 1 else b not in (1, 2, 3, 4, 6)  # fresh: no size of the example or module
    grown = [[s for c, e in zip(candidate.args, example.args) for s, o in zip(c.shape, e.shape) if o == 1]
             for candidate in candidates]
    if candidates:
        assert len(set(grown[0])) == 1  # first: one common size (a sequence and its mask stay consistent)
    if len(candidates) == 2:
        assert len(set(grown[1])) == len(grown[1]) == ones  # then: each axis its own size
