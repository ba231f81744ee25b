"""The Flax NNX traversal: dispatch, variables, ``Foreign`` templates and adapters.

Rules for individual ``nnx`` layers live in the family modules of :mod:`pzbridge.bridge.nnx`; this
module holds the machinery they share. NNX differs from Equinox in two ways
that shape everything here (see ``docs/architecture.md``):

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
  ``nnx.find_duplicates`` of the lowered model matches the original. A
  reference back to an ancestor (a cycle, ``child.parent = parent``) becomes
  an :class:`AncestorRef`, which lowering points at the rebuilt ancestor.

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
from flax import nnx

from pzbridge.bridge.context import LiftContext, LowerContext
from pzbridge.bridge.lifted import CallingConvention
from pzbridge.bridge.lower_checks import check_layer, check_lowered
from pzbridge.bridge.naming import AxisNaming
from pzbridge.bridge.nnx.statics import (
    NnxStatics,
    _items_equal,
    build_module,
    data_attributes,
)
from pzbridge.bridge.nnx.variables import (
    is_array,
    lift_variable,
    nnx_variable,
    write_back,
)
from pzbridge.bridge.registry import RuleRegistry
from pzbridge.core import named_axes as nx
from pzbridge.core.errors import LiftError, LowerError
from pzbridge.core.struct import Struct, pytree_dataclass, static_field
from pzbridge.core.variable_base import AbstractVariable
from pzbridge.core.variables import (
    AbstractVariableValue,
)
from pzbridge.nn.foreign import Foreign, ForeignTemplate

NNX = RuleRegistry("nnx")
"""The NNX rule table; register rules for your own classes with :func:`nnx_rule`."""


nnx_rule = NNX.rule

RULES = NNX
"""The framework-neutral name of this framework's table (what :mod:`pzbridge.bridge.api` uses)."""


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


def lift_node(module: Any, ctx: LiftContext) -> Any:
    """Lifts one NNX module: its rule, else the table's unknown-module handler.

    A module without a rule becomes ``Foreign`` (or an error if strict); when
    ``ctx`` carries example inputs it is traced instead (see
    :mod:`pzbridge.bridge.nnx.tracing`). The same module object reached twice
    lifts to the same lifted object; reached again while it is still being
    lifted (a reference cycle), it becomes an :class:`AncestorRef`.

    Args:
      module: An ``nnx.Module``.
      ctx: The traversal context (path, naming, sharing).

    Returns:
      The lifted layer.

    Raises:
      LiftError: If ``module`` is not an ``nnx.Module``, has no rule and
        ``ctx.strict`` is set, or is referenced back to from inside but does
        not lift as ``Foreign``.

    Example:
        >>> lin = nnx.Linear(2, 3, rngs=nnx.Rngs(0))
        >>> type(lift_node(lin, new_lift_context())).__name__
        'NnxLinear'
    """
    key = ("nnx-module", id(module))
    done = ctx.shared.by_identity.get(key)
    if done is not None:
        return done
    lifting = ctx.shared.extras.setdefault(_LIFTING, {})
    if id(module) in lifting:
        return _ancestor_ref(module, ctx)  # Reached again while being lifted: a reference cycle.
    lifting[id(module)] = (module, ctx)  # ctx, not ctx.where: a path's text is O(depth) to build.
    try:
        lifted = _lift_uncached(module, ctx)
    finally:
        del lifting[id(module)]
    lifted = _mark_if_referenced(module, lifted, ctx)
    ctx.shared.by_identity[key] = lifted
    ctx.shared.keep_alive.append(module)
    return lifted


def _lift_uncached(module: Any, ctx: LiftContext) -> Any:
    rule = NNX.lift_rule_for(type(module))
    if rule is not None:
        return NNX.lift_with_rule(rule, module, ctx, lambda lifted: isinstance(lifted, Foreign))
    if not isinstance(module, nnx.Pytree):
        raise LiftError(
            f"{ctx.where}: expected an nnx.Module, found {type(module).__module__}.{type(module).__qualname__}. "
            "Fix: pass a Flax NNX module (or an eqx.Module to lift from Equinox)."
        )
    return NNX.lift_unknown(module, ctx)


_LIFTING = "nnx_lifting"  # extras: id -> (module, its context) of the modules being lifted, outermost first.
_REFERENCED = "nnx_referenced"  # extras: id of an ancestor -> paths of the references back to it.
_BUILDING = "nnx_building"  # lower extras: (class, module or None) per Foreign being rebuilt, outermost first.


def foreign_or_error(module: Any, ctx: LiftContext, reason: str = "") -> Foreign:
    """Lifts a module without a rule as ``Foreign``, or raises when ``ctx.strict`` (naming ``reason``).

    This is the default handler of :data:`NNX` for modules without a rule;
    :mod:`pzbridge.bridge.nnx.tracing` replaces it with one that traces the
    module when ``ctx`` carries example inputs.

    Example:
        >>> class Id(nnx.Module):
        ...     def __call__(self, x): return x
        >>> type(foreign_or_error(Id(), new_lift_context())).__name__
        'Foreign'
    """
    if ctx.strict:
        cls = type(module)
        why = f" ({reason})" if reason else ""
        tracing = ("change its __call__ so it can be traced (see docs/lifting_custom_modules.md)" if reason
                   else "pass example inputs to pzb.lift so its __call__ is traced")
        raise LiftError(
            f"{ctx.where}: no NNX lifting rule for {cls.__module__}.{cls.__qualname__} and strict=True{why}. "
            "Fix: register one with `@pzbridge.bridge.nnx_rule(source=YourClass, lifted=(YourLayer,))` "
            f"(a class with lift(module, ctx) and lower(layer, ctx)), {tracing}, or lift with strict=False to "
            "keep it as a Foreign layer."
        )
    return lift_foreign(module, ctx)


NNX.set_unknown_handler(foreign_or_error)


def lower_node(layer: Any, ctx: LowerContext) -> Any:
    """Lowers one lifted layer to NNX by its rule (the adapter rule is the fallback for ``object``).

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
    if isinstance(layer, AncestorRef):
        return layer.resolve(ctx)  # Not lowered: the ancestor it names is being built around it.
    copies = ctx.shared.extras.get(MERGE_EQUAL_COPIES)
    key = None if copies is None else _copy_key(layer)
    if key is None:
        return ctx.cached(layer, lambda: _lower_uncached(layer, ctx))
    if key not in copies:
        copies[key] = ctx.cached(layer, lambda: _lower_uncached(layer, ctx))
        ctx.shared.keep_alive.append(layer)  # The key holds ids: keep the objects alive.
    return copies[key]


MERGE_EQUAL_COPIES = "nnx_merge_equal_copies"
"""``ctx.shared.extras`` key: when set (to a dict), equal lifted layers holding the same variables lower to one module.

Equinox has no shared submodules: an NNX module used twice converts to two
equal Equinox copies holding the same arrays, so converting back merges them.
"""


def _copy_key(layer: Any) -> Any:
    """What makes two lifted layers the same module: class, static fields and the identity of every leaf."""
    leaves, treedef = jax.tree_util.tree_flatten(layer, is_leaf=lambda v: isinstance(v, AbstractVariable))
    if not any(isinstance(leaf, AbstractVariable) for leaf in leaves):
        return None  # Layers without variables (activations, glue) may be distinct modules in the original.
    key = (type(layer), treedef, tuple(id(leaf) for leaf in leaves))
    try:
        hash(key)
    except TypeError:
        return None
    return key


def _lower_uncached(layer: Any, ctx: LowerContext) -> Any:
    check_layer(ctx, layer, (nnx.Pytree,))  # A string / number / None left where a layer was.
    rule = NNX.lower_rule_for(type(layer))
    if rule is None:
        raise LowerError(
            f"{ctx.where}: no NNX lowering rule matches {type(layer).__qualname__}, not even the adapter "
            "fallback. Fix: import pzbridge.bridge.nnx (importing it registers every rule)."
        )
    return check_lowered(ctx, layer, rule.lower(layer, ctx))  # Arrays fit the native module built.


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
      referenced: A descendant refers back to this module (an
        :class:`AncestorRef`), so :meth:`rebuild` creates the module before
        lowering its children.
    """

    class_name: str
    node_type: type
    statics: NnxStatics
    data: tuple[tuple[str, Any, tuple[Any, ...]], ...]
    call_kwargs: frozenset[str] = frozenset()
    accepts_any_kwargs: bool = False
    input_names: tuple[str, ...] = ()
    output_names: tuple[str, ...] = ()
    referenced: bool = False

    def __hash__(self) -> int:
        return hash((self.class_name, self.node_type, self.statics, self.input_names, self.output_names))

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, NnxTemplate):
            return NotImplemented
        return (
            (self.class_name, self.node_type, self.statics, self.call_kwargs, self.accepts_any_kwargs,
             self.input_names, self.output_names, self.referenced)
            == (other.class_name, other.node_type, other.statics, other.call_kwargs, other.accepts_any_kwargs,
                other.input_names, other.output_names, other.referenced)
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
        # A referenced module exists (empty) while its children are lowered, so references back resolve to it.
        shell = object.__new__(self.node_type) if self.referenced else None
        building = ctx.shared.extras.setdefault(_BUILDING, [])
        building.append((self.node_type, shell))
        try:
            data = {}
            for name, treedef, leaves in self.data:
                lowered = [ctx.lower(children[leaf.key], leaf.key) if isinstance(leaf, ChildRef) else leaf
                           for leaf in leaves]
                data[name] = jax.tree_util.tree_unflatten(treedef, lowered)
        finally:
            building.pop()
        module = build_module(self.node_type, self.statics, data)
        if shell is not None:
            vars(shell).update(vars(module))  # The same attributes, in the same order, in the referenced object.
            module = shell
        if top:
            _PENDING_WRITEBACK[module] = tuple(ctx.shared.extras.get("nnx_state_pairs", ()))
        return module

    def invoke(self, module: Any, x: Any, side_inputs: Mapping[str, Any], children: Mapping[str, Any]) -> Any:
        kwargs = {k: v for k, v in side_inputs.items() if self.accepts_any_kwargs or k in self.call_kwargs}
        pairs = _PENDING_WRITEBACK.pop(module, ())
        out = call_batched(module, x, kwargs, self.input_names, self.output_names)
        # A pzbridge layer lowered into the module (an adapter, e.g. a capture saver) saw the batch axes
        # as leading positional dims; its state gets their names back, as the output does.
        write_back(pairs, leading_names=batch_names(x, self.input_names))
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
        if not isinstance(layer.template, NnxTemplate):
            raise LowerError(
                f"{ctx.where}: a Foreign {layer.template.class_name} lifted from another framework cannot be "
                "lowered to NNX: its code is that framework's. Fix: lower it to its own framework, or "
                "replace it with pzbridge layers first."
            )
        return layer.template.rebuild(layer.children, ctx)


@pytree_dataclass
class AncestorRef(Struct):
    """A module's reference back to one of its ancestors (an NNX reference cycle, ``child.parent = parent``).

    NNX graphs may hold cycles (``nnx.split`` / ``nnx.merge`` keep them); the
    lifted model is a tree, so the reference back is kept as this marker
    (no children: flattening stays finite) and the ancestor as a ``Foreign``
    whose template is ``referenced``. Lowering the ancestor, or calling it,
    puts the rebuilt ancestor itself here, so the cycle is back as it was.

    Attributes:
      node_type: The ancestor's class (static).
      skip: Ancestors of the same class between the reference and its target
        (static; 0 for the nearest one, a ``parent``).
      target: The ancestor's path when lifted (static, for messages).

    Example:
        >>> class Child(nnx.Module):
        ...     def __call__(self, x): return x
        >>> class Parent(nnx.Module):
        ...     def __init__(self):
        ...         self.child = Child()
        ...         self.child.parent = self
        ...     def __call__(self, x): return self.child(x)
        >>> lifted = lift_node(Parent(), new_lift_context())
        >>> lifted.children["child"].children["parent"]
        AncestorRef(node_type=<class 'pzbridge.bridge.nnx.traversal.Parent'>, skip=0, target='<root>')
        >>> lowered = lower_node(lifted, new_lower_context())
        >>> lowered.child.parent is lowered
        True
    """

    node_type: type = static_field()
    skip: int = static_field(default=0)
    target: str = static_field(default="<root>")

    def resolve(self, ctx: LowerContext) -> Any:
        """The ancestor being rebuilt around ``ctx`` that this reference names.

        Raises:
          LowerError: If no such ancestor is being rebuilt (the reference was
            moved, or lowered without the module it points to).
        """
        seen = 0
        for node_type, module in reversed(ctx.shared.extras.get(_BUILDING, ())):
            if node_type is not self.node_type:
                continue
            if seen == self.skip:
                if module is not None:
                    return module
                break
            seen += 1
        cls = self.node_type
        raise LowerError(
            f"{ctx.where}: expected to be lowered inside the {cls.__module__}.{cls.__qualname__} it refers back "
            f"to (lifted at {self.target}: a reference cycle), found no such enclosing module being lowered. "
            "Fix: lower (or call) the whole model that contains both, or replace this reference with a layer."
        )


def _ancestor_ref(module: Any, ctx: LiftContext) -> AncestorRef:
    """The marker for a reference from ``ctx.path`` back to ``module``, which is being lifted above it."""
    lifting = ctx.shared.extras[_LIFTING]
    ids = list(lifting)
    deeper = ids[ids.index(id(module)) + 1:]
    skip = sum(type(lifting[i][0]) is type(module) for i in deeper)
    ctx.shared.extras.setdefault(_REFERENCED, {}).setdefault(id(module), []).append(ctx.where)
    return AncestorRef(type(module), skip, lifting[id(module)][1].where)


def _mark_if_referenced(module: Any, lifted: Any, ctx: LiftContext) -> Any:
    """``lifted`` marked as the target of references back to it, if there are any.

    Raises:
      LiftError: If ``module`` is referenced back to but did not lift as a
        ``Foreign`` (only a ``Foreign`` rebuilds its original object, which
        the references can then point to).
    """
    paths = ctx.shared.extras.get(_REFERENCED, {}).pop(id(module), None)
    if not paths:
        return lifted
    if isinstance(lifted, Foreign) and isinstance(lifted.template, NnxTemplate):
        return Foreign(lifted.children, dataclasses.replace(lifted.template, referenced=True))
    cls = type(module)
    traced = NNX.lift_rule_for(cls) is None
    fix = "lift without example inputs (so it stays a Foreign layer), or " if traced else ""
    raise LiftError(
        f"{paths[0]}: refers back to its ancestor {cls.__module__}.{cls.__qualname__} at {ctx.where} (a reference "
        f"cycle); expected that ancestor to lift as a Foreign layer (which can rebuild the cycle), found "
        f"{type(lifted).__name__}. Fix: {fix}do not store the ancestor in its child (pass what the child "
        "needs as a call argument)."
    )


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


def call_batched(fn: Callable[..., Any], x: Any, kwargs: Mapping[str, Any],
                 input_names: Sequence[str] = (), output_names: Sequence[str] = ()) -> Any:
    """Calls a batched (NNX-style) function on named inputs.

    Named axes listed in ``input_names`` become the trailing positional dims
    (in that order); every other named axis becomes a leading dim, in the
    order of the first named input; positional axes stay in between. The
    output's leading dims get those batch names back and its trailing dims
    ``output_names`` (when its rank allows).

    Args:
      fn: The positional function, e.g. an NNX module.
      x: A named array, or a tuple of arguments (named arrays or anything else).
      kwargs: Keyword arguments for ``fn``.
      input_names: Names the function consumes as trailing axes.
      output_names: Names for the output's trailing axes.

    Returns:
      ``fn``'s output with every array leaf wrapped as a named array.

    Example:
        >>> import numpy as np
        >>> x = nx.wrap(np.ones((2, 3), np.float32), "batch", "features")
        >>> y = call_batched(lambda a: a.sum(-1, keepdims=True), x, {}, ("features",), ("features",))
        >>> dict(y.named_shape)
        {'batch': 2, 'features': 1}
    """
    args = x if isinstance(x, tuple) else (x,)
    lead = batch_names(x, input_names)
    positional = []
    for arg in args:
        if not nx.is_namedarray(arg):
            positional.append(arg)
            continue
        heads = [n for n in lead if n in arg.named_shape]
        heads += [n for n in arg.named_shape if n not in heads and n not in input_names]
        tails = [n for n in input_names if n in arg.named_shape]
        arranged = arg.untag_prefix(*heads) if heads else arg
        arranged = arranged.untag(*tails) if tails else arranged
        positional.append(arranged.unwrap())
    out = fn(*positional, **kwargs)

    def name(leaf: Any) -> Any:
        if not isinstance(leaf, jax.Array):
            return leaf
        rank = leaf.ndim
        heads = list(lead) if rank >= len(lead) else []
        tails = list(output_names) if rank - len(heads) >= len(output_names) else []
        if not heads and not tails:
            return nx.wrap(leaf)
        temp = [f"__pos{i}" for i in range(rank - len(heads) - len(tails))]
        named = nx.wrap(leaf).tag(*heads, *temp, *tails)
        return named.untag(*temp) if temp else named

    return jax.tree_util.tree_map(name, out)


def batch_names(x: Any, input_names: Sequence[str] = ()) -> list[str]:
    """The named axes :func:`call_batched` moves to leading positional dims, in order.

    They are the names of the first named input that are not ``input_names``.

    Example:
        >>> import numpy as np
        >>> batch_names((1, nx.wrap(np.ones((2, 3)), "batch", "features")), ("features",))
        ['batch']
    """
    args = x if isinstance(x, tuple) else (x,)
    first = next((a for a in args if nx.is_namedarray(a)), None)
    return [n for n in (first.named_shape if first is not None else ()) if n not in input_names]


def convention_of(module: Any, naming: AxisNaming) -> CallingConvention | None:
    """The calling convention of a module with a rule that records one, else None.

    Example:
        >>> convention_of(nnx.Linear(2, 3, rngs=nnx.Rngs(0)), AxisNaming()).inputs
        (('features',),)
    """
    return NNX.convention_of(module, naming)
