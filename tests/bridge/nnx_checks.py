"""Shared checks for the per-layer NNX rule tests (references: NNX itself)."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import pzbridge as pzb


def leaf_arrays(module):
    out = []
    for leaf in jax.tree.leaves(nnx.state(module)):
        if jnp.issubdtype(leaf.dtype, jax.dtypes.prng_key):
            leaf = jax.random.key_data(leaf)
        out.append(np.asarray(leaf))
    return out


def assert_round_trip(model):
    """lower(lift(m)): same class and graphdef, bitwise state, same sharing, no aliased Variables."""
    lowered = pzb.lower(pzb.lift(model))
    assert type(lowered) is type(model)
    assert nnx.graphdef(lowered) == nnx.graphdef(model)
    a, b = leaf_arrays(lowered), leaf_arrays(model)
    assert len(a) == len(b) and all(x.dtype == y.dtype and np.array_equal(x, y) for x, y in zip(a, b))
    assert nnx.find_duplicates(lowered) == nnx.find_duplicates(model)
    mine = {id(v) for _, v in nnx.iter_graph(model) if isinstance(v, nnx.Variable)}
    assert not mine & {id(v) for _, v in nnx.iter_graph(lowered) if isinstance(v, nnx.Variable)}
    return lowered


def assert_same_outputs(model, x, exact=True, **kwargs):
    """The lifted model (positional call) computes what the original computes (on a clone)."""
    expected = nnx.clone(model)(x, **kwargs)
    got = pzb.lift(model).positional(x, **kwargs)
    if exact:
        assert np.array_equal(np.asarray(got), np.asarray(expected))
    else:
        np.testing.assert_allclose(np.asarray(got), np.asarray(expected), rtol=1e-5, atol=1e-6)
    return expected
