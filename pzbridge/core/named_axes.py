"""Named axes: ``NamedArray``, ``nmap`` and friends (exported as ``pzb.nx``).

This module only re-exports; the pieces live in small modules:

- :mod:`pzbridge.core.named_axes_core`: the two storage forms
  (:class:`NamedArray`, :class:`NamedArrayView`) and metadata-only axis moves
  (``tag`` / ``untag`` never transpose);
- :mod:`pzbridge.core.named_axes_ops`: :func:`nmap` (one ``jax.vmap`` per
  group of names shared by the same arguments, not one per name), and the
  methods that compute on data (name-broadcasting operators, reductions,
  indexing, ``astype`` / ``reshape`` / ``broadcast_to``), which it installs on
  ``NamedArrayBase``;
- :mod:`pzbridge.core.named_axes_build`: constructors, joins and ``scan``;
- :mod:`pzbridge.core.named_axes_treescope`: rendering, loaded on first use.

Lifted layers take and return named arrays; a name a layer does not use
passes through untouched (see docs/architecture.md, "Axis naming and calling
conventions").

Example:
    >>> import jax.numpy as jnp
    >>> import pzbridge as pzb
    >>> x = pzb.nx.wrap(jnp.ones((2, 3)), "batch", "features")
    >>> w = pzb.nx.wrap(jnp.ones((3, 4)), "features", "out")
    >>> y = (x * w).sum("features")
    >>> dict(y.named_shape)
    {'batch': 2, 'out': 4}
"""

from __future__ import annotations

from pzbridge.core.named_axes_build import (
    arange,
    concatenate,
    full,
    full_like,
    ones,
    ones_like,
    order_like,
    random_split,
    scan,
    stack,
    unstack,
    zeros,
    zeros_like,
)
from pzbridge.core.named_axes_core import (
    AxisMap,
    AxisName,
    NamedArray,
    NamedArrayBase,
    NamedArrayView,
    is_namedarray,
    unwrap,
    wrap,
)
from pzbridge.core.named_axes_ops import elementwise, nmap, where
from pzbridge.core.named_slice import slice  # noqa: A004 - `nx.slice[1:3]`; kept out of __all__ (star imports)

__all__ = [
    "AxisMap",
    "AxisName",
    "NamedArray",
    "NamedArrayBase",
    "NamedArrayView",
    "arange",
    "concatenate",
    "elementwise",
    "full",
    "full_like",
    "is_namedarray",
    "nmap",
    "ones",
    "ones_like",
    "order_like",
    "random_split",
    "scan",
    "stack",
    "unstack",
    "unwrap",
    "where",
    "wrap",
    "zeros",
    "zeros_like",
]
