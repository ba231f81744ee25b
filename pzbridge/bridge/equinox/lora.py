"""LoRA <-> Equinox: the :class:`LoRALinear` module, its rules, and :func:`lora_filter`.

Equinox has no LoRA layer, so a :class:`~pzbridge.toolshed.lora.LowRankAdapter`
on a lifted ``eqx.nn.Linear`` lowers to :class:`LoRALinear`, a small genuine
``eqx.Module`` that keeps the original ``eqx.nn.Linear`` (same arrays) next
to ``lora_a (in, rank)`` and ``lora_b (rank, out)``. Standard Equinox
training code trains only the adapters by partitioning with
:func:`lora_filter`. Re-lifting a ``LoRALinear`` gives the adapter back with
the labels :func:`~pzbridge.toolshed.lora.loraify_linears_in_selection` uses,
so after training ``merge_lora`` + ``pzb.lower`` returns plain
``eqx.nn.Linear`` layers in the original tree structure.

The rule for lifted ``eqx.nn.Linear`` (``EqxLinear``) belongs to
:mod:`pzbridge.bridge.equinox.linear`; this module wraps it: an ``EqxLinear`` whose
first sublayer is an adapter becomes a ``LoRALinear``, anything else goes to
the original rule unchanged.

Example:
    >>> import jax, jax.numpy as jnp, equinox as eqx
    >>> import pzbridge as pzb
    >>> from pzbridge.toolshed.lora import loraify_linears_in_selection
    >>> lifted = pzb.lift(eqx.nn.Linear(3, 2, key=jax.random.key(0)))
    >>> edited = loraify_linears_in_selection(pzb.select(lifted).at_instances_of(pzb.nn.Linear), 2, jax.random.key(1))
    >>> lowered = pzb.lower(edited)
    >>> type(lowered).__name__, lowered.lora_a.shape, lowered.lora_b.shape
    ('LoRALinear', (3, 2), (2, 2))
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp

from pzbridge.bridge.context import LiftContext, LowerContext
from pzbridge.bridge.equinox.linear import EqxLinear
from pzbridge.bridge.equinox.traversal import EQUINOX
from pzbridge.core.errors import LowerError
from pzbridge.nn.combinators import Sequential
from pzbridge.nn.linear import Affine, Linear, weight_output_name
from pzbridge.toolshed.lora import RANK_AXIS, LowRankAdapter, split_adapter


class LoRALinear(eqx.Module):
    """An ``eqx.nn.Linear`` plus a low-rank update: ``linear(x) + (alpha/rank) * (x @ lora_a) @ lora_b``.

    Acts on unbatched inputs like ``eqx.nn.Linear`` (``jax.vmap`` it).

    It also reads like an ``eqx.nn.Linear``, so code written against one
    (a parent's ``__call__`` doing ``self.proj.weight @ x``) keeps working
    after LoRA: :attr:`weight` is the *effective* weight ``linear.weight +
    (alpha/rank) * (lora_a @ lora_b).T`` in Equinox's ``(out, in)`` layout,
    computed from the adapters on every read, so gradients through it reach
    ``lora_a`` / ``lora_b``; ``bias``, ``in_features``, ``out_features`` and
    ``use_bias`` are the base layer's. These are read-only views: the stored
    arrays are ``linear.weight``, ``lora_a`` and ``lora_b`` (use those with
    ``eqx.tree_at``).

    Attributes:
      linear: The base layer (its arrays are the original ones).
      lora_a: ``(in_features, rank)``.
      lora_b: ``(rank, out_features)``; zero at creation.
      alpha: Scaling numerator (static).
      rank: The low rank (static).

    Example:
        >>> lin = eqx.nn.Linear(2, 2, key=jax.random.key(0))
        >>> lora = LoRALinear(lin, jnp.ones((2, 1)), jnp.zeros((1, 2)), alpha=1.0, rank=1)
        >>> bool(jnp.all(lora(jnp.ones(2)) == lin(jnp.ones(2))))
        True
        >>> bumped = LoRALinear(lin, jnp.ones((2, 1)), jnp.ones((1, 2)), alpha=1.0, rank=1)
        >>> bool(jnp.allclose(bumped.weight, lin.weight + 1.0)), bumped.out_features, bumped.bias is lin.bias
        (True, 2, True)
    """

    linear: eqx.nn.Linear
    lora_a: jax.Array
    lora_b: jax.Array
    alpha: float = eqx.field(static=True)
    rank: int = eqx.field(static=True)

    def _scaled(self, update: jax.Array) -> jax.Array:
        scale = self.alpha / self.rank
        # No multiply when the scale is 1: the same arithmetic as the lifted LowRankAdapter.
        return update if scale == 1.0 else update * jnp.asarray(scale, update.dtype)

    def __call__(self, x: jax.Array, *, key: Any = None) -> jax.Array:
        return self.linear(x) + self._scaled((x @ self.lora_a) @ self.lora_b)

    @property
    def weight(self) -> jax.Array:
        """The effective weight ``(out_features, in_features)``: base plus the scaled ``(lora_a @ lora_b).T``."""
        return self.linear.weight + self._scaled(self.lora_a @ self.lora_b).T

    @property
    def bias(self) -> jax.Array | None:
        """The base layer's bias ``(out_features,)`` (LoRA does not adapt it), or None."""
        return self.linear.bias

    @property
    def in_features(self) -> Any:
        """The base layer's ``in_features``."""
        return self.linear.in_features

    @property
    def out_features(self) -> Any:
        """The base layer's ``out_features``."""
        return self.linear.out_features

    @property
    def use_bias(self) -> bool:
        """The base layer's ``use_bias``."""
        return self.linear.use_bias


def lora_bases(tree: Any) -> Any:
    """``tree`` with every :class:`LoRALinear` replaced by its base ``eqx.nn.Linear`` (the same object).

    Example:
        >>> lin = eqx.nn.Linear(2, 2, key=jax.random.key(0))
        >>> lora_bases([LoRALinear(lin, jnp.ones((2, 1)), jnp.zeros((1, 2)), 1.0, 1)])[0] is lin
        True
    """
    return jax.tree_util.tree_map(lambda node: node.linear if isinstance(node, LoRALinear) else node, tree,
                                  is_leaf=lambda node: isinstance(node, LoRALinear))


@dataclasses.dataclass(frozen=True)
class ThroughLoRA:
    """A ``where`` / ``get`` function of ``eqx.nn.Shared`` applied to the pytree seen through its LoRA layers.

    ``eqx.nn.Shared`` locates tied nodes with ``eqx.tree_at(where, ...)``,
    which needs *stored* nodes. A ``where`` written for the original model
    (``lambda p: p[1].weight``) would, on a :class:`LoRALinear`, read the
    computed effective weight; seen through :func:`lora_bases` it reads the
    base ``linear.weight``, which is the tied array. So a tied weight stays
    tied at the base, and each :class:`LoRALinear` adds its update only where
    it is used (see :mod:`pzbridge.bridge.equinox.shared`).

    Attributes:
      fn: The original ``where`` or ``get`` function.

    Example:
        >>> lin = eqx.nn.Linear(2, 2, key=jax.random.key(0))
        >>> tree = [LoRALinear(lin, jnp.ones((2, 1)), jnp.ones((1, 2)), 1.0, 1)]
        >>> ThroughLoRA(lambda p: p[0].weight)(tree) is lin.weight
        True
    """

    fn: Callable[[Any], Any]

    def __call__(self, tree: Any) -> Any:
        return self.fn(lora_bases(tree))


def lora_filter(model: Any) -> Any:
    """A pytree of bools over ``model``: True exactly at the ``lora_a`` / ``lora_b`` arrays.

    Use it with ``eqx.partition(model, lora_filter(model))`` to train only the
    adapters (the base weights stay in the frozen half).

    Args:
      model: Any Equinox pytree containing :class:`LoRALinear` modules.

    Returns:
      A pytree with the structure of ``model`` and a bool at every leaf.

    Example:
        >>> lin = eqx.nn.Linear(2, 2, key=jax.random.key(0))
        >>> trainable, frozen = eqx.partition([LoRALinear(lin, jnp.ones((2, 1)), jnp.zeros((1, 2)), 1.0, 1)],
        ...                                   lora_filter([LoRALinear(lin, jnp.ones((2, 1)), jnp.zeros((1, 2)), 1.0, 1)]))
        >>> trainable[0].linear.weight is None, trainable[0].lora_a.shape
        (True, (2, 1))
    """

    def mark(node: Any) -> Any:
        if isinstance(node, LoRALinear):
            falses = jax.tree_util.tree_map(lambda _: False, node)
            return eqx.tree_at(lambda m: (m.lora_a, m.lora_b), falses, (True, True))
        return False

    return jax.tree_util.tree_map(mark, model, is_leaf=lambda node: isinstance(node, LoRALinear))


def _adapter_arrays(adapter: LowRankAdapter, ctx: LowerContext) -> tuple[jax.Array, jax.Array, int]:
    base = adapter.base
    if not isinstance(base, Linear) or len(base.in_axis_names) != 1 or len(base.out_axis_names) != 1:
        raise LowerError(
            f"{ctx.where}: Equinox LoRALinear needs a LowRankAdapter on a Linear mapping one axis to one axis; "
            f"found base {type(base).__name__}. Fix: adapt only eqx.nn.Linear-shaped layers, or lower it through "
            "an adapter module by wrapping it in pzb.nn.Sequential([...])."
        )
    (f_in,), (f_out,) = base.in_axis_names, base.out_axis_names
    rank_axis = adapter.rank_axis
    a = ctx.child("lora_a").array(adapter.lora_a, (f_in, rank_axis))
    b = ctx.child("lora_b").array(adapter.lora_b, (rank_axis, weight_output_name(f_out, (f_in,))))
    return a, b, int(a.shape[1])


class _LoRAEqxLinearRule:
    """``EqxLinear([LowRankAdapter(Linear), AddBias])`` -> ``LoRALinear(eqx.nn.Linear, ...)``; else the original rule."""

    def __init__(self, previous: Any) -> None:
        self.previous = previous

    def lower(self, layer: Any, ctx: LowerContext) -> Any:
        split = split_adapter(layer)
        if split is None:
            return self.previous.lower(layer, ctx)
        adapter, base_layer = split
        linear = self.previous.lower(base_layer, ctx)
        if not isinstance(linear, eqx.nn.Linear) or "scalar" in (linear.in_features, linear.out_features):
            raise LowerError(
                f"{ctx.where}: a LoRA adapter here needs its base to lower to an eqx.nn.Linear with integer "
                f"sizes, found {type(linear).__name__}. Fix: adapt only plain eqx.nn.Linear layers."
            )
        a, b, rank = _adapter_arrays(adapter, ctx)
        return LoRALinear(linear, a, b, alpha=float(adapter.alpha), rank=rank)


class LowRankAdapterRule:
    """A bare ``LowRankAdapter`` (no bias around it) -> ``LoRALinear`` over a bias-free ``eqx.nn.Linear``."""

    def lower(self, layer: LowRankAdapter, ctx: LowerContext) -> LoRALinear:
        linear = ctx.lower_node(layer.base, ctx)
        if not isinstance(linear, eqx.nn.Linear):
            raise LowerError(
                f"{ctx.where}: the base of this LowRankAdapter lowers to {type(linear).__name__}, not eqx.nn.Linear. "
                "Fix: adapt only pzb.nn.Linear layers mapping one axis to one axis."
            )
        a, b, rank = _adapter_arrays(layer, ctx)
        return LoRALinear(linear, a, b, alpha=float(layer.alpha), rank=rank)


class LoRALinearRule:
    """``LoRALinear`` -> the lifted ``eqx.nn.Linear`` with its ``Linear`` wrapped in a ``LowRankAdapter``.

    The base is lifted at the ``LoRALinear``'s own path, so labels are those of
    the original layer (``blocks.0.q.weight``) and the adapters get
    ``blocks.0.q.lora_a`` / ``.lora_b``; ``A`` is named ``{features, lora_rank}``
    and ``B`` ``{lora_rank, features_out}`` (the arrays themselves, no copy).
    """

    def lift(self, module: LoRALinear, ctx: LiftContext) -> Any:
        lifted = ctx.lift_node(module.linear, ctx)
        sublayers = lifted.sublayers if isinstance(lifted, Sequential) else [lifted]
        linear = sublayers[0]
        (f_in,), (f_out,) = linear.in_axis_names, linear.out_axis_names
        a = ctx.child("lora_a").parameter(module.lora_a, (f_in, RANK_AXIS))
        b = ctx.child("lora_b").parameter(module.lora_b, (RANK_AXIS, weight_output_name(f_out, (f_in,))))
        adapter = LowRankAdapter(linear, a, b, alpha=float(module.alpha))
        if isinstance(lifted, Sequential):
            return dataclasses.replace(lifted, sublayers=[adapter, *sublayers[1:]])
        return adapter

    def convention(self, module: LoRALinear, naming: Any) -> Any:
        # The adapter adds a low-rank path inside; what goes in and comes out is named as for its base Linear (a
        # traced parent names the call's output by this, so without it a re-lifted LoRA model's axes could reorder).
        return EQUINOX.convention_of(module.linear, naming)


EQUINOX.add(LoRALinearRule(), source=LoRALinear)


EQUINOX.add(LowRankAdapterRule(), lifted=(LowRankAdapter,))


for _cls in (EqxLinear, Affine):
    EQUINOX.add(_LoRAEqxLinearRule(EQUINOX.lower_rule_for(_cls)), lifted=(_cls,))
