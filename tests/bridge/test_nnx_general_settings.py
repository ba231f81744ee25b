"""nnx.LinearGeneral / nnx.Einsum (and a half-precision MultiHeadAttention) with non-default numerics.

A compute ``dtype``, ``precision`` or ``preferred_element_type`` lifts natively: ``[NnxPromotedLinear |
NnxPromotedEinsum, NnxPromotedBias]`` run NNX's own promotion, contraction and bias addition, lower back to the
original class, graphdef and buffers, and take LoRA (``LoRALinearGeneral`` / ``LoRAEinsum``). Only custom
``dot_general`` / ``dot_general_cls`` / ``einsum_op`` / ``promote_dtype`` functions, and a bias NNX adds in a dtype
inferred from the input (``dtype=None`` with a ``preferred_element_type`` narrower than float32), stay ``Foreign``.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st
from nnx_checks import assert_round_trip

import pzbridge as pzb
from pzbridge.bridge.nnx.attention import NnxAttention, NnxAttentionLogits
from pzbridge.bridge.nnx.linear import (
    NnxEinsum,
    NnxLinearGeneral,
    NnxPromotedBias,
    NnxPromotedEinsum,
    NnxPromotedLinear,
)
from pzbridge.bridge.nnx.lora_general import LoRAEinsum, LoRALinearGeneral
from pzbridge.nn.basic import NamedEinsum
from pzbridge.nn.foreign import Foreign
from pzbridge.nn.linear import Linear
from pzbridge.testing.numerics import assert_same_outputs
from pzbridge.toolshed.lora import (
    LowRankAdapter,
    loraify_linears_in_selection,
    merge_lora,
)

HIGHEST = jax.lax.Precision.HIGHEST
NUMERICS = ("dtype", "precision", "preferred_element_type")


def _ids(kwargs):
    return ",".join(f"{k}={getattr(v, '__name__', v)}" for k, v in kwargs.items())


def _normal(seed, shape, dtype=jnp.float32):
    # Host-side random values: no XLA compilation per shape (the suite's time budget is tight).
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape).astype(jnp.dtype(dtype)))


def _randomized(model, seed):
    """A copy of ``model`` with a random (non-zero) bias, so the bias path is exercised."""
    model = nnx.clone(model)
    if model.bias is not None:
        bias = model.bias.get_raw_value()
        model.bias.set_raw_value(_normal(seed, bias.shape, bias.dtype))
    return model


def _linear_general(in_shape=(2, 3), out_shape=(4,), **kwargs):
    k = len(in_shape)
    return nnx.LinearGeneral(in_shape, out_shape, axis=tuple(range(-k, 0)), rngs=nnx.Rngs(kwargs.pop("seed", 0)),
                             **kwargs)


def _lifted_call(model):
    return lambda x: pzb.lift(nnx.clone(model)).positional(x)


def _nnx_call(model):
    return lambda x: nnx.clone(model)(x)


def _check_lifts_natively(model, group_cls, dense_cls, x, bitwise=None):
    """Promoted layers carrying NNX's numerics, NNX's outputs and dtype, and an exact round trip."""
    lifted = pzb.lift(model)
    assert isinstance(lifted.body, group_cls) and pzb.select(lifted).at_instances_of(Foreign).count() == 0
    layers = lifted.body.sublayers
    assert [type(layer) for layer in layers] == [dense_cls, NnxPromotedBias][: 1 + (model.bias is not None)]
    assert {name: getattr(layers[0], name) for name in NUMERICS} == {name: getattr(model, name) for name in NUMERICS}
    weights = layers[0].weights if isinstance(layers[0], Linear) else layers[0].weights[0]
    assert weights.value.data_array is model.kernel.get_raw_value()  # NNX's buffer, in its stored dtype
    assert_same_outputs(_lifted_call(model), _nnx_call(model), x, bitwise=bitwise)
    assert lifted.positional(x).dtype == model(x).dtype
    lowered = assert_round_trip(model)
    assert lowered.kernel.get_raw_value() is model.kernel.get_raw_value()
    if model.bias is not None:
        assert lowered.bias.get_raw_value() is model.bias.get_raw_value()
    assert all(getattr(lowered, name) is getattr(model, name) for name in (*NUMERICS, "param_dtype"))
    return lifted


SETTINGS = [
    dict(dtype=jnp.bfloat16, precision=HIGHEST),
    dict(dtype=jnp.float16, preferred_element_type=jnp.float32, use_bias=False),
    dict(preferred_element_type=jnp.float32),
    dict(param_dtype=jnp.bfloat16, precision="default"),
]


@pytest.mark.parametrize("kwargs", SETTINGS, ids=_ids)
def test_linear_general_with_settings_runs_nnx_program_bitwise(kwargs):
    model = _randomized(_linear_general((2, 3), (4, 2), **kwargs), 1)
    # The same primitives in the same order as nnx.LinearGeneral.__call__ (one dot_general, the bias reshaped
    # to (1, ..., *out) and added): the jaxprs agree, so the outputs are bitwise equal on any machine.
    x = _normal(2, (5, 2, 3))
    _check_lifts_natively(model, NnxLinearGeneral, NnxPromotedLinear, x, bitwise=True)


@pytest.mark.parametrize("kwargs", SETTINGS, ids=_ids)
def test_einsum_with_settings_runs_nnx_program_bitwise(kwargs):
    use_bias = kwargs.pop("use_bias", True)
    model = nnx.Einsum("bta,ahd->bthd", (3, 2, 4), (2, 4) if use_bias else None, rngs=nnx.Rngs(0), **kwargs)
    # NNX's einsum, promotion and bias reshape: the same jaxpr (other einsums may order the dot's operands
    # differently, e.g. per-head kernels: then a few ulps, see the property test).
    _check_lifts_natively(_randomized(model, 1), NnxEinsum, NnxPromotedEinsum, _normal(2, (2, 5, 3)), bitwise=True)


_DTYPES = st.sampled_from([None, jnp.bfloat16, jnp.float16, jnp.float32])
_PRECISIONS = st.sampled_from([None, "highest", "default"])
_PREFERRED = st.sampled_from([None, jnp.float32])
_SIZES = st.lists(st.integers(1, 2), min_size=1, max_size=2)


@settings(max_examples=8, deadline=None)
@given(dtype=_DTYPES, precision=_PRECISIONS, preferred=_PREFERRED, use_bias=st.booleans(), in_shape=_SIZES,
       out_shape=_SIZES, lead=st.integers(1, 2), x_dtype=st.sampled_from([jnp.float32, jnp.bfloat16]),
       seed=st.integers(0, 99))
def test_random_linear_general_settings_lift_exactly(dtype, precision, preferred, use_bias, in_shape, out_shape,
                                                     lead, x_dtype, seed):
    model = _randomized(_linear_general(tuple(in_shape), tuple(out_shape), dtype=dtype, precision=precision,
                                        preferred_element_type=preferred, use_bias=use_bias, seed=seed), seed)
    lifted = pzb.lift(model)
    assert isinstance(lifted.body, NnxLinearGeneral) and pzb.select(lifted).at_instances_of(Linear).count() == 1
    x = _normal(seed, (lead, *in_shape), x_dtype)
    assert_same_outputs(_lifted_call(model), _nnx_call(model), x)
    assert lifted.positional(x).dtype == model(x).dtype
    lowered = assert_round_trip(model)
    assert lowered.kernel.get_raw_value() is model.kernel.get_raw_value()


@settings(max_examples=8, deadline=None)
@given(dtype=_DTYPES, precision=_PRECISIONS, preferred=_PREFERRED, use_bias=st.booleans(),
       spec=st.sampled_from(["ba,ad->bd", "bta,ahd->bthd", "bsha,had->bshd", "bac,acd->bd"]),
       sizes=st.lists(st.integers(1, 2), min_size=4, max_size=4), x_dtype=st.sampled_from([jnp.float32, jnp.bfloat16]),
       seed=st.integers(0, 99))
def test_random_einsum_settings_lift_exactly(dtype, precision, preferred, use_bias, spec, sizes, x_dtype, seed):
    inp, ker, out = spec.replace("->", ",").split(",")
    size = dict(zip("ahdc", sizes)) | {"b": 2, "t": 3, "s": 2}
    bias_shape = tuple(size[c] for c in out if c in ker) if use_bias else None
    model = _randomized(nnx.Einsum(spec, tuple(size[c] for c in ker), bias_shape, dtype=dtype, precision=precision,
                                   preferred_element_type=preferred, rngs=nnx.Rngs(seed)), seed)
    lifted = pzb.lift(model)
    assert isinstance(lifted.body, NnxEinsum) and pzb.select(lifted).at_instances_of(NamedEinsum).count() == 1
    x = _normal(seed, tuple(size[c] for c in inp), x_dtype)
    assert_same_outputs(_lifted_call(model), _nnx_call(model), x)
    assert lifted.positional(x).dtype == model(x).dtype
    lowered = assert_round_trip(model)
    assert lowered.kernel.get_raw_value() is model.kernel.get_raw_value()


def test_custom_functions_and_a_bias_nnx_adds_in_an_input_dependent_dtype_stay_foreign_and_exact():
    def dot(*args, **kwargs):
        return jax.lax.dot_general(*args, **kwargs) * 2.0

    def einsum(*args, **kwargs):
        return jnp.einsum(*args, **kwargs) * 2.0

    def promote(args, dtype=None):
        return args

    class Dot:
        def __call__(self, *args, **kwargs):
            return jax.lax.dot_general(*args, **kwargs)

    models = [
        _linear_general(dtype=jnp.bfloat16, dot_general=dot),
        _linear_general(dot_general_cls=Dot),
        _linear_general(dtype=jnp.bfloat16, promote_dtype=promote),
        # dtype=None: NNX adds the bias in the input's promoted dtype, not in the bfloat16 dot output's.
        _linear_general(preferred_element_type=jnp.bfloat16),
        nnx.Einsum("ba,ad->bd", (6, 4), (4,), dtype=jnp.bfloat16, einsum_op=einsum, rngs=nnx.Rngs(0)),
        nnx.Einsum("ba,ad->bd", (6, 4), (4,), promote_dtype=promote, rngs=nnx.Rngs(0)),
    ]
    inputs = [jnp.ones((3, 2, 3))] * 4 + [jnp.ones((3, 6))] * 2
    for model, x in zip(models, inputs):
        lifted = pzb.lift(model)
        assert isinstance(lifted.body, Foreign), type(model).__name__
        assert pzb.select(lifted).at_instances_of((Linear, NamedEinsum)).count() == 0
        np.testing.assert_array_equal(np.asarray(lifted.positional(x)), np.asarray(model(x)))
        assert_round_trip(model)


def test_edited_numerics_reach_the_lowered_layer_and_an_inexpressible_bias_lowers_to_an_adapter():
    model = _linear_general((2, 3), (4,), dtype=jnp.bfloat16)
    lifted = pzb.lift(model)
    x = _normal(0, (2, 2, 3))
    edited = pzb.select(lifted).at_instances_of((NnxPromotedLinear, NnxPromotedBias)).apply(
        lambda layer: dataclasses.replace(layer, dtype=jnp.float16))
    lowered = pzb.lower(edited)
    assert type(lowered) is nnx.LinearGeneral and lowered.dtype is jnp.float16
    assert lowered.kernel.get_raw_value() is model.kernel.get_raw_value() and model.dtype is jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(edited.positional(x)), np.asarray(lowered(x)))
    # An uncast bias on a bfloat16 dot: no LinearGeneral computes that, an adapter runs the lifted layers.
    plain = pzb.select(lifted).at_instances_of(NnxPromotedBias).apply(lambda b: pzb.nn.AddBias(b.bias))
    adapter = pzb.lower(plain)
    assert type(adapter) is not nnx.LinearGeneral
    expected = plain.positional(x)
    assert expected.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(adapter(x)), np.asarray(expected))


def _train(model, x, target, steps=3):
    """``steps`` Adam steps on the LoRA parameters only (one compiled step: cheaper than eager)."""
    optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.LoRAParam)

    @nnx.jit
    def step(m, opt):
        def loss(m):
            return jnp.mean((m(x).astype(jnp.float32) - target) ** 2)

        value, grads = nnx.value_and_grad(loss, argnums=nnx.DiffState(0, nnx.LoRAParam))(m)
        opt.update(m, grads)
        return value

    return [float(step(model, optimizer)) for _ in range(steps)]


LORA_CASES = [
    (lambda: _linear_general((2, 4), (3, 2), dtype=jnp.bfloat16, precision=HIGHEST), (5, 2, 4), LoRALinearGeneral),
    # (Not bfloat16 with preferred_element_type=float32 on a per-head einsum: XLA:CPU has no such batched dot.)
    (lambda: nnx.Einsum("bsha,had->bshd", (2, 4, 3), (2, 3), dtype=jnp.float16, param_dtype=jnp.bfloat16,
                        rngs=nnx.Rngs(0)), (2, 5, 2, 4), LoRAEinsum),
]


@pytest.mark.parametrize("make, shape, lora_cls", LORA_CASES, ids=["linear-general", "einsum"])
def test_lora_on_layers_with_settings_lowers_to_wrappers_trains_and_merges_back(make, shape, lora_cls):
    model = _randomized(make(), 3)
    selection = pzb.select(pzb.lift(model)).at_instances_of((Linear, NamedEinsum))
    assert selection.count() == 1
    edited = loraify_linears_in_selection(selection, 2, jax.random.key(1))
    lowered = pzb.lower(edited)
    assert type(lowered) is lora_cls and type(lowered.base) is type(model)
    assert nnx.graphdef(lowered.base) == nnx.graphdef(model)
    assert lowered.base.kernel.get_raw_value() is model.kernel.get_raw_value()
    assert lowered.lora_a.get_raw_value().dtype == model.kernel.get_raw_value().dtype

    x = _normal(4, shape)
    # B starts at zero: the wrapper computes the original's values (in the adapter's promoted dtype).
    np.testing.assert_array_equal(np.asarray(lowered(x), np.float32), np.asarray(model(x), np.float32))
    np.testing.assert_array_equal(np.asarray(edited.positional(x), np.float32), np.asarray(lowered(x), np.float32))

    losses = _train(lowered, x, _normal(5, model(x).shape))
    assert losses[-1] < losses[0]
    # The base is not trained (nnx.jit hands back new buffers, with the same values).
    trained_kernel = lowered.base.kernel.get_raw_value()
    np.testing.assert_array_equal(np.asarray(trained_kernel), np.asarray(model.kernel.get_raw_value()))

    relifted = pzb.lift(lowered)
    adapter = pzb.select(relifted).at_instances_of(LowRankAdapter).get()
    assert isinstance(adapter.base, (NnxPromotedLinear, NnxPromotedEinsum))
    assert_same_outputs(relifted.positional, lowered, x, bitwise=False)
    merged = pzb.lower(merge_lora(relifted))
    assert type(merged) is type(model) and nnx.graphdef(merged) == nnx.graphdef(model)


def _half_mha(dtype=jnp.bfloat16, **kwargs):
    return nnx.MultiHeadAttention(num_heads=2, in_features=8, qkv_features=8, decode=False, dtype=dtype,
                                  rngs=nnx.Rngs(0), **kwargs)


@pytest.mark.parametrize("dtype, kv_heads", [(jnp.bfloat16, 2), (jnp.float16, 1)], ids=["bf16", "f16-gqa"])
def test_half_precision_multi_head_attention_lifts_without_foreign_and_computes_as_nnx(dtype, kv_heads):
    model = _half_mha(dtype, num_kv_heads=kv_heads)
    lifted = pzb.lift(model)
    assert isinstance(lifted.body, NnxAttention) and pzb.select(lifted).at_instances_of(Foreign).count() == 0
    assert pzb.select(lifted).at_instances_of(NnxPromotedLinear).count() == 4
    assert isinstance(lifted.body.query_key_to_logits.sublayers[0], NnxAttentionLogits)
    x = _normal(0, (2, 5, 8))
    for kwargs in ({}, {"mask": nnx.make_causal_mask(jnp.ones((2, 5)))}):
        out = lifted.positional(x, **kwargs)
        assert out.dtype == model(x, **kwargs).dtype == dtype
        # Named-head einsums are not NNX's program (vmapped over groups): a few ulps, not bitwise.
        assert_same_outputs(lambda a: lifted.positional(a, **kwargs), lambda a: model(a, **kwargs), x, bitwise=False)
    assert_round_trip(model)


def test_lora_finds_the_four_projections_of_a_bfloat16_attention_trains_and_merges_back():
    model = _half_mha()
    lifted = pzb.lift(model)
    assert pzb.select(lifted).at_instances_of(Foreign).count() == 0
    edited = loraify_linears_in_selection(pzb.select(lifted).at_instances_of(Linear), 2, jax.random.key(1))
    assert pzb.select(edited).at_instances_of(LowRankAdapter).count() == 4
    lowered = pzb.lower(edited)
    names = ("query", "key", "value", "out")
    assert type(lowered) is nnx.MultiHeadAttention
    assert all(type(getattr(lowered, name)) is LoRALinearGeneral for name in names)
    assert all(getattr(lowered, name).base.dtype is jnp.bfloat16 for name in names)
    x = _normal(2, (2, 5, 8))
    np.testing.assert_array_equal(np.asarray(lowered(x), np.float32), np.asarray(model(x), np.float32))  # B = 0

    for i, name in enumerate(names):  # non-zero updates: the lifted and lowered adapters still agree
        b = getattr(lowered, name).lora_b
        b.set_raw_value(0.1 * _normal(10 + i, b.shape, b.get_raw_value().dtype))
    # NNX's attention_fn casts the float32 (LoRA) projections back to bfloat16; the lifted kernel does too.
    assert_same_outputs(pzb.lift(lowered).positional, lowered, x, bitwise=False)
    losses = _train(lowered, x, _normal(3, (2, 5, 8)))
    assert losses[-1] < losses[0]
    merged = pzb.lower(merge_lora(pzb.lift(lowered)))
    assert type(merged.query) is nnx.LinearGeneral and nnx.graphdef(merged) == nnx.graphdef(model)
