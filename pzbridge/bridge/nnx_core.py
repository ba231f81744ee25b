"""The Flax NNX traversal: dispatch, variables, ``Foreign`` templates and adapters.

Rules for individual ``nnx`` layers live in :mod:`pzbridge.bridge.nnx`; this
module holds the machinery they share. NNX differs from Equinox in two ways
that shape everything here (see ``shared/FRAMEWORK_FACTS.md``):

- **Modules are mutable graphs.** ``nnx.split`` / ``nnx.merge`` hand out the
  module's own Variable objects, so anything built from them aliases the
  user's model. Lifting therefore only *reads* (raw Variable values, attribute
  dicts) and lowering always builds new modules with new Variables
  (``Variable.from_metadata``, exactly what ``nnx.merge`` uses), holding the
  very same immutable jax arrays.
- **Sharing is by object identity.** One ``nnx.Variable`` reached twice
  becomes one :class:`~pzbridge.Parameter` / :class:`~pzbridge.StateVariable`
  (the lift context keys on the Variable object); one submodule reached twice
  becomes one lifted object; lowering caches by the lifted object, so
  ``nnx.find_duplicates`` of the lowered model matches the original.

Variable mapping: ``nnx.Param`` and its subclasses become ``Parameter``;
every other Variable type (``BatchStat``, ``Cache``, ``RngKey``/``RngCount``,
``Intermediate`` ...) becomes ``StateVariable``. The pzbridge variable's
metadata keeps the NNX metadata (``out_sharding``, ``eager_sharding`` ...)
plus the Variable class under :data:`NNX_TYPE`, so lowering recreates the same
Variable type with the same metadata. A plain ``jax.Array`` attribute (data,
but not a Variable: NNX never trains it with ``wrt=nnx.Param``) becomes a
``StateVariable`` marked ``NNX_TYPE: "array"`` and lowers back to a plain array.

An unknown module becomes ``Foreign`` with an :class:`NnxTemplate`: its class,
its static attributes (shared by reference, as ``nnx.merge`` does) and where
each lifted child goes. Calling it rebuilds a *new* module, calls it on the
named axes moved to leading positional dims, and writes NNX's in-place state
updates (batch statistics, RNG counts, caches) back into the lifted
``StateVariable`` objects.

Example:
    >>> import jax, jax.numpy as jnp
    >>> from flax import nnx
    >>> class Scale(nnx.Module):
    ...     def __init__(self): self.w = nnx.Param(jnp.full(3, 2.0))
    ...     def __call__(self, x): return x * self.w[...]
    >>> m = Scale()
    >>> lifted = lift_node(m, new_lift_context())
    >>> type(lifted).__name__, lifted.children["w"].label
    ('Foreign', 'w')
    >>> lowered = lower_node(lifted, new_lower_context())
    >>> lowered is m, lowered.w is m.w, lowered.w.get_raw_value() is m.w.get_raw_value()
    (False, False, True)
"""

from __future__ import annotations

import dataclasses
import inspect
import weakref
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx
from flax.nnx import graphlib
from flax.nnx.pytreelib import PytreeState

from pzbridge.bridge.context import LiftContext, LowerContext
from pzbridge.bridge.lifted import CallingConvention
from pzbridge.bridge.naming import AxisNaming
from pzbridge.bridge.nnx_layers import call_batched
from pzbridge.bridge.registry import RuleRegistry
from pzbridge.core import named_axes as nx
from pzbridge.core.errors import LiftError
from pzbridge.core.variable_base import AbstractVariable
from pzbridge.core.variables import (
    AbstractVariableValue,
    Parameter,
    ParameterValue,
    StateVariable,
    StateVariableValue,
    bind_variables,
    stateless_call,
    unbind_variables,
)
from pzbridge.nn.foreign import Foreign, ForeignTemplate

NNX = RuleRegistry("nnx")
"""The NNX rule table; register rules for your own classes with :func:`nnx_rule`."""

nnx_rule = NNX.rule

NNX_TYPE = "nnx_type"
"""Metadata key holding the NNX Variable class (or ``"array"`` for a plain array attribute)."""

PLAIN_ARRAY = "array"

_STATE_ATTR = "_pytree__state"


def new_lift_context(naming: AxisNaming | None = None, strict: bool = False) -> LiftContext:
    """A fresh context for lifting one NNX model.

    Example:
        >>> new_lift_context().framework
        'nnx'
    """
    return LiftContext(framework="nnx", lift_node=lift_node, naming=naming or AxisNaming(), strict=strict)


def new_lower_context() -> LowerContext:
    """A fresh context for lowering one model to NNX.

    Example:
        >>> new_lower_context().framework
        'nnx'
    """
    return LowerContext(framework="nnx", lower_node=lower_node)


def is_array(value: Any) -> bool:
    """True for JAX / NumPy arrays (plain data attributes of NNX modules).

    Example:
        >>> is_array(np.zeros(2)), is_array(nnx.Param(np.zeros(2)))
        (True, False)
    """
    return isinstance(value, (jax.Array, np.ndarray, jax.ShapeDtypeStruct))


# --------------------------------------------------------------------------- dispatch


def lift_node(module: Any, ctx: LiftContext) -> Any:
    """Lifts one NNX module: its rule, else ``Foreign`` (or an error if strict).

    The same module object reached twice lifts to the same lifted object.

    Args:
      module: An ``nnx.Module``.
      ctx: The traversal context (path, naming, sharing).

    Returns:
      The lifted layer.

    Raises:
      LiftError: If ``module`` is not an ``nnx.Module``, or has no rule and
        ``ctx.strict`` is set.

    Example:
        >>> lin = nnx.Linear(2, 3, rngs=nnx.Rngs(0))
        >>> type(lift_node(lin, new_lift_context())).__name__
        'NnxLinear'
    """
    key = ("nnx-module", id(module))
    done = ctx.shared.by_identity.get(key)
    if done is not None:
        return done
    rule = NNX.lift_rule_for(type(module))
    if rule is not None:
        lifted = rule.lift(module, ctx)
    elif not isinstance(module, nnx.Pytree):
        raise LiftError(
            f"{ctx.where}: expected an nnx.Module, found {type(module).__module__}.{type(module).__qualname__}. "
            "Fix: pass a Flax NNX module (or an eqx.Module to lift from Equinox)."
        )
    elif ctx.strict:
        cls = type(module)
        raise LiftError(
            f"{ctx.where}: no NNX lifting rule for {cls.__module__}.{cls.__qualname__} and strict=True. "
            "Fix: register one with `@pzbridge.bridge.nnx_core.nnx_rule(source=YourClass, lifted=(YourLayer,))` "
            "(a class with lift(module, ctx) and lower(layer, ctx)), or lift with strict=False to keep it "
            "as a Foreign layer."
        )
    else:
        lifted = lift_foreign(module, ctx)
    ctx.shared.by_identity[key] = lifted
    ctx.shared.keep_alive.append(module)
    return lifted


def lower_node(layer: Any, ctx: LowerContext) -> Any:
    """Lowers one lifted layer to NNX: its rule, else an :class:`NnxAdapter`.

    The same lifted object reached twice lowers to the same module object
    (so shared submodules stay shared); a variable lowers to one NNX Variable.

    Args:
      layer: A lifted layer, or a variable / frozen value held by a ``Foreign``.
      ctx: The traversal context.

    Returns:
      An ``nnx.Module`` (an ``nnx.Variable`` or array for a variable).

    Example:
        >>> import pzbridge as pzb
        >>> type(lower_node(pzb.nn.Elementwise(jax.nn.relu), new_lower_context())).__name__
        'NnxAdapter'
    """
    if isinstance(layer, (AbstractVariable, AbstractVariableValue)):
        return nnx_variable(layer, ctx)
    return ctx.cached(layer, lambda: _lower_uncached(layer, ctx))


def _lower_uncached(layer: Any, ctx: LowerContext) -> Any:
    rule = NNX.lower_rule_for(type(layer))
    if rule is not None:
        return rule.lower(layer, ctx)
    return NnxAdapter.wrap(layer, ctx)


# --------------------------------------------------------------------------- variables


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


def storage_names(variable: Any) -> tuple[str, ...]:
    """The axis names of a variable's NamedArray value in storage order (``()`` for raw values).

    Example:
        >>> from pzbridge.core.variables import Parameter
        >>> storage_names(Parameter(nx.wrap(np.ones((2, 3)), "a", "b"), "p"))
        ('a', 'b')
    """
    value = getattr(variable, "value", None)
    return tuple(value.named_shape) if nx.is_namedarray(value) and not value.positional_shape else ()


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
        >>> v = nnx_variable(p, new_lower_context(), ("b", "a"))
        >>> type(v).__name__, v.shape
        ('Param', (3, 2))
    """
    names = storage_names(variable) if axis_names is None else tuple(axis_names)
    array = ctx.array(variable, names)

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
        return made

    return ctx.cached(variable, make)


def write_back(pairs: Sequence[tuple[Any, Any, tuple[str, ...]]]) -> None:
    """Copies updated NNX Variable values into the lifted ``StateVariable`` objects.

    Example:
        >>> s = StateVariable(np.zeros(2), "n")
        >>> v = nnx.BatchStat(np.zeros(2))
        >>> v.set_value(np.ones(2))
        >>> write_back([(s, v, ())]); s.value.tolist()
        [1.0, 1.0]
    """
    for lifted, lowered, names in pairs:
        new = lowered.get_raw_value() if isinstance(lowered, nnx.Variable) else lowered
        old = lifted.value
        if new is old or (nx.is_namedarray(old) and new is getattr(old, "data_array", None)):
            continue
        lifted.value = nx.wrap(new, *names) if names else new


# --------------------------------------------------------------------------- building modules


@dataclasses.dataclass(frozen=True)
class NnxStatics:
    """A module's non-data attributes (config), hashable for use as static tree metadata.

    Attributes:
      items: ``(name, value)`` pairs in the module's attribute order; values
        are shared by reference, as ``nnx.merge`` shares a graphdef's statics.
      order: Every attribute name (data and static) in the original order.
      flags: The module's ``PytreeState`` flags ``(initializing, is_setup)``.

    Example:
        >>> s = NnxStatics.of(nnx.Linear(2, 3, rngs=nnx.Rngs(0)))
        >>> s["in_features"], s["out_features"]
        (2, 3)
    """

    items: tuple[tuple[str, Any], ...]
    order: tuple[str, ...]
    flags: tuple[bool, bool] = (False, False)

    @classmethod
    def of(cls, module: Any) -> NnxStatics:
        """The statics of ``module`` (everything not classified as data)."""
        data = set(data_attributes(module))
        attrs = vars(module)
        state = attrs.get(_STATE_ATTR)
        flags = (state.initializing, state.is_setup) if isinstance(state, PytreeState) else (False, False)
        items = tuple((k, v) for k, v in attrs.items() if k not in data and k != _STATE_ATTR)
        return cls(items, tuple(attrs), flags)

    def replace(self, **updates: Any) -> NnxStatics:
        """The same statics with some values replaced (e.g. an edited ``epsilon``).

        Example:
            >>> s = NnxStatics.of(nnx.Linear(2, 3, rngs=nnx.Rngs(0)))
            >>> s.replace(out_features=7)["out_features"], s["out_features"]
            (7, 3)
        """
        items = tuple((k, updates.get(k, v)) for k, v in self.items)
        return dataclasses.replace(self, items=items)

    def __getitem__(self, name: str) -> Any:
        for key, value in self.items:
            if key == name:
                return value
        raise KeyError(name)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, NnxStatics):
            return NotImplemented
        return self.order == other.order and self.flags == other.flags and _items_equal(self.items, other.items)

    def __hash__(self) -> int:
        return hash((self.order, self.flags))


def _items_equal(a: tuple, b: tuple) -> bool:
    if len(a) != len(b):
        return False
    for (ka, va), (kb, vb) in zip(a, b):
        if ka != kb:
            return False
        try:
            if va is not vb and not bool(va == vb):
                return False
        except Exception:  # noqa: BLE001 - incomparable statics count as different
            return False
    return True


def data_attributes(module: Any) -> list[str]:
    """Names of ``module``'s data attributes (Variables, submodules, arrays), as NNX classifies them.

    Example:
        >>> sorted(data_attributes(nnx.Linear(2, 3, rngs=nnx.Rngs(0))))
        ['bias', 'kernel']
    """
    nodes = vars(module).get("_pytree__nodes")
    names = []
    for name, value in vars(module).items():
        if name == _STATE_ATTR:
            continue
        if nodes is not None and getattr(module, "_pytree__is_pytree", True):
            if nodes.get(name, False):
                names.append(name)
        elif isinstance(value, nnx.Variable) or graphlib.is_node(value) or is_array(value):
            names.append(name)
    return names


def build_module(cls: type, statics: NnxStatics, data: Mapping[str, Any]) -> Any:
    """Creates a module of class ``cls`` from its statics and data without running ``__init__``.

    ``__init__`` of NNX layers draws random weights; the attributes fully
    determine the module, and this is how ``nnx.merge`` builds modules too.

    Args:
      cls: The module class.
      statics: Its static attributes and attribute order.
      data: Its data attributes (Variables, submodules, arrays, containers).

    Returns:
      A new module.

    Example:
        >>> lin = nnx.Linear(2, 3, rngs=nnx.Rngs(0))
        >>> new = build_module(nnx.Linear, NnxStatics.of(lin), {"kernel": lin.kernel, "bias": lin.bias})
        >>> nnx.graphdef(new) == nnx.graphdef(lin)
        True
    """
    module = object.__new__(cls)
    values = {**dict(statics.items), **dict(data)}
    attrs = vars(module)
    for name in statics.order:
        if name == _STATE_ATTR:
            attrs[name] = PytreeState(*statics.flags)
        elif name in values:
            attrs[name] = values.pop(name)
    attrs.update(values)
    return module


def fresh_statics(make: Callable[[], Any]) -> NnxStatics:
    """Statics of a module built by ``make`` abstractly (no arrays are computed).

    Used when lowering a pzbridge layer that did not come from NNX (a new or
    cross-framework layer) to a native NNX class.

    Example:
        >>> fresh_statics(lambda: nnx.Linear(4, 5, rngs=nnx.Rngs(0)))["out_features"]
        5
    """
    return NnxStatics.of(nnx.eval_shape(make))


# --------------------------------------------------------------------------- Foreign


@dataclasses.dataclass(frozen=True)
class ChildRef:
    """Marks, in a template, where a lifted child goes (its key in ``Foreign.children``).

    Example:
        >>> ChildRef("layers[0]").key
        'layers[0]'
    """

    key: str


@dataclasses.dataclass(frozen=True)
class _DataAttr:
    treedef: Any
    leaves: tuple[Any, ...]


def _is_stop(value: Any) -> bool:
    # Variables and graph nodes (modules, Rngs streams: any nnx.Pytree) are children, not containers.
    return isinstance(value, (nnx.Variable, nnx.Pytree))


def _child_text(name: str, path: tuple) -> str:
    text = name
    for entry in path:
        key = getattr(entry, "idx", getattr(entry, "key", getattr(entry, "name", entry)))
        text += f"[{key}]" if isinstance(key, int) else f".{key}"
    return text


def _path_keys(path: tuple) -> tuple[str | int, ...]:
    return tuple(getattr(e, "idx", getattr(e, "key", getattr(e, "name", e))) for e in path)


@dataclasses.dataclass(frozen=True)
class NnxTemplate(ForeignTemplate):
    """An unknown ``nnx.Module`` minus its children: how to rebuild and call it.

    Attributes:
      class_name: The original class's qualified name.
      node_type: The original class.
      statics: Its static attributes (:class:`NnxStatics`).
      data: ``(name, treedef, leaves)`` per data attribute; a leaf is a
        :class:`ChildRef` where a lifted child goes, else the original value.
      call_kwargs: Keyword arguments ``__call__`` accepts (side inputs forwarded).
      accepts_any_kwargs: ``__call__`` takes ``**kwargs``.
      input_names: Named axes moved to the *trailing* positional dims of the
        input, in this order (the axes the module consumes, e.g. ``features``);
        all other named axes are batch-like and move to leading dims.
      output_names: Names given to the output's trailing dims.
    """

    class_name: str
    node_type: type
    statics: NnxStatics
    data: tuple[tuple[str, Any, tuple[Any, ...]], ...]
    call_kwargs: frozenset[str] = frozenset()
    accepts_any_kwargs: bool = False
    input_names: tuple[str, ...] = ()
    output_names: tuple[str, ...] = ()

    def __hash__(self) -> int:
        return hash((self.class_name, self.node_type, self.statics, self.input_names, self.output_names))

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, NnxTemplate):
            return NotImplemented
        return (
            (self.class_name, self.node_type, self.statics, self.call_kwargs, self.accepts_any_kwargs,
             self.input_names, self.output_names)
            == (other.class_name, other.node_type, other.statics, other.call_kwargs, other.accepts_any_kwargs,
                other.input_names, other.output_names)
            and len(self.data) == len(other.data)
            and all(a[0] == b[0] and a[1] == b[1] and _items_equal(tuple(enumerate(a[2])), tuple(enumerate(b[2])))
                    for a, b in zip(self.data, other.data))
        )

    def rebuild(self, children: Mapping[str, Any], ctx: LowerContext | None = None) -> Any:
        """A *new* module of the original class with ``children`` lowered into place.

        Without ``ctx`` (a ``Foreign`` being called) a fresh lowering is made and
        its state Variables are remembered so :meth:`invoke` can write NNX's
        in-place updates back.
        """
        top = ctx is None
        ctx = ctx or new_lower_context()
        data = {}
        for name, treedef, leaves in self.data:
            lowered = [ctx.lower(children[leaf.key], leaf.key) if isinstance(leaf, ChildRef) else leaf
                       for leaf in leaves]
            data[name] = jax.tree_util.tree_unflatten(treedef, lowered)
        module = build_module(self.node_type, self.statics, data)
        if top:
            _PENDING_WRITEBACK[module] = tuple(ctx.shared.extras.get("nnx_state_pairs", ()))
        return module

    def invoke(self, module: Any, x: Any, side_inputs: Mapping[str, Any], children: Mapping[str, Any]) -> Any:
        kwargs = {k: v for k, v in side_inputs.items() if self.accepts_any_kwargs or k in self.call_kwargs}
        pairs = _PENDING_WRITEBACK.pop(module, ())
        out = call_batched(module, x, kwargs, self.input_names, self.output_names)
        write_back(pairs)
        return out


_PENDING_WRITEBACK: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _call_signature(cls: type) -> tuple[frozenset[str], bool]:
    try:
        params = inspect.signature(cls.__call__).parameters.values()
    except (TypeError, ValueError, AttributeError):
        return frozenset(), True
    names = frozenset(p.name for p in params if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD))
    return names - {"self"}, any(p.kind is p.VAR_KEYWORD for p in params)


def lift_child(value: Any, ctx: LiftContext) -> Any:
    """Lifts one data leaf of a module: a submodule, a Variable or a plain array.

    Example:
        >>> lift_child(nnx.BatchStat(np.zeros(2)), new_lift_context().child("mean")).label
        'mean'
    """
    if isinstance(value, nnx.Variable) or is_array(value):
        return lift_variable(value, ctx)
    return ctx.lift_node(value, ctx)


def lift_foreign(module: Any, ctx: LiftContext) -> Foreign:
    """Lifts an ``nnx.Module`` with no rule: children lifted, the rest kept as a template.

    Data attributes are flattened (stopping at submodules and Variables):
    submodules are lifted by their own rules, Variables and plain arrays
    become pzbridge variables holding the very same buffers, and any other
    data leaf (``None``, ints inside ``nnx.data`` lists) stays in the
    template. Static attributes stay in the template by reference.

    Example:
        >>> class Block(nnx.Module):
        ...     def __init__(self):
        ...         self.inner = nnx.Linear(2, 2, rngs=nnx.Rngs(0))
        ...         self.extra = nnx.data([nnx.Linear(2, 2, rngs=nnx.Rngs(1))])
        ...     def __call__(self, x): return self.extra[0](self.inner(x))
        >>> sorted(lift_foreign(Block(), new_lift_context()).children)
        ['extra[0]', 'inner']
    """
    children: dict[str, Any] = {}
    data: list[tuple[str, Any, tuple[Any, ...]]] = []
    for name in data_attributes(module):
        flat, treedef = jax.tree_util.tree_flatten_with_path(vars(module)[name], is_leaf=_is_stop)
        leaves: list[Any] = []
        for path, leaf in flat:
            if _is_stop(leaf) or is_array(leaf):
                key = _child_text(name, path)
                children[key] = lift_child(leaf, ctx.child(name, *_path_keys(path)))
                leaves.append(ChildRef(key))
            else:
                leaves.append(leaf)
        data.append((name, treedef, tuple(leaves)))
    call_kwargs, any_kwargs = _call_signature(type(module))
    template = NnxTemplate(
        class_name=type(module).__qualname__,
        node_type=type(module),
        statics=NnxStatics.of(module),
        data=tuple(data),
        call_kwargs=call_kwargs,
        accepts_any_kwargs=any_kwargs,
    )
    return Foreign(children, template)


@nnx_rule(lifted=(Foreign,))
class ForeignRule:
    """A ``Foreign`` lowers by rebuilding a new module of its original class from its lowered children."""

    def lower(self, layer: Foreign, ctx: LowerContext) -> Any:
        from pzbridge.core.errors import LowerError

        if not isinstance(layer.template, NnxTemplate):
            raise LowerError(
                f"{ctx.where}: a Foreign {layer.template.class_name} lifted from another framework cannot be "
                "lowered to NNX: its code is that framework's. Fix: lower it to its own framework, or "
                "replace it with pzbridge layers first."
            )
        return layer.template.rebuild(layer.children, ctx)


def with_names(foreign: Foreign, input_names: Sequence[str], output_names: Sequence[str]) -> Foreign:
    """The same ``Foreign`` whose calls treat ``input_names`` as consumed axes (see :func:`call_batched`).

    Example:
        >>> class Id(nnx.Module):
        ...     def __call__(self, x): return x
        >>> f = with_names(lift_foreign(Id(), new_lift_context()), ("features",), ("features",))
        >>> f.template.input_names
        ('features',)
    """
    template = foreign.template
    if not isinstance(template, NnxTemplate):
        return foreign
    names = (tuple(input_names), tuple(output_names))
    if (template.input_names, template.output_names) == names:
        return foreign
    return Foreign(foreign.children, dataclasses.replace(template, input_names=names[0], output_names=names[1]))


# --------------------------------------------------------------------------- adapter


@dataclasses.dataclass(frozen=True)
class VariableSpec:
    """How an adapter's NNX Variable maps back to a pzbridge variable.

    Attributes:
      label: The pzbridge label.
      kind: ``"Parameter"`` or ``"StateVariable"``.
      names: Axis names of the value in storage order (``()`` for raw values).
      metadata: The pzbridge metadata (as ``(key, value)`` pairs).

    Example:
        >>> VariableSpec("w", "Parameter", ("features",), ()).label
        'w'
    """

    label: str
    kind: str
    names: tuple[str, ...]
    metadata: tuple[tuple[Any, Any], ...]

    def __hash__(self) -> int:
        return hash((self.label, self.kind, self.names))


class NnxAdapter(nnx.Module):
    """A genuine ``nnx.Module`` running a pzbridge layer with no NNX counterpart.

    Its arrays are NNX Variables (``nnx.Param`` for parameters, so
    ``nnx.Optimizer(model, tx, wrt=nnx.Param)`` trains them); the layer with
    unbound slots is a static attribute. Calling it names the positional
    inputs by ``convention`` (default: the last axis is ``features``, leading
    axes stay positional), runs the layer with ``stateless_call`` and writes
    new state values back into its Variables (so ``nnx.jit`` keeps them).
    Re-lifting an adapter gives back the layer.

    Example:
        >>> import pzbridge as pzb
        >>> adapter = NnxAdapter.wrap(pzb.nn.Elementwise(jax.nn.relu), new_lower_context())
        >>> adapter(jax.numpy.array([[-1.0, 1.0]])).tolist()
        [[0.0, 1.0]]
    """

    def __init__(self, structure: Any, variables: Sequence[nnx.Variable], specs: Sequence[VariableSpec],
                 convention: CallingConvention | None = None) -> None:
        self.structure = nnx.static(structure)
        self.variables = nnx.List(list(variables))
        self.specs = tuple(specs)
        self.convention = convention

    @classmethod
    def wrap(cls, layer: Any, ctx: LowerContext, convention: CallingConvention | None = None) -> NnxAdapter:
        """Lowers ``layer`` into an adapter (its variables become NNX Variables).

        Args:
          layer: A lifted layer with no NNX rule.
          ctx: The lower context (shared variables stay shared).
          convention: How positional inputs are named (default: trailing ``features``).
        """
        structure, variables = unbind_variables(layer)
        lowered, specs = [], []
        for variable in variables:
            kind = type(variable).__name__
            if isinstance(variable, AbstractVariableValue):
                kind = "Parameter" if isinstance(variable, ParameterValue) else "StateVariable"
            lowered.append(nnx_variable(variable, ctx))
            specs.append(VariableSpec(variable.label, kind, storage_names(variable),
                                      tuple(dict(variable.metadata).items())))
        return cls(structure, lowered, specs, convention)

    def frozen_values(self) -> list[AbstractVariableValue]:
        """The variables as pzbridge frozen values (named as the layer expects).

        Example:
            >>> import pzbridge as pzb
            >>> NnxAdapter.wrap(pzb.nn.Identity(), new_lower_context()).frozen_values()
            []
        """
        values = []
        for spec, var in zip(self.specs, self.variables):
            raw = var.get_raw_value() if isinstance(var, nnx.Variable) else var
            value = nx.wrap(raw, *spec.names) if spec.names else raw
            cls = ParameterValue if spec.kind == "Parameter" else StateVariableValue
            values.append(cls(value, spec.label, dict(spec.metadata)))
        return values

    def __call__(self, x: Any, *args: Any, **kwargs: Any) -> Any:
        rank = len(getattr(x, "shape", ()))
        convention = self.convention or CallingConvention((("features",) if rank else (),), ("features",))
        named = convention.name_inputs([x, *args])
        out, new_state = stateless_call(self.structure, self.frozen_values(),
                                        named[0] if len(named) == 1 else tuple(named), **kwargs)
        by_label = {spec.label: var for spec, var in zip(self.specs, self.variables)}
        for value in new_state:
            target = by_label.get(value.label)
            if isinstance(target, nnx.Variable):
                names = next(s.names for s in self.specs if s.label == value.label)
                new = value.value
                target.set_raw_value(new.untag(*names).unwrap() if names and nx.is_namedarray(new) else new)
        return convention.unname_output(out)

    def lifted_layer(self, ctx: LiftContext | None = None) -> Any:
        """The pzbridge layer with mutable variables (shared through ``ctx`` when given).

        Example:
            >>> import pzbridge as pzb
            >>> NnxAdapter.wrap(pzb.nn.Identity(), new_lower_context()).lifted_layer()
            Identity()
        """
        ctx = ctx or new_lift_context()
        fresh = []
        for spec, var, value in zip(self.specs, self.variables, self.frozen_values()):
            kind = Parameter if spec.kind == "Parameter" else StateVariable
            fresh.append(ctx.variable(kind, var, lambda v=value: v.value, spec.label, dict(spec.metadata)))
        return bind_variables(self.structure, fresh) if fresh else self.structure


@nnx_rule(source=NnxAdapter)
class NnxAdapterRule:
    """Re-lifting an adapter gives back the pzbridge layer it ran."""

    def lift(self, module: NnxAdapter, ctx: LiftContext) -> Any:
        return module.lifted_layer(ctx)
