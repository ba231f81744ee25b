"""Which framework a module belongs to, and that framework's traversal.

Example:
    >>> import jax, equinox as eqx
    >>> framework_of(eqx.nn.Linear(2, 3, key=jax.random.key(0)))
    'equinox'
"""

from __future__ import annotations

import types
from typing import Any

from pzbridge.core.errors import LiftError

__all__ = ["FRAMEWORKS", "framework_of", "traversal_of"]

FRAMEWORKS = ("equinox", "nnx")


def framework_of(module: Any) -> str:
    """``"equinox"`` or ``"nnx"``: the framework of ``module``.

    Raises:
      LiftError: If it is neither an ``eqx.Module`` nor an ``nnx.Module``.
    """
    import equinox as eqx

    if isinstance(module, eqx.Module):
        return "equinox"
    try:
        from flax import nnx
    except ImportError:  # pragma: no cover - flax is a dependency
        nnx = None
    if nnx is not None and isinstance(module, nnx.Module):
        return "nnx"
    raise LiftError(
        f"<root>: pzb.lift expects an eqx.Module or an nnx.Module, found {type(module).__module__}."
        f"{type(module).__qualname__}. Fix: pass the model object itself (not its state or a function)."
    )


def traversal_of(framework: str) -> types.ModuleType:
    """The framework's traversal module; importing it loads the framework's package, so every rule is registered."""
    if framework == "equinox":
        from pzbridge.bridge.equinox import traversal
    else:
        from pzbridge.bridge.nnx import traversal
    return traversal
