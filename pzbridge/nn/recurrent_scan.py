"""Running a recurrent cell over a named time axis: ``ScanOverAxis`` and ``Bidirectional``.

``ScanOverAxis`` is one ``jax.lax.scan`` (through :func:`pzbridge.nx.scan`)
over the time axis (default ``"seq"``); every other named axis is a batch
axis carried inside each step's arrays, so there is no vmap. Its options are
those of Flax NNX's ``RNN`` expressed by name: ``reverse``, ``keep_order``
(NNX's default ``keep_order=False`` returns reversed outputs for a reversed
scan), ``return_carry``, ``unroll`` and per-example sequence lengths (the
side input ``seq_lengths``, a named integer array over the batch axes) with
NNX's padding-aware reversal and last-valid-carry selection.

The initial carry is either zeros from the cell's ``initialize_carry`` or
given by calling the layer on a pair ``(initial_carry, xs)``.

``Bidirectional`` matches NNX ``Bidirectional``: the backward scan runs
reversed with ``keep_order=True`` and the two outputs are concatenated along
the hidden axis (or merged by a given function).

Example:
    >>> import jax, jax.numpy as jnp
    >>> import pzbridge as pzb
    >>> from pzbridge.nn.recurrent import GRUCell
    >>> rnn = ScanOverAxis(GRUCell.from_config("gru", jax.random.key(0), 3, 4))
    >>> ys = rnn(pzb.nx.ones({"batch": 2, "seq": 5, "features": 3}))
    >>> sorted(ys.named_shape.items())
    [('batch', 2), ('features', 4), ('seq', 5)]
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from pzbridge.core import named_axes as nx
from pzbridge.core.errors import NamedAxisError
from pzbridge.core.struct import pytree_dataclass, static_field
from pzbridge.nn.layer import Layer


def flip_sequences(x: nx.NamedArrayBase, axis: str, seq_lengths: nx.NamedArrayBase | None = None) -> nx.NamedArrayBase:
    """Reverses ``x`` along ``axis``; with lengths, reverses each valid prefix.

    With ``seq_lengths`` (``L`` per batch element) step ``t`` takes step
    ``(T - 1 - t + L) mod T``: the first ``L`` steps are reversed and the
    padding stays after them, as Flax's ``flip_sequences``. The map is its
    own inverse.

    Args:
      x: A named array with ``axis``.
      axis: The time axis name.
      seq_lengths: Optional integer named array over (some of) the batch axes.

    Returns:
      The flipped array (same names).

    Example:
        >>> x = nx.wrap(jnp.array([[1, 0, 0], [2, 3, 0]]), "batch", "seq")
        >>> flip_sequences(x, "seq", nx.wrap(jnp.array([1, 2]), "batch")).unwrap("batch", "seq").tolist()
        [[1, 0, 0], [3, 2, 0]]
    """
    if axis not in x.named_shape:
        raise NamedAxisError(
            f"flip_sequences: input lacks the time axis {axis!r} (named shape {dict(x.named_shape)}). "
            "Fix: tag the time axis or pass its name."
        )
    steps = x.named_shape[axis]
    front = x.untag_prefix(axis)
    if seq_lengths is None:
        flipped = nx.nmap(lambda a: jnp.flip(a, axis=0))(front)
    else:
        def take(a: jax.Array, length: jax.Array) -> jax.Array:
            return jnp.take(a, (jnp.arange(steps - 1, -1, -1) + length) % steps, axis=0)

        flipped = nx.nmap(take)(front, seq_lengths)
    return flipped.tag_prefix(axis)


def _pick_step(stacked: Any, axis: str, seq_lengths: nx.NamedArrayBase) -> Any:
    """Each batch element's entry at step ``L - 1`` (``-1`` wraps to the last step, as NNX)."""
    return jax.tree_util.tree_map(
        lambda v: nx.nmap(lambda a, length: a[length - 1])(v.untag_prefix(axis), seq_lengths),
        stacked,
        is_leaf=nx.is_namedarray,
    )


@pytree_dataclass
class ScanOverAxis(Layer):
    """Scans a recurrent cell over the named time axis ``axis``.

    Called on ``xs`` (or on a pair ``(initial_carry, xs)``), it runs
    ``cell((carry, x_t))`` for every step and stacks the per-step outputs
    along ``axis``. Returns ``ys``, or ``(final_carry, ys)`` when
    ``return_carry``.

    Attributes:
      cell: A recurrent cell (``(carry, x) -> (carry, y)`` with
        ``initialize_carry``).
      axis: The time axis (static).
      reverse: Scan from the last step to the first (static).
      keep_order: For a reversed scan, return outputs in input order
        (``True``) or in processing order (``False``, NNX's default) (static).
      return_carry: Also return the final carry (static).
      unroll: Passed to ``jax.lax.scan`` (static).

    Side inputs:
      seq_lengths: Optional integer named array over batch axes: valid
        lengths for padded sequences (affects ``reverse`` and the returned
        carry, as in NNX ``RNN``). Other side inputs go to the cell.

    Example:
        >>> from pzbridge.nn.recurrent import SimpleCell
        >>> cell = SimpleCell.from_config("rnn", jax.random.key(0), 2, 3)
        >>> carry, ys = ScanOverAxis(cell, return_carry=True)(pzb.nx.ones({"seq": 4, "features": 2}))
        >>> bool(jnp.allclose(carry.unwrap("features"), ys[{"seq": -1}].unwrap("features")))
        True
    """

    cell: Layer
    axis: str = static_field(default="seq")
    reverse: bool = static_field(default=False)
    keep_order: bool = static_field(default=True)
    return_carry: bool = static_field(default=False)
    unroll: int = static_field(default=1)

    def __call__(self, x: Any, /, **side_inputs: Any) -> Any:
        initial_carry, xs = x if isinstance(x, tuple) else (None, x)
        carry, ys = self.run(
            xs, initial_carry, reverse=self.reverse, keep_order=self.keep_order, return_carry=self.return_carry,
            **side_inputs,
        )
        return (carry, ys) if self.return_carry else ys

    def run(
        self, xs: nx.NamedArrayBase, initial_carry: Any = None, *, reverse: bool = False, keep_order: bool = True,
        return_carry: bool = True, seq_lengths: nx.NamedArrayBase | None = None, **side_inputs: Any,
    ) -> tuple[Any, nx.NamedArrayBase]:
        """Runs the scan with explicit direction options; returns ``(final_carry, ys)``.

        Args:
          xs: Inputs with the time axis.
          initial_carry: Carry to start from (zeros when None).
          reverse: Scan backwards.
          keep_order: Return a reversed scan's outputs in input order.
          return_carry: Whether the carry will be used; with ``seq_lengths``
            it is then each sequence's last valid carry (else the carry after
            all steps, padding included).
          seq_lengths: Optional valid lengths per batch element.
          **side_inputs: Forwarded to the cell.

        Returns:
          ``(final_carry, ys)``.

        Example:
            >>> from pzbridge.nn.recurrent import SimpleCell
            >>> rnn = ScanOverAxis(SimpleCell.from_config("rnn", jax.random.key(0), 2, 3))
            >>> carry, ys = rnn.run(pzb.nx.ones({"seq": 4, "features": 2}), reverse=True)
            >>> dict(carry.named_shape)
            {'features': 3}
        """
        if not nx.is_namedarray(xs) or self.axis not in xs.named_shape:
            found = dict(xs.named_shape) if nx.is_namedarray(xs) else type(xs).__name__
            raise NamedAxisError(
                f"ScanOverAxis over {self.axis!r} ({type(self.cell).__name__}): input lacks the time axis "
                f"{self.axis!r}; found {found}. Fix: tag the time axis (pzb.nx.wrap(x, 'batch', "
                f"'{self.axis}', 'features')) or set ScanOverAxis(axis=...)."
            )
        if initial_carry is None:
            step_shape = {n: s for n, s in xs.named_shape.items() if n != self.axis}
            initial_carry = self.cell.initialize_carry(step_shape)

        # Stacked carries are only needed to pick each sequence's last valid one.
        pick_carry = seq_lengths is not None and return_carry

        def step(carry: Any, x_t: nx.NamedArrayBase) -> tuple[Any, Any]:
            new_carry, y = self.cell((carry, x_t), **side_inputs)
            return new_carry, ((y, new_carry) if pick_carry else y)

        if seq_lengths is None:
            carry, ys = nx.scan(step, self.axis, initial_carry, xs, reverse=reverse, unroll=self.unroll)
            if reverse and not keep_order:
                ys = flip_sequences(ys, self.axis)
            return carry, ys
        # Padded sequences: flip explicitly (padding stays at the end), as NNX does.
        inputs = flip_sequences(xs, self.axis, seq_lengths) if reverse else xs
        carry, out = nx.scan(step, self.axis, initial_carry, inputs, unroll=self.unroll)
        ys, carries = out if pick_carry else (out, None)
        if pick_carry:
            carry = _pick_step(carries, self.axis, seq_lengths)
        if reverse and keep_order:
            ys = flip_sequences(ys, self.axis, seq_lengths)
        return carry, ys


def concatenate_merge(axis: str) -> Callable[[nx.NamedArrayBase, nx.NamedArrayBase], nx.NamedArrayBase]:
    """A merge function concatenating forward and backward outputs along ``axis``.

    Example:
        >>> merge = concatenate_merge("features")
        >>> merge(nx.zeros({"features": 2}), nx.ones({"features": 1})).unwrap("features").tolist()
        [0.0, 0.0, 1.0]
    """

    def merge(forward: nx.NamedArrayBase, backward: nx.NamedArrayBase) -> nx.NamedArrayBase:
        return nx.concatenate([forward, backward], axis)

    return merge


@pytree_dataclass
class Bidirectional(Layer):
    """Runs a forward and a backward scan over the same inputs and merges them.

    The backward layer always runs reversed with ``keep_order=True`` and the
    forward one forwards, whatever their own ``reverse`` fields say (as NNX).
    ``merge`` of ``None`` concatenates along the forward cell's
    ``hidden_axis`` (NNX's default ``merge_fn``); otherwise it is a static
    function ``merge(forward_ys, backward_ys)`` on named arrays.

    Attributes:
      forward: A :class:`ScanOverAxis`.
      backward: A :class:`ScanOverAxis`.
      merge: None (concatenate) or a static merge function.
      return_carry: Also return ``(forward_carry, backward_carry)`` (static).

    Side inputs:
      seq_lengths: As for :class:`ScanOverAxis`.

    Called on ``xs`` or on ``((forward_carry, backward_carry), xs)``.

    Example:
        >>> from pzbridge.nn.recurrent import LSTMCell
        >>> f = ScanOverAxis(LSTMCell.from_config("f", jax.random.key(0), 2, 3))
        >>> b = ScanOverAxis(LSTMCell.from_config("b", jax.random.key(0), 2, 3))
        >>> Bidirectional(f, b)(pzb.nx.ones({"seq": 4, "features": 2})).named_shape["features"]
        6
    """

    forward: ScanOverAxis
    backward: ScanOverAxis
    merge: Callable[[Any, Any], Any] | None = static_field(default=None)
    return_carry: bool = static_field(default=False)

    def __call__(self, x: Any, /, **side_inputs: Any) -> Any:
        carries, xs = x if isinstance(x, tuple) else ((None, None), x)
        carry_f, ys_f = self.forward.run(xs, carries[0], reverse=False, return_carry=self.return_carry, **side_inputs)
        carry_b, ys_b = self.backward.run(
            xs, carries[1], reverse=True, keep_order=True, return_carry=self.return_carry, **side_inputs
        )
        merge = self.merge or concatenate_merge(self._hidden_axis())
        ys = merge(ys_f, ys_b)
        return ((carry_f, carry_b), ys) if self.return_carry else ys

    def _hidden_axis(self) -> str:
        axis = getattr(self.forward.cell, "hidden_axis", None)
        if axis is None:
            raise NamedAxisError(
                f"Bidirectional: cannot concatenate outputs: the forward cell ({type(self.forward.cell).__name__}) "
                "has no hidden_axis. Fix: pass merge=concatenate_merge('<axis>') or another merge function."
            )
        return axis
