"""Property tests of the Equinox bridge over random architectures (``pzbridge.testing.equinox_strategies``).

Each example of the round-trip property draws six models, so the CI profile
(50 examples) checks 300 random models per run; to keep that cheap they run
eagerly (1e-6 relative). The batched property runs both sides under
``eqx.filter_jit``: the original under ``jax.vmap``, the lifted model on a
named ``batch`` axis.
"""

from __future__ import annotations

import equinox as eqx
import jax
import pytest
from hypothesis import given
from hypothesis import strategies as st

import pzbridge as pzb
from pzbridge.core import named_axes as nx
from pzbridge.testing.equinox_strategies import (
    assert_outputs_close,
    assert_round_trip,
    assert_same_buffers,
    equinox_models,
)

MODELS_PER_EXAMPLE = 6


def _run_original(example, batch=None):
    model = example.model
    if batch is None:
        return model(*example.args, **example.kwargs)
    return eqx.filter_jit(lambda m, *a: jax.vmap(lambda *b: m(*b, **example.kwargs))(*a))(model, *batch)


def _run_lifted(lifted, example, batch=None):
    if batch is None:
        return lifted.positional(*example.args, **example.kwargs)

    def named_call(l, *a):
        named = [arg.tag_prefix("batch") for arg in l.convention.name_inputs(a)]
        x = named[0] if len(named) == 1 else tuple(named)
        out = l.body(x, **example.kwargs)
        # The batch axis goes first, as jax.vmap puts it; the rest as the convention says.
        out = jax.tree_util.tree_map(lambda leaf: leaf.untag_prefix("batch") if nx.is_namedarray(leaf) else leaf,
                                     out, is_leaf=nx.is_namedarray)
        return l.convention.unname_output(out)

    return eqx.filter_jit(named_call)(lifted, *batch)


@pytest.mark.slow
@given(st.lists(equinox_models(), min_size=MODELS_PER_EXAMPLE, max_size=MODELS_PER_EXAMPLE))
def test_random_models_round_trip_and_compute_the_same(examples):
    for example in examples:
        lifted = pzb.lift(example.model)
        assert_same_buffers(example.model, lifted)
        assert_round_trip(example.model, pzb.lower(lifted))
        assert_outputs_close(_run_original(example), _run_lifted(lifted, example))


@given(equinox_models())
def test_random_models_with_named_batch_axis_match_vmap(example):
    batch = tuple(jax.numpy.stack([a, a]) for a in example.args)
    lifted = pzb.lift(example.model)
    assert_outputs_close(_run_original(example, batch), _run_lifted(lifted, example, batch))
