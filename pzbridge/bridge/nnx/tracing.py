"""Traced lifting of custom Flax NNX modules, and lowering ``Traced`` layers back to NNX.

With example inputs (``pzb.lift(model, x)``) an ``nnx.Module`` without a rule
is traced instead of kept ``Foreign``. The user's module is never touched: a
*new* module of the same class is built from its statics
(:func:`~pzbridge.bridge.nnx.statics.build_module`) in which

- every child module is the child rebuilt by ``nnx.merge`` on fresh
  Variables holding traced arrays, as an instance of a subclass whose
  ``__call__`` is one equation of the jaxpr (reading an attribute reads the
  child, so ``self.embed.attend(x)`` traces the table as an operand of the
  glue; ``nnx.scan`` over a stack of blocks calls it once per step);
- every own Variable is a new Variable of the same type holding a tracer
  (``self.w[...]``, ``self.w.value`` and ``x @ self.w`` all work);
- every plain array attribute is a tracer;
- an ``nnx.List`` / ``nnx.Dict`` is a Python list / dict of the above, so
  ``for layer in self.layers: x = layer(x)`` traces each layer as a child
  (``layers[0]``, ``layers[1]`` ...).

``jax.make_jaxpr`` of ``__call__`` on that module gives the graph that
:mod:`pzbridge.bridge.tracing.graph` converts, and each child is lifted at its
call site: a known layer by its rule, a custom child by tracing it with the
shapes it is called with, an untraceable one as ``Foreign`` (named by the
call site). Glue may read any Variable: an ``nnx.Param`` becomes a
``Parameter``, other Variables (``BatchStat`` ...) and plain arrays become
``StateVariable`` s, all lowering back to the same type. Glue that *writes*
a Variable during the call (a step counter, running statistics, an EMA
buffer, a cache) is traced too: the traced function returns each written
Variable's new value next to the output, and a
:class:`~pzbridge.bridge.tracing.state_writes.WritesState` layer stores them
into the lifted ``StateVariable`` s (:mod:`pzbridge.bridge.nnx.state_writes`
says which writes, and what stays ``Foreign``). Code that assigns an
attribute during the call (``sow``, ``self.cache = ...``) is not traced: the
module stays ``Foreign``, whose calls write NNX's in-place updates back
(children with rules, such as ``nnx.Dropout`` or ``nnx.BatchNorm``, keep
their own updates either way).

NNX modules act on batched arrays: the example's axes are named (default
``batch, ..., seq, features``; integer token ids ``batch, ..., seq``), and
the lifted model takes exactly what the module took.

Lowering a ``Traced``: when the glue is as traced, the original class is
rebuilt around the (possibly edited) children, with the same ``nnx.graphdef``
as the original; otherwise the edited graph runs in an
:class:`~pzbridge.bridge.nnx.adapter.NnxAdapter`.

Example:
    >>> import jax, jax.numpy as jnp
    >>> from flax import nnx
    >>> import pzbridge as pzb
    >>> class Block(nnx.Module):
    ...     def __init__(self, rngs):
    ...         self.linear = nnx.Linear(4, 4, rngs=rngs)
    ...     def __call__(self, x): return x + self.linear(x)
    >>> block = Block(nnx.Rngs(0))
    >>> x = jnp.ones((2, 3, 4))
    >>> lifted = pzb.lift(block, x)
    >>> type(lifted.body.body).__name__
    'Residual'
    >>> bool(jnp.allclose(lifted.positional(x), block(x)))
    True
    >>> nnx.graphdef(pzb.lower(lifted)) == nnx.graphdef(block)
    True
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

import jax
from flax import nnx

from pzbridge.bridge.context import LiftContext, LowerContext
from pzbridge.bridge.lifted import CallingConvention
from pzbridge.bridge.nnx.adapter import NnxAdapter
from pzbridge.bridge.nnx.containers import LayerDict, LayerList
from pzbridge.bridge.nnx.stack import lift_stacked_block
from pzbridge.bridge.nnx.state_writes import Writes, written_variables
from pzbridge.bridge.nnx.statics import NnxStatics, build_module, data_attributes
from pzbridge.bridge.nnx.traversal import (
    NNX,
    NnxTemplate,
    _child_text,
    _is_stop,
    _path_keys,
    foreign_or_error,
    lift_foreign,
    nnx_rule,
    with_names,
)
from pzbridge.bridge.nnx.variables import fresh_variable, is_array, lift_variable, raw_value
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
from pzbridge.core.struct import Struct, pytree_dataclass, static_field
from pzbridge.nn.dataflow import Traced
from pzbridge.nn.foreign import Foreign


@dataclasses.dataclass
class _Node:
    """A graph node among a module's data: a child module (proxied) or another ``nnx.Pytree`` (``nnx.Rngs``).

    Its Variables come from ``nnx.split``; the traced module sees it rebuilt by
    ``nnx.merge`` on *new* Variables, so nothing the code does reaches the
    user's objects. Variables holding arrays are traced inputs; the others
    (a ``None`` placeholder, a Python number) are copied as they are.
    """

    key: str
    keys: tuple[str | int, ...]
    value: Any
    graphdef: Any
    variables: list[tuple[tuple[Any, ...], Any]]
    constants: list[tuple[tuple[Any, ...], Any]]

    @classmethod
    def of(cls, key: str, keys: tuple[str | int, ...], value: Any) -> _Node:
        graphdef, state = nnx.split(value)
        flat = [(tuple(path), var) for path, var in nnx.to_flat_state(state)]
        return cls(key, keys, value, graphdef, [(p, v) for p, v in flat if is_array(raw_value(v))],
                   [(p, v) for p, v in flat if not is_array(raw_value(v))])

    def rebuild(self, leaves: Any) -> tuple[Any, list[tuple[str, nnx.Variable, Any]]]:
        """The node on new Variables holding ``leaves``, and ``(key, new Variable, value)`` (to detect writes)."""
        values = [*leaves, *(raw_value(var) for _, var in self.constants)]
        fresh = [(path, fresh_variable(var, value))
                 for (path, var), value in zip([*self.variables, *self.constants], values)]
        state = nnx.from_flat_state(fresh)
        pairs = [(".".join(str(k) for k in (*self.keys, *_path_keys(path))), var, value)
                 for (path, var), value in zip(fresh, values) if isinstance(var, nnx.Variable)]
        return nnx.merge(self.graphdef, state), pairs

    @property
    def pzb_signature(self) -> Any:
        """A hashable identity of the node's computation (graph, Variable types, constants), or None."""
        signature = ("nnx", self.graphdef, tuple((p, type(v)) for p, v in self.variables),
                     tuple((p, type(v), raw_value(v)) for p, v in self.constants))
        try:
            hash(signature)
        except TypeError:
            return None
        return signature

    def run(self, leaves: Any, args: Any, kwargs: Any) -> Any:
        """Calls the node rebuilt on ``leaves`` (the child call's implementation)."""
        module, _ = self.rebuild(leaves)
        return module(*args, **kwargs)


def _proxy(node: _Node, rebuilt: Any, calls: list[ChildCall]) -> Any:
    """``rebuilt`` as an instance of a subclass of its class whose ``__call__`` binds one child call.

    Being a real module, it goes through ``nnx.split`` / ``nnx.merge``, so
    ``nnx.scan`` over a stack of blocks calls it once on one block's arrays;
    every attribute reads as on the child. Whatever arrays its Variables hold
    when called are the call's operands. The subclass is one per child class
    and key (``nnx.merge`` rebuilds the class, not the instance's attributes).
    """
    cls = proxy_class(type(rebuilt), node.key, _variable_arrays)
    bind_proxy(cls, node.run, calls)
    instance = object.__new__(cls)
    vars(instance).update(vars(rebuilt))
    return instance


def _variable_arrays(module: Any) -> list[Any]:
    return [raw_value(v) for _, v in nnx.to_flat_state(nnx.state(module)) if is_array(raw_value(v))]




_Where = tuple  # (attribute index, leaf index, item key inside an nnx.List / nnx.Dict or None)


class _DictView(dict):
    """What traced code sees for an ``nnx.Dict``: its items by key and as attributes."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


@dataclasses.dataclass
class _Parts:
    """An NNX module flattened one level over its data attributes (as :func:`lift_foreign` does).

    The items of an ``nnx.List`` / ``nnx.Dict`` attribute are flattened one
    level further (keys ``layers[0]``, ``heads.a``): traced code iterates or
    indexes the container and calls its items.

    Attributes:
      module: The user's module (only read).
      data: ``(name, treedef, leaves)`` per data attribute.
      containers: ``(attribute index, leaf index) -> (type, [(item key, item)])`` per container.
      nodes: ``(where, node)`` for submodules and other graph nodes.
      own: ``(where, key, keys, Variable or array)`` for the module's own arrays.
      fixed: ``(where, key, Variable)`` for its Variables that hold no array (copied, not traced).
    """

    module: Any
    data: list[tuple[str, Any, list[Any]]]
    containers: dict[tuple[int, int], tuple[type, list[tuple[Any, Any]]]]
    nodes: list[tuple[_Where, _Node]]
    own: list[tuple[_Where, str, tuple[str | int, ...], Any]]
    fixed: list[tuple[_Where, str, nnx.Variable]]

    @classmethod
    def of(cls, module: Any) -> _Parts:
        parts = cls(module, [], {}, [], [], [])
        for attr, name in enumerate(data_attributes(module)):
            flat, treedef = jax.tree_util.tree_flatten_with_path(vars(module)[name], is_leaf=_is_stop)
            leaves = []
            for index, (path, leaf) in enumerate(flat):
                keys = (name, *_path_keys(path))
                key = _child_text(name, path)
                if type(leaf) in (nnx.List, nnx.Dict):
                    items = (list(enumerate(leaf)) if isinstance(leaf, nnx.List)
                             else [(k, v) for k, v in vars(leaf).items() if not k.startswith("_pytree__")])
                    parts.containers[(attr, index)] = (type(leaf), items)
                    for item_key, item in items:
                        text = f"{key}[{item_key}]" if isinstance(item_key, int) else f"{key}.{item_key}"
                        parts.add((attr, index, item_key), text, (*keys, item_key), item)
                else:
                    parts.add((attr, index, None), key, keys, leaf)
                leaves.append(leaf)
            parts.data.append((name, treedef, leaves))
        return parts

    def add(self, where: _Where, key: str, keys: tuple[str | int, ...], value: Any) -> None:
        if isinstance(value, nnx.Pytree):
            self.nodes.append((where, _Node.of(key, keys, value)))
        elif isinstance(value, nnx.Variable) and not is_array(raw_value(value)):
            self.fixed.append((where, key, value))
        elif isinstance(value, nnx.Variable) or is_array(value):
            self.own.append((where, key, keys, value))

    def build(self, own: list[Any], nodes: list[Any], fixed: list[Any]) -> dict[str, Any]:
        """The data attributes with ``own``, ``nodes`` and ``fixed`` (in the order of those fields) in place."""
        data = [(name, treedef, list(leaves)) for name, treedef, leaves in self.data]
        items = {at: dict(entries) for at, (_, entries) in self.containers.items()}
        places = [w for w, *_ in self.own] + [w for w, _ in self.nodes] + [w for w, *_ in self.fixed]
        for (attr, index, sub), value in zip(places, own + nodes + fixed):
            if sub is None:
                data[attr][2][index] = value
            else:
                items[(attr, index)][sub] = value
        for (attr, index), (kind, entries) in self.containers.items():
            values = items[(attr, index)]
            data[attr][2][index] = ([values[k] for k, _ in entries] if kind is nnx.List
                                    else _DictView((k, values[k]) for k, _ in entries))
        return {name: jax.tree_util.tree_unflatten(treedef, leaves) for name, treedef, leaves in data}




def _struct(array: Any) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(tuple(array.shape), array.dtype)


def _origins(parts: _Parts) -> list[tuple[Any, tuple[str | int, ...]]]:
    """The user's Variable and its key path behind each fresh Variable of a traced call, in creation order."""
    origins: list[tuple[Any, tuple[str | int, ...]]] = [(value, keys) for _, _, keys, value in parts.own
                                                          if isinstance(value, nnx.Variable)]
    for _, node in parts.nodes:
        origins += [(var, (*node.keys, *_path_keys(path))) for path, var in [*node.variables, *node.constants]
                    if isinstance(var, nnx.Variable)]
    origins += [(value, (key,)) for _, key, value in parts.fixed]
    return origins


def _trace(parts: _Parts, example: Example, naming: Any) -> tuple[Any, list[ChildCall], list[InputRole],
                                                                  list[Any], list[str], Any, Any, list[Written]]:
    module = parts.module
    roles: list[InputRole] = []
    sources: list[Any] = []
    for _, key, keys, value in parts.own:
        roles.append(InputRole("param", name=key, array=raw_value(value), path=keys))
        sources.append(value)
    for _, node in parts.nodes:
        for path, var in node.variables:
            path_keys = (*node.keys, *_path_keys(path))
            roles.append(InputRole("param", name=".".join(str(k) for k in path_keys), array=raw_value(var),
                                   path=path_keys))
            sources.append(var)
    given = example.input_names[0] if example.input_names else None
    first = example.args[0] if example.args else None
    data_names = given if given is not None else (
        default_input_names(len(first.shape), (naming.seq, naming.features), first.dtype, leading=(naming.batch,))
        if hasattr(first, "shape") else ())
    roles, dynamic, args_treedef, side_names = input_roles(example, type(module).__call__, roles, data_names,
                                                           names_fixed=given is not None)
    flat_args = jax.tree_util.tree_leaves((example.args, dict(example.kwargs)))
    calls: list[ChildCall] = []
    statics = NnxStatics.of(module)
    writes = Writes()
    origins = _origins(parts)

    def traced_call(own: list[Any], node_leaves: list[list[Any]], dynamic_args: list[Any]) -> Any:
        fresh: list[tuple[str, nnx.Variable, Any]] = []
        own_values = []
        for (_, key, _, value), leaf in zip(parts.own, own):
            if isinstance(value, nnx.Variable):
                variable = fresh_variable(value, leaf)
                fresh.append((key, variable, leaf))
                own_values.append(variable)
            else:
                own_values.append(leaf)
        node_values = []
        for (_, node), leaves in zip(parts.nodes, node_leaves):
            rebuilt, pairs = node.rebuild(leaves)
            fresh.extend(pairs)
            node_values.append(_proxy(node, rebuilt, calls) if isinstance(node.value, nnx.Module) else rebuilt)
        fixed_values = []
        for _, key, value in parts.fixed:
            variable = fresh_variable(value, raw_value(value))
            fresh.append((key, variable, raw_value(value)))
            fixed_values.append(variable)
        attrs = parts.build(own_values, node_values, fixed_values)
        traced_module = build_module(type(module), statics, attrs)
        values = list(flat_args)
        for position, value in zip(dynamic, dynamic_args):
            values[position] = value
        args, kwargs = jax.tree_util.tree_unflatten(args_treedef, values)
        before = set(vars(traced_module))
        out = type(module).__call__(traced_module, *args, **kwargs)
        changed = [name for name, value in attrs.items() if vars(traced_module).get(name) is not value]
        changed += sorted(set(vars(traced_module)) - before)
        if changed:
            raise Untraceable(f"it assigns attributes during the call ({', '.join(changed)}; sow and caches "
                              "need a Foreign module)")
        found = written_variables(fresh, origins)
        if writes.known is None:
            writes.known = found
        elif [w.key for w in found] != [w.key for w in writes.known]:
            raise Untraceable("it writes other Variables when called at other sizes")
        # The new values are extra outputs; WritesState stores them (a module without writes traces as before).
        return (out, tuple(w.value for w in found)) if found else out

    own_structs = [_struct(raw_value(value)) for *_, value in parts.own]
    node_structs = [[_struct(raw_value(var)) for _, var in node.variables] for _, node in parts.nodes]
    dynamic_structs = [flat_args[i] for i in dynamic]
    closed, out_shape = trace_call(traced_call, own_structs, node_structs, dynamic_structs)
    retrace = retracer(traced_call, (own_structs, node_structs), dynamic_structs, calls)
    # Only the shapes of the written values outlive the trace (no tracer escapes it).
    written = [dataclasses.replace(w, value=_struct(w.value)) for w in writes.known or []]
    return closed, calls, roles, sources, side_names, jax.tree_util.tree_structure(out_shape), retrace, written


def _axis_label(key: str) -> str:
    return re.sub(r"\W+", "_", key).strip("_") or "out"


def _foreign_names(call: ChildCall, node: _Node, structs: Any, arg_names: Any) -> tuple[tuple[str, ...],
                                                                                       tuple[str, ...]]:
    """Input and output names of an untraceable child without a rule (called on batched positional arrays).

    Raises:
      Untraceable: If the child is called on an axis without a name or does not return one array.
    """
    names = tuple(arg_names[0]) if arg_names else ()
    if None in names:
        raise Untraceable(f"the child {call.key!r} (no rule, not traceable) gets a size-one axis without a name")
    leaves = [raw_value(var) for _, var in node.variables]
    out = jax.eval_shape(lambda arrays: node.run(leaves, *call.rebuild_args(arrays)), list(structs))
    if not isinstance(out, jax.ShapeDtypeStruct):
        raise Untraceable(f"the child {call.key!r} (no rule, not traceable) does not return one array")
    first = structs[0].shape if structs else ()
    label = _axis_label(call.key)
    out_names = tuple(names[i] if i < len(names) and first[i] == size else f"{label}_{i}"
                      for i, size in enumerate(out.shape))
    return names, out_names


def lift_traced(module: Any, ctx: LiftContext) -> Traced:
    """Traces ``module``'s ``__call__`` with ``ctx.example`` and lifts it as a :class:`Traced` layer.

    Args:
      module: An ``nnx.Module`` without a rule (only read, never mutated).
      ctx: A lift context carrying an :class:`~pzbridge.bridge.tracing.example.Example`.

    Returns:
      The traced layer.

    Raises:
      Untraceable: If the code cannot be traced or expressed.

    Example:
        >>> import jax.numpy as jnp
        >>> from pzbridge.bridge.nnx.traversal import new_lift_context
        >>> class Double(nnx.Module):
        ...     def __call__(self, x): return x * 2
        >>> ctx = new_lift_context().with_example(Example.of((jnp.ones((2, 3)),)))
        >>> lift_traced(Double(), ctx).convention.inputs
        (('batch', 'features'),)
    """
    example: Example = ctx.example
    parts = _Parts.of(module)
    closed, calls, roles, sources, side_names, out_treedef, retrace, written = _trace(parts, example, ctx.naming)
    source_of = {id(role): source for role, source in zip(roles, sources)}
    nodes = {node.key: node for _, node in parts.nodes}
    lifted: dict[str, Any] = {}
    plain = ctx.child()

    def child_handler(call: ChildCall, structs: Any, arg_names: Any, stack: tuple[str, int] | None = None) -> ChildSpec:
        node = nodes[call.key]
        child = node.value
        args, kwargs = call.rebuild_args(structs)
        args = without_default_nones(type(child).__call__, args)
        traced_child = False
        if call.key not in lifted:
            child_ctx = plain.child(*node.keys)
            if NNX.lift_rule_for(type(child)) is None or type(child) is nnx.Sequential:  # Traces its custom items.
                names = tuple(tuple(n if n is not None else f"axis{i}" for i, n in enumerate(arg))
                              for arg in arg_names)
                child_ctx = child_ctx.with_example(Example(tuple(args), dict(kwargs), names))
            if stack is not None:  # one block of a stack run by nnx.scan / lax.scan
                lifted[call.key] = lift_stacked_block(child, child_ctx, stack[0])
            else:
                lifted[call.key] = ctx.lift_node(child, child_ctx)
        layer = lifted[call.key]
        convention = None
        if isinstance(layer, Traced):
            traced_child = True
            convention = layer.convention
        elif isinstance(layer, Foreign):
            in_names, out_names = _foreign_names(call, node, structs, arg_names)
            layer = with_names(layer, in_names, out_names)
            lifted[call.key] = layer
            convention = CallingConvention((in_names,), out_names)
        else:
            rule = NNX.lift_rule_for(type(child))
            per_call = getattr(rule, "call_convention", None)  # Names by call (a mask=, a norm's middle axes).
            convention = per_call(child, ctx.naming, args, kwargs) if per_call is not None else None
            for_call = getattr(rule, "for_call", None)  # The lifted layer told what this call names.
            if convention is not None and for_call is not None:
                layer = lifted[call.key] = for_call(layer, convention)
            convention = convention or NNX.convention_of(child, ctx.naming)
        param_names = call_names(type(child).__call__, args, kwargs)
        return child_spec(layer, convention, args, kwargs, traced_child, param_names)

    def param_handler(role: InputRole, storage_names: tuple[str, ...]) -> Any:
        return lift_variable(source_of[id(role)], plain.child(*role.path), storage_names)

    def param_hint(role: InputRole) -> tuple[str, ...] | None:
        lifted_already = ctx.shared.by_identity.get(id(source_of[id(role)]))
        value = getattr(lifted_already, "value", None)
        return tuple(value.named_shape) if pzb_nx.is_namedarray(value) and not value.positional_shape else None

    graph = convert(closed, roles, child_handler, param_handler, param_hint, renames_for(ctx), retrace)
    body = build_layer(graph, out_treedef)
    written_labels: dict[str, str] = {}
    if written:  # The traced function returned (out, new values): store them, return out.
        targets, storage = write_targets(
            graph, written, plain, lambda write, names: lift_variable(write.source, plain.child(*write.keys), names))
        body = WritesState(body, targets, storage)
        out_treedef = out_treedef.children()[0]
        own_keys = {key for _, key, _, _ in parts.own}
        written_labels = {w.key: t.label for w, t in zip(written, targets) if w.key in own_keys}
    called = {call.key for call in calls}
    by_id = {id(node.value): lifted[key] for key, node in nodes.items() if key in called}

    def fill_node(child: Any, child_ctx: LiftContext) -> Any:
        if id(child) in by_id:
            return by_id[id(child)]
        # A child the code never calls (a holder of Variables the parent reads and writes) runs no code of its
        # own: kept Foreign for rebuilding even under strict=, its Variables are the ones the body uses.
        return ctx.lift_node(child, dataclasses.replace(child_ctx, strict=False))

    foreign = lift_foreign(module, dataclasses.replace(plain, lift_node=fill_node))
    labels = {role.name: ctx.shared.by_identity[id(source_of[id(role)])].label
              for i, role in enumerate(roles[: len(parts.own)]) if i not in graph.unused_params}
    labels.update(written_labels)  # an own Variable only written lives in the body too
    children = {key: _mark_in_body(child, key, set(lifted) | set(labels)) for key, child in foreign.children.items()}
    convention = traced_convention(graph, roles, side_names, jax.tree_util.treedef_is_leaf(out_treedef))
    return make_traced(body, foreign.template, children, list(lifted), labels, convention)


@pytree_dataclass
class InBody(Struct):
    """Stands, in a container kept for lowering, for an item that lives in the traced body.

    An ``nnx.List`` whose items the code calls is kept (as a ``LayerList``) to
    rebuild the original module, but its called items are in the traced body,
    possibly edited; lowering puts them back from there.

    Attributes:
      key: The item's key in the traced module (``layers[0]``) (static).

    Example:
        >>> InBody("layers[0]").key
        'layers[0]'
    """

    key: str = static_field()


def _mark_in_body(child: Any, key: str, in_body: set[str]) -> Any:
    if isinstance(child, LayerList):
        return LayerList([InBody(f"{key}[{i}]") if f"{key}[{i}]" in in_body else item
                          for i, item in enumerate(child.items)])
    if isinstance(child, LayerDict):
        return LayerDict({k: InBody(f"{key}.{k}") if f"{key}.{k}" in in_body else item
                          for k, item in child.items.items()})
    return child


def _fill_in_body(child: Any, children: dict[str, Any]) -> Any:
    fill = lambda item: children[item.key] if isinstance(item, InBody) else item  # noqa: E731
    if isinstance(child, LayerList):
        return LayerList([fill(item) for item in child.items])
    if isinstance(child, LayerDict):
        return LayerDict({k: fill(item) for k, item in child.items.items()})
    return child


def traced_or_foreign(module: Any, ctx: LiftContext) -> Any:
    """Lifts an NNX module without a rule: traced when ``ctx`` has an example, else ``Foreign``.

    An untraceable module stays ``Foreign`` (or raises with ``strict=True``,
    naming the reason).

    Example:
        >>> from pzbridge.bridge.nnx.traversal import new_lift_context
        >>> class Id(nnx.Module):
        ...     def __call__(self, x): return x
        >>> type(traced_or_foreign(Id(), new_lift_context())).__name__
        'Foreign'
    """
    if ctx.example is None:
        return foreign_or_error(module, ctx)
    try:
        return lift_traced(module, ctx)
    except Untraceable as reason:
        return foreign_or_error(module, ctx.child(), f"not traceable: {reason}")


NNX.set_unknown_handler(traced_or_foreign)


@nnx_rule(lifted=(Traced,))
class TracedRule:
    """A ``Traced`` lowers to its original class while the glue is as traced, else to an ``NnxAdapter``."""

    def lower(self, layer: Traced, ctx: LowerContext) -> Any:
        children = children_for_rebuild(layer)
        if children is not None and isinstance(layer.template, NnxTemplate):
            children = {key: _fill_in_body(child, children) for key, child in children.items()}
            return layer.template.rebuild(children, ctx)
        return NnxAdapter.wrap(layer, ctx, layer.convention)
