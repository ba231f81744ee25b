"""The ``eqx.nn.State`` a custom Equinox module threads through its children, seen while it is traced.

Stateful Equinox code passes the State along by hand: ``y, state =
self.bn(y, state)`` in every block, ``return out, state`` at the end. The
lifted model keeps that state *in* its layers (each BatchNorm's
``StateVariable`` s, see :mod:`pzbridge.bridge.equinox.state`), so the State
argument itself carries nothing the graph needs: it only says which child
may update state, and that the module returns the new State.

While a ``__call__`` is traced the State is therefore replaced by
:data:`STATE_TOKEN`, a pytree with no leaves: it passes through the glue and
into child calls without becoming a jaxpr input or output. A child that gets
the token runs for real (to learn its output shapes) with the lift's own
State in its place, and whatever State it returns becomes the token again.
A module that opens the State itself (``state.get(self.index)`` /
``state.set(self.index, new)`` on a ``StateIndex`` it holds: a counter, an
EMA buffer, a cache) gets an :class:`OpenedState` instead: reading an entry
gives the traced input standing for its current value, setting one records
the new value, which becomes an extra output of the trace when the State is
returned (the lifted layer stores it, see
:mod:`pzbridge.bridge.tracing.state_writes`).

Equinox's ``BatchNorm`` also reduces over a ``vmap`` axis name (``axis_name``),
which a trace of one example does not bind: :func:`call_threading_state`
binds each such name on an axis of size one for that shape-only run.

Example:
    >>> import jax, equinox as eqx
    >>> state = eqx.nn.State(eqx.nn.StateIndex(jax.numpy.zeros(2)))
    >>> tokens = with_tokens((1.0, state))
    >>> tokens[1] is STATE_TOKEN, jax.tree_util.tree_leaves(tokens)
    (True, [1.0])
    >>> returned_without_state((jax.ShapeDtypeStruct((3,), "float32"), STATE_TOKEN))
    (ShapeDtypeStruct(shape=(3,), dtype=float32), True)
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import equinox as eqx
import jax

from pzbridge.bridge.tracing.graph_types import Untraceable

__all__ = ["STATE_KEY", "STATE_TOKEN", "OpenedState", "StateToken", "axis_names_of", "call_threading_state",
           "holds_state", "is_token", "returned_without_state", "with_tokens"]

STATE_KEY = "state"
"""Where a lift keeps the model's ``eqx.nn.State`` (``ctx.shared.extras``)."""


class StateToken:
    """Stands for the ``eqx.nn.State`` while a module is traced: a pytree without leaves.

    Opening it (``get`` / ``set`` / ``substate`` / ``update``) raises
    :class:`~pzbridge.bridge.tracing.graph_types.Untraceable`: only a module
    holding ``StateIndex`` es gets an :class:`OpenedState`, which it may open.

    Example:
        >>> STATE_TOKEN.get(None)
        Traceback (most recent call last):
        ...
        pzbridge.bridge.tracing.graph_types.Untraceable: its __call__ opens the eqx.nn.State itself (state.get(...)) but holds no eqx.nn.StateIndex of its own; traced lifting reads and writes only the entries of a module's own StateIndex fields, so this module stays Foreign
    """

    def _opened(self, method: str) -> Untraceable:
        return Untraceable(
            f"its __call__ opens the eqx.nn.State itself (state.{method}(...)) but holds no eqx.nn.StateIndex of "
            "its own; traced lifting reads and writes only the entries of a module's own StateIndex fields, so "
            "this module stays Foreign")

    def get(self, *args: Any, **kwargs: Any) -> Any:
        raise self._opened("get")

    def set(self, *args: Any, **kwargs: Any) -> Any:
        raise self._opened("set")

    def substate(self, *args: Any, **kwargs: Any) -> Any:
        raise self._opened("substate")

    def update(self, *args: Any, **kwargs: Any) -> Any:
        raise self._opened("update")

    def __repr__(self) -> str:
        return "<eqx.nn.State>"


STATE_TOKEN = StateToken()
jax.tree_util.register_pytree_node(StateToken, lambda token: ((), None), lambda aux, children: STATE_TOKEN)


class OpenedState(StateToken):
    """The State as seen by a traced module that reads and writes entries of its own ``StateIndex`` es.

    Like :data:`STATE_TOKEN` it is a pytree without leaves (it passes through
    the glue and child calls); ``get`` returns the current value of one of the
    module's entries (a traced input, or the value set last), ``set`` records
    a new value and returns the same object. Setting checks, as Equinox does,
    that the new value has the old one's structure, shapes and dtypes.

    Attributes:
      values: The current value of each of the module's entries, by marker.
      written: The markers set so far, in the order first set.

    Example:
        >>> import jax.numpy as jnp
        >>> index = eqx.nn.StateIndex(jnp.zeros(2))
        >>> opened = OpenedState({index.marker: jnp.zeros(2)})
        >>> opened = opened.set(index, opened.get(index) + 1)
        >>> opened.get(index).tolist(), len(opened.written)
        ([1.0, 1.0], 1)
        >>> jax.tree_util.tree_leaves(opened)
        []
    """

    def __init__(self, values: dict[Any, Any]) -> None:
        self.values = dict(values)
        self.written: list[Any] = []

    def _entry(self, index: Any, method: str) -> Any:
        marker = getattr(index, "marker", None)
        if not isinstance(index, eqx.nn.StateIndex) or marker not in self.values:
            raise Untraceable(f"its __call__ calls state.{method}(...) on {type(index).__name__} that is not one of "
                              "its own eqx.nn.StateIndex fields (only those are lifted with the module)")
        return marker

    def get(self, index: Any, *args: Any, **kwargs: Any) -> Any:
        return self.values[self._entry(index, "get")]

    def set(self, index: Any, value: Any, *args: Any, **kwargs: Any) -> OpenedState:
        marker = self._entry(index, "set")
        value = jax.tree_util.tree_map(jax.numpy.asarray, value)
        old, new = ((jax.tree_util.tree_structure(v), [(a.shape, a.dtype) for a in jax.tree_util.tree_leaves(v)])
                    for v in (self.values[marker], value))
        if old != new:
            raise Untraceable(f"it sets a State entry to a value of another structure, shape or dtype ({new[1]}, "
                              f"was {old[1]}); Equinox refuses this too")
        self.values[marker] = value
        if marker not in self.written:
            self.written.append(marker)
        return self


jax.tree_util.register_pytree_node(OpenedState, lambda opened: ((), opened), lambda opened, children: opened)


def is_token(value: Any) -> bool:
    """Whether ``value`` is the traced stand-in for an ``eqx.nn.State``.

    Example:
        >>> is_token(STATE_TOKEN), is_token(None)
        (True, False)
    """
    return isinstance(value, StateToken)


def _is_state(value: Any) -> bool:
    return isinstance(value, (eqx.nn.State, StateToken))


def holds_state(tree: Any) -> bool:
    """Whether ``tree`` holds an ``eqx.nn.State`` or its token.

    Example:
        >>> holds_state(((1, STATE_TOKEN), {})), holds_state((1, 2))
        (True, False)
    """
    return any(_is_state(leaf) for leaf in jax.tree_util.tree_leaves(tree, is_leaf=_is_state))


def with_tokens(tree: Any, token: StateToken = STATE_TOKEN) -> Any:
    """``tree`` with every ``eqx.nn.State`` (or token) replaced by ``token`` (:data:`STATE_TOKEN` by default).

    Example:
        >>> with_tokens([STATE_TOKEN, 2])[0] is STATE_TOKEN
        True
    """
    return jax.tree_util.tree_map(lambda v: token if _is_state(v) else v, tree, is_leaf=_is_state)


def _with_state(tree: Any, state: Any) -> Any:
    def fresh(token: Any) -> Any:
        # A State is spent once set (Equinox marks the old object used): each call gets its own copy.
        leaves, treedef = jax.tree_util.tree_flatten(state)
        return jax.tree_util.tree_unflatten(treedef, leaves)

    return jax.tree_util.tree_map(lambda v: fresh(v) if is_token(v) else v, tree, is_leaf=is_token)


def axis_names_of(module: Any) -> tuple[str, ...]:
    """The ``vmap`` axis names the BatchNorms (any module with an ``axis_name``) in ``module`` reduce over.

    Example:
        >>> bn = eqx.nn.BatchNorm(3, "batch", mode="batch")
        >>> axis_names_of([bn, eqx.nn.BatchNorm(3, ("batch", "data"), mode="batch")])
        ('batch', 'data')
    """
    has_name = lambda v: isinstance(v, eqx.Module) and hasattr(v, "axis_name")  # noqa: E731
    names: list[str] = []
    for found in jax.tree_util.tree_leaves(module, is_leaf=has_name):
        value = getattr(found, "axis_name", None) if has_name(found) else None
        for name in (value,) if isinstance(value, str) else value if isinstance(value, tuple) else ():
            if isinstance(name, str) and name not in names:
                names.append(name)
    return tuple(names)


def _bound(fn: Callable[[], Any], names: Sequence[str]) -> Callable[[], Any]:
    """``fn`` run with each of ``names`` bound to a ``vmap`` axis of size one (removed from its outputs)."""
    for name in names:
        def inner(g: Callable[[], Any] = fn, n: str = name) -> Any:
            out = jax.vmap(g, in_axes=(), axis_size=1, axis_name=n)()
            return jax.tree_util.tree_map(lambda a: a[0], out)

        fn = inner
    return fn


def call_threading_state(child: Any, args: Sequence[Any], kwargs: Mapping[str, Any], state: Any) -> Any:
    """Calls ``child(*args, **kwargs)`` with each token replaced by ``state``; a returned State becomes the token.

    The token given is the one returned (an :class:`OpenedState` keeps what
    its module read and set around the child's call). The axis names the
    child's BatchNorms reduce over are bound (size one), so a single traced
    example runs (only its shapes are used).

    Example:
        >>> bn, st = eqx.nn.make_with_state(eqx.nn.BatchNorm)(2, "batch", mode="batch")
        >>> y, token = call_threading_state(bn, (jax.numpy.ones(2), STATE_TOKEN), {}, st)
        >>> y.shape, token is STATE_TOKEN
        ((2,), True)
    """
    names = axis_names_of(child)
    if not names and not holds_state((args, dict(kwargs))):
        return child(*args, **kwargs)
    if holds_state((args, dict(kwargs))) and state is None:
        raise Untraceable("a child is called with an eqx.nn.State but the lift has none (pass state=)")
    given = [v for v in jax.tree_util.tree_leaves((args, dict(kwargs)), is_leaf=is_token) if is_token(v)]
    real_args, real_kwargs = _with_state((tuple(args), dict(kwargs)), state)
    return with_tokens(_bound(lambda: child(*real_args, **real_kwargs), names)(), given[0] if given else STATE_TOKEN)


def returned_without_state(out: Any) -> tuple[Any, bool]:
    """A traced module's output without its returned State, and whether it returned one.

    Equinox's convention is ``return out, state``: a tuple (or list) whose
    other items are the output; one item left is the output itself.

    Raises:
      Untraceable: If the State is returned nested in a container, or alone.

    Example:
        >>> returned_without_state((1, 2, STATE_TOKEN))
        ((1, 2), True)
    """
    if not holds_state(out):
        return out, False
    if isinstance(out, (tuple, list)) and any(is_token(item) for item in out):
        rest = [item for item in out if not is_token(item)]
        if rest and not holds_state(rest):
            return (rest[0] if len(rest) == 1 else type(out)(rest)), True
    raise Untraceable("it returns the eqx.nn.State other than as an item of its returned tuple "
                      "(return out, state), which traced lifting follows")
