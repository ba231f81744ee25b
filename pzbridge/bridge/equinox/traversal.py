"""The Equinox traversal: dispatch, ``Foreign`` templates and adapter modules.

Rules for individual ``eqx.nn`` layers live in :mod:`pzbridge.bridge.equinox`
(and the modules it imports); this module holds the machinery they share:

- :func:`lift_node` / :func:`lower_node`: one dispatch each, driven by the
  :data:`EQUINOX` rule table;
- :class:`EquinoxTemplate`: how an unknown ``eqx.Module`` is kept. Its own
  fields are flattened *one level* (stopping at submodules), so the template
  is the module's tree structure plus its non-array leaves (functions,
  flags), and its children are the submodules and arrays. Rebuilding is a
  single ``tree_unflatten``: the result has the original class and the
  original static fields, and costs nothing at run time under jit;
- :class:`EquinoxAdapter`: the genuine ``eqx.Module`` a pzbridge-only layer
  lowers to. Its arrays are ordinary pytree leaves (so ``eqx.filter_grad``
  and optax train them) and it calls the lifted layer on named arrays.

Example:
    >>> import jax, equinox as eqx
    >>> class Block(eqx.Module):
    ...     inner: eqx.nn.Linear
    ...     def __call__(self, x): return self.inner(x) * 2
    >>> block = Block(eqx.nn.Linear(2, 2, key=jax.random.key(0)))
    >>> lifted = lift_node(block, new_lift_context())
    >>> type(lifted).__name__, sorted(lifted.children)
    ('Foreign', ['inner'])
    >>> lower_node(lifted, new_lower_context()).inner.weight is block.inner.weight
    True
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Mapping
from typing import Any

import equinox as eqx
import jax
import numpy as np

from pzbridge.bridge.context import LiftContext, LowerContext
from pzbridge.bridge.equinox.foreign_state import call_collecting_state, write_state
from pzbridge.bridge.equinox.signatures import StandIn, callable_like
from pzbridge.bridge.lifted import CallingConvention, name_trailing_axes
from pzbridge.bridge.lower_checks import check_layer, check_lowered
from pzbridge.bridge.naming import AxisNaming
from pzbridge.bridge.registry import RuleRegistry
from pzbridge.core import named_axes as nx
from pzbridge.core.errors import LiftError, LowerError
from pzbridge.core.variable_base import AbstractVariable
from pzbridge.core.variables import (
    AbstractVariableSlot,
    AbstractVariableValue,
)
from pzbridge.nn.foreign import Foreign, ForeignTemplate

EQUINOX = RuleRegistry("equinox")
"""The Equinox rule table; register rules for your own classes with :func:`equinox_rule`."""


equinox_rule = EQUINOX.rule

RULES = EQUINOX
"""The framework-neutral name of this framework's table (what :mod:`pzbridge.bridge.api` uses)."""


def new_lift_context(naming: AxisNaming | None = None, strict: bool = False) -> LiftContext:
    """A fresh context for lifting one Equinox model.

    Example:
        >>> new_lift_context().framework
        'equinox'
    """
    return LiftContext(framework="equinox", lift_node=lift_node, naming=naming or AxisNaming(), strict=strict)


def new_lower_context() -> LowerContext:
    """A fresh context for lowering one model to Equinox.

    Example:
        >>> new_lower_context().framework
        'equinox'
    """
    return LowerContext(framework="equinox", lower_node=lower_node)


def is_array(value: Any) -> bool:
    """True for JAX and NumPy arrays (what Equinox treats as parameters).

    Example:
        >>> is_array(np.zeros(2)), is_array(2.0)
        (True, False)
    """
    return isinstance(value, (jax.Array, np.ndarray, jax.ShapeDtypeStruct))


def lift_node(module: Any, ctx: LiftContext) -> Any:
    """Lifts one Equinox module: its rule, else ``Foreign`` (or an error if strict).

    Args:
      module: An ``eqx.Module``.
      ctx: The traversal context (path, naming, sharing).

    Returns:
      The lifted layer.

    Raises:
      LiftError: If ``module`` is not an ``eqx.Module``, or has no rule and
        ``ctx.strict`` is set.
    """
    rule = EQUINOX.lift_rule_for(type(module))
    if rule is not None:
        return EQUINOX.lift_with_rule(rule, module, ctx, lambda lifted: isinstance(lifted, Foreign))
    if not isinstance(module, eqx.Module):
        raise LiftError(
            f"{ctx.where}: expected an eqx.Module, found {type(module).__name__}. "
            "Fix: pass an Equinox module (or an nnx.Module to lift from Flax NNX)."
        )
    return EQUINOX.lift_unknown(module, ctx)


def foreign_or_error(module: eqx.Module, ctx: LiftContext, reason: str = "") -> Foreign:
    """Lifts a module without a rule as ``Foreign``, or raises when ``ctx.strict`` (naming ``reason``).

    Example:
        >>> class Id(eqx.Module):
        ...     def __call__(self, x): return x
        >>> type(foreign_or_error(Id(), new_lift_context())).__name__
        'Foreign'
    """
    if ctx.strict:
        cls = type(module)
        why = f" ({reason})" if reason else ""
        raise LiftError(
            f"{ctx.where}: no Equinox lifting rule for {cls.__module__}.{cls.__qualname__} and strict=True{why}. "
            "Fix: register one with `@pzbridge.bridge.equinox_rule(source=YourClass, lifted=(YourLayer,))` "
            "(a class with lift(module, ctx) and lower(layer, ctx)), pass example inputs to pzb.lift so its "
            "__call__ is traced, or lift with strict=False to keep it as a Foreign layer."
        )
    return lift_foreign(module, ctx)


EQUINOX.set_unknown_handler(foreign_or_error)


def lower_node(layer: Any, ctx: LowerContext) -> Any:
    """Lowers one lifted layer to Equinox by its rule (the adapter rule is the fallback for ``object``).

    Args:
      layer: A lifted layer (or a variable / array held by a ``Foreign``).
      ctx: The traversal context.

    Returns:
      An ``eqx.Module`` (or an array for a variable).
    """
    if isinstance(layer, (AbstractVariable, AbstractVariableValue)):
        return ctx.array(layer, _storage_names(layer))
    check_layer(ctx, layer, (eqx.Module, StandIn))  # A string / number / None left where a layer was.
    rule = EQUINOX.lower_rule_for(type(layer))
    if rule is None:
        raise LowerError(
            f"{ctx.where}: no Equinox lowering rule matches {type(layer).__qualname__}, not even the adapter "
            "fallback. Fix: import pzbridge.bridge.equinox (importing it registers every rule)."
        )
    return check_lowered(ctx, layer, rule.lower(layer, ctx))  # Arrays fit the native module built.


def _storage_names(variable: Any) -> tuple[str, ...]:
    value = variable.value
    return tuple(value.named_shape) if nx.is_namedarray(value) else ()


def _child_key(path: tuple) -> tuple[str | int, ...]:
    keys: list[str | int] = []
    for entry in path:
        if isinstance(entry, jax.tree_util.GetAttrKey):
            keys.append(entry.name)
        elif isinstance(entry, jax.tree_util.SequenceKey):
            keys.append(entry.idx)
        elif isinstance(entry, jax.tree_util.DictKey):
            keys.append(str(entry.key))
        else:
            keys.append(str(getattr(entry, "key", entry)))
    return tuple(keys)


def _key_text(keys: tuple[str | int, ...]) -> str:
    return "".join(f"[{k}]" if isinstance(k, int) else (f".{k}" if i else k) for i, k in enumerate(keys))


@dataclasses.dataclass(frozen=True, eq=True)
class EquinoxTemplate(ForeignTemplate):
    """An unknown ``eqx.Module`` minus its submodules and arrays.

    Attributes:
      class_name: The original class's qualified name.
      treedef: The module's tree structure, flattened one level.
      leaves: One entry per flattened leaf: a child key (``str``) where a
        lifted child goes, else the original non-array leaf itself.
      call_kwargs: Names of keyword arguments the original ``__call__`` accepts
        (side inputs with these names are forwarded).
      accepts_any_kwargs: The original ``__call__`` takes ``**kwargs``.
      input_names: Named axes of the input that are the module's own trailing
        positional axes (e.g. ``("features",)`` between two Linears); all other
        named axes are batch axes, vectorised over.
      output_names: Names given to the output's trailing positional axes.
      child_calls: ``(key, class, convention)`` per submodule child: the
        class whose ``__call__`` the original code calls there, and that
        class's calling convention (None where unknown, e.g. a ``Foreign``).
        A child edited into something not callable the same way lowers to an
        adapter called like the original child (see :meth:`rebuild`).
    """

    class_name: str
    treedef: Any
    leaves: tuple[Any, ...]
    child_positions: tuple[int, ...]
    call_kwargs: frozenset[str]
    accepts_any_kwargs: bool
    input_names: tuple[str, ...] = ()
    output_names: tuple[str, ...] = ()
    child_calls: tuple[tuple[str, type, CallingConvention | None], ...] = ()

    def rebuild(self, children: Mapping[str, Any], ctx: LowerContext | None = None) -> Any:
        """The original module with ``children`` lowered into place.

        The original code calls each child the way the original child was
        called (``self.attn(x, x, x, mask=m)``), so a child whose lowering
        cannot be called like that (an inserted intervention makes
        ``Sequential([attention, ablation])``, and ``eqx.nn.Sequential`` takes
        one input and passes ``key`` to every layer) is lowered as a
        :class:`~pzbridge.bridge.equinox.signatures.StandIn` instead: an
        adapter that accepts exactly the original child's arguments. A
        lowering that accepts the original's calls (the original class,
        ``LoRALinear`` for a ``Linear``, ``eqx.nn.Sequential`` for an ``MLP``)
        is kept (see :mod:`pzbridge.bridge.equinox.signatures`).
        """
        ctx = ctx or new_lower_context()
        calls = {key: (cls, convention) for key, cls, convention in self.child_calls}
        leaves = list(self.leaves)
        for position in self.child_positions:
            key = leaves[position]
            lowered = ctx.lower(children[key], key)
            if key in calls and not callable_like(lowered, calls[key][0]):
                lowered = ctx.lower(StandIn(children[key], *calls[key]), key)
            leaves[position] = lowered
        return jax.tree_util.tree_unflatten(self.treedef, leaves)

    def invoke(self, module: Any, x: Any, side_inputs: Mapping[str, Any], children: Mapping[str, Any]) -> Any:
        kwargs = {k: v for k, v in side_inputs.items() if self.accepts_any_kwargs or k in self.call_kwargs}
        args = x if isinstance(x, tuple) else (x,)
        args = tuple(_consume_names(arg, self.input_names) for arg in args)
        # Equinox modules act on unbatched arrays: every other named axis is a batch axis. State the
        # adapters inside write (capture savers) comes back out of the vmap and into the lifted variables.
        out, state = call_collecting_state(lambda *a: module(*a, **kwargs), args, self.class_name)
        write_state(children, state)
        if not self.output_names:
            return out
        return jax.tree_util.tree_map(
            lambda leaf: name_trailing_axes(leaf, self.output_names) if nx.is_namedarray(leaf) else leaf,
            out, is_leaf=nx.is_namedarray,
        )


def _call_site(module: eqx.Module, lifted: Any, naming: AxisNaming) -> tuple[type, CallingConvention | None]:
    """The class whose call a child's position expects, and that class's calling convention."""
    rule = EQUINOX.lift_rule_for(type(module))
    cls = rule.calls_like(module) if hasattr(rule, "calls_like") else type(module)
    if isinstance(lifted, Foreign):
        return cls, None  # A Foreign child takes its arguments unnamed.
    own = getattr(lifted, "convention", None)  # A traced child knows its own convention.
    return cls, own if isinstance(own, CallingConvention) else EQUINOX.convention_of(module, naming)


def _consume_names(arg: Any, names: tuple[str, ...]) -> Any:
    if not (names and nx.is_namedarray(arg)):
        return arg
    present = [name for name in names if name in arg.named_shape]
    return arg.untag(*present) if present else arg


def with_names(foreign: Foreign, input_names: tuple[str, ...], output_names: tuple[str, ...]) -> Foreign:
    """The same ``Foreign`` treating ``input_names`` as the module's own axes (see :class:`EquinoxTemplate`).

    Used where the surrounding layers tell what the module's axes are called,
    e.g. an unknown module between two ``Linear``s in an ``eqx.nn.Sequential``.

    Example:
        >>> class Id(eqx.Module):
        ...     def __call__(self, x): return x
        >>> with_names(lift_foreign(Id(), new_lift_context()), ("features",), ("features",)).template.input_names
        ('features',)
    """
    template = foreign.template
    if not isinstance(template, EquinoxTemplate):
        return foreign
    return Foreign(foreign.children, dataclasses.replace(template, input_names=tuple(input_names),
                                                         output_names=tuple(output_names)))


def _call_signature(cls: type) -> tuple[frozenset[str], bool]:
    try:
        params = inspect.signature(cls.__call__).parameters.values()
    except (TypeError, ValueError):
        return frozenset(), True
    names = frozenset(p.name for p in params if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD))
    return names - {"self"}, any(p.kind is p.VAR_KEYWORD for p in params)


def lift_foreign(module: eqx.Module, ctx: LiftContext) -> Foreign:
    """Lifts an ``eqx.Module`` with no rule: children lifted, the rest kept as a template.

    Submodules are lifted (recursively, by their own rules); arrays become
    :class:`~pzbridge.Parameter` objects holding the very same buffers
    (shared arrays become one shared Parameter); everything else (functions,
    flags, floats) stays in the template exactly as it was.

    Example:
        >>> class Scale(eqx.Module):
        ...     w: jax.Array
        ...     def __call__(self, x): return self.w * x
        >>> lifted = lift_foreign(Scale(jax.numpy.ones(2)), new_lift_context())
        >>> lifted.children["w"].label
        'w'
    """
    is_submodule = lambda value: value is not module and isinstance(value, eqx.Module)  # noqa: E731
    flat, treedef = jax.tree_util.tree_flatten_with_path(module, is_leaf=is_submodule)
    leaves: list[Any] = []
    children: dict[str, Any] = {}
    positions: list[int] = []
    calls: list[tuple[str, type, CallingConvention | None]] = []
    for index, (path, leaf) in enumerate(flat):
        keys = _child_key(path)
        name = _key_text(keys)
        if isinstance(leaf, eqx.Module):
            child = ctx.lift(leaf, *keys)
            calls.append((name, *_call_site(leaf, child, ctx.naming)))
        elif is_array(leaf):
            child = ctx.child(*keys).raw_parameter(leaf)
        else:
            leaves.append(leaf)
            continue
        children[name] = child
        positions.append(index)
        leaves.append(name)
    call_kwargs, any_kwargs = _call_signature(type(module))
    template = EquinoxTemplate(
        class_name=type(module).__qualname__,
        treedef=treedef,
        leaves=tuple(leaves),
        child_positions=tuple(positions),
        call_kwargs=call_kwargs,
        accepts_any_kwargs=any_kwargs,
        child_calls=tuple(calls),
    )
    return Foreign(children, template)


@equinox_rule(lifted=(Foreign,))
class ForeignRule:
    """A ``Foreign`` lowers by rebuilding its original module from its lowered children."""

    def lower(self, layer: Foreign, ctx: LowerContext) -> Any:
        if not isinstance(layer.template, EquinoxTemplate):
            raise LowerError(
                f"{ctx.where}: a Foreign {layer.template.class_name} lifted from another framework cannot be "
                "lowered to Equinox: its code is that framework's. Fix: lower it to its own framework, or "
                "replace it with pzbridge layers first."
            )
        return layer.template.rebuild(layer.children, ctx)


def new_module(cls: type, **fields: Any) -> Any:
    """Builds an Equinox module from its field values without running ``__init__``.

    ``__init__`` of built-in layers draws random weights (slow for big models
    and needing a key); the fields fully determine the module.

    Example:
        >>> new_module(eqx.nn.Identity)
        Identity()
    """
    module = object.__new__(cls)
    for name, value in fields.items():
        object.__setattr__(module, name, value)
    return module


def origin_of(module: eqx.Module) -> EqxOrigin:
    """The class and static fields of ``module`` (what lowering needs to rebuild it exactly).

    Example:
        >>> origin_of(eqx.nn.Embedding(3, 2, key=jax.random.key(0))).static
        (('num_embeddings', 3), ('embedding_size', 2))
    """
    fields = dataclasses.fields(module)
    static = tuple((f.name, getattr(module, f.name)) for f in fields if f.metadata.get("static", False))
    return EqxOrigin(type(module), static)


def rebuild_from_origin(origin: EqxOrigin | None, default_cls: type, **fields: Any) -> Any:
    """``new_module`` of the original class with its static fields, overridden by ``fields``.

    Example:
        >>> rebuild_from_origin(None, eqx.nn.Identity)
        Identity()
    """
    if origin is None:
        return new_module(default_cls, **fields)
    return new_module(origin.cls, **{**dict(origin.static), **fields})


def is_slot(value: Any) -> bool:
    """True for an unbound variable slot.

    Example:
        >>> from pzbridge.core.variables import ParameterSlot
        >>> is_slot(ParameterSlot("w"))
        True
    """
    return isinstance(value, AbstractVariableSlot)


@dataclasses.dataclass(frozen=True)
class EqxOrigin:
    """The Equinox class and static fields a layer was lifted from (static metadata).

    Lowering an untouched layer rebuilds exactly this class with exactly these
    static fields, so ``lower(lift(m))`` has ``m``'s tree structure. Values
    must be hashable (Equinox static fields are).

    Attributes:
      cls: The original ``eqx.Module`` subclass.
      static: ``((field_name, value), ...)`` of the original's static fields.

    Example:
        >>> origin = EqxOrigin(int, (("depth", 2),))
        >>> origin.get("depth"), origin.get("missing", 7)
        (2, 7)
    """

    cls: type
    static: tuple[tuple[str, Any], ...] = ()

    def get(self, name: str, default: Any = None) -> Any:
        """The static field ``name`` of the original, or ``default``."""
        return dict(self.static).get(name, default)
