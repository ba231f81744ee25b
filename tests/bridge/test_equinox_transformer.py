"""An Equinox transformer written by a user: lift, intervene after every attention, replace an MLP, lower, train."""

from __future__ import annotations

import dataclasses
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax

import pzbridge as pzb
from pzbridge.bridge.equinox.linear import EqxMLP
from pzbridge.bridge.equinox.attention import EqxMultiheadAttention
from pzbridge.core import named_axes as nx
from pzbridge.nn.foreign import Foreign
from pzbridge.testing.equinox_strategies import assert_outputs_close, assert_round_trip

D, HEADS, VOCAB, SEQ, BLOCKS = 8, 2, 13, 6, 2


class TransformerBlock(eqx.Module):
    ln1: eqx.nn.LayerNorm
    attn: eqx.nn.MultiheadAttention
    ln2: eqx.nn.LayerNorm
    mlp: eqx.nn.MLP

    def __init__(self, key):
        k1, k2 = jax.random.split(key)
        self.ln1, self.ln2 = eqx.nn.LayerNorm(D), eqx.nn.LayerNorm(D)
        self.attn = eqx.nn.MultiheadAttention(HEADS, D, key=k1)
        self.mlp = eqx.nn.MLP(D, D, 4 * D, 1, activation=jax.nn.gelu, key=k2)

    def __call__(self, x, *, key=None):
        h = jax.vmap(self.ln1)(x)
        x = x + self.attn(h, h, h, jnp.tril(jnp.ones((x.shape[0], x.shape[0]), bool)))
        return x + jax.vmap(self.mlp)(jax.vmap(self.ln2)(x))


class Transformer(eqx.Module):
    embedding: eqx.nn.Embedding
    blocks: list[TransformerBlock]
    ln_f: eqx.nn.LayerNorm
    head: eqx.nn.Linear

    def __init__(self, key):
        keys = jax.random.split(key, BLOCKS + 2)
        self.embedding = eqx.nn.Embedding(VOCAB, D, key=keys[0])
        self.blocks = [TransformerBlock(k) for k in keys[1:-1]]
        self.ln_f = eqx.nn.LayerNorm(D)
        self.head = eqx.nn.Linear(D, VOCAB, key=keys[-1])

    def __call__(self, tokens, *, key=None):
        x = jax.vmap(self.embedding)(tokens)
        for block in self.blocks:
            x = block(x)
        return jax.vmap(self.head)(jax.vmap(self.ln_f)(x))


@pzb.pytree_dataclass
class Steer(pzb.nn.Layer):
    """The intervention: adds a learned vector over ``features``."""

    shift: Any

    def __call__(self, x, /, **side_inputs):
        return x + self.shift.value


def _insert_steering(attention: EqxMultiheadAttention, index: int) -> EqxMultiheadAttention:
    steer = Steer(pzb.Parameter(nx.zeros({"features": D}), f"steer{index}"))
    output = pzb.nn.Sequential([*attention.attn_value_to_output.sublayers, steer])
    return dataclasses.replace(attention, attn_value_to_output=output)


def _edited_model():
    model = Transformer(jax.random.key(0))
    lifted = pzb.lift(model)
    edited = pzb.select(lifted).at_instances_of(EqxMultiheadAttention).apply_with_selected_index(
        lambda i, a: _insert_steering(a, i))
    new_mlp = pzb.nn.Sequential([
        pzb.nn.Affine.from_config("new_mlp.up", jax.random.key(1), {"features": D}, {"features": 2 * D}),
        pzb.nn.Elementwise(jax.nn.relu),
        pzb.nn.Affine.from_config("new_mlp.down", jax.random.key(2), {"features": 2 * D}, {"features": D}),
    ])
    edited = pzb.select(edited).at_instances_of(EqxMLP).pick_nth_selected(0).set(new_mlp)
    return model, lifted, edited


def test_transformer_lifts_to_foreign_blocks_with_native_layers_inside():
    model = Transformer(jax.random.key(0))
    lifted = pzb.lift(model)
    assert isinstance(lifted.body, Foreign)
    assert pzb.select(lifted).at_instances_of(EqxMultiheadAttention).count() == BLOCKS
    assert pzb.select(lifted).at_instances_of(EqxMLP).count() == BLOCKS
    tokens = jnp.arange(SEQ) % VOCAB
    assert_outputs_close(model(tokens), lifted.positional(tokens))
    assert_round_trip(model, pzb.lower(lifted))


def test_intervention_after_every_attention_and_replaced_mlp_lower_to_a_module_that_trains():
    model, lifted, edited = _edited_model()
    tokens = jnp.arange(SEQ) % VOCAB
    lowered = pzb.lower(edited)
    assert isinstance(lowered, Transformer)
    # Untouched layers come back as the original arrays; the replaced MLP is native Equinox.
    assert lowered.blocks[1].mlp.layers[0].weight is model.blocks[1].mlp.layers[0].weight
    assert lowered.embedding.weight is model.embedding.weight
    assert [type(layer) for layer in lowered.blocks[0].mlp.layers] == [eqx.nn.Linear, eqx.nn.Lambda, eqx.nn.Linear]
    assert isinstance(lowered.blocks[0].attn, eqx.Module)

    run = eqx.filter_jit(lambda m, t: m(t))
    assert_outputs_close(edited.positional(tokens), run(lowered, tokens))
    # The intervention is live: a non-zero steering vector changes the output.
    steered = pzb.select(edited).at_instances_of(Steer).apply(
        lambda s: Steer(pzb.Parameter(nx.wrap(jnp.linspace(-1.0, 1.0, D), "features"), s.shift.label)))
    assert not np.allclose(run(pzb.lower(steered), tokens), run(lowered, tokens))

    targets = jnp.roll(tokens, -1)

    def loss_fn(m):
        logits = m(tokens)
        return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()

    optimizer = optax.adam(1e-2)
    state = optimizer.init(eqx.filter(lowered, eqx.is_array))

    @eqx.filter_jit
    def step(m, state):
        loss, grads = eqx.filter_value_and_grad(loss_fn)(m)
        updates, state = optimizer.update(grads, state, eqx.filter(m, eqx.is_array))
        return eqx.apply_updates(m, updates), state, loss

    losses = []
    for _ in range(20):
        lowered, state, loss = step(lowered, state)
        losses.append(float(loss))
    assert losses[-1] < losses[0] * 0.9
    params, _ = eqx.partition(lowered, eqx.is_array)
    assert any(np.any(np.asarray(leaf) != 0) for leaf in jax.tree_util.tree_leaves(params.blocks[0].attn))
