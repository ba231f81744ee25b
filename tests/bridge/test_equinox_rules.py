"""One test per Equinox rule: exact round trip, same buffers, same outputs (jit), named batch axes vs vmap."""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pzbridge as pzb
from pzbridge.bridge.equinox.attention import EqxMultiheadAttention, EqxRotaryEmbedding
from pzbridge.bridge.equinox.conv import EqxConv, EqxConvTranspose
from pzbridge.bridge.equinox.dropout import EqxDropout
from pzbridge.bridge.equinox.embedding import EqxEmbedding
from pzbridge.bridge.equinox.linear import EqxLinear, EqxMLP
from pzbridge.bridge.equinox.norm import EqxLayerNorm, EqxRMSNorm
from pzbridge.bridge.equinox.pool import EqxAdaptiveAvgPool, EqxAdaptiveMaxPool, EqxAvgPool, EqxMaxPool
from pzbridge.bridge.equinox.prelu import EqxPReLU
from pzbridge.bridge.equinox.sequential import EqxSequential
from pzbridge.core import named_axes as nx
from pzbridge.testing.equinox_strategies import assert_outputs_close, assert_round_trip, assert_same_buffers
from pzbridge.testing.numerics import assert_outputs_match, assert_same_computation, assert_same_outputs

KEY = jax.random.key(7)
X_VEC = jnp.cos(jnp.arange(6.0))
X_SEQ = jnp.sin(jnp.arange(30.0) * 0.3).reshape(5, 6)
X_KV = jnp.cos(jnp.arange(28.0) * 0.2).reshape(7, 4)


def _jit_outputs(model, lifted, args, kwargs):
    want = eqx.filter_jit(lambda m, *a: m(*a, **kwargs))(model, *args)
    got = eqx.filter_jit(lambda l, *a: l.positional(*a, **kwargs))(lifted, *args)
    return want, got


def _batched_outputs(model, lifted, args, kwargs):
    batch = tuple(jnp.stack([a, a[::-1] if a.ndim and a.dtype != bool else a]) for a in args)
    want = jax.vmap(lambda *b: model(*b, **kwargs))(*batch)
    named = [a.tag_prefix("batch") for a in lifted.convention.name_inputs(batch)]
    out = lifted.body(named[0] if len(named) == 1 else tuple(named), **kwargs)
    return want, lifted.convention.unname_output(out.untag_prefix("batch"))


# (model, args, kwargs, lifted class, bitwise under jit). Bitwise only where the lifted program is Equinox's own
# or rounds nowhere (gathers, max pools), checked on the jaxprs: other programs may round differently on other
# CPUs, so they are compared within a few ulps.
CASES = {
    "linear": (eqx.nn.Linear(6, 3, key=KEY), (X_VEC,), {}, EqxLinear, False),
    "linear_scalar": (eqx.nn.Linear("scalar", "scalar", key=KEY), (jnp.array(1.5),), {}, EqxLinear, False),
    "mlp": (eqx.nn.MLP(6, 3, 5, 2, activation=jax.nn.gelu, key=KEY), (X_VEC,), {}, EqxMLP, False),
    "mlp_scan": (eqx.nn.MLP(6, 3, 5, 4, scan=True, key=KEY), (X_VEC,), {}, EqxMLP, False),
    "mlp_depth0": (eqx.nn.MLP(6, 3, 5, 0, final_activation=jnp.tanh, key=KEY), (X_VEC,), {}, EqxMLP, False),
    "embedding": (eqx.nn.Embedding(9, 4, key=KEY), (jnp.array(5),), {}, EqxEmbedding, True),
    "layernorm": (eqx.nn.LayerNorm(6), (X_VEC,), {}, EqxLayerNorm, False),
    "layernorm_bare": (eqx.nn.LayerNorm(6, use_weight=False, use_bias=False, eps=1e-3), (X_VEC,), {},
                       EqxLayerNorm, False),  # XLA fuses this op order to 1 ulp off
    "rmsnorm_with_bias": (eqx.nn.RMSNorm(6), (X_VEC,), {}, EqxRMSNorm, False),
    "prelu": (eqx.nn.PReLU(0.1), (X_VEC - 0.5,), {}, EqxPReLU, False),
    "prelu_vector": (eqx.nn.PReLU(jnp.linspace(0.1, 0.6, 6)), (X_VEC - 0.5,), {}, EqxPReLU, True),
    "dropout_inference": (eqx.nn.Dropout(0.4, inference=True), (X_VEC,), {}, EqxDropout, True),
    "dropout_train": (eqx.nn.Dropout(0.4), (X_VEC,), {"key": jax.random.key(3)}, EqxDropout, True),
    "mha": (eqx.nn.MultiheadAttention(2, 6, key=KEY), (X_SEQ, X_SEQ, X_SEQ), {}, EqxMultiheadAttention, False),
    "mha_cross_mask": (
        eqx.nn.MultiheadAttention(3, 6, 4, 4, 5, qk_size=2, vo_size=3, use_query_bias=True, use_output_bias=True,
                                  key=KEY),
        (X_SEQ, X_KV, X_KV, jnp.arange(35).reshape(5, 7) % 4 != 0), {}, EqxMultiheadAttention, False),
    "mha_head_mask": (eqx.nn.MultiheadAttention(2, 6, key=KEY),
                      (X_SEQ, X_SEQ, X_SEQ, jnp.tril(jnp.ones((2, 5, 5), bool))), {}, EqxMultiheadAttention, False),
    "mha_dropout": (eqx.nn.MultiheadAttention(2, 6, dropout_p=0.3, key=KEY), (X_SEQ, X_SEQ, X_SEQ),
                    {"key": jax.random.key(5)}, EqxMultiheadAttention, False),
    "rope": (eqx.nn.RotaryPositionalEmbedding(6), (X_SEQ,), {}, EqxRotaryEmbedding, False),
    "sequential": (eqx.nn.Sequential([eqx.nn.Linear(6, 4, key=KEY), eqx.nn.Lambda(jax.nn.relu),
                                      eqx.nn.LayerNorm(4)]), (X_VEC,), {}, EqxSequential, False),
}
for n, conv, transpose in ((1, eqx.nn.Conv1d, eqx.nn.ConvTranspose1d), (2, eqx.nn.Conv2d, eqx.nn.ConvTranspose2d),
                           (3, eqx.nn.Conv3d, eqx.nn.ConvTranspose3d)):
    image = jnp.sin(jnp.arange(4 * 5**n, dtype=jnp.float32)).reshape((4,) + (5,) * n)
    CASES[f"conv{n}d"] = (conv(4, 6, 3, stride=2, padding=1, dilation=1, groups=2, key=KEY), (image,), {},
                          EqxConv, False)
    CASES[f"conv{n}d_reflect"] = (conv(4, 2, 2, padding="SAME", dilation=2, padding_mode="REFLECT", use_bias=False,
                                       key=KEY), (image,), {}, EqxConv, False)
    CASES[f"conv{n}d_circular"] = (conv(4, 2, 3, padding=((2, 1),) * n, padding_mode="CIRCULAR", key=KEY),
                                   (image,), {}, EqxConv, False)
    CASES[f"conv_transpose{n}d"] = (transpose(4, 6, 3, stride=2, padding=1, output_padding=1, groups=2, key=KEY),
                                    (image,), {}, EqxConvTranspose, False)
    pools = {"max": (eqx.nn.MaxPool1d, eqx.nn.MaxPool2d, eqx.nn.MaxPool3d),
             "avg": (eqx.nn.AvgPool1d, eqx.nn.AvgPool2d, eqx.nn.AvgPool3d),
             "adaptive_max": (eqx.nn.AdaptiveMaxPool1d, eqx.nn.AdaptiveMaxPool2d, eqx.nn.AdaptiveMaxPool3d),
             "adaptive_avg": (eqx.nn.AdaptiveAvgPool1d, eqx.nn.AdaptiveAvgPool2d, eqx.nn.AdaptiveAvgPool3d)}
    CASES[f"maxpool{n}d"] = (pools["max"][n - 1](3, stride=2, padding=1, use_ceil=True), (image,), {},
                             EqxMaxPool, True)
    CASES[f"avgpool{n}d"] = (pools["avg"][n - 1](2, stride=1, padding=1), (image,), {}, EqxAvgPool, False)
    CASES[f"adaptive_maxpool{n}d"] = (pools["adaptive_max"][n - 1](3), (image,), {}, EqxAdaptiveMaxPool, True)
    CASES[f"adaptive_avgpool{n}d"] = (pools["adaptive_avg"][n - 1](2), (image,), {}, EqxAdaptiveAvgPool, False)
    CASES[f"conv_transpose{n}d_circular"] = (transpose(4, 2, 3, stride=2, padding="SAME", padding_mode="CIRCULAR",
                                                       key=KEY), (image,), {}, EqxConvTranspose, False)


@pytest.mark.parametrize("name", sorted(CASES))
def test_rule_round_trips_exactly_and_computes_the_original(name):
    model, args, kwargs, lifted_cls, bitwise = CASES[name]
    lifted = pzb.lift(model)
    assert type(lifted.body) is lifted_cls
    assert_same_buffers(model, lifted)
    assert_round_trip(model, pzb.lower(lifted))
    want, got = _jit_outputs(model, lifted, args, kwargs)
    if bitwise:
        assert_same_outputs(lambda *a: lifted.positional(*a, **kwargs), lambda *a: model(*a, **kwargs), *args,
                            bitwise=True)  # the same program (or exact): jit compiles both alike
        assert_outputs_close(want, got, rtol=0.0)
    else:
        assert_outputs_match(got, want, same_computation=False)


@pytest.mark.parametrize("name", sorted(n for n in CASES if "dropout_train" not in n and "mha_dropout" not in n))
def test_rule_on_named_batch_axis_matches_vmap_of_original(name):
    model, args, kwargs, _, _ = CASES[name]
    want, got = _batched_outputs(model, pzb.lift(model), args, kwargs)
    assert_outputs_close(want, got, rtol=1e-6)


def test_mha_heads_are_a_named_axis_and_process_heads_runs_between_projection_and_logits():
    model = CASES["mha"][0]
    lifted = pzb.lift(model)
    queries = lifted.body.input_to_query(nx.wrap(X_SEQ, "seq", "features"))
    assert dict(queries.named_shape) == {"seq": 5, "heads": 2, "projection": 3}

    def process_heads(q, k, v):
        return q * 2.0, k, v + 1.0

    want = model(X_SEQ, X_SEQ, X_SEQ, process_heads=process_heads)
    got = lifted.positional(X_SEQ, X_SEQ, X_SEQ, process_heads=process_heads)
    assert_outputs_close(want, got)


def test_edited_mha_lowers_to_an_adapter_called_like_the_original():
    model = CASES["mha"][0]
    lifted = pzb.lift(model)
    scale = pzb.nn.ConstantRescale(0.5)
    edited = pzb.select(lifted).at_instances_of(EqxMultiheadAttention).apply(
        lambda a: a.__class__(**{**{f: getattr(a, f) for f in a.__dataclass_fields__},
                                 "attn_value_to_output": pzb.nn.Sequential([*a.attn_value_to_output.sublayers,
                                                                            scale])}))
    lowered = pzb.lower(edited)
    assert isinstance(lowered, eqx.Module)
    assert_outputs_close(model(X_SEQ, X_SEQ, X_SEQ) * 0.5, lowered(X_SEQ, X_SEQ, X_SEQ))


def test_tied_weights_in_shared_become_one_parameter_and_one_array_again():
    emb, lin = eqx.nn.Embedding(7, 4, key=KEY), eqx.nn.Linear(4, 7, key=jax.random.key(1))
    shared = eqx.nn.Shared((emb, lin), lambda p: p[1].weight, lambda p: p[0].weight)
    lifted = pzb.lift(shared)
    table = lifted.body.children["[0]"].table.embeddings
    linear = pzb.select(lifted.body.children["[1]"]).at_instances_of(pzb.nn.Linear).get()
    assert linear.weights is table
    assert_round_trip(shared, pzb.lower(lifted))
    filled_emb, filled_lin = pzb.lower(lifted)()
    assert filled_lin.weight is filled_emb.weight is emb.weight


def test_tied_output_layer_computes_the_original_and_gradients_reach_the_source_only():
    from pzbridge.testing.equinox_strategies import PerToken, TiedLanguageModel

    model = TiedLanguageModel.build(7, 4, PerToken(eqx.nn.LayerNorm(4)), KEY)
    tokens = jnp.array([1, 5, 3])
    lifted = pzb.lift(model)
    assert_same_outputs(lifted.positional, model, tokens, bitwise=True)
    lowered = pzb.lower(lifted)
    loss_grad = eqx.filter_grad(lambda m: jnp.sum(m(tokens) ** 2))
    assert_same_computation(lambda: loss_grad(lowered), lambda: loss_grad(model))  # so bitwise-equal gradients
    grads = eqx.filter_grad(lambda m: jnp.sum(m(tokens) ** 2))(lowered)
    want = eqx.filter_grad(lambda m: jnp.sum(m(tokens) ** 2))(model)
    assert jax.tree_util.tree_structure(grads) == jax.tree_util.tree_structure(want)
    for a, b in zip(jax.tree_util.tree_leaves(grads), jax.tree_util.tree_leaves(want)):
        np.testing.assert_array_equal(a, b)


def test_dropout_key_side_input_gives_equinox_mask_and_random_stream_is_accepted():
    drop = eqx.nn.Dropout(0.5)
    lifted = pzb.lift(drop)
    key = jax.random.key(11)
    assert_same_outputs(lambda x: lifted.positional(x, key=key), lambda x: drop(x, key=key), X_VEC, bitwise=True)
    stream = pzb.RandomStream.from_base_key(key)
    out = lifted.positional(jnp.ones(1000), random_stream=stream)
    assert set(np.unique(np.asarray(out)).tolist()) == {0.0, 2.0}
    np.testing.assert_array_equal(lifted.positional(X_VEC, inference=True), X_VEC)


def test_generic_pzbridge_layers_lower_to_native_equinox_classes():
    affine = pzb.nn.Affine.from_config("a", KEY, {"features": 3}, {"features": 2})
    norm = pzb.nn.normalization.LayerNorm.from_config("ln", KEY, {"features": 2}, epsilon=1e-5) \
        if hasattr(pzb.nn, "normalization") else None
    lowered = pzb.lower(pzb.nn.Sequential([affine, norm]), framework="equinox")
    assert [type(layer) for layer in lowered.layers] == [eqx.nn.Linear, eqx.nn.LayerNorm]
    x = nx.wrap(jnp.arange(3.0), "features")
    np.testing.assert_allclose(lowered(jnp.arange(3.0)), norm(affine(x)).unwrap("features"), rtol=1e-6)
