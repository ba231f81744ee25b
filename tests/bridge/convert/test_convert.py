"""pzb.convert: Equinox <-> NNX through the lifted form (issue: convert models between frameworks)."""

from __future__ import annotations

import warnings

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from hypothesis import HealthCheck, given, settings

import pzbridge as pzb
from pzbridge.bridge.convert import convert, convert_with_report
from pzbridge.bridge.lifted import CallingConvention
from pzbridge.core.errors import PzbridgeError
from pzbridge.testing.equinox_strategies import equinox_models
from pzbridge.testing.nnx_strategies import nnx_models

KEY = jax.random.key(0)
PROPERTY = settings(max_examples=25, database=None, derandomize=True, deadline=None,
                    suppress_health_check=list(HealthCheck))


def _batch(x: jax.Array) -> jax.Array:
    return jnp.stack([x, x if x.dtype.kind in "iu" else x * 0.5 - 0.25])


@PROPERTY
@given(equinox_models())
def test_equinox_models_convert_to_nnx_exactly_or_refuse_clearly(example):
    before = jax.tree_util.tree_leaves(eqx.filter(example.model, eqx.is_array))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            converted = convert(example.model, *example.args, to="nnx", example_kwargs=example.kwargs or None)
    except PzbridgeError as error:  # Refused: the message names a path and a fix, and nothing is half-built.
        assert "Fix" in str(error) or "fix" in str(error)
        return
    assert isinstance(converted, nnx.Module)
    batched = [_batch(a) for a in example.args]
    want = jax.vmap(lambda *a: example.model(*a, **example.kwargs))(*batched)
    np.testing.assert_allclose(converted(*batched, **example.kwargs), want, atol=1e-5, rtol=1e-5)
    after = jax.tree_util.tree_leaves(eqx.filter(example.model, eqx.is_array))
    assert all(a is b for a, b in zip(before, after))


@PROPERTY
@given(nnx_models())
def test_nnx_models_convert_to_equinox_exactly_or_refuse_clearly(case):
    model, x = case
    model = nnx.clone(model)
    model.eval()  # Dropout deterministic: the two frameworks draw different random masks.
    graphdef, _ = nnx.split(model)
    try:
        converted = convert(model, x, to="equinox")
    except PzbridgeError as error:
        assert "Fix" in str(error) or "fix" in str(error)
        return
    assert isinstance(converted, eqx.Module)
    if isinstance(converted, eqx.nn.StatefulLayer) and converted.is_stateful():  # it writes Variables
        run = jax.vmap(converted, axis_name="batch", in_axes=(0, None), out_axes=(0, None))
        got = run(x, eqx.nn.State(converted))[0]
    elif getattr(converted, "needs_batch_axis", False):  # its examples interact (attention along the batch axis)
        got = jax.vmap(converted, axis_name="batch")(x)
    else:
        got = jax.vmap(converted)(x)
    np.testing.assert_allclose(got, model(x), atol=1e-5, rtol=1e-5)
    assert nnx.graphdef(model) == graphdef  # The user's module was only read.


def test_stock_equinox_sequential_converts_to_native_nnx_and_back():
    model = eqx.nn.Sequential([eqx.nn.Linear(3, 4, key=KEY), eqx.nn.Lambda(jax.nn.relu), eqx.nn.LayerNorm(4)])
    x = jnp.ones(3)
    nnx_model, report = convert_with_report(model, x, to="nnx")
    assert not report.adapters and type(nnx_model) is nnx.Sequential
    xs = jax.random.normal(jax.random.key(1), (5, 3))
    np.testing.assert_allclose(nnx_model(xs), jax.vmap(model)(xs), atol=1e-5)
    back = convert(nnx_model, xs, to="equinox")
    assert jax.tree_util.tree_structure(back) == jax.tree_util.tree_structure(model)
    np.testing.assert_allclose(jax.vmap(back)(xs), jax.vmap(model)(xs), atol=1e-5)


class Block(eqx.Module):
    """A user block: raw parameters through einsum, a residual, a vmapped MLP."""

    w_in: jax.Array
    mlp: eqx.nn.MLP
    norm: eqx.nn.LayerNorm

    def __init__(self, d: int, key: jax.Array) -> None:
        k1, k2 = jax.random.split(key)
        self.w_in = jax.random.normal(k1, (d, d)) / d
        self.mlp = eqx.nn.MLP(d, d, 2 * d, 1, key=k2)
        self.norm = eqx.nn.LayerNorm(d)

    def __call__(self, x: jax.Array) -> jax.Array:
        h = jnp.einsum("sd,de->se", x, self.w_in)
        return x + jax.vmap(self.mlp)(jax.vmap(self.norm)(h))


def test_custom_equinox_block_converts_with_native_children_and_trains_in_nnx():
    block = Block(4, KEY)
    x = jax.random.normal(jax.random.key(2), (3, 4))
    converted, report = convert_with_report(block, x, to="nnx")
    assert {p.module for p in report.natives} >= {"Linear", "LayerNorm"}
    assert [p.runs for p in report.adapters] == ["Traced(Block)"]
    xs = jnp.stack([x, -x])
    np.testing.assert_allclose(converted(xs), jax.vmap(block)(xs), atol=1e-5)
    optimizer = nnx.Optimizer(converted, optax.adam(1e-2), wrt=nnx.Param)

    @nnx.jit
    def step(model, optimizer):
        loss, grads = nnx.value_and_grad(lambda m: jnp.mean((m(xs) - 1.0) ** 2))(model)
        optimizer.update(model, grads)
        return loss

    losses = [float(step(converted, optimizer)) for _ in range(15)]
    assert losses[-1] < losses[0]
    np.testing.assert_allclose(block(x), jax.vmap(Block(4, KEY))(xs)[0], atol=1e-6)  # The user's block is untouched.


class NnxBlock(nnx.Module):
    """An NNX block with a raw Param used through einsum and a stock Linear."""

    def __init__(self, d: int, rngs: nnx.Rngs) -> None:
        self.scale = nnx.Param(jnp.linspace(0.5, 1.5, d))
        self.proj = nnx.Linear(d, d, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return jax.nn.gelu(self.proj(x)) * self.scale[...] + x


def test_custom_nnx_block_converts_to_equinox_and_trains_with_filter_value_and_grad():
    block = NnxBlock(4, nnx.Rngs(0))
    xs = jax.random.normal(jax.random.key(3), (6, 4))
    converted, report = convert_with_report(block, xs, to="equinox")
    assert [p.module for p in report.natives] == ["Linear"]
    np.testing.assert_allclose(jax.vmap(converted)(xs), block(xs), atol=1e-5)
    optimizer = optax.adam(1e-2)
    params = eqx.filter(converted, eqx.is_inexact_array)
    state = optimizer.init(params)

    @eqx.filter_jit
    def step(model, state):
        loss, grads = eqx.filter_value_and_grad(lambda m: jnp.mean((jax.vmap(m)(xs) - 1.0) ** 2))(model)
        updates, state = optimizer.update(grads, state, eqx.filter(model, eqx.is_inexact_array))
        return eqx.apply_updates(model, updates), state, loss

    losses = []
    for _ in range(15):
        converted, state, loss = step(converted, state)
        losses.append(float(loss))
    assert losses[-1] < losses[0]


def test_pinned_equinox_attention_lowered_to_nnx_runs_on_a_batch():
    mha = eqx.nn.MultiheadAttention(2, 8, key=KEY)
    lowered = pzb.lower(pzb.lift(mha), framework="nnx")
    xs = jax.random.normal(jax.random.key(4), (2, 5, 8))
    np.testing.assert_allclose(lowered(xs, xs, xs), jax.vmap(mha)(xs, xs, xs), atol=1e-5)


def test_pinned_nnx_attention_lowered_to_equinox_takes_query_key_value():
    mha = nnx.MultiHeadAttention(2, 8, rngs=nnx.Rngs(0), decode=False)
    lowered = pzb.lower(pzb.lift(mha), framework="equinox")
    q = jax.random.normal(jax.random.key(5), (3, 5, 8))
    kv = jax.random.normal(jax.random.key(6), (3, 7, 8))
    np.testing.assert_allclose(jax.vmap(lowered)(q, kv, kv), mha(q, kv, kv), atol=1e-5)


@pytest.mark.parametrize("framework", ["nnx", "equinox"])
def test_pinned_gpt_lowers_to_both_frameworks_on_token_ids(framework):
    from pzbridge.models.gpt import GPTConfig, build_gpt

    gpt = build_gpt(GPTConfig("tiny", vocab_size=11, num_layers=1, num_heads=2, d_model=8, d_mlp=16, max_seq_len=8),
                    init_base_rng=jax.random.key(0))
    tokens = jnp.array([[1, 2, 3, 4], [4, 3, 2, 1]])
    want = gpt(pzb.nx.wrap(tokens, "batch", "seq"))
    out_names = tuple(n for n in want.named_shape if n not in ("batch", "seq"))
    if framework == "nnx":
        conv = CallingConvention((("batch", "seq"),), ("batch", "seq", *out_names))
        got = pzb.lower(gpt, framework="nnx", convention=conv)(tokens)
    else:
        conv = CallingConvention((("seq",),), ("seq", *out_names))
        got = jax.vmap(pzb.lower(gpt, framework="equinox", convention=conv))(tokens)
    np.testing.assert_allclose(got, want.unwrap("batch", "seq", *out_names), atol=1e-5)


def test_same_framework_or_unknown_target_is_refused_with_a_fix():
    linear = eqx.nn.Linear(2, 2, key=KEY)
    with pytest.raises(pzb.errors.LowerError, match="to='nnx'"):
        convert(linear, jnp.ones(2), to="equinox")
    with pytest.raises(pzb.errors.LowerError, match="Fix"):
        convert(linear, jnp.ones(2), to="torch")


def test_untraceable_custom_module_is_refused_naming_the_reason():
    class UntilSmall(eqx.Module):
        w: jax.Array

        def __call__(self, x):
            return jax.lax.while_loop(lambda h: jnp.sum(h) > 1.0, lambda h: h * self.w, x)

    with pytest.raises(pzb.errors.LiftError, match="UntilSmall"):
        convert(UntilSmall(jnp.full(3, 0.5)), jnp.ones(3), to="nnx")


@pytest.mark.parametrize("framework", ["equinox", "nnx"])
def test_verification_compares_against_the_original_not_the_lifted_model(framework, monkeypatch):
    """A lifting that computes something else must not convert faithfully to the wrong model."""
    import pzbridge.bridge.convert as convert_module

    if framework == "equinox":
        model, x, to = Block(4, KEY), jax.random.normal(jax.random.key(7), (3, 4)), "nnx"
    else:
        model, x, to = NnxBlock(4, nnx.Rngs(0)), jax.random.normal(jax.random.key(7), (6, 4)), "equinox"
    lift = convert_module.lift

    def off_by_a_little(*args, **kwargs):  # Every parameter nudged: lifted and converted agree, the original not.
        lifted = lift(*args, **kwargs)
        for parameter in pzb.select(lifted.body).at_instances_of(pzb.Parameter).get_sequence():
            parameter.value = parameter.value + 1e-2
        return lifted

    convert(model, x, to=to)  # As lifted: converts.
    monkeypatch.setattr(convert_module, "lift", off_by_a_little)
    with pytest.raises(pzb.errors.LowerError, match="differs from the original"):
        convert(model, x, to=to)
