"""Tests for pzbridge/nn/linear.py and contraction.py: einsum references, storage-order freedom, vmap by name."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pzbridge.core import named_axes as nx
from pzbridge.core.errors import NamedAxisError
from pzbridge.core.variables import Parameter, ParameterSlot, unbind_params
from pzbridge.nn.contraction import contract
from pzbridge.nn.linear import Affine, AddBias, Linear


def stored(data, names, perm):
    return nx.wrap(jnp.asarray(np.transpose(data, perm)), *[names[i] for i in perm])


@settings(max_examples=10)
@given(st.integers(0, 2**16), st.integers(1, 3), st.integers(1, 4), st.integers(1, 4), st.integers(1, 3),
       st.integers(0, 100), st.booleans())
def test_linear_with_parallel_axis_matches_einsum_vmapped_over_batch(seed, batch, fin, fout, heads, perm_seed, same):
    rng = np.random.RandomState(seed)
    x = rng.normal(size=(batch, heads, fin)).astype(np.float32)
    w = rng.normal(size=(heads, fin, fout)).astype(np.float32)
    out_name = "features" if same else "projection"
    w_names = ["heads", "features", "features_out" if same else "projection"]
    perm = list(np.random.RandomState(perm_seed).permutation(3))
    layer = Linear(Parameter(stored(w, w_names, perm), "q.weights"), ("features",), (out_name,))
    xin = stored(x, ["batch", "heads", "features"], list(np.random.RandomState(perm_seed + 1).permutation(3)))
    y = layer(xin).unwrap("batch", "heads", out_name)
    expected = jax.vmap(lambda v: jnp.einsum("hi,hio->ho", v, jnp.asarray(w)))(x)
    np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-5)


@settings(max_examples=10)
@given(st.integers(0, 2**16), st.integers(1, 3), st.integers(1, 4), st.integers(1, 4))
def test_affine_equals_dense_reference_and_from_config_is_deterministic(seed, batch, fin, fout):
    layer = Affine.from_config("dense", jax.random.key(seed), {"features": fin}, {"features": fout})
    again = Affine.from_config("dense", jax.random.key(seed), {"features": fin}, {"features": fout})
    w = layer.sublayers[0].weights.value.unwrap("features", "features_out")
    np.testing.assert_array_equal(w, again.sublayers[0].weights.value.unwrap("features", "features_out"))
    bias = jnp.arange(fout, dtype=jnp.float32)
    layer = Affine([layer.sublayers[0], AddBias(Parameter(nx.wrap(bias, "features"), "dense.bias"))])
    x = np.random.RandomState(seed).normal(size=(batch, fin)).astype(np.float32)
    y = layer(nx.wrap(jnp.asarray(x), "batch", "features")).unwrap("batch", "features")
    np.testing.assert_allclose(y, jax.vmap(lambda v: v @ w + bias)(x), rtol=1e-5, atol=1e-5)


def test_from_config_labels_slots_and_variance():
    lin = Linear.from_config("blocks.0.q", jax.random.key(0), {"features": 64}, {"heads": 4, "projection": 8})
    assert lin.weights.label == "blocks.0.q.weights"
    assert float(jnp.var(lin.weights.value.data_array)) == pytest.approx(1 / 64, rel=0.2)
    aff = Affine.from_config("a", None, {"features": 2}, {"features": 3})
    assert aff.sublayers[0].weights == ParameterSlot("a.weights") and aff.sublayers[1].bias == ParameterSlot("a.bias")


def test_grad_through_linear_matches_reference():
    layer = Linear.from_config("l", jax.random.key(1), {"features": 3}, {"out": 2})
    slots, values = unbind_params(layer, freeze=True)
    x = jnp.arange(6.0).reshape(2, 3)
    grads = jax.jit(jax.grad(lambda vs: slots.stateless_call(vs, nx.wrap(x, "batch", "features"))[0]
                             .unwrap("batch", "out").sum()))(values)
    g = grads[0].value.unwrap("features", "out")
    np.testing.assert_allclose(g, jnp.broadcast_to(x.sum(0)[:, None], (3, 2)))


def test_contract_keeps_positional_axes_first_and_renames():
    x = nx.wrap(jnp.ones((2, 3)), "a", "b").untag("a")
    w = nx.wrap(jnp.ones((3, 4)), "b", "c")
    out = contract([x, w], ["b"], rename={"c": "d"})
    assert out.positional_shape == (2,) and dict(out.named_shape) == {"d": 4}
    np.testing.assert_allclose(out.unwrap("d"), jnp.full((2, 4), 3.0))


def test_errors_name_layer_and_fix():
    layer = Linear.from_config("blocks.1.mlp", jax.random.key(0), {"features": 3}, {"features": 3})
    with pytest.raises(NamedAxisError, match=r"Linear 'blocks.1.mlp.weights': input lacks axes \['features'\]"):
        layer(nx.zeros({"embed": 3}))
    with pytest.raises(NamedAxisError, match=r"Linear 'blocks.1.mlp.weights': input axis sizes do not match.*'features': \(4, 3\)"):
        layer(nx.zeros({"features": 4}))
    with pytest.raises(NamedAxisError, match="cannot sum over"):
        contract([nx.zeros({"a": 1})], ["zz"])
    with pytest.raises(NamedAxisError, match=r"contract: axis 'a' has size 1 .* and 2"):
        contract([nx.zeros({"a": 1}), nx.zeros({"a": 2})], ["a"])
    with pytest.raises(NamedAxisError, match="positional axes in more than one operand"):
        contract([nx.wrap(jnp.zeros(2)), nx.wrap(jnp.zeros(2))], [])
