"""Equinox rules for recurrent cells: ``GRUCell`` and ``LSTMCell``.

Equinox calls a cell as ``cell(input, hidden) -> new_hidden`` on unbatched
``(input_size,)`` / ``(hidden_size,)`` arrays (``hidden`` is ``(h, c)`` for
the LSTM). pzbridge cells are layers on ``(carry, x) -> (new_carry, y)``, so
that :class:`~pzbridge.nn.recurrent_scan.ScanOverAxis` can run them over a
time axis. A lifted Equinox cell is therefore an :class:`EqxCell`: a thin
layer that takes ``(input, hidden)`` like the original and returns only the
new hidden state, around a genuine pzbridge cell (which selectors reach and
which can be pulled out with ``lifted.body.cell``).

The pzbridge cells represent Equinox's exactly and keep its buffers as they
are: fused ``weight_ih (gates*H, in)`` -> ``{gates, features}``,
``weight_hh (gates*H, H)`` -> ``{gates, features}``, ``bias (gates*H,)`` ->
``{gates}``; the GRU's ``bias_n (H,)`` -> ``{features}`` (the candidate
gate's recurrent bias); GRU ``update="difference"`` (``n + z * (h - n)``);
LSTM ``carry_order=("h", "c")`` and ``bias_placement="sum"``. An edited cell
that Equinox cannot express lowers to an :class:`EquinoxAdapter` with the same
calling convention.

Example:
    >>> import jax, jax.numpy as jnp, equinox as eqx
    >>> import pzbridge as pzb
    >>> cell = eqx.nn.GRUCell(3, 4, key=jax.random.key(0))
    >>> lifted = pzb.lift(cell)
    >>> x, h = jnp.ones(3), jnp.zeros(4)
    >>> bool(jnp.allclose(lifted.positional(x, h), cell(x, h), atol=1e-6))
    True
    >>> pzb.lower(lifted).weight_ih is cell.weight_ih
    True
"""

from __future__ import annotations

from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp

from pzbridge.bridge.context import LiftContext, LowerContext
from pzbridge.bridge.equinox.adapter import EquinoxAdapter
from pzbridge.bridge.equinox.traversal import (
    EqxOrigin,
    equinox_rule,
    origin_of,
    rebuild_from_origin,
)
from pzbridge.bridge.lifted import CallingConvention, name_trailing_axes
from pzbridge.core import named_axes as nx
from pzbridge.core.errors import NamedAxisError
from pzbridge.core.struct import pytree_dataclass, static_field
from pzbridge.nn.layer import Layer
from pzbridge.nn.recurrent import GRUCell, LSTMCell
from pzbridge.nn.recurrent_gates import is_separate


@pytree_dataclass
class EqxCell(Layer):
    """An Equinox recurrent cell lifted: ``(input, hidden) -> new_hidden`` around a pzbridge cell.

    The wrapped ``cell`` works on ``(carry, x) -> (new_carry, y)``; this layer
    swaps the pair into that order, drops ``y`` and ignores Equinox's ``key``.
    A hidden state given as plain arrays (the LSTM's ``(h, c)`` tuple in a
    positional call) gets its trailing axis named ``cell.hidden_axis``.

    Attributes:
      cell: A :class:`~pzbridge.nn.recurrent.GRUCell` or :class:`~pzbridge.nn.recurrent.LSTMCell`.
      origin: The original class and static fields (static).

    Example:
        >>> import pzbridge as pzb
        >>> inner = pzb.nn.recurrent.GRUCell.from_config("gru", jax.random.key(0), 3, 2, update="difference")
        >>> h = EqxCell(inner)((pzb.nx.ones({"features": 3}), jnp.zeros(2)))
        >>> dict(h.named_shape)
        {'features': 2}
    """

    cell: Any
    origin: EqxOrigin | None = static_field(default=None)

    def __call__(self, x: Any, /, **side_inputs: Any) -> Any:
        if not (isinstance(x, tuple) and len(x) == 2):
            raise NamedAxisError(
                f"EqxCell({type(self.cell).__name__}): expected a pair (input, hidden) as Equinox cells take, "
                f"found {type(x).__name__}. Fix: call lifted.positional(x, hidden) or lifted.body((x, hidden))."
            )
        inputs, hidden = x
        hidden = jax.tree_util.tree_map(self._name_hidden, hidden, is_leaf=nx.is_namedarray)
        side = {k: v for k, v in side_inputs.items() if k != "key"}
        new_carry, _ = self.cell((hidden, inputs), **side)
        return new_carry

    def _name_hidden(self, leaf: Any) -> Any:
        if nx.is_namedarray(leaf):
            return leaf if leaf.named_shape or not leaf.positional_shape else self._name_hidden(leaf.unwrap())
        return name_trailing_axes(nx.wrap(jnp.asarray(leaf)), (self.cell.hidden_axis,))


def _fused(module: Any, ctx: LiftContext) -> tuple[Any, Any]:
    f, g = ctx.naming.features, "gates"
    w_ih = ctx.child("weight_ih").parameter(module.weight_ih, (g, f))
    w_hh = ctx.child("weight_hh").parameter(module.weight_hh, (g, f))
    return w_ih, w_hh


def _convention(module: Any, naming: Any, lstm: bool) -> CallingConvention:
    f = naming.features
    # The LSTM's hidden state is a tuple: EqxCell names its arrays; its output is a tuple too.
    return CallingConvention(((f,), () if lstm else (f,)), None if lstm else (f,))


def _is_eqx_axes(cell: Any) -> bool:
    """Single fused kernels with the ``{gates, <hidden>}`` / ``{gates, <input>}`` layout Equinox stores."""
    if is_separate(cell.input_weights) or is_separate(cell.recurrent_weights):
        return False
    try:
        ih, hh = cell.input_weights.value.named_shape, cell.recurrent_weights.value.named_shape
    except Exception:  # noqa: BLE001 - slots have no value
        return False
    return set(ih) == {cell.fused_axis, cell.input_axis} and set(hh) == {cell.fused_axis, cell.hidden_axis} \
        and cell.fused_axis not in (cell.input_axis, cell.hidden_axis)


def _weights(cell: Any, ctx: LowerContext) -> tuple[Any, Any]:
    w_ih = ctx.child("weight_ih").array(cell.input_weights, (cell.fused_axis, cell.input_axis))
    w_hh = ctx.child("weight_hh").array(cell.recurrent_weights, (cell.fused_axis, cell.hidden_axis))
    return w_ih, w_hh


def _static(layer: EqxCell, w_ih: Any, use_bias: bool) -> dict[str, Any]:
    return {"input_size": w_ih.shape[1], "hidden_size": w_ih.shape[0] // (3 if isinstance(layer.cell, GRUCell)
                                                                           else 4),
            "use_bias": use_bias}


@equinox_rule(source=eqx.nn.GRUCell)
class GRUCellRule:
    """``eqx.nn.GRUCell`` <-> ``EqxCell(GRUCell(update="difference"))``.

    ``weight_ih``/``weight_hh`` -> ``{gates, features}``, ``bias`` -> ``{gates}``
    (input bias), ``bias_n`` -> ``{features}`` (recurrent bias of the candidate gate).
    """

    def lift(self, module: eqx.nn.GRUCell, ctx: LiftContext) -> EqxCell:
        f = ctx.naming.features
        w_ih, w_hh = _fused(module, ctx)
        has_bias = module.use_bias and module.bias is not None and module.bias_n is not None
        bias = ctx.child("bias").parameter(module.bias, ("gates",)) if has_bias else None
        bias_n = ctx.child("bias_n").parameter(module.bias_n, (f,)) if has_bias else None
        cell = GRUCell(w_ih, w_hh, bias, bias_n, input_axis=f, hidden_axis=f, fused_axis="gates",
                       update="difference")
        return EqxCell(cell, origin=origin_of(module))

    def convention(self, module: eqx.nn.GRUCell, naming: Any) -> CallingConvention:
        return _convention(module, naming, lstm=False)


@equinox_rule(source=eqx.nn.LSTMCell)
class LSTMCellRule:
    """``eqx.nn.LSTMCell`` <-> ``EqxCell(LSTMCell(carry_order=("h", "c"), bias_placement="sum"))``.

    ``weight_ih``/``weight_hh`` -> ``{gates, features}``, ``bias`` -> ``{gates}``.
    """

    def lift(self, module: eqx.nn.LSTMCell, ctx: LiftContext) -> EqxCell:
        f = ctx.naming.features
        w_ih, w_hh = _fused(module, ctx)
        bias = ctx.child("bias").parameter(module.bias, ("gates",)) if module.bias is not None else None
        cell = LSTMCell(w_ih, w_hh, bias, input_axis=f, hidden_axis=f, fused_axis="gates",
                        carry_order=("h", "c"), bias_placement="sum")
        return EqxCell(cell, origin=origin_of(module))

    def convention(self, module: eqx.nn.LSTMCell, naming: Any) -> CallingConvention:
        return _convention(module, naming, lstm=True)


def _gru_fits(cell: Any) -> bool:
    return (
        isinstance(cell, GRUCell) and _is_eqx_axes(cell) and cell.update == "difference"
        and cell.gate_order == ("r", "z", "n") and cell.gate_fn is jax.nn.sigmoid and cell.activation_fn is jnp.tanh
        and (cell.input_bias is None) == (cell.recurrent_bias is None) and not is_separate(cell.input_bias)
    )


def _lstm_fits(cell: Any) -> bool:
    return (
        isinstance(cell, LSTMCell) and _is_eqx_axes(cell) and cell.carry_order == ("h", "c")
        and cell.bias_placement == "sum" and cell.gate_order == ("i", "f", "g", "o")
        and cell.gate_fn is jax.nn.sigmoid and cell.activation_fn is jnp.tanh and not is_separate(cell.bias)
    )


@equinox_rule(lifted=(EqxCell,))
class EqxCellRule:
    """``EqxCell`` -> ``eqx.nn.GRUCell`` / ``eqx.nn.LSTMCell`` when Equinox computes the same; else an adapter.

    The adapter takes ``(input, hidden)`` and returns the new hidden state,
    as the original did.
    """

    def lower(self, layer: EqxCell, ctx: LowerContext) -> Any:
        cell = layer.cell
        gru = isinstance(cell, GRUCell)
        if gru and _gru_fits(cell):
            w_ih, w_hh = _weights(cell, ctx)
            bias = None if cell.input_bias is None else ctx.child("bias").array(cell.input_bias, (cell.fused_axis,))
            bias_n = None if cell.recurrent_bias is None else ctx.child("bias_n").array(
                cell.recurrent_bias, (cell.hidden_axis,))
            return rebuild_from_origin(layer.origin, eqx.nn.GRUCell, weight_ih=w_ih, weight_hh=w_hh, bias=bias,
                                       bias_n=bias_n, **_static(layer, w_ih, bias is not None))
        if not gru and _lstm_fits(cell):
            w_ih, w_hh = _weights(cell, ctx)
            bias = None if cell.bias is None else ctx.child("bias").array(cell.bias, (cell.fused_axis,))
            return rebuild_from_origin(layer.origin, eqx.nn.LSTMCell, weight_ih=w_ih, weight_hh=w_hh, bias=bias,
                                       **_static(layer, w_ih, bias is not None))
        h = cell.hidden_axis
        convention = CallingConvention(((cell.input_axis,), () if not gru else (h,)), (h,) if gru else None)
        return EquinoxAdapter.wrap(layer, ctx, convention)
