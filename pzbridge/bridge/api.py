"""``pzb.lift`` and ``pzb.lower``: the two entry points of the bridge.

``lift`` detects the framework from the module's type and runs that
framework's traversal; ``lower`` goes back to the framework the model was
lifted from (or to ``framework=`` for a cross-framework lowering). See
``shared/DESIGN.md`` ("The lift / lower contract").

Example:
    >>> import jax, equinox as eqx
    >>> import pzbridge as pzb
    >>> lin = eqx.nn.Linear(2, 3, key=jax.random.key(0))
    >>> type(pzb.lower(pzb.lift(lin))).__name__
    'Linear'
"""

from __future__ import annotations

from typing import Any

from pzbridge.bridge.lifted import CallingConvention, LiftedModel
from pzbridge.bridge.naming import AxisNaming
from pzbridge.core.errors import LiftError, LowerError


def _framework_of(module: Any) -> str:
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


def _load_rules(framework: str) -> None:
    """Imports a framework's rule modules (importing registers their rules), LoRA rules included."""
    if framework == "equinox":
        from pzbridge.bridge import equinox, lora_equinox  # noqa: F401
    else:
        from pzbridge.bridge import lora_nnx, nnx  # noqa: F401


def lift(module: Any, *, naming: AxisNaming | None = None, strict: bool = False, state: Any = None) -> LiftedModel:
    """Lifts an Equinox or Flax NNX module into an editable pzbridge model.

    Never mutates ``module`` and copies no array: lifted parameters hold the
    very same buffers. Known layers become pzbridge layers on named axes;
    modules without a rule become ``Foreign`` (their children still lifted).

    Args:
      module: An ``eqx.Module`` or ``nnx.Module``.
      naming: Axis-naming policy (default :class:`~pzbridge.bridge.naming.AxisNaming`).
      strict: Raise :class:`~pzbridge.core.errors.LiftError` instead of
        producing ``Foreign`` for modules without a rule.
      state: Equinox only: the ``eqx.nn.State`` of a stateful model; its
        entries become ``StateVariable``s.

    Returns:
      A :class:`~pzbridge.bridge.lifted.LiftedModel` (call it on named
      arrays, or use ``.positional(...)`` exactly like the original).

    Raises:
      LiftError: Unknown input type, or a module without a rule with ``strict``.

    Example:
        >>> import jax, equinox as eqx
        >>> lifted = lift(eqx.nn.Linear(2, 3, key=jax.random.key(0)))
        >>> lifted.positional(jax.numpy.ones(2)).shape
        (3,)
    """
    framework = _framework_of(module)
    naming = naming or AxisNaming()
    _load_rules(framework)
    if framework == "equinox":
        from pzbridge.bridge.equinox_core import EQUINOX, new_lift_context

        ctx = new_lift_context(naming, strict)
        if state is not None:
            ctx.shared.extras["state"] = state
        body = ctx.lift_node(module, ctx)
        rule = EQUINOX.lift_rule_for(type(module))
    else:
        from pzbridge.bridge import nnx as _nnx_rules
        from pzbridge.bridge.nnx_core import NNX, new_lift_context as new_nnx_context

        if state is not None:
            raise LiftError("<root>: state= is for Equinox models; NNX modules hold their own state.")
        ctx = new_nnx_context(naming, strict)
        body = _nnx_rules.lift_root(module, ctx)
        rule = NNX.lift_rule_for(type(module))
    convention = rule.convention(module, naming) if rule is not None and hasattr(rule, "convention") else None
    return LiftedModel(body, framework, convention or CallingConvention())


def lower(lifted: Any, *, framework: str | None = None) -> Any:
    """Lowers a lifted (possibly edited) model back to a genuine framework module.

    Untouched parts come back as their original classes with the same static
    fields and the same arrays; edited known layers become native classes;
    pzbridge-only layers become small adapter modules.

    Args:
      lifted: A :class:`~pzbridge.bridge.lifted.LiftedModel` or any lifted layer.
      framework: ``"equinox"`` or ``"nnx"``; defaults to where it was lifted from.

    Returns:
      An ``eqx.Module`` or ``nnx.Module``.

    Raises:
      LowerError: If the framework cannot be determined or a layer cannot be lowered.

    Example:
        >>> import jax, equinox as eqx
        >>> lin = eqx.nn.Linear(2, 3, key=jax.random.key(0))
        >>> lower(lift(lin)).bias is lin.bias
        True
    """
    body = lifted.body if isinstance(lifted, LiftedModel) else lifted
    framework = framework or (lifted.framework if isinstance(lifted, LiftedModel) else None)
    if framework in ("equinox", "nnx"):
        _load_rules(framework)
    if framework == "equinox":
        from pzbridge.bridge.equinox_core import new_lower_context

        ctx = new_lower_context()
        return ctx.lower_node(body, ctx)
    if framework == "nnx":
        from pzbridge.bridge import nnx as _nnx_rules

        return _nnx_rules.lower_root(body)
    raise LowerError(
        f"<root>: cannot tell which framework to lower to (found framework={framework!r}). "
        "Fix: pass framework='equinox' or framework='nnx'."
    )
