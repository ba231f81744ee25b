"""``CheckStructure``: a layer that checks the value passing through it and returns it unchanged.

Inserted between two layers (``select(...).insert_after(CheckStructure(...))``)
it turns a wrong axis name or size into an error at trace time that names
the place, and costs nothing at run time. Two forms of ``expected``:

- a :mod:`pzbridge.chk <pzbridge.core.chk>` pattern (a pytree of
  ``ArraySpec``), checked with :func:`~pzbridge.core.chk.check_structure`,
  as Penzai's ``CheckStructure(expected)`` does;
- the shorthand of a named shape ``{"features": 8}`` (a size of ``None``
  accepts any size): every named array in the value must have those axes,
  and no others when ``exact=True``. (An empty mapping is a pattern: the
  value must be ``{}``.)

Example:
    >>> import jax.numpy as jnp
    >>> x = pzb.nx.wrap(jnp.ones((2, 3)), "batch", "features")
    >>> spec = pzb.chk.ArraySpec(named_shape={"features": 3, **pzb.chk.var("rest")})
    >>> CheckStructure(spec)(x) is x
    True
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax

from pzbridge.core import chk
from pzbridge.core import named_axes as nx
from pzbridge.core.errors import NamedAxisError
from pzbridge.core.struct import pytree_dataclass, static_field
from pzbridge.nn.layer import Layer


def _is_named_shape(expected: Any) -> bool:
    return isinstance(expected, Mapping) and bool(expected) and all(
        isinstance(k, str) and (v is None or isinstance(v, int)) for k, v in expected.items())


@pytree_dataclass
class CheckStructure(Layer):
    """Checks its input against ``expected`` (at trace time) and returns it unchanged.

    Attributes:
      expected: A ``pzb.chk`` pattern (``ArraySpec`` nodes, ``chk.ANY``), or a
        named shape ``{name: size or None}`` every named array must have
        (static; a pattern flattens to no leaves).
      exact: With a named shape: no other named axes are allowed (static).
      where: A description for error messages, e.g. the model path (static).

    Raises:
      StructureMismatchError: If the input does not match a pattern.
      NamedAxisError: If a named array lacks the axes of a named shape.

    Example:
        >>> x = pzb.nx.wrap(jnp.ones((2, 3)), "batch", "features")
        >>> CheckStructure({"features": 3})(x) is x
        True
        >>> CheckStructure(pzb.chk.ArraySpec(named_shape={"features": 4}), where="mlp")(x)
        Traceback (most recent call last):
        ...
        pzbridge.core.errors.StructureMismatchError: CheckStructure at mlp: chk: the value at <root> has named axis 'features' of size 3, expected 4. Fix: pass a value of that size, or use a chk.var for the size.
    """

    expected: Any = static_field()
    exact: bool = static_field(default=False)
    where: str = static_field(default="")

    def __post_init__(self) -> None:
        if _is_named_shape(self.expected):
            # Stored as a tuple of pairs: hashable (static) and order-preserving.
            object.__setattr__(self, "expected", tuple(dict(self.expected).items()))
        elif self.exact and not self._is_shorthand():
            raise NamedAxisError(
                f"CheckStructure{self._place()}: exact=True applies to a named shape such as {{'features': 8}}, "
                "not to a chk pattern. Fix: omit **chk.var(...) from the pattern's named_shape instead."
            )

    @property
    def named_shape(self) -> dict[str, int | None] | None:
        """The required named shape of the shorthand form (None for a pattern).

        Example:
            >>> CheckStructure({"f": None}).named_shape
            {'f': None}
        """
        return dict(self.expected) if self._is_shorthand() else None

    def _is_shorthand(self) -> bool:
        return isinstance(self.expected, tuple) and bool(self.expected) and all(
            isinstance(p, tuple) and len(p) == 2 and isinstance(p[0], str) for p in self.expected)

    def _place(self) -> str:
        return f" at {self.where}" if self.where else ""

    def __call__(self, x: Any, /, **side_inputs: Any) -> Any:
        if not self._is_shorthand():
            chk.check_structure(x, self.expected, error_prefix=f"CheckStructure{self._place()}: ")
            return x
        expected = dict(self.expected)
        for leaf in jax.tree_util.tree_leaves(x, is_leaf=nx.is_namedarray):
            if not nx.is_namedarray(leaf):
                continue
            found = dict(leaf.named_shape)
            bad = {n: s for n, s in expected.items() if n not in found or (s is not None and found[n] != s)}
            extra = sorted(set(found) - set(expected)) if self.exact else []
            if bad or extra:
                raise NamedAxisError(
                    f"CheckStructure{self._place()}: expected named axes {expected}{' exactly' if self.exact else ''}, "
                    f"found {found} (positional shape {leaf.positional_shape}). "
                    "Fix: check the layer before this point, or rename axes with pzb.nn.RenameAxes."
                )
        return x
