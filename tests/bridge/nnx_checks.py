"""Shared checks for the per-layer NNX rule tests (references: NNX itself)."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import pzbridge as pzb
from pzbridge.testing.numerics import assert_bitwise_reproducible, assert_outputs_match


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


def pure(call, lifted):
    """``call(lifted, *args)`` on copies of ``lifted``'s variables: traceable, leaks no tracer into them."""
    return lambda *args: pzb.stateless_call(call, (), lifted, *args)[0]


def assert_same_outputs(model, x, exact=True, ulps=None, **kwargs):
    """The lifted model (positional call) computes what the original computes (on a clone).

    ``exact=True``: bitwise equal, after asserting that this holds on every CPU: the lifted program is NNX's
    own (the jaxprs, traced on clones, are the same) or rounds nowhere. ``ulps=k``: the programs differ, the
    outputs agree within ``k`` ulps of their scale. ``exact=False``: within ``rtol=1e-5, atol=1e-6``.
    """
    expected = nnx.clone(model)(x, **kwargs)
    got = pzb.lift(model).positional(x, **kwargs)
    if ulps is not None:
        assert_outputs_match(got, expected, same_computation=False, ulps=ulps)
    elif exact:
        assert_bitwise_reproducible(lambda a: pzb.lift(nnx.clone(model)).positional(a, **kwargs),
                                    lambda a: nnx.clone(model)(a, **kwargs), x)
        assert np.array_equal(np.asarray(got), np.asarray(expected))
    else:
        np.testing.assert_allclose(np.asarray(got), np.asarray(expected), rtol=1e-5, atol=1e-6)
    return expected
