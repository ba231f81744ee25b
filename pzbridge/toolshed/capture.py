"""Capture beyond single sites: only shapes, every layer at once, and a submodel isolated with its inputs.

Three questions come before any intervention: *what shapes flow where*
(answered without computing anything, by ``jax.eval_shape``), *what does
every layer produce* (one run that records the output of every innermost
layer, keyed by the paths that selectors and ``Where(path=...)`` use), and
*can I study this block on its own* (:func:`isolate` records the block's
input, side inputs and state as they were when the full model called it, so
the block re-runs alone and gives the same output).

Everything is built on the savers of :mod:`pzbridge.toolshed.intermediates`:
the model is copied with recording layers inserted and run through
``stateless_call``, so the user's model and its variables are never changed.
Only core and nn are imported (docs/architecture.md, "Layers of the
package").

Example:
    >>> import jax.numpy as jnp
    >>> import pzbridge as pzb
    >>> model = pzb.nn.Sequential([pzb.nn.Elementwise(jnp.exp), pzb.nn.Residual(pzb.nn.Identity())])
    >>> _, acts = capture_all(model, pzb.nx.wrap(jnp.zeros(2), "f"))
    >>> {path: a.unwrap("f").tolist() for path, a in acts.items()}
    {'sublayers[0]': [1.0, 1.0], 'sublayers[1].delta': [1.0, 1.0]}
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np

from pzbridge.core.errors import PzbridgeError, SelectionError, format_path
from pzbridge.core.selectors import select
from pzbridge.core.struct import pytree_dataclass, static_field
from pzbridge.core.variables import (
    AbstractVariableValue,
    StateVariableSlot,
    StateVariableValue,
    bind_variables,
    stateless_call,
    unbind_variables,
)
from pzbridge.nn.layer import Layer
from pzbridge.toolshed.intermediates import (
    Captured,
    LayerSelector,
    SaveIntermediate,
    capture_intermediates,
    resolve_selection,
)

__all__ = ["Isolated", "RecordCall", "capture_all", "capture_shapes", "isolate"]

_ISOLATE_LABEL = "isolate:call"


def capture_shapes(
    model: Any, selection: LayerSelector, x: Any, /, *, where: str | None = None, **side_inputs: Any
) -> tuple[Any, Captured]:
    """Like :func:`~pzbridge.toolshed.intermediates.capture_intermediates`, but only shapes: nothing is computed.

    Runs the capture under ``jax.eval_shape``, so each array comes back as a
    ``jax.ShapeDtypeStruct`` inside its named-array wrapper (named axes and
    sizes intact) at the cost of a trace.

    Args:
      model: The model (not modified).
      selection: Which layers (a ``Where``, selection, class or predicate).
      x: The input: arrays, or ``jax.ShapeDtypeStruct`` leaves (e.g. from
        ``jax.eval_shape(lambda: pzb.nx.zeros(...))``).
      where: ``"after"`` / ``"before"`` (default: the ``Where``'s side, else after).
      **side_inputs: Forwarded to the model.

    Returns:
      ``(output shapes, {path: activation shapes})``.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> import pzbridge as pzb
        >>> model = pzb.nn.Linear.from_config("w", jax.random.key(0), {"features": 3}, {"hidden": 5})
        >>> x = jax.eval_shape(lambda: pzb.nx.zeros({"batch": 2, "features": 3}))  # shapes only, no data
        >>> _, shapes = capture_shapes(model, pzb.nn.Linear, x)
        >>> dict(shapes["<root>"].named_shape), shapes["<root>"].data_array.shape
        ({'batch': 2, 'hidden': 5}, (2, 5))
    """
    paths: list[str] = []

    def run(inputs: Any, side: dict[str, Any]) -> tuple[Any, list[Any]]:
        output, values = capture_intermediates(model, selection, inputs, where=where, **side)
        paths[:] = list(values)
        return output, list(values.values())  # A list: eval_shape would sort a dict's keys.

    output, values = jax.eval_shape(run, x, side_inputs)
    return output, Captured(zip(paths, values))


def capture_all(
    model: Any, x: Any, /, *, where: str = "after", shapes_only: bool = False, **side_inputs: Any
) -> tuple[Any, Captured]:
    """Runs ``model`` once and returns the output (or input) of every innermost layer, keyed by path.

    Innermost layers are those with no layer inside (``Linear``,
    ``Softmax``, a traced ``ApplyPrimitive``, ...); together their outputs are
    every intermediate value the lifted model computes. Inside a
    ``LayerStack`` a value carries the stack axis (one per block).

    Args:
      model: The model (not modified).
      x: The input.
      where: ``"after"`` (outputs) or ``"before"`` (inputs).
      shapes_only: Return ``jax.ShapeDtypeStruct`` leaves without computing.
      **side_inputs: Forwarded to the model.

    Returns:
      ``(output, {path: value})`` in model order (a :class:`Captured` dict);
      the output equals ``model(x)``.

    Raises:
      PzbridgeError: If some innermost layer is never called on this input
        (a branch not taken, a child a ``Foreign`` layer's code does not call).

    Example:
        >>> import jax, jax.numpy as jnp
        >>> import pzbridge as pzb
        >>> model = pzb.nn.Sequential([pzb.nn.Elementwise(jnp.negative), pzb.nn.Elementwise(jnp.exp)])
        >>> _, shapes = capture_all(model, pzb.nx.wrap(jnp.zeros(3), "f"), shapes_only=True)
        >>> [s.data_array.shape for s in shapes.values()]
        [(3,), (3,)]
    """
    innermost = select(model).at_subtrees_where(
        lambda node: isinstance(node, Layer) and not isinstance(node, SaveIntermediate), innermost=True
    )
    if innermost.is_empty():
        raise SelectionError(
            f"capture_all: the model ({type(model).__name__}) contains no pzbridge layer, expected at least "
            "one. Fix: lift the model first (pzb.lift(model, example))."
        )
    if shapes_only:
        return capture_shapes(model, innermost, x, where=where, **side_inputs)
    return capture_intermediates(model, innermost, x, where=where, **side_inputs)


@pytree_dataclass
class RecordCall(Layer):
    """Calls ``layer`` and records its input, side inputs, state values at call time and output.

    The record goes to a ``StateVariableSlot`` (bound by
    :func:`isolate`'s ``stateless_call``), as :class:`SaveIntermediate` does.

    Attributes:
      layer: The wrapped layer.
      record: The slot (or variable) the record is written to.
      label: Its label (static).

    Example:
        >>> import pzbridge as pzb
        >>> rec = RecordCall(pzb.nn.Identity(), pzb.StateVariable(None, "rec"))
        >>> rec(3.0), rec.record.value["output"]
        (3.0, 3.0)
    """

    layer: Layer
    record: Any = None
    label: str = static_field(default=_ISOLATE_LABEL)

    def __post_init__(self) -> None:
        if self.record is None:
            object.__setattr__(self, "record", StateVariableSlot(self.label))

    def __call__(self, x: Any, /, **side_inputs: Any) -> Any:
        _, state = unbind_variables(self.layer, freeze=True)  # the values as they are right now
        output = self.layer(x, **side_inputs)
        self.record.value = {"inputs": x, "side_inputs": dict(side_inputs), "state": state, "output": output}
        return output


@pytree_dataclass
class Isolated(Layer):
    """A submodel cut out of a model run, with what it saw: re-runs alone, pure.

    ``layer`` holds slots where the submodel had variables; ``variables``
    are the frozen values of those variables as they were when the full
    model called it (parameters and state). Calling ``isolated()`` (or
    :meth:`run`) runs the submodel through ``stateless_call`` on the
    recorded ``inputs`` and ``side_inputs`` and returns what it returned in
    the full run; pass other inputs to study the block alone. Nothing is
    shared with the source model: :meth:`bound` gives a live copy with its
    own variables.

    Attributes:
      layer: The submodel with its variables unbound.
      variables: Frozen values of its variables at call time.
      inputs: The input it received.
      array_side_inputs: The side inputs it received whose leaves are all arrays.
      static_side_inputs: The other side inputs (``(name, value)`` pairs,
        static: axis sizes, flags), so ``jax.jit`` can take an ``Isolated``.
      output: The output it returned.
      path: Its path in the source model (static).

    Example:
        >>> import jax.numpy as jnp
        >>> import pzbridge as pzb
        >>> model = pzb.nn.Sequential([pzb.nn.Elementwise(jnp.exp), pzb.nn.Elementwise(jnp.negative)])
        >>> block = isolate(model, lambda l: l is model.sublayers[1], pzb.nx.wrap(jnp.zeros(1), "f"))
        >>> block.path, block.inputs.unwrap("f").tolist(), block.run().unwrap("f").tolist()
        ('sublayers[1]', [1.0], [-1.0])
    """

    layer: Any
    variables: tuple[AbstractVariableValue, ...]
    inputs: Any
    array_side_inputs: dict[str, Any]
    output: Any
    static_side_inputs: tuple[tuple[str, Any], ...] = static_field(default=())
    path: str = static_field(default="")

    @property
    def side_inputs(self) -> dict[str, Any]:
        """Every side input it received (array and static ones)."""
        return {**self.array_side_inputs, **dict(self.static_side_inputs)}

    def __call__(self, x: Any = None, /, **side_inputs: Any) -> Any:
        return self.run(x, **side_inputs)

    def run(self, x: Any = None, /, **side_inputs: Any) -> Any:
        """Runs the submodel on ``x`` (default: the recorded input) with the recorded state.

        Side inputs given here replace the recorded ones of the same name.
        """
        inputs = self.inputs if x is None else x
        merged = {**self.side_inputs, **side_inputs}
        return stateless_call(self.layer, self.variables, inputs, **merged)[0]

    def bound(self) -> Any:
        """The submodel with fresh variables holding the recorded values (shares nothing with the source)."""
        return bind_variables(self.layer, [value.unfreeze_as_copy() for value in self.variables])


def isolate(model: Any, selection: LayerSelector, x: Any, /, **side_inputs: Any) -> Isolated:
    """Runs ``model`` on ``x`` and cuts out the selected submodel with its input, side inputs and state.

    Args:
      model: The model (not modified; no variable is written).
      selection: Exactly one layer (a ``Where``, selection, class or predicate).
      x: The input of the full model.
      **side_inputs: Forwarded to the model.

    Returns:
      An :class:`Isolated` whose ``run()`` equals the submodel's output in
      the full run.

    Raises:
      SelectionError: If the selection is not exactly one layer.
      PzbridgeError: If the selected layer is never called on this input.

    Example:
        >>> import jax.numpy as jnp
        >>> import pzbridge as pzb
        >>> model = pzb.nn.Sequential([pzb.nn.Elementwise(jnp.exp), pzb.nn.Residual(pzb.nn.Identity())])
        >>> block = isolate(model, pzb.nn.Residual, pzb.nx.wrap(jnp.zeros(1), "f"))
        >>> block.output.unwrap("f").tolist(), block.run(pzb.nx.wrap(jnp.ones(1), "f")).unwrap("f").tolist()
        ([2.0], [2.0])
    """
    selected = resolve_selection(model, selection, what="isolate's selection")
    if selected.count() != 1:
        found = [format_path(p) for p in selected.get_keypaths()]
        raise SelectionError(
            f"isolate: the selection must name exactly one layer, found {len(found)}: {found[:6]}. Fix: narrow "
            "it, e.g. Where(path=...) with a full path, or pzb.select(model)...pick_nth_selected(0)."
        )
    (path,) = selected.get_keypaths()
    node = selected.get()
    if not isinstance(node, Layer):
        raise SelectionError(
            f"isolate: {format_path(path)} is {type(node).__name__}, expected a pzbridge layer. Fix: select a layer."
        )
    instrumented = selected.apply(lambda n: RecordCall(n))
    _, states = stateless_call(instrumented, [StateVariableValue(None, _ISOLATE_LABEL)], x, **side_inputs)
    record = next(state.value for state in states if state.label == _ISOLATE_LABEL)
    if record is None:
        raise PzbridgeError(
            f"isolate: the layer at {format_path(path)} was never called on this input (a branch not taken, or "
            "a child that a Foreign layer's code does not call). Fix: select a layer this input reaches."
        )
    slots, _ = unbind_variables(node)
    arrays = {name: value for name, value in record["side_inputs"].items() if _all_arrays(value)}
    static = tuple((name, value) for name, value in record["side_inputs"].items() if name not in arrays)
    return Isolated(slots, tuple(record["state"]), record["inputs"], arrays, record["output"], static,
                    format_path(path))


def _all_arrays(value: Any) -> bool:
    leaves = jax.tree_util.tree_leaves(value)
    return bool(leaves) and all(isinstance(leaf, (jax.Array, np.ndarray)) for leaf in leaves)

