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
Code that opens the State itself (``state.get(self.index)``) cannot be
expressed this way and is reported as untraceable, naming the call.

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

__all__ = ["STATE_KEY", "STATE_TOKEN", "StateToken", "axis_names_of", "call_threading_state", "holds_state", "is_token",
           "returned_without_state", "with_tokens"]

STATE_KEY = "state"
"""Where a lift keeps the model's ``eqx.nn.State`` (``ctx.shared.extras``)."""


class StateToken:
    """Stands for the ``eqx.nn.State`` while a module is traced: a pytree without leaves.

    Opening it (``get`` / ``set`` / ``substate`` / ``update``) raises
    :class:`~pzbridge.bridge.tracing.graph_types.Untraceable`: code that
    reads or writes State entries itself has no lifted form yet.

    Example:
        >>> STATE_TOKEN.get(None)
        Traceback (most recent call last):
        ...
        pzbridge.bridge.tracing.graph_types.Untraceable: its __call__ opens the eqx.nn.State itself (state.get(...)); traced lifting threads the State only through child modules (BatchNorm, custom children), so this module stays Foreign
    """

    def _opened(self, method: str) -> Untraceable:
        return Untraceable(
            f"its __call__ opens the eqx.nn.State itself (state.{method}(...)); traced lifting threads the State "
            "only through child modules (BatchNorm, custom children), so this module stays Foreign")

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


def with_tokens(tree: Any) -> Any:
    """``tree`` with every ``eqx.nn.State`` replaced by :data:`STATE_TOKEN`.

    Example:
        >>> with_tokens([STATE_TOKEN, 2])[0] is STATE_TOKEN
        True
    """
    return jax.tree_util.tree_map(lambda v: STATE_TOKEN if _is_state(v) else v, tree, is_leaf=_is_state)


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

    The axis names the child's BatchNorms reduce over are bound (size one),
    so a single traced example runs (only its shapes are used).

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
    real_args, real_kwargs = _with_state((tuple(args), dict(kwargs)), state)
    return with_tokens(_bound(lambda: child(*real_args, **real_kwargs), names)())


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
