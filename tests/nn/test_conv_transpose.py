"""Tests for ``pzbridge.nn.conv_transpose`` (``ConvTranspose``).

References: ``equinox.nn.ConvTranspose`` vmapped over extra named batch
axes (the semantics this layer adopts), the adjoint law (a transposed
convolution with the flipped kernel is the VJP of the forward
``lax.conv_general_dilated``), and ``flax.nnx.ConvTranspose`` through
:func:`padding_from_lax_conv_transpose`.
"""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import pzbridge as pzb
from pzbridge.core.errors import StructError
from pzbridge.nn.conv import kernel_axis_name
from pzbridge.nn.conv_transpose import ConvTranspose, padding_from_lax_conv_transpose, transposed_padding
from pzbridge.testing.named_arrays import build_named_array
from pzbridge.testing.numerics import assert_same_outputs

SPATIAL = {1: ("width",), 2: ("height", "width"), 3: ("depth", "height", "width")}


def kernel_param(w, names, perm, label="up.kernel"):
    """A Parameter holding ``w`` (axes ``names``) stored in the data order ``perm``."""
    return pzb.Parameter(pzb.nx.wrap(jnp.asarray(np.transpose(w, perm)), *[names[p] for p in perm]), label)


@st.composite
def transpose_cases(draw):
    n = draw(st.integers(1, 3))
    ints = lambda lo, hi: tuple(draw(st.lists(st.integers(lo, hi), min_size=n, max_size=n)))  # noqa: E731
    sizes, kernel, strides, dilation = ints(1, 4 if n == 3 else 5), ints(1, 3), ints(1, 3), ints(1, 2)
    mode = draw(st.sampled_from(["ZEROS", "ZEROS", "CIRCULAR"]))
    if mode == "CIRCULAR":
        padding, output_padding = draw(st.sampled_from(["SAME", "SAME_LOWER"])), (0,) * n
    else:
        padding = draw(st.one_of(
            st.sampled_from(["SAME", "SAME_LOWER", "VALID"]),
            st.lists(st.tuples(st.integers(0, 2), st.integers(0, 2)), min_size=n, max_size=n).map(tuple)))
        output_padding = tuple(draw(st.integers(0, s - 1)) for s in strides)
    pads = transposed_padding(padding if isinstance(padding, str) else tuple(padding), kernel, strides,
                              output_padding, dilation)
    out = [(m - 1) * s + 1 + lo + hi - ((k - 1) * d + 1) + 1
           for m, s, (lo, hi), k, d in zip(sizes, strides, pads, kernel, dilation)]
    assume(all(o >= 1 for o in out))
    groups = draw(st.integers(1, 2))
    return dict(n=n, sizes=sizes, kernel=kernel, strides=strides, dilation=dilation, padding=padding,
                output_padding=output_padding, mode=mode, groups=groups,
                cin=groups * draw(st.integers(1, 2)), cout=groups * draw(st.integers(1, 2)),
                batch=(draw(st.integers(1, 2)), draw(st.integers(1, 2))), seed=draw(st.integers(0, 2**16)),
                x_perm=draw(st.permutations(range(n + 3))), w_perm=draw(st.permutations(range(n + 2))))


@settings(max_examples=25)
@given(transpose_cases())
def test_conv_transpose_matches_equinox_vmapped_over_named_batch_axes(case):
    spatial = SPATIAL[case["n"]]
    m = eqx.nn.ConvTranspose(case["n"], case["cin"], case["cout"], case["kernel"], stride=case["strides"],
                             padding=case["padding"], output_padding=case["output_padding"],
                             dilation=case["dilation"], groups=case["groups"], padding_mode=case["mode"],
                             key=jax.random.key(case["seed"]))
    x = np.random.default_rng(case["seed"]).normal(size=case["batch"] + (case["cin"],) + case["sizes"])
    x = x.astype(np.float32)
    names = ("channels_out", "channels") + tuple(kernel_axis_name(s) for s in spatial)
    layer = ConvTranspose(
        kernel_param(np.asarray(m.weight), names, case["w_perm"]),
        pzb.Parameter(pzb.nx.wrap(m.bias, "channels", *[f"unit{i}" for i in range(case["n"])]), "up.bias"),
        spatial_axes=spatial, strides=case["strides"], padding=case["padding"],
        output_padding=case["output_padding"], dilation=case["dilation"], groups=case["groups"],
        padding_mode=case["mode"].lower(),
    )
    x_named = build_named_array(x, ("batch", "b2", "channels") + spatial, permutation=case["x_perm"])
    got = layer(x_named).unwrap("batch", "b2", "channels", *spatial)
    expected = jax.vmap(jax.vmap(m))(jnp.asarray(x))
    assert got.shape == expected.shape
    np.testing.assert_allclose(np.asarray(got), np.asarray(expected), rtol=1e-5, atol=1e-5)


@st.composite
def adjoint_cases(draw):
    n = draw(st.integers(1, 2))
    ints = lambda lo, hi: tuple(draw(st.lists(st.integers(lo, hi), min_size=n, max_size=n)))  # noqa: E731
    sizes, kernel, strides, dilation = ints(1, 7), ints(1, 3), ints(1, 3), ints(1, 2)
    pads = tuple(zip(ints(0, 2), ints(0, 2)))
    assume(all(s + lo + hi >= (k - 1) * d + 1 for s, (lo, hi), k, d in zip(sizes, pads, kernel, dilation)))
    return dict(n=n, sizes=sizes, kernel=kernel, strides=strides, dilation=dilation, pads=pads,
                cin=draw(st.integers(1, 3)), cout=draw(st.integers(1, 3)), seed=draw(st.integers(0, 2**16)))


@settings(max_examples=25)
@given(adjoint_cases())
def test_flipped_conv_transpose_is_the_adjoint_of_the_forward_convolution(case):
    rng = np.random.default_rng(case["seed"])
    spatial = SPATIAL[case["n"]]
    w = rng.normal(size=(case["cout"], case["cin"]) + case["kernel"]).astype(np.float32)  # forward (O, I, k...)
    x = rng.normal(size=(case["cin"],) + case["sizes"]).astype(np.float32)

    def forward(x):
        return jax.lax.conv_general_dilated(x[None], jnp.asarray(w), case["strides"], case["pads"],
                                            rhs_dilation=case["dilation"])[0]

    y, vjp = jax.vjp(forward, jnp.asarray(x))
    cot = jnp.asarray(rng.normal(size=y.shape).astype(np.float32))
    (expected,) = vjp(cot)
    extents = [(k - 1) * d + 1 for k, d in zip(case["kernel"], case["dilation"])]
    output_padding = tuple((n + lo + hi - e) % s for n, (lo, hi), e, s in
                           zip(case["sizes"], case["pads"], extents, case["strides"]))
    # The forward output axis is the transposed layer's input channel and vice versa: only names change.
    names = ("channels", "channels_out") + tuple(kernel_axis_name(s) for s in spatial)
    layer = ConvTranspose(kernel_param(w, names, list(range(w.ndim))), spatial_axes=spatial,
                          strides=case["strides"], padding=case["pads"], output_padding=output_padding,
                          dilation=case["dilation"], flip_kernel=True)
    got = layer(pzb.nx.wrap(cot, "channels", *spatial)).unwrap("channels", *spatial)
    assert got.shape == expected.shape
    np.testing.assert_allclose(np.asarray(got), np.asarray(expected), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("padding", ["SAME", "SAME_LOWER", "VALID", 1, ((2, 0), (1, 1))])
@pytest.mark.parametrize("mode", ["ZEROS", "CIRCULAR"])
def test_conv_transpose_matches_equinox_conv_transpose2d(padding, mode):
    if mode == "CIRCULAR" and padding not in ("SAME", "SAME_LOWER"):
        pytest.skip("Equinox defines circular transposed convolutions only for SAME padding")
    output_padding = (1, 0) if mode == "ZEROS" else 0
    m = eqx.nn.ConvTranspose2d(4, 6, (3, 4), stride=(2, 3), padding=padding, output_padding=output_padding,
                               dilation=(1, 2), groups=2, padding_mode=mode, key=jax.random.key(0))
    x = jax.random.normal(jax.random.key(1), (4, 5, 6))
    layer = ConvTranspose(
        pzb.Parameter(pzb.nx.wrap(m.weight, "channels_out", "channels", "kernel_height", "kernel_width"), "w"),
        pzb.Parameter(pzb.nx.wrap(m.bias, "channels", "u1", "u2"), "b"),
        strides=(2, 3), padding=padding, output_padding=output_padding, dilation=(1, 2), groups=2,
        padding_mode=mode.lower(),
    )
    names = ("channels", "height", "width")
    # Not Equinox's program (the jaxprs differ): within a few ulps, not bitwise on every CPU.
    assert_same_outputs(lambda v: layer(pzb.nx.wrap(v, *names)).unwrap(*names), m, x, bitwise=False)


@pytest.mark.parametrize("padding", ["SAME", "VALID", [(1, 2), (0, 1)]])
@pytest.mark.parametrize("transpose_kernel", [False, True])
def test_conv_transpose_equals_flax_nnx_conv_transpose(padding, transpose_kernel):
    m = nnx.ConvTranspose(4, 6, (3, 2), strides=(2, 3), padding=padding, kernel_dilation=(2, 1),
                          transpose_kernel=transpose_kernel, bias_init=nnx.initializers.normal(), rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(2), (2, 5, 4, 4))
    # Flax stores (kh, kw, in, out), or (kh, kw, out, in) with transpose_kernel: name axes by role.
    roles = ("channels_out", "channels") if transpose_kernel else ("channels", "channels_out")
    lax_padding = padding if isinstance(padding, str) else [tuple(p) for p in padding]
    layer = ConvTranspose(
        pzb.Parameter(pzb.nx.wrap(m.kernel[...], "kernel_height", "kernel_width", *roles), "k"),
        pzb.Parameter(pzb.nx.wrap(m.bias[...], "channels"), "b"),
        strides=(2, 3), padding=padding_from_lax_conv_transpose(lax_padding, (3, 2), (2, 3), (2, 1)),
        dilation=(2, 1), flip_kernel=transpose_kernel,
    )
    names = ("batch", "height", "width", "channels")
    # Bitwise where the program is Flax's (checked on the jaxprs); flipping the kernel is not: within ulps.
    assert_same_outputs(lambda v: layer(pzb.nx.wrap(v, *names)).unwrap(*names), m, x, bitwise=not transpose_kernel)


def test_transposed_padding_literal_values():
    # Explicit forward padding (1, 1), k=3, s=2, output_padding=1: (2 - 1, 2 - 1 + 1).
    assert transposed_padding(((1, 1),), (3,), (2,), (1,), (1,)) == ((1, 2),)
    # SAME, k=3, s=2: total 1 split (0, 1) -> (2, 1); SAME_LOWER -> (1, 2).
    assert transposed_padding("SAME", (3,), (2,), (0,), (1,)) == ((2, 1),)
    assert transposed_padding("SAME_LOWER", (3,), (2,), (0,), (1,)) == ((1, 2),)
    # SAME with stride larger than the kernel: the negative total becomes output padding.
    assert transposed_padding("SAME", (1,), (3,), (0,), (1,)) == ((0, 2),)


def test_from_config_is_deterministic_and_output_shape_inverts_conv_shape():
    a = ConvTranspose.from_config("up", jax.random.key(0), 4, 2, 3, strides=2, padding=1, output_padding=1)
    b = ConvTranspose.from_config("up", jax.random.key(0), 4, 2, 3, strides=2, padding=1, output_padding=1)
    np.testing.assert_array_equal(a.kernel.value.data_array, b.kernel.value.data_array)
    assert a.kernel.label == "up.kernel" and a.bias.label == "up.bias"
    y = a(pzb.nx.zeros({"batch": 2, "height": 4, "width": 5, "channels": 4}))
    assert dict(y.named_shape) == {"batch": 2, "height": 8, "width": 10, "channels": 2}
    slots = ConvTranspose.from_config("up", None, 4, 2, (3,), use_bias=False)
    assert slots.kernel == pzb.ParameterSlot("up.kernel") and slots.bias is None
    assert slots.spatial_axes == ("width",)


def test_conv_transpose_jit_and_grad_match_equinox():
    m = eqx.nn.ConvTranspose2d(2, 3, 3, stride=2, padding="SAME", key=jax.random.key(0))
    layer = ConvTranspose(
        pzb.Parameter(pzb.nx.wrap(m.weight, "channels_out", "channels", "kernel_height", "kernel_width"), "w"),
        pzb.Parameter(pzb.nx.wrap(m.bias, "channels", "u1", "u2"), "b"), strides=2, padding="SAME")
    x = jax.random.normal(jax.random.key(1), (3, 2, 4, 4))
    slots, values = pzb.unbind_params(layer, freeze=True)

    @jax.jit
    def loss(values):
        y, _ = slots.stateless_call(values, pzb.nx.wrap(x, "batch", "channels", "height", "width"))
        return jnp.sum(jnp.sin(y.unwrap("batch", "channels", "height", "width")))

    def ref_loss(weight):
        return jnp.sum(jnp.sin(jax.vmap(eqx.tree_at(lambda mm: mm.weight, m, weight))(x)))

    np.testing.assert_allclose(loss(values), ref_loss(m.weight), rtol=1e-5)
    g = next(g for g, v in zip(jax.grad(loss)(values), values) if v.label == "w").value
    np.testing.assert_allclose(g.unwrap("channels_out", "channels", "kernel_height", "kernel_width"),
                               jax.grad(ref_loss)(m.weight), rtol=1e-4, atol=1e-5)


def test_errors_for_unsupported_transposed_configurations():
    slot = pzb.ParameterSlot("dec.up.kernel")
    with pytest.raises(StructError, match=r"output_padding \(2, 2\) must satisfy 0 <= output_padding < strides"):
        ConvTranspose(slot, strides=2, output_padding=2)
    with pytest.raises(NotImplementedError, match=r"padding_mode='circular' is implemented only for padding 'SAME'"):
        ConvTranspose(slot, padding="VALID", padding_mode="circular")
    with pytest.raises(NotImplementedError, match=r"padding_mode 'reflect' has no transposed definition"):
        ConvTranspose(slot, padding="SAME", padding_mode="reflect")
    with pytest.raises(StructError, match=r"'CAUSAL' padding is not defined"):
        ConvTranspose(slot, padding="CAUSAL")
    with pytest.raises(StructError, match=r"padding_from_lax_conv_transpose: padding must be"):
        padding_from_lax_conv_transpose("CIRCULAR", (3,), (2,))
