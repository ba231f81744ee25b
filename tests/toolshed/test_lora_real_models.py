"""LoRA on layers as real models use them: flax's MultiHeadAttention, tied Equinox embeddings, parent code
reading a layer's weight directly.

* ``nnx.MultiHeadAttention`` calls its projections with ``out_sharding=``; the lowered ``LoRALinearGeneral`` /
  ``LoRAEinsum`` accept what their base's ``__call__`` accepts, and honour it on the adapter path too.
* ``eqx.nn.Shared`` ties an embedding to an output ``Linear``; with LoRA on the ``Linear`` the tie stays at the
  base weight and the update applies to the output layer only.
* The Equinox ``LoRALinear`` reads like ``eqx.nn.Linear`` (``weight`` is the effective weight).
"""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import AxisType
from jax.sharding import PartitionSpec as P

import pzbridge as pzb
from pzbridge.bridge.equinox.lora import LoRALinear, ThroughLoRA, lora_filter
from pzbridge.bridge.nnx.lora_general import LoRAEinsum, LoRALinearGeneral
from pzbridge.core.errors import LowerError, NamedAxisError, VariableError
from pzbridge.nn.basic import NamedEinsum
from pzbridge.nn.linear import Linear
from pzbridge.testing.equinox_strategies import PerToken, TiedLanguageModel
from pzbridge.toolshed.lora import LowRankAdapter, loraify_linears_in_selection, merge_lora

PROJECTIONS = ("query", "key", "value", "out")


def _loraified(model, rank=2, seed=1):
    lifted = pzb.lift(model)
    return loraify_linears_in_selection(pzb.select(lifted).at_instances_of(Linear), rank, jax.random.key(seed))


def _mha():
    return nnx.MultiHeadAttention(num_heads=2, in_features=8, qkv_features=8, decode=False, rngs=nnx.Rngs(0))


# --- nnx.MultiHeadAttention ---------------------------------------------------------------------------------


def test_lora_on_multi_head_attention_projections_lowers_calls_and_trains_only_the_adapters():
    model = _mha()
    edited = _loraified(model)
    assert pzb.select(edited).at_instances_of(LowRankAdapter).count() == 4
    lowered = pzb.lower(edited)
    assert type(lowered) is nnx.MultiHeadAttention
    assert all(type(getattr(lowered, name)) is LoRALinearGeneral for name in PROJECTIONS)

    x = jax.random.normal(jax.random.key(2), (2, 5, 8))
    # MultiHeadAttention calls self.query(x, out_sharding=...): this raised a TypeError before.
    np.testing.assert_allclose(np.asarray(lowered(x)), np.asarray(model(x)), rtol=1e-6, atol=1e-6)  # B = 0

    base_kernels = {name: getattr(lowered, name).base.kernel.get_raw_value() for name in PROJECTIONS}
    before = {name: np.asarray(a) for name, a in base_kernels.items()}
    target = jax.random.normal(jax.random.key(3), (2, 5, 8))
    optimizer = nnx.Optimizer(lowered, optax.adam(1e-2), wrt=nnx.LoRAParam)

    def loss(m):
        return jnp.mean((m(x) - target) ** 2)

    @nnx.jit
    def step(m, opt):
        value, grads = nnx.value_and_grad(loss, argnums=nnx.DiffState(0, nnx.LoRAParam))(m)
        opt.update(m, grads)
        return value

    losses = [float(step(lowered, optimizer)) for _ in range(8)]
    assert losses[-1] < losses[0]
    for name in PROJECTIONS:
        kernel = getattr(lowered, name).base.kernel.get_raw_value()
        np.testing.assert_array_equal(np.asarray(kernel), before[name])  # base kernels bitwise unchanged
        assert float(jnp.abs(getattr(lowered, name).lora_b.get_raw_value()).sum()) > 0.0  # adapters trained
    np.testing.assert_array_equal(np.asarray(model.query.kernel.get_raw_value()), before["query"])

    # The trained model re-lifts to adapters computing what it computes.
    relifted = pzb.lift(lowered)
    assert pzb.select(relifted).at_instances_of(LowRankAdapter).count() == 4
    np.testing.assert_allclose(np.asarray(relifted.positional(x)), np.asarray(lowered(x)), rtol=1e-5, atol=1e-6)


def test_lora_linear_general_applies_out_sharding_to_the_adapter_path_too():
    model = _mha()
    lowered = pzb.lower(_loraified(model))
    lowered.query.lora_b.set_raw_value(jnp.ones_like(lowered.query.lora_b.get_raw_value()))
    x = jax.random.normal(jax.random.key(2), (2, 5, 8))
    mesh = jax.make_mesh((1,), ("data",), axis_types=(AxisType.Explicit,))
    replicated = P(None, None, None, None)
    with jax.set_mesh(mesh):
        sharded_x = jax.device_put(x, P("data", None, None))

        specs = {}

        @jax.jit
        def project(inputs):
            out = lowered.query(inputs, out_sharding=replicated)
            base = lowered.query.base(inputs, out_sharding=replicated)
            specs.update(out=jax.typeof(out).sharding.spec, base=jax.typeof(base).sharding.spec)
            return out, base

        # Without out_sharding on the update, the sum would inherit the input's "data" sharding.
        out, base = project(sharded_x)
        assert tuple(specs["out"]) == tuple(specs["base"]) == tuple(replicated)
        assert not np.allclose(np.asarray(out), np.asarray(base))
        full = jax.jit(lambda inputs: lowered(inputs, out_sharding=P(None, None, None)))(sharded_x)
    np.testing.assert_allclose(np.asarray(full), np.asarray(lowered(x)), rtol=1e-6, atol=1e-6)


def test_lora_einsum_accepts_out_sharding_and_the_base_call_time_einsum_str():
    base = nnx.Einsum("bta,ahd->bthd", (4, 2, 3), (2, 3), rngs=nnx.Rngs(0))
    lifted = pzb.lift(base)
    lowered = pzb.lower(loraify_linears_in_selection(pzb.select(lifted).at_instances_of(NamedEinsum), 2,
                                                     jax.random.key(1)))
    assert type(lowered) is LoRAEinsum
    lowered.lora_b.set_raw_value(jnp.ones_like(lowered.lora_b.get_raw_value()))
    x = jax.random.normal(jax.random.key(1), (2, 5, 4))
    expected = lowered(x)
    np.testing.assert_array_equal(np.asarray(lowered(x, out_sharding=None)), np.asarray(expected))
    # The same equation with other letters contracts the same kernel axis: A and B fit it.
    renamed = lowered(x, "xyk,khv->xyhv")
    np.testing.assert_allclose(np.asarray(renamed), np.asarray(expected), rtol=1e-6, atol=1e-6)
    with pytest.raises(NamedAxisError, match="contracts kernel positions"):
        lowered(jnp.ones((2, 5, 2)), "btd,ahd->btah")


# --- eqx.nn.Shared: tied embedding / output layer ------------------------------------------------------------


def _tied_model():
    return TiedLanguageModel.build(7, 4, PerToken(eqx.nn.LayerNorm(4)), jax.random.key(0))


def _perturbed(lowered):
    """Non-zero B (a zero B gives A a zero gradient), as after some training."""
    return eqx.tree_at(lambda m: m.shared.pytree[1].lora_b, lowered,
                       replace_fn=lambda b: b + 0.1 * jnp.arange(b.size, dtype=b.dtype).reshape(b.shape))


def test_lora_on_a_tied_output_layer_lowers_and_runs():
    model = _tied_model()
    tokens = jnp.array([1, 5, 3])
    edited = _loraified(model)
    assert pzb.select(edited).at_instances_of(LowRankAdapter).count() == 1
    lowered = pzb.lower(edited)  # raised AttributeError: 'LoRALinear' object has no attribute 'weight'
    assert isinstance(lowered.shared.where, ThroughLoRA) and lowered.shared.where.fn is model.shared.where
    np.testing.assert_allclose(np.asarray(lowered(tokens)), np.asarray(model(tokens)), rtol=1e-6, atol=1e-6)

    lowered = _perturbed(lowered)
    embedding, output = lowered.shared()
    assert type(output) is LoRALinear
    # The tie is at the base weight: the embedding reads the table, the output layer adds its update.
    assert output.linear.weight is embedding.weight is model.shared()[0].weight
    np.testing.assert_allclose(np.asarray(jax.vmap(embedding)(tokens)), np.asarray(model.shared()[0].weight[tokens]))
    hidden = lowered.body(jax.vmap(embedding)(tokens))
    np.testing.assert_allclose(np.asarray(lowered(tokens)), np.asarray(hidden @ output.weight.T + output.bias),
                               rtol=1e-5, atol=1e-5)
    assert not np.allclose(np.asarray(lowered(tokens)), np.asarray(model(tokens)))  # the update is used
    # Lifting the lowered model again gives the adapter back, computing the same.
    relifted = pzb.lift(lowered)
    assert pzb.select(relifted).at_instances_of(LowRankAdapter).count() == 1
    np.testing.assert_allclose(np.asarray(relifted.positional(tokens)), np.asarray(lowered(tokens)), rtol=1e-6,
                               atol=1e-6)


def test_gradients_of_a_tied_lora_output_layer_reach_the_adapters_through_equinox_partition():
    lowered = _perturbed(pzb.lower(_loraified(_tied_model())))
    tokens = jnp.array([1, 5, 3, 6])
    trainable, frozen = eqx.partition(lowered, lora_filter(lowered))
    assert trainable.shared.pytree[1].linear.weight is None and trainable.shared.pytree[0].weight is None

    def loss(train, rest):
        return jnp.sum(eqx.combine(train, rest)(tokens) ** 2)

    value, grads = eqx.filter_value_and_grad(loss)(trainable, frozen)
    assert np.isfinite(float(value))
    lora = grads.shared.pytree[1]
    assert float(jnp.abs(lora.lora_a).sum()) > 0.0 and float(jnp.abs(lora.lora_b).sum()) > 0.0
    assert lora.linear.weight is None  # the tied table is not trained here
    # Training changes the output layer only: the embedding still reads the original table.
    updates, _ = optax.sgd(0.1).update(grads, optax.sgd(0.1).init(trainable))
    trained = eqx.combine(eqx.apply_updates(trainable, updates), frozen)
    embedding, output = trained.shared()
    np.testing.assert_array_equal(np.asarray(embedding.weight), np.asarray(lowered.shared()[0].weight))
    assert not np.allclose(np.asarray(output.weight), np.asarray(embedding.weight))


def test_merging_lora_into_one_use_of_a_tied_weight_refuses_to_lower_instead_of_dropping_it():
    model = _tied_model()
    lowered = _perturbed(pzb.lower(_loraified(model)))
    relifted = pzb.lift(lowered)
    with pytest.raises(VariableError, match="also read without an adapter.*untie=True"):
        merge_lora(relifted)
    merged = merge_lora(relifted, untie=True)
    with pytest.raises(LowerError, match="tie.*different arrays.*Fix"):
        pzb.lower(merged)
    # Without LoRA the round trip gives the original functions back.
    assert pzb.lower(pzb.lift(model)).shared.where is model.shared.where


# --- Parent code that reads a LoRA layer's weight directly ---------------------------------------------------


class RawProjection(eqx.Module):
    proj: eqx.nn.Linear

    def __call__(self, x):
        # Third-party code reading the weight and bias instead of calling the layer.
        return jnp.tanh(self.proj.weight @ x + self.proj.bias) * self.proj.out_features / self.proj.in_features


def test_parent_code_reading_weight_directly_sees_the_effective_weight_and_trains_the_adapter():
    model = RawProjection(eqx.nn.Linear(3, 5, key=jax.random.key(0)))
    x = jax.random.normal(jax.random.key(1), (3,))
    edited = _loraified(model)
    lowered = pzb.lower(edited)
    assert type(lowered) is RawProjection and type(lowered.proj) is LoRALinear
    np.testing.assert_allclose(np.asarray(lowered(x)), np.asarray(model(x)), rtol=1e-6, atol=1e-6)
    lowered = eqx.tree_at(lambda m: m.proj.lora_b, lowered, replace_fn=lambda b: b + 0.5)
    proj = lowered.proj
    effective = proj.linear.weight + (proj.alpha / proj.rank) * (proj.lora_a @ proj.lora_b).T
    np.testing.assert_allclose(np.asarray(proj.weight), np.asarray(effective), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(lowered(x)), np.asarray(jnp.tanh(effective @ x + proj.bias) * 5 / 3),
                               rtol=1e-6)
    # The layer's own call and its effective weight agree.
    np.testing.assert_allclose(np.asarray(proj(x)), np.asarray(proj.weight @ x + proj.bias), rtol=1e-5, atol=1e-6)
    # The lifted model (a Foreign parent running the original code on the lowered children) agrees too.
    relifted = pzb.lift(lowered)
    np.testing.assert_allclose(np.asarray(relifted.positional(x)), np.asarray(lowered(x)), rtol=1e-6)

    trainable, frozen = eqx.partition(lowered, lora_filter(lowered))
    grads = eqx.filter_grad(lambda t, f: jnp.sum(eqx.combine(t, f)(x) ** 2))(trainable, frozen)
    assert float(jnp.abs(grads.proj.lora_a).sum()) > 0.0 and float(jnp.abs(grads.proj.lora_b).sum()) > 0.0


def test_equinox_lora_linear_reads_like_eqx_linear():
    for linear in (eqx.nn.Linear(3, 2, key=jax.random.key(0)),
                   eqx.nn.Linear(3, 2, use_bias=False, key=jax.random.key(0))):
        lora = LoRALinear(linear, jnp.ones((3, 1)), jnp.zeros((1, 2)), alpha=1.0, rank=1)
        for name in ("in_features", "out_features", "use_bias"):
            assert getattr(lora, name) == getattr(linear, name)
        assert lora.bias is linear.bias
        np.testing.assert_array_equal(np.asarray(lora.weight), np.asarray(linear.weight))  # B = 0
        assert lora.weight.shape == linear.weight.shape  # Equinox's (out, in) layout


# --- a custom Equinox model re-lifted (traced) after LoRA: the output keeps the module's axis order ------------


class _VmappedHead(eqx.Module):
    """Custom ``__call__``: embeddings, a per-token MLP, a vmapped output layer (vocabulary 7 != sequence 5)."""

    embedding: eqx.nn.Embedding
    mlp: eqx.nn.MLP
    head: eqx.nn.Linear

    def __init__(self, key):
        k1, k2, k3 = jax.random.split(key, 3)
        self.embedding = eqx.nn.Embedding(7, 4, key=k1)
        self.mlp = eqx.nn.MLP(4, 4, 8, 1, key=k2)
        self.head = eqx.nn.Linear(4, 7, key=k3)

    def __call__(self, tokens):
        x = jax.vmap(self.embedding)(tokens)
        return jax.vmap(self.head)(x + jax.vmap(self.mlp)(x))


def test_relifted_lora_model_called_positionally_returns_the_modules_axis_order():
    # The traced re-lift named the LoRALinear call's output by size inference ("axis") while the lifted adapter
    # returns "features": .positional put the vocabulary first, (7, 5) for a (5, 7) model.
    model = _VmappedHead(jax.random.key(0))
    tokens = jnp.array([1, 5, 3, 0, 6])
    edited = loraify_linears_in_selection(pzb.select(pzb.lift(model, tokens)).at_instances_of(Linear), 2,
                                          jax.random.key(1))
    lowered = _perturbed_head(pzb.lower(edited))
    relifted = pzb.lift(lowered, tokens)
    assert pzb.select(relifted).at_instances_of(LowRankAdapter).count() == 3
    assert relifted.convention.output == ("seq", "features")
    np.testing.assert_allclose(np.asarray(relifted.positional(tokens)), np.asarray(lowered(tokens)), rtol=1e-5,
                               atol=1e-6)


def _perturbed_head(lowered):
    return eqx.tree_at(lambda m: m.head.lora_b, lowered, replace_fn=lambda b: b + 0.1)
