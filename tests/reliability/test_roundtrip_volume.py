"""Round-trip volume: 1,060 random Equinox and 1,200 random NNX models per CI run, fixed seeds (issue 13).

Models come from the project's own strategies (``pzbridge.testing.equinox_strategies.equinox_models``,
``pzbridge.testing.nnx_strategies.nnx_models``), drawn by hypothesis with a fixed ``@seed`` per shard
(``SEED * 1000 + shard``), so every run checks the same models. The draws are split into shards, one
test item each, so ``pytest -n 2`` runs them on both workers; each shard asserts that it checked exactly
its share of models distinct within the shard (a repeated draw is rejected), and the shares add up to
the totals above by construction (``test_volume_adds_up``). Across shards some draws repeat (hypothesis
starts every seed from simple examples): 1,021 Equinox and 1,096 NNX models are distinct (728 and 354
distinct architectures).

What is checked, for which fraction:

* Every model (100%): ``pzb.lower(pzb.lift(m))`` has ``m``'s class and, for Equinox, ``m``'s treedef
  (the classes and static fields of every node), with every array leaf the *very same* buffer
  (``is``, not only bitwise equal) and other leaves equal; the lifted variables hold ``m``'s own
  buffers. For NNX: the same class and ``nnx.graphdef``, the same state tree with every leaf the very
  same array, the same sharing (``nnx.find_duplicates``), and no Variable shared with ``m``. And the
  user's module is unchanged afterwards (Equinox: treedef and every leaf by identity; NNX: graphdef,
  every node by identity and every state leaf, identical or bitwise equal to its value before).
* Every NNX model (100%) and every ``EQUINOX_OUTPUT_EVERY``-th Equinox model (25%, by draw order): the
  lifted model's ``.positional`` output equals the original's (NNX: the original called on an
  ``nnx.clone``, so RNG streams, counters and batch statistics start alike). Both programs are traced
  first: where they are the same program (``jaxpr_difference`` is None, about 60% of Equinox and 70% of
  NNX models) the outputs must be bitwise equal, where both round nowhere exactly equal, otherwise
  within ``ULPS`` ulps (``assert_outputs_match``; all were bitwise equal on the development machine).
  The user's module is checked again after these calls.

The output of ``lower(lift(m))`` is not run: its treedef / graphdef and its very arrays are ``m``'s, so
it is ``m``'s program. Cost (CPU, one process): lift + lower + the structural checks take about 2 ms a
model; the rest is eager JAX: drawing a model (the frameworks' initialisers) and the forward passes,
dominated by XLA compiling each primitive the first time it meets a shape (~1,300 compiles for the
Equinox models, 30 ms each; in a fresh process the first Equinox shard costs 40-50 s, later ones 8-20
s, NNX shards 5-25 s). Nothing is jitted per model: one compile per model would cost more than all of
this. Models whose output is not checked compile nothing, hence only 25% for Equinox.

Sequential naming (found by this test, each reproduced by a ``test_sequential_*`` below): the
``nnx.Sequential`` rule once planned the names between its items from each item's calling convention
alone, so (1) a Sequential starting with a function or ``Dropout`` raised ``NamedAxisError``; (2) a
``MultiHeadAttention`` after another layer lacked its ``seq`` name; (3) ``MultiHeadAttention, Linear,
<custom module>`` returned ``(features, seq)`` for ``(seq, features)`` (silently wrong on square
inputs); (4) a nested Sequential starting or ending with a custom module named nothing there. The rule
now carries the names the next item needs (``NnxRetag``), and every NNX model's output is checked.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hypothesis import HealthCheck, Phase, assume, given, seed, settings
from hypothesis import strategies as st

import pzbridge as pzb
from pzbridge.testing.equinox_strategies import (
    EquinoxExample,
    assert_round_trip,
    assert_same_buffers,
    equinox_models,
)
from pzbridge.testing.nnx_strategies import nnx_models
from pzbridge.testing.numerics import (
    assert_outputs_match,
    exact_computation,
    jaxpr_difference,
)

SEED = 13  # the number; shard i draws with seed SEED * 1000 + i
EQUINOX_SHARDS, EQUINOX_PER_SHARD = 4, 265
NNX_SHARDS, NNX_PER_SHARD = 4, 300
EQUINOX_OUTPUT_EVERY = 4  # an Equinox forward check (its compiles) costs 2-5x drawing and round-tripping the model
ULPS = 4.0

# Shrinking stays on (a failure is reported as a small model); the explain phase would re-run the
# failing model many times for little gain.
_SETTINGS = settings(deadline=None, database=None, phases=(Phase.explicit, Phase.generate, Phase.shrink),
                     suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                            HealthCheck.filter_too_much], print_blob=True)


def _run_shard(strategy: st.SearchStrategy[Any], signature: Callable[[Any], Hashable],
               check: Callable[[Any, int], None], shard: int, count: int) -> int:
    """Checks ``count`` distinct models drawn with the shard's seed; returns how many it checked.

    ``check(example, index)`` checks one model. A draw
    equal to one already checked in this shard (``signature``: structure, array bytes, inputs; 5-10% of
    draws) adds nothing and is rejected, so hypothesis draws another.
    """
    checked = 0
    seen: set[Hashable] = set()

    @seed(SEED * 1000 + shard)
    @settings(_SETTINGS, max_examples=count)
    @given(strategy)
    def run(example: Any) -> None:
        nonlocal checked
        key = signature(example)
        assume(key not in seen)
        check(example, checked)
        seen.add(key)  # only once it passed, so a failing example replays and shrinks normally
        checked += 1

    run()
    return checked


def _bytes(leaf: Any) -> Hashable:
    """An array leaf by dtype, shape and bytes (PRNG keys by their key data); another leaf as it is."""
    if not hasattr(leaf, "dtype"):
        return leaf
    if jnp.issubdtype(leaf.dtype, jax.dtypes.prng_key):
        leaf = jax.random.key_data(leaf)
    array = np.asarray(leaf)
    return str(array.dtype), array.shape, array.tobytes()


def _outputs_agree(f: Callable[..., Any], g: Callable[..., Any], got: Any, want: Any, *args: Any) -> None:
    """``got`` (from ``f``) matches ``want`` (from ``g``): bitwise if ``f`` and ``g`` are the same program."""
    same = jaxpr_difference(f, g, *args) is None
    exact = not same and exact_computation(f, *args) and exact_computation(g, *args)
    assert_outputs_match(got, want, same_computation=same, ulps=0.0 if exact else ULPS)


# ----------------------------------------------------------------------------------------------------
# Equinox.


def _equinox_snapshot(model: eqx.Module) -> tuple[Any, list[Any]]:
    leaves, treedef = jax.tree_util.tree_flatten(model)
    return treedef, leaves


def _assert_equinox_unchanged(model: eqx.Module, before: tuple[Any, list[Any]]) -> None:
    treedef, leaves = _equinox_snapshot(model)
    assert treedef == before[0], "the user's module changed structure"
    assert all(a is b for a, b in zip(leaves, before[1], strict=True)), "a leaf of the user's module was replaced"


def _equinox_signature(example: EquinoxExample) -> Hashable:
    leaves, treedef = jax.tree_util.tree_flatten(example.model)
    return (treedef, tuple(_bytes(leaf) for leaf in leaves), tuple(_bytes(arg) for arg in example.args),
            tuple(sorted(example.kwargs.items())))


def _check_equinox(example: EquinoxExample, index: int) -> None:
    model, args, kwargs = example.model, example.args, example.kwargs
    before = _equinox_snapshot(model)
    lifted = pzb.lift(model)
    assert_same_buffers(model, lifted)
    lowered = pzb.lower(lifted)
    assert type(lowered) is type(model)
    assert_round_trip(model, lowered)  # treedef (classes, static fields) equal, arrays `is` the originals
    _assert_equinox_unchanged(model, before)
    if index % EQUINOX_OUTPUT_EVERY:
        return
    try:
        want = model(*args, **kwargs)
    except (ArithmeticError, ValueError, TypeError):
        # An invalid draw (the strategy can stack two k=3 convolutions on a 4x4 image, leaving nothing to
        # pool; Equinox then fails with ZeroDivisionError): the lifted model must refuse it too.
        with pytest.raises((ArithmeticError, ValueError, TypeError)):
            lifted.positional(*args, **kwargs)
    else:
        got = lifted.positional(*args, **kwargs)
        # Traced statelessly, so no tracer reaches the lifted model's variables.
        _outputs_agree(lambda *a: pzb.stateless_call(lambda m, *b: m.positional(*b, **kwargs), (), lifted, *a)[0],
                       lambda *a: model(*a, **kwargs), got, want, *args)
    _assert_equinox_unchanged(model, before)


@pytest.mark.parametrize("shard", range(EQUINOX_SHARDS))
def test_random_equinox_models_round_trip(shard: int) -> None:
    assert _run_shard(equinox_models(), _equinox_signature, _check_equinox, shard,
                      EQUINOX_PER_SHARD) == EQUINOX_PER_SHARD


# ----------------------------------------------------------------------------------------------------
# NNX.


def _nnx_snapshot(module: nnx.Module) -> tuple[Any, list[int], list[Any]]:
    """graphdef, the identity of every node (modules, Variables), every state leaf."""
    return (nnx.graphdef(module), [id(node) for _, node in nnx.iter_graph(module)],
            jax.tree.leaves(nnx.state(module)))


def _assert_nnx_unchanged(module: nnx.Module, before: tuple[Any, list[int], list[Any]]) -> None:
    graphdef, ids, leaves = _nnx_snapshot(module)
    assert graphdef == before[0], "the user's module changed structure"
    assert ids == before[1], "a node of the user's module was replaced"
    for a, b in zip(leaves, before[2], strict=True):
        assert a is b or _bytes(a) == _bytes(b), "a state leaf of the user's module changed"


def _variable_ids(module: nnx.Module) -> set[int]:
    return {id(node) for _, node in nnx.iter_graph(module) if isinstance(node, nnx.Variable)}


def _nnx_signature(pair: tuple[nnx.Module, jax.Array]) -> Hashable:
    model, x = pair
    return nnx.graphdef(model), tuple(_bytes(leaf) for leaf in jax.tree.leaves(nnx.state(model))), _bytes(x)


def _check_nnx(pair: tuple[nnx.Module, jax.Array], index: int) -> None:
    model, x = pair
    before = _nnx_snapshot(model)
    lifted = pzb.lift(model)
    lowered = pzb.lower(lifted)
    assert type(lowered) is type(model)
    assert nnx.graphdef(lowered) == nnx.graphdef(model)
    state, lowered_state = nnx.state(model), nnx.state(lowered)
    assert jax.tree.structure(lowered_state) == jax.tree.structure(state)
    assert all(a is b for a, b in zip(jax.tree.leaves(lowered_state), jax.tree.leaves(state), strict=True)), \
        "lowering copied an array"
    assert nnx.find_duplicates(lowered) == nnx.find_duplicates(model)
    assert not _variable_ids(lowered) & _variable_ids(model), "the lowered module shares a Variable with the user's"
    _assert_nnx_unchanged(model, before)

    want = nnx.clone(model)(x)
    try:
        got = lifted.positional(x)
        # Clones are made inside the traced functions, so NNX's in-place updates stay in the trace.
        _outputs_agree(lambda a: pzb.stateless_call(lambda m, b: m.positional(b), (), lifted, a)[0],
                       lambda a: nnx.clone(model)(a), got, want, x)
    finally:
        _assert_nnx_unchanged(model, before)


@pytest.mark.parametrize("shard", range(NNX_SHARDS))
def test_random_nnx_models_round_trip(shard: int) -> None:
    assert _run_shard(nnx_models(), _nnx_signature, _check_nnx, shard, NNX_PER_SHARD) == NNX_PER_SHARD


def test_volume_adds_up() -> None:
    assert EQUINOX_SHARDS * EQUINOX_PER_SHARD >= 1000
    assert NNX_SHARDS * NNX_PER_SHARD >= 1000
    assert EQUINOX_SHARDS * EQUINOX_PER_SHARD + NNX_SHARDS * NNX_PER_SHARD >= 2000


# ----------------------------------------------------------------------------------------------------
# nnx.Sequential naming bugs found by the volume run (fixed; kept as regression tests).


class _Halve(nnx.Module):
    """A user module without a rule (lifted as ``Foreign``)."""

    def __call__(self, x: jax.Array) -> jax.Array:
        return x / 2


def _assert_lifted_matches(model: nnx.Module, x: jax.Array) -> None:
    assert_outputs_match(pzb.lift(model).positional(x), nnx.clone(model)(x), same_computation=False, ulps=ULPS)


def test_sequential_starting_with_a_function() -> None:
    _assert_lifted_matches(nnx.Sequential(jax.nn.relu, nnx.Linear(2, 2, rngs=nnx.Rngs(0))), jnp.ones((3, 2)))


def test_sequential_attention_after_a_layer() -> None:
    attention = nnx.MultiHeadAttention(1, 2, qkv_features=2, decode=False, rngs=nnx.Rngs(0))
    _assert_lifted_matches(nnx.Sequential(nnx.Linear(2, 2, rngs=nnx.Rngs(1)), attention), jnp.ones((3, 2)))


def test_sequential_attention_linear_foreign_transposes() -> None:
    attention = nnx.MultiHeadAttention(1, 2, qkv_features=2, decode=False, rngs=nnx.Rngs(0))
    model = nnx.Sequential(attention, nnx.Linear(2, 2, rngs=nnx.Rngs(1)), _Halve())
    _assert_lifted_matches(model, jax.random.normal(jax.random.key(0), (3, 2)))


class _ScaleFeatures(nnx.Module):
    """A user module scaling each feature differently (so swapped axes show)."""

    def __init__(self) -> None:
        self.scale = nnx.Param(jnp.array([1.0, 2.0]))

    def __call__(self, x: jax.Array) -> jax.Array:
        return x * self.scale[...]


def test_sequential_nested_of_custom_modules_before_a_layer() -> None:
    model = nnx.Sequential(nnx.Sequential(_Halve()), nnx.Linear(2, 2, rngs=nnx.Rngs(0)))
    _assert_lifted_matches(model, jnp.ones((3, 2)))


def test_sequential_nested_of_custom_modules_after_a_layer() -> None:
    model = nnx.Sequential(nnx.Linear(2, 2, rngs=nnx.Rngs(0)), nnx.Sequential(_ScaleFeatures()))
    _assert_lifted_matches(model, jnp.ones((3, 2)))


def test_sequential_nested_of_custom_modules_after_a_custom_module() -> None:
    inner = nnx.Sequential(_Halve(), nnx.Linear(2, 2, rngs=nnx.Rngs(0)))
    _assert_lifted_matches(nnx.Sequential(_Halve(), inner, nnx.Linear(2, 2, rngs=nnx.Rngs(1))), jnp.ones((3, 2)))
