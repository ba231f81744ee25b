"""``pzb.slice[...]``: write slices where Python only allows them inside brackets.

A dict index ``x[{"seq": 1:3}]`` is not Python syntax, and ``slice(1, 3)``
reads poorly next to numpy-style indexing. ``pzb.slice[1:3]`` is exactly
``slice(1, 3)`` (and ``pzb.slice[::2, 0]`` the tuple ``(slice(None, None, 2), 0)``),
so named indexing reads ``x[{"seq": pzb.slice[1:3]}]``, as with Penzai's
``pz.slice``.

Example:
    >>> import jax.numpy as jnp
    >>> import pzbridge as pzb
    >>> x = pzb.nx.wrap(jnp.arange(5), "seq")
    >>> x[{"seq": pzb.slice[1:3]}].unwrap("seq").tolist()
    [1, 2]
"""

from __future__ import annotations

from typing import Any


class SliceMaker:
    """Returns whatever index it is subscripted with (``slice[1:3] == slice(1, 3)``).

    Example:
        >>> SliceMaker()[1:3], SliceMaker()[::2, 0]
        (slice(1, 3, None), (slice(None, None, 2), 0))
    """

    __slots__ = ()

    def __getitem__(self, index: Any) -> Any:
        return index

    def __repr__(self) -> str:
        return "pzb.slice"


# Shadows the builtin inside this module on purpose: the public name mirrors Penzai's `pz.slice`.
slice = SliceMaker()  # noqa: A001
"""The :class:`SliceMaker` instance exported as ``pzb.slice`` and ``pzb.nx.slice``."""
