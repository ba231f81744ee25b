"""An NNX module's static configuration, kept so lowering rebuilds the module exactly.

NNX records every non-data attribute (``in_features``, ``dtype``,
``dot_general``, ``use_bias`` ...) and the attribute order in the graphdef.
:class:`NnxStatics` keeps them (by reference, as ``nnx.merge`` shares a
graphdef's statics), and :func:`build_module` creates a module from statics
and data without running ``__init__`` (which would draw random weights). Rules
use :func:`statics_match` to lift a module natively only when its
configuration is one they reproduce exactly.

Example:
    >>> from flax import nnx
    >>> lin = nnx.Linear(2, 3, rngs=nnx.Rngs(0))
    >>> new = build_module(nnx.Linear, NnxStatics.of(lin), {"kernel": lin.kernel, "bias": lin.bias})
    >>> nnx.graphdef(new) == nnx.graphdef(lin)
    True
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from flax import nnx
from flax.nnx import graphlib
from flax.nnx.pytreelib import PytreeState

from pzbridge.bridge.nnx.variables import is_array

_STATE_ATTR = "_pytree__state"


@dataclasses.dataclass(frozen=True)
class NnxStatics:
    """A module's non-data attributes (config), hashable for use as static tree metadata.

    Attributes:
      items: ``(name, value)`` pairs in the module's attribute order; values
        are shared by reference, as ``nnx.merge`` shares a graphdef's statics.
      order: Every attribute name (data and static) in the original order.
      flags: The module's ``PytreeState`` flags ``(initializing, is_setup)``.

    Example:
        >>> s = NnxStatics.of(nnx.Linear(2, 3, rngs=nnx.Rngs(0)))
        >>> s["in_features"], s["out_features"]
        (2, 3)
    """

    items: tuple[tuple[str, Any], ...]
    order: tuple[str, ...]
    flags: tuple[bool, bool] = (False, False)

    @classmethod
    def of(cls, module: Any) -> NnxStatics:
        """The statics of ``module`` (everything not classified as data)."""
        data = set(data_attributes(module))
        attrs = vars(module)
        state = attrs.get(_STATE_ATTR)
        flags = (state.initializing, state.is_setup) if isinstance(state, PytreeState) else (False, False)
        items = tuple((k, v) for k, v in attrs.items() if k not in data and k != _STATE_ATTR)
        return cls(items, tuple(attrs), flags)

    def replace(self, **updates: Any) -> NnxStatics:
        """The same statics with some values replaced (e.g. an edited ``epsilon``).

        Example:
            >>> s = NnxStatics.of(nnx.Linear(2, 3, rngs=nnx.Rngs(0)))
            >>> s.replace(out_features=7)["out_features"], s["out_features"]
            (7, 3)
        """
        items = tuple((k, updates.get(k, v)) for k, v in self.items)
        return dataclasses.replace(self, items=items)

    def __getitem__(self, name: str) -> Any:
        for key, value in self.items:
            if key == name:
                return value
        raise KeyError(name)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, NnxStatics):
            return NotImplemented
        return self.order == other.order and self.flags == other.flags and _items_equal(self.items, other.items)

    def __hash__(self) -> int:
        return hash((self.order, self.flags))


def _items_equal(a: tuple, b: tuple) -> bool:
    if len(a) != len(b):
        return False
    for (ka, va), (kb, vb) in zip(a, b):
        if ka != kb:
            return False
        try:
            if va is not vb and not bool(va == vb):
                return False
        except Exception:  # noqa: BLE001 - incomparable statics count as different
            return False
    return True


def data_attributes(module: Any) -> list[str]:
    """Names of ``module``'s data attributes (Variables, submodules, arrays), as NNX classifies them.

    Example:
        >>> sorted(data_attributes(nnx.Linear(2, 3, rngs=nnx.Rngs(0))))
        ['bias', 'kernel']
    """
    nodes = vars(module).get("_pytree__nodes")
    names = []
    for name, value in vars(module).items():
        if name == _STATE_ATTR:
            continue
        if nodes is not None and getattr(module, "_pytree__is_pytree", True):
            if nodes.get(name, False):
                names.append(name)
        elif isinstance(value, nnx.Variable) or graphlib.is_node(value) or is_array(value):
            names.append(name)
    return names


def build_module(cls: type, statics: NnxStatics, data: Mapping[str, Any]) -> Any:
    """Creates a module of class ``cls`` from its statics and data without running ``__init__``.

    ``__init__`` of NNX layers draws random weights; the attributes fully
    determine the module, and this is how ``nnx.merge`` builds modules too.

    Args:
      cls: The module class.
      statics: Its static attributes and attribute order.
      data: Its data attributes (Variables, submodules, arrays, containers).

    Returns:
      A new module.

    Example:
        >>> lin = nnx.Linear(2, 3, rngs=nnx.Rngs(0))
        >>> new = build_module(nnx.Linear, NnxStatics.of(lin), {"kernel": lin.kernel, "bias": lin.bias})
        >>> nnx.graphdef(new) == nnx.graphdef(lin)
        True
    """
    module = object.__new__(cls)
    values = {**dict(statics.items), **dict(data)}
    attrs = vars(module)
    for name in statics.order:
        if name == _STATE_ATTR:
            attrs[name] = PytreeState(*statics.flags)
        elif name in values:
            attrs[name] = values.pop(name)
    attrs.update(values)
    return module


def fresh_statics(make: Callable[[], Any]) -> NnxStatics:
    """Statics of a module built by ``make`` abstractly (no arrays are computed).

    Used when lowering a pzbridge layer that did not come from NNX (a new or
    cross-framework layer) to a native NNX class.

    Example:
        >>> fresh_statics(lambda: nnx.Linear(4, 5, rngs=nnx.Rngs(0)))["out_features"]
        5
    """
    return NnxStatics.of(nnx.eval_shape(make))


def statics_match(module: Any, defaults: NnxStatics, names: Sequence[str]) -> bool:
    """True if ``module``'s attributes ``names`` equal (or are) those of ``defaults``.

    Example:
        >>> d = fresh_statics(lambda: nnx.LayerNorm(2, rngs=nnx.Rngs(0)))
        >>> statics_match(nnx.LayerNorm(3, rngs=nnx.Rngs(0)), d, ("dtype", "promote_dtype"))
        True
    """
    for name in names:
        mine, default = getattr(module, name, None), defaults[name]
        if mine is not default and mine != default:
            return False
    return True


def has_data(module: Any, names: Sequence[str]) -> bool:
    """True if ``module``'s data attributes are among ``names`` (nothing sown or added).

    Example:
        >>> has_data(nnx.LayerNorm(2, rngs=nnx.Rngs(0)), ("scale", "bias"))
        True
    """
    return set(data_attributes(module)) <= set(names)
