"""Recurrent cells on named axes: ``SimpleCell``, ``GRUCell`` and ``LSTMCell``.

A cell is a :class:`~pzbridge.nn.layer.Layer` that maps a pair
``(carry, x)`` to ``(new_carry, y)``, where ``x`` is one time step of input
with an ``input_axis`` (default ``"features"``) and ``y`` is the new hidden
state with a ``hidden_axis`` (default ``"features"`` too, like
:class:`~pzbridge.nn.linear.Linear`, so recurrent layers stack and feed the
next ``Linear`` with no renaming). Every other named axis is a batch axis.
:class:`~pzbridge.nn.recurrent_scan.ScanOverAxis` runs a cell over a named
time axis.

The cells are written so that both Equinox's and Flax NNX's cells are exact
instances, keeping their buffers as they are (see docs/architecture.md,
"Framework behaviours the bridges respect"):

- kernels are *fused* (one parameter whose gate-major ``fused_axis`` has
  size ``gates * hidden``: Equinox ``weight_ih`` / ``weight_hh``, NNX
  ``OptimizedLSTMCell`` / ``GRUCell``) or *separate* (a tuple, one per gate:
  NNX ``LSTMCell``), see :mod:`pzbridge.nn.recurrent_gates`;
- ``gate_order`` names the gates in storage order (``("r", "z", "n")`` and
  ``("i", "f", "g", "o")`` in both frameworks);
- ``bias_placement`` says where the bias enters the pre-activation sum
  (``"input"``: ``(Wx + b) + Uh``, NNX ``SimpleCell``; ``"recurrent"``:
  ``Wx + (Uh + b)``, NNX LSTMs; ``"sum"``: ``(Wx + Uh) + b``, Equinox
  ``LSTMCell``), so even the rounding matches;
- ``GRUCell`` has an optional ``recurrent_bias`` for the candidate gate only
  (Equinox ``bias_n``) and an ``update`` formula: NNX's
  ``(1 - z) * n + z * h`` or Equinox's ``n + z * (h - n)``;
- ``LSTMCell.carry_order`` is ``("h", "c")`` (Equinox) or ``("c", "h")`` (NNX);
- ``gate_fn`` / ``activation_fn`` are static (NNX lets users change them).

Example:
    >>> import jax, jax.numpy as jnp
    >>> import pzbridge as pzb
    >>> cell = GRUCell.from_config("gru", jax.random.key(0), input_size=3, hidden_size=4)
    >>> x = pzb.nx.ones({"batch": 2, "features": 3})
    >>> h, y = cell((cell.initialize_carry(x.named_shape), x))
    >>> dict(y.named_shape)
    {'batch': 2, 'features': 4}
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp

from pzbridge.core import named_axes as nx
from pzbridge.core.errors import NamedAxisError
from pzbridge.core.named_axes_ops import map_data
from pzbridge.core.struct import pytree_dataclass, static_field
from pzbridge.nn.initializers import constant, make_parameter, variance_scaling
from pzbridge.nn.layer import Layer
from pzbridge.nn.linear import weight_output_name
from pzbridge.nn.recurrent_gates import (
    check_choice,
    check_permutation,
    gate_vectors,
    is_separate,
    label_of,
    linear,
    project,
)

BIAS_PLACEMENTS = ("input", "recurrent", "sum")
GRU_UPDATES = ("interpolate", "difference")


@pytree_dataclass
class RecurrentCell(Layer):
    """Shared behaviour of the cells: carry initialisation and input checks.

    Subclasses define the fields ``recurrent_weights``, ``input_axis`` and
    ``hidden_axis`` and implement ``__call__((carry, x)) -> (new_carry, y)``.

    Example:
        >>> issubclass(LSTMCell, RecurrentCell)
        True
    """

    def hidden_size(self) -> int:
        """The size of the hidden axis, read from the recurrent weights.

        Example:
            >>> SimpleCell.from_config("s", jax.random.key(0), 2, 5).hidden_size()
            5
        """
        first = self.recurrent_weights[0] if is_separate(self.recurrent_weights) else self.recurrent_weights
        shape = dict(first.value.named_shape)
        if self.hidden_axis not in shape:
            raise NamedAxisError(
                f"{type(self).__name__} {label_of(self.recurrent_weights)}: the recurrent weights must "
                f"carry the hidden axis {self.hidden_axis!r} as their input axis; found named shape {shape}. "
                "Fix: tag the weights with the cell's hidden_axis (any storage order)."
            )
        return shape[self.hidden_axis]

    def _zeros(self, batch_named_shape: Mapping[str, int], dtype: Any) -> nx.NamedArray:
        first = self.recurrent_weights[0] if is_separate(self.recurrent_weights) else self.recurrent_weights
        dtype = first.value.dtype if dtype is None else dtype
        batch = {n: s for n, s in batch_named_shape.items() if n not in (self.input_axis, self.hidden_axis)}
        return nx.zeros({**batch, self.hidden_axis: self.hidden_size()}, dtype)

    def initialize_carry(self, batch_named_shape: Mapping[str, int], dtype: Any = None) -> Any:
        """A zero carry for inputs with the given named shape.

        Args:
          batch_named_shape: The batch axes, or the named shape of one input
            step (its ``input_axis`` is dropped).
          dtype: Carry dtype; defaults to the recurrent weights' dtype (as NNX).

        Returns:
          One zero named array with the batch axes and ``hidden_axis``
          (a pair of them, in ``carry_order``, for ``LSTMCell``).

        Example:
            >>> c = SimpleCell.from_config("s", jax.random.key(0), 2, 5)
            >>> dict(c.initialize_carry({"batch": 3, "features": 2}).named_shape)
            {'batch': 3, 'features': 5}
        """
        return self._zeros(batch_named_shape, dtype)

    def _unpack(self, x: Any) -> tuple[Any, nx.NamedArrayBase]:
        if not (isinstance(x, tuple) and len(x) == 2 and nx.is_namedarray(x[1])):
            raise NamedAxisError(
                f"{type(self).__name__}: expected a pair (carry, x) with x a named array, found "
                f"{type(x).__name__}. Fix: call cell((cell.initialize_carry(x.named_shape), x)), or wrap the "
                "cell in ScanOverAxis to run it over a sequence."
            )
        return x

    def _check_hidden(self, h: Any, what: str) -> nx.NamedArrayBase:
        size = self.hidden_size()
        if not nx.is_namedarray(h) or h.named_shape.get(self.hidden_axis) != size:
            found = dict(h.named_shape) if nx.is_namedarray(h) else type(h).__name__
            raise NamedAxisError(
                f"{type(self).__name__}: {what} must be a named array with axis {self.hidden_axis!r} of size "
                f"{size}; found {found}. Fix: start from cell.initialize_carry(x.named_shape)."
            )
        return h


def _combine(ix: Any, hx: Any, bias: Any, placement: str) -> Any:
    # The order of the two additions decides the rounding: keep each framework's.
    if bias is None:
        return ix + hx
    if placement == "input":
        return (ix + bias) + hx
    if placement == "recurrent":
        return ix + (hx + bias)
    return (ix + hx) + bias


def _kernel(label: str, init_base_rng: jax.Array | None, shape: dict[str, int], fan_in_axis: str, dtype: Any) -> Any:
    return make_parameter(label, init_base_rng, lambda k: variance_scaling(k, shape, (fan_in_axis,), dtype))


def _plain_kernel(label: str, init_base_rng: jax.Array | None, in_axis: str, in_size: int, hidden_axis: str,
                  hidden_size: int, dtype: Any) -> Any:
    shape = {in_axis: in_size, weight_output_name(hidden_axis, (in_axis,)): hidden_size}
    return _kernel(label, init_base_rng, shape, in_axis, dtype)


def _gate_kernel(label: str, init_base_rng: jax.Array | None, in_axis: str, in_size: int, hidden_axis: str,
                 hidden_size: int, fused_axis: str, gates: tuple[str, ...], separate: bool, dtype: Any) -> Any:
    """One fused kernel, or a tuple of per-gate kernels labelled ``f"{label}.{gate}"``."""
    if separate:
        return tuple(
            _plain_kernel(f"{label}.{gate}", init_base_rng, in_axis, in_size, hidden_axis, hidden_size, dtype)
            for gate in gates
        )
    shape = {in_axis: in_size, fused_axis: len(gates) * hidden_size}
    return _kernel(label, init_base_rng, shape, in_axis, dtype)


def _zero_bias(label: str, init_base_rng: jax.Array | None, shape: Mapping[str, int], dtype: Any) -> Any:
    return make_parameter(label, init_base_rng, lambda _: constant(shape, 0.0, dtype))


def _gate_bias(label: str, init_base_rng: jax.Array | None, hidden_axis: str, hidden_size: int, fused_axis: str,
               gates: tuple[str, ...], separate: bool, dtype: Any) -> Any:
    if separate:
        return tuple(
            _zero_bias(f"{label}.{gate}", init_base_rng, {hidden_axis: hidden_size}, dtype) for gate in gates
        )
    return _zero_bias(label, init_base_rng, {fused_axis: len(gates) * hidden_size}, dtype)


def _gated_params(
    name: str, init_base_rng: jax.Array | None, input_size: int, hidden_size: int, gates: tuple[str, ...],
    separate: bool, input_axis: str, hidden_axis: str, fused_axis: str, dtype: Any,
) -> tuple[Any, Any]:
    inp = _gate_kernel(f"{name}.input_weights", init_base_rng, input_axis, input_size, hidden_axis, hidden_size,
                       fused_axis, gates, separate, dtype)
    rec = _gate_kernel(f"{name}.recurrent_weights", init_base_rng, hidden_axis, hidden_size, hidden_axis,
                       hidden_size, fused_axis, gates, separate, dtype)
    return inp, rec


@pytree_dataclass
class SimpleCell(RecurrentCell):
    """An Elman cell: ``h' = activation_fn(W x + U h + b [+ h])``; ``y = h'``.

    Attributes:
      input_weights: Parameter with axes ``input_axis`` and ``hidden_axis``
        (``hidden_axis + "_out"`` if they are equal), any storage order.
      recurrent_weights: Parameter with axes ``hidden_axis`` and
        ``hidden_axis + "_out"``.
      bias: Parameter with axis ``hidden_axis``, or None.
      input_axis: Input axis name (static).
      hidden_axis: Hidden/output axis name (static).
      bias_placement: ``"input"`` (NNX ``SimpleCell``), ``"recurrent"`` or
        ``"sum"`` (static).
      residual: Adds ``h`` before the activation, as NNX ``residual=True``.
      activation_fn: The activation (static).

    Example:
        >>> w = pzb.Parameter(pzb.nx.wrap(jnp.eye(2), "features", "features_out"), "w")
        >>> u = pzb.Parameter(pzb.nx.wrap(jnp.zeros((2, 2)), "features", "features_out"), "u")
        >>> h, y = SimpleCell(w, u)((pzb.nx.zeros({"features": 2}), pzb.nx.wrap(jnp.array([0.0, 9.0]), "features")))
        >>> y.unwrap("features").round(3).tolist()
        [0.0, 1.0]
    """

    input_weights: Any
    recurrent_weights: Any
    bias: Any = None
    input_axis: str = static_field(default="features")
    hidden_axis: str = static_field(default="features")
    bias_placement: str = static_field(default="input")
    residual: bool = static_field(default=False)
    activation_fn: Callable[[jax.Array], jax.Array] = static_field(default=jnp.tanh)

    def __post_init__(self) -> None:
        check_choice(self.bias_placement, BIAS_PLACEMENTS, "SimpleCell.bias_placement")

    def __call__(self, x: Any, /, **side_inputs: Any) -> tuple[nx.NamedArrayBase, nx.NamedArrayBase]:
        h, inputs = self._unpack(x)
        h = self._check_hidden(h, "the carry")
        what = f"SimpleCell {label_of(self.input_weights)}"
        ix = linear(_value(self.input_weights, what), inputs, self.input_axis, self.hidden_axis, what)
        hx = linear(_value(self.recurrent_weights, what), h, self.hidden_axis, self.hidden_axis, what)
        pre = _combine(ix, hx, None if self.bias is None else self.bias.value, self.bias_placement)
        if self.residual:
            pre = pre + h
        new_h = map_data(self.activation_fn, pre)
        return new_h, new_h

    @classmethod
    def from_config(
        cls, name: str, init_base_rng: jax.Array | None, input_size: int, hidden_size: int, *, use_bias: bool = True,
        input_axis: str = "features", hidden_axis: str = "features", dtype: Any = jnp.float32, **config: Any,
    ) -> SimpleCell:
        """Builds a cell with parameters ``f"{name}.input_weights"``, ``.recurrent_weights``, ``.bias``.

        Args:
          name: Layer name (parameter label prefix).
          init_base_rng: Base key, or None for slots.
          input_size: Size of ``input_axis``.
          hidden_size: Size of ``hidden_axis``.
          use_bias: Whether to create a (zero) bias.
          input_axis: Input axis name.
          hidden_axis: Hidden axis name.
          dtype: Parameter dtype.
          **config: Other static fields (``bias_placement``, ``residual``, ``activation_fn``).

        Returns:
          The cell.

        Example:
            >>> SimpleCell.from_config("rnn", None, 3, 4).bias
            ParameterSlot(label='rnn.bias')
        """
        inp = _plain_kernel(f"{name}.input_weights", init_base_rng, input_axis, input_size, hidden_axis, hidden_size,
                            dtype)
        rec = _plain_kernel(f"{name}.recurrent_weights", init_base_rng, hidden_axis, hidden_size, hidden_axis,
                            hidden_size, dtype)
        bias = _zero_bias(f"{name}.bias", init_base_rng, {hidden_axis: hidden_size}, dtype) if use_bias else None
        return cls(inp, rec, bias, input_axis=input_axis, hidden_axis=hidden_axis, **config)


def _value(param: Any, what: str) -> nx.NamedArrayBase:
    if is_separate(param):
        raise NamedAxisError(f"{what}: expected a single parameter, found a tuple. Fix: pass one Parameter.")
    return param.value


@pytree_dataclass
class GRUCell(RecurrentCell):
    """A gated recurrent unit; ``y`` is the new hidden state.

    With gates in ``gate_order`` (default ``r, z, n``)::

        r = gate_fn(W_r x + b_r + U_r h)
        z = gate_fn(W_z x + b_z + U_z h)
        n = activation_fn(W_n x + b_n + r * (U_n h + c_n))
        h' = (1 - z) * n + z * h      # update="interpolate" (NNX)
        h' = n + z * (h - n)          # update="difference" (Equinox)

    Attributes:
      input_weights: Fused ``{input_axis, fused_axis}`` parameter or a tuple
        of per-gate ``{input_axis, hidden_axis[_out]}`` parameters.
      recurrent_weights: Same with ``hidden_axis`` as input axis.
      input_bias: Fused ``{fused_axis}`` or per-gate ``{hidden_axis}`` bias
        (``b``), or None.
      recurrent_bias: ``{hidden_axis}`` bias of the candidate gate inside the
        reset product (``c_n``, Equinox ``bias_n``), or None (NNX).
      input_axis, hidden_axis, fused_axis: Axis names (static).
      gate_order: Storage order of ``r``, ``z``, ``n`` (static).
      update: ``"interpolate"`` or ``"difference"`` (static).
      gate_fn, activation_fn: Static activations.

    Example:
        >>> cell = GRUCell.from_config("gru", jax.random.key(0), 3, 2, separate_gates=True)
        >>> [p.label for p in cell.input_weights]
        ['gru.input_weights.r', 'gru.input_weights.z', 'gru.input_weights.n']
    """

    input_weights: Any
    recurrent_weights: Any
    input_bias: Any = None
    recurrent_bias: Any = None
    input_axis: str = static_field(default="features")
    hidden_axis: str = static_field(default="features")
    fused_axis: str = static_field(default="gates")
    gate_order: tuple[str, ...] = static_field(default=("r", "z", "n"))
    update: str = static_field(default="interpolate")
    gate_fn: Callable[[jax.Array], jax.Array] = static_field(default=jax.nn.sigmoid)
    activation_fn: Callable[[jax.Array], jax.Array] = static_field(default=jnp.tanh)

    def __post_init__(self) -> None:
        order = check_permutation(self.gate_order, ("r", "z", "n"), "GRUCell.gate_order")
        object.__setattr__(self, "gate_order", order)
        check_choice(self.update, GRU_UPDATES, "GRUCell.update")
        for field in ("input_weights", "recurrent_weights", "input_bias"):
            if isinstance(getattr(self, field), list):
                object.__setattr__(self, field, tuple(getattr(self, field)))

    def __call__(self, x: Any, /, **side_inputs: Any) -> tuple[nx.NamedArrayBase, nx.NamedArrayBase]:
        h, inputs = self._unpack(x)
        h = self._check_hidden(h, "the carry")
        what = f"GRUCell {label_of(self.input_weights)}"
        n_gates = len(self.gate_order)
        ig = project(self.input_weights, inputs, self.input_axis, self.hidden_axis, self.fused_axis, n_gates, what)
        if self.input_bias is not None:
            biases = gate_vectors(self.input_bias, self.hidden_axis, self.fused_axis, n_gates, what)
            ig = [g + b for g, b in zip(ig, biases)]
        hg = project(self.recurrent_weights, h, self.hidden_axis, self.hidden_axis, self.fused_axis, n_gates, what)
        i = dict(zip(self.gate_order, ig))
        u = dict(zip(self.gate_order, hg))
        r = map_data(self.gate_fn, i["r"] + u["r"])
        z = map_data(self.gate_fn, i["z"] + u["z"])
        un = u["n"] if self.recurrent_bias is None else u["n"] + self.recurrent_bias.value
        n = map_data(self.activation_fn, i["n"] + r * un)
        new_h = (1.0 - z) * n + z * h if self.update == "interpolate" else n + z * (h - n)
        return new_h, new_h

    @classmethod
    def from_config(
        cls, name: str, init_base_rng: jax.Array | None, input_size: int, hidden_size: int, *, use_bias: bool = True,
        use_recurrent_bias: bool = False, separate_gates: bool = False, input_axis: str = "features",
        hidden_axis: str = "features", fused_axis: str = "gates", dtype: Any = jnp.float32, **config: Any,
    ) -> GRUCell:
        """Builds a GRU cell with labels ``f"{name}.input_weights"`` (``.r`` etc. when separate), ...

        Args:
          name: Layer name (parameter label prefix).
          init_base_rng: Base key, or None for slots.
          input_size: Size of ``input_axis``.
          hidden_size: Size of ``hidden_axis``.
          use_bias: Whether to create ``input_bias`` (zeros).
          use_recurrent_bias: Whether to create ``recurrent_bias`` (zeros).
          separate_gates: One parameter per gate instead of fused ones.
          input_axis, hidden_axis, fused_axis: Axis names.
          dtype: Parameter dtype.
          **config: Other static fields (``gate_order``, ``update``, ``gate_fn``, ``activation_fn``).

        Returns:
          The cell.

        Example:
            >>> dict(GRUCell.from_config("g", jax.random.key(0), 3, 2).input_weights.value.named_shape)
            {'features': 3, 'gates': 6}
        """
        gates = tuple(config.get("gate_order", ("r", "z", "n")))
        inp, rec = _gated_params(name, init_base_rng, input_size, hidden_size, gates, separate_gates, input_axis,
                                 hidden_axis, fused_axis, dtype)
        in_bias = (
            _gate_bias(f"{name}.input_bias", init_base_rng, hidden_axis, hidden_size, fused_axis, gates,
                       separate_gates, dtype)
            if use_bias else None
        )
        rec_bias = (
            _zero_bias(f"{name}.recurrent_bias", init_base_rng, {hidden_axis: hidden_size}, dtype)
            if use_recurrent_bias else None
        )
        return cls(inp, rec, in_bias, rec_bias, input_axis=input_axis, hidden_axis=hidden_axis,
                   fused_axis=fused_axis, **config)


@pytree_dataclass
class LSTMCell(RecurrentCell):
    """A long short-term memory cell; the carry is ``(h, c)`` in ``carry_order``, ``y = h'``.

    With gates in ``gate_order`` (default ``i, f, g, o``)::

        i, f, o = gate_fn(W x + U h + b)   # per gate
        g = activation_fn(W_g x + U_g h + b_g)
        c' = f * c + i * g
        h' = o * activation_fn(c')

    Attributes:
      input_weights: Fused ``{input_axis, fused_axis}`` parameter or a tuple
        of per-gate ``{input_axis, hidden_axis[_out]}`` parameters.
      recurrent_weights: Same with ``hidden_axis`` as input axis.
      bias: Fused ``{fused_axis}`` or per-gate ``{hidden_axis}`` bias, or None.
      input_axis, hidden_axis, fused_axis: Axis names (static).
      gate_order: Storage order of ``i``, ``f``, ``g``, ``o`` (static).
      carry_order: ``("h", "c")`` (Equinox) or ``("c", "h")`` (NNX) (static).
      bias_placement: ``"sum"`` (Equinox), ``"recurrent"`` (NNX) or ``"input"``.
      gate_fn, activation_fn: Static activations.

    Example:
        >>> cell = LSTMCell.from_config("lstm", jax.random.key(0), 3, 2, carry_order=("c", "h"))
        >>> x = pzb.nx.ones({"features": 3})
        >>> (c, h), y = cell((cell.initialize_carry(x.named_shape), x))
        >>> h is y
        True
    """

    input_weights: Any
    recurrent_weights: Any
    bias: Any = None
    input_axis: str = static_field(default="features")
    hidden_axis: str = static_field(default="features")
    fused_axis: str = static_field(default="gates")
    gate_order: tuple[str, ...] = static_field(default=("i", "f", "g", "o"))
    carry_order: tuple[str, ...] = static_field(default=("h", "c"))
    bias_placement: str = static_field(default="sum")
    gate_fn: Callable[[jax.Array], jax.Array] = static_field(default=jax.nn.sigmoid)
    activation_fn: Callable[[jax.Array], jax.Array] = static_field(default=jnp.tanh)

    def __post_init__(self) -> None:
        object.__setattr__(
            self, "gate_order", check_permutation(self.gate_order, ("i", "f", "g", "o"), "LSTMCell.gate_order")
        )
        object.__setattr__(self, "carry_order", check_permutation(self.carry_order, ("h", "c"), "LSTMCell.carry_order"))
        check_choice(self.bias_placement, BIAS_PLACEMENTS, "LSTMCell.bias_placement")
        for field in ("input_weights", "recurrent_weights", "bias"):
            if isinstance(getattr(self, field), list):
                object.__setattr__(self, field, tuple(getattr(self, field)))

    def initialize_carry(self, batch_named_shape: Mapping[str, int], dtype: Any = None) -> tuple[Any, Any]:
        """A zero ``(h, c)`` carry in ``carry_order`` (see :meth:`RecurrentCell.initialize_carry`).

        Example:
            >>> cell = LSTMCell.from_config("l", jax.random.key(0), 3, 2)
            >>> [dict(v.named_shape) for v in cell.initialize_carry({"batch": 1})]
            [{'batch': 1, 'features': 2}, {'batch': 1, 'features': 2}]
        """
        return (self._zeros(batch_named_shape, dtype), self._zeros(batch_named_shape, dtype))

    def __call__(self, x: Any, /, **side_inputs: Any) -> tuple[tuple[Any, Any], nx.NamedArrayBase]:
        carry, inputs = self._unpack(x)
        if not (isinstance(carry, tuple) and len(carry) == 2):
            raise NamedAxisError(
                f"LSTMCell: the carry must be a pair {self.carry_order}, found {type(carry).__name__}. "
                "Fix: start from cell.initialize_carry(x.named_shape)."
            )
        state = dict(zip(self.carry_order, carry))
        h = self._check_hidden(state["h"], "the carry's h")
        c = self._check_hidden(state["c"], "the carry's c")
        what = f"LSTMCell {label_of(self.input_weights)}"
        n_gates = len(self.gate_order)
        ig = project(self.input_weights, inputs, self.input_axis, self.hidden_axis, self.fused_axis, n_gates, what)
        hg = project(self.recurrent_weights, h, self.hidden_axis, self.hidden_axis, self.fused_axis, n_gates, what)
        biases = (
            [None] * n_gates if self.bias is None
            else gate_vectors(self.bias, self.hidden_axis, self.fused_axis, n_gates, what)
        )
        pre = {g: _combine(a, b, bias, self.bias_placement) for g, a, b, bias in zip(self.gate_order, ig, hg, biases)}
        i = map_data(self.gate_fn, pre["i"])
        f = map_data(self.gate_fn, pre["f"])
        g = map_data(self.activation_fn, pre["g"])
        o = map_data(self.gate_fn, pre["o"])
        new_c = f * c + i * g
        new_h = o * map_data(self.activation_fn, new_c)
        new = {"h": new_h, "c": new_c}
        return (new[self.carry_order[0]], new[self.carry_order[1]]), new_h

    @classmethod
    def from_config(
        cls, name: str, init_base_rng: jax.Array | None, input_size: int, hidden_size: int, *, use_bias: bool = True,
        separate_gates: bool = False, input_axis: str = "features", hidden_axis: str = "features",
        fused_axis: str = "gates", dtype: Any = jnp.float32, **config: Any,
    ) -> LSTMCell:
        """Builds an LSTM cell with labels ``f"{name}.input_weights"`` (``.i`` etc. when separate), ...

        Args:
          name: Layer name (parameter label prefix).
          init_base_rng: Base key, or None for slots.
          input_size: Size of ``input_axis``.
          hidden_size: Size of ``hidden_axis``.
          use_bias: Whether to create a (zero) bias.
          separate_gates: One parameter per gate instead of fused ones.
          input_axis, hidden_axis, fused_axis: Axis names.
          dtype: Parameter dtype.
          **config: Other static fields (``gate_order``, ``carry_order``,
            ``bias_placement``, ``gate_fn``, ``activation_fn``).

        Returns:
          The cell.

        Example:
            >>> LSTMCell.from_config("l", None, 3, 2, separate_gates=True).bias[3]
            ParameterSlot(label='l.bias.o')
        """
        gates = tuple(config.get("gate_order", ("i", "f", "g", "o")))
        inp, rec = _gated_params(name, init_base_rng, input_size, hidden_size, gates, separate_gates, input_axis,
                                 hidden_axis, fused_axis, dtype)
        bias = (
            _gate_bias(f"{name}.bias", init_base_rng, hidden_axis, hidden_size, fused_axis, gates, separate_gates,
                       dtype)
            if use_bias else None
        )
        return cls(inp, rec, bias, input_axis=input_axis, hidden_axis=hidden_axis, fused_axis=fused_axis, **config)
