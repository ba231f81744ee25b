"""State an Equinox adapter's layer writes, kept in an ``eqx.nn.State``; batched calls under a named ``vmap``.

A traced NNX module may update its own Variables during the call (a step
counter, running statistics of the batch, a cache; see
:mod:`pzbridge.bridge.tracing.state_writes`). Equinox modules are immutable:
their counterpart is the ``eqx.nn.State`` convention, ``y, state =
model(x, state)``. An adapter whose layer holds such writes therefore keeps
one ``eqx.nn.StateIndex`` whose value is a dict from each written
``StateVariable``'s label to its array (in the variable's storage order);
every call reads the values from the State and returns the State with the
new ones. The index keeps its initial value, so ``eqx.nn.State(adapter)``
builds the State (as ``eqx.nn.make_with_state`` would).

A converted NNX module computes on a *batch*, an Equinox model on one
example. Called under ``jax.vmap(..., axis_name="batch")`` (Equinox's own
``BatchNorm`` convention), the adapter gathers the whole batch
(:func:`gathered_inputs`), runs the NNX computation once on it, unmapped,
and returns its own example's row: what the NNX module computes, also where
examples meet (statistics of the batch written to state). Outside such a
``vmap`` each call is a batch of one.

Example:
    >>> import jax, jax.numpy as jnp
    >>> xs, row = gathered_inputs([jnp.ones(3)], "batch")  # no vmap names "batch": a batch of one
    >>> xs[0].shape, row
    ((1, 3), 0)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp

from pzbridge.bridge.across_axes import axis_bound, gathered_inputs
from pzbridge.bridge.tracing.state_writes import WritesState
from pzbridge.core import named_axes as nx
from pzbridge.core.errors import LiftError, LowerError
from pzbridge.core.selectors import select
from pzbridge.core.variables import AbstractVariableValue, StateVariableValue
from pzbridge.core.variables_kinds import FrozenMetadata
from pzbridge.nn.normalization import BatchNorm

__all__ = ["IndexMarker", "WrittenVariable", "axis_bound", "batch_norm_state_labels", "batch_statistics_axis",
           "gathered_inputs", "markers_for_indices", "new_state", "new_state_index", "split_written", "state_dict",
           "state_values", "written_variable", "written_variables"]


@dataclasses.dataclass(frozen=True)
class WrittenVariable:
    """A state variable a traced module writes: how its array sits in the ``eqx.nn.State``.

    Attributes:
      label: The ``StateVariable``'s label (its key in the State's dict).
      names: Its value's axis names in storage order (None: a raw array).
      shape: The array's shape (an ``eqx.nn.State`` entry keeps it).
      dtype: The array's dtype name.
      metadata: The variable's metadata (its NNX Variable type, ...).

    Example:
        >>> WrittenVariable("n", None, (), "int32", FrozenMetadata()).label
        'n'
    """

    label: str
    names: tuple[str, ...] | None
    shape: tuple[int, ...]
    dtype: str
    metadata: FrozenMetadata


def written_variables(layer: Any, values: Sequence[AbstractVariableValue]) -> tuple[WrittenVariable, ...]:
    """The state variables some traced module in ``layer`` writes, in order of first write.

    Args:
      layer: A lifted layer (possibly holding :class:`WritesState` layers).
      values: The layer's frozen variable values (``unbind_variables``'s).

    Returns:
      One :class:`WrittenVariable` per written variable; empty when nothing is written.

    Example:
        >>> import pzbridge as pzb
        >>> written_variables(pzb.nn.Identity(), ())
        ()
    """
    by_label = {value.label: value for value in values}
    found: dict[str, WrittenVariable] = {}
    for writes in _every_write(layer):
        for target, names in zip(writes.targets, writes.storage):
            found.setdefault(target.label, written_variable(by_label[target.label], names))
    return tuple(found.values())


def written_variable(value: AbstractVariableValue, names: Sequence[str] | None = None) -> WrittenVariable:
    """How ``value`` sits in the State: its array in storage order ``names`` (default: as the value holds it).

    Raises:
      LowerError: If the value is a named array with positional axes (no storage order to keep).

    Example:
        >>> import jax.numpy as jnp
        >>> written_variable(StateVariableValue(nx.wrap(jnp.zeros((2, 3)), "a", "b"), "s")).shape
        (2, 3)
    """
    if not nx.is_namedarray(value.value):
        array = jnp.asarray(value.value)
        return WrittenVariable(value.label, None, tuple(array.shape), str(array.dtype), value.metadata)
    if value.value.positional_shape:
        raise LowerError(
            f"{value.label}: a state variable with positional axes {value.value.positional_shape} cannot be kept "
            "in an eqx.nn.State entry by name. Fix: name every axis of the variable's value."
        )
    names = tuple(names) if names is not None else tuple(value.value.named_shape)
    array = value.value.unwrap(*names)
    return WrittenVariable(value.label, names, tuple(array.shape), str(array.dtype), value.metadata)


def _every_write(layer: Any) -> list[WritesState]:
    """Every WritesState in ``layer``, nested ones too (a selection stops at the outermost)."""
    found = []
    for writes in select(layer).at_instances_of(WritesState).get_sequence():
        found += [writes, *_every_write(writes.body)]
    return found


def split_written(values: Sequence[AbstractVariableValue], written: Sequence[WrittenVariable]
                  ) -> tuple[tuple[AbstractVariableValue, ...], dict[str, Any]]:
    """The values the adapter keeps as leaves, and the State's value (label -> array) of the written ones.

    Example:
        >>> import jax.numpy as jnp
        >>> values = [StateVariableValue(jnp.array(2), "n"), StateVariableValue(jnp.array(1.0), "c")]
        >>> kept, state = split_written(values, [WrittenVariable("n", None, (), "int32", FrozenMetadata())])
        >>> [v.label for v in kept], {k: int(v) for k, v in state.items()}
        (['c'], {'n': 2})
    """
    labels = {variable.label for variable in written}
    kept = tuple(value for value in values if value.label not in labels)
    return kept, state_dict(written, values)


def new_state_index(marker: str, init: Mapping[str, Any]) -> eqx.nn.StateIndex:
    """An ``eqx.nn.StateIndex`` named ``marker`` (as ``eqx.nn.make_with_state`` names them) holding ``init``.

    Example:
        >>> import jax.numpy as jnp
        >>> new_state_index("<root>.state", {"n": jnp.array(2)}).marker
        '<root>.state'
    """
    index = object.__new__(eqx.nn.StateIndex)
    object.__setattr__(index, "marker", marker)
    object.__setattr__(index, "init", dict(init))
    return index


def state_values(written: Sequence[WrittenVariable], state: Any, where: str) -> tuple[StateVariableValue, ...]:
    """The written variables' frozen values read from the State's entry ``state`` (label -> array).

    Raises:
      LiftError: If ``state`` lacks a written variable or holds another shape or dtype for it.

    Example:
        >>> import jax.numpy as jnp
        >>> n = WrittenVariable("n", None, (), "int32", FrozenMetadata())
        >>> int(state_values([n], {"n": jnp.array(5)}, "<root>")[0].value)
        5
    """
    out = []
    for variable in written:
        if not isinstance(state, Mapping) or variable.label not in state:
            found = sorted(state) if isinstance(state, Mapping) else type(state).__name__
            raise LiftError(
                f"{where}: the eqx.nn.State entry of this adapter has no value for state variable "
                f"{variable.label!r} (expected entries {[v.label for v in written]}, found {found}). Fix: pass the "
                "State made by eqx.nn.State(converted), or the one its last call returned."
            )
        array = jnp.asarray(state[variable.label])
        if tuple(array.shape) != variable.shape or str(array.dtype) != variable.dtype:
            raise LiftError(
                f"{where}: the eqx.nn.State value of state variable {variable.label!r} has shape {array.shape} and "
                f"dtype {array.dtype}, expected {variable.shape} {variable.dtype}. Fix: pass this model's own State."
            )
        value = nx.wrap(array, *variable.names) if variable.names is not None else array
        out.append(StateVariableValue(value, variable.label, variable.metadata))
    return tuple(out)


def new_state(written: Sequence[WrittenVariable], new_values: Sequence[AbstractVariableValue],
              where: str) -> dict[str, Any]:
    """The State's new entry after a call; raises when a write changed a variable's shape or dtype.

    An ``eqx.nn.State`` entry keeps its shape (``State.set`` refuses a new
    one): a cache that grows has no Equinox counterpart.

    Raises:
      LowerError: If a written variable's new value has another shape or dtype.

    Example:
        >>> import jax.numpy as jnp
        >>> n = WrittenVariable("n", None, (), "int32", FrozenMetadata())
        >>> {k: int(v) for k, v in new_state([n], [StateVariableValue(jnp.array(1), "n")], "x").items()}
        {'n': 1}
    """
    state = state_dict(written, new_values)
    for variable in written:
        array = state[variable.label]
        if tuple(array.shape) != variable.shape or str(array.dtype) != variable.dtype:
            raise LowerError(
                f"{where}: the traced module writes state variable {variable.label!r} with shape {array.shape} "
                f"{array.dtype}, it had {variable.shape} {variable.dtype}; an eqx.nn.State entry keeps its shape. "
                "Fix: keep the model in NNX, or give the variable its final shape up front (a fixed-size cache)."
            )
    return state


def state_dict(written: Sequence[WrittenVariable], values: Sequence[AbstractVariableValue]) -> dict[str, Any]:
    """The State's entry for ``values``: label -> array of each written variable, in storage order.

    Example:
        >>> import jax.numpy as jnp
        >>> v = StateVariableValue(nx.wrap(jnp.zeros((2, 3)), "b", "a"), "s")
        >>> state_dict([WrittenVariable("s", ("a", "b"), (3, 2), "float32", FrozenMetadata())], [v])["s"].shape
        (3, 2)
    """
    by_label = {value.label: value.value for value in values}
    arrays = {v.label: by_label[v.label].unwrap(*v.names) if v.names is not None else jnp.asarray(by_label[v.label])
              for v in written}
    # Never weakly typed: State.set compares weak types, and the traced graph's new values are strong
    # even where the initial value (``jnp.array(0)``) was weak.
    return {label: jnp.asarray(array, dtype=array.dtype) for label, array in arrays.items()}


@dataclasses.dataclass(frozen=True)
class IndexMarker:
    """A lifted layer's ``eqx.nn.StateIndex`` inside an adapter: only its marker (static, no leaves).

    Left as ``StateIndex`` es, ``eqx.nn.State(adapter)`` would find indices
    that a made-with-state model leaves without values; the adapter keeps
    the values in its own entry, and lowering a layer back to its Equinox
    class makes the indices again from the markers.

    Example:
        >>> idx = eqx.nn.StateIndex(jnp.zeros(2))
        >>> markers_for_indices((idx, 1))[0].marker == idx.marker
        True
    """

    marker: Any


def markers_for_indices(layer: Any) -> Any:
    """``layer`` with every ``eqx.nn.StateIndex`` replaced by its :class:`IndexMarker`."""
    is_index = lambda v: isinstance(v, eqx.nn.StateIndex)  # noqa: E731
    return jax.tree_util.tree_map(lambda v: IndexMarker(v.marker) if is_index(v) else v, layer, is_leaf=is_index)


def batch_norm_state_labels(layer: Any) -> set[str]:
    """Labels of the state variables the Equinox-lifted BatchNorms in ``layer`` update when training.

    An adapter keeps them in its ``eqx.nn.State`` (held as frozen leaves, the
    running statistics would be lost after every call).

    Example:
        >>> import pzbridge as pzb
        >>> batch_norm_state_labels(pzb.nn.Identity())
        set()
    """
    labels: set[str] = set()
    for norm in select(layer).at_instances_of(BatchNorm).get_sequence():
        if getattr(norm, "batch_axes", None) is None:
            continue  # Not Equinox's (a lifted NNX BatchNorm): convert's run finds what it writes.
        for variable in (norm.running_mean, norm.running_var, norm.counter, norm.first_call):
            label = getattr(variable, "label", None)
            if label is not None:
                labels.add(label)
    return labels


def batch_statistics_axis(layer: Any, where: str) -> str | None:
    """The ``vmap`` axis over which the Equinox-lifted BatchNorms in ``layer`` take batch statistics, or None.

    Equinox computes them across the examples of a named ``vmap``; an
    adapter running per example gathers that axis so the lifted layer sees
    the batch (as a named axis). None when every such BatchNorm uses its
    running averages.

    Raises:
      LowerError: If they reduce over different axes (one gathered batch cannot serve several).

    Example:
        >>> import pzbridge as pzb
        >>> batch_statistics_axis(pzb.nn.Identity(), "<root>") is None
        True
    """
    found = {tuple(norm.batch_axes) for norm in select(layer).at_instances_of(BatchNorm).get_sequence()
             if getattr(norm, "batch_axes", None) is not None and not norm.use_running_average}
    if not found:
        return None
    if len(found) > 1 or len(next(iter(found))) != 1:
        raise LowerError(
            f"{where or '<root>'}: the BatchNorms of this adapter reduce over the vmap axes "
            f"{sorted(list(f) for f in found)}, expected one axis name for all of them. Fix: build them with one "
            "axis_name (e.g. 'batch'), or keep the edited module's glue unchanged so its own class comes back.")
    return next(iter(found))[0]
