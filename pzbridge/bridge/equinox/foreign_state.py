"""State written inside an Equinox ``Foreign``'s original code, carried back out.

A ``Foreign`` runs its original ``__call__`` on a module rebuilt from its
lowered children; an edited child is an :class:`EquinoxAdapter` that runs its
pzbridge layer with ``stateless_call`` and so gets the layer's new state back
(what a capture saver saw, a counter, a cache). Two things keep that state
from reaching the lifted ``StateVariable`` it belongs to:

- the original code between the ``Foreign`` and the adapter is a frozen
  Equinox module's: it has no way to return anything but its output;
- the module runs under ``nmap`` (one ``jax.vmap`` per batch axis), so the
  values are tracers of that trace, and writing them into a variable from
  inside would leak them.

So the values travel out as *return values*: the ``Foreign`` call opens a
collector inside the vectorised function (:func:`call_collecting_state`),
each adapter reports its changed state to the innermost open collector
(:func:`report_state`), and the vectorised function returns the collected
values next to the output. They come out batched like the output (a saver's
value gets the ``Foreign``'s batch axes as named axes), and the ``Foreign``
writes them into the lifted variables with the same labels
(:func:`write_state`). Under ``jax.jit`` or ``pzb.variable_jit`` all of this
is one trace, so nothing leaks.

An adapter that the original code calls under a JAX transformation of its
own (``jax.vmap(self.mlp)(x)``) produces values of that inner trace, which
the original code does not return: that is an error naming the variable,
not state silently lost.

Example:
    >>> import pzbridge as pzb
    >>> from pzbridge.core.variables import StateVariableValue
    >>> old = StateVariableValue(None, "seen")
    >>> def module(x):
    ...     report_state([StateVariableValue(x * 2, "seen")], [old])
    ...     return x + 1
    >>> out, state = call_collecting_state(module, (pzb.nx.wrap(jnp.arange(3.0), "batch"),), "Module")
    >>> out.unwrap("batch").tolist(), state["seen"].unwrap("batch").tolist()
    ([1.0, 2.0, 3.0], [0.0, 2.0, 4.0])
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import jax
from jax.extend.core import get_opaque_trace_state

from pzbridge.bridge.lifted import name_trailing_axes
from pzbridge.core import named_axes as nx
from pzbridge.core.errors import VariableError
from pzbridge.core.variables import AbstractVariableValue, StateVariable

_UNSET = object()


@dataclasses.dataclass
class StateCollector:
    """The state values reported while one ``Foreign``'s original code runs.

    Attributes:
      owner: The original class's name (for messages).
      trace: JAX's trace state when the collector opened; a report from a
        deeper trace comes from a transformation inside the original code.
      values: New value by variable label, in report order.

    Example:
        >>> with collecting_state("Block") as collector:
        ...     collector.owner
        'Block'
    """

    owner: str
    trace: Any
    values: dict[str, Any] = dataclasses.field(default_factory=dict)


_LOCAL = threading.local()


def _open_collectors() -> list[StateCollector]:
    stack = getattr(_LOCAL, "collectors", None)
    if stack is None:
        stack = _LOCAL.collectors = []
    return stack


@contextlib.contextmanager
def collecting_state(owner: str) -> Iterator[StateCollector]:
    """Opens a collector for the state adapters report until the block ends (innermost wins).

    Args:
      owner: The name of the original class whose code runs in the block.

    Yields:
      The :class:`StateCollector`.

    Example:
        >>> from pzbridge.core.variables import StateVariableValue
        >>> with collecting_state("Block") as collector:
        ...     report_state([StateVariableValue(1, "n")], [StateVariableValue(0, "n")])
        >>> collector.values
        {'n': 1}
    """
    stack = _open_collectors()
    collector = StateCollector(owner, get_opaque_trace_state(convention="pzbridge"))
    stack.append(collector)
    try:
        yield collector
    finally:
        stack.pop()


def report_state(new_values: Sequence[AbstractVariableValue], old_values: Sequence[AbstractVariableValue]) -> None:
    """Hands the state values a layer changed to the innermost open collector (if any).

    Values whose object is the one in ``old_values`` (same label) were not
    written and are not reported, so state the layer only read keeps its shape.
    Without an open collector (a lowered model called by plain Equinox code)
    nothing happens: Equinox modules have nowhere to keep state.

    Args:
      new_values: The new state values (``stateless_call``'s second result).
      old_values: The values the layer ran with.

    Raises:
      VariableError: If a changed value comes from a JAX transformation
        inside the original code (e.g. ``jax.vmap(self.child)(x)``), which
        does not return it.

    Example:
        >>> from pzbridge.core.variables import StateVariableValue
        >>> same = StateVariableValue(0, "n")
        >>> with collecting_state("Block") as collector:
        ...     report_state([same], [same])
        >>> collector.values
        {}
    """
    stack = _open_collectors()
    if not stack:
        return
    collector = stack[-1]
    old = {value.label: value.value for value in old_values}
    changed = [value for value in new_values if value.value is not old.get(value.label, _UNSET)]
    if not changed:
        return
    if get_opaque_trace_state(convention="pzbridge") != collector.trace:
        labels = [value.label for value in changed]
        raise VariableError(
            f"{collector.owner}: the pzbridge layer holding state {labels[:3]} is called under a JAX "
            f"transformation inside the original code this Foreign runs (e.g. jax.vmap(self.mlp)(x) in "
            f"{collector.owner} or one of its submodules), so the values it writes belong to that transformation "
            "and that code does not return them. Fix: capture or edit a layer the code calls directly, capture "
            f"at the {collector.owner} layer itself, or register a rule (pzb.bridge.equinox_rule) for the module "
            "whose code transforms the call, so its code is lifted."
        )
    for value in changed:
        collector.values[value.label] = value.value


def call_collecting_state(
    fn: Callable[..., Any], args: Sequence[Any], owner: str
) -> tuple[Any, dict[str, Any]]:
    """``nmap(fn)(*args)`` plus the state the adapters inside ``fn`` reported, batched like the output.

    The collector is opened *inside* the vectorised function, so the values
    leave the ``vmap`` as outputs. A value that was a named array comes back
    with its own names plus the batch axes; a plain array with the batch
    axes as names (or plain again when there were none).

    Args:
      fn: The positional function (the rebuilt module with its keyword arguments bound).
      args: Its arguments (named arrays; their named axes are vectorised over).
      owner: The original class's name (for messages).

    Returns:
      ``(output, {label: new value})``.

    Example:
        >>> out, state = call_collecting_state(lambda x: x, (pzb.nx.wrap(jnp.ones(2)),), "Id")
        >>> out.positional_shape, state
        ((2,), {})
    """
    layouts: list[tuple[list[str], Any, list[tuple[str, ...] | None]]] = []

    def run(*call_args: Any) -> tuple[Any, list[Any]]:
        with collecting_state(owner) as collector:
            out = fn(*call_args)
        labels = list(collector.values)
        leaves, treedef = jax.tree_util.tree_flatten([collector.values[label] for label in labels],
                                                     is_leaf=nx.is_namedarray)
        names = [tuple(leaf.named_shape) if nx.is_namedarray(leaf) else None for leaf in leaves]
        layouts.append((labels, treedef, names))
        # nmap returns plain arrays only: named values leave with their names as trailing positional axes.
        return out, [_positional(leaf, n) for leaf, n in zip(leaves, names)]

    out, plain = nx.nmap(run)(*args)
    labels, treedef, names = layouts[-1]
    leaves = [_rename(leaf, n) for leaf, n in zip(plain, names)]
    return out, dict(zip(labels, jax.tree_util.tree_unflatten(treedef, leaves)))


def _positional(leaf: Any, names: tuple[str, ...] | None) -> Any:
    if names is None:
        return leaf
    return (leaf.untag(*names) if names else leaf).unwrap()


def _rename(leaf: Any, names: tuple[str, ...] | None) -> Any:
    if names is not None:
        return name_trailing_axes(leaf, names)
    # A plain value stays plain unless it was batched.
    return leaf.unwrap() if nx.is_namedarray(leaf) and not leaf.named_shape else leaf


def write_state(children: Mapping[str, Any], values: Mapping[str, Any]) -> None:
    """Writes ``values`` into the ``StateVariable`` objects with those labels found in ``children``.

    Frozen values and slots are not written (a frozen model's state stays
    as it was, as in any lifted layer run without ``stateless_call``).

    Example:
        >>> counter = pzb.StateVariable(0, "n")
        >>> write_state({"inner": [counter]}, {"n": 1}); counter.value
        1
    """
    if not values:
        return
    targets = {leaf.label: leaf for leaf in jax.tree_util.tree_leaves(children) if isinstance(leaf, StateVariable)}
    for label, value in values.items():
        target = targets.get(label)
        if target is not None:
            target.value = value
