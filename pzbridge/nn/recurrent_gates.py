"""Gate projections shared by the recurrent cells (:mod:`pzbridge.nn.recurrent`).

A gated cell multiplies its input and its hidden state by one kernel per gate.
Frameworks store those kernels in two layouts, and lifted cells keep whichever
they are given so that no buffer is copied or reshaped:

- *fused*: one parameter whose output axis (``fused_axis``, default
  ``"gates"``) has size ``len(gate_order) * hidden``, gate-major: gate ``k``
  owns entries ``[k * hidden, (k + 1) * hidden)``. This is Equinox's
  ``weight_ih`` ``(3 * hidden, in)`` and NNX's ``dense_i.kernel``
  ``(in, 3 * hidden)``. One einsum computes every gate; the result is split
  afterwards.
- *separate*: a tuple of parameters, one per gate in ``gate_order``, each
  with the ordinary hidden output axis (suffixed ``_out`` where it clashes
  with the input axis, as in :class:`~pzbridge.nn.linear.Linear`). This is
  NNX ``LSTMCell``'s ``ii``, ``if_``, ``ig``, ``io`` sublayers.

Biases follow the same rule (a fused ``{fused_axis}`` vector or a tuple of
``{hidden}`` vectors). Which layout a field uses is read from its Python
structure (tuple or not), which is static under JAX transformations.

Example:
    >>> import jax.numpy as jnp
    >>> import pzbridge as pzb
    >>> w = pzb.Parameter(pzb.nx.wrap(jnp.ones((2, 6)), "features", "gates"), "w")
    >>> r, z, n = project(w, pzb.nx.ones({"features": 2}), "features", "hidden", "gates", 3, "GRUCell")
    >>> dict(n.named_shape), n.unwrap("hidden").tolist()
    ({'hidden': 2}, [2.0, 2.0])
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax.numpy as jnp

from pzbridge.core import named_axes as nx
from pzbridge.core.errors import NamedAxisError, StructError
from pzbridge.core.named_axes_core import make_named
from pzbridge.nn.contraction import contract, data_layout
from pzbridge.nn.linear import weight_output_name


def is_separate(field: Any) -> bool:
    """True when a gate-indexed field holds one parameter per gate (a tuple).

    Example:
        >>> is_separate((1, 2)), is_separate(1)
        (True, False)
    """
    return isinstance(field, (tuple, list))


def label_of(field: Any) -> str:
    """The label(s) of a parameter field, for error messages.

    Example:
        >>> import pzbridge as pzb
        >>> label_of((pzb.ParameterSlot("a"), pzb.ParameterSlot("b")))
        "('a', 'b')"
    """
    if is_separate(field):
        return repr(tuple(getattr(p, "label", "?") for p in field))
    return repr(getattr(field, "label", "?"))


def split_fused(
    y: nx.NamedArrayBase, fused_axis: str, hidden_axis: str, count: int, what: str
) -> list[nx.NamedArrayBase]:
    """Splits a gate-major fused axis into ``count`` arrays with ``hidden_axis``.

    Args:
      y: A named array carrying ``fused_axis`` (and not ``hidden_axis``).
      fused_axis: The fused axis name.
      hidden_axis: The name each chunk's axis gets.
      count: Number of gates.
      what: Layer and field name for error messages.

    Returns:
      ``count`` named arrays, in gate order (no data copy beyond the slice).

    Raises:
      NamedAxisError: If the fused axis is missing or not divisible by ``count``.

    Example:
        >>> y = nx.wrap(jnp.arange(4.0), "gates")
        >>> [c.unwrap("h").tolist() for c in split_fused(y, "gates", "h", 2, "cell")]
        [[0.0, 1.0], [2.0, 3.0]]
    """
    shape = dict(y.named_shape)
    if fused_axis not in shape or shape[fused_axis] % count:
        raise NamedAxisError(
            f"{what}: expected a fused gate axis {fused_axis!r} of size {count} * hidden (gates stored "
            f"gate-major), found named shape {shape}. Fix: name the fused axis {fused_axis!r}, or pass one "
            f"parameter per gate as a tuple of {count}."
        )
    if hidden_axis in shape:
        raise NamedAxisError(
            f"{what}: the result already has an axis {hidden_axis!r} (named shape {shape}), so the gates "
            f"cannot be named {hidden_axis!r}. Fix: rename that input axis or configure another hidden_axis."
        )
    data, positional, names = data_layout(y)
    chunks = jnp.split(data, count, axis=names[fused_axis])
    renamed = {(hidden_axis if name == fused_axis else name): axis for name, axis in names.items()}
    return [make_named(chunk, positional, renamed) for chunk in chunks]


def linear(weight: nx.NamedArrayBase, x: nx.NamedArrayBase, in_axis: str, hidden_axis: str, what: str) -> nx.NamedArray:
    """``W x`` for one gate: contracts ``in_axis``; the weight's output axis becomes ``hidden_axis``.

    The weight stores its output axis as ``hidden_axis`` (``hidden_axis +
    "_out"`` when that equals ``in_axis``), in any storage order.

    Example:
        >>> w = nx.wrap(jnp.ones((3, 2)), "features_out", "features")
        >>> linear(w, nx.ones({"features": 2}), "features", "features", "cell").unwrap("features").tolist()
        [2.0, 2.0, 2.0]
    """
    out_name = weight_output_name(hidden_axis, (in_axis,))
    if out_name not in weight.named_shape or in_axis not in weight.named_shape:
        raise NamedAxisError(
            f"{what}: expected a weight with axes {in_axis!r} and {out_name!r}, found named shape "
            f"{dict(weight.named_shape)}. Fix: tag the weight with these names (any storage order)."
        )
    return contract([x, weight], (in_axis,), {out_name: hidden_axis})


def project(
    kernel: Any, x: nx.NamedArrayBase, in_axis: str, hidden_axis: str, fused_axis: str, count: int, what: str
) -> list[nx.NamedArrayBase]:
    """Multiplies ``x`` by every gate's kernel; returns one array per gate.

    Args:
      kernel: One fused parameter, or a tuple of ``count`` parameters.
      x: The input (carries ``in_axis`` plus any batch names).
      in_axis: Axis contracted.
      hidden_axis: Axis each gate output carries.
      fused_axis: Name of the fused gate axis (fused layout only).
      count: Number of gates.
      what: Layer and field name for error messages.

    Returns:
      ``count`` named arrays in gate order.

    Example:
        >>> import pzbridge as pzb
        >>> ws = tuple(pzb.Parameter(nx.wrap(jnp.eye(2) * k, "features", "h"), f"w{k}") for k in (1, 2))
        >>> [g.unwrap("h").tolist() for g in project(ws, nx.ones({"features": 2}), "features", "h", "gates", 2, "c")]
        [[1.0, 1.0], [2.0, 2.0]]
    """
    if in_axis not in x.named_shape:
        raise NamedAxisError(
            f"{what}: input lacks axis {in_axis!r} (found named shape {dict(x.named_shape)}). "
            f"Fix: tag the input with {in_axis!r} or configure the cell's axis names."
        )
    if is_separate(kernel):
        check_count(kernel, count, what)
        return [linear(k.value, x, in_axis, hidden_axis, what) for k in kernel]
    weight = kernel.value
    if in_axis not in weight.named_shape:
        raise NamedAxisError(
            f"{what}: fused weight lacks axis {in_axis!r} (named shape {dict(weight.named_shape)}). "
            f"Fix: tag the weight with {in_axis!r} and {fused_axis!r} (any storage order)."
        )
    return split_fused(contract([x, weight], (in_axis,)), fused_axis, hidden_axis, count, what)


def gate_vectors(bias: Any, hidden_axis: str, fused_axis: str, count: int, what: str) -> list[nx.NamedArrayBase]:
    """The per-gate bias vectors of a fused or separate bias field.

    Example:
        >>> import pzbridge as pzb
        >>> b = pzb.Parameter(nx.wrap(jnp.arange(4.0), "gates"), "b")
        >>> [v.unwrap("h").tolist() for v in gate_vectors(b, "h", "gates", 2, "c")]
        [[0.0, 1.0], [2.0, 3.0]]
    """
    if is_separate(bias):
        check_count(bias, count, what)
        return [b.value for b in bias]
    return split_fused(bias.value, fused_axis, hidden_axis, count, what)


def check_count(field: Sequence[Any], count: int, what: str) -> None:
    """Checks that a separate-layout field has one parameter per gate.

    Example:
        >>> check_count((1, 2), 3, "LSTMCell.bias")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        pzbridge.core.errors.NamedAxisError: LSTMCell.bias: expected 3 parameters (one per gate), found 2. Fix: ...
    """
    if len(field) != count:
        raise NamedAxisError(
            f"{what}: expected {count} parameters (one per gate), found {len(field)}. Fix: pass one "
            "parameter per gate in gate_order, or a single fused parameter."
        )


def check_permutation(order: Sequence[str], expected: Sequence[str], what: str) -> tuple[str, ...]:
    """Validates a gate or carry order against the names it must permute.

    Example:
        >>> check_permutation(["z", "r", "n"], ("r", "z", "n"), "GRUCell.gate_order")
        ('z', 'r', 'n')
    """
    order = tuple(order)
    if sorted(order) != sorted(expected):
        raise StructError(
            f"{what}: expected a permutation of {tuple(expected)}, found {order}. "
            f"Fix: list each of {tuple(expected)} exactly once."
        )
    return order


def check_choice(value: Any, choices: Sequence[Any], what: str) -> None:
    """Validates a static string option.

    Example:
        >>> check_choice("sum", ("input", "recurrent", "sum"), "LSTMCell.bias_placement")
    """
    if value not in choices:
        raise StructError(f"{what}: expected one of {tuple(choices)}, found {value!r}. Fix: use one of those.")
