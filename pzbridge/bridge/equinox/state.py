"""Equinox ``BatchNorm`` with its ``eqx.nn.State``, and lowering back to ``(module, state)``.

Equinox keeps running statistics outside the model: the layer holds
``StateIndex`` markers and the values live in an ``eqx.nn.State`` threaded
through every call. pzbridge keeps state *in* the model as ``StateVariable``
objects, so lifting needs the state (``pzb.lift(model, state=state)``): each
of the BatchNorm's entries becomes a ``StateVariable`` labelled by the path
(``bn.running_mean``, ``bn.running_var``, ``bn.counter`` / ``bn.first_call``).
Without ``state=`` lifting raises (kept ``Foreign`` it would fail when called),
and :func:`checked_state` rejects a ``state=`` that is not this model's State.

Equinox's BatchNorm acts on one example and reduces over the ``vmap`` axis
named ``axis_name``. Lifted, that batch axis is simply a *named* axis with the
same name(s) (usually ``"batch"``), reduced together with whatever spatial
axes the input has; the channel axis is ``channels``. So
``lifted(x, train=True)`` on an ``x`` named ``batch, channels, ...`` updates
the StateVariables exactly as ``jax.vmap(bn, axis_name="batch")`` updates the
State. :func:`lower_with_state` gives back the module and an ``eqx.nn.State``
holding the current StateVariable values.

Example:
    >>> import jax, jax.numpy as jnp, equinox as eqx
    >>> import pzbridge as pzb
    >>> bn, state = eqx.nn.make_with_state(eqx.nn.BatchNorm)(2, "batch", mode="batch")
    >>> lifted = pzb.lift(bn, state=state)
    >>> _ = lifted(pzb.nx.wrap(jnp.array([[0.0, 1.0], [2.0, 5.0]]), "batch", "channels"), train=True)
    >>> [round(v, 6) for v in lifted.body.running_mean.value.unwrap("channels").tolist()]  # 0.01 * batch mean
    [0.01, 0.03]
    >>> module, new_state = lower_with_state(lifted)
    >>> int(new_state.get(module.batch_counter))
    1
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import equinox as eqx
import jax

from pzbridge.bridge.context import LiftContext, LowerContext
from pzbridge.bridge.equinox.adapter import EquinoxAdapter
from pzbridge.bridge.equinox.traversal import (
    EQUINOX,
    EqxOrigin,
    equinox_rule,
    lift_foreign,
    new_lower_context,
    new_module,
    origin_of,
    rebuild_from_origin,
)
from pzbridge.bridge.equinox.state_entries import STATE_OUT_KEY
from pzbridge.bridge.equinox.state_threading import STATE_KEY
from pzbridge.bridge.tracing.state_writes import storage_names
from pzbridge.core import named_axes as nx
from pzbridge.core.errors import LiftError, LowerError, NamedAxisError, format_path
from pzbridge.core.struct import pytree_dataclass, static_field
from pzbridge.core.variables import StateVariable
from pzbridge.nn.basic import rename_axes
from pzbridge.nn.normalization import BatchNorm


@pytree_dataclass
class EqxBatchNorm(BatchNorm):
    """``eqx.nn.BatchNorm`` lifted with its state: a pzbridge ``BatchNorm`` over named batch axes.

    ``across_axes`` holds the batch names (Equinox's ``axis_name``) followed
    by candidate spatial names; a call reduces over those the input has.
    Positional axes, if any, are named ``(channels, *spatial[-k:])`` on the
    way in and un-named on the way out. ``inference=`` is accepted as a side
    input like Equinox's keyword (``train=`` takes priority).

    Attributes:
      indices: The original ``StateIndex`` markers, in the order
        ``(ema_first_time_index, ema_state_index, batch_counter, batch_state_index)``
        (``None`` where the mode has none); kept so lowering rebuilds them exactly.
      channel_axis: Name of the channel axis (static).
      batch_axes: The named batch axes, i.e. Equinox's ``axis_name`` (static).
      axis_name: Equinox's ``axis_name`` value as given (static).
      origin: The original class and static fields (static).

    Example:
        >>> import jax.numpy as jnp
        >>> from pzbridge.core.variables import StateVariable
        >>> mean = StateVariable(nx.wrap(jnp.zeros(1), "channels"), "m")
        >>> var = StateVariable(nx.wrap(jnp.ones(1), "channels"), "v")
        >>> count = StateVariable(jnp.array(0), "c")
        >>> bn = EqxBatchNorm(None, None, mean, var, count, None, ("batch",), 0.0, 0.5, debias=True,
        ...                   divide_by_sqrt=True, channel_axis="channels", batch_axes=("batch",))
        >>> bn(nx.wrap(jnp.array([[1.0], [3.0]]), "batch", "channels"), train=True).unwrap("batch", "channels")
        Array([[-1.],
               [ 1.]], dtype=float32)
        >>> int(count.value), mean.value.unwrap("channels").tolist()
        (1, [1.0])
    """

    indices: tuple[Any, ...] = ()
    channel_axis: str = static_field(default="channels")
    batch_axes: tuple[str, ...] = static_field(default=("batch",))
    axis_name: Any = static_field(default="batch")
    origin: EqxOrigin | None = static_field(default=None)

    def __call__(self, x: nx.NamedArrayBase, /, **side_inputs: Any) -> nx.NamedArrayBase:
        spatial = tuple(n for n in self.across_axes if n not in self.batch_axes)
        tagged: tuple[str, ...] = ()
        if nx.is_namedarray(x) and x.positional_shape:
            rank = len(x.positional_shape)
            if not 1 <= rank <= len(spatial) + 1:
                raise NamedAxisError(
                    f"EqxBatchNorm {self.running_mean.label!r}: expected positional (channels, *spatial) with at "
                    f"most {len(spatial)} spatial axes, found positional shape {x.positional_shape} (named "
                    f"{dict(x.named_shape)}). Fix: name the axes, e.g. pzb.nx.wrap(x, 'batch', 'channels')."
                )
            tagged = self.input_names(rank) or ()
            x = x.tag(*tagged)
        if "train" not in side_inputs and side_inputs.get("inference") is not None:
            side_inputs = {**side_inputs, "train": not side_inputs["inference"]}
        present = tuple(n for n in spatial if nx.is_namedarray(x) and n in x.named_shape)
        train = side_inputs.get("train")
        batch = self.batch_axes
        if (self.use_running_average if train is None else not train) and nx.is_namedarray(x):
            # Running statistics reduce nothing: Equinox's inference mode runs on one example too.
            batch = tuple(n for n in batch if n in x.named_shape)
        layer = dataclasses.replace(self, across_axes=(*batch, *present))
        renamed = self._channel_rename(x, (*batch, *present))
        if renamed:
            x = rename_axes(x, {renamed: self.channel_axis})
        out = BatchNorm.__call__(layer, x, **side_inputs)
        if renamed:
            out = rename_axes(out, {self.channel_axis: renamed})
        return out.untag(*tagged) if tagged else out

    def input_names(self, rank: int) -> tuple[str, ...] | None:
        """The names of an example's ``rank`` positional axes: ``(channels, *spatial[-rank + 1:])``, as Equinox.

        Example:
            >>> import jax.numpy as jnp
            >>> from pzbridge.core.variables import StateVariable
            >>> s = StateVariable(nx.wrap(jnp.zeros(1), "channels"), "s")
            >>> EqxBatchNorm(None, None, s, s, None, None, ("batch", "height", "width"), 0.0, 0.5).input_names(3)
            ('channels', 'height', 'width')
        """
        spatial = tuple(n for n in self.across_axes if n not in self.batch_axes)
        if not 1 <= rank <= len(spatial) + 1:
            return None
        return (self.channel_axis, *spatial[len(spatial) - rank + 1:])

    def _channel_rename(self, x: Any, reduced: tuple[str, ...]) -> str | None:
        """The input's one unreduced axis when it is not named ``channel_axis`` (e.g. a Linear's ``features``).

        Equinox's BatchNorm finds its channels by position, whatever the axis
        means upstream, so the lifted one takes them by elimination: a
        ``Linear -> BatchNorm`` Sequential names its join ``features``.
        """
        if not nx.is_namedarray(x) or x.positional_shape or self.channel_axis in x.named_shape:
            return None
        others = [n for n in x.named_shape if n not in reduced]
        return others[0] if len(others) == 1 else None


def _batch_axes(axis_name: Any) -> tuple[str, ...] | None:
    """Equinox's ``axis_name`` as named-axis names, or None when it cannot be one."""
    names = (axis_name,) if isinstance(axis_name, str) else axis_name
    if not isinstance(names, tuple) or not names or not all(isinstance(n, str) for n in names):
        return None
    return names


@equinox_rule(source=eqx.nn.BatchNorm, lifted=(EqxBatchNorm,))
class BatchNormRule:
    """``eqx.nn.BatchNorm`` <-> ``EqxBatchNorm`` (with ``state=``); ``weight``/``bias``/stats ``(C,)`` -> ``{channels}``.

    Mode ``"batch"`` lifts to pzbridge mode ``"batch"`` with ``debias=True``
    and a ``counter``; mode ``"ema"`` to mode ``"ema"`` with ``first_call``.
    Equinox's ``(x - m) / sqrt(v + eps)`` is ``divide_by_sqrt=True``.
    Without a State at lift time lifting raises a ``LiftError``; with an
    ``axis_name`` that is not a string / tuple of strings the module stays
    ``Foreign``.
    """

    def lift(self, module: eqx.nn.BatchNorm, ctx: LiftContext) -> Any:
        state = ctx.shared.extras.get(STATE_KEY)
        if state is None:
            raise _missing_state_error(ctx.where)
        batch_axes = _batch_axes(module.axis_name)
        if batch_axes is None:
            return lift_foreign(module, ctx)
        c = ctx.naming.channels
        weight = None if module.weight is None else ctx.child("weight").parameter(module.weight, (c,))
        bias = None if module.bias is None else ctx.child("bias").parameter(module.bias, (c,))
        ema = module.mode == "ema"
        stats_index = module.ema_state_index if ema else module.batch_state_index
        mean, var = state.get(stats_index)
        _check_stats_shape(mean, var, module.input_size, ctx.where)
        # The State's own arrays are the sources, so an array reached twice stays one variable.
        running_mean = ctx.variable(StateVariable, mean, lambda: nx.wrap(mean, c), ctx.label("running_mean"), None)
        running_var = ctx.variable(StateVariable, var, lambda: nx.wrap(var, c), ctx.label("running_var"), None)
        counter = first = None
        if ema:
            first = ctx.state_variable(state.get(module.ema_first_time_index), "first_call")
        else:
            counter = ctx.state_variable(state.get(module.batch_counter), "counter")
        spatial = (ctx.naming.depth, ctx.naming.height, ctx.naming.width)
        indices = (module.ema_first_time_index, module.ema_state_index, module.batch_counter,
                   module.batch_state_index)
        return EqxBatchNorm(
            weight, bias, running_mean, running_var, counter, first, (*batch_axes, *spatial),
            module.eps, module.momentum, module.mode, use_running_average=bool(module.inference),
            debias=not ema, divide_by_sqrt=True, indices=indices, channel_axis=c, batch_axes=batch_axes,
            axis_name=module.axis_name, origin=origin_of(module),
        )

    def lower(self, layer: EqxBatchNorm, ctx: LowerContext) -> Any:
        c = layer.channel_axis
        params = [p for p in (layer.scale, layer.bias) if p is not None]
        ema = layer.mode == "ema"
        fits = (
            len(params) in (0, 2) and layer.debias == (not ema) and layer.divide_by_sqrt
            and not layer.use_fast_variance and not layer.scale_into_inverse and layer.dtype_policy == "input"
            and len(layer.indices) == 4 and all(storage_names(p) == (c,) for p in params)
            and all(storage_names(s) == (c,) for s in (layer.running_mean, layer.running_var))
        )
        if not fits:
            return EquinoxAdapter.wrap(layer, ctx)
        weight = None if layer.scale is None else ctx.child("weight").array(layer.scale, (c,))
        bias = None if layer.bias is None else ctx.child("bias").array(layer.bias, (c,))
        first_index, ema_index, counter_index, batch_index = layer.indices
        stats = (ctx.array(layer.running_mean, (c,)), ctx.array(layer.running_var, (c,)))
        out = ctx.shared.extras.setdefault(STATE_OUT_KEY, {})
        if ema:
            out[first_index.marker] = ctx.array(layer.first_call, ())
            out[ema_index.marker] = stats
        else:
            out[counter_index.marker] = ctx.array(layer.counter, ())
            out[batch_index.marker] = stats
        # Back from an adapter the indices are markers: made again, with the current values as initial ones.
        first_index, ema_index, counter_index, batch_index = (
            index if index is None or isinstance(index, eqx.nn.StateIndex)
            else new_module(eqx.nn.StateIndex, marker=index.marker, init=out[index.marker])
            for index in layer.indices)
        origin = layer.origin
        size = stats[0].shape[0]
        return rebuild_from_origin(
            origin, eqx.nn.BatchNorm, weight=weight, bias=bias, ema_first_time_index=first_index,
            ema_state_index=ema_index, batch_counter=counter_index, batch_state_index=batch_index,
            axis_name=layer.axis_name, inference=layer.use_running_average,
            **({} if origin is not None else dict(
                input_size=size, eps=layer.epsilon, channelwise_affine=weight is not None,
                momentum=layer.momentum, mode=layer.mode)),
        )


def _missing_state_error(where: str) -> LiftError:
    # Kept Foreign, the BatchNorm would lift but fail when called: its statistics live only in the State.
    return LiftError(
        f"{where}: eqx.nn.BatchNorm keeps its running statistics in an eqx.nn.State, expected "
        "pzb.lift(model, state=state), found no state=. Fix: build the model with its state, model, state = "
        "eqx.nn.make_with_state(Model)(...), and lift with pzb.lift(model, state=state)."
    )


def _check_stats_shape(mean: Any, var: Any, size: int, where: str) -> None:
    shapes = (getattr(mean, "shape", None), getattr(var, "shape", None))
    if any(shape is None or tuple(shape) != (size,) for shape in shapes):
        raise LiftError(
            f"{where}: the State's running statistics of this eqx.nn.BatchNorm({size}, ...) expected shape "
            f"({size},), found shapes {shapes[0]} and {shapes[1]}. Fix: pass the State made together with this "
            "model (eqx.nn.make_with_state), not one of another model."
        )


def _state_indices(module: Any) -> list[tuple[str, eqx.nn.StateIndex]]:
    leaves = jax.tree_util.tree_flatten_with_path(module, is_leaf=_is_index)[0]
    return [(format_path(path), leaf) for path, leaf in leaves if _is_index(leaf)]


def checked_state(state: Any, module: Any) -> eqx.nn.State:
    """``state`` if it is the ``eqx.nn.State`` of ``module``; else a :class:`LiftError` saying what is wrong.

    ``pzb.lift(model, state=...)`` calls it. The State must hold an entry for
    every ``StateIndex`` in ``module`` (it may hold more: the State of a
    whole model serves to lift one of its submodules).

    Raises:
      LiftError: If ``state`` is not an ``eqx.nn.State``, or lacks an entry of ``module``.

    Example:
        >>> import equinox as eqx
        >>> bn, state = eqx.nn.make_with_state(eqx.nn.BatchNorm)(2, "batch")
        >>> checked_state(state, bn) is state
        True
        >>> checked_state({"mean": 0}, bn)
        Traceback (most recent call last):
        ...
        pzbridge.core.errors.LiftError: <root>: state= expected an eqx.nn.State (the second result of eqx.nn.make_with_state), found dict {'mean': 0}. Fix: model, state = eqx.nn.make_with_state(Model)(...); pzb.lift(model, state=state).
    """
    if not isinstance(state, eqx.nn.State):
        raise LiftError(
            f"<root>: state= expected an eqx.nn.State (the second result of eqx.nn.make_with_state), found "
            f"{type(state).__name__} {state!r:.60}. Fix: model, state = eqx.nn.make_with_state(Model)(...); "
            "pzb.lift(model, state=state)."
        )
    entries = getattr(state, "_state", None)  # State has no public mapping view
    if not isinstance(entries, dict):
        raise LiftError(
            "<root>: state= is an eqx.nn.State without entries (a substate or a consumed State), expected the "
            "State of the model. Fix: pass the State returned by eqx.nn.make_with_state (or by the last call)."
        )
    for where, index in _state_indices(module):
        if index.marker not in entries:
            known = sorted(map(str, entries))
            raise LiftError(
                f"{where}: state= has no entry for this StateIndex, expected one for {index.marker!r}, found "
                f"entries {known[:4]}{' ...' if len(known) > 4 else ''}. Fix: pass the State made together with "
                "this model (eqx.nn.make_with_state(Model)(...)), not one of another model."
            )
    return state


def _states_in(tree: Any) -> list[eqx.nn.State]:
    is_state = lambda v: isinstance(v, eqx.nn.State)  # noqa: E731
    return [v for v in jax.tree_util.tree_leaves(tree, is_leaf=is_state) if is_state(v)]


def state_of_example(args: Sequence[Any], kwargs: Mapping[str, Any], state: Any) -> Any:
    """The State to lift with: ``state=``, else the ``eqx.nn.State`` among the example's arguments.

    ``pzb.lift(model, x, state)`` traces ``y, state = model(x, state)``; the
    State passed as an argument is the one its BatchNorms hold.

    Raises:
      LiftError: If ``state=`` and an example's State are different objects.

    Example:
        >>> bn, st = eqx.nn.make_with_state(eqx.nn.BatchNorm)(2, "batch")
        >>> state_of_example((jax.numpy.ones(2), st), {}, None) is st
        True
    """
    found = _states_in((tuple(args), dict(kwargs)))
    if not found:
        return state
    if state is not None and any(v is not state for v in found) or len({id(v) for v in found}) > 1:
        raise LiftError(
            "<root>: the example arguments hold an eqx.nn.State, expected the same State as state=, found "
            "another one. Fix: pass the model's State once, pzb.lift(model, x, state) (or state=state only).")
    return found[0]


def example_with_state(module: Any, args: Sequence[Any], state: Any) -> tuple[Any, ...]:
    """``args`` followed by ``state`` when ``module``'s own ``__call__`` takes the State next (``(x, state)``).

    So ``pzb.lift(model, x, state=state)`` traces a custom module written
    ``y, state = model(x, state)`` as ``pzb.lift(model, x, state)`` does. A
    module with a lifting rule (``eqx.nn.BatchNorm``) or an example that
    already holds a State is left as it is.

    Example:
        >>> class Block(eqx.Module):
        ...     bn: eqx.nn.BatchNorm
        ...     def __call__(self, x, state): return self.bn(x, state)
        >>> block, st = eqx.nn.make_with_state(Block)(eqx.nn.BatchNorm(2, "batch"))
        >>> example_with_state(block, (jax.numpy.ones(2),), st)[1] is st
        True
    """
    if state is None or EQUINOX.lift_rule_for(type(module)) is not None or _states_in(tuple(args)):
        return tuple(args)
    try:
        params = list(inspect.signature(type(module).__call__).parameters.values())[1:]
    except (TypeError, ValueError):
        return tuple(args)
    takes_state = len(params) > len(args) and params[len(args)].name == "state"
    return (*args, state) if takes_state else tuple(args)


def without_state_args(args: Sequence[Any], state: Any) -> tuple[tuple[Any, ...], Any]:
    """The example arguments without the ``eqx.nn.State`` among them, and the State (else ``state``).

    Example:
        >>> bn, st = eqx.nn.make_with_state(eqx.nn.BatchNorm)(2, "batch")
        >>> rest, found = without_state_args((1.0, st), None)
        >>> rest, found is st
        ((1.0,), True)
    """
    found = [a for a in args if isinstance(a, eqx.nn.State)]
    return tuple(a for a in args if not isinstance(a, eqx.nn.State)), (found[0] if found else state)


def _is_index(value: Any) -> bool:
    return isinstance(value, eqx.nn.StateIndex)


def with_initial_state(module: Any, ctx: LowerContext) -> Any:
    """``module`` whose lowered BatchNorms' ``StateIndex`` es hold their current values as initial values.

    So ``eqx.nn.State(module)`` builds the State of a converted model, as it
    does for an adapter (``eqx.nn.make_with_state`` leaves no initial value
    behind, and a converted model comes back without a State). The markers
    stay the original ones.

    Example:
        >>> import pzbridge as pzb
        >>> bn, st = eqx.nn.make_with_state(eqx.nn.BatchNorm)(3, "batch", mode="batch")
        >>> ctx = new_lower_context()
        >>> module = with_initial_state(ctx.lower_node(pzb.lift(bn, state=st).body, ctx), ctx)
        >>> int(eqx.nn.State(module).get(module.batch_counter))
        0
    """
    collected: dict[Hashable, Any] = ctx.shared.extras.get(STATE_OUT_KEY, {})
    if not collected:
        return module

    def filled(index: Any) -> Any:
        if not _is_index(index) or index.marker not in collected:
            return index
        return new_module(eqx.nn.StateIndex, marker=index.marker, init=collected[index.marker])

    return jax.tree_util.tree_map(filled, module, is_leaf=_is_index)


def lower_with_state(lifted: Any, state: eqx.nn.State | None = None) -> tuple[Any, eqx.nn.State]:
    """Lowers a lifted Equinox model and collects its ``eqx.nn.State`` from the StateVariables.

    The State has one entry per ``StateIndex`` of the lowered module, in the
    module's leaf order (as ``eqx.nn.make_with_state`` builds it). Entries of
    lifted BatchNorms hold the StateVariables' current values; entries of
    other stateful modules (e.g. a ``Foreign`` ``SpectralNorm``) are taken
    from ``state``.

    Args:
      lifted: A :class:`~pzbridge.bridge.lifted.LiftedModel` (or lifted layer) from Equinox.
      state: The original State, used for entries pzbridge does not hold.

    Returns:
      ``(module, state)`` as ``eqx.nn.make_with_state`` would return them.

    Raises:
      LowerError: If a ``StateIndex`` has no value in the lifted model nor in ``state``.

    Example:
        >>> import equinox as eqx
        >>> import pzbridge as pzb
        >>> bn, st = eqx.nn.make_with_state(eqx.nn.BatchNorm)(3, "batch", mode="ema")
        >>> module, new_st = lower_with_state(pzb.lift(bn, state=st))
        >>> bool(new_st.get(module.ema_first_time_index))
        True
    """

    body = getattr(lifted, "body", lifted)
    ctx = new_lower_context()
    module = ctx.lower_node(body, ctx)
    collected: dict[Hashable, Any] = ctx.shared.extras.get(STATE_OUT_KEY, {})
    known = dict(state._state) if state is not None else {}  # noqa: SLF001 - State has no public mapping view
    keys, values = [], []
    for leaf in jax.tree_util.tree_leaves(module, is_leaf=_is_index):
        if not _is_index(leaf) or leaf.marker in keys:
            continue
        if leaf.marker in collected:
            value = collected[leaf.marker]
        elif leaf.marker in known:
            value = known[leaf.marker]
        elif jax.tree_util.tree_leaves(leaf.init):  # An adapter's own entry (make_with_state leaves none behind).
            value = leaf.init
        else:
            raise LowerError(
                f"<root>: the lowered module has a StateIndex {leaf.marker!r} whose value pzbridge does not "
                "hold (a stateful module kept as Foreign). Fix: pass the original state, "
                "lower_with_state(lifted, state=state)."
            )
        keys.append(leaf.marker)
        values.append(value)
    return module, eqx.nn.State.tree_unflatten(tuple(keys), tuple(values))
