"""Traced lifting of custom Equinox modules, and lowering ``Traced`` layers back to Equinox.

With example inputs (``pzb.lift(model, x)``) an ``eqx.Module`` without a rule
is traced instead of kept ``Foreign``: its children are replaced by
:class:`~pzbridge.bridge.tracing.child_calls.ChildProxy` s, its own arrays and
its children's arrays become traced inputs, and ``jax.make_jaxpr`` of its
``__call__`` gives the graph that :mod:`pzbridge.bridge.tracing.graph`
converts. Each child is lifted at its call site: a known layer by its rule, a
custom child by tracing it with the shapes it is called with (so
``jax.vmap(self.mlp)(x)`` lifts the MLP on one token and the mapped axis
keeps its name), and an untraceable one as ``Foreign``.

A threaded ``eqx.nn.State`` passes through as a token
(:mod:`~pzbridge.bridge.equinox.state_threading`); a module's own
``StateIndex`` fields are read and set through it, their entries lifted as
``StateVariable`` s that a :class:`~pzbridge.bridge.tracing.state_writes.WritesState`
updates (:mod:`~pzbridge.bridge.equinox.state_entries`).

Equinox modules act on unbatched arrays: the lifted model names the example's
axes (default ``seq, features`` for the last two) and any extra named axis
(``batch``) passes through.

Lowering a ``Traced``: when the glue is as traced, the original class is
rebuilt around the (possibly edited) children, exactly like a ``Foreign``;
otherwise the edited graph runs in an :class:`~pzbridge.bridge.equinox.adapter.EquinoxAdapter`.

Example:
    >>> import jax, jax.numpy as jnp, equinox as eqx
    >>> import pzbridge as pzb
    >>> class Block(eqx.Module):
    ...     linear: eqx.nn.Linear
    ...     def __call__(self, x): return x + jax.vmap(self.linear)(x)
    >>> block = Block(eqx.nn.Linear(4, 4, key=jax.random.key(0)))
    >>> x = jnp.ones((3, 4))
    >>> lifted = pzb.lift(block, x)
    >>> type(lifted.body.body).__name__
    'Residual'
    >>> bool(jnp.allclose(lifted.positional(x), block(x)))
    True
    >>> pzb.lower(lifted).linear.weight is block.linear.weight
    True
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any

import equinox as eqx
import jax

from pzbridge.bridge.context import LiftContext, LowerContext
from pzbridge.bridge.equinox.adapter import EquinoxAdapter
from pzbridge.bridge.equinox.stack import lift_stacked_block
from pzbridge.bridge.equinox.state_entries import entry_variable, lift_state_entry
from pzbridge.bridge.equinox.state_threading import (
    STATE_KEY,
    OpenedState,
    call_threading_state,
    holds_state,
    is_token,
    returned_without_state,
    with_tokens,
)
from pzbridge.bridge.equinox.traversal import (
    EQUINOX,
    EquinoxTemplate,
    _child_key,
    _key_text,
    foreign_or_error,
    is_array,
    lift_foreign,
    with_names,
)
from pzbridge.bridge.tracing.assemble import (
    call_names,
    child_spec,
    children_for_rebuild,
    default_input_names,
    input_roles,
    make_traced,
    retracer,
    trace_call,
    traced_convention,
    without_default_nones,
)
from pzbridge.bridge.tracing.child_calls import ChildCall, bind_proxy, proxy_class
from pzbridge.bridge.tracing.example import Example
from pzbridge.bridge.tracing.graph import ChildSpec, InputRole, Untraceable, convert
from pzbridge.bridge.tracing.overrides import renames_for
from pzbridge.bridge.tracing.state_writes import Written, WritesState, write_targets
from pzbridge.bridge.tracing.structure import build_layer
from pzbridge.core import named_axes as pzb_nx
from pzbridge.core.errors import LiftError
from pzbridge.core.variables import StateVariable
from pzbridge.nn.dataflow import Traced
from pzbridge.nn.foreign import Foreign

_TRACES = "equinox_traces"


@dataclasses.dataclass
class _Parts:
    """An Equinox module flattened one level: its children, its arrays, its ``StateIndex`` es, everything else."""

    module: Any
    flat: list[tuple[Any, Any]]
    treedef: Any
    children: list[tuple[int, tuple[str | int, ...], Any]]
    arrays: list[tuple[int, tuple[str | int, ...], Any]]
    indices: list[tuple[tuple[str | int, ...], eqx.nn.StateIndex]]

    @classmethod
    def of(cls, module: Any) -> _Parts:
        is_submodule = lambda value: value is not module and isinstance(value, eqx.Module)  # noqa: E731
        flat, treedef = jax.tree_util.tree_flatten_with_path(module, is_leaf=is_submodule)
        children, arrays, indices = [], [], []
        for index, (path, leaf) in enumerate(flat):
            keys = _child_key(path)
            if isinstance(leaf, eqx.nn.StateIndex):  # stays in place: the code passes it to state.get / set
                indices.append((keys, leaf))
            elif isinstance(leaf, eqx.Module):
                children.append((index, keys, leaf))
            elif is_array(leaf):
                arrays.append((index, keys, leaf))
        return cls(module, flat, treedef, children, arrays, indices)


@dataclasses.dataclass
class _Entry:
    """One of a module's ``StateIndex`` es with its value in the lift's State, flattened."""

    keys: tuple[str | int, ...]
    index: eqx.nn.StateIndex
    leaves: list[Any]
    treedef: Any

    def path(self, leaf: int) -> tuple[str | int, ...]:
        return self.keys if len(self.leaves) == 1 else (*self.keys, str(leaf))


def _entries(parts: _Parts, state: Any) -> list[_Entry]:
    """The module's State entries (none without a State: the code then cannot open one).

    Raises:
      Untraceable: If the State has no entry for one of the module's ``StateIndex`` es, or one is not arrays.
    """
    if state is None:
        return []
    entries = []
    for keys, index in parts.indices:
        try:
            value = state.get(index)
        except (KeyError, ValueError) as error:
            raise Untraceable(f"the eqx.nn.State has no entry for its StateIndex {_key_text(keys)!r} "
                              f"({type(error).__name__}: {error})") from None
        leaves, treedef = jax.tree_util.tree_flatten(value)
        if not all(is_array(leaf) for leaf in leaves):
            raise Untraceable(f"its State entry {_key_text(keys)!r} holds values that are not arrays")
        entries.append(_Entry(keys, index, leaves, treedef))
    return entries


def _split_child(child: Any) -> tuple[list[Any], Any, Any]:
    arrays, static = eqx.partition(child, is_array)
    leaves, treedef = jax.tree_util.tree_flatten(arrays)
    return leaves, treedef, static


def _signature(treedef: Any, static: Any) -> Any:
    """A hashable identity of a child's computation (its structure and static fields), or None."""
    try:
        hash((treedef, static))
    except TypeError:
        return None
    return ("equinox", treedef, static)


def _proxy(key: str, rebuilt: Any, run: Any, calls: list[ChildCall]) -> Any:
    """``rebuilt`` as an instance of a subclass of its class whose ``__call__`` binds one child call.

    Being a real module of the same structure, it goes through ``eqx.partition``
    / ``eqx.combine``, ``jax.tree_util`` and ``lax.scan`` (a stack of blocks run
    by scan calls it once, on one block's arrays), and every attribute reads as
    on the child. Whatever arrays it holds when called are the call's operands.
    The subclass is one per child class and key (partition / combine keep only
    the class and the dataclass fields, so the call site lives in the class).
    """
    cls = proxy_class(type(rebuilt), key, _array_leaves)
    bind_proxy(cls, run, calls)
    instance = object.__new__(cls)
    for field in dataclasses.fields(rebuilt):
        object.__setattr__(instance, field.name, getattr(rebuilt, field.name))
    return instance


def _array_leaves(module: Any) -> list[Any]:
    return jax.tree_util.tree_leaves(eqx.filter(module, is_array))


def _struct(array: Any) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(tuple(array.shape), array.dtype)


def _trace(parts: _Parts, example: Example, state: Any
           ) -> tuple[Any, Any, list[ChildCall], list[InputRole], list[str], Any, Any, list[Written]]:
    module = parts.module
    # A threaded eqx.nn.State passes through the trace as a leafless token (see state_threading).
    example = dataclasses.replace(example, args=with_tokens(example.args), kwargs=with_tokens(dict(example.kwargs)))
    child_splits = [_split_child(child) for _, _, child in parts.children]
    entries = _entries(parts, state)
    param_roles = [InputRole("param", name=_key_text(keys), array=array, path=keys)
                   for _, keys, array in parts.arrays]
    for (_, keys, _), (leaves, treedef, static) in zip(parts.children, child_splits):
        arrays = jax.tree_util.tree_unflatten(treedef, leaves)
        for path, leaf in jax.tree_util.tree_flatten_with_path(arrays)[0]:
            sub = _child_key(path)
            param_roles.append(InputRole("param", name=_key_text((*keys, *sub)), array=leaf, path=(*keys, *sub)))
    for entry in entries:  # the State's own arrays: their identity ties them to the entries' variables
        param_roles.extend(InputRole("param", name=_key_text(entry.path(i)), array=leaf, path=entry.path(i))
                           for i, leaf in enumerate(entry.leaves))
    given = example.input_names[0] if example.input_names else None
    first = example.args[0] if example.args else None
    data_names = given if given is not None else (
        default_input_names(len(first.shape), ("seq", "features"), first.dtype) if hasattr(first, "shape") else ())
    roles, dynamic, args_treedef, side_names = input_roles(example, type(module).__call__, param_roles, data_names,
                                                           names_fixed=given is not None)
    flat_args = jax.tree_util.tree_leaves((example.args, dict(example.kwargs)))
    calls: list[ChildCall] = []
    known_writes: list[list[int]] = []

    def traced_call(own: list[Any], child_leaves: list[list[Any]], state_leaves: list[list[Any]],
                    dynamic_args: list[Any]) -> Any:
        leaves = [leaf for _, leaf in parts.flat]
        for (index, _, _), array in zip(parts.arrays, own):
            leaves[index] = array
        for (index, keys, _), (_, treedef, static), arrays in zip(parts.children, child_splits, child_leaves):
            def run(leaves_: Any, args: Any, kwargs: Any, treedef: Any = treedef, static: Any = static) -> Any:
                child = eqx.combine(jax.tree_util.tree_unflatten(treedef, list(leaves_)), static)
                return call_threading_state(child, args, kwargs, state)

            run.pzb_signature = _signature(treedef, static)  # type: ignore[attr-defined]

            rebuilt = eqx.combine(jax.tree_util.tree_unflatten(treedef, arrays), static)
            # eqx.nn.Shared's call only hands back its pytree with the ties in place (modules, not arrays):
            # it runs inline, so the tied modules' calls are traced on the Shared child's own arrays.
            leaves[index] = rebuilt if isinstance(rebuilt, eqx.nn.Shared) else _proxy(_key_text(keys), rebuilt, run,
                                                                                    calls)
        traced_module = jax.tree_util.tree_unflatten(parts.treedef, leaves)
        values = list(flat_args)
        for position, value in zip(dynamic, dynamic_args):
            values[position] = value
        args, kwargs = jax.tree_util.tree_unflatten(args_treedef, values)
        opened = None
        if entries:  # The module may read and set its own entries: it gets the State opened on them.
            opened = OpenedState({entry.index.marker: jax.tree_util.tree_unflatten(entry.treedef, list(arrays))
                                  for entry, arrays in zip(entries, state_leaves)})
            args, kwargs = with_tokens((args, kwargs), opened)
        out = type(module).__call__(traced_module, *args, **kwargs)
        # Entries set but not returned are dropped by Equinox too (the State returned is the new one).
        written = [i for i, entry in enumerate(entries)
                   if opened is not None and entry.index.marker in opened.written and holds_state(out)]
        if not known_writes:
            known_writes.append(written)
        elif known_writes[0] != written:
            raise Untraceable("it sets other State entries when called at other sizes")
        # The new values are extra outputs; WritesState stores them (a module setting none traces as before).
        news = [leaf for i in written for leaf in jax.tree_util.tree_leaves(opened.values[entries[i].index.marker])]
        return (out, tuple(news)) if written else out

    own_structs = [_struct(a) for _, _, a in parts.arrays]
    child_structs = [[_struct(a) for a in leaves] for leaves, _, _ in child_splits]
    state_structs = [[_struct(a) for a in entry.leaves] for entry in entries]
    dynamic_structs = [flat_args[i] for i in dynamic]
    closed, out_shape = trace_call(traced_call, own_structs, child_structs, state_structs, dynamic_structs)
    retrace = retracer(traced_call, (own_structs, child_structs, state_structs), dynamic_structs, calls)
    written_entries = [entries[i] for i in known_writes[0]] if known_writes else []
    if written_entries:
        out_shape = (returned_without_state(out_shape[0])[0], out_shape[1])
    else:
        out_shape, _ = returned_without_state(out_shape)  # the lifted layers keep the state themselves
    writes = [Written(_key_text(entry.path(i)), entry.path(i), leaf, _struct(leaf))
              for entry in written_entries for i, leaf in enumerate(entry.leaves)]
    return closed, out_shape, calls, roles, side_names, jax.tree_util.tree_structure(out_shape), retrace, writes


def _hashable(value: Any) -> Any:
    if is_array(value):
        return ("array", tuple(value.shape), str(value.dtype))
    try:
        hash(value)
    except TypeError:
        return ("id", id(value))
    return value


def _trace_key(module: Any, example: Example) -> Any:
    """What determines a module's trace: its full tree structure, non-array leaves, array shapes, the example."""
    try:
        leaves, treedef = jax.tree_util.tree_flatten((module, example.args, dict(example.kwargs)))
        key = (treedef, tuple(_hashable(leaf) for leaf in leaves), example.input_names)
        hash(key)
    except TypeError:
        return None
    return key


def _with_roles_of(parts: _Parts, cached: tuple[Any, ...], state: Any) -> tuple[Any, ...]:
    """A cached trace with the input roles pointing at this module's own arrays (and its State entries')."""
    closed, out_shape, calls, roles, side_names, out_treedef, retrace, writes = cached
    arrays = [array for _, _, array in parts.arrays]
    for _, _, child in parts.children:
        leaves, _, _ = _split_child(child)
        arrays.extend(leaves)
    for entry in _entries(parts, state):
        arrays.extend(entry.leaves)
    params = iter(arrays)
    fresh = [dataclasses.replace(role, array=next(params)) if role.kind == "param" else role for role in roles]
    by_path = {role.path: role.array for role in fresh if role.kind == "param"}
    writes = [dataclasses.replace(write, source=by_path[write.keys]) for write in writes]
    return closed, out_shape, calls, fresh, side_names, out_treedef, retrace, writes


def lift_traced(module: Any, ctx: LiftContext) -> Traced:
    """Traces ``module``'s ``__call__`` with ``ctx.example`` and lifts it as a :class:`Traced` layer.

    Raises:
      Untraceable: If the code cannot be traced or expressed.
    """
    example: Example = ctx.example
    parts = _Parts.of(module)
    # Modules of one structure called the same way (the blocks of a model) trace to the same jaxpr.
    cache = ctx.shared.extras.setdefault(_TRACES, {})
    key = _trace_key(module, example)
    state = ctx.shared.extras.get(STATE_KEY)
    if key is None or key not in cache:
        traced_once = _trace(parts, example, state)
        if key is not None:
            cache[key] = traced_once
    else:
        traced_once = _with_roles_of(parts, cache[key], state)
    closed, out_shape, calls, roles, side_names, out_treedef, retrace, writes = traced_once
    children_by_key = {_key_text(keys): (keys, child) for _, keys, child in parts.children}
    lifted: dict[str, Any] = {}
    plain = ctx.child()

    def child_handler(call: ChildCall, structs: Any, arg_names: Any, stack: tuple[str, int] | None = None) -> ChildSpec:
        keys, child = children_by_key[call.key]
        example_args, call_kwargs = call.rebuild_args(structs)
        example_args = without_default_nones(type(child).__call__, example_args)
        # The State a child gets stays in its own example (a custom child threads it on); its layers hold it.
        param_names = [n for n, a in zip(call_names(type(child).__call__, example_args, call_kwargs), example_args)
                       if not is_token(a)]
        args = [a for a in example_args if not is_token(a)]
        kwargs = {k: v for k, v in call_kwargs.items() if not is_token(v)}
        rule = EQUINOX.lift_rule_for(type(child))
        traced_child = False
        if call.key not in lifted:
            child_ctx = plain.child(*keys)
            if rule is None or type(child) is eqx.nn.Sequential:  # A Sequential traces its custom items with it.
                given = iter(arg_names)  # per array argument; a token has none
                names = tuple(None if is_token(a) else tuple(n if n is not None else f"axis{i}"
                                                             for i, n in enumerate(next(given)))
                              for a in example_args)
                child_ctx = child_ctx.with_example(Example(tuple(example_args), dict(call_kwargs), names))
            if stack is not None:  # one block of a stack run by lax.scan
                lifted[call.key] = lift_stacked_block(child, child_ctx, stack[0])
            else:
                lifted[call.key] = ctx.lift_node(child, child_ctx)
        layer = lifted[call.key]
        if isinstance(layer, Traced):
            traced_child = True
            convention = layer.convention
        elif isinstance(layer, Foreign):
            names = tuple(n for n in arg_names[0] if n is not None) if arg_names else ()
            layer = with_names(layer, names, names)
            lifted[call.key] = layer
            convention = None
        else:
            per_call = getattr(rule, "call_convention", None)  # Names that depend on the call (a mask's rank).
            convention = (per_call(child, ctx.naming, args, kwargs) if per_call is not None
                          else EQUINOX.convention_of(child, ctx.naming))
        return child_spec(layer, convention, args, kwargs, traced_child, param_names)

    entries = {id(leaf): (entry, i) for entry in _entries(parts, state) for i, leaf in enumerate(entry.leaves)}

    def param_handler(role: InputRole, storage_names: tuple[str, ...]) -> Any:
        if id(role.array) in entries:  # a State entry the code reads: state, not a trainable parameter
            return state_entry_variable(entries[id(role.array)], role.array, storage_names)
        return plain.child(*role.path).parameter(role.array, storage_names)

    def state_entry_variable(found: tuple[_Entry, int], array: Any, names: tuple[str, ...] | None) -> StateVariable:
        entry, i = found
        return entry_variable(plain.child(*entry.keys), array, names, i, len(entry.leaves))

    called = {call.key for call in calls}
    # A child the code never calls (arrays the parent reads) runs no code of its own: Foreign is fine, strict or not.
    holder = dataclasses.replace(plain, strict=False)
    uncalled = {key: holder.lift(child, *keys) for key, (keys, child) in children_by_key.items() if key not in called}
    def param_hint(role: InputRole) -> tuple[str, ...] | None:
        lifted_already = ctx.shared.by_identity.get(id(role.array))
        value = getattr(lifted_already, "value", None)
        return tuple(value.named_shape) if pzb_nx.is_namedarray(value) and not value.positional_shape else None

    graph = convert(closed, roles, child_handler, param_handler, param_hint, renames_for(ctx), retrace)
    body = build_layer(graph, out_treedef)
    if writes:  # The traced function returned (out, new entry values): store them, return out.
        targets, storage = write_targets(graph, writes, plain, lambda write, names: state_entry_variable(
            entries[id(write.source)], write.source, names))
        body = WritesState(body, targets, storage)
        out_treedef = out_treedef.children()[0]
    by_id = {id(child): {**uncalled, **lifted}[key] for key, (_, child) in children_by_key.items()}
    for keys, index in parts.indices:  # Kept to rebuild the StateIndex, holding the body's variables.
        by_id[id(index)] = (lift_state_entry(index, state, plain.child(*keys)) if state is not None
                            else holder.lift(index, *keys))
    fill = dataclasses.replace(plain, lift_node=lambda m, c: by_id[id(m)] if id(m) in by_id else ctx.lift_node(m, c))
    foreign = lift_foreign(module, fill)
    own = {role.name for i, role in enumerate(roles[: len(parts.arrays)]) if i not in graph.unused_params}
    labels = {key: foreign.children[key].label for key in own}
    convention = traced_convention(graph, roles, side_names, jax.tree_util.treedef_is_leaf(out_treedef))
    return make_traced(body, foreign.template, foreign.children, list(lifted), labels, convention)


def traced_or_foreign(module: Any, ctx: LiftContext) -> Any:
    """Lifts a module without a rule: traced when ``ctx`` has an example, else ``Foreign``.

    An untraceable module stays ``Foreign`` (or raises with ``strict=True``,
    naming the reason).

    Example:
        >>> class Id(eqx.Module):
        ...     def __call__(self, x): return x
        >>> from pzbridge.bridge.equinox.traversal import new_lift_context
        >>> type(traced_or_foreign(Id(), new_lift_context())).__name__
        'Foreign'
    """
    if ctx.example is None:
        return foreign_or_error(module, ctx)
    try:
        return lift_traced(module, ctx)
    except Untraceable as reason:
        return foreign_or_error(module, ctx.child(), f"not traceable: {reason}")
    except LiftError:
        raise
    except Exception as error:  # noqa: BLE001 - a converter bug must not make the model unliftable
        if ctx.strict:
            raise LiftError(
                f"{ctx.where}: traced lifting of {type(module).__qualname__} failed inside pzbridge "
                f"({type(error).__name__}: {error}). Fix: lift with strict=False to keep it Foreign, and "
                "report this with the module's code."
            ) from error
        warnings.warn(
            f"{ctx.where}: traced lifting of {type(module).__qualname__} failed inside pzbridge "
            f"({type(error).__name__}: {error}); keeping it Foreign.", stacklevel=2)
        return foreign_or_error(module, ctx.child())


EQUINOX.set_unknown_handler(traced_or_foreign)


@EQUINOX.rule(lifted=(Traced,))
class TracedRule:
    """A ``Traced`` lowers to its original class while the glue is as traced, else to an adapter."""

    def lower(self, layer: Traced, ctx: LowerContext) -> Any:
        children = children_for_rebuild(layer)
        if children is not None and isinstance(layer.template, EquinoxTemplate):
            return layer.template.rebuild(children, ctx)
        return EquinoxAdapter.wrap(layer, ctx, layer.convention)
