"""LoRA round trip through Equinox: lift, adapt, lower, train with user-side APIs, re-lift, merge, lower."""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import pzbridge as pzb
from pzbridge.bridge.equinox.lora import LoRALinear, lora_filter
from pzbridge.core.errors import LowerError
from pzbridge.nn.foreign import Foreign
from pzbridge.nn.linear import Linear
from pzbridge.toolshed.lora import LowRankAdapter, loraify_linears_in_selection, merge_lora

pytestmark = pytest.mark.oldest  # also run against .ci/oldest-constraints.txt

D, HEADS, VOCAB, SEQ = 16, 2, 11, 6


class Attention(eqx.Module):
    query: eqx.nn.Linear
    key: eqx.nn.Linear
    value: eqx.nn.Linear
    out: eqx.nn.Linear

    def __init__(self, key):
        kq, kk, kv, ko = jax.random.split(key, 4)
        self.query = eqx.nn.Linear(D, D, key=kq)
        self.key = eqx.nn.Linear(D, D, key=kk)
        self.value = eqx.nn.Linear(D, D, key=kv)
        self.out = eqx.nn.Linear(D, D, key=ko)

    def __call__(self, x):  # x: (seq, D), unbatched as Equinox layers are
        split = lambda a: a.reshape(a.shape[0], HEADS, D // HEADS)  # noqa: E731
        q, k, v = (split(jax.vmap(layer)(x)) for layer in (self.query, self.key, self.value))
        logits = jnp.einsum("qhd,khd->hqk", q, k) / jnp.sqrt(D // HEADS)
        mask = jnp.tril(jnp.ones((x.shape[0], x.shape[0]), bool))
        weights = jax.nn.softmax(jnp.where(mask, logits, -1e9), axis=-1)
        return jax.vmap(self.out)(jnp.einsum("hqk,khd->qhd", weights, v).reshape(x.shape[0], D))


class Block(eqx.Module):
    norm1: eqx.nn.LayerNorm
    attn: Attention
    norm2: eqx.nn.RMSNorm
    mlp: eqx.nn.Sequential

    def __init__(self, key):
        ka, k1, k2 = jax.random.split(key, 3)
        self.norm1 = eqx.nn.LayerNorm(D)
        self.attn = Attention(ka)
        self.norm2 = eqx.nn.RMSNorm(D)
        self.mlp = eqx.nn.Sequential(
            [eqx.nn.Linear(D, 2 * D, key=k1), eqx.nn.Lambda(jax.nn.gelu), eqx.nn.Linear(2 * D, D, key=k2)]
        )

    def __call__(self, x):
        x = x + self.attn(jax.vmap(self.norm1)(x))
        return x + jax.vmap(self.mlp)(jax.vmap(self.norm2)(x))


class Transformer(eqx.Module):
    embed: eqx.nn.Embedding
    blocks: list
    head: eqx.nn.Linear

    def __init__(self, key):
        ke, kb1, kb2, kh = jax.random.split(key, 4)
        self.embed = eqx.nn.Embedding(VOCAB, D, key=ke)
        self.blocks = [Block(kb1), Block(kb2)]
        self.head = eqx.nn.Linear(D, VOCAB, key=kh)

    def __call__(self, tokens):
        x = jax.vmap(self.embed)(tokens)
        for block in self.blocks:
            x = block(x)
        return jax.vmap(self.head)(x)


def _attention_projections(lifted):
    attention = pzb.select(lifted).at_subtrees_where(
        lambda node: isinstance(node, Foreign) and node.template.class_name == "Attention"
    )
    return attention.at_instances_of(Linear)


def _loss(model, tokens, targets):
    logits = jax.vmap(model)(tokens)
    return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()


def _data():
    tokens = jax.random.randint(jax.random.key(5), (8, SEQ), 0, VOCAB)
    return tokens, jnp.roll(tokens, -1, axis=1)


def test_equinox_lora_round_trip_trains_only_adapters_and_merges_to_original_classes():
    original = Transformer(jax.random.key(0))
    tokens, targets = _data()
    lifted = pzb.lift(original)
    assert _attention_projections(lifted).count() == 8
    adapted = loraify_linears_in_selection(_attention_projections(lifted), 4, jax.random.key(1), alpha=8.0)
    lora_model = pzb.lower(adapted)
    loras = [m for m in jax.tree_util.tree_leaves(lora_model, is_leaf=lambda n: isinstance(n, LoRALinear))
             if isinstance(m, LoRALinear)]
    assert len(loras) == 8
    # B starts at zero: the adapted model computes what the original computed.
    np.testing.assert_allclose(jax.vmap(lora_model)(tokens), jax.vmap(original)(tokens), atol=1e-6)

    trainable, frozen = eqx.partition(lora_model, lora_filter(lora_model))
    optimizer = optax.adam(1e-2)
    opt_state = optimizer.init(trainable)

    @eqx.filter_jit
    def step(trainable, opt_state):
        loss, grads = eqx.filter_value_and_grad(lambda t: _loss(eqx.combine(t, frozen), tokens, targets))(trainable)
        updates, opt_state = optimizer.update(grads, opt_state, trainable)
        return eqx.apply_updates(trainable, updates), opt_state, loss

    losses = []
    for _ in range(30):
        trainable, opt_state, loss = step(trainable, opt_state)
        losses.append(float(loss))
    assert losses[-1] < losses[0] - 0.05
    trained = eqx.combine(trainable, frozen)

    # Base weights bitwise unchanged; adapters changed.
    trained_attn = trained.blocks[0].attn
    for name in ("query", "key", "value", "out"):
        layer = getattr(trained_attn, name)
        assert isinstance(layer, LoRALinear)
        assert np.array_equal(layer.linear.weight, getattr(original.blocks[0].attn, name).weight)
        assert np.array_equal(layer.linear.bias, getattr(original.blocks[0].attn, name).bias)
        assert not np.array_equal(layer.lora_b, np.zeros_like(layer.lora_b))
    assert np.array_equal(trained.head.weight, original.head.weight)

    relifted = pzb.lift(trained)
    assert pzb.select(relifted).at_instances_of(LowRankAdapter).count() == 8
    merged = pzb.lower(merge_lora(relifted))
    assert jax.tree_util.tree_structure(merged) == jax.tree_util.tree_structure(original)
    assert type(merged.blocks[1].attn.query) is eqx.nn.Linear
    assert merged.blocks[1].attn.query.weight.shape == original.blocks[1].attn.query.weight.shape
    np.testing.assert_allclose(jax.vmap(merged)(tokens), jax.vmap(trained)(tokens), atol=1e-5)
    # Layers without adapters come back as the very same arrays.
    assert merged.head.weight is original.head.weight


def test_relifting_lora_linear_uses_loraify_labels():
    lin = eqx.nn.Linear(3, 2, key=jax.random.key(0))
    lifted = pzb.lift(lin)
    adapted = loraify_linears_in_selection(pzb.select(lifted).at_instances_of(Linear), 2, jax.random.key(1))
    labels_before = sorted(v.label for v in pzb.unbind_params(adapted)[1])
    relifted = pzb.lift(pzb.lower(adapted))
    assert sorted(v.label for v in pzb.unbind_params(relifted)[1]) == labels_before == [
        "bias", "lora_a", "lora_b", "weight"
    ]


def test_lora_linear_matches_pure_jax_reference():
    lin = eqx.nn.Linear(4, 3, key=jax.random.key(0))
    a = jax.random.normal(jax.random.key(1), (4, 2))
    b = jax.random.normal(jax.random.key(2), (2, 3))
    x = jax.random.normal(jax.random.key(3), (4,))
    expected = lin.weight @ x + lin.bias + 1.5 * (x @ a @ b)
    np.testing.assert_allclose(LoRALinear(lin, a, b, alpha=3.0, rank=2)(x), expected, rtol=1e-6)


def test_lora_filter_marks_exactly_the_adapter_arrays():
    lin = eqx.nn.Linear(2, 2, key=jax.random.key(0))
    model = [LoRALinear(lin, jnp.ones((2, 1)), jnp.zeros((1, 2)), 1.0, 1), lin]
    marks = jax.tree_util.tree_leaves(lora_filter(model))
    assert marks == [False, False, True, True, False, False]


def test_adapter_on_multi_axis_linear_cannot_lower_to_lora_linear():
    lin = Linear.from_config("q", jax.random.key(0), {"features": 4}, {"heads": 2, "projection": 3})
    adapted = loraify_linears_in_selection(pzb.select(lin).at_instances_of(Linear), 1, jax.random.key(1))
    with pytest.raises(LowerError, match="one axis to one axis"):
        pzb.lower(adapted, framework="equinox")
