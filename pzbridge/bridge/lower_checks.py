"""Validation while lowering: every lowered node is a layer, and native modules get the arrays they need.

``pzb.lower`` builds framework modules from fields, without running their
``__init__`` (which would draw new weights), so nothing in the frameworks
checks what goes in: a ``(5, 4)`` weight in an ``eqx.nn.Linear(4, 8)`` or an
``int8`` kernel in an ``nnx.Linear`` would only fail (or silently stop
training) later, inside JAX. This module catches those at ``lower`` time with
a :class:`~pzbridge.core.errors.LowerError` naming the path, what was
expected, what was found and the fix. Two checks run from each framework's
lower dispatch:

- :func:`check_layer`, before a node is lowered: it must be a layer (a
  pzbridge layer, a framework module or a callable), not a string, number,
  ``None`` or array left where a layer was;
- :func:`check_lowered`, after a rule built a native module: the module's
  arrays must have the shapes its configuration needs (the configuration the
  layer was lifted with) and, where the framework trains them, a floating
  dtype. What each native class needs is a :class:`Need` list given by a
  spec function registered per class with :func:`native_spec` (the tables
  are :mod:`pzbridge.bridge.equinox.lower_specs` and
  :mod:`pzbridge.bridge.nnx.lower_specs`).

A trained field holding an integer array is an error only when it comes
from a mutable :class:`~pzbridge.Parameter` (a frozen value is the user's way
of saying "do not train this") and, for NNX, differs from the layer's
``param_dtype`` (a layer lifted with integer parameters stays valid).

Example:
    >>> import jax.numpy as jnp
    >>> from pzbridge.bridge.context import LowerContext
    >>> ctx = LowerContext(framework="toy", lower_node=lambda l, c: l).child("blocks", 0)
    >>> try:
    ...     check_layer(ctx, "relu")
    ... except LowerError as e:
    ...     print(str(e).split(". Fix")[0])
    blocks[0]: expected a pzbridge layer (or a toy module), found str 'relu'
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any

import jax.numpy as jnp
import numpy as np

from pzbridge.core.errors import LowerError
from pzbridge.core.struct import Struct
from pzbridge.core.variables import Parameter
from pzbridge.nn.layer_stack import LayerStack

if TYPE_CHECKING:
    from pzbridge.bridge.context import LowerContext


@dataclasses.dataclass(frozen=True)
class Need:
    """One array a native module needs: where it is, its shape, and whether the framework trains it.

    Attributes:
      field: Dotted attribute path below the module (``"weight"``, ``"query_proj.bias"``).
      shape: The shape the module's configuration needs.
      what: The module and the configuration the shape comes from, for messages
        (``"eqx.nn.Linear(in_features=4, out_features=8)"``).
      trained: The framework trains it (so it needs a floating dtype).

    Example:
        >>> Need("bias", (8,), "eqx.nn.Linear(in_features=4, out_features=8)").trained
        True
    """

    field: str
    shape: tuple[int, ...]
    what: str
    trained: bool = True


Spec = Callable[[Any, Any], Iterable[Need]]
"""``spec(module, layer) -> needs``: the arrays ``module`` (lowered from ``layer``) needs."""


@dataclasses.dataclass
class NativeChecks:
    """One framework's table of specs, and how to read its modules' fields.

    Attributes:
      specs: Spec per native class (exact class: a user subclass may need other arrays).
      raw: Turns a field value into the array it holds (NNX: a Variable's raw value).
      param_dtype: The dtype a module was configured to keep its parameters in, or None.

    Example:
        >>> NativeChecks().spec_for(int) is None
        True
    """

    specs: dict[type, Spec] = dataclasses.field(default_factory=dict)
    raw: Callable[[Any], Any] = lambda value: value
    param_dtype: Callable[[Any], Any] = lambda module: None

    def spec_for(self, cls: type) -> Spec | None:
        """The spec registered for exactly ``cls``, or None."""
        return self.specs.get(cls)


NATIVE_CHECKS: dict[str, NativeChecks] = {}
"""The spec table of each framework (``"equinox"``, ``"nnx"``), filled by the frameworks' spec modules."""


def checks_for(framework: str) -> NativeChecks:
    """The (possibly new) spec table of ``framework``.

    Example:
        >>> checks_for("toy") is checks_for("toy")
        True
    """
    return NATIVE_CHECKS.setdefault(framework, NativeChecks())


def native_spec(framework: str, *classes: type) -> Callable[[Spec], Spec]:
    """Decorator registering ``spec(module, layer)`` as what native ``classes`` of ``framework`` need.

    Example:
        >>> @native_spec("toy", complex)
        ... def _complex(module, layer):
        ...     return [Need("imag", (), "complex")]
        >>> [n.field for n in checks_for("toy").spec_for(complex)(1j, None)]
        ['imag']
    """

    def register(spec: Spec) -> Spec:
        for cls in classes:
            checks_for(framework).specs[cls] = spec
        return spec

    return register


def nested(prefix: str, needs: Iterable[Need]) -> list[Need]:
    """``needs`` of a submodule at attribute ``prefix``, as needs of its parent.

    Example:
        >>> nested("linear", [Need("weight", (2, 2), "eqx.nn.Linear")])[0].field
        'linear.weight'
    """
    return [dataclasses.replace(need, field=f"{prefix}.{need.field}") for need in needs]


def _describe(value: Any) -> str:
    if value is None:
        return "None"
    if hasattr(value, "shape") and hasattr(value, "dtype"):
        return f"{type(value).__name__} of shape {tuple(value.shape)} and dtype {value.dtype}"
    text = repr(value)
    return f"{type(value).__name__} {text if len(text) <= 40 else text[:37] + '...'}"


_MODULE_NAMES = {"equinox": "an eqx.Module", "nnx": "an nnx.Module"}


def check_layer(ctx: LowerContext, node: Any, module_types: Sequence[type] = ()) -> None:
    """Raises unless ``node``, about to be lowered at ``ctx``, is a layer.

    A layer is a pzbridge ``Struct`` (every pzbridge layer), an instance of
    ``module_types`` (the framework's modules and internal wrappers) or any
    callable (a plain function lowers to an adapter). A string, number,
    ``None``, array or other data put where a layer was would otherwise lower
    to an adapter that fails when called.

    Raises:
      LowerError: Naming the path, the expected and the found value, and the fix.

    Example:
        >>> from pzbridge.bridge.context import LowerContext
        >>> import pzbridge as pzb
        >>> check_layer(LowerContext(framework="toy", lower_node=lambda l, c: l), pzb.nn.Identity())
    """
    if isinstance(node, (Struct, *module_types)) or callable(node):
        return
    array_hint = " (an array belongs in a pzb.Parameter)" if hasattr(node, "shape") else ""
    module = _MODULE_NAMES.get(ctx.framework, f"a {ctx.framework} module")
    raise LowerError(
        f"{ctx.where}: expected a pzbridge layer (or {module}), found {_describe(node)}. "
        f"Fix: put a layer back at {ctx.where}{array_hint}: pzb.nn.Identity() to drop the layer, "
        "pzb.nn.Elementwise(fn) for a function."
    )


def _shape_text(shape: Sequence[int]) -> str:
    return str(tuple(int(size) for size in shape))


def check_array(where: str, value: Any, shape: Sequence[int], what: str, label: str | None = None) -> None:
    """Raises unless ``value`` is an array of ``shape`` (what ``what`` needs at ``where``).

    Example:
        >>> check_array("weight", np.zeros((8, 4)), (8, 4), "eqx.nn.Linear(4 -> 8)")
        >>> try:
        ...     check_array("weight", np.zeros((5, 4)), (8, 4), "eqx.nn.Linear(4 -> 8)", "weight")
        ... except LowerError as e:
        ...     print(str(e).split(". Fix")[0])
        weight: eqx.nn.Linear(4 -> 8) needs an array of shape (8, 4) here; expected shape (8, 4), found (5, 4) (parameter 'weight')
    """
    found = getattr(value, "shape", None)
    if found is not None and hasattr(value, "dtype") and tuple(found) == tuple(shape):
        return
    held = f" (parameter {label!r})" if label else ""
    found_text = _shape_text(found) if found is not None and hasattr(value, "dtype") else _describe(value)
    raise LowerError(
        f"{where}: {what} needs an array of shape {_shape_text(shape)} here; expected shape {_shape_text(shape)}, "
        f"found {found_text}{held}. Fix: give {('parameter ' + repr(label)) if label else 'it'} a value of shape "
        f"{_shape_text(shape)} again (lowering keeps the configuration the layer was lifted with), or replace the "
        "whole layer by a new one of the size you want."
    )


def _is_floating(dtype: Any) -> bool:
    return bool(jnp.issubdtype(dtype, jnp.inexact))


def check_trainable_dtype(where: str, value: Any, source: Any, what: str, expected: Any = None) -> None:
    """Raises if a mutable Parameter ``source`` puts a non-floating ``value`` into a field the framework trains.

    ``expected`` is the dtype the layer was configured with (NNX
    ``param_dtype``), or a floating dtype to suggest; a value of exactly that
    dtype passes (a layer lifted with integer parameters stays valid). Frozen
    values, state and arrays of unknown origin are not checked: nothing says
    they should train.

    Example:
        >>> p = Parameter(np.zeros(2, np.int8), "w")
        >>> try:
        ...     check_trainable_dtype("w", p.value, p, "eqx.nn.Linear", np.float32)
        ... except LowerError as e:
        ...     print(str(e).split(". Fix")[0])
        w: eqx.nn.Linear trains this array, so it needs a floating dtype; expected float32, found int8 (parameter 'w')
        >>> check_trainable_dtype("w", p.value, p.freeze(), "eqx.nn.Linear", np.float32)
    """
    dtype = getattr(value, "dtype", None)
    if not isinstance(source, Parameter) or dtype is None or _is_floating(dtype):
        return
    if expected is not None and np.dtype(expected) == np.dtype(dtype):
        return
    wanted = np.dtype(expected if expected is not None and _is_floating(expected) else jnp.float32).name
    raise LowerError(
        f"{where}: {what} trains this array, so it needs a floating dtype; expected {wanted}, found "
        f"{np.dtype(dtype).name} (parameter {source.label!r}). Fix: cast it back "
        f"(parameter.value = parameter.value.astype(jnp.{wanted})), or freeze it (pzb.freeze_params(model), "
        "parameter.freeze()) if it should not train."
    )


def _field(module: Any, field: str) -> Any:
    value = module
    for name in field.split("."):
        value = getattr(value, name, None)
        if value is None:
            return None
    return value


def _source_of(ctx: LowerContext, lowered: Any) -> Any:
    """The pzbridge variable ``lowered`` (an array or framework variable) was made from, or None.

    Only called for a suspicious value, so a scan of the lowering's caches is fine.
    """
    shared = ctx.shared
    for key, value in shared.by_identity.items():
        if value is lowered and isinstance(key, tuple) and len(key) == 2:
            ident = key[1] if key[0] == "cached" else key[0]
            return next((kept for kept in shared.keep_alive if id(kept) == ident), None)
    return None


def _floating_hint(needs: list[Need], checks: NativeChecks, module: Any) -> Any:
    # A dtype to suggest: the configured one, else that of the module's other (floating) trained arrays.
    configured = checks.param_dtype(module)
    if configured is not None:
        return configured
    for need in needs:
        dtype = getattr(checks.raw(_field(module, need.field)), "dtype", None)
        if need.trained and dtype is not None and _is_floating(dtype):
            return dtype
    return None


def check_lowered(ctx: LowerContext, layer: Any, module: Any) -> Any:
    """Checks the native ``module`` a rule built from ``layer`` at ``ctx`` against its spec; returns it.

    Raises:
      LowerError: An array of the wrong shape (or not an array), or a
        trained array of a non-floating dtype from a mutable Parameter.

    Example:
        >>> from pzbridge.bridge.context import LowerContext
        >>> ctx = LowerContext(framework="toy", lower_node=lambda l, c: l)
        >>> check_lowered(ctx, None, 3)
        3
    """
    checks = NATIVE_CHECKS.get(ctx.framework)
    spec = None if checks is None else checks.spec_for(type(module))
    if spec is None or isinstance(layer, LayerStack):
        return module  # A stack's module holds every block's arrays; its block was checked under the vmap.
    needs = list(spec(module, layer))
    for need in needs:
        lowered = _field(module, need.field)
        if lowered is not None:  # None: an optional array left out (no bias); the module's flags say so.
            _check_need(ctx, need, checks.raw(lowered), lowered, lambda: _floating_hint(needs, checks, module))
    return module


def _where(ctx: LowerContext, need: Need) -> str:
    # Only built for a message: a path's text costs O(depth).
    return ctx.child(*need.field.split(".")).where


def _check_need(ctx: LowerContext, need: Need, value: Any, lowered: Any, hint: Callable[[], Any]) -> None:
    """Checks one field of the module lowered at ``ctx``; ``value`` is the array ``lowered`` (maybe a Variable) holds."""
    if not (hasattr(value, "shape") and tuple(value.shape) == tuple(need.shape)):
        check_array(_where(ctx, need), value, need.shape, need.what, getattr(_source_of(ctx, lowered), "label", None))
    dtype = getattr(value, "dtype", None)
    if need.trained and dtype is not None and not _is_floating(dtype):
        expected = hint()
        if expected is None or np.dtype(expected) != np.dtype(dtype):  # Not as configured: who put it there?
            check_trainable_dtype(_where(ctx, need), value, _source_of(ctx, lowered), need.what, expected)
