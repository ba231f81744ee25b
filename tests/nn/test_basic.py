"""Tests for pzbridge/nn/basic.py: each parameter-free layer against its jnp reference, vmapped by name."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pzbridge.core import named_axes as nx
from pzbridge.core.errors import NamedAxisError
from pzbridge.core.variables import Parameter, unbind_params
from pzbridge.nn.basic import CastToDType, ConstantRescale, Elementwise, NamedEinsum, RenameAxes, Softmax
from pzbridge.testing.numerics import assert_same_outputs


def stored(data, names, perm):
    return nx.wrap(jnp.asarray(np.transpose(data, perm)), *[names[i] for i in perm])


shapes = st.tuples(st.integers(1, 3), st.integers(1, 3), st.integers(1, 4))
NAMES = ["batch", "seq", "kv_seq"]


@settings(max_examples=10)
@given(st.integers(0, 2**16), shapes, st.integers(0, 100))
def test_softmax_over_name_equals_vmapped_softmax(seed, shape, perm_seed):
    x = np.random.RandomState(seed).normal(size=shape).astype(np.float32)
    perm = list(np.random.RandomState(perm_seed).permutation(3))
    y = Softmax("kv_seq")(stored(x, NAMES, perm)).unwrap(*NAMES)
    np.testing.assert_allclose(y, jax.vmap(jax.vmap(jax.nn.softmax))(x), rtol=1e-6, atol=1e-6)


@settings(max_examples=10)
@given(st.integers(0, 2**16), shapes, st.integers(0, 100), st.sampled_from([jax.nn.gelu, jnp.tanh, jax.nn.relu]))
def test_elementwise_and_rescale_preserve_layout_and_values(seed, shape, perm_seed, fn):
    x = np.random.RandomState(seed).normal(size=shape).astype(np.float32)
    perm = list(np.random.RandomState(perm_seed).permutation(3))
    xin = stored(x, NAMES, perm)
    # Bitwise where the programs allow (the identity layout runs the reference's jaxpr; relu rounds nowhere);
    # a permuted layout adds transposes, so other functions are compared within a few ulps there.
    assert_same_outputs(lambda v: Elementwise(fn)(stored(v, NAMES, perm)).unwrap(*NAMES), fn, jnp.asarray(x))
    assert_same_outputs(lambda v: ConstantRescale(0.25)(stored(v, NAMES, perm)).unwrap(*NAMES), lambda v: v * 0.25,
                        jnp.asarray(x))
    assert CastToDType(jnp.bfloat16)(xin).dtype == jnp.bfloat16


@settings(max_examples=10)
@given(st.integers(0, 2**16), shapes)
def test_named_einsum_equals_einsum_reference(seed, shape):
    b, s, d = shape
    rng = np.random.RandomState(seed)
    x = rng.normal(size=(b, s, d)).astype(np.float32)
    w = rng.normal(size=(d, 2, 3)).astype(np.float32)
    layer = NamedEinsum((Parameter(nx.wrap(jnp.asarray(w), "features", "heads", "projection"), "w"),),
                        ("features",), {"projection": "out"})
    y = layer(nx.wrap(jnp.asarray(x), "batch", "seq", "features")).unwrap("batch", "seq", "heads", "out")
    np.testing.assert_allclose(y, jnp.einsum("bsd,dhp->bshp", x, w), rtol=1e-5, atol=1e-5)
    slots, values = unbind_params(layer, freeze=True)
    jitted = jax.jit(lambda vs, x: slots.stateless_call(vs, x)[0].unwrap("batch", "seq", "heads", "out"))
    np.testing.assert_allclose(jitted(values, nx.wrap(jnp.asarray(x), "batch", "seq", "features")), y, rtol=1e-6)


def test_rename_axes_is_metadata_only_and_checks_names():
    x = nx.wrap(jnp.arange(6.0).reshape(2, 3), "seq", "features")
    y = RenameAxes(("seq",), ("kv_seq",))(x)
    assert dict(y.named_shape) == {"kv_seq": 2, "features": 3}
    assert y.data_array is x.data_array
    with pytest.raises(NamedAxisError, match=r"lacks named axes \['heads'\]"):
        RenameAxes("heads", "h")(x)
    with pytest.raises(NamedAxisError, match="collide"):
        RenameAxes("seq", "features")(x)
    with pytest.raises(NamedAxisError, match=r"Softmax: input lacks named axes \['kv_seq'\]"):
        Softmax("kv_seq")(x)
