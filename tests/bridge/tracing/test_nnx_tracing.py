"""Traced lifting of custom Flax NNX modules written the way real NNX code is written.

References are the original modules themselves: outputs at two batch and
sequence sizes, eager and under jit, ``lower(lift(m, x))`` giving ``m`` back
(same class, ``nnx.graphdef`` and arrays), and the user's module never
touched.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import pzbridge as pzb
from pzbridge.bridge.nnx.adapter import NnxAdapter
from pzbridge.core.errors import LiftError
from pzbridge.nn.dataflow import CallChild, Traced
from pzbridge.testing.numerics import assert_outputs_match
from pzbridge.toolshed.lora import loraify_linears_in_selection, merge_lora


class RMSNorm(nnx.Module):
    """Hand-written RMSNorm with an ``nnx.Param`` scale."""

    def __init__(self, dim: int, eps: float = 1e-6, *, rngs: nnx.Rngs):
        self.scale = nnx.Param(1.0 + 0.1 * jax.random.normal(rngs.params(), (dim,)))
        self.eps = eps

    def __call__(self, x):
        var = jnp.mean(x * x, axis=-1, keepdims=True)
        return x * jax.lax.rsqrt(var + self.eps) * self.scale[...]


class Attention(nnx.Module):
    """Grouped-query attention: einsums on raw ``nnx.Param`` s with heads in the weight shapes."""

    def __init__(self, dim: int, heads: int, kv_heads: int, *, rngs: nnx.Rngs):
        init = nnx.initializers.normal(0.3)
        head_dim = dim // heads
        self.wq = nnx.Param(init(rngs.params(), (dim, heads, head_dim)))
        self.wk = nnx.Param(init(rngs.params(), (dim, kv_heads, head_dim)))
        self.wv = nnx.Param(init(rngs.params(), (dim, kv_heads, head_dim)))
        self.wo = nnx.Param(init(rngs.params(), (heads, head_dim, dim)))
        self.heads, self.kv_heads = heads, kv_heads

    def __call__(self, x):
        seq = x.shape[-2]
        q = jnp.einsum("bsd,dhk->bshk", x, self.wq[...])
        k = jnp.einsum("bsd,dgk->bsgk", x, self.wk[...])
        v = jnp.einsum("bsd,dgk->bsgk", x, self.wv[...])
        k = jnp.repeat(k, self.heads // self.kv_heads, axis=2)
        v = jnp.repeat(v, self.heads // self.kv_heads, axis=2)
        scores = jnp.einsum("bqhk,bshk->bhqs", q, k) / jnp.sqrt(q.shape[-1]).astype(x.dtype)
        scores = jnp.where(jnp.tril(jnp.ones((seq, seq), bool)), scores, jnp.finfo(scores.dtype).min)
        z = jnp.einsum("bhqs,bshk->bqhk", jax.nn.softmax(scores, axis=-1), v)
        return jnp.einsum("bqhk,hkd->bqd", z, self.wo[...])


class SwiGLU(nnx.Module):
    def __init__(self, dim: int, hidden: int, *, rngs: nnx.Rngs):
        self.gate = nnx.Linear(dim, hidden, use_bias=False, rngs=rngs)
        self.up = nnx.Linear(dim, hidden, use_bias=False, rngs=rngs)
        self.down = nnx.Linear(hidden, dim, use_bias=False, rngs=rngs)

    def __call__(self, x):
        return self.down(jax.nn.silu(self.gate(x)) * self.up(x))


class DecoderBlock(nnx.Module):
    def __init__(self, dim: int = 8, heads: int = 4, kv_heads: int = 2, hidden: int = 16, *, rngs: nnx.Rngs):
        self.attn_norm = RMSNorm(dim, rngs=rngs)
        self.attn = Attention(dim, heads, kv_heads, rngs=rngs)
        self.mlp_norm = RMSNorm(dim, rngs=rngs)
        self.mlp = SwiGLU(dim, hidden, rngs=rngs)

    def __call__(self, x):
        x = x + self.attn(self.attn_norm(x))
        return x + self.mlp(self.mlp_norm(x))


class Decoder(nnx.Module):
    """A Llama-style decoder with tied embeddings (``nnx.Embed`` and ``embed.attend``)."""

    def __init__(self, vocab: int = 11, dim: int = 8, layers: int = 2, *, rngs: nnx.Rngs):
        self.embed = nnx.Embed(vocab, dim, rngs=rngs)
        self.layers = nnx.List([DecoderBlock(dim, rngs=rngs) for _ in range(layers)])
        self.norm = RMSNorm(dim, rngs=rngs)

    def __call__(self, tokens):
        x = self.embed(tokens)
        for layer in self.layers:
            x = layer(x)
        return self.embed.attend(self.norm(x))


class LinearBlock(nnx.Module):
    """``nnx.Linear`` children called directly, a residual and a LayerNorm."""

    def __init__(self, dim: int = 6, hidden: int = 12, *, rngs: nnx.Rngs):
        self.fc1 = nnx.Linear(dim, hidden, rngs=rngs)
        self.fc2 = nnx.Linear(hidden, dim, rngs=rngs)
        self.norm = nnx.LayerNorm(dim, rngs=rngs)

    def __call__(self, x):
        return self.norm(x + self.fc2(jax.nn.gelu(self.fc1(x), approximate=False), out_sharding=None))


def _jit_positional(lifted, *args):
    return jax.jit(lambda m, *a: m.positional(*a))(pzb.freeze_variables(lifted), *args)


def _snapshot(module):
    """The module's graph structure, Variable objects and arrays (to check nothing was touched)."""
    variables = jax.tree_util.tree_leaves(nnx.state(module), is_leaf=lambda v: isinstance(v, nnx.Variable))
    return nnx.graphdef(module), [(v, v.get_raw_value()) for v in variables]


def _assert_untouched(module, snapshot):
    graphdef, pairs = snapshot
    assert nnx.graphdef(module) == graphdef
    now = jax.tree_util.tree_leaves(nnx.state(module), is_leaf=lambda v: isinstance(v, nnx.Variable))
    assert len(now) == len(pairs)
    assert all(v is old and v.get_raw_value() is raw for v, (old, raw) in zip(now, pairs))


def _assert_same_module(lowered, original):
    assert type(lowered) is type(original)
    assert nnx.graphdef(lowered) == nnx.graphdef(original)
    mine = jax.tree_util.tree_leaves(nnx.state(lowered), is_leaf=lambda v: isinstance(v, nnx.Variable))
    theirs = jax.tree_util.tree_leaves(nnx.state(original), is_leaf=lambda v: isinstance(v, nnx.Variable))
    assert len(mine) == len(theirs)
    for a, b in zip(mine, theirs):
        assert type(a) is type(b) and a is not b  # new Variables of the same type ...
        assert np.array_equal(np.asarray(a.get_raw_value()), np.asarray(b.get_raw_value()))  # ... same values


def test_decoder_block_traces_without_foreign_and_matches_at_two_sizes():
    block = DecoderBlock(rngs=nnx.Rngs(0))
    lifted = pzb.lift(block, jnp.ones((2, 5, 8)), strict=True)
    assert pzb.select(lifted).at_instances_of(pzb.nn.Foreign).count() == 0
    assert pzb.select(lifted).at_instances_of(pzb.nn.Residual).count() == 2
    assert lifted.convention.inputs == (("batch", "seq", "features"),)
    for shape in ((2, 5, 8), (3, 7, 8)):
        x = jax.random.normal(jax.random.key(shape[1]), shape)
        assert_outputs_match(lifted.positional(x), block(x), same_computation=False)
        assert_outputs_match(_jit_positional(lifted, x), block(x), same_computation=False)


def test_decoder_with_tied_embeddings_and_a_layer_list():
    model = Decoder(rngs=nnx.Rngs(1))
    lifted = pzb.lift(model, jnp.zeros((2, 5), jnp.int32), strict=True)
    assert pzb.select(lifted).at_instances_of(pzb.nn.Foreign).count() == 0
    assert pzb.select(lifted).at_instances_of(pzb.nn.Residual).count() == 4
    assert lifted.convention.inputs == (("batch", "seq"),)
    assert lifted.convention.output == ("batch", "seq", "vocabulary")
    # The tied table is one Parameter, used by the lookup and by the glue's attend.
    params = pzb.select(lifted).at_instances_of(pzb.Parameter).get_sequence()
    tables = {id(v) for v in params if v.label == "embed.embedding"}
    assert len(tables) == 1
    for shape in ((2, 5), (3, 8)):
        tokens = jax.random.randint(jax.random.key(shape[1]), shape, 0, 11)
        assert_outputs_match(lifted.positional(tokens), model(tokens), same_computation=False)
        assert_outputs_match(_jit_positional(lifted, tokens), model(tokens), same_computation=False)


def test_linear_children_called_directly():
    block = LinearBlock(rngs=nnx.Rngs(2))
    lifted = pzb.lift(block, jnp.ones((4, 6)), strict=True)
    assert pzb.select(lifted).at_instances_of(pzb.nn.Residual).count() == 1
    assert [c.name for c in pzb.select(lifted).at_instances_of(CallChild).get_sequence()] == ["fc1", "fc2", "norm"]
    assert lifted.convention.inputs == (("batch", "features"),)
    for shape in ((4, 6), (2, 3, 6)):
        x = jax.random.normal(jax.random.key(len(shape)), shape)
        expected = block(x)
        if len(shape) == 2:
            assert_outputs_match(lifted.positional(x), expected, same_computation=False)
            assert_outputs_match(_jit_positional(lifted, x), expected, same_computation=False)
        else:  # any extra leading axis is one more named axis
            out = lifted(pzb.nx.wrap(x, "extra", "batch", "features"))
            assert_outputs_match(out.unwrap("extra", "batch", "features"), expected, same_computation=False)
    _assert_same_module(pzb.lower(lifted), block)


@pytest.mark.parametrize("make, example", [
    (lambda: DecoderBlock(rngs=nnx.Rngs(3)), jnp.ones((2, 5, 8))),
    (lambda: Decoder(rngs=nnx.Rngs(4)), jnp.zeros((2, 5), jnp.int32)),
    (lambda: LinearBlock(rngs=nnx.Rngs(5)), jnp.ones((3, 6))),
])
def test_lower_of_lift_gives_the_module_back_and_never_touches_it(make, example):
    module = make()
    before = _snapshot(module)
    lifted = pzb.lift(module, example)
    lifted.positional(example)
    lowered = pzb.lower(lifted)
    lowered(example)
    _assert_untouched(module, before)
    _assert_same_module(lowered, module)
    # No array is copied: the lowered Variables hold the very buffers of the original.
    raw = {id(r) for _, r in before[1]}
    assert all(id(v.get_raw_value()) in raw for v in jax.tree_util.tree_leaves(
        nnx.state(lowered), is_leaf=lambda v: isinstance(v, nnx.Variable)))


def test_heads_and_kv_heads_are_named_axes_of_the_projections():
    lifted = pzb.lift(DecoderBlock(rngs=nnx.Rngs(6)), jnp.ones((2, 5, 8)))
    params = pzb.select(lifted).at_instances_of(pzb.Parameter).get_sequence()
    names = {v.label: tuple(v.value.named_shape) for v in params}
    assert names["attn.wq"] == ("features", "heads", "projection")
    assert names["attn.wk"] == ("features", "kv_heads", "projection")
    assert names["attn.wo"] == ("heads", "projection", "features")


def train_lora(model, x, target, steps=20):
    """Trains only the ``nnx.LoRAParam`` s of ``model`` in place (MSE to ``target``); returns the losses."""
    optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.LoRAParam)

    @nnx.jit
    def step(model, optimizer):
        loss, grads = nnx.value_and_grad(lambda m: jnp.mean((m(x) - target) ** 2),
                                         argnums=nnx.DiffState(0, nnx.LoRAParam))(model)
        optimizer.update(model, grads)
        return loss

    return [float(step(model, optimizer)) for _ in range(steps)]


def test_lora_on_every_linear_trains_with_wrt_lora_param_and_merges_back():
    block = DecoderBlock(rngs=nnx.Rngs(7))
    x = jax.random.normal(jax.random.key(8), (2, 5, 8))
    lifted = pzb.lift(block, x)
    linears = pzb.select(lifted).at_instances_of(pzb.nn.Linear)
    assert linears.count() == 7  # wq, wk, wv, wo and the SwiGLU's gate, up, down
    model = pzb.lower(loraify_linears_in_selection(linears, 2, jax.random.key(9)))
    # The block's own glue is unchanged: it is rebuilt, its edited children are native or adapters.
    assert type(model) is DecoderBlock and type(model.mlp) is SwiGLU
    assert type(model.mlp.gate) is nnx.LoRALinear and type(model.attn) is NnxAdapter
    lora_params = jax.tree_util.tree_leaves(nnx.state(model, nnx.LoRAParam))
    assert len(lora_params) == 14
    assert_outputs_match(model(x), block(x), same_computation=False)

    target = jax.random.normal(jax.random.key(10), (2, 5, 8))
    base_before = [np.asarray(a) for a in jax.tree_util.tree_leaves(nnx.state(model, nnx.Not(nnx.LoRAParam)))]
    losses = train_lora(model, x, target)
    assert losses[-1] < losses[0]
    base_after = [np.asarray(a) for a in jax.tree_util.tree_leaves(nnx.state(model, nnx.Not(nnx.LoRAParam)))]
    assert all(np.array_equal(a, b) for a, b in zip(base_before, base_after))
    assert np.array_equal(np.asarray(model.mlp.gate.kernel[...]), np.asarray(block.mlp.gate.kernel[...]))

    merged = pzb.lower(merge_lora(pzb.lift(model, x)))
    assert type(merged.attn) is Attention and type(merged.mlp.gate) is nnx.Linear
    assert nnx.graphdef(merged) == nnx.graphdef(block)
    assert_outputs_match(merged(x), model(x), same_computation=False, ulps=64)


class Masked(nnx.Module):
    def __init__(self, *, rngs: nnx.Rngs):
        self.linear = nnx.Linear(4, 4, rngs=rngs)

    def __call__(self, x, mask):
        return jnp.where(mask[..., None], self.linear(x), 0.0) + x


def test_extra_arguments_are_side_inputs_also_after_an_edit_of_the_glue():
    module = Masked(rngs=nnx.Rngs(11))
    x = jax.random.normal(jax.random.key(12), (2, 3, 4))
    mask = jnp.array([[True, False, True], [False, True, True]])
    lifted = pzb.lift(module, x, mask, strict=True)
    assert lifted.convention.side_names == ("mask",)
    assert_outputs_match(lifted.positional(x, mask), module(x, mask), same_computation=False)
    edited = pzb.select(lifted).at_instances_of(CallChild).apply(
        lambda call: pzb.nn.Sequential([call, pzb.nn.Elementwise(jax.nn.relu)]))
    adapter = pzb.lower(edited)
    assert isinstance(adapter, NnxAdapter)
    expected = jnp.where(mask[..., None], jax.nn.relu(module.linear(x)), 0.0) + x
    assert_outputs_match(adapter(x, mask), expected, same_computation=False)


class Counter(nnx.Module):
    """Counts its calls in a Variable: an in-place update the glue itself makes."""

    def __init__(self, *, rngs: nnx.Rngs):
        self.linear = nnx.Linear(4, 4, rngs=rngs)
        self.calls = nnx.Variable(jnp.zeros((), jnp.int32))

    def __call__(self, x):
        self.calls[...] += 1
        return self.linear(x)


class SowingCounter(Counter):
    """A Counter that also sows its input: assigning an attribute during the call is not traced."""

    def __call__(self, x):
        self.sow(nnx.Intermediate, "seen", x)
        return super().__call__(x)


class WithCounter(nnx.Module):
    """Reads a BatchStat and a plain array in its glue; calls an untraceable child."""

    def __init__(self, *, rngs: nnx.Rngs):
        self.counter = SowingCounter(rngs=rngs)
        self.out = nnx.Linear(4, 4, rngs=rngs)
        self.mean = nnx.BatchStat(jnp.full(4, 0.5))
        self.offset = jnp.full(4, 0.25)

    def __call__(self, x):
        return self.out(x - self.mean[...]) + self.counter(x) + self.offset


def test_in_place_updates_are_traced_and_sow_stays_foreign_with_the_reason():
    counter = Counter(rngs=nnx.Rngs(13))
    x = jnp.ones((2, 4))
    lifted = pzb.lift(counter, x)
    assert isinstance(lifted.body, Traced)  # the write is traced (tests/bridge/tracing/test_nnx_state_writes.py)
    assert int(counter.calls[...]) == 0  # tracing never ran the user's module
    sowing = SowingCounter(rngs=nnx.Rngs(13))
    assert isinstance(pzb.lift(sowing, x).body, pzb.nn.Foreign)
    with pytest.raises(LiftError, match="SowingCounter.*assigns attributes during the call"):
        pzb.lift(sowing, x, strict=True)


def test_untraceable_child_stays_foreign_inside_a_traced_parent():
    module = WithCounter(rngs=nnx.Rngs(14))
    x = jax.random.normal(jax.random.key(15), (2, 3, 4))
    lifted = pzb.lift(module, x)
    assert isinstance(lifted.body, Traced)
    (foreign,) = pzb.select(lifted).at_instances_of(pzb.nn.Foreign).get_sequence()
    assert foreign.template.class_name == "SowingCounter"
    expected = module(x)
    assert_outputs_match(lifted.positional(x), expected, same_computation=False)
    state = {v.label: v for v in pzb.select(lifted).at_instances_of(pzb.StateVariable).get_sequence()}
    assert int(state["counter.calls"].value) == 1  # the Foreign wrote its update back ...
    assert int(module.counter.calls[...]) == 1  # ... and the user's Variable saw only the user's own call
    assert type(pzb.lower(lifted).mean) is nnx.BatchStat
    with pytest.raises(LiftError, match="counter: no NNX lifting rule"):
        pzb.lift(module, x, strict=True)


def test_default_input_names_follow_nnx_batching():
    class Id(nnx.Module):
        def __call__(self, x):
            return x * 2

    cases = ((jnp.ones((2, 3, 4)), ("batch", "seq", "features")), (jnp.ones((2, 4)), ("batch", "features")),
             (jnp.ones((2, 3), jnp.int32), ("batch", "seq")), (jnp.ones(4), ("features",)))
    for example, names in cases:
        assert pzb.lift(Id(), example).convention.inputs == (names,)
    named = pzb.lift(Id(), jnp.ones((2, 4)), input_names=(("batch", "embed"),))
    assert named.convention.inputs == (("batch", "embed"),)


class Stateful(nnx.Module):
    """Children with rules that update their own state: dropout's RNG count, batch statistics."""

    def __init__(self, *, rngs: nnx.Rngs):
        self.linear = nnx.Linear(4, 4, rngs=rngs)
        self.drop = nnx.Dropout(0.5, rngs=rngs)
        self.norm = nnx.BatchNorm(4, use_running_average=False, rngs=rngs)
        self.unused = nnx.Variable(None)  # a Variable holding no array is copied, not traced

    def __call__(self, x):
        return x + self.norm(self.drop(self.linear(x)))


def test_children_with_rules_keep_their_state_updates_and_the_user_module_does_not_move():
    module, twin = Stateful(rngs=nnx.Rngs(16)), Stateful(rngs=nnx.Rngs(16))
    x = jax.random.normal(jax.random.key(17), (6, 4))
    before = _snapshot(module)
    lifted = pzb.lift(module, x, strict=True)
    for _ in range(2):  # a new dropout mask and new statistics each call, as in NNX
        assert_outputs_match(lifted.positional(x), twin(x), same_computation=False)
    state = {v.label: v for v in pzb.select(lifted).at_instances_of(pzb.StateVariable).get_sequence()}
    assert_outputs_match(state["norm.mean"].value.unwrap("features"), twin.norm.mean[...], same_computation=False)
    _assert_untouched(module, before)
    lowered = pzb.lower(lifted)
    assert nnx.graphdef(lowered) == nnx.graphdef(module) and lowered.unused.get_value() is None
