"""nnx.Linear with non-default settings (dtype, param_dtype, precision, preferred_element_type, use_bias).

Such layers lift natively to ``NnxLinear([NnxPromotedLinear, NnxPromotedBias])``, run NNX's own program
(promotion to the compute dtype, one ``dot_general`` with NNX's precision, the bias added as NNX adds it),
lower back to the original class and graphdef, and take LoRA like any other ``nnx.Linear``.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from hypothesis import given
from hypothesis import strategies as st
from nnx_checks import assert_round_trip, leaf_arrays

import pzbridge as pzb
from pzbridge.bridge.nnx.linear import NnxLinear, NnxPromotedBias, NnxPromotedLinear
from pzbridge.nn.foreign import Foreign
from pzbridge.nn.linear import AddBias, Linear
from pzbridge.testing.numerics import assert_same_outputs
from pzbridge.toolshed.lora import LowRankAdapter, loraify_linears_in_selection, merge_lora

HIGHEST = jax.lax.Precision.HIGHEST

SETTINGS = [
    dict(dtype=jnp.bfloat16),
    dict(dtype=jnp.bfloat16, param_dtype=jnp.float32),
    dict(dtype=jnp.float16, param_dtype=jnp.float32),
    dict(dtype=jnp.bfloat16, param_dtype=jnp.bfloat16, use_bias=False),
    dict(precision=HIGHEST),
    dict(precision="highest", use_bias=False),
    dict(param_dtype=jnp.bfloat16),
    dict(dtype=jnp.bfloat16, preferred_element_type=jnp.float32),
    dict(dtype=jnp.float32, precision=(HIGHEST, HIGHEST)),
    dict(preferred_element_type=jnp.float32, use_bias=False),
]


def _ids(kwargs):
    return ",".join(f"{k}={getattr(v, '__name__', v)}" for k, v in kwargs.items())


def _randomized(model, seed):
    """A copy of ``model`` with random (non-zero) biases, so the bias path is exercised."""
    model = nnx.clone(model)
    if model.bias is not None:
        bias = model.bias.get_raw_value()
        model.bias.set_raw_value(jax.random.normal(jax.random.key(seed), bias.shape, bias.dtype))
    return model


def _lifted_call(model):
    return lambda x: pzb.lift(nnx.clone(model)).positional(x)


def _nnx_call(model):
    return lambda x: nnx.clone(model)(x)


@pytest.mark.parametrize("kwargs", SETTINGS, ids=_ids)
def test_linear_with_non_default_settings_lifts_natively_and_runs_the_nnx_program(kwargs):
    model = _randomized(nnx.Linear(3, 4, rngs=nnx.Rngs(0), **kwargs), 1)
    before = leaf_arrays(model)
    lifted = pzb.lift(model)
    assert isinstance(lifted.body, NnxLinear)
    use_bias = kwargs.get("use_bias", True)
    assert [type(layer) for layer in lifted.body.sublayers] == [NnxPromotedLinear, NnxPromotedBias][: 1 + use_bias]
    linear = lifted.body.sublayers[0]
    assert (linear.dtype, linear.precision, linear.preferred_element_type) == (
        kwargs.get("dtype"), kwargs.get("precision"), kwargs.get("preferred_element_type"))
    # The weights keep NNX's stored dtype (param_dtype) and buffer; only the computation is cast.
    assert linear.weights.value.data_array is model.kernel.get_raw_value()
    assert dict(linear.weights.value.named_shape) == {"features": 3, "features_out": 4}
    assert pzb.select(lifted).at_instances_of(Linear).count() == 1
    for x_dtype in (jnp.float32, jnp.bfloat16):
        x = jax.random.normal(jax.random.key(2), (2, 5, 3), x_dtype)
        # The same primitives in the same order as nnx.Linear.__call__: bitwise on any machine.
        assert_same_outputs(_lifted_call(model), _nnx_call(model), x, bitwise=True)
        assert lifted.positional(x).dtype == model(x).dtype
    assert_round_trip(model)
    assert all(np.array_equal(a, b) for a, b in zip(leaf_arrays(model), before))  # never mutated


def test_non_default_precision_lifts_natively_and_exactly():
    model = nnx.Linear(2, 3, precision=HIGHEST, rngs=nnx.Rngs(0))
    lifted = pzb.lift(model)
    assert not isinstance(lifted.body, Foreign)
    assert lifted.body.sublayers[0].precision is HIGHEST
    x = jnp.ones((4, 2))
    assert_same_outputs(lifted.positional, model, x, bitwise=True)
    lowered = assert_round_trip(model)
    assert lowered.precision is HIGHEST


@given(
    dtype=st.sampled_from([None, jnp.float32, jnp.bfloat16, jnp.float16]),
    param_dtype=st.sampled_from([jnp.float32, jnp.bfloat16]),
    precision=st.sampled_from([None, HIGHEST, jax.lax.Precision.DEFAULT, "high"]),
    preferred=st.sampled_from([None, jnp.float32, jnp.bfloat16]),
    use_bias=st.booleans(),
    x_dtype=st.sampled_from([jnp.float32, jnp.bfloat16]),
    seed=st.integers(0, 99),
)
def test_random_linear_settings_lift_exactly_or_stay_foreign(dtype, param_dtype, precision, preferred, use_bias,
                                                             x_dtype, seed):
    model = _randomized(nnx.Linear(3, 2, dtype=dtype, param_dtype=param_dtype, precision=precision,
                                   preferred_element_type=preferred, use_bias=use_bias, rngs=nnx.Rngs(seed)), seed)
    lifted = pzb.lift(model)
    # The one case kept Foreign: with dtype=None NNX adds the bias in the dtype inferred from the input, which a
    # bfloat16 dot output does not tell (a float32 preferred_element_type absorbs every inferred dtype).
    assert isinstance(lifted.body, Foreign) == (dtype is None and preferred is jnp.bfloat16 and use_bias)
    x = jax.random.normal(jax.random.key(seed), (2, 3), x_dtype)
    if not isinstance(lifted.body, Foreign):
        # NNX's own program, except for plain layers (the bias added by name) and, with dtype=None and a
        # preferred_element_type, the bias cast before instead of after its reshape: then equal within ulps.
        promoted = isinstance(lifted.body.sublayers[0], NnxPromotedLinear)
        same = promoted and not (dtype is None and preferred is not None and use_bias)
        assert_same_outputs(_lifted_call(model), _nnx_call(model), x, bitwise=True if same else None)
        assert lifted.positional(x).dtype == model(x).dtype
    else:
        np.testing.assert_array_equal(np.asarray(lifted.positional(x)), np.asarray(model(x)))
    assert_round_trip(model)


def test_custom_dot_general_or_promote_dtype_and_mixed_bias_dtype_stay_foreign_and_exact():
    def dot(*args, **kwargs):
        return jax.lax.dot_general(*args, **kwargs) * 2.0

    mixed = nnx.Linear(3, 2, param_dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    mixed.bias = nnx.Param(jnp.ones(2, jnp.float32))  # bias promotes the inferred compute dtype to float32
    for model in (nnx.Linear(3, 2, dot_general=dot, rngs=nnx.Rngs(0)),
                  nnx.Linear(3, 2, promote_dtype=lambda args, dtype=None: args, rngs=nnx.Rngs(0)),
                  mixed):
        lifted = pzb.lift(model)
        assert isinstance(lifted.body, Foreign)
        assert pzb.select(lifted).at_instances_of(Linear).count() == 0
        x = jax.random.normal(jax.random.key(3), (2, 3), jnp.bfloat16)
        np.testing.assert_array_equal(np.asarray(lifted.positional(x)), np.asarray(model(x)))
        assert_round_trip(model)


def test_edited_numerics_reach_the_lowered_nnx_linear():
    model = nnx.Linear(3, 2, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    lifted = pzb.lift(model)
    edited = pzb.select(lifted).at_instances_of((NnxPromotedLinear, NnxPromotedBias)).apply(
        lambda layer: dataclasses.replace(layer, dtype=jnp.float16))
    lowered = pzb.lower(edited)
    assert type(lowered) is nnx.Linear and lowered.dtype is jnp.float16
    assert lowered.param_dtype is model.param_dtype and lowered.kernel.get_raw_value() is model.kernel.get_raw_value()
    x = jnp.ones((2, 3))
    assert lowered(x).dtype == jnp.float16
    np.testing.assert_array_equal(np.asarray(edited.positional(x)), np.asarray(lowered(x)))
    assert model.dtype is jnp.bfloat16  # the original is untouched


def test_bias_the_nnx_class_cannot_add_lowers_through_an_adapter_that_computes_the_lifted_layers():
    # dtype=bfloat16 casts the bias before adding it; a plain AddBias adds the float32 bias uncast.
    model = nnx.Linear(3, 2, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    lifted = pzb.lift(model)
    plain = pzb.select(lifted).at_instances_of(NnxPromotedBias).apply(lambda b: AddBias(b.bias))
    lowered = pzb.lower(plain)
    assert type(lowered) is not nnx.Linear
    x = jax.random.normal(jax.random.key(0), (2, 3))
    expected = plain.positional(x)
    assert expected.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(lowered(x)), np.asarray(expected))


def test_promoted_linear_lowered_to_equinox_keeps_its_numerics():
    model = nnx.Linear(3, 2, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    lowered = pzb.lower(pzb.lift(model), framework="equinox")
    x = jax.random.normal(jax.random.key(0), (3,))
    out = lowered(x)
    assert out.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(out), np.asarray(model(x[None])[0]))


@pytest.mark.parametrize("kwargs", [dict(dtype=jnp.bfloat16, param_dtype=jnp.float32, precision=HIGHEST),
                                    dict(dtype=jnp.float16, param_dtype=jnp.float32, use_bias=False),
                                    dict(param_dtype=jnp.bfloat16, precision="highest")], ids=_ids)
def test_lora_on_a_linear_with_settings_lowers_to_lora_linear_with_them_and_trains(kwargs):
    model = _randomized(nnx.Linear(4, 3, rngs=nnx.Rngs(0), **kwargs), 2)
    lifted = pzb.lift(model)
    selection = pzb.select(lifted).at_instances_of(Linear)
    assert selection.count() == 1
    edited = loraify_linears_in_selection(selection, 2, jax.random.key(1))
    lowered = pzb.lower(edited)
    assert type(lowered) is nnx.LoRALinear
    for name in ("dtype", "param_dtype", "precision", "preferred_element_type", "use_bias", "dot_general"):
        assert getattr(lowered, name) is getattr(model, name), name
    assert type(lowered.lora.lora_a) is nnx.LoRAParam
    assert lowered.lora.lora_a.get_raw_value().dtype == model.kernel.get_raw_value().dtype
    assert lowered.kernel.get_raw_value() is model.kernel.get_raw_value()

    x = jax.random.normal(jax.random.key(3), (5, 4))
    # B starts at zero: the adapted layer computes the original's values (in the adapter's promoted dtype,
    # as nnx.LoRALinear does: nnx.LoRA's lora_dtype=None).
    np.testing.assert_array_equal(np.asarray(lowered(x), np.float32), np.asarray(model(x), np.float32))
    np.testing.assert_array_equal(np.asarray(edited.positional(x), np.float32), np.asarray(model(x), np.float32))

    kernel = lowered.kernel.get_raw_value()
    target = jax.random.normal(jax.random.key(4), (5, 3))
    optimizer = nnx.Optimizer(lowered, optax.adam(1e-2), wrt=nnx.LoRAParam)

    def loss(m):
        return jnp.mean((m(x).astype(jnp.float32) - target) ** 2)

    losses = []
    for _ in range(5):
        value, grads = nnx.value_and_grad(loss, argnums=nnx.DiffState(0, nnx.LoRAParam))(lowered)
        optimizer.update(lowered, grads)
        losses.append(float(value))
    assert losses[-1] < losses[0]
    assert lowered.kernel.get_raw_value() is kernel  # the base is not trained

    # Re-lift, merge, lower: the original class and graphdef again.
    relifted = pzb.lift(lowered)
    adapter = pzb.select(relifted).at_instances_of(LowRankAdapter).get()
    assert isinstance(adapter.base, NnxPromotedLinear)
    np.testing.assert_allclose(np.asarray(relifted.positional(x), np.float32), np.asarray(lowered(x), np.float32),
                               rtol=1e-6, atol=1e-6)
    merged = pzb.lower(merge_lora(relifted))
    assert type(merged) is nnx.Linear and nnx.graphdef(merged) == nnx.graphdef(model)
