"""Lifting and lowering stacked modules: one block whose arrays have a leading stack axis.

``eqx.filter_vmap(make_block)(keys)`` and ``nnx.vmap``-built layers are one
module whose arrays all start with the stack axis. Such a module lifts as
one block (lifted by its own rule, or traced) whose parameters carry that
axis as a named axis, ``layers``; :class:`~pzbridge.nn.LayerStack` runs it.

Lifting: block 0 is lifted once to get the structure (names, labels,
layers), then every parameter's stacked value is computed by lifting a
block under ``jax.vmap`` over the stack axis, so rules that reshape or
transpose a weight stack correctly. Lowering is the mirror image: the block
is lowered under ``jax.vmap`` over the stacked values, which gives the
framework's stacked module exactly as ``filter_vmap`` / ``nnx.vmap`` makes it.

Example:
    >>> import jax, equinox as eqx
    >>> import pzbridge as pzb
    >>> keys = jax.random.split(jax.random.key(0), 3)
    >>> stacked = eqx.filter_vmap(lambda k: eqx.nn.Linear(4, 4, key=k))(keys)
    >>> lifted = pzb.lift(stacked)
    >>> type(lifted.body).__name__, lifted.body.size
    ('LayerStack', 3)
    >>> bool((pzb.lower(lifted).weight == stacked.weight).all())
    True
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import jax

from pzbridge.bridge.context import LiftContext, LowerContext, _Shared
from pzbridge.bridge.tracing.graph_types import Untraceable
from pzbridge.core import named_axes as nx
from pzbridge.core.errors import LiftError, PzbridgeError
from pzbridge.core.random_stream import RandomStream
from pzbridge.core.selectors import select
from pzbridge.core.variables_kinds import (
    AbstractVariableValue,
    LabeledVariable,
    Parameter,
    ParameterValue,
    StateVariable,
)
from pzbridge.nn.layer_stack import (
    STACK_AXIS,
    LayerStack,
    distinct_variables,
    stacked_variables,
    with_slices,
)


def stack_size(leaves: Sequence[Any]) -> int | None:
    """The common leading size of ``leaves`` (all arrays of rank >= 1), or None.

    Example:
        >>> import jax.numpy as jnp
        >>> stack_size([jnp.ones((3, 2)), jnp.ones(3)]), stack_size([jnp.ones((3, 2)), jnp.ones(2)])
        (3, None)
    """
    sizes = {leaf.shape[0] if len(leaf.shape) else None for leaf in leaves}
    return sizes.pop() if len(sizes) == 1 and None not in sizes else None


def _unique(leaves: Sequence[Any]) -> tuple[list[Any], list[int]]:
    unique: list[Any] = []
    position: dict[int, int] = {}
    index = []
    for leaf in leaves:
        if id(leaf) not in position:
            position[id(leaf)] = len(unique)
            unique.append(leaf)
        index.append(position[id(leaf)])
    return unique, index


def _is_variable(node: Any) -> bool:
    return isinstance(node, (LabeledVariable, AbstractVariableValue))


def _same_buffer_stacked(value: Any, slices: dict[int, Any], axis: str) -> Any | None:
    """The stacked value of a parameter whose value is one block's slice as it is (no rule reshaped it), or None.

    Most rules wrap a module's array without touching it, so the stacked
    value is the stacked array itself, named: the very buffer of the user's
    module, with no ``jax.vmap`` run.
    """
    stacked = slices.get(id(getattr(value, "data_array", None)))
    if (stacked is None or type(value) is not nx.NamedArray or value.positional_shape
            or tuple(value.named_shape.values()) != tuple(value.data_array.shape)):
        return None
    return nx.NamedArray(stacked, {axis: int(stacked.shape[0]), **value.named_shape})


def _scratch(ctx: LiftContext) -> LiftContext:
    # Same path, naming and trace cache; its own variables (they are replaced by stacked ones).
    return dataclasses.replace(ctx, shared=_Shared(extras=ctx.shared.extras))


Split = Callable[[Any], "tuple[list[Any], Callable[[Sequence[Any]], Any]]"]
"""A framework's ``split(module) -> (arrays, rebuild)``: ``rebuild(per_block_arrays)`` makes one block."""


def _first(leaf: Any) -> Any:
    if isinstance(leaf, jax.ShapeDtypeStruct):
        return jax.ShapeDtypeStruct(tuple(leaf.shape[1:]), leaf.dtype)
    return leaf[0]


def lift_stacked(module: Any, ctx: LiftContext, split: Split, axis: str = STACK_AXIS) -> Any:
    """Lifts a stacked module as one block whose parameters carry ``axis``.

    Args:
      module: The stacked module (for messages).
      ctx: The context at the module's path (its example, if any, is one
        block's call).
      split: The framework's :data:`Split` (the module's arrays, each with
        the stack axis in front, and how to build one block from slices).
      axis: The name of the stack axis.

    Returns:
      The lifted block; wrap it in :class:`~pzbridge.nn.LayerStack` to run it.

    Raises:
      LiftError: If a block holds state that is not a named array (a random
        stream's counter) or arrays whose axes have no names (a ``Foreign`` block), which cannot be stacked yet
        (``Untraceable`` instead while tracing a parent without ``strict``,
        so that the parent stays ``Foreign``).
    """
    leaves, rebuild = split(module)
    unique, index = _unique(leaves)

    def block(per_block: Sequence[Any]) -> Any:
        return rebuild([per_block[i] for i in index])

    scratch = _scratch(ctx)
    abstract = any(isinstance(leaf, jax.ShapeDtypeStruct) for leaf in unique)
    if abstract:  # a model built with eqx.filter_eval_shape / nnx.eval_shape: shapes only
        unique = [jax.ShapeDtypeStruct(tuple(leaf.shape), leaf.dtype) for leaf in unique]
    first = [_first(leaf) for leaf in unique]
    lifted = ctx.lift_node(block(first), scratch)
    variables = distinct_variables(lifted)
    streams = {id(stream.offset) for stream in select(lifted).at_instances_of(RandomStream).get_sequence()}
    for variable in variables:
        if not isinstance(variable, (Parameter, ParameterValue, StateVariable)) or not nx.is_namedarray(
                variable.value):
            what = ("a random stream (a Dropout's RNG counter and key per block)" if id(variable) in streams
                    else "state that is not a named array" if isinstance(variable, StateVariable)
                    else "an array with unnamed axes")
            error = Untraceable if ctx.example is not None and not ctx.strict else LiftError  # traced: parent Foreign
            raise error(
                f"{ctx.where}: the stacked {type(module).__qualname__} holds {what} ({variable.label!r}), which "
                "a layer stack cannot carry yet. Fix: lift the layers unstacked (a list of blocks), or keep this "
                "module Foreign (lift without example inputs)."
            )

    slices = {id(s): unique[i] for i, s in enumerate(first)}
    stacked_values = [_same_buffer_stacked(v.value, slices, axis) for v in variables]
    if any(value is None for value in stacked_values):
        # Some rule reshaped or transposed a weight: lift a block under vmap to stack its values exactly.
        def values(per_block: Sequence[Any]) -> list[Any]:
            return [v.value for v in distinct_variables(ctx.lift_node(block(per_block), _scratch(ctx)))]

        mapped = jax.eval_shape(jax.vmap(values), unique) if abstract else jax.vmap(values)(unique)
        stacked_values = [value if value is not None else again.tag_prefix(axis)
                          for value, again in zip(stacked_values, mapped)]
    sources = {id(v): slices.get(key) for key, v in scratch.shared.by_identity.items()
               if isinstance(v, LabeledVariable)}
    replacements: dict[int, Any] = {}
    for variable, value in zip(variables, stacked_values):
        if isinstance(variable, ParameterValue):  # a frozen value (an adapter's array): no sharing to keep
            replacements[id(variable)] = ParameterValue(value, variable.label, dict(variable.metadata))
            continue
        source = sources.get(id(variable))
        # Batch statistics stay state: one per block, sliced per step and written back stacked by the LayerStack.
        kind = StateVariable if isinstance(variable, StateVariable) else Parameter
        replacements[id(variable)] = ctx.variable(
            kind, source if source is not None else object(), lambda value=value: value, variable.label,
            dict(variable.metadata))
    return jax.tree_util.tree_map(lambda leaf: replacements.get(id(leaf), leaf), lifted, is_leaf=_is_variable)


def stack_or_none(module: Any, ctx: LiftContext, split: Split,
                  convention_of: Callable[[Any], Any] = lambda block: None) -> LayerStack | None:
    """``module`` lifted as a :class:`~pzbridge.nn.LayerStack` when its arrays share a leading axis, else None.

    What a rule table's stacked handler does for a module its rule could not
    lift; a failed attempt leaves ``ctx`` as it was. ``convention_of(block)``
    gives the calling convention of one block (the stack's own).
    """
    leaves, rebuild = split(module)
    if not leaves or stack_size(leaves) is None:
        return None
    undo = ctx.undo_point()
    try:
        block = lift_stacked(module, ctx.with_example(None), split)
    except (PzbridgeError, ValueError, TypeError):
        undo()
        return None
    convention = getattr(block, "convention", None) or convention_of(rebuild([_first(leaf) for leaf in leaves]))
    return LayerStack(block, STACK_AXIS, convention=convention)


def lower_stacked(stack: LayerStack, ctx: LowerContext, vmap: Callable[..., Any],
                  eval_shape: Callable[..., Any] | None = None) -> Any:
    """Lowers a plain :class:`~pzbridge.nn.LayerStack` to the framework's stacked module.

    Args:
      stack: A stack with one carried value and no other inputs or outputs.
      ctx: The lowering context (its framework's rules lower one block).
      vmap: The framework's vmap for functions returning modules
        (``eqx.filter_vmap``; NNX splits and merges around ``jax.vmap``).
      eval_shape: The framework's ``eval_shape`` for such functions, used
        when the weights are abstract (``jax.ShapeDtypeStruct``).

    Returns:
      The stacked module.
    """
    variables = stacked_variables(stack.body, stack.axis)
    values = [v.value.untag_prefix(stack.axis).with_positional_prefix() for v in variables]

    def one(per_block: Sequence[Any]) -> Any:
        fresh = LowerContext(ctx.framework, ctx.lower_node, ctx.path)
        return fresh.lower_node(with_slices(stack.body, variables, list(per_block)), fresh)

    abstract = any(isinstance(v.data_array, jax.ShapeDtypeStruct) for v in values)
    if abstract and eval_shape is not None:
        return eval_shape(vmap(one), values)
    return vmap(one)(values)


def is_plain_stack(layer: Any) -> bool:
    """True for a :class:`~pzbridge.nn.LayerStack` of one block (lowerable to a stacked module).

    Example:
        >>> import pzbridge as pzb
        >>> is_plain_stack(LayerStack(pzb.nn.Identity())), is_plain_stack(LayerStack(pzb.nn.Identity(), xs_count=1))
        (True, False)
    """
    return (isinstance(layer, LayerStack) and layer.carry_count == 1 and not layer.const_count
            and not layer.xs_count and not layer.ys_count and not layer.reverse)
