"""Framework-neutral steps of traced lifting: roles of the traced inputs, child specs, the ``Traced`` layer.

The framework bridges trace a module their own way (how to put proxies in
place of children, how modules are called) and hand the jaxpr here. This
module turns it into a :class:`~pzbridge.nn.dataflow.Traced` layer, and
decides at lowering time whether the glue is still the traced one (then the
original class is rebuilt around the possibly edited children) or not (then
the edited graph runs in an adapter).

Example:
    >>> import jax.numpy as jnp
    >>> default_input_names(3, ("seq", "features"))
    ('axis0', 'seq', 'features')
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax

from pzbridge.bridge.lifted import CallingConvention
from pzbridge.bridge.tracing.example import Example
from pzbridge.bridge.tracing.graph_types import ChildSpec, Graph, InputRole, Untraceable
from pzbridge.bridge.tracing.trace_log import note_failure, note_output
from pzbridge.core.selectors import select
from pzbridge.core.tree_util import tree_equal
from pzbridge.core.variable_base import AbstractVariable
from pzbridge.core.variables_kinds import AbstractVariableValue
from pzbridge.nn.dataflow import CallChild, Traced
from pzbridge.nn.layer_stack import LayerStack


class _ChildMarker:
    """Stands for a child layer in a glue signature (children may be edited without changing the glue)."""

    def __repr__(self) -> str:
        return "<child>"


_MARKER = _ChildMarker()


def default_input_names(rank: int, trailing: Sequence[str], dtype: Any = None,
                        leading: Sequence[str] = ()) -> tuple[str, ...]:
    """Names for an input of ``rank`` axes: ``leading`` first, the last ones from ``trailing``, ``axisN`` between.

    Integer inputs are token ids: their last axis is the sequence (``trailing``
    minus its last name). At least one trailing name is kept, so ``leading``
    names (NNX's ``batch``) go only to inputs of rank two or more.

    Args:
      rank: The input's number of axes.
      trailing: Names for the last axes (``("seq", "features")``).
      dtype: The input's dtype (integers drop the last trailing name).
      leading: Names for the first axes (``("batch",)`` for batched NNX code).

    Example:
        >>> default_input_names(1, ("seq", "features")), default_input_names(1, ("seq", "features"), "int32")
        (('features',), ('seq',))
        >>> default_input_names(2, ("seq", "features"), leading=("batch",))
        ('batch', 'features')
        >>> default_input_names(2, ("seq", "features"), "int32", leading=("batch",))
        ('batch', 'seq')
    """
    if dtype is not None and jax.numpy.issubdtype(dtype, jax.numpy.integer):
        trailing = tuple(trailing)[:-1]
    first = tuple(leading)[: max(min(len(leading), rank - 1), 0)]
    count = min(len(tuple(trailing)), rank - len(first))
    last = tuple(trailing)[len(tuple(trailing)) - count:] if count > 0 else ()
    middle = tuple(f"axis{i}" for i in range(len(first), rank - len(last)))
    return first + middle + last


def call_names(fn: Callable[..., Any], args: Sequence[Any], kwargs: Mapping[str, Any]) -> list[str]:
    """The parameter name each positional argument binds to in ``fn(self, *args, **kwargs)``.

    Example:
        >>> def call(self, x, mask=None): ...
        >>> call_names(call, [1, 2], {})
        ['x', 'mask']
    """
    try:
        params = [p for p in inspect.signature(fn).parameters.values()][1:]
    except (TypeError, ValueError):
        params = []
    names = []
    for index in range(len(args)):
        if index < len(params) and params[index].kind in (params[index].POSITIONAL_ONLY,
                                                            params[index].POSITIONAL_OR_KEYWORD):
            names.append(params[index].name)
        else:
            names.append(f"arg{index}")
    return names


def without_default_nones(fn: Callable[..., Any], args: Sequence[Any]) -> list[Any]:
    """``args`` without trailing ``None`` s that only repeat their parameter's ``None`` default.

    ``attn(q, k, v, None)`` is ``attn(q, k, v)`` when ``mask=None`` is the
    default, so the traced call passes arrays only.

    Example:
        >>> def call(self, x, mask=None): ...
        >>> without_default_nones(call, [1, None])
        [1]
    """
    try:
        params = [p for p in inspect.signature(fn).parameters.values()][1:]
    except (TypeError, ValueError):
        return list(args)
    args = list(args)
    while args and args[-1] is None and len(args) <= len(params) and params[len(args) - 1].default is None \
            and params[len(args) - 1].kind in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD):
        args.pop()
    return args


def input_roles(example: Example, call: Callable[..., Any], param_roles: Sequence[InputRole],
                data_names: Sequence[str], names_fixed: bool = True) -> tuple[list[InputRole], list[int], Any, list[str]]:
    """The roles of the traced inputs: the module's arrays, then the example's array arguments.

    The first positional argument is the data input; every other array
    argument is a side input named after the parameter it binds to.

    Returns:
      ``(roles, dynamic positions in the flat (args, kwargs), its treedef, side names)``.

    Raises:
      Untraceable: If the first argument is not one array.
    """
    flat, treedef = jax.tree_util.tree_flatten((example.args, dict(example.kwargs)))
    dynamic = [i for i, v in enumerate(flat) if isinstance(v, jax.ShapeDtypeStruct)]
    names = call_names(call, example.args, example.kwargs)
    arg_leaves = [jax.tree_util.tree_leaves(a) for a in example.args]
    if not example.args or len(arg_leaves[0]) != 1 or not isinstance(arg_leaves[0][0], jax.ShapeDtypeStruct):
        raise Untraceable("its first argument is not a single array (traced lifting follows one main input)")
    roles = list(param_roles)
    side_names: list[str] = []
    position = 0
    for index, leaves in enumerate(arg_leaves):
        for j, leaf in enumerate(leaves):
            if isinstance(leaf, jax.ShapeDtypeStruct):
                if index == 0:
                    roles.append(InputRole("data", names=tuple(data_names), fixed=names_fixed))
                else:
                    name = names[index] if len(leaves) == 1 else f"{names[index]}[{j}]"
                    roles.append(InputRole("side", name=name))
                    side_names.append(name)
            position += 1
    for key, value in example.kwargs.items():
        leaves = jax.tree_util.tree_leaves(value)
        for j, leaf in enumerate(leaves):
            if isinstance(leaf, jax.ShapeDtypeStruct):
                name = key if len(leaves) == 1 else f"{key}[{j}]"
                roles.append(InputRole("side", name=name))
                side_names.append(name)
    return roles, dynamic, treedef, side_names


def traced_convention(graph: Graph, roles: Sequence[InputRole], side_names: Sequence[str],
                      single_output: bool) -> CallingConvention:
    """The calling convention of a traced module: names of its input, side inputs and output.

    Example:
        >>> graph = Graph([], 1, [1], {1: ("seq", "features")}, [])
        >>> traced_convention(graph, [InputRole("data")], [], True).output
        ('seq', 'features')
    """
    ids = _input_ids(graph, roles)
    data = tuple(n for n in graph.names.get(ids.get("data", -1), ()) if n is not None)
    sides = [_side_names(graph.names.get(ids.get(("side", s), -1), ())) for s in side_names]
    output = None
    if single_output and graph.output_ids:
        returned = graph.output_names[0] if graph.output_names else graph.names.get(graph.output_ids[0], ())
        output = tuple(n for n in returned if n is not None)
    side_args = tuple(s for s in side_names if "[" not in s)
    return CallingConvention((data, *sides[: len(side_args)]), output, side_names=side_args)


def _side_names(names: Sequence[str | None]) -> tuple[str | None, ...]:
    """A side input's names from its first named axis on: a None after it (a size-1 axis) stays positional."""
    first = next((i for i, n in enumerate(names) if n is not None), len(names))
    return tuple(names[first:])


def _input_ids(graph: Graph, roles: Sequence[InputRole]) -> dict[Any, int]:
    ids: dict[Any, int] = {}
    next_id = 1
    for role in roles:
        if role.kind == "param":
            continue
        ids["data" if role.kind == "data" else ("side", role.name)] = next_id
        next_id += 1
    return ids


def trace_call(fn: Callable[..., Any], *structs: Any) -> tuple[Any, Any]:
    """``jax.make_jaxpr(fn, return_shape=True)(*structs)``, any tracing failure reported as :class:`Untraceable`.

    Example:
        >>> closed, shape = trace_call(lambda x: x * 2, jax.ShapeDtypeStruct((3,), "float32"))
        >>> [e.primitive.name for e in closed.eqns], shape.shape
        (['mul'], (3,))
    """
    try:
        closed, out_shape = jax.make_jaxpr(fn, return_shape=True)(*structs)
    except Untraceable:
        note_failure()
        raise
    except Exception as error:  # noqa: BLE001 - any tracing failure means the code is not traceable
        note_failure()
        raise Untraceable(f"its __call__ cannot be traced ({type(error).__name__}: {error})") from None
    note_output(out_shape)  # The root's output shapes, for lift's output check (see trace_log).
    return closed, out_shape


def _glue_only(body: Any) -> Any:
    """``body`` with every child call's layer cut out (what the module's own code computes)."""
    return select(body).at_instances_of(CallChild).apply(  # share_state: glue variables are compared by identity.
        lambda call: dataclasses.replace(call, layer=_MARKER), share_state=True)


def retracer(fn: Callable[..., Any], fixed: Sequence[Any], dynamic: Sequence[Any], calls: list[Any]) -> Any:
    """``fn(*fixed, dynamic)`` traced again with some dynamic inputs resized (for the converter's size check).

    The returned function maps ``{dynamic position: {axis: size}}`` to the
    ``ClosedJaxpr``, or None when the code cannot run at those sizes; child
    calls recorded meanwhile are dropped (the first trace's stay).

    Example:
        >>> retrace = retracer(lambda xs: xs[0][-1], (), [jax.ShapeDtypeStruct((6,), "float32")], [])
        >>> retrace({0: {0: 12}}).eqns[0].params["start_indices"]
        (11,)
    """
    memo: dict[Any, Any] = {}

    def retrace(sizes: Mapping[int, Mapping[int, int]]) -> Any:
        key = tuple(sorted((p, tuple(sorted(a.items()))) for p, a in sizes.items()))
        if key not in memo:
            count = len(calls)
            structs = [jax.ShapeDtypeStruct(tuple(sizes.get(j, {}).get(d, n) for d, n in enumerate(s.shape)), s.dtype)
                       for j, s in enumerate(dynamic)]
            try:
                memo[key] = jax.make_jaxpr(fn)(*fixed, structs)
            except Exception:  # noqa: BLE001 - code that cannot run at other sizes is simply not compared
                memo[key] = None
            finally:
                del calls[count:]
        return memo[key]

    return retrace


def glue_signature(body: Any) -> Any:
    """The structure of ``body`` with every child call's layer cut out, and the labels of the variables it reads.

    Example:
        >>> glue_signature(pzb.nn.Identity()) == glue_signature(pzb.nn.Identity())
        True
    """
    return _signature_of(_glue_only(body))


_VARIABLE_KINDS = (AbstractVariable, AbstractVariableValue)


def _signature_of(glue: Any) -> Any:
    leaves, treedef = jax.tree_util.tree_flatten(glue, is_leaf=lambda x: isinstance(x, (*_VARIABLE_KINDS, _ChildMarker)))
    return treedef, tuple(leaf.label for leaf in leaves if isinstance(leaf, _VARIABLE_KINDS))


def make_traced(body: Any, template: Any, children: Mapping[str, Any], child_keys: Sequence[str],
                labels: Mapping[str, str], convention: CallingConvention) -> Traced:
    """The :class:`Traced` layer of one module.

    Args:
      body: The recovered computation.
      template: The framework's rebuild recipe.
      children: Every child of the module (lifted layers and Parameters) by key.
      child_keys: Keys of the children that ``body`` calls.
      labels: For each of the module's own arrays used in ``body``, its key -> label.
      convention: The module's calling convention.
    """
    in_body = set(child_keys) | set(labels)
    extras = {key: child for key, child in children.items() if key not in in_body}
    return Traced(body, template, extras=extras, child_keys=tuple(child_keys),
                  labels=tuple(labels.items()), signature=glue_signature(body), convention=convention)


def children_for_rebuild(traced: Traced) -> dict[str, Any] | None:
    """The children to rebuild the original module with, or None when the glue was edited.

    A child called at several places must be the same everywhere (an edit
    applied to only one call site cannot be expressed by the original code).
    """
    glue = _glue_only(traced.body)
    if traced.signature is None or _signature_of(glue) != traced.signature:
        return None
    children: dict[str, Any] = dict(traced.extras)
    calls = select(traced.body).at_instances_of(CallChild).get_sequence()
    for call in calls:
        # A block of a layer stack is the stacked child itself (lowered back to one stacked module).
        layer = LayerStack(call.layer, call.stack_axis) if call.stack_axis else call.layer
        if call.name in children and not (children[call.name] is layer or tree_equal(children[call.name], layer)):
            return None
        children.setdefault(call.name, layer)
    variables: dict[str, Any] = {}
    for variable in select(glue).at_instances_of(_VARIABLE_KINDS).get_sequence():
        seen = variables.setdefault(variable.label, variable)
        if seen is not variable and not tree_equal(seen, variable):
            return None  # two variables under one label (a tie split by an edit): no single field holds both
    for key, label in traced.labels:
        if label not in variables:
            return None
        children[key] = variables[label]
    return children


def child_spec(layer: Any, convention: CallingConvention | None, call_args: Sequence[Any],
               call_kwargs: Mapping[str, Any], traced_child: bool, param_names: Sequence[str]) -> ChildSpec:
    """How the parent calls one lifted child, from the call's arguments and the child's convention.

    Positional array arguments are the child's inputs, array keyword
    arguments its side inputs; a traced child takes one input and gets its
    other positional arguments as side inputs named by its parameters.

    Raises:
      Untraceable: For argument forms the traced graph cannot pass (a
        non-array positional argument after arrays, nested containers).
    """
    def is_array(value: Any) -> bool:
        return isinstance(value, jax.ShapeDtypeStruct)

    for value in (*call_args, *call_kwargs.values()):
        if not is_array(value) and jax.tree_util.tree_leaves(value) and any(
                is_array(v) for v in jax.tree_util.tree_leaves(value)):
            raise Untraceable("a child is called with a container of arrays (pass arrays directly)")
    positional = [a for a in call_args if is_array(a)]
    if len(positional) != len(call_args):
        raise Untraceable("a child is called with a non-array positional argument")
    side = [k for k, v in call_kwargs.items() if is_array(v)]
    static = tuple((k, v) for k, v in call_kwargs.items() if not is_array(v))
    try:
        hash(static)
    except TypeError:
        raise Untraceable("a child is called with an unhashable keyword argument") from None
    if traced_child:
        data_count = 1
        side_names = tuple(param_names[1: len(positional)]) + tuple(side)
    else:
        data_count = len(positional)
        side_names = tuple(side)
    inputs = convention.inputs if convention is not None else ()
    input_names = tuple(inputs[i] if i < len(inputs) else None for i in range(data_count + len(side_names)))
    output = convention.output if convention is not None else None
    return ChildSpec(layer, data_count, side_names, static, input_names, (output,))
