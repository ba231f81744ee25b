"""Contraction of named arrays by axis name, as one ``einsum`` on the raw data.

Linear layers, attention logits and ``NamedEinsum`` all reduce to "multiply
these named arrays and sum over these names". Doing that as a single
``jnp.einsum`` directly on the stored data arrays (with letters assigned per
name) costs one XLA ``dot_general``: no vmap per batch axis, no transpose even
for :class:`~pzbridge.core.named_axes.NamedArrayView` inputs, and trace time
independent of how many batch axes pass through.

Example:
    >>> import jax.numpy as jnp
    >>> from pzbridge.core import named_axes as nx
    >>> x = nx.wrap(jnp.ones((2, 3)), "batch", "features")
    >>> w = nx.wrap(jnp.ones((3, 4)), "features", "features_out")
    >>> dict(contract([x, w], ("features",)).named_shape)
    {'batch': 2, 'features_out': 4}
"""

from __future__ import annotations

import string
from collections.abc import Mapping, Sequence
from typing import Any

import jax.numpy as jnp

from pzbridge.core import named_axes as nx
from pzbridge.core.errors import NamedAxisError
from pzbridge.core.named_axes_core import make_named

_LETTERS = string.ascii_letters


def data_layout(x: nx.NamedArrayBase) -> tuple[Any, tuple[int, ...], dict[str, int]]:
    """The data array, the data axis of each positional axis, and of each name.

    Example:
        >>> x = nx.wrap(jnp.ones((2, 3)), "a", "b").untag("a")
        >>> data_layout(x)[1:]
        ((0,), {'b': 1})
    """
    if isinstance(x, nx.NamedArrayView):
        return x.data_array, x.data_axis_for_logical_axis, dict(x.data_axis_for_name)
    positional = len(x.positional_shape)
    return x.data_array, tuple(range(positional)), {n: positional + i for i, n in enumerate(x.named_axes)}


def contract(
    operands: Sequence[nx.NamedArrayBase],
    contract_names: Sequence[str],
    rename: Mapping[str, str] | None = None,
    precision: Any = None,
    preferred_element_type: Any = None,
) -> nx.NamedArrayBase:
    """Multiplies named arrays, summing over ``contract_names``; other names are kept.

    Axes with the same name in several operands are matched (a shared
    non-contracted name is a batch axis of the product). At most one operand
    may have positional axes; they lead the result. Result names follow their
    first appearance across operands, then ``rename`` maps old to new names.

    Args:
      operands: Named arrays.
      contract_names: Names summed over; each must appear in some operand.
      rename: Optional renaming of result axes (metadata only).
      precision: Passed to ``jnp.einsum``.
      preferred_element_type: Passed to ``jnp.einsum`` (the dtype the product
        accumulates in and is returned in; None: the operands' dtype).

    Returns:
      A named array (a view when the positional axes do not lead): axes come
      in the order XLA's ``dot_general`` produces them, so no transpose is
      added; use names, not storage order, to read it.

    Raises:
      NamedAxisError: On size mismatches, unknown contracted names, positional
        axes in more than one operand, or a rename that collides.

    Example:
        >>> q = nx.wrap(jnp.ones((5, 8)), "seq", "projection")
        >>> k = nx.wrap(jnp.ones((6, 8)), "kv_seq", "projection")
        >>> contract([q, k], ["projection"]).named_shape["kv_seq"]
        6
    """
    letters: dict[str, str] = {}
    sizes: dict[str, int] = {}
    specs: list[str] = []
    datas: list[Any] = []
    positional_spec = ""
    for index, operand in enumerate(operands):
        data, positional_axes, name_axes = data_layout(operand)
        chars = [""] * data.ndim
        if positional_axes:
            if positional_spec:
                raise NamedAxisError(
                    f"contract: operands 0..{index} have positional axes in more than one operand "
                    f"(operand {index} has positional shape {operand.positional_shape}). "
                    "Fix: tag the positional axes with names first (x.tag(...))."
                )
            for axis in positional_axes:
                chars[axis] = _LETTERS[len(letters) + len(positional_spec)]
                positional_spec += chars[axis]
        for name, axis in name_axes.items():
            size = data.shape[axis]
            if name in sizes and sizes[name] != size:
                raise NamedAxisError(
                    f"contract: axis {name!r} has size {sizes[name]} in an earlier operand and {size} in "
                    f"operand {index} (named shape {dict(operand.named_shape)}). Fix: make the sizes agree."
                )
            if name not in letters:
                letters[name] = _LETTERS[len(letters) + len(positional_spec)]
                sizes[name] = size
            chars[axis] = letters[name]
        specs.append("".join(chars))
        datas.append(data)
    unknown = [name for name in contract_names if name not in letters]
    if unknown:
        raise NamedAxisError(
            f"contract: cannot sum over {unknown}: no operand has them (axes present: {sorted(sizes)}). "
            "Fix: check the layer's input axis names against the input's named shape."
        )
    contracted = set(contract_names)
    kept = [name for name in letters if name not in contracted]
    rename = rename or {}
    out_names = [rename.get(name, name) for name in kept]
    if len(set(out_names)) != len(out_names):
        raise NamedAxisError(
            f"contract: renaming {dict(rename)} makes result axes {out_names} collide. "
            "Fix: rename to names that are not already present."
        )
    out_spec = _output_spec(specs, positional_spec, {letters[n] for n in kept})
    result = jnp.einsum(",".join(specs) + "->" + out_spec, *datas, precision=precision,
                        preferred_element_type=preferred_element_type)
    name_of_letter = {letters[name]: rename.get(name, name) for name in kept}
    positional_axes = tuple(out_spec.index(c) for c in positional_spec)
    return make_named(result, positional_axes, {name_of_letter[c]: i for i, c in enumerate(out_spec)
                                               if c in name_of_letter})


def _output_spec(specs: list[str], positional_spec: str, kept: set[str]) -> str:
    """The result's axis order: the one ``dot_general`` produces, so XLA adds no transpose.

    For two operands that is the shared (batch) axes, then the first
    operand's other axes, then the second's, each in data order. Positional
    axes are among the first operand's axes, so the result may be a view.
    """
    kept = kept | set(positional_spec)
    if len(specs) != 2:
        return positional_spec + "".join(c for c in dict.fromkeys("".join(specs)) if c in kept
                                         and c not in positional_spec)
    lhs, rhs = specs
    batch = [c for c in lhs if c in kept and c in rhs]
    lhs_free = [c for c in lhs if c in kept and c not in rhs]
    rhs_free = [c for c in rhs if c in kept and c not in lhs]
    return "".join(batch + lhs_free + rhs_free)
