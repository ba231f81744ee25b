"""Parameter-free building blocks: elementwise maps, softmax, renames, casts, rescales,
and ``NamedEinsum`` (a general weight contraction).

Each acts on the raw data of its input and only rewrites axis metadata, so
none of them adds a transpose or a vmap.

Example:
    >>> import jax, jax.numpy as jnp
    >>> import pzbridge as pzb
    >>> x = pzb.nx.wrap(jnp.array([[1.0, 1.0]]), "batch", "kv_seq")
    >>> Softmax(("kv_seq",))(x).untag("batch", "kv_seq").unwrap()
    Array([[0.5, 0.5]], dtype=float32)
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from pzbridge.core import named_axes as nx
from pzbridge.core.errors import NamedAxisError
from pzbridge.core.named_axes_core import make_named
from pzbridge.core.named_axes_ops import map_data
from pzbridge.core.struct import pytree_dataclass, static_field
from pzbridge.nn.contraction import contract, data_layout
from pzbridge.nn.layer import Layer


def _require_axes(x: nx.NamedArrayBase, names: Sequence[str], layer: str) -> None:
    missing = [name for name in names if name not in x.named_shape]
    if missing:
        raise NamedAxisError(
            f"{layer}: input lacks named axes {missing} (found named shape {dict(x.named_shape)}). "
            "Fix: tag the input with these names or configure the layer with the input's axis names."
        )


@pytree_dataclass
class Elementwise(Layer):
    """Applies a jax function to every element (activations: ``jax.nn.gelu``, ...).

    Attributes:
      fn: An elementwise function of one array (static; compared by identity).

    Example:
        >>> Elementwise(jax.nn.relu)(pzb.nx.wrap(jnp.array([-1.0, 2.0]), "features")).unwrap("features")
        Array([0., 2.], dtype=float32)
    """

    fn: Callable[[jax.Array], jax.Array] = static_field()

    def __call__(self, x: nx.NamedArrayBase, /, **side_inputs: Any) -> nx.NamedArrayBase:
        return map_data(self.fn, x)


@pytree_dataclass
class Softmax(Layer):
    """Softmax jointly over the named ``axes`` (e.g. ``("kv_seq",)``).

    Attributes:
      axes: Names normalised over (static).

    Example:
        >>> Softmax(("features",))(pzb.nx.zeros({"features": 4})).unwrap("features")
        Array([0.25, 0.25, 0.25, 0.25], dtype=float32)
    """

    axes: tuple[str, ...] = static_field()

    def __post_init__(self) -> None:
        object.__setattr__(self, "axes", (self.axes,) if isinstance(self.axes, str) else tuple(self.axes))

    def __call__(self, x: nx.NamedArrayBase, /, **side_inputs: Any) -> nx.NamedArrayBase:
        _require_axes(x, self.axes, "Softmax")
        data, _, name_axes = data_layout(x)
        return make_named(jax.nn.softmax(data, axis=tuple(name_axes[n] for n in self.axes)), *_layout(x))


def _layout(x: nx.NamedArrayBase) -> tuple[tuple[int, ...], dict[str, int]]:
    _, positional, names = data_layout(x)
    return positional, names


def rename_axes(x: nx.NamedArrayBase, renames: Mapping[str, str]) -> nx.NamedArrayBase:
    """Renames named axes without moving data.

    Args:
      x: A named array.
      renames: Old name -> new name.

    Returns:
      The same data with renamed axes.

    Raises:
      NamedAxisError: If an old name is missing or a new name collides.

    Example:
        >>> dict(rename_axes(pzb.nx.zeros({"a": 2, "b": 3}), {"a": "c"}).named_shape)
        {'c': 2, 'b': 3}
    """
    _require_axes(x, tuple(renames), "RenameAxes")
    data, positional, names = data_layout(x)
    renamed = {renames.get(name, name): axis for name, axis in names.items()}
    if len(renamed) != len(names):
        raise NamedAxisError(
            f"RenameAxes: renaming {dict(renames)} makes axes collide (input named shape {dict(x.named_shape)}). "
            "Fix: rename to names that are not already present."
        )
    return make_named(data, positional, renamed)


@pytree_dataclass
class RenameAxes(Layer):
    """Renames named axes (metadata only).

    Attributes:
      old: Names to rename (static).
      new: Their new names, in the same order (static).

    Example:
        >>> dict(RenameAxes(("seq",), ("kv_seq",))(pzb.nx.zeros({"seq": 3})).named_shape)
        {'kv_seq': 3}
    """

    old: tuple[str, ...] = static_field()
    new: tuple[str, ...] = static_field()

    def __post_init__(self) -> None:
        old = (self.old,) if isinstance(self.old, str) else tuple(self.old)
        new = (self.new,) if isinstance(self.new, str) else tuple(self.new)
        if len(old) != len(new):
            raise NamedAxisError(f"RenameAxes: {len(old)} old names {old} but {len(new)} new names {new}.")
        object.__setattr__(self, "old", old)
        object.__setattr__(self, "new", new)

    def __call__(self, x: nx.NamedArrayBase, /, **side_inputs: Any) -> nx.NamedArrayBase:
        return rename_axes(x, dict(zip(self.old, self.new)))


@pytree_dataclass
class CastToDType(Layer):
    """Casts the input to ``dtype``.

    Example:
        >>> CastToDType(jnp.bfloat16)(pzb.nx.zeros({"a": 1})).dtype
        dtype(bfloat16)
    """

    dtype: Any = static_field()

    def __call__(self, x: nx.NamedArrayBase, /, **side_inputs: Any) -> nx.NamedArrayBase:
        return x.astype(self.dtype)


@pytree_dataclass
class ConstantRescale(Layer):
    """Multiplies the input by a constant (e.g. attention's ``1/sqrt(d)``).

    Example:
        >>> ConstantRescale(0.5)(pzb.nx.ones({"a": 1})).unwrap("a")
        Array([0.5], dtype=float32)
    """

    by: float = static_field()

    def __call__(self, x: nx.NamedArrayBase, /, **side_inputs: Any) -> nx.NamedArrayBase:
        return map_data(lambda data: data * jnp.asarray(self.by, data.dtype), x)


@pytree_dataclass
class NamedEinsum(Layer):
    """Contracts the input with learned tensors over named axes (a general ``Linear``).

    The product of the input and every tensor in ``weights`` is summed over
    ``contract_axes``; remaining axes are renamed by ``rename``. This is how
    einsum-specified layers (``nnx.Einsum``, ``LinearGeneral``) are expressed.

    Attributes:
      weights: Parameters (or frozen values / slots) holding NamedArrays.
      contract_axes: Names summed over (static).
      rename: Output renames as ``((old, new), ...)`` (static).

    Example:
        >>> w = pzb.Parameter(pzb.nx.ones({"features": 2, "heads": 3}), "w")
        >>> y = NamedEinsum((w,), ("features",))(pzb.nx.ones({"seq": 4, "features": 2}))
        >>> dict(y.named_shape)
        {'seq': 4, 'heads': 3}
    """

    weights: tuple[Any, ...]
    contract_axes: tuple[str, ...] = static_field()
    rename: tuple[tuple[str, str], ...] = static_field(default=())

    def __post_init__(self) -> None:
        object.__setattr__(self, "weights", tuple(self.weights))
        object.__setattr__(self, "contract_axes", tuple(self.contract_axes))
        rename = self.rename.items() if isinstance(self.rename, Mapping) else self.rename
        object.__setattr__(self, "rename", tuple(tuple(pair) for pair in rename))

    def __call__(self, x: nx.NamedArrayBase, /, **side_inputs: Any) -> nx.NamedArray:
        return contract([x, *(w.value for w in self.weights)], self.contract_axes, dict(self.rename))
