"""A stack of layers with one set of weights per entry of a named axis, run by ``lax.scan``.

Models built with ``eqx.filter_vmap`` / ``nnx.vmap`` hold their blocks as
one module whose arrays have a leading stack axis, and run them with
``jax.lax.scan``. :class:`LayerStack` is that idea on named axes: its
``body`` is one block whose stacked weights carry the stack axis
(``layers``); step ``i`` runs the body with every such weight sliced at
``i``. Selectors see one block and reach every layer's weight at once;
``weight.value[{"layers": 3}]`` is block 3's.

Besides the carried activation a step may read *constants* (the same value
every step, such as an attention mask) and *per-step inputs* (arrays
carrying the stack axis, sliced like the weights), and may emit per-step
outputs, stacked along the axis; the body then takes them as side inputs
named :attr:`LayerStack.side_names` and returns a tuple.

Example:
    >>> import jax, jax.numpy as jnp
    >>> import pzbridge as pzb
    >>> w = pzb.Parameter(pzb.nx.wrap(jnp.stack([jnp.eye(2), 2 * jnp.eye(2)]), "layers", "features_out", "features"), "w")
    >>> stack = LayerStack(pzb.nn.Linear(w, ("features",), ("features",)))
    >>> out = stack(pzb.nx.wrap(jnp.array([1.0, 3.0]), "features")).unwrap("features")
    >>> out.tolist()
    [2.0, 6.0]
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from pzbridge.core import named_axes as nx
from pzbridge.core.errors import NamedAxisError
from pzbridge.core.struct import pytree_dataclass, static_field
from pzbridge.core.variables_kinds import (
    AbstractVariableValue,
    LabeledVariable,
    Parameter,
    ParameterValue,
    StateVariable,
)
from pzbridge.nn.layer import Layer
from pzbridge.nn.named_ops import AXIS_SIZES

STACK_AXIS = "layers"
"""The default name of a layer stack's axis."""


def _is_variable(node: Any) -> bool:
    return isinstance(node, (LabeledVariable, AbstractVariableValue))


def _is_leaf(node: Any) -> bool:
    return _is_variable(node) or nx.is_namedarray(node)


def _carries(value: Any, axis: str) -> bool:
    return nx.is_namedarray(value) and axis in value.named_shape


def distinct_variables(tree: Any) -> list[Any]:
    """The distinct variables and frozen values (an adapter's) of ``tree``, in tree order.

    Example:
        >>> w = pzb.Parameter(1.0, "w")
        >>> [v.label for v in distinct_variables([w, w, pzb.Parameter(2.0, "b").freeze()])]
        ['w', 'b']
    """
    found: dict[int, Any] = {}
    for leaf in jax.tree_util.tree_leaves(tree, is_leaf=_is_variable):
        if _is_variable(leaf):
            found.setdefault(id(leaf), leaf)
    return list(found.values())


def stacked_variables(tree: Any, axis: str) -> list[Any]:
    """The distinct variables (or frozen values) in ``tree`` whose value carries ``axis``, in tree order.

    Example:
        >>> w = pzb.Parameter(pzb.nx.zeros({"layers": 2, "features": 3}), "w")
        >>> [v.label for v in stacked_variables([w, w, pzb.Parameter(pzb.nx.zeros({"features": 3}), "b")], "layers")]
        ['w']
    """
    return [v for v in distinct_variables(tree) if _carries(v.value, axis)]


def with_slices(tree: Any, variables: list[Any], slices: list[Any]) -> Any:
    """``tree`` with each of ``variables`` replaced by a new ``Parameter`` (same label) holding its slice.

    What lowering a stack lowers under ``jax.vmap``: one block, whose
    parameters are ordinary variables, so every bridge lowers them as usual.

    Example:
        >>> w = pzb.Parameter(pzb.nx.zeros({"layers": 2}), "w")
        >>> block = with_slices([w], [w], [1.0])
        >>> block[0].value, block[0].label, block[0] is w
        (1.0, 'w', False)
    """
    by_id = {id(v): Parameter(s, v.label, dict(v.metadata)) for v, s in zip(variables, slices)}
    return jax.tree_util.tree_map(lambda leaf: by_id.get(id(leaf), leaf), tree, is_leaf=_is_variable)


class _Plan:
    """What one step of a stack sees: per-step slices of everything carrying the axis, fresh state variables.

    Parameters, frozen values and named arrays (patch values, masks) that carry
    the axis are sliced; state variables are replaced by fresh ones (sliced
    when they carry the axis) whose new values come back stacked.
    """

    def __init__(self, body: Any, axis: str) -> None:
        self.leaves, self.treedef = jax.tree_util.tree_flatten(body, is_leaf=_is_leaf)
        self.axis = axis
        self.sliced: list[int] = []  # leaf positions (first occurrence) of what is sliced per step
        self.states: list[int] = []  # leaf positions (first occurrence) of mutable state variables
        self.first: dict[int, int] = {}
        for position, leaf in enumerate(self.leaves):
            if id(leaf) in self.first:
                continue
            self.first[id(leaf)] = position
            if isinstance(leaf, StateVariable):
                self.states.append(position)
            value = leaf.value if _is_variable(leaf) else leaf
            if _carries(value, axis) and not isinstance(leaf, StateVariable):
                self.sliced.append(position)
        for position in self.states:
            state = self.leaves[position]
            if state.value is not None and not nx.is_namedarray(state.value) and jax.tree_util.tree_leaves(
                    state.value):
                raise NotImplementedError(
                    f"LayerStack over {axis!r}: state variable {state.label!r} holds a "
                    f"{type(state.value).__name__}; only named arrays (or None) can be carried through a stack."
                )

    def scanned(self) -> tuple[list[Any], list[Any]]:
        """The values sliced per step: ``(sliced leaves' values, stacked states' values)``."""
        values = [self.leaves[p].value if _is_variable(self.leaves[p]) else self.leaves[p] for p in self.sliced]
        states = [self.leaves[p].value for p in self.states if _carries(self.leaves[p].value, self.axis)]
        return values, states

    def body(self, slices: list[Any], state_slices: list[Any]) -> tuple[Any, list[StateVariable], list[Any]]:
        """One step's body, its fresh state variables, and their initial values."""
        replace: dict[int, Any] = {}
        for position, piece in zip(self.sliced, slices):
            leaf = self.leaves[position]
            replace[id(leaf)] = ParameterValue(piece, leaf.label, dict(leaf.metadata)) if _is_variable(
                leaf) else piece
        pieces = iter(state_slices)
        fresh, initial = [], []
        for position in self.states:
            state = self.leaves[position]
            value = next(pieces) if _carries(state.value, self.axis) else state.value
            replace[id(state)] = StateVariable(value, state.label, dict(state.metadata))
            fresh.append(replace[id(state)])
            initial.append(value)
        leaves = [replace.get(id(leaf), leaf) for leaf in self.leaves]
        return jax.tree_util.tree_unflatten(self.treedef, leaves), fresh, initial

    def write_back(self, stacked: list[Any]) -> None:
        """Stores each state variable's stacked new values (those the body wrote)."""
        for position, value in zip(self.states, stacked):
            if value is not None:
                self.leaves[position].value = value


@pytree_dataclass
class LayerStack(Layer):
    """Runs ``body`` once per entry of ``axis``, each step's output feeding the next.

    Attributes:
      body: One block; its Parameters carrying ``axis`` are the per-layer
        weights (step ``i`` sees them sliced at ``i``).
      axis: The stack axis (static).
      carry_count: How many values are carried from step to step (static).
      const_count: How many inputs are the same at every step (static).
      xs_count: How many inputs carry ``axis`` and are sliced per step (static).
      ys_count: How many per-step outputs the body returns after the carry;
        they come back stacked along ``axis`` (static).
      side_names: The body's side-input names for the carried values after
        the first, then the constants, then the per-step inputs (static).
      reverse: Run the stack from the last entry to the first (static).
      unroll: Passed to ``jax.lax.scan`` (static).
      convention: How a stacked module lifted on its own is called
        positionally (its block's calling convention), or None (static).
      length: The number of steps of a stack that slices nothing (the same
        block repeated, as ``lax.scan(..., length=n)`` / ``fori_loop``), or
        None: the length of ``axis`` in the sliced arrays (static).

    The input is the first carried value alone, or the tuple
    ``(*carry, *constants, *per_step_inputs)``; the output is the final
    carried value alone, or the tuple ``(*carry, *stacked_outputs)``. Other
    side inputs reach every step unchanged.

    Example:
        >>> b = pzb.Parameter(pzb.nx.wrap(jnp.arange(3.0), "layers"), "b")
        >>> float(LayerStack(pzb.nn.AddBias(b))(pzb.nx.wrap(jnp.array(1.0))).unwrap())
        4.0
    """

    body: Layer
    axis: str = static_field(default=STACK_AXIS)
    carry_count: int = static_field(default=1)
    const_count: int = static_field(default=0)
    xs_count: int = static_field(default=0)
    ys_count: int = static_field(default=0)
    side_names: tuple[str, ...] = static_field(default=())
    reverse: bool = static_field(default=False)
    unroll: int = static_field(default=1)
    convention: Any = static_field(default=None)
    length: int | None = static_field(default=None)

    @property
    def size(self) -> int:
        """The number of layers (the length of the stack axis).

        Example:
            >>> w = pzb.Parameter(pzb.nx.zeros({"layers": 4}), "w")
            >>> LayerStack(pzb.nn.AddBias(w)).size
            4
        """
        if self.length is not None:
            return self.length
        variables = stacked_variables(self.body, self.axis)
        if not variables:
            raise NamedAxisError(
                f"LayerStack over {self.axis!r}: no parameter of its body carries the axis, so the stack has no "
                f"length. Fix: give the per-layer weights a {self.axis!r} axis, or set LayerStack(axis=...)."
            )
        return int(variables[0].value.named_shape[self.axis])

    def __call__(self, x: Any, /, **side_inputs: Any) -> Any:
        inputs = x if self._input_count() > 1 else (x,)
        if len(inputs) != self._input_count():
            raise NamedAxisError(
                f"LayerStack over {self.axis!r}: expected {self._input_count()} inputs (carry, constants, per-step "
                f"inputs), found {len(inputs)}. Fix: pass the tuple the stack was built for."
            )
        carry = tuple(inputs[: self.carry_count])
        constants = inputs[self.carry_count: self.carry_count + self.const_count]
        xs = tuple(inputs[self.carry_count + self.const_count:])
        plan = _Plan(self.body, self.axis)

        def step(carried: tuple[Any, ...], sliced: tuple[Any, Any, tuple[Any, ...]]) -> tuple[Any, Any]:
            pieces, state_pieces, step_inputs = sliced
            body, fresh, initial = plan.body(pieces, state_pieces)
            side = dict(zip(self.side_names, (*carried[1:], *constants, *step_inputs)))
            if AXIS_SIZES in side_inputs and nx.is_namedarray(carried[0]):
                # The body's sizes follow its own input (the carry), as a traced module's follow its input.
                side[AXIS_SIZES] = (*side_inputs[AXIS_SIZES], *carried[0].named_shape.items())
            out = body(carried[0], **{**side_inputs, **side})
            outs = out if self.carry_count + self.ys_count > 1 else (out,)
            # A state the step did not write stays as it was (None: nothing to stack).
            written = [None if v.value is before else v.value for v, before in zip(fresh, initial)]
            return tuple(outs[: self.carry_count]), (tuple(outs[self.carry_count:]), written)

        values, states = plan.scanned()
        scanned: Any = (values, states, xs)
        run = step
        if self.length is not None:  # nothing is sliced: step over an index axis of that length
            scanned = (scanned, nx.wrap(jnp.arange(self.length), self.axis))

            def run(carried: tuple[Any, ...], both: tuple[Any, Any]) -> tuple[Any, Any]:
                return step(carried, both[0])

        final, (ys, written) = nx.scan(run, self.axis, carry, scanned, reverse=self.reverse, unroll=self.unroll)
        plan.write_back(written)
        outs = (*final, *ys)
        return outs if len(outs) > 1 else outs[0]

    def _input_count(self) -> int:
        return self.carry_count + self.const_count + self.xs_count
