"""State a traced module writes during its call: the new values are graph outputs, a layer stores them.

Custom NNX code updates its own Variables in place all the time (a step
counter, BatchNorm-like running statistics, an EMA buffer, a cache). A jaxpr
has no side effects, so traced lifting makes each written Variable's final
value an extra *output* of the traced function: the module computes
``(out, new_1, ..., new_k)``. The converter turns that into an ordinary graph
with several outputs, and :class:`WritesState` wraps the resulting layer: it
runs it, writes each new value into the lifted ``StateVariable`` it belongs
to (in that variable's storage order) and returns only ``out``. After one
call of the lifted model its state is therefore what the module's state is
after one call, and every pzbridge state mechanism (``stateless_call``,
``variable_jit``, the NNX adapter's write-back) sees ordinary state updates.

The layer is framework-neutral; the bridges decide what was written (NNX:
``bridge/nnx/state_writes.py``, Variables changed in place; Equinox:
``bridge/equinox/state_threading.py``, entries set in an ``eqx.nn.State``)
and :func:`write_targets` finds the variable each new value goes to. See ``docs/architecture.md`` ("The lift / lower
contract") and ``docs/lifting_custom_modules.md``.

Example:
    >>> import jax.numpy as jnp
    >>> import pzbridge as pzb
    >>> from pzbridge.nn.dataflow import Branch
    >>> last = pzb.StateVariable(pzb.nx.wrap(jnp.zeros(2), "features"), "last")
    >>> body = Branch([pzb.nn.Elementwise(jnp.negative), Branch([pzb.nn.Identity()])])
    >>> out = WritesState(body, (last,), (("features",),))(pzb.nx.wrap(jnp.ones(2), "features"))
    >>> out.unwrap("features").tolist(), last.value.unwrap("features").tolist()
    ([-1.0, -1.0], [1.0, 1.0])
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import jax

from pzbridge.bridge.context import LiftContext
from pzbridge.bridge.tracing.graph_types import Graph, Untraceable
from pzbridge.core import named_axes as nx
from pzbridge.core.errors import LowerError, NamedAxisError
from pzbridge.core.selectors import select
from pzbridge.core.struct import pytree_dataclass, static_field
from pzbridge.core.variables import StateVariable
from pzbridge.nn.layer import Layer


@pytree_dataclass
class WritesState(Layer):
    """Runs ``body`` (which returns ``(out, (new_1, ..., new_k))``), stores each new value, returns ``out``.

    Attributes:
      body: The traced computation, returning the output and the new values.
      targets: The ``StateVariable`` each new value is written into, in order.
      storage: Per target, the names of its value's axes in storage order (static).

    Example:
        >>> import jax.numpy as jnp
        >>> import pzbridge as pzb
        >>> from pzbridge.nn.dataflow import Branch
        >>> seen = pzb.StateVariable(pzb.nx.wrap(jnp.zeros((2, 3)), "a", "b"), "seen")
        >>> body = Branch([pzb.nn.Identity(), Branch([pzb.nn.Identity()])])
        >>> _ = WritesState(body, (seen,), (("a", "b"),))(pzb.nx.wrap(jnp.ones((3, 2)), "b", "a"))
        >>> seen.value.named_shape == {"a": 2, "b": 3}, seen.value.data_array.shape  # stored as (a, b)
        (True, (2, 3))
    """

    body: Layer
    targets: tuple[StateVariable, ...]
    storage: tuple[tuple[str, ...], ...] = static_field()

    def __call__(self, x: Any, /, **side_inputs: Any) -> Any:
        out, new_values = self.body(x, **side_inputs)
        if len(new_values) != len(self.targets) or len(self.storage) != len(self.targets):
            raise NamedAxisError(
                f"WritesState: the body returned {len(new_values)} new values for {len(self.targets)} state "
                f"variables ({len(self.storage)} storage layouts). Fix: give one target and one layout per value."
            )
        for target, names, value in zip(self.targets, self.storage, new_values):
            target.value = to_storage(value, names, target.label)
        return out


def to_storage(value: Any, names: Sequence[str], label: str) -> Any:
    """``value`` (a named array from the traced graph) laid out as a variable stored with axes ``names``.

    Args:
      value: A NamedArray (or a raw array / scalar when ``names`` is empty).
      names: The variable's axis names in storage order.
      label: The variable's label (for messages).

    Returns:
      A NamedArray with exactly the named axes ``names``, in that order.

    Raises:
      NamedAxisError: If ``value`` does not carry exactly those axes.

    Example:
        >>> import jax.numpy as jnp
        >>> v = nx.wrap(jnp.ones((2, 3)), "b", "a")
        >>> to_storage(v, ("a", "b"), "s").data_array.shape
        (3, 2)
    """
    if not nx.is_namedarray(value):
        value = nx.wrap(jax.numpy.asarray(value))
    extra = [n for n in value.named_shape if n not in names]
    if not value.positional_shape and extra and set(names) <= set(value.named_shape):
        raise NamedAxisError(
            f"WritesState: the new value of state variable {label!r} has the axes {extra} its variable (stored "
            f"with axes {list(names)}) lacks: the update depends on each example of the batch (a cache or buffer "
            "written per example), and one shared state cannot hold it (Equinox's jax.vmap with an unbatched "
            "State refuses it too). Fix: call the model on one example at a time (without the batch axis), or "
            "keep one state per example."
        )
    if value.positional_shape or set(value.named_shape) != set(names):
        raise NamedAxisError(
            f"WritesState: the new value of state variable {label!r} has named axes "
            f"{dict(value.named_shape)} and positional axes {value.positional_shape}; the variable is stored with "
            f"axes {list(names)}. Fix: write values with the variable's own axes (the traced code changed the "
            "value's shape)."
        )
    return nx.wrap(value.unwrap(*names), *names)



@dataclasses.dataclass
class Written:
    """One state entry the traced call wrote (an NNX Variable, an ``eqx.nn.State`` entry's array).

    Attributes:
      key: Its key in the traced module (``calls``, ``norm.mean``, ``index``).
      keys: Its key path (for the lifted variable's label).
      source: The user's object (only read; identity defines sharing: the
        Variable, or the State's array).
      value: The value the call left in it (a tracer while tracing, then its ``ShapeDtypeStruct``).

    Example:
        >>> Written("calls", ("calls",), None, 1).key
        'calls'
    """

    key: str
    keys: tuple[str | int, ...]
    source: Any
    value: Any


def storage_names(variable: Any) -> tuple[str, ...]:
    """The axis names of a variable's NamedArray value in storage order (``()`` for raw values).

    Example:
        >>> import numpy as np
        >>> from pzbridge.core.variables import Parameter
        >>> storage_names(Parameter(nx.wrap(np.ones((2, 3)), "a", "b"), "p"))
        ('a', 'b')
    """
    value = getattr(variable, "value", None)
    return tuple(value.named_shape) if nx.is_namedarray(value) and not value.positional_shape else ()


def write_targets(graph: Graph, written: Sequence[Written], ctx: LiftContext,
                  lift_written: Callable[[Written, tuple[str, ...]], Any]
                  ) -> tuple[tuple[StateVariable, ...], tuple[tuple[str, ...], ...]]:
    """The lifted ``StateVariable`` and storage names for each write (the graph's last outputs, in order).

    An entry the call also reads was lifted by the converter with the names
    its operand got; one that is only written is lifted by ``lift_written``
    (the bridge's way to lift it), stored with the names of its new value.

    Args:
      graph: The converted graph; its last ``len(written)`` outputs are the new values.
      written: The writes.
      ctx: The module's lift context (its shared table keeps one variable per source).
      lift_written: ``(write, names) -> variable`` for a source not lifted yet.

    Returns:
      ``(targets, storage names)``.

    Raises:
      Untraceable: If a new value has an unnamed axis or other axes than its variable.
    """
    ids = graph.output_ids[len(graph.output_ids) - len(written):]
    targets, storage = [], []
    for write, value_id in zip(written, ids):
        names = graph.names.get(value_id, ())
        if None in names or len(names) != len(write.value.shape):
            raise Untraceable(f"the new value of {write.key!r} has an axis without a name ({names})")
        existing = ctx.shared.by_identity.get(id(write.source))
        if existing is None:
            existing = lift_written(write, names)
        stored = storage_names(existing)
        value = getattr(existing, "value", None)
        if not isinstance(existing, StateVariable) or not nx.is_namedarray(value) or value.positional_shape \
                or set(stored) != set(names):
            raise Untraceable(f"the new value of {write.key!r} has axes {list(names)}; its variable is stored as "
                              f"{list(stored)}")
        targets.append(existing)
        storage.append(stored)
    return tuple(targets), tuple(storage)


class StateWritesNotConvertible(LowerError, NotImplementedError):
    """A traced module that writes its own state, standing in for a child of unknown Equinox code.

    Equinox modules are immutable: the counterpart of an NNX module updating
    its Variables is an ``eqx.nn.State`` passed in and returned (``y, state =
    model(x, state)``), which is what a converted model's adapter does. An
    adapter called by *unknown* code (an edited child of a ``Foreign``) must
    return only the output, as the original child did, so there the writes
    have nowhere to go; dropping them would compute something else, so
    lowering refuses (a ``LowerError``, also a ``NotImplementedError``).

    Example:
        >>> issubclass(StateWritesNotConvertible, LowerError)
        True
    """


def refuse_state_writes(layer: Any, where: str, framework: str) -> None:
    """Raises :class:`StateWritesNotConvertible` if ``layer`` holds a :class:`WritesState`.

    Args:
      layer: The lifted layer about to be lowered into ``framework``'s adapter.
      where: Its model path (for the message).
      framework: The target framework's name (for the message).

    Raises:
      StateWritesNotConvertible: If some traced module in ``layer`` writes state during its call.

    Example:
        >>> import pzbridge as pzb
        >>> refuse_state_writes(pzb.nn.Identity(), "<root>", "equinox")  # nothing written: no error
    """
    found = select(layer).at_instances_of(WritesState).get_sequence()
    if not found:
        return
    labels = sorted({target.label for writes in found for target in writes.targets})
    raise StateWritesNotConvertible(
        f"{where or '<root>'}: a traced module here updates its own state during the call (state variables "
        f"{labels}), and the {framework} code around it calls it as the original child, so no state can come "
        "back (dropping the writes would compute something else). Fix: keep the model in NNX "
        "(pzb.lower(lifted) gives the original classes back), convert the whole model with pzb.convert (its "
        "Equinox form keeps the writes in an eqx.nn.State), or remove the in-place update from __call__."
    )
