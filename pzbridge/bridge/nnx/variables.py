"""NNX Variables <-> pzbridge variables, and writing NNX's in-place updates back.

``nnx.Param`` (and subclasses such as ``nnx.LoRAParam``) become
``Parameter``; every other Variable type (``BatchStat``, ``Cache``,
``RngKey`` / ``RngCount`` ...) and plain array attributes become
``StateVariable``. The pzbridge variable's metadata keeps the NNX metadata and
the Variable class under :data:`NNX_TYPE`, so lowering recreates the same
Variable type. Lifting only reads the Variable's raw value (the very same
buffer); lowering always creates new Variables, once per pzbridge variable,
so sharing is kept and the user's Variables are never aliased.

Example:
    >>> import numpy as np
    >>> from flax import nnx
    >>> from pzbridge.bridge.nnx.traversal import new_lift_context
    >>> p = lift_variable(nnx.BatchStat(np.zeros(2)), new_lift_context().child("mean"))
    >>> type(p).__name__, p.label, p.metadata[NNX_TYPE].__name__
    ('StateVariable', 'mean', 'BatchStat')
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx

from pzbridge.bridge.context import LiftContext, LowerContext
from pzbridge.bridge.tracing.state_writes import storage_names
from pzbridge.core import named_axes as nx
from pzbridge.core.errors import LowerError
from pzbridge.core.variables import (
    Parameter,
    ParameterValue,
    StateVariable,
    StateVariableValue,
)

NNX_TYPE = "nnx_type"
"""Metadata key holding the NNX Variable class (or ``"array"`` for a plain array attribute)."""


PLAIN_ARRAY = "array"


def is_array(value: Any) -> bool:
    """True for JAX / NumPy arrays (plain data attributes of NNX modules).

    Example:
        >>> is_array(np.zeros(2)), is_array(nnx.Param(np.zeros(2)))
        (True, False)
    """
    return isinstance(value, (jax.Array, np.ndarray, jax.ShapeDtypeStruct))


def raw_value(value: Any) -> Any:
    """A Variable's raw value (anything else as it is).

    Example:
        >>> float(raw_value(nnx.Param(jax.numpy.float32(2.0)))), raw_value(3)
        (2.0, 3)
    """
    return value.get_raw_value() if isinstance(value, nnx.Variable) else value


def fresh_variable(variable: Any, value: Any) -> Any:
    """A new Variable of ``variable``'s type and metadata holding ``value`` (a plain value is just replaced).

    Example:
        >>> v = fresh_variable(nnx.Param(jax.numpy.zeros(2)), jax.numpy.ones(2))
        >>> type(v).__name__, v[...].tolist()
        ('Param', [1.0, 1.0])
    """
    # A graph node's state may hold plain arrays too (an NnxAdapter's constants): those are just replaced.
    if not isinstance(variable, nnx.Variable):
        return value
    return type(variable).from_metadata(value, variable.get_metadata())


def variable_metadata(variable: nnx.Variable) -> dict[str, Any]:
    """The pzbridge metadata recording an NNX Variable's class and NNX metadata.

    Example:
        >>> meta = variable_metadata(nnx.BatchStat(np.zeros(2)))
        >>> meta[NNX_TYPE].__name__, meta["hijax"]
        ('BatchStat', False)
    """
    return {**variable.get_metadata(), NNX_TYPE: type(variable)}


def lift_variable(variable: Any, ctx: LiftContext, axis_names: Sequence[str] | None = None) -> Any:
    """Lifts an ``nnx.Variable`` (or plain array attribute) at ``ctx``'s path.

    ``nnx.Param`` (and subclasses) -> ``Parameter``; other Variables and plain
    arrays -> ``StateVariable``. The value is the Variable's raw value, the
    very same buffer; with ``axis_names`` it is wrapped as a NamedArray.
    The same Variable object always gives the same pzbridge variable.

    Args:
      variable: An ``nnx.Variable`` or an array.
      ctx: The context whose path labels the variable.
      axis_names: Names for the value's axes in storage order, or None to keep
        the raw value (``Foreign`` children).

    Returns:
      A ``Parameter`` or ``StateVariable``.

    Example:
        >>> from pzbridge.bridge.nnx.traversal import new_lift_context
        >>> ctx = new_lift_context().child("w")
        >>> v = nnx.Param(np.ones((2, 3), np.float32))
        >>> p = lift_variable(v, ctx, ("a", "b"))
        >>> p.label, dict(p.value.named_shape), p is lift_variable(v, ctx, ("a", "b"))
        ('w', {'a': 2, 'b': 3}, True)
    """
    if isinstance(variable, nnx.Variable):
        raw, metadata = variable.get_raw_value(), variable_metadata(variable)
        trainable = isinstance(variable, nnx.Param)
    else:
        raw, metadata, trainable = variable, {NNX_TYPE: PLAIN_ARRAY}, False
    if axis_names is not None and isinstance(raw, jax.ShapeDtypeStruct):
        # Abstract models (``nnx.eval_shape``): name the shape without touching data.
        named = nx.NamedArray(raw, dict(zip(axis_names, raw.shape)))
        kind = Parameter if trainable else StateVariable
        return ctx.variable(kind, variable, lambda: named, ctx.label(), metadata)
    if axis_names is not None and trainable:
        return ctx.parameter(raw, tuple(axis_names), metadata=metadata, source=variable)
    if trainable:
        return ctx.raw_parameter(raw, metadata=metadata, source=variable)
    value = raw if axis_names is None else nx.wrap(raw, *axis_names)
    return ctx.state_variable(value, metadata=metadata, source=variable)


def nnx_variable(variable: Any, ctx: LowerContext, axis_names: Sequence[str] | None = None,
                 default_type: type | None = None) -> Any:
    """Lowers a pzbridge variable to one NNX Variable (or plain array), once per variable.

    The Variable class and NNX metadata come from the variable's metadata
    (set by :func:`lift_variable`); variables created in pzbridge get
    ``default_type`` (``nnx.Param`` for parameters, ``nnx.Variable`` for state).

    Args:
      variable: A ``Parameter`` / ``StateVariable`` or a frozen value.
      ctx: The lower context (its cache keeps sharing).
      axis_names: The storage order the NNX layer needs; default: as stored.
      default_type: Variable class for variables without an NNX origin.

    Returns:
      A new ``nnx.Variable`` (never one of the user's), or a plain array.

    Example:
        >>> from pzbridge.core.variables import Parameter
        >>> p = Parameter(nx.wrap(np.ones((2, 3), np.float32), "a", "b"), "p")
        >>> from pzbridge.bridge.nnx.traversal import new_lower_context
        >>> v = nnx_variable(p, new_lower_context(), ("b", "a"))
        >>> type(v).__name__, v.shape
        ('Param', (3, 2))
    """
    layouts = ctx.shared.extras.setdefault(_LAYOUTS, {})
    if axis_names is None and ("cached", id(variable)) in ctx.shared.by_identity:
        return ctx.cached(variable, lambda: None)  # Any storage order will do (an adapter records it).
    names = storage_names(variable) if axis_names is None else tuple(axis_names)
    # A state variable may hold None until it is first written (a capture saver before it runs):
    # that is a value, unlike an unbound slot, and NNX Variables may hold None too.
    array = None if _holds_none(variable) else ctx.array(variable, names)

    def make() -> Any:
        metadata = dict(getattr(variable, "metadata", {}) or {})
        is_param = isinstance(variable, (Parameter, ParameterValue))
        var_type = metadata.pop(NNX_TYPE, None) or default_type or (nnx.Param if is_param else nnx.Variable)
        if var_type == PLAIN_ARRAY:
            return array
        if "hijax" in metadata:
            made = var_type.from_metadata(array, metadata)
        else:
            made = var_type(array, **metadata)
        if isinstance(variable, StateVariable):
            # Foreign calls write NNX's in-place updates back into the lifted variable.
            ctx.shared.extras.setdefault("nnx_state_pairs", []).append((variable, made, names))
        layouts[id(variable)] = names
        return made

    made = ctx.cached(variable, make)
    if layouts.get(id(variable), names) != names and array is not None:
        # One tied variable used in two storage orders (an embedding table and a Linear kernel): two NNX
        # Variables would untie it in training, so the second use cannot be a native layer.
        raise LowerError(
            f"{ctx.where}: {getattr(variable, 'label', 'variable')!r} is already lowered stored as "
            f"{list(layouts[id(variable)])}; this layer needs it stored as {list(names)}. Fix: keep the layer an "
            "adapter (it shares the tied variable), or tie layers that store it in one order."
        )
    return made


_LAYOUTS = "nnx_variable_layouts"
"""``ctx.shared.extras`` key: ``{id(variable): axis names of its lowered NNX Variable, in storage order}``."""


def lowered_layout(variable: Any, ctx: LowerContext) -> tuple[str, ...]:
    """The storage order of ``variable``'s lowered NNX Variable (its own storage order before it is lowered).

    Example:
        >>> from pzbridge.core.variables import Parameter
        >>> from pzbridge.bridge.nnx.traversal import new_lower_context
        >>> p, ctx = Parameter(nx.wrap(np.ones((2, 3)), "a", "b"), "p"), new_lower_context()
        >>> _ = nnx_variable(p, ctx, ("b", "a"))
        >>> lowered_layout(p, ctx)
        ('b', 'a')
    """
    return ctx.shared.extras.get(_LAYOUTS, {}).get(id(variable), storage_names(variable))


def _holds_none(variable: Any) -> bool:
    return isinstance(variable, (StateVariable, StateVariableValue)) and variable.value is None


def write_back(pairs: Sequence[tuple[Any, Any, tuple[str, ...]]], leading_names: Sequence[str] = ()) -> None:
    """Copies updated NNX Variable values into the lifted ``StateVariable`` objects.

    A new value that is a ``NamedArray`` with positional axes was written by a
    pzbridge layer (an adapter) that saw the batch axes of a ``Foreign`` call
    as leading positional dims; those dims get ``leading_names`` (the ones the
    value does not already carry) back.

    Args:
      pairs: ``(lifted StateVariable, lowered nnx.Variable or array, storage axis names)``.
      leading_names: The named axes the module was called with as leading positional dims.

    Example:
        >>> s = StateVariable(np.zeros(2), "n")
        >>> v = nnx.BatchStat(np.zeros(2))
        >>> v.set_value(np.ones(2))
        >>> write_back([(s, v, ())]); s.value.tolist()
        [1.0, 1.0]
        >>> saved = StateVariable(None, "saved")
        >>> seen = nx.wrap(np.ones((4, 2))).tag("lead", "features").untag("lead")  # positional (4,)
        >>> write_back([(saved, nnx.Variable(seen), ())], leading_names=("batch",))
        >>> dict(saved.value.named_shape)
        {'batch': 4, 'features': 2}
    """
    for lifted, lowered, names in pairs:
        new = lowered.get_raw_value() if isinstance(lowered, nnx.Variable) else lowered
        old = lifted.value
        if new is old or (nx.is_namedarray(old) and new is getattr(old, "data_array", None)):
            continue
        if nx.is_namedarray(new):
            new = _name_leading(new, leading_names)
        lifted.value = nx.wrap(new, *names) if names and not nx.is_namedarray(new) else new


def _name_leading(value: Any, leading_names: Sequence[str]) -> Any:
    missing = [n for n in leading_names if n not in value.named_shape]
    if not missing or len(value.positional_shape) < len(missing):
        return value
    return value.tag_prefix(*missing)
