"""Bridges between Equinox / Flax NNX modules and lifted pzbridge models.

``lift`` and ``lower`` are the entry points (also ``pzb.lift`` / ``pzb.lower``).
This package holds what is framework-neutral: the entry points, the rule
registry, the traversal contexts, the axis-naming policy and the lifted root.
Each framework has a package of its own, :mod:`pzbridge.bridge.equinox` and
:mod:`pzbridge.bridge.nnx`: its traversal, adapter, state handling, LoRA
rules, and one module per layer family with both directions side by side.
Users extend the rule tables for their own classes with :func:`equinox_rule`
and :func:`nnx_rule`. See ``docs/architecture.md``.

Example:
    >>> import jax, equinox as eqx
    >>> lifted = lift(eqx.nn.Linear(2, 3, key=jax.random.key(0)))
    >>> type(lower(lifted)).__name__
    'Linear'
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from pzbridge.bridge.api import lift, lower
from pzbridge.bridge.context import LiftContext, LowerContext
from pzbridge.bridge.equinox.state import lower_with_state
from pzbridge.bridge.lifted import CallingConvention, LiftedModel
from pzbridge.bridge.naming import AxisNaming
from pzbridge.bridge.registry import RuleRegistry

__all__ = [
    "AxisNaming", "CallingConvention", "LiftContext", "LiftedModel", "LowerContext", "RuleRegistry",
    "equinox_rule", "lift", "lower", "lower_with_state", "nnx_rule",
]


def equinox_rule(source: type | None = None, lifted: Sequence[type] = ()) -> Callable[[type], type]:
    """Registers a user rule for an Equinox class (see :meth:`RuleRegistry.rule`).

    Example:
        >>> callable(equinox_rule(lifted=()))
        True
    """
    from pzbridge.bridge.equinox.traversal import EQUINOX

    return EQUINOX.rule(source=source, lifted=lifted)


def nnx_rule(source: type | None = None, lifted: Sequence[type] = ()) -> Callable[[type], type]:
    """Registers a user rule for a Flax NNX class (see :meth:`RuleRegistry.rule`).

    Flax is imported only when the first NNX rule is registered.

    Example:
        >>> callable(nnx_rule(lifted=()))
        True
    """
    from pzbridge.bridge.nnx.traversal import NNX

    return NNX.rule(source=source, lifted=lifted)
