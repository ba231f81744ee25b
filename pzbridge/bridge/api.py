"""``pzb.lift`` and ``pzb.lower``: the two entry points of the bridge.

``lift`` detects the framework from the module's type and runs that
framework's traversal; ``lower`` goes back to the framework the model was
lifted from (or to ``framework=`` for a cross-framework lowering). Each
framework's rules live in its own package (:mod:`pzbridge.bridge.equinox`,
:mod:`pzbridge.bridge.nnx`); importing the package registers all of them.
See ``docs/architecture.md`` ("The lift / lower contract").

Example:
    >>> import jax, equinox as eqx
    >>> import pzbridge as pzb
    >>> lin = eqx.nn.Linear(2, 3, key=jax.random.key(0))
    >>> type(pzb.lower(pzb.lift(lin))).__name__
    'Linear'
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax

from pzbridge.bridge.context import recursion_headroom
from pzbridge.bridge.frameworks import framework_of, traversal_of
from pzbridge.bridge.lifted import CallingConvention, LiftedModel
from pzbridge.bridge.naming import AxisNaming, checked_naming
from pzbridge.bridge.output_check import check_output_shapes, disagreement_on_examples
from pzbridge.bridge.registry import memo_block
from pzbridge.bridge.tracing.example import Example
from pzbridge.bridge.tracing.overrides import OVERRIDES_KEY, AxisOverrides
from pzbridge.bridge.tracing.trace_log import TraceLog, recording
from pzbridge.bridge.tracing.widening import widened_examples
from pzbridge.core.errors import LiftError, LowerError, PzbridgeError
from pzbridge.core.selectors import select
from pzbridge.nn.dataflow import Traced
from pzbridge.nn.foreign import Foreign
from pzbridge.nn.layer_stack import LayerStack


@recursion_headroom()
@memo_block()
def lift(module: Any, *example_args: Any, example_kwargs: Mapping[str, Any] | None = None,
         input_names: Sequence[Sequence[str] | None] | None = None, naming: AxisNaming | None = None,
         strict: bool = False, state: Any = None,
         axis_names: Mapping[str, Mapping[str, str]] | None = None) -> LiftedModel:
    """Lifts an Equinox or Flax NNX module into an editable pzbridge model.

    Never mutates ``module`` and copies no array: lifted parameters hold the
    very same buffers. Known layers become pzbridge layers on named axes.
    Without example inputs a module without a rule becomes ``Foreign`` (its
    children still lifted); with them (arrays or ``jax.ShapeDtypeStruct`` s,
    as the module is called) its ``__call__`` is traced into explicit
    pzbridge layers (see ``docs/lifting_custom_modules.md``). Examples with
    size-1 axes are traced on a widened copy and the result checked on the
    examples themselves (:mod:`~pzbridge.bridge.tracing.widening`).

    Args:
      module: An ``eqx.Module`` or ``nnx.Module``.
      *example_args: Example positional inputs of ``module`` (optional).
      example_kwargs: Example keyword inputs.
      input_names: Per example argument, the names of its axes (default:
        the named arrays' names, else ``..., seq, features``).
      naming: Axis-naming policy (default :class:`~pzbridge.bridge.naming.AxisNaming`).
      strict: Raise :class:`~pzbridge.core.errors.LiftError` instead of
        producing ``Foreign`` for modules without a rule (with examples: for
        modules that cannot be traced, naming the reason).
      state: Equinox only: the ``eqx.nn.State`` of a stateful model; its
        entries become ``StateVariable``s. An example argument that is an
        ``eqx.nn.State`` (``pzb.lift(model, x, state)``) is taken as it.
      axis_names: Renames of traced axes by module path, ``{"blocks.*.attn":
        {"projection": "head_dim"}}`` (dotted paths, ``*`` wildcards, ``""``
        the root; see :mod:`~pzbridge.bridge.tracing.overrides`). Needs
        example inputs.

    Returns:
      A :class:`~pzbridge.bridge.lifted.LiftedModel` (call it on named
      arrays, or use ``.positional(...)`` exactly like the original).

    Raises:
      LiftError: Unknown input type, a module without a rule with ``strict``,
        an ``axis_names`` entry that renames nothing, a bad ``naming`` or
        ``state`` (or an ``eqx.nn.BatchNorm`` lifted without ``state=``).

    Example:
        >>> import jax, equinox as eqx
        >>> lifted = lift(eqx.nn.Linear(2, 3, key=jax.random.key(0)))
        >>> lifted.positional(jax.numpy.ones(2)).shape
        (3,)
    """
    framework = framework_of(module)
    naming = checked_naming(naming)
    if state is not None and framework != "equinox":
        raise LiftError("<root>: state= is for Equinox models, found an nnx.Module (NNX modules hold their own "
                        "state). Fix: drop state=.")
    if framework == "equinox" and (example_args or example_kwargs):
        from pzbridge.bridge.equinox.state import example_with_state, state_of_example  # Loaded with the traversal.

        example_args = example_with_state(module, example_args, state)  # y, state = model(x, state)
        state = state_of_example(example_args, example_kwargs or {}, state)
    example = None
    if example_args or example_kwargs:
        example = Example.of(example_args, example_kwargs, input_names)
    elif axis_names:
        raise LiftError("<root>: axis_names renames traced axes, but no example input was given, so nothing is "
                        "traced. Fix: pass example inputs, pzb.lift(model, x, axis_names=...).")
    lift_once = functools.partial(_lift_once, module, framework, naming, strict, state, axis_names)
    args, kwargs = tuple(example_args), dict(example_kwargs or {})
    if example is not None:
        widened = _lift_widened(lift_once, module, framework, example, args, kwargs, strict)
        if widened is not None:
            return widened
    lifted, log = lift_once(example)
    if example is not None and _holds_traced(lifted.body):
        root_output = log.first_output if isinstance(lifted.body, Traced) else None
        check_output_shapes(module, lifted, framework, args, kwargs, traced_output=root_output)
    return lifted


def _lift_once(module: Any, framework: str, naming: AxisNaming, strict: bool, state: Any,
               axis_names: Mapping[str, Mapping[str, str]] | None, example: Example | None
               ) -> tuple[LiftedModel, TraceLog]:
    """One traversal of ``module`` (traced with ``example`` where it has one), and what its traces saw."""
    traversal = traversal_of(framework)
    ctx = traversal.new_lift_context(naming, strict)
    if state is not None:
        from pzbridge.bridge.equinox.state import STATE_KEY, checked_state  # Loaded with the Equinox traversal.

        ctx.shared.extras[STATE_KEY] = checked_state(state, module)
    if example is not None:
        ctx = ctx.with_example(example)
    overrides = AxisOverrides.of(axis_names) if axis_names else None
    if overrides is not None:
        ctx.shared.extras[OVERRIDES_KEY] = overrides
    with recording() as log:
        body = ctx.lift_node(module, ctx)
    if overrides is not None:
        overrides.check_used()
    convention = body.convention if isinstance(body, (Traced, LayerStack)) else None
    convention = convention or getattr(body, "traced_convention", None) or traversal.RULES.convention_of(module, naming)
    return LiftedModel(body, framework, convention or CallingConvention()), log


def _lift_widened(lift_once: Callable[[Example | None], tuple[LiftedModel, TraceLog]], module: Any,
                  framework: str, example: Example, args: tuple[Any, ...], kwargs: dict[str, Any],
                  strict: bool) -> LiftedModel | None:
    """The lift traced on a widened example, checked on the original one; None: trace the original.

    Size-1 axes make traced naming ambiguous (see
    :mod:`~pzbridge.bridge.tracing.widening`). A candidate is taken when its
    lift succeeds, holds traced layers and computes the module on the
    original examples. A lift that keeps some module ``Foreign``
    (``strict=False``: a trace that failed at the widened sizes, or code that
    never traces) is compared with the lift of the original example, and the
    one with fewer ``Foreign`` layers wins.
    """
    candidates = widened_examples(example, _array_sizes(module, framework))
    for candidate in candidates:
        try:
            lifted, log = lift_once(candidate)
        except Exception:  # noqa: BLE001, S112 - speculative: whatever fails here, the original example decides
            continue  # The widened call does not run (an axis that must be 1): try the next, then the original.
        if not log.traces or not _holds_traced(lifted.body):
            return None  # Nothing traced: the example's sizes change nothing, the original lift is the lift.
        if disagreement_on_examples(module, lifted, framework, args, kwargs) is not None:
            continue
        if not strict and _foreign_count(lifted.body):
            try:
                original, _ = lift_once(example)
            except PzbridgeError:
                return lifted
            if _foreign_count(original.body) < _foreign_count(lifted.body):
                return None
        return lifted
    return None


def _array_sizes(module: Any, framework: str) -> set[int]:
    """Every axis size of the module's arrays (fresh sizes of a widened example avoid them)."""
    if framework == "nnx":
        from flax import nnx

        leaves = jax.tree_util.tree_leaves(nnx.state(module))
    else:
        leaves = jax.tree_util.tree_leaves(module)
    return {int(size) for leaf in leaves for size in getattr(leaf, "shape", ())}


def _foreign_count(body: Any) -> int:
    return int(isinstance(body, Foreign)) + select(body).at_instances_of(Foreign).count()


def _holds_traced(body: Any) -> bool:
    return isinstance(body, Traced) or bool(select(body).at_instances_of(Traced).count())


@recursion_headroom()
def lower(lifted: Any, *, framework: str | None = None, convention: CallingConvention | None = None) -> Any:
    """Lowers a lifted (possibly edited) model back to a genuine framework module.

    Untouched parts come back as their original classes with the same static
    fields and the same arrays; edited known layers become native classes;
    pzbridge-only layers become small adapter modules.

    Args:
      lifted: A :class:`~pzbridge.bridge.lifted.LiftedModel` or any lifted layer.
      framework: ``"equinox"`` or ``"nnx"``; defaults to where it was lifted from.
        Lowering a lifted model into the *other* framework converts it (see
        :func:`~pzbridge.bridge.convert.convert`): layers with a counterpart
        become native, the root takes that framework's calling convention
        (NNX: batched; Equinox: per example).
      convention: How the lowered root is called positionally (names of each
        input's and the output's axes, e.g. ``(("batch", "seq"),)`` for
        token ids): the root then runs the model through that convention,
        with every layer that has a counterpart native (for pzbridge models
        with no recorded convention, such as ``pzb.models.gpt``).

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
    crossing = isinstance(lifted, LiftedModel) and framework != lifted.framework and lifted.convention.inputs
    if framework in ("equinox", "nnx") and (convention is not None or crossing):
        from pzbridge.bridge.cross_lowering import converted_convention, lower_with_convention

        if convention is not None:
            return lower_with_convention(body, framework, convention)
        return lower_with_convention(body, framework, converted_convention(lifted, framework),
                                     unit_batch=framework == "equinox")
    if framework in ("equinox", "nnx"):
        ctx = traversal_of(framework).new_lower_context()
        return ctx.lower_node(body, ctx)
    raise LowerError(
        f"<root>: cannot tell which framework to lower to (found framework={framework!r}). "
        "Fix: pass framework='equinox' or framework='nnx'."
    )
