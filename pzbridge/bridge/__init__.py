"""Bridges between Equinox / Flax NNX modules and lifted pzbridge models.

``lift`` and ``lower`` are the entry points (also ``pzb.lift`` / ``pzb.lower``);
each framework has one module of rules with both directions side by side and
a registry users extend for their own classes. See ``shared/DESIGN.md``.
"""

from pzbridge.bridge.api import lift, lower
from pzbridge.bridge.context import LiftContext, LowerContext
from pzbridge.bridge.equinox_state import lower_with_state
from pzbridge.bridge.lifted import CallingConvention, LiftedModel
from pzbridge.bridge.naming import AxisNaming
from pzbridge.bridge.registry import RuleRegistry


def equinox_rule(source=None, lifted=()):
    """Registers a user rule for an Equinox class (see :class:`RuleRegistry.rule`).

    Example:
        >>> callable(equinox_rule(lifted=()))
        True
    """
    from pzbridge.bridge.equinox_core import EQUINOX

    return EQUINOX.rule(source=source, lifted=lifted)


def nnx_rule(source=None, lifted=()):
    """Registers a user rule for a Flax NNX class (see :class:`RuleRegistry.rule`).

    Example:
        >>> callable(nnx_rule(lifted=()))
        True
    """
    from pzbridge.bridge.nnx_core import NNX

    return NNX.rule(source=source, lifted=lifted)
