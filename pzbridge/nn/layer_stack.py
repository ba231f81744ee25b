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

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from pzbridge.core import named_axes as nx
from pzbridge.core.errors import NamedAxisError
from pzbridge.core.struct import pytree_dataclass, static_field
from pzbridge.core.tree_util import tree_equal
from pzbridge.core.variables_binding import bind_variables, unbind_variables
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


def _stack_values(values: list[Any], axis: str, label: str) -> Any:
    """Stacks one variable's per-layer values (pytrees of arrays) along ``axis``, leaf by leaf."""
    def stack(*leaves: Any) -> nx.NamedArrayBase:
        named = [leaf if nx.is_namedarray(leaf) else nx.wrap(jnp.asarray(leaf)) for leaf in leaves]
        if any(axis in leaf.named_shape for leaf in named):
            raise NamedAxisError(
                f"stack_layers: variable {label!r} already has the stack axis {axis!r}. "
                "Fix: build unstacked layers, or stack along another axis name."
            )
        return nx.stack(named, axis)

    try:
        return jax.tree_util.tree_map(stack, *values, is_leaf=nx.is_namedarray)
    except ValueError as exc:
        raise NamedAxisError(
            f"stack_layers: variable {label!r} has values of different structures across layers ({exc}). "
            "Fix: build every layer with the same configuration."
        ) from None


def stack_layers(layers: Sequence[Any], axis: str = STACK_AXIS) -> Any:
    """Merges identically-built layers into one block whose variables carry ``axis``.

    Variable ``label`` of the result holds layer ``i``'s value at index ``i``
    of ``axis`` (a new Parameter / StateVariable with the first layer's label
    and metadata). Slots stay slots; everything else must be equal across
    layers, since only variables can differ per layer.

    Args:
      layers: Layers with one structure and one set of labels.
      axis: The new axis name.

    Returns:
      One block, the body of a :class:`LayerStack`.

    Raises:
      NamedAxisError: If the layers differ in structure, labels or
        non-variable content, or a value already carries ``axis``.

    Example:
        >>> a = pzb.nn.AddBias(pzb.Parameter(pzb.nx.wrap(jnp.array([1.0, 2.0]), "f"), "b"))
        >>> b = pzb.nn.AddBias(pzb.Parameter(pzb.nx.wrap(jnp.array([3.0, 4.0]), "f"), "b"))
        >>> stack_layers([a, b]).bias.value.untag("layers", "f").unwrap().tolist()
        [[1.0, 2.0], [3.0, 4.0]]
    """
    if not layers:
        raise NamedAxisError("stack_layers: no layers given. Fix: pass at least one layer.")
    unbound = [unbind_variables(layer) for layer in layers]
    first_tree, first_vars = unbound[0]
    labels = [v.label for v in first_vars]
    for i, (tree, variables) in enumerate(unbound[1:], start=1):
        if [v.label for v in variables] != labels or [type(v) for v in variables] != [type(v) for v in first_vars]:
            raise NamedAxisError(
                f"stack_layers: layer {i} has variables {[v.label for v in variables]}, layer 0 has {labels}. "
                "Fix: build every layer with the same name, so each label exists once per layer."
            )
        if not tree_equal(tree, first_tree):
            raise NamedAxisError(
                f"stack_layers: layer {i} differs from layer 0 outside its variables (configuration or constant "
                "arrays), which a stack cannot hold per layer. Fix: build the layers with one configuration, or "
                "make the differing arrays Parameters."
            )
    stacked = [
        type(var)(_stack_values([variables[j].value for _, variables in unbound], axis, var.label), var.label,
                  dict(var.metadata))
        for j, var in enumerate(first_vars)
    ]
    return bind_variables(first_tree, stacked, allow_missing=True)  # slots (no rng) stay slots


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
        # A state's value may be any pytree (a dict, a cache Struct, ...): its named-array leaves that carry
        # the axis are per-layer and sliced; every other leaf is the same at every step.
        self.state_parts: list[tuple[list[Any], Any, list[bool]]] = []
        for position in self.states:
            parts, treedef = jax.tree_util.tree_flatten(self.leaves[position].value, is_leaf=nx.is_namedarray)
            self.state_parts.append((parts, treedef, [_carries(part, axis) for part in parts]))

    def scanned(self) -> tuple[list[Any], list[Any]]:
        """The values sliced per step: ``(sliced leaves' values, per state: its leaves carrying the axis)``."""
        values = [self.leaves[p].value if _is_variable(self.leaves[p]) else self.leaves[p] for p in self.sliced]
        states = [tuple(part for part, sliced in zip(parts, mask) if sliced) for parts, _, mask in self.state_parts]
        return values, states

    def body(self, slices: list[Any], state_slices: list[Any]) -> tuple[Any, list[StateVariable], list[Any]]:
        """One step's body, its fresh state variables, and their initial values."""
        replace: dict[int, Any] = {}
        for position, piece in zip(self.sliced, slices):
            leaf = self.leaves[position]
            replace[id(leaf)] = ParameterValue(piece, leaf.label, dict(leaf.metadata)) if _is_variable(
                leaf) else piece
        fresh, initial = [], []
        for position, (parts, treedef, mask), piece in zip(self.states, self.state_parts, state_slices):
            state = self.leaves[position]
            own = iter(piece)
            value = treedef.unflatten([next(own) if sliced else part for part, sliced in zip(parts, mask)])
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

    @classmethod
    def from_sublayer_builder(
        cls,
        builder: Callable[..., Layer],
        stack_axis: str,
        stack_axis_size: int,
        init_base_rng: jax.Array | None,
        builder_kwargs: Mapping[str, Any] | None = None,
    ) -> LayerStack:
        """Builds ``stack_axis_size`` layers with ``builder`` and stacks their variables along ``stack_axis``.

        Layer ``i`` is ``builder(init_base_rng=jax.random.fold_in(init_base_rng, i), **builder_kwargs)``,
        so each layer gets its own weights; with ``init_base_rng=None`` the
        builder makes slots and the stack holds one slot per label (bind
        stacked values later).

        Args:
          builder: Makes one layer; takes ``init_base_rng`` as a keyword (a
            ``from_config`` with its other arguments in ``builder_kwargs``).
          stack_axis: The stack axis name.
          stack_axis_size: The number of layers.
          init_base_rng: Base key, or None for slots.
          builder_kwargs: Other keyword arguments of ``builder``.

        Returns:
          The stack.

        Raises:
          NamedAxisError: If the size is not positive or the built layers
            cannot be stacked (see :func:`stack_layers`).

        Example:
            >>> stack = LayerStack.from_sublayer_builder(pzb.nn.Affine.from_config, "layers", 3, jax.random.key(0),
            ...     {"name": "block", "input_axes": {"features": 2}, "output_axes": {"features": 2}})
            >>> stack.size, dict(stack.body.sublayers[0].weights.value.named_shape)
            (3, {'features': 2, 'features_out': 2, 'layers': 3})
        """
        if not isinstance(stack_axis_size, int) or stack_axis_size < 1:
            raise NamedAxisError(
                f"LayerStack.from_sublayer_builder: stack_axis_size must be a positive int, found "
                f"{stack_axis_size!r}. Fix: pass the number of layers."
            )
        kwargs = dict(builder_kwargs or {})
        keys = [None if init_base_rng is None else jax.random.fold_in(init_base_rng, i)
                for i in range(stack_axis_size)]
        layers = [builder(init_base_rng=key, **kwargs) for key in keys]
        return cls(stack_layers(layers, stack_axis), stack_axis)

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
