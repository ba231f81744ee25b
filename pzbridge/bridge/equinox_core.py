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
from pzbridge.bridge.equinox_layers import EqxOrigin
from pzbridge.bridge.lifted import CallingConvention, name_trailing_axes
from pzbridge.bridge.naming import AxisNaming
from pzbridge.bridge.registry import RuleRegistry
from pzbridge.core import named_axes as nx
from pzbridge.core.errors import LiftError, LowerError
from pzbridge.core.variable_base import AbstractVariable
from pzbridge.core.variables import (
    AbstractVariableSlot,
    AbstractVariableValue,
    bind_variables,
    stateless_call,
    unbind_variables,
)
from pzbridge.nn.foreign import Foreign, ForeignTemplate

EQUINOX = RuleRegistry("equinox")
"""The Equinox rule table; register rules for your own classes with :func:`equinox_rule`."""

equinox_rule = EQUINOX.rule


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
        return rule.lift(module, ctx)
    if not isinstance(module, eqx.Module):
        raise LiftError(
            f"{ctx.where}: expected an eqx.Module, found {type(module).__name__}. "
            "Fix: pass an Equinox module (or an nnx.Module to lift from Flax NNX)."
        )
    if ctx.strict:
        cls = type(module)
        raise LiftError(
            f"{ctx.where}: no Equinox lifting rule for {cls.__module__}.{cls.__qualname__} and strict=True. "
            "Fix: register one with `@pzbridge.bridge.equinox_rule(source=YourClass, lifted=(YourLayer,))` "
            "(a class with lift(module, ctx) and lower(layer, ctx)), or lift with strict=False to keep it "
            "as a Foreign layer."
        )
    return lift_foreign(module, ctx)


def lower_node(layer: Any, ctx: LowerContext) -> Any:
    """Lowers one lifted layer to Equinox: its rule, else an :class:`EquinoxAdapter`.

    Args:
      layer: A lifted layer (or a variable / array held by a ``Foreign``).
      ctx: The traversal context.

    Returns:
      An ``eqx.Module`` (or an array for a variable).
    """
    if isinstance(layer, (AbstractVariable, AbstractVariableValue)):
        return ctx.array(layer, _storage_names(layer))
    rule = EQUINOX.lower_rule_for(type(layer))
    if rule is not None:
        return rule.lower(layer, ctx)
    return EquinoxAdapter.wrap(layer, ctx)


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
    """

    class_name: str
    treedef: Any
    leaves: tuple[Any, ...]
    child_positions: tuple[int, ...]
    call_kwargs: frozenset[str]
    accepts_any_kwargs: bool
    input_names: tuple[str, ...] = ()
    output_names: tuple[str, ...] = ()

    def rebuild(self, children: Mapping[str, Any], ctx: LowerContext | None = None) -> Any:
        ctx = ctx or new_lower_context()
        leaves = list(self.leaves)
        for position in self.child_positions:
            key = leaves[position]
            leaves[position] = ctx.lower(children[key], key)
        return jax.tree_util.tree_unflatten(self.treedef, leaves)

    def invoke(self, module: Any, x: Any, side_inputs: Mapping[str, Any], children: Mapping[str, Any]) -> Any:
        kwargs = {k: v for k, v in side_inputs.items() if self.accepts_any_kwargs or k in self.call_kwargs}
        args = x if isinstance(x, tuple) else (x,)
        args = tuple(_consume_names(arg, self.input_names) for arg in args)
        # Equinox modules act on unbatched arrays: every other named axis is a batch axis.
        out = nx.nmap(lambda *a: module(*a, **kwargs))(*args)
        if not self.output_names:
            return out
        return jax.tree_util.tree_map(
            lambda leaf: name_trailing_axes(leaf, self.output_names) if nx.is_namedarray(leaf) else leaf,
            out, is_leaf=nx.is_namedarray,
        )


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
    for index, (path, leaf) in enumerate(flat):
        keys = _child_key(path)
        if isinstance(leaf, eqx.Module):
            child = ctx.lift(leaf, *keys)
        elif is_array(leaf):
            child = ctx.child(*keys).raw_parameter(leaf)
        else:
            leaves.append(leaf)
            continue
        name = _key_text(keys)
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
    )
    return Foreign(children, template)


class EquinoxAdapter(eqx.Module):
    """A genuine ``eqx.Module`` running a pzbridge layer that has no Equinox counterpart.

    The layer's variables are stored as frozen values (pytrees of arrays:
    ordinary Equinox leaves, so gradients and optimizers reach them); the
    layer's structure with slots is a static field. Positional inputs are
    named by ``convention``; the output is returned positional.

    Example:
        >>> import pzbridge as pzb
        >>> adapter = EquinoxAdapter.wrap(pzb.nn.Elementwise(jax.nn.relu), new_lower_context())
        >>> adapter(jax.numpy.array([-1.0, 1.0])).tolist()
        [0.0, 1.0]
    """

    values: tuple[AbstractVariableValue, ...]
    arrays: Any
    structure: Any = eqx.field(static=True)
    convention: CallingConvention = eqx.field(static=True)

    @classmethod
    def wrap(cls, layer: Any, ctx: LowerContext, convention: CallingConvention | None = None) -> EquinoxAdapter:
        """Lowers ``layer`` into an adapter (its variables frozen into leaves).

        Args:
          layer: A lifted layer with no Equinox rule.
          ctx: The lower context.
          convention: How positional inputs are named; defaults to
            ``(..., "seq", "features")``-style trailing names by rank at call time.
        """
        structure, values = unbind_variables(layer, freeze=True)
        # Arrays held directly by the layer (not in variables) must be leaves, not static data.
        arrays, structure = eqx.partition(structure, is_array)
        return cls(tuple(values), arrays, structure, convention or CallingConvention())

    def _layer_with_slots(self) -> Any:
        return eqx.combine(self.arrays, self.structure)

    def __call__(self, x: Any, *args: Any, key: Any = None, **kwargs: Any) -> Any:
        convention = self.convention if self.convention.inputs else _default_convention(x)
        named = convention.name_inputs([x, *args])
        side = dict(kwargs)
        if key is not None:
            side["key"] = key
        out, _ = stateless_call(self._layer_with_slots(), self.values, named[0] if len(named) == 1 else tuple(named),
                                **side)
        return convention.unname_output(out)

    def lifted_layer(self) -> Any:
        """The pzbridge layer with fresh mutable variables (used when re-lifting).

        Example:
            >>> import pzbridge as pzb
            >>> EquinoxAdapter.wrap(pzb.nn.Identity(), new_lower_context()).lifted_layer()
            Identity()
        """
        layer = self._layer_with_slots()
        return bind_variables(layer, self.values, unfreeze_as_copy=True) if self.values else layer


def _default_convention(x: Any) -> CallingConvention:
    naming = AxisNaming()
    rank = len(getattr(x, "shape", ()))
    names = (naming.seq, naming.features)[-rank:] if 0 < rank <= 2 else ((naming.features,) if rank else ())
    return CallingConvention((names,), names)


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


@equinox_rule(source=EquinoxAdapter)
class EquinoxAdapterRule:
    """Re-lifting an adapter gives back the pzbridge layer it ran."""

    def lift(self, module: EquinoxAdapter, ctx: LiftContext) -> Any:
        structure, values = module._layer_with_slots(), module.values
        if not values:
            return structure
        fresh = []
        for value in values:
            variable = ctx.variable(
                type(value.unfreeze_as_copy()), value, lambda v=value: v.value, value.label, dict(value.metadata)
            )
            fresh.append(variable)
        return bind_variables(structure, fresh)


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
