"""Acceptance: an NNX transformer is lifted, edited, lowered, trained with nnx.Optimizer and decoded.

References are the original NNX model (outputs, KV-cache decoding) and literal expectations.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import pzbridge as pzb
from pzbridge.bridge.nnx.attention import NnxAttention
from pzbridge.bridge.nnx.embed import NnxEmbed
from pzbridge.bridge.nnx.norm import NnxRMSNorm
from pzbridge.nn.basic import Elementwise
from pzbridge.nn.combinators import Sequential
from pzbridge.testing.numerics import assert_bitwise_reproducible

VOCAB, D, HEADS, HIDDEN, LAYERS = 32, 16, 4, 32, 2


class Block(nnx.Module):
    def __init__(self, rngs):
        self.norm1 = nnx.RMSNorm(D, rngs=rngs)
        self.attn = nnx.MultiHeadAttention(num_heads=HEADS, in_features=D, use_bias=False, decode=False, rngs=rngs)
        self.norm2 = nnx.RMSNorm(D, rngs=rngs)
        self.mlp = nnx.Sequential(nnx.Linear(D, HIDDEN, rngs=rngs), nnx.gelu, nnx.Linear(HIDDEN, D, rngs=rngs))

    def __call__(self, x, mask=None, decode=False):
        x = x + self.attn(self.norm1(x), mask=mask, decode=decode)
        return x + self.mlp(self.norm2(x))


class Transformer(nnx.Module):
    def __init__(self, rngs):
        self.embed = nnx.Embed(VOCAB, D, rngs=rngs)
        self.blocks = nnx.List([Block(rngs) for _ in range(LAYERS)])
        self.norm = nnx.RMSNorm(D, rngs=rngs)

    def __call__(self, tokens, decode=False):
        x = self.embed(tokens)
        mask = None if decode else nnx.make_causal_mask(tokens)
        for block in self.blocks:
            x = block(x, mask, decode)
        return self.embed.attend(self.norm(x))  # tied output


def tokens(seed, batch=2, length=8):
    return jax.random.randint(jax.random.key(seed), (batch, length), 0, VOCAB)


def half(x):
    return 0.5 * x


def test_transformer_lifts_known_layers_with_a_tied_table():
    lifted = pzb.lift(Transformer(nnx.Rngs(0)))
    assert len(pzb.select(lifted).at_instances_of(NnxAttention).get_sequence()) == LAYERS
    assert len(pzb.select(lifted).at_instances_of(NnxRMSNorm).get_sequence()) == 2 * LAYERS + 1
    (embed,) = pzb.select(lifted).at_instances_of(NnxEmbed).get_sequence()
    assert embed.lookup.table.embeddings is embed.decode.table.embeddings


def test_edited_transformer_lowers_trains_with_nnx_optimizer_and_loss_falls():
    model = Transformer(nnx.Rngs(0))
    before = jax.tree.map(np.asarray, nnx.state(model))
    lifted = pzb.lift(model)
    edited = pzb.select(lifted).at_instances_of(NnxAttention).apply(lambda attn: Sequential([attn, Elementwise(half)]))
    lowered = pzb.lower(edited)
    assert all(isinstance(block.attn, nnx.Sequential) for block in lowered.blocks)
    assert all(type(block.attn.layers[0]) is nnx.MultiHeadAttention for block in lowered.blocks)
    # The inserted layer runs: the lowered model equals the original with attention halved.
    x = tokens(1)
    reference = nnx.clone(model)
    for block in reference.blocks:
        inner = block.attn
        block.attn = nnx.Sequential(inner, half)
    np.testing.assert_allclose(lowered(x), reference(x), rtol=1e-5, atol=1e-5)

    optimizer = nnx.Optimizer(lowered, optax.adam(1e-3), wrt=nnx.Param)
    inputs, targets = x[:, :-1], x[:, 1:]

    @nnx.jit
    def step(model, optimizer):
        def loss_fn(model):
            logits = model(inputs)
            return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()

        loss, grads = nnx.value_and_grad(loss_fn)(model)
        optimizer.update(model, grads)
        return loss

    losses = [float(step(lowered, optimizer)) for _ in range(20)]
    assert losses[-1] < losses[0] - 0.05, losses
    # The user's model is untouched by lifting, editing, lowering and training.
    after = jax.tree.map(np.asarray, nnx.state(model))
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(after)))


def decode_logits(model, prompt):
    for block in model.blocks:
        block.attn.init_cache((prompt.shape[0], prompt.shape[1], D))
    return jnp.stack([model(prompt[:, t:t + 1], decode=True)[:, 0] for t in range(prompt.shape[1])], axis=1)


def test_kv_cache_decoding_gives_the_same_logits_before_and_after_the_round_trip():
    model = Transformer(nnx.Rngs(3))
    prompt = tokens(4, length=6)
    expected = decode_logits(nnx.clone(model), prompt)
    np.testing.assert_allclose(expected, model(prompt), rtol=1e-4, atol=1e-4)  # decoding == full causal pass
    round_tripped = pzb.lower(pzb.lift(model))
    # lower(lift(m)) is m again: NNX's own program (the jaxprs are compared), so bitwise on any CPU.
    assert_bitwise_reproducible(lambda p: decode_logits(nnx.clone(round_tripped), p),
                                lambda p: decode_logits(nnx.clone(model), p), prompt)
    assert np.array_equal(decode_logits(round_tripped, prompt), expected)


def test_model_with_initialised_cache_round_trips_cache_state_and_decodes_identically():
    model = Transformer(nnx.Rngs(5))
    prompt = tokens(6, length=5)
    for block in model.blocks:
        block.attn.init_cache((2, 5, D))
    model(prompt[:, :1], decode=True)  # one token already in the cache
    lifted = pzb.lift(model)
    caches = [a.cache_index for a in pzb.select(lifted).at_instances_of(NnxAttention).get_sequence()]
    assert [int(c.value) for c in caches] == [1] * LAYERS
    lowered = pzb.lower(lifted)
    assert nnx.graphdef(lowered) == nnx.graphdef(model)
    reference = nnx.clone(model)
    for t in range(1, 5):
        step = prompt[:, t:t + 1]
        assert_bitwise_reproducible(lambda s: nnx.clone(lowered)(s, decode=True),
                                    lambda s: nnx.clone(reference)(s, decode=True), step)  # NNX's program
        assert np.array_equal(lowered(step, decode=True), reference(step, decode=True))
    assert int(lowered.blocks[0].attn.cache_index[...]) == 5
    assert int(model.blocks[0].attn.cache_index[...]) == 1  # the original's cache did not move
