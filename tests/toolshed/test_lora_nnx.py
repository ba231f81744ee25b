"""LoRA round trip through Flax NNX: lift, adapt, lower to nnx.LoRALinear, train with nnx.Optimizer, merge.

The NNX bridge has no MultiHeadAttention rule yet, so the transformer's
attention is a custom module built from ``nnx.Linear`` projections (it lifts to
``Foreign`` with lifted ``Linear`` children).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import pzbridge as pzb
from pzbridge.nn.foreign import Foreign
from pzbridge.nn.linear import Linear
from pzbridge.toolshed.lora import LowRankAdapter, loraify_linears_in_selection, merge_lora

pytestmark = pytest.mark.oldest  # also run against .ci/oldest-constraints.txt

D, HEADS, VOCAB, SEQ = 16, 2, 11, 6


class Attention(nnx.Module):
    def __init__(self, rngs):
        self.query = nnx.Linear(D, D, rngs=rngs)
        self.key = nnx.Linear(D, D, rngs=rngs)
        self.value = nnx.Linear(D, D, rngs=rngs)
        self.out = nnx.Linear(D, D, rngs=rngs)

    def __call__(self, x):  # x: (batch, seq, D)
        split = lambda a: a.reshape(*a.shape[:-1], HEADS, D // HEADS)  # noqa: E731
        q, k, v = split(self.query(x)), split(self.key(x)), split(self.value(x))
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) / jnp.sqrt(D // HEADS)
        mask = jnp.tril(jnp.ones((x.shape[1], x.shape[1]), bool))
        weights = jax.nn.softmax(jnp.where(mask, logits, -1e9), axis=-1)
        return self.out(jnp.einsum("bhqk,bkhd->bqhd", weights, v).reshape(x.shape))


class Block(nnx.Module):
    def __init__(self, rngs):
        self.norm1 = nnx.RMSNorm(D, rngs=rngs)
        self.attn = Attention(rngs)
        self.norm2 = nnx.RMSNorm(D, rngs=rngs)
        self.up = nnx.Linear(D, 2 * D, rngs=rngs)
        self.down = nnx.Linear(2 * D, D, rngs=rngs)

    def __call__(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.down(jax.nn.gelu(self.up(self.norm2(x))))


class Transformer(nnx.Module):
    def __init__(self, rngs):
        self.embed = nnx.Embed(VOCAB, D, rngs=rngs)
        self.blocks = nnx.List([Block(rngs), Block(rngs)])
        self.head = nnx.Linear(D, VOCAB, rngs=rngs)

    def __call__(self, tokens):
        x = self.embed(tokens)
        for block in self.blocks:
            x = block(x)
        return self.head(x)


def _attention_projections(lifted):
    attention = pzb.select(lifted).at_subtrees_where(
        lambda node: isinstance(node, Foreign) and node.template.class_name == "Attention"
    )
    return attention.at_instances_of(Linear)


def _data():
    tokens = jax.random.randint(jax.random.key(5), (8, SEQ), 0, VOCAB)
    return tokens, jnp.roll(tokens, -1, axis=1)


def _base_params(model):
    return nnx.state(model, nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam)))


def test_nnx_lora_round_trip_trains_only_lora_params_and_merges_to_original_graphdef():
    original = Transformer(nnx.Rngs(0))
    original_graphdef = nnx.graphdef(original)
    original_params = jax.tree_util.tree_map(np.asarray, nnx.state(original, nnx.Param))
    tokens, targets = _data()

    lifted = pzb.lift(original)
    assert _attention_projections(lifted).count() == 8
    adapted = loraify_linears_in_selection(_attention_projections(lifted), 4, jax.random.key(1))
    model = pzb.lower(adapted)
    assert isinstance(model.blocks[0].attn.query, nnx.LoRALinear)
    assert isinstance(model.blocks[0].attn.query.lora.lora_b, nnx.LoRAParam)
    assert type(model.blocks[0].up) is nnx.Linear
    np.testing.assert_allclose(model(tokens), original(tokens), atol=1e-6)

    optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.LoRAParam)

    @nnx.jit
    def train_step(model, optimizer, tokens, targets):
        def loss_fn(model):
            return optax.softmax_cross_entropy_with_integer_labels(model(tokens), targets).mean()

        loss, grads = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, nnx.LoRAParam))(model)
        optimizer.update(model, grads)
        return loss

    lora_before = jax.tree_util.tree_map(np.asarray, nnx.state(model, nnx.LoRAParam))
    losses = [float(train_step(model, optimizer, tokens, targets)) for _ in range(50)]
    assert losses[-1] < losses[0] - 0.05

    # Base Params bitwise unchanged (the original model's too); LoRAParams changed.
    base_after = jax.tree_util.tree_map(np.asarray, _base_params(model))
    assert np.array_equal(base_after["blocks"][0]["attn"]["query"]["kernel"].get_value(),
                          original_params["blocks"][0]["attn"]["query"]["kernel"].get_value())
    flat_orig = dict(nnx.to_flat_state(original_params))
    for path, leaf in nnx.to_flat_state(base_after):
        assert np.array_equal(leaf.get_value(), flat_orig[path].get_value()), path
    lora_after = nnx.state(model, nnx.LoRAParam)
    changed = [not np.array_equal(np.asarray(a.get_value()), b.get_value())
               for (_, a), (_, b) in zip(nnx.to_flat_state(lora_after), nnx.to_flat_state(lora_before))]
    assert len(changed) == 16 and all(changed)

    relifted = pzb.lift(model)
    assert pzb.select(relifted).at_instances_of(LowRankAdapter).count() == 8
    merged = pzb.lower(merge_lora(relifted))
    assert nnx.graphdef(merged) == original_graphdef
    np.testing.assert_allclose(merged(tokens), model(tokens), atol=1e-5)


def test_alpha_is_folded_into_lora_b_when_lowering_to_nnx():
    lin = nnx.Linear(3, 2, rngs=nnx.Rngs(0))
    lifted = pzb.lift(lin)
    adapted = loraify_linears_in_selection(pzb.select(lifted).at_instances_of(Linear), 2, jax.random.key(1), alpha=6.0)
    b = pzb.nx.wrap(jnp.arange(4.0).reshape(2, 2), "lora_rank", "features_out")
    adapter = pzb.select(adapted).at_instances_of(LowRankAdapter).get()
    adapter.lora_b.value = b
    lowered = pzb.lower(adapted)
    np.testing.assert_array_equal(lowered.lora.lora_b.get_value(), 3.0 * np.arange(4.0).reshape(2, 2))
    x = jax.random.normal(jax.random.key(2), (5, 3))
    a = adapter.lora_a.value.unwrap("features", "lora_rank")
    reference = x @ lin.kernel.get_value() + lin.bias.get_value() + 3.0 * (x @ a @ np.arange(4.0).reshape(2, 2))
    np.testing.assert_allclose(lowered(x), reference, rtol=1e-5, atol=1e-6)


def test_relifted_native_lora_linear_is_an_adapter_with_matching_outputs():
    native = nnx.LoRALinear(4, 3, lora_rank=2, rngs=nnx.Rngs(0), b_initializer=nnx.initializers.normal(1.0))
    lifted = pzb.lift(native)
    adapter = pzb.select(lifted).at_instances_of(LowRankAdapter).get()
    assert adapter.lora_b.value.data_array is native.lora.lora_b.get_raw_value()
    x = jax.random.normal(jax.random.key(1), (2, 4))
    np.testing.assert_allclose(lifted.positional(x), native(x), rtol=1e-5, atol=1e-6)
    lowered = pzb.lower(lifted)
    assert nnx.graphdef(lowered) == nnx.graphdef(native)


def test_shared_linear_gets_one_lora_pair_in_nnx():
    class Tied(nnx.Module):
        def __init__(self):
            self.a = nnx.Linear(3, 3, rngs=nnx.Rngs(0))
            self.b = self.a

        def __call__(self, x):
            return self.b(self.a(x))

    lifted = pzb.lift(Tied())
    adapted = loraify_linears_in_selection(pzb.select(lifted).at_instances_of(Linear), 1, jax.random.key(1))
    adapters = pzb.select(adapted).at_instances_of(LowRankAdapter).get_sequence()
    assert all(ad.lora_a is adapters[0].lora_a for ad in adapters)
    lowered = pzb.lower(adapted)
    assert lowered.a.lora.lora_a is lowered.b.lora.lora_a


@pytest.mark.parametrize("rank", [1, 3])
def test_lora_params_lowered_have_nnx_layouts(rank):
    lifted = pzb.lift(nnx.Linear(5, 4, rngs=nnx.Rngs(0)))
    adapted = loraify_linears_in_selection(pzb.select(lifted).at_instances_of(Linear), rank, jax.random.key(1))
    lowered = pzb.lower(adapted)
    assert lowered.lora.lora_a.shape == (5, rank) and lowered.lora.lora_b.shape == (rank, 4)
