"""Tests for ``pzbridge.nn.conv`` (``Conv``) and ``pzbridge.nn.padding``.

References: ``lax.conv_general_dilated`` on a plain ``(channels, *spatial)``
array with ``jnp.pad`` for padding modes and padding amounts computed here
from their textbook definitions, ``jax.vmap`` of it for extra named batch
axes, and ``equinox.nn.Conv2d`` / ``flax.nnx.Conv`` for the semantics the
bridges rely on.
"""

from __future__ import annotations

import math

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import pzbridge as pzb
from pzbridge.core.errors import NamedAxisError, StructError
from pzbridge.nn.conv import Conv, default_spatial_axes, kernel_axis_name
from pzbridge.nn.padding import normalize_padding, pad_with_mode, resolve_padding
from pzbridge.testing.named_arrays import build_named_array
from pzbridge.testing.numerics import assert_same_outputs

SPATIAL = {1: ("width",), 2: ("height", "width"), 3: ("depth", "height", "width")}
JNP_MODE = {"reflect": "reflect", "replicate": "edge", "circular": "wrap", "zeros": "constant"}


def same_pads(n: int, extent: int, stride: int, lower: bool) -> tuple[int, int]:
    """Textbook SAME padding: output ceil(n / stride), odd remainder at the end (or start)."""
    out = -(-n // stride)
    total = max((out - 1) * stride + extent - n, 0)
    small = total // 2
    return (total - small, small) if lower else (small, total - small)


def explicit_pads(padding, sizes, kernel, strides, dilation):
    extents = [(k - 1) * d + 1 for k, d in zip(kernel, dilation)]
    if padding in ("SAME", "SAME_LOWER"):
        return [same_pads(n, e, s, padding == "SAME_LOWER") for n, e, s in zip(sizes, extents, strides)]
    if padding == "VALID":
        return [(0, 0)] * len(sizes)
    if padding == "CAUSAL":
        return [(e - 1, 0) for e in extents]
    return [tuple(p) for p in padding]


def reference_conv(x, w, b, *, strides, padding, mode, dilation, input_dilation, groups):
    """Pure jax: x (C, *spatial), w (O, I/groups, *kernel), b (O,) or None."""
    n = x.ndim - 1
    if mode != "zeros" or padding == "CAUSAL":
        pads = explicit_pads(padding, x.shape[1:], w.shape[2:], strides, dilation)
        x = jnp.pad(x, [(0, 0)] + pads, mode=JNP_MODE[mode])
        padding = [(0, 0)] * n
    elif isinstance(padding, str):
        if any(i != 1 for i in input_dilation):
            dilated = [(s - 1) * i + 1 for s, i in zip(x.shape[1:], input_dilation)]
            padding = explicit_pads(padding, dilated, w.shape[2:], strides, dilation)
    else:
        padding = [tuple(p) for p in padding]
    y = jax.lax.conv_general_dilated(
        x[None], w, strides, padding, lhs_dilation=input_dilation, rhs_dilation=dilation, feature_group_count=groups
    )[0]
    if b is not None:
        y = y + b.reshape((-1,) + (1,) * n)
    return y


@st.composite
def conv_cases(draw):
    n = draw(st.integers(1, 3))
    sizes = tuple(draw(st.lists(st.integers(1, 6 if n < 3 else 4), min_size=n, max_size=n)))
    kernel = tuple(draw(st.lists(st.integers(1, 3), min_size=n, max_size=n)))
    strides = tuple(draw(st.lists(st.integers(1, 3), min_size=n, max_size=n)))
    dilation = tuple(draw(st.lists(st.integers(1, 2), min_size=n, max_size=n)))
    input_dilation = tuple(draw(st.lists(st.integers(1, 2), min_size=n, max_size=n)))
    groups = draw(st.integers(1, 3))
    cin, cout = groups * draw(st.integers(1, 2)), groups * draw(st.integers(1, 2))
    mode = draw(st.sampled_from(["zeros", "reflect", "replicate", "circular"]))
    padding = draw(
        st.one_of(
            st.sampled_from(["SAME", "SAME_LOWER", "VALID", "CAUSAL"]),
            st.lists(st.tuples(st.integers(0, 2), st.integers(0, 2)), min_size=n, max_size=n).map(tuple),
        )
    )
    extents = [(k - 1) * d + 1 for k, d in zip(kernel, dilation)]
    if mode != "zeros" or padding == "CAUSAL":
        # Padded with jnp.pad before input dilation, then convolved unpadded.
        pads = explicit_pads(padding, sizes, kernel, strides, dilation)
        if mode == "reflect":
            assume(all(max(p) < n for p, n in zip(pads, sizes)))
        lengths = [(n + lo + hi - 1) * i + 1 for n, (lo, hi), i in zip(sizes, pads, input_dilation)]
    else:
        # lax pads the dilated input itself.
        dilated = [(n - 1) * i + 1 for n, i in zip(sizes, input_dilation)]
        pads = explicit_pads(padding, dilated, kernel, strides, dilation)
        lengths = [n + lo + hi for n, (lo, hi) in zip(dilated, pads)]
    assume(all(length >= e for length, e in zip(lengths, extents)))
    return dict(
        n=n, sizes=sizes, kernel=kernel, strides=strides, dilation=dilation, input_dilation=input_dilation,
        groups=groups, cin=cin, cout=cout, mode=mode, padding=padding, use_bias=draw(st.booleans()),
        batch=(draw(st.integers(1, 2)), draw(st.integers(1, 2))), seed=draw(st.integers(0, 2**16)),
        x_perm_seed=draw(st.integers(0, 2**16)), w_perm=draw(st.permutations(range(n + 2))),
    )


def make_kernel_param(w_oik: np.ndarray, spatial, perm, label="conv.kernel", out_name="channels_out",
                      in_name="channels"):
    names = (out_name, in_name) + tuple(kernel_axis_name(s) for s in spatial)
    stored = np.transpose(w_oik, perm)
    return pzb.Parameter(pzb.nx.wrap(jnp.asarray(stored), *[names[p] for p in perm]), label)


@settings(max_examples=30)
@given(conv_cases())
def test_conv_matches_lax_reference_vmapped_over_named_batch_axes(case):
    rng = np.random.default_rng(case["seed"])
    spatial = SPATIAL[case["n"]]
    b1, b2 = case["batch"]
    x = rng.normal(size=(b1, b2, case["cin"]) + case["sizes"]).astype(np.float32)
    w = rng.normal(size=(case["cout"], case["cin"] // case["groups"]) + case["kernel"]).astype(np.float32)
    b = rng.normal(size=(case["cout"],)).astype(np.float32) if case["use_bias"] else None
    # The input is stored in a random data order, so no storage order is assumed.
    perm = np.random.default_rng(case["x_perm_seed"]).permutation(x.ndim)
    x_named = build_named_array(x, ("batch", "b2", "channels") + spatial, permutation=perm)
    layer = Conv(
        make_kernel_param(w, spatial, case["w_perm"]),
        None if b is None else pzb.Parameter(pzb.nx.wrap(jnp.asarray(b), "channels"), "conv.bias"),
        spatial_axes=spatial, strides=case["strides"], padding=case["padding"], padding_mode=case["mode"],
        dilation=case["dilation"], input_dilation=case["input_dilation"], groups=case["groups"],
    )
    got = layer(x_named).unwrap("batch", "b2", "channels", *spatial)

    def ref(xi):
        return reference_conv(
            xi, jnp.asarray(w), None if b is None else jnp.asarray(b), strides=case["strides"],
            padding=case["padding"], mode=case["mode"], dilation=case["dilation"],
            input_dilation=case["input_dilation"], groups=case["groups"],
        )

    expected = jax.vmap(jax.vmap(ref))(jnp.asarray(x))
    assert got.shape == expected.shape
    np.testing.assert_allclose(np.asarray(got), np.asarray(expected), rtol=1e-5, atol=1e-5)


EQX_PADDINGS = [2, "SAME", "SAME_LOWER", ((2, 1), (0, 1))]


@pytest.mark.parametrize("mode", ["ZEROS", "REFLECT", "REPLICATE", "CIRCULAR"])
@pytest.mark.parametrize("padding", EQX_PADDINGS)
def test_conv_equals_equinox_conv2d_on_its_own_buffers(mode, padding):
    m = eqx.nn.Conv2d(4, 6, (3, 2), stride=(2, 1), padding=padding, dilation=(1, 2), groups=2,
                      padding_mode=mode, key=jax.random.key(0))
    x = jax.random.normal(jax.random.key(1), (4, 7, 8))
    layer = Conv(
        pzb.Parameter(pzb.nx.wrap(m.weight, "channels_out", "channels", "kernel_height", "kernel_width"), "w"),
        # Equinox's (out, 1, 1) bias buffer is kept as is; the size-1 axes just need names.
        pzb.Parameter(pzb.nx.wrap(m.bias, "channels", "bias_h", "bias_w"), "b"),
        strides=(2, 1), padding=padding, dilation=(1, 2), groups=2, padding_mode=mode.lower(),
    )
    names = ("channels", "height", "width")
    # Not Equinox's program (the jaxprs differ: bias and padding layout): within a few ulps, not bitwise.
    assert_same_outputs(lambda v: layer(pzb.nx.wrap(v, *names)).unwrap(*names), m, x, bitwise=False)


def test_conv_equals_equinox_conv1d_and_conv3d():
    for n, cls in ((1, eqx.nn.Conv1d), (3, eqx.nn.Conv3d)):
        m = cls(2, 3, 2, stride=2, padding=1, key=jax.random.key(n))
        x = jax.random.normal(jax.random.key(5), (2,) + (5,) * n)
        spatial = default_spatial_axes(n)
        names = ("channels_out", "channels") + tuple(kernel_axis_name(s) for s in spatial)
        layer = Conv(pzb.Parameter(pzb.nx.wrap(m.weight, *names), "w"),
                     pzb.Parameter(pzb.nx.wrap(m.bias, "channels", *[f"u{i}" for i in range(n)]), "b"),
                     spatial_axes=spatial, strides=2, padding=1)
        assert_same_outputs(lambda v: layer(pzb.nx.wrap(v, "channels", *spatial)).unwrap("channels", *spatial), m, x,
                            bitwise=False)  # not Equinox's jaxpr


FLAX_CASES = [
    ("SAME", "zeros", None),
    ("VALID", "zeros", None),
    ([(1, 2), (0, 1)], "zeros", None),
    ("CIRCULAR", "circular", "kernel"),
    ("REFLECT", "reflect", "kernel"),
]


@pytest.mark.parametrize(("padding", "mode", "pads_from"), FLAX_CASES)
@pytest.mark.parametrize("input_dilation", [1, 2])
def test_conv_equals_flax_nnx_conv_with_several_batch_axes(padding, mode, pads_from, input_dilation):
    if input_dilation != 1 and isinstance(padding, str):
        pytest.skip("flax (lax) accepts input dilation only with explicit padding pairs")
    m = nnx.Conv(4, 6, (3, 2), strides=(1, 2), padding=padding, kernel_dilation=2, input_dilation=input_dilation,
                 feature_group_count=2, bias_init=nnx.initializers.normal(), rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(2), (2, 3, 7, 6, 4))
    # Flax's CIRCULAR / REFLECT strings mean "pad (k_eff - 1) // 2 before, k_eff // 2 after" in that mode.
    ours = [((k - 1) * 2 // 2, ((k - 1) * 2 + 1) // 2) for k in (3, 2)] if pads_from else padding
    layer = Conv(
        pzb.Parameter(pzb.nx.wrap(m.kernel[...], "kernel_height", "kernel_width", "channels", "channels_out"), "k"),
        pzb.Parameter(pzb.nx.wrap(m.bias[...], "channels"), "b"),
        strides=(1, 2), padding=ours, padding_mode=mode, dilation=2, input_dilation=input_dilation, groups=2,
    )
    names = ("b1", "batch", "height", "width", "channels")
    # Bitwise on any CPU: Flax's own program (the jaxprs are compared).
    assert_same_outputs(lambda v: layer(pzb.nx.wrap(v, *names)).unwrap(*names), m, x, bitwise=True)


@pytest.mark.parametrize("padding", ["SAME", "SAME_LOWER", "VALID"])
def test_padding_strings_with_input_dilation_resolve_on_the_dilated_size(padding):
    w = jax.random.normal(jax.random.key(0), (2, 3, 3))  # (out, in, kernel)
    x = jax.random.normal(jax.random.key(1), (3, 5))
    layer = Conv(pzb.Parameter(pzb.nx.wrap(w, "channels_out", "channels", "kernel_seq"), "k"),
                 spatial_axes=("seq",), strides=2, padding=padding, input_dilation=2)
    got = layer(pzb.nx.wrap(x, "channels", "seq")).unwrap("channels", "seq")
    pads = explicit_pads(padding, [9], [3], [2], [1])
    expected = jax.lax.conv_general_dilated(x[None], w, (2,), pads, lhs_dilation=(2,))[0]
    assert got.shape == (2, 5 if padding.startswith("SAME") else 4)
    np.testing.assert_allclose(np.asarray(got), np.asarray(expected), rtol=1e-6)


def test_conv_equals_flax_nnx_causal_conv1d():
    m = nnx.Conv(3, 5, 3, padding="CAUSAL", kernel_dilation=2, rngs=nnx.Rngs(1))
    x = jax.random.normal(jax.random.key(3), (2, 9, 3))
    layer = Conv(pzb.Parameter(pzb.nx.wrap(m.kernel[...], "kernel_seq", "channels", "channels_out"), "k"),
                 pzb.Parameter(pzb.nx.wrap(m.bias[...], "channels"), "b"),
                 spatial_axes=("seq",), padding="CAUSAL", dilation=2)
    names = ("batch", "seq", "channels")
    assert_same_outputs(lambda v: layer(pzb.nx.wrap(v, *names)).unwrap(*names), m, x, bitwise=True)


def test_conv_passes_positional_axes_and_unused_names_through_in_place():
    w = np.arange(2 * 2 * 3, dtype=np.float32).reshape(2, 2, 3) / 10
    layer = Conv(pzb.Parameter(pzb.nx.wrap(jnp.asarray(w), "features", "channels", "kernel_seq"), "k"),
                 spatial_axes=("seq",), out_channel_axis="features", padding="SAME")
    x = np.random.default_rng(0).normal(size=(4, 5, 2, 3)).astype(np.float32)  # (positional, seq, channels, extra)
    xin = pzb.nx.wrap(jnp.asarray(x), "p", "seq", "channels", "extra").untag("p")
    y = layer(xin)
    assert y.positional_shape == (4,)
    assert dict(y.named_shape) == {"seq": 5, "features": 2, "extra": 3}
    ref = jax.vmap(jax.vmap(lambda xi: reference_conv(
        xi.T, jnp.asarray(w), None, strides=(1,), padding="SAME", mode="zeros", dilation=(1,),
        input_dilation=(1,), groups=1), in_axes=2, out_axes=2))(jnp.asarray(x))  # (4, features, seq, extra)
    np.testing.assert_allclose(np.asarray(y.unwrap("features", "seq", "extra")), np.asarray(ref), rtol=1e-5,
                               atol=1e-6)


def test_from_config_is_deterministic_named_and_shaped():
    a = Conv.from_config("enc.conv", jax.random.key(0), 4, 6, (3, 2), groups=2)
    b = Conv.from_config("enc.conv", jax.random.key(0), 4, 6, (3, 2), groups=2)
    c = Conv.from_config("enc.other", jax.random.key(0), 4, 6, (3, 2), groups=2)
    assert a.kernel.label == "enc.conv.kernel" and a.bias.label == "enc.conv.bias"
    assert dict(a.kernel.value.named_shape) == {
        "kernel_height": 3, "kernel_width": 2, "channels": 2, "channels_out": 6}
    np.testing.assert_array_equal(a.kernel.value.unwrap(*a.kernel.value.named_shape),
                                  b.kernel.value.unwrap(*b.kernel.value.named_shape))
    assert not np.array_equal(a.kernel.value.data_array, c.kernel.value.data_array)
    np.testing.assert_array_equal(a.bias.value.unwrap("channels"), np.zeros(6, np.float32))
    # LeCun fan-in: in_channels // groups * prod(kernel) = 12.
    big = Conv.from_config("big", jax.random.key(1), 64, 64, (3, 3), groups=4)
    assert abs(float(jnp.std(big.kernel.value.data_array)) - 1 / math.sqrt(16 * 9)) < 0.01
    assert Conv.from_config("c", jax.random.key(0), 2, 2, 3, spatial_axes=("seq",), use_bias=False).bias is None


def test_from_config_without_key_gives_slots_and_default_axes():
    conv = Conv.from_config("c", None, 3, 5, (2, 2, 2))
    assert conv.kernel == pzb.ParameterSlot("c.kernel") and conv.bias == pzb.ParameterSlot("c.bias")
    assert conv.spatial_axes == ("depth", "height", "width")


def test_conv_under_jit_and_grad_matches_reference():
    layer = Conv.from_config("c", jax.random.key(0), 2, 3, (3, 3), strides=2, padding="SAME",
                             padding_mode="reflect", spatial_axes=("height", "width"))
    x = jax.random.normal(jax.random.key(1), (2, 2, 6, 5))  # (batch, channels, height, width)
    slots, values = pzb.unbind_params(layer, freeze=True)
    kernel_value = next(v for v in values if v.label == "c.kernel").value

    @jax.jit
    def loss(values, x):
        y, _ = slots.stateless_call(values, pzb.nx.wrap(x, "batch", "channels", "height", "width"))
        return jnp.sum(y.unwrap("batch", "channels", "height", "width") ** 2)

    w = kernel_value.unwrap("channels_out", "channels", "kernel_height", "kernel_width")

    def ref_loss(w, x):
        y = jax.vmap(lambda xi: reference_conv(xi, w, None, strides=(2, 2), padding="SAME", mode="reflect",
                                               dilation=(1, 1), input_dilation=(1, 1), groups=1))(x)
        return jnp.sum(y**2)

    np.testing.assert_allclose(loss(values, x), ref_loss(w, x), rtol=1e-5)
    grads = jax.grad(loss)(values, x)
    g_kernel = next(g for g, v in zip(grads, values) if v.label == "c.kernel").value
    np.testing.assert_allclose(
        g_kernel.unwrap("channels_out", "channels", "kernel_height", "kernel_width"),
        jax.grad(ref_loss)(w, x), rtol=1e-4, atol=1e-5)


# ----- errors ---------------------------------------------------------------------------------------------


def _small_conv(**kwargs):
    return Conv.from_config("blocks.0.conv", jax.random.key(0), 4, 4, 3, spatial_axes=("seq",), **kwargs)


def test_error_for_missing_axes_names_layer_axes_and_fix():
    x = pzb.nx.zeros({"batch": 1, "time": 5, "channels": 4})
    with pytest.raises(NamedAxisError, match=r"blocks\.0\.conv\.kernel.*lacks axes \['seq'\].*time.*Fix"):
        _small_conv()(x)


def test_error_for_channel_count_mismatch_with_groups():
    x = pzb.nx.zeros({"seq": 5, "channels": 6})
    with pytest.raises(NamedAxisError, match=r"groups=2.*size 6.*size 2.*Fix: feed 4 channels"):
        _small_conv(groups=2)(x)


def test_error_for_kernel_with_wrong_axis_names():
    bad = pzb.Parameter(pzb.nx.wrap(jnp.zeros((2, 2, 3)), "features", "channels", "kernel_seq"), "k")
    with pytest.raises(NamedAxisError, match=r"kernel must have exactly the named axes.*channels_out.*features"):
        Conv(bad, spatial_axes=("seq",))(pzb.nx.zeros({"seq": 4, "channels": 2}))


def test_error_when_output_channel_name_already_used_by_input():
    layer = Conv.from_config("c", jax.random.key(0), 2, 2, 1, spatial_axes=("seq",), out_channel_axis="features")
    with pytest.raises(NamedAxisError, match=r"'features' is already an axis of the input"):
        layer(pzb.nx.zeros({"seq": 3, "channels": 2, "features": 7}))


def test_error_for_bad_static_config():
    with pytest.raises(StructError, match=r"padding string must be one of"):
        _small_conv(padding="FULL")
    with pytest.raises(StructError, match=r"strides must be an int or 1 ints"):
        _small_conv(strides=(1, 2))
    with pytest.raises(StructError, match=r"padding_mode must be one of"):
        _small_conv(padding_mode="mirror")
    with pytest.raises(StructError, match=r"groups=3 must divide in_channels=4"):
        _small_conv(groups=3)
    with pytest.raises(StructError, match=r"in_channel_axis 'seq' is also a spatial axis"):
        Conv(pzb.ParameterSlot("k"), spatial_axes=("seq",), in_channel_axis="seq")


def test_error_for_reflect_padding_wider_than_input():
    layer = _small_conv(padding=((3, 0),), padding_mode="reflect")
    with pytest.raises(StructError, match=r"reflect padding \(3, 0\) must be smaller than the padded axis \(size 3\)"):
        layer(pzb.nx.zeros({"seq": 3, "channels": 4}))


def test_error_for_bias_with_wrong_shape():
    kernel = _small_conv().kernel
    layer = Conv(kernel, pzb.Parameter(pzb.nx.zeros({"channels": 4, "seq": 2}), "b"), spatial_axes=("seq",))
    with pytest.raises(NamedAxisError, match=r"bias must have the axis 'channels' of size 4 \(plus only size-1"):
        layer(pzb.nx.zeros({"seq": 5, "channels": 4}))


# ----- padding helpers ------------------------------------------------------------------------------------


@given(st.integers(1, 12), st.integers(1, 4), st.integers(1, 4), st.integers(1, 3), st.booleans())
def test_same_padding_gives_ceil_output_size_and_splits_like_lax(n, k, s, d, lower):
    ((lo, hi),) = resolve_padding("SAME_LOWER" if lower else "SAME", (n,), (k,), (s,), (d,))
    assert (lo, hi) == same_pads(n, (k - 1) * d + 1, s, lower)
    assert (n + lo + hi - ((k - 1) * d + 1)) // s + 1 == -(-n // s)


def test_normalize_padding_accepts_every_framework_spelling():
    assert normalize_padding(1, 2, "Conv") == ((1, 1), (1, 1))
    assert normalize_padding([2, 0], 2, "Conv") == ((2, 2), (0, 0))
    assert normalize_padding([(1, 2), [0, 3]], 2, "Conv") == ((1, 2), (0, 3))
    assert normalize_padding("same_lower", 3, "Conv") == "SAME_LOWER"
    with pytest.raises(StructError, match=r"one per spatial axis"):
        normalize_padding([(1, 2, 3), 0], 2, "Conv")


@pytest.mark.parametrize(("mode", "expected"), [
    ("zeros", [0, 0, 1, 2, 3, 4, 0]),
    ("reflect", [3, 2, 1, 2, 3, 4, 3]),
    ("replicate", [1, 1, 1, 2, 3, 4, 4]),
    ("circular", [3, 4, 1, 2, 3, 4, 1]),
])
def test_pad_with_mode_matches_literal_values(mode, expected):
    got = pad_with_mode(jnp.arange(1, 5), (0,), ((2, 1),), mode, "Conv")
    np.testing.assert_array_equal(np.asarray(got), np.array(expected))
