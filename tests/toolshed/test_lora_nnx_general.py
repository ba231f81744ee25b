"""LoRA on lifted nnx.LinearGeneral / nnx.Einsum: lower to LoRALinearGeneral / LoRAEinsum, train, relift, merge."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st

import pzbridge as pzb
from pzbridge.bridge.nnx.lora_general import LoRAEinsum, LoRALinearGeneral
from pzbridge.core.errors import LowerError
from pzbridge.nn.basic import NamedEinsum
from pzbridge.nn.linear import Linear
from pzbridge.toolshed.lora import LowRankAdapter, loraify_linears_in_selection, merge_lora


class Model(nnx.Module):
    def __init__(self, rngs: nnx.Rngs) -> None:
        self.proj = nnx.LinearGeneral((2, 4), (3, 2), axis=(-2, -1), rngs=rngs)
        self.heads = nnx.Einsum("bsa,ahd->bshd", (6, 2, 3), (2, 3), rngs=rngs)
        self.per_head = nnx.Einsum("bsha,had->bshd", (2, 3, 5), (2, 5), rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        y = self.proj(x)
        y = self.heads(y.reshape(*y.shape[:-2], 6))
        return self.per_head(y)


def _adapt(lifted, rank=3, alpha=None):
    selection = pzb.select(lifted).at_instances_of((Linear, NamedEinsum))
    return loraify_linears_in_selection(selection, rank, jax.random.key(1), alpha=alpha)


def _randomize_b(adapted):
    """B starts at zero; give it values so the update is visible."""
    for i, adapter in enumerate(pzb.select(adapted).at_instances_of(LowRankAdapter).get_sequence()):
        value = adapter.lora_b.value
        noise = jax.random.normal(jax.random.key(10 + i), value.data_array.shape)
        adapter.lora_b.value = pzb.nx.wrap(noise, *value.named_shape)


def _base_params(model):
    return jax.tree_util.tree_map(np.asarray, nnx.state(model, nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam))))


def test_lora_on_linear_general_and_einsum_lowers_to_wrappers_with_nnx_layouts():
    lifted = pzb.lift(Model(nnx.Rngs(0)))
    lowered = pzb.lower(_adapt(lifted, rank=3))
    assert type(lowered.proj) is LoRALinearGeneral and type(lowered.proj.base) is nnx.LinearGeneral
    assert type(lowered.heads) is LoRAEinsum and type(lowered.heads.base) is nnx.Einsum
    assert isinstance(lowered.proj.lora_a, nnx.LoRAParam) and isinstance(lowered.heads.lora_b, nnx.LoRAParam)
    assert lowered.proj.lora_a.shape == (2, 4, 3) and lowered.proj.lora_b.shape == (3, 3, 2)
    assert lowered.heads.lora_a.shape == (6, 3) and lowered.heads.lora_b.shape == (3, 2, 3)
    # per-head letter 'h' stays on B (elementwise in the update), like the base kernel.
    assert lowered.per_head.lora_a.shape == (3, 3) and lowered.per_head.lora_b.shape == (3, 2, 5)


def test_lowered_lora_wrappers_compute_the_lifted_lora_model():
    original = Model(nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(2), (3, 5, 2, 4))
    adapted = _adapt(pzb.lift(original), rank=2, alpha=5.0)
    _randomize_b(adapted)
    lowered = pzb.lower(adapted)
    lifted_out = adapted.positional(x)
    assert not np.allclose(lifted_out, original(x), atol=1e-3)  # the update is really there
    np.testing.assert_allclose(lowered(x), lifted_out, atol=1e-5)


def test_train_lora_params_with_nnx_optimizer_then_relift_merge_lower_gives_original_graphdef():
    original = Model(nnx.Rngs(0))
    original_graphdef = nnx.graphdef(original)
    original_base = _base_params(original)
    x = jax.random.normal(jax.random.key(2), (4, 5, 2, 4))
    target = jax.random.normal(jax.random.key(3), (4, 5, 2, 5))

    model = pzb.lower(_adapt(pzb.lift(original), rank=2))
    np.testing.assert_allclose(model(x), original(x), atol=1e-6)  # B = 0: same function before training
    optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.LoRAParam)

    @nnx.jit
    def train_step(model, optimizer, x, target):
        def loss_fn(model):
            return jnp.mean((model(x) - target) ** 2)

        loss, grads = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, nnx.LoRAParam))(model)
        optimizer.update(model, grads)
        return loss

    lora_before = jax.tree_util.tree_map(np.asarray, nnx.state(model, nnx.LoRAParam))
    losses = [float(train_step(model, optimizer, x, target)) for _ in range(20)]
    assert losses[-1] < losses[0] - 0.01

    base_after = dict(nnx.to_flat_state(_base_params(model)))
    flat_original = dict(nnx.to_flat_state(original_base))
    assert len(base_after) == len(flat_original) == 6
    for path, leaf in flat_original.items():
        wrapped = (path[0], "base", *path[1:])
        assert np.array_equal(base_after[wrapped].get_value(), leaf.get_value()), path
    changed = [not np.array_equal(np.asarray(a.get_value()), b.get_value()) for (_, a), (_, b)
               in zip(nnx.to_flat_state(nnx.state(model, nnx.LoRAParam)), nnx.to_flat_state(lora_before))]
    assert len(changed) == 6 and all(changed)

    relifted = pzb.lift(model)
    adapters = pzb.select(relifted).at_instances_of(LowRankAdapter).get_sequence()
    assert sorted(v.label for ad in adapters for v in (ad.lora_a, ad.lora_b)) == [
        "heads.lora_a", "heads.lora_b", "per_head.lora_a", "per_head.lora_b", "proj.lora_a", "proj.lora_b"]
    np.testing.assert_allclose(relifted.positional(x), model(x), atol=1e-5)
    merged = pzb.lower(merge_lora(relifted))
    assert type(merged.proj) is nnx.LinearGeneral and type(merged.heads) is nnx.Einsum
    assert nnx.graphdef(merged) == original_graphdef
    np.testing.assert_allclose(merged(x), model(x), atol=1e-5)


def test_relift_then_lower_of_lora_wrappers_keeps_graphdef_alpha_and_buffers():
    adapted = _adapt(pzb.lift(Model(nnx.Rngs(0))), rank=2, alpha=6.0)
    lowered = pzb.lower(adapted)
    relifted = pzb.lift(lowered)
    assert {ad.alpha for ad in pzb.select(relifted).at_instances_of(LowRankAdapter).get_sequence()} == {6.0}
    adapters = {ad.lora_a.label: ad for ad in pzb.select(relifted).at_instances_of(LowRankAdapter).get_sequence()}
    assert adapters["proj.lora_a"].lora_a.value.data_array is lowered.proj.lora_a.get_raw_value()
    assert adapters["heads.lora_a"].lora_b.value.data_array is lowered.heads.lora_b.get_raw_value()
    again = pzb.lower(relifted)
    assert nnx.graphdef(again) == nnx.graphdef(lowered)


@settings(max_examples=15)
@given(
    in_shape=st.lists(st.integers(1, 3), min_size=1, max_size=2),
    out_shape=st.lists(st.integers(1, 3), min_size=1, max_size=2),
    rank=st.integers(1, 3),
    alpha=st.sampled_from([1.0, 2.0, 0.5]),
    seed=st.integers(0, 2**16),
)
def test_lora_linear_general_matches_flattened_matmul_reference(in_shape, out_shape, rank, alpha, seed):
    k = len(in_shape)
    base = nnx.LinearGeneral(tuple(in_shape), tuple(out_shape), axis=tuple(range(-k, 0)), rngs=nnx.Rngs(seed))
    keys = jax.random.split(jax.random.key(seed), 3)
    a = jax.random.normal(keys[0], (*in_shape, rank))
    b = jax.random.normal(keys[1], (rank, *out_shape))
    x = jax.random.normal(keys[2], (2, *in_shape))
    module = LoRALinearGeneral(base, nnx.LoRAParam(a), nnx.LoRAParam(b), alpha=alpha)
    n_in, n_out = int(np.prod(in_shape)), int(np.prod(out_shape))
    kernel = np.asarray(base.kernel.get_value()).reshape(n_in, n_out)
    flat_x = np.asarray(x).reshape(2, n_in)
    reference = flat_x @ kernel + np.asarray(base.bias.get_value()).reshape(n_out)
    reference += alpha / rank * (flat_x @ np.asarray(a).reshape(n_in, rank) @ np.asarray(b).reshape(rank, n_out))
    np.testing.assert_allclose(np.asarray(module(x)).reshape(2, n_out), reference, rtol=1e-4, atol=1e-4)


@settings(max_examples=15)
@given(heads=st.integers(1, 3), features=st.integers(1, 4), out=st.integers(1, 3), rank=st.integers(1, 3),
       seed=st.integers(0, 2**16))
def test_lora_einsum_with_per_head_kernel_matches_loop_reference(heads, features, out, rank, seed):
    base = nnx.Einsum("bha,had->bhd", (heads, features, out), (heads, out), rngs=nnx.Rngs(seed))
    keys = jax.random.split(jax.random.key(seed), 3)
    a = np.asarray(jax.random.normal(keys[0], (features, rank)))
    b = np.asarray(jax.random.normal(keys[1], (rank, heads, out)))
    x = np.asarray(jax.random.normal(keys[2], (2, heads, features)))
    module = LoRAEinsum(base, nnx.LoRAParam(jnp.asarray(a)), nnx.LoRAParam(jnp.asarray(b)), alpha=float(rank))
    kernel, bias = np.asarray(base.kernel.get_value()), np.asarray(base.bias.get_value())
    reference = np.stack([x[:, h] @ kernel[h] + bias[h] + (x[:, h] @ a) @ b[:, h] for h in range(heads)], axis=1)
    np.testing.assert_allclose(module(jnp.asarray(x)), reference, rtol=1e-4, atol=1e-4)


def test_lora_einsum_rejects_ellipsis_einsum_with_fix():
    base = nnx.Einsum("...a,ab->...b", (2, 3), rngs=nnx.Rngs(0))
    with pytest.raises(LowerError, match="inp,ker->out"):
        LoRAEinsum(base, nnx.LoRAParam(jnp.ones((2, 1))), nnx.LoRAParam(jnp.ones((1, 3))), alpha=1.0)


def test_shared_einsum_lowers_to_wrappers_sharing_one_lora_pair_and_kernel():
    class Tied(nnx.Module):
        def __init__(self) -> None:
            self.a = nnx.Einsum("ba,ad->bd", (3, 3), rngs=nnx.Rngs(0))
            self.b = self.a

        def __call__(self, x):
            return self.b(self.a(x))

    lowered = pzb.lower(_adapt(pzb.lift(Tied()), rank=1))
    assert type(lowered.a) is LoRAEinsum and type(lowered.b) is LoRAEinsum
    assert lowered.a.lora_a is lowered.b.lora_a and lowered.a.lora_b is lowered.b.lora_b
    assert lowered.a.base.kernel is lowered.b.base.kernel
