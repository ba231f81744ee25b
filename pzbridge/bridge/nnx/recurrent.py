"""Flax NNX recurrent cell rules: ``SimpleCell``, ``GRUCell``, ``LSTMCell``, ``OptimizedLSTMCell``.

An NNX cell is called ``cell(carry, x) -> (new_carry, y)`` on batched
inputs ``(*batch, in_features)``; the carry is ``(*batch, hidden)`` (a pair
``(c, h)`` for the LSTMs). The pzbridge cells of :mod:`pzbridge.nn.recurrent`
take the very same pair, so a lifted NNX cell is an :class:`NnxCell`: a thin
layer around a genuine pzbridge cell that only names the trailing axis of a
carry given as plain arrays (``features``) and carries the NNX statics
needed to rebuild the original module (``nnx.graphdef`` equal).
``lifted.positional(carry, x)`` therefore takes exactly what NNX takes and
returns ``(new_carry, y)`` as plain arrays.

Each NNX cell is made of ``nnx.Linear`` sub-modules whose buffers are kept as
they are (``kernel (in, out)``):

- ``SimpleCell``: ``dense_i`` / ``dense_h`` -> ``{features, features_out}``,
  ``dense_i.bias`` -> ``{features}``; ``bias_placement="input"``, ``residual``;
- ``GRUCell``: fused ``dense_i`` / ``dense_h`` -> ``{features, gates}``,
  ``dense_i.bias`` -> ``{gates}`` (gates ``r, z, n``, ``update="interpolate"``);
- ``OptimizedLSTMCell``: fused ``dense_i`` / ``dense_h`` -> ``{features, gates}``,
  ``dense_h.bias`` -> ``{gates}`` (``bias_placement="recurrent"``);
- ``LSTMCell``: separate per-gate ``ii, if_, ig, io`` / ``hi, hf, hg, ho``
  kernels and the ``h*`` biases (``bias_placement="recurrent"``);

both LSTMs use ``carry_order=("c", "h")``. Kept ``Foreign`` (exact but not
editable as pzbridge cells): sub-Linears with non-default numerics
(``dtype``, ``precision``, ``dot_general`` ...), a bias where NNX's
constructor never puts one, and cells with extra data attributes. An edited
cell NNX cannot express lowers to an ``NnxAdapter`` with the same calling
convention. ``nnx.RNN`` / ``nnx.Bidirectional`` have no rule: they stay
``Foreign`` with their cells lifted by this module (so selectors reach the
kernels) and run NNX's own scan.

Example:
    >>> import jax, jax.numpy as jnp
    >>> from flax import nnx
    >>> import pzbridge as pzb
    >>> cell = nnx.GRUCell(3, 4, rngs=nnx.Rngs(0))
    >>> lifted = pzb.lift(cell)
    >>> type(lifted.body).__name__, type(lifted.body.cell).__name__
    ('NnxCell', 'GRUCell')
    >>> h, x = jnp.zeros((2, 4)), jnp.ones((2, 3))
    >>> new_h, y = lifted.positional(h, x)
    >>> bool(jnp.allclose(y, cell(h, x)[1], atol=1e-6))
    True
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from pzbridge.bridge.context import LiftContext, LowerContext
from pzbridge.bridge.lifted import CallingConvention, name_trailing_axes
from pzbridge.bridge.naming import AxisNaming
from pzbridge.bridge.nnx.adapter import NnxAdapter
from pzbridge.bridge.nnx.linear import _NUMERIC, _linear_statics
from pzbridge.bridge.nnx.statics import (
    NnxStatics,
    build_module,
    data_attributes,
    statics_match,
)
from pzbridge.bridge.nnx.traversal import NNX, lift_foreign, nnx_rule
from pzbridge.bridge.nnx.variables import lift_variable, nnx_variable, storage_names
from pzbridge.core import named_axes as nx
from pzbridge.core.errors import NamedAxisError
from pzbridge.core.named_axes_ops import map_data
from pzbridge.core.struct import pytree_dataclass, static_field
from pzbridge.nn.layer import Layer
from pzbridge.nn.linear import weight_output_name
from pzbridge.nn.recurrent import GRUCell, LSTMCell, SimpleCell
from pzbridge.nn.recurrent_gates import is_separate

GATES = "gates"


_LSTM_INPUT = ("ii", "if_", "ig", "io")


_LSTM_HIDDEN = ("hi", "hf", "hg", "ho")


# Per NNX class: which sub-Linears exist and which of them carry a bias.
_LAYOUT: dict[type, tuple[tuple[str, ...], tuple[str, ...]]] = {
    nnx.SimpleCell: (("dense_i", "dense_h"), ("dense_i",)),
    nnx.GRUCell: (("dense_i", "dense_h"), ("dense_i",)),
    nnx.OptimizedLSTMCell: (("dense_i", "dense_h"), ("dense_h",)),
    nnx.LSTMCell: (_LSTM_INPUT + _LSTM_HIDDEN, _LSTM_HIDDEN),
}


@pytree_dataclass
class NnxCell(Layer):
    """An NNX recurrent cell lifted: ``(carry, x) -> (new_carry, y)`` around a pzbridge cell.

    Plain-array carry leaves (a positional call) get their trailing axis
    named ``cell.hidden_axis``; leading axes stay positional batch axes.

    Attributes:
      cell: A pzbridge ``SimpleCell`` / ``GRUCell`` / ``LSTMCell``.
      config: ``(nnx class, outer statics, ((sub-Linear name, statics), ...))``
        to rebuild the original module (static; None if built in pzbridge).
      compute_dtype: The dtype NNX's sub-Linears cast inputs and carry to
        (``SimpleCell``'s default ``float32``), or None (static).

    Example:
        >>> inner = SimpleCell.from_config("rnn", jax.random.key(0), 3, 2)
        >>> x = name_trailing_axes(nx.wrap(jnp.ones((5, 3))), ("features",))
        >>> h, y = NnxCell(inner)((jnp.zeros((5, 2)), x))
        >>> h.positional_shape, dict(h.named_shape)
        ((5,), {'features': 2})
    """

    cell: Any
    config: Any = static_field(default=None)
    compute_dtype: Any = static_field(default=None)

    def __call__(self, x: Any, /, **side_inputs: Any) -> Any:
        if not (isinstance(x, tuple) and len(x) == 2):
            raise NamedAxisError(
                f"NnxCell({type(self.cell).__name__}): expected a pair (carry, x) as NNX cells take, found "
                f"{type(x).__name__}. Fix: call lifted.positional(carry, x) or lifted.body((carry, x))."
            )
        carry, inputs = x
        carry = jax.tree_util.tree_map(self._name_carry, carry, is_leaf=nx.is_namedarray)
        if self.compute_dtype is not None:
            carry, inputs = jax.tree_util.tree_map(self._cast, (carry, inputs), is_leaf=nx.is_namedarray)
        return self.cell((carry, inputs), **side_inputs)

    def initialize_carry(self, batch_named_shape: Mapping[str, int], dtype: Any = None) -> Any:
        """The wrapped cell's zero carry (NNX's default ``carry_init`` is zeros).

        Example:
            >>> c = NnxCell(SimpleCell.from_config("s", jax.random.key(0), 2, 5))
            >>> dict(c.initialize_carry({"batch": 3}).named_shape)
            {'batch': 3, 'features': 5}
        """
        return self.cell.initialize_carry(batch_named_shape, dtype)

    @property
    def hidden_axis(self) -> str:
        """The wrapped cell's hidden axis (so ``Bidirectional`` can concatenate)."""
        return self.cell.hidden_axis

    def _cast(self, leaf: Any) -> Any:
        return map_data(lambda a: a.astype(self.compute_dtype), leaf) if nx.is_namedarray(leaf) else leaf

    def _name_carry(self, leaf: Any) -> Any:
        if nx.is_namedarray(leaf):
            if leaf.named_shape or not leaf.positional_shape:
                return leaf
            leaf = leaf.unwrap()
        return name_trailing_axes(nx.wrap(jnp.asarray(leaf)), (self.cell.hidden_axis,))


def _sub_supported(linear: Any, has_bias: bool) -> bool:
    return (isinstance(linear, nnx.Linear) and type(linear) is nnx.Linear
            and statics_match(linear, _linear_statics(1, 1, True), tuple(k for k in _NUMERIC if k != "dtype"))
            and (linear.dtype is None or linear.dtype == linear.kernel.dtype)
            and set(data_attributes(linear)) <= {"kernel", "bias"} and linear.kernel.ndim == 2
            and (has_bias or linear.bias is None))


def _supported(module: Any) -> bool:
    subs, biased = _LAYOUT[type(module)]
    extra = set(data_attributes(module)) - set(subs)
    dtypes = {getattr(getattr(module, name, None), "dtype", None) for name in subs}
    # ``rngs`` is a data slot NNX fills only for carry initialisation: None is fine.
    return (all(getattr(module, name) is None for name in extra) and len(dtypes) == 1
            and all(_sub_supported(getattr(module, name, None), name in biased) for name in subs))


def _names(fused: bool, in_axis: str, hidden: str) -> tuple[str, ...]:
    return (in_axis, GATES) if fused else (in_axis, weight_output_name(hidden, (in_axis,)))


def _kernel(module: Any, name: str, ctx: LiftContext, in_axis: str, hidden: str, fused: bool) -> Any:
    return lift_variable(getattr(module, name).kernel, ctx.child(name, "kernel"), _names(fused, in_axis, hidden))


def _bias(module: Any, name: str, ctx: LiftContext, hidden: str, fused: bool) -> Any:
    bias = getattr(module, name).bias
    return None if bias is None else lift_variable(bias, ctx.child(name, "bias"), (GATES if fused else hidden,))


def _config(module: Any) -> tuple[Any, ...]:
    subs, _ = _LAYOUT[type(module)]
    return (type(module), NnxStatics.of(module), tuple((n, NnxStatics.of(getattr(module, n))) for n in subs))


def _lift_cell(module: Any, ctx: LiftContext) -> Any:
    f = ctx.naming.features
    fns = {"activation_fn": module.activation_fn}
    if not isinstance(module, nnx.SimpleCell):
        fns["gate_fn"] = module.gate_fn
    if isinstance(module, nnx.SimpleCell):
        return SimpleCell(_kernel(module, "dense_i", ctx, f, f, False), _kernel(module, "dense_h", ctx, f, f, False),
                          _bias(module, "dense_i", ctx, f, False), input_axis=f, hidden_axis=f,
                          bias_placement="input", residual=module.residual, **fns)
    if isinstance(module, nnx.GRUCell):
        return GRUCell(_kernel(module, "dense_i", ctx, f, f, True), _kernel(module, "dense_h", ctx, f, f, True),
                       _bias(module, "dense_i", ctx, f, True), None, input_axis=f, hidden_axis=f,
                       fused_axis=GATES, update="interpolate", **fns)
    lstm = {"input_axis": f, "hidden_axis": f, "fused_axis": GATES, "carry_order": ("c", "h"),
            "bias_placement": "recurrent", **fns}
    if isinstance(module, nnx.OptimizedLSTMCell):
        return LSTMCell(_kernel(module, "dense_i", ctx, f, f, True), _kernel(module, "dense_h", ctx, f, f, True),
                        _bias(module, "dense_h", ctx, f, True), **lstm)
    biases = tuple(_bias(module, n, ctx, f, False) for n in _LSTM_HIDDEN)
    return LSTMCell(tuple(_kernel(module, n, ctx, f, f, False) for n in _LSTM_INPUT),
                    tuple(_kernel(module, n, ctx, f, f, False) for n in _LSTM_HIDDEN),
                    None if any(b is None for b in biases) else biases, **lstm)


def _cell_convention(naming: AxisNaming) -> CallingConvention:
    # The carry may be a tuple (LSTMs): NnxCell names its leaves; the output is a tuple.
    return CallingConvention(((), (naming.features,)), None)


@nnx_rule(lifted=(NnxCell,))
class CellRule:
    """``nnx.SimpleCell`` / ``GRUCell`` / ``LSTMCell`` / ``OptimizedLSTMCell`` <-> ``NnxCell``.

    Sub-Linear kernels ``(in, out)`` -> ``{features, features_out}`` (plain) or
    ``{features, gates}`` (fused); biases -> ``{features}`` / ``{gates}``.
    """

    def lift(self, module: Any, ctx: LiftContext) -> Any:
        if not _supported(module):
            return lift_foreign(module, ctx)
        subs, _ = _LAYOUT[type(module)]
        dtype = getattr(module, subs[0]).dtype
        return NnxCell(_lift_cell(module, ctx), config=_config(module), compute_dtype=dtype)

    def convention(self, module: Any, naming: AxisNaming) -> CallingConvention | None:
        return _cell_convention(naming) if _supported(module) else None

    def lower(self, layer: NnxCell, ctx: LowerContext) -> Any:
        plan = None if layer.config is None else _lower_plan(layer.cell, layer.config)
        if plan is None:
            cell = layer.cell
            convention = CallingConvention(((), (cell.input_axis,)), None)
            return NnxAdapter.wrap(layer, ctx, convention)
        cls, statics, sub_statics = layer.config
        subs = {}
        for name, (kernel, kernel_names, bias, bias_names) in plan.items():
            subs[name] = build_module(nnx.Linear, dict(sub_statics)[name], {
                "kernel": nnx_variable(kernel, ctx.child(name, "kernel"), kernel_names),
                "bias": None if bias is None else nnx_variable(bias, ctx.child(name, "bias"), bias_names),
            })
        fns = {"activation_fn": layer.cell.activation_fn}
        if cls is nnx.SimpleCell:
            fns["residual"] = layer.cell.residual
        else:
            fns["gate_fn"] = layer.cell.gate_fn
        empty = {name: None for name in statics.order if name not in dict(statics.items) and name not in subs}
        empty.pop("_pytree__state", None)
        return build_module(cls, statics.replace(**fns), {**empty, **subs})


for _cls in _LAYOUT:
    NNX.add(CellRule(), _cls)


def _fits(cell: Any, cls: type) -> bool:
    """True if the (possibly edited) pzbridge cell is still what ``cls`` computes."""
    if cls is nnx.SimpleCell:
        return isinstance(cell, SimpleCell) and cell.bias_placement == "input"
    if cls is nnx.GRUCell:
        return (isinstance(cell, GRUCell) and cell.update == "interpolate" and cell.recurrent_bias is None
                and cell.gate_order == ("r", "z", "n"))
    return (isinstance(cell, LSTMCell) and cell.carry_order == ("c", "h") and cell.bias_placement == "recurrent"
            and cell.gate_order == ("i", "f", "g", "o"))


def _has(param: Any, names: tuple[str, ...]) -> bool:
    return param is not None and not is_separate(param) and set(storage_names(param)) == set(names) \
        and len(names) == len(storage_names(param))


def _lower_plan(cell: Any, config: tuple[Any, ...]) -> dict[str, tuple[Any, Any, Any, Any]] | None:
    """Per sub-Linear ``(kernel, kernel names, bias, bias names)``, or None if NNX cannot express the cell."""
    cls, _, sub_statics = config
    if not _fits(cell, cls):
        return None
    i, h = cell.input_axis, cell.hidden_axis
    fused = cls in (nnx.GRUCell, nnx.OptimizedLSTMCell)
    bias = cell.input_bias if cls is nnx.GRUCell else cell.bias
    _, biased = _LAYOUT[cls]
    if cls is nnx.LSTMCell:
        if not (is_separate(cell.input_weights) and is_separate(cell.recurrent_weights)
                and (cell.bias is None or is_separate(cell.bias))):
            return None
        biases = cell.bias or (None,) * 4
        plan = {n: (w, _names(False, i, h), None, None) for n, w in zip(_LSTM_INPUT, cell.input_weights)}
        plan.update({n: (w, _names(False, h, h), b, (h,)) for n, w, b in zip(_LSTM_HIDDEN, cell.recurrent_weights,
                                                                            biases)})
    else:
        bias_names = (GATES,) if fused else (h,)
        if fused and cell.fused_axis != GATES:
            return None
        plan = {"dense_i": (cell.input_weights, _names(fused, i, h), None, None),
                "dense_h": (cell.recurrent_weights, _names(fused, h, h), None, None)}
        kernel, names, _, _ = plan[biased[0]]
        plan[biased[0]] = (kernel, names, bias, bias_names)
    statics = dict(sub_statics)
    for name, (kernel, names, b, b_names) in plan.items():
        if not _has(kernel, names) or (b is not None and not _has(b, b_names)):
            return None
        # The sub-Linear's use_bias is fixed in its statics: a removed/added bias needs an adapter.
        if (b is not None) != bool(statics[name]["use_bias"]):
            return None
    return plan
