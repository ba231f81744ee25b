"""Deep and cyclic models (issue 13, items 1-3).

- **Linear lift.** A container's calling convention reads its children's, so
  nested ``Sequential`` s recomputed them exponentially (Equinox: twice per
  level) or quadratically (NNX). The tests count the convention computations
  (no wall clock): one per container per lift.
- **1,000 nested wrappers** lift, run and lower in both frameworks, with the
  output equal to the native model's and the lowered model equal to the
  original (same tree structure, classes and arrays). Python's recursion
  limit is raised only inside pzbridge's entry points and restored after.
  Building, calling and flattening the *native* 1,000-deep models needs it
  raised too (Equinox's constructor and JAX's pytree flattening count
  recursion per level), so the tests do that inside ``recursion_headroom``.
- **NNX reference cycles** (a child holding its parent) lift to a tree with
  an ``AncestorRef`` where the cycle closes, and lower to a module with the
  same graphdef (the cycle restored).
"""

from __future__ import annotations

import sys
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import pzbridge as pzb
from pzbridge.bridge import registry
from pzbridge.bridge.context import recursion_headroom
from pzbridge.bridge.equinox.traversal import EQUINOX
from pzbridge.bridge.naming import AxisNaming
from pzbridge.bridge.nnx.containers import SequentialRule as NnxSequentialRule
from pzbridge.bridge.nnx.traversal import AncestorRef
from pzbridge.core.errors import LiftError, LowerError
from pzbridge.testing.deep_models import (
    NnxWrapper,
    eqx_sequentials,
    eqx_wrappers,
    nest,
    nnx_sequentials,
    nnx_wrappers,
)

DEEP = 1_000


def _count_calls(monkeypatch: pytest.MonkeyPatch, owner: Any, name: str) -> list[Any]:
    calls: list[Any] = []
    original = getattr(owner, name)

    def counted(self: Any, module: Any, *args: Any) -> Any:
        calls.append(module)
        return original(self, module, *args)

    monkeypatch.setattr(owner, name, counted)
    return calls


# --- item 1: conventions are computed once per container ---------------------------------------------------


@pytest.mark.parametrize("depth", [12, 100])
def test_eqx_sequential_convention_once_per_level(monkeypatch, depth):
    # The exponential version computed it 2**depth times (32,752 calls at depth 14).
    calls = _count_calls(monkeypatch, type(EQUINOX.lift_rule_for(eqx.nn.Sequential)), "convention")
    model = eqx_sequentials(depth)
    lifted = pzb.lift(model)
    assert len(calls) == len({id(m) for m in calls}) == depth
    assert lifted.convention.inputs == (("features",),)
    np.testing.assert_allclose(lifted.positional(jnp.arange(4.0)), _innermost(model)(jnp.arange(4.0)))


def test_nnx_sequential_plan_linear(monkeypatch):
    # Each level planned once for its lift and once for its (memoised) convention; it was quadratic.
    depth = 30
    calls = _count_calls(monkeypatch, NnxSequentialRule, "_plan")
    pzb.lift(nnx_sequentials(depth))
    assert len(calls) <= 2 * depth


def test_memo_lives_for_one_lift_only():
    seq = eqx_sequentials(3)
    pzb.lift(seq)
    assert registry._MEMO.get() is None
    # Outside a lift a direct call memoises its own recursion and keeps nothing afterwards.
    assert EQUINOX.convention_of(seq, AxisNaming()).output == ("features",)
    assert registry._MEMO.get() is None


# --- item 3: 1,000 nested wrappers ---------------------------------------------------------------------------


def _innermost(model: Any) -> Any:
    while isinstance(model, (eqx.nn.Sequential, nnx.Sequential)):
        model = model.layers[0]
    return model


def _same_eqx(lowered: Any, original: Any) -> None:
    with recursion_headroom():  # jax's pytree flattening counts recursion per level too.
        assert jax.tree_util.tree_structure(lowered) == jax.tree_util.tree_structure(original)
        pairs = zip(jax.tree_util.tree_leaves(lowered), jax.tree_util.tree_leaves(original), strict=True)
    assert all(a is b for a, b in pairs)


def _same_nnx(lowered: Any, original: Any) -> None:
    with recursion_headroom():  # NNX's graph functions recurse per level.
        assert nnx.graphdef(lowered) == nnx.graphdef(original)
        pairs = zip(jax.tree_util.tree_leaves(nnx.state(lowered)), jax.tree_util.tree_leaves(nnx.state(original)),
                    strict=True)
    assert all(a is b for a, b in pairs)


def _lift_run_lower(model: Any, x: jax.Array) -> tuple[Any, jax.Array]:
    limit = sys.getrecursionlimit()
    lifted = pzb.lift(model)
    out = lifted.positional(x)
    lowered = pzb.lower(lifted)
    assert sys.getrecursionlimit() == limit  # Raised only inside the entry points.
    return lowered, out


def test_eqx_1000_nested_sequentials():
    model = eqx_sequentials(DEEP)
    x = jnp.arange(4.0)
    lowered, out = _lift_run_lower(model, x)
    # Equinox's own Sequential call is too slow at this depth (34 s at 400); nested single-layer
    # Sequentials compute their innermost layer, and the lowered model is the original, leaf for leaf.
    np.testing.assert_allclose(out, _innermost(model)(x), rtol=1e-6)
    _same_eqx(lowered, model)


def _assert_like_native(model: Any, lowered: Any, out: Any, x: jax.Array) -> None:
    """The lifted output and the lowered model's output equal the native model's."""
    with recursion_headroom():
        native, again = model(x), lowered(x)
    np.testing.assert_allclose(out, native, rtol=1e-6)
    np.testing.assert_allclose(again, native, rtol=1e-6)


def test_eqx_1000_nested_wrappers():
    model = eqx_wrappers(DEEP)
    x = jnp.arange(4.0)
    lowered, out = _lift_run_lower(model, x)
    _assert_like_native(model, lowered, out, x)
    _same_eqx(lowered, model)


@pytest.mark.parametrize("wrap", [nnx.Sequential, NnxWrapper], ids=["nnx.Sequential", "custom"])
def test_nnx_1000_nested(wrap):
    model = nest(nnx.Linear(4, 4, rngs=nnx.Rngs(0)), wrap, DEEP)
    x = jnp.ones((2, 4))
    lowered, out = _lift_run_lower(model, x)
    _assert_like_native(model, lowered, out, x)
    _same_nnx(lowered, model)


def test_deep_lifted_model_is_a_pytree():
    lifted = pzb.lift(nnx_wrappers(DEEP))
    with recursion_headroom():
        leaves, treedef = jax.tree_util.tree_flatten(lifted)
        rebuilt = jax.tree_util.tree_unflatten(treedef, leaves)
        assert jax.tree_util.tree_structure(rebuilt) == treedef
    assert len(leaves) == 2
    np.testing.assert_allclose(rebuilt.positional(jnp.ones((1, 4))), lifted.positional(jnp.ones((1, 4))))


def test_recursion_headroom_nests_and_restores():
    before = sys.getrecursionlimit()
    with recursion_headroom(before + 100):
        with recursion_headroom(before + 50):
            assert sys.getrecursionlimit() == before + 100  # Never lowered by an inner block.
        assert sys.getrecursionlimit() == before + 100
    assert sys.getrecursionlimit() == before


# --- item 2: NNX reference cycles -----------------------------------------------------------------------------


class TiedHead(nnx.Module):
    """An output projection tied to its owner's embedding: it holds the model it belongs to."""

    def __init__(self) -> None:
        self.temperature = nnx.Param(jnp.ones(()))

    def __call__(self, h: jax.Array) -> jax.Array:
        return self.owner.embed.attend(h) / self.temperature[...]


class TinyLM(nnx.Module):
    """Embedding, one Linear, and a head that reads the embedding through ``self.head.owner``."""

    def __init__(self, rngs: nnx.Rngs) -> None:
        self.embed = nnx.Embed(11, 8, rngs=rngs)
        self.body = nnx.Linear(8, 8, rngs=rngs)
        self.head = TiedHead()
        self.head.owner = self  # The cycle: child -> parent.

    def __call__(self, ids: jax.Array) -> jax.Array:
        return self.head(jax.nn.relu(self.body(self.embed(ids))))


class TreeNode(nnx.Module):
    """A tree whose nodes know their parent and their root (cycles two levels up, and a self-reference)."""

    def __init__(self, depth: int, rngs: nnx.Rngs, root: TreeNode | None = None,
                 parent: TreeNode | None = None) -> None:
        self.lin = nnx.Linear(3, 3, rngs=rngs)
        self.root = self if root is None else root
        if parent is not None:
            self.parent = parent
        self.kids = nnx.List([TreeNode(depth - 1, rngs, self.root, self)] if depth else [])

    def __call__(self, x: jax.Array) -> jax.Array:
        for kid in self.kids:
            x = kid(x)
        return self.lin(x) + (0.0 if self.root is self else self.root.lin.bias[...])


def _nnx_snapshot(module: Any) -> list[Any]:
    return jax.tree_util.tree_leaves(nnx.state(module))


def test_nnx_child_holding_its_parent():
    model = TinyLM(nnx.Rngs(0))
    before = _nnx_snapshot(model)
    ids = jnp.array([[1, 2, 3], [4, 5, 6]])
    lifted = pzb.lift(model)
    assert lifted.body.children["head"].children["owner"] == AncestorRef(TinyLM, 0, "<root>")
    np.testing.assert_allclose(lifted.positional(ids), model(ids), rtol=1e-6)
    lowered = pzb.lower(lifted)
    assert lowered.head.owner is lowered and lowered is not model
    assert nnx.graphdef(lowered) == nnx.graphdef(model)
    assert all(a is b for a, b in zip(_nnx_snapshot(lowered), before, strict=True))
    np.testing.assert_allclose(lowered(ids), model(ids), rtol=1e-6)
    # The user's module is untouched, and the lifted model is a finite, deterministic pytree.
    assert model.head.owner is model and all(a is b for a, b in zip(_nnx_snapshot(model), before, strict=True))
    assert jax.tree_util.tree_structure(pzb.lift(model)) == jax.tree_util.tree_structure(lifted)


def test_nnx_cycles_to_several_ancestors():
    model = TreeNode(3, nnx.Rngs(0))
    x = jnp.ones((2, 3))
    lifted = pzb.lift(model)
    kid = lifted.body.children["kids"].items[0]
    # Both of the first kid's references go to the root, with the kid itself (a TreeNode too) in between.
    assert kid.children["root"] == kid.children["parent"] == AncestorRef(TreeNode, 1, "<root>")
    np.testing.assert_allclose(lifted.positional(x), model(x), rtol=1e-6)
    lowered = pzb.lower(lifted)
    assert nnx.graphdef(lowered) == nnx.graphdef(model)
    grandkid = lowered.kids[0].kids[0]
    assert lowered.root is lowered and grandkid.root is lowered and grandkid.parent is lowered.kids[0]


def test_nnx_cycle_to_a_rule_lifted_module_is_a_lift_error():
    class Item(nnx.Module):
        def __init__(self) -> None:
            self.lin = nnx.Linear(3, 3, rngs=nnx.Rngs(0))

        def __call__(self, x: jax.Array) -> jax.Array:
            return self.lin(x)

    seq = nnx.Sequential(Item())
    seq.layers[0].owner = seq
    with pytest.raises(LiftError) as info:
        pzb.lift(seq)
    message = str(info.value)
    assert "layers[0].owner" in message and "flax.nnx.helpers.Sequential at <root>" in message
    assert "found NnxSequential" in message and "Fix:" in message


def test_nnx_reference_lowered_without_its_ancestor_is_a_lower_error():
    kid = pzb.lift(TreeNode(1, nnx.Rngs(0))).body.children["kids"].items[0]
    with pytest.raises(LowerError, match=r"TreeNode it refers back to .*Fix: lower"):
        pzb.lower(kid, framework="nnx")
