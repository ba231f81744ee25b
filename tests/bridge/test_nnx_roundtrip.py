"""The NNX lift / lower contract, as properties over random models (``pzbridge.testing.nnx_strategies``).

Reference values come from NNX itself: ``nnx.graphdef``, ``nnx.state``,
``nnx.find_duplicates`` and calling the original module (on an ``nnx.clone``,
so RNG streams and batch statistics start from the same values).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hypothesis import given, settings

import pzbridge as pzb
from pzbridge.testing.nnx_strategies import nnx_models
from pzbridge.testing.numerics import assert_bitwise_reproducible, assert_outputs_match

pytestmark = pytest.mark.oldest  # also run against .ci/oldest-constraints.txt


def leaf_arrays(module):
    """Every state leaf as a NumPy array (RNG keys as their key data)."""
    out = []
    for leaf in jax.tree.leaves(nnx.state(module)):
        if jnp.issubdtype(leaf.dtype, jax.dtypes.prng_key):
            leaf = jax.random.key_data(leaf)
        out.append(np.asarray(leaf))
    return out


def assert_bitwise_equal_state(a, b):
    sa, sb = nnx.state(a), nnx.state(b)
    assert jax.tree.structure(sa) == jax.tree.structure(sb)
    for x, y in zip(leaf_arrays(a), leaf_arrays(b)):
        assert x.dtype == y.dtype and x.shape == y.shape
        assert np.array_equal(np.atleast_1d(x).view(np.uint8), np.atleast_1d(y).view(np.uint8))


def assert_state_matches(a, b):
    """Same state tree; integer leaves (counters, keys) equal, float leaves within a few ulps.

    For state that two different programs updated (the lifted BatchNorm vs NNX's): not bitwise on every CPU.
    """
    sa, sb = nnx.state(a), nnx.state(b)
    assert jax.tree.structure(sa) == jax.tree.structure(sb)
    assert_outputs_match(leaf_arrays(a), leaf_arrays(b), same_computation=False)


def variable_ids(module):
    return {id(v) for _, v in nnx.iter_graph(module) if isinstance(v, nnx.Variable)}


@settings(max_examples=300)  # the contract's acceptance bar: >= 300 random models per CI run
@given(nnx_models())
def test_lower_lift_is_identity_on_graphdef_state_and_sharing_without_aliasing(pair):
    model, _ = pair
    lowered = pzb.lower(pzb.lift(model))
    assert type(lowered) is type(model)
    assert nnx.graphdef(lowered) == nnx.graphdef(model)
    assert_bitwise_equal_state(lowered, model)
    assert nnx.find_duplicates(lowered) == nnx.find_duplicates(model)
    assert not variable_ids(lowered) & variable_ids(model)


@given(nnx_models())
def test_lifted_and_lowered_outputs_equal_original_and_leave_it_untouched(pair):
    model, x = pair
    before = leaf_arrays(model)
    reference = nnx.clone(model)
    expected = reference(x)
    lifted = pzb.lift(model)
    # lower(lift(m)) is m again (same class, graphdef, buffers): NNX's own program, bitwise on any CPU.
    assert_bitwise_reproducible(lambda a: nnx.clone(pzb.lower(lifted))(a), lambda a: nnx.clone(model)(a), x)
    assert np.array_equal(np.asarray(pzb.lower(lifted)(x)), np.asarray(expected))
    got = lifted.positional(x)
    np.testing.assert_allclose(np.asarray(got), np.asarray(expected), rtol=1e-6, atol=1e-6)
    # Calls wrote NNX's in-place updates (stats, counters) into new modules and the lifted
    # variables, never into the user's module.
    for a, b in zip(before, leaf_arrays(model)):
        assert np.array_equal(a, b)
    # ... and lowering carries those updates: the lowered state equals the reference's after its call
    # (updated by the lifted program, not NNX's: within a few ulps).
    assert_state_matches(pzb.lower(lifted), reference)
