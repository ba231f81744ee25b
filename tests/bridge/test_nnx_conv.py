"""NNX Conv / ConvTranspose rules: lifted form, exact outputs, round trips, named batch axes, fallbacks."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st

import pzbridge as pzb
from pzbridge.bridge.nnx.conv import NnxConv, NnxConvTranspose
from pzbridge.bridge.nnx.adapter import NnxAdapter
from pzbridge.nn.foreign import Foreign
from nnx_checks import assert_round_trip, assert_same_outputs
from pzbridge.testing import numerics

settings_ = settings(max_examples=12)

PADDINGS = ["SAME", "VALID", "CIRCULAR", "REFLECT", 1, ((1, 0), (0, 2))]


@settings_
@given(st.sampled_from(PADDINGS), st.sampled_from([1, 2]), st.sampled_from([1, 2]), st.sampled_from([1, 2]),
       st.booleans(), st.integers(0, 99))
def test_conv_2d_lifts_to_named_conv_and_matches_bitwise(padding, strides, dilation, groups, use_bias, seed):
    model = nnx.Conv(4, 6, (3, 2), strides=strides, padding=padding, kernel_dilation=dilation,
                     feature_group_count=groups, use_bias=use_bias, rngs=nnx.Rngs(seed))
    body = pzb.lift(model).body
    assert isinstance(body, NnxConv) and body.spatial_axes == ("height", "width")
    assert dict(body.kernel.value.named_shape) == {
        "kernel_height": 3, "kernel_width": 2, "channels": 4 // groups, "channels_out": 6}
    assert (body.bias is None) == (not use_bias)
    x = jax.random.normal(jax.random.key(seed), (2, 7, 6, 4))
    assert_same_outputs(model, x)
    assert_round_trip(model)


@settings_
@given(st.sampled_from(["SAME", "VALID", "CAUSAL", "CIRCULAR"]), st.sampled_from([1, 3]), st.integers(0, 99))
def test_conv_1d_and_3d_match_bitwise_including_causal(padding, dilation, seed):
    model = nnx.Conv(2, 3, 3, padding=padding, kernel_dilation=dilation, rngs=nnx.Rngs(seed))
    assert pzb.lift(model).body.spatial_axes == ("width",)
    assert_same_outputs(model, jax.random.normal(jax.random.key(seed), (2, 9, 2)))
    assert_round_trip(model)
    if padding != "CAUSAL":
        model3 = nnx.Conv(2, 3, (2, 2, 2), padding=padding, rngs=nnx.Rngs(seed))
        assert pzb.lift(model3).body.spatial_axes == ("depth", "height", "width")
        assert_same_outputs(model3, jax.random.normal(jax.random.key(seed), (1, 4, 5, 4, 2)))
        assert_round_trip(model3)


def test_conv_unbatched_and_multi_batch_inputs_match():
    model = nnx.Conv(3, 5, (3, 3), strides=2, rngs=nnx.Rngs(0))
    assert_same_outputs(model, jax.random.normal(jax.random.key(0), (6, 6, 3)))
    assert_same_outputs(model, jax.random.normal(jax.random.key(1), (2, 3, 6, 6, 3)))


def test_conv_passes_extra_named_batch_axes_through():
    model = nnx.Conv(3, 5, (3, 3), rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(0), (2, 4, 6, 6, 3))
    names = ("batch", "seq", "height", "width", "channels")
    out = pzb.lift(model).body(pzb.nx.wrap(x, *names))
    assert set(out.named_shape) == set(names)
    # Bitwise: NNX's own program (the jaxprs are compared), so equal on any CPU.
    numerics.assert_same_outputs(lambda a: pzb.lift(model).body(pzb.nx.wrap(a, *names)).unwrap(*names), model, x,
                                 bitwise=True)


@settings_
@given(st.sampled_from(["SAME", "VALID", ((1, 2), (0, 1))]), st.sampled_from([1, 2]), st.sampled_from([1, 2]),
       st.booleans(), st.booleans(), st.integers(0, 99))
def test_conv_transpose_matches_bitwise_unless_it_flips_the_kernel(padding, strides, dilation, transpose_kernel,
                                                                  use_bias, seed):
    model = nnx.ConvTranspose(3, 5, (3, 2), strides=strides, padding=padding, kernel_dilation=dilation,
                              transpose_kernel=transpose_kernel, use_bias=use_bias, rngs=nnx.Rngs(seed))
    body = pzb.lift(model).body
    assert isinstance(body, NnxConvTranspose) and body.flip_kernel == transpose_kernel
    assert dict(body.kernel.value.named_shape) == {"kernel_height": 3, "kernel_width": 2, "channels": 3, "channels_out": 5}
    # NNX stores (*k, in, out), or (*k, out, in) with transpose_kernel: the buffer is kept as stored.
    stored = tuple(body.kernel.value.named_shape)[2:]
    assert stored == (("channels_out", "channels") if transpose_kernel else ("channels", "channels_out"))
    x = jax.random.normal(jax.random.key(seed), (2, 5, 4, 3))
    # Flipping the kernel is not NNX's program (a jaxpr of its own): within a few ulps, not bitwise on every CPU.
    assert_same_outputs(model, x, ulps=4 if transpose_kernel else None)
    assert_round_trip(model)
    names = ("batch", "height", "width", "channels")
    numerics.assert_same_outputs(lambda a: body(pzb.nx.wrap(a, *names)).unwrap(*names), model, x,
                                 bitwise=not transpose_kernel)


def test_conv_configurations_without_pzbridge_counterpart_stay_foreign_and_exact():
    mask = jnp.ones((3, 3, 2, 4)).at[0, 0].set(0.0)
    x = jax.random.normal(jax.random.key(0), (2, 6, 6, 2))
    for model in (nnx.Conv(2, 4, (3, 3), mask=mask, rngs=nnx.Rngs(0)),
                  nnx.Conv(2, 4, (3, 3), dtype=jnp.bfloat16, rngs=nnx.Rngs(0)),
                  nnx.ConvTranspose(2, 4, (3, 3), padding="CIRCULAR", rngs=nnx.Rngs(0))):
        assert isinstance(pzb.lift(model).body, Foreign)
        assert_same_outputs(model, x)
        assert_round_trip(model)


def test_lift_leaves_the_nnx_conv_untouched_and_shares_buffers():
    model = nnx.Conv(2, 3, (2, 2), rngs=nnx.Rngs(0))
    kernel_before = model.kernel[...]
    body = pzb.lift(model).body
    assert body.kernel.value.data_array is model.kernel.get_raw_value()
    assert model.kernel[...] is kernel_before


def test_edited_conv_lowers_to_adapter_that_computes_the_edit():
    model = nnx.Conv(2, 3, (3, 3), rngs=nnx.Rngs(0))
    lifted = pzb.lift(model)
    edited = pzb.select(lifted).at_instances_of(NnxConv).apply(lambda c: dataclasses.replace(c, strides=(2, 2)))
    lowered = pzb.lower(edited)
    assert isinstance(lowered, NnxAdapter)
    x = jax.random.normal(jax.random.key(0), (1, 7, 7, 2))
    reference = nnx.Conv(2, 3, (3, 3), strides=2, rngs=nnx.Rngs(0))
    np.testing.assert_allclose(lowered(x), reference(x), rtol=1e-6, atol=1e-6)
