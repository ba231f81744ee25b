"""The axis-naming policy: which names lifted layers give their axes.

Lifted layers take and return named arrays, so lifting must decide what each
positional axis of the original framework is called. The defaults follow
``docs/architecture.md`` ("Axis naming"); pass a modified policy to
``pzb.lift(..., naming=...)`` to use other names (e.g. ``embed`` instead of
``features``).

Example:
    >>> AxisNaming().features
    'features'
    >>> AxisNaming(features="embed").spatial(2)
    ('height', 'width')
"""

from __future__ import annotations

import dataclasses
from typing import Any

from pzbridge.core.errors import LiftError, NamedAxisError

# Names one layer uses side by side, so each group must be distinct. Other fields may coincide on
# purpose (channels="features" lets a convolution feed a Linear without a rename).
_DISTINCT_GROUPS: tuple[tuple[str, ...], ...] = (
    ("seq", "kv_seq"),
    ("heads", "projection"),
    ("depth", "height", "width"),
)


@dataclasses.dataclass(frozen=True)
class AxisNaming:
    """Names for the axes of lifted layers (all fields are non-empty strings).

    Names one layer uses together (``seq`` / ``kv_seq``, ``heads`` /
    ``projection``, the spatial names) must differ; others may coincide.

    Raises:
      NamedAxisError: If a field is not a non-empty string, or two names of
        one group are equal.

    Example:
        >>> AxisNaming(channels="c").channels
        'c'
        >>> AxisNaming(features=3)
        Traceback (most recent call last):
        ...
        pzbridge.core.errors.NamedAxisError: AxisNaming.features: expected a non-empty str (an axis name), found int 3. Fix: pass a name, e.g. AxisNaming(features='embed').
    """

    batch: str = "batch"
    seq: str = "seq"
    kv_seq: str = "kv_seq"
    features: str = "features"
    heads: str = "heads"
    kv_heads: str = "kv_heads"
    projection: str = "projection"
    channels: str = "channels"
    depth: str = "depth"
    height: str = "height"
    width: str = "width"
    vocabulary: str = "vocabulary"
    hidden: str = "hidden"

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if not isinstance(value, str) or not value:
                raise NamedAxisError(
                    f"AxisNaming.{field.name}: expected a non-empty str (an axis name), found "
                    f"{type(value).__name__} {value!r}. Fix: pass a name, e.g. AxisNaming({field.name}='embed')."
                )
        for group in _DISTINCT_GROUPS:
            names = [getattr(self, f) for f in group]
            if len(set(names)) < len(names):
                shown = ", ".join(f"{f}={n!r}" for f, n in zip(group, names))
                raise NamedAxisError(
                    f"AxisNaming: {', '.join(group)} name axes one layer uses together, expected distinct names, "
                    f"found {shown}. Fix: give each of them its own name."
                )

    def spatial(self, num_spatial_dims: int) -> tuple[str, ...]:
        """Names of 1-, 2- or 3-d spatial axes (``width``; ``height, width``; ``depth, height, width``).

        Example:
            >>> AxisNaming().spatial(1)
            ('width',)
        """
        names = (self.depth, self.height, self.width)
        if not 1 <= num_spatial_dims <= 3:
            raise NamedAxisError(
                f"AxisNaming.spatial: expected 1, 2 or 3 spatial dimensions, found {num_spatial_dims!r}. "
                "Fix: use a 1-d, 2-d or 3-d layer (or keep it Foreign)."
            )
        return names[3 - num_spatial_dims :]


def checked_naming(naming: Any) -> AxisNaming:
    """``naming`` if it is an :class:`AxisNaming` (``None``: the defaults); else a :class:`LiftError`.

    Example:
        >>> checked_naming(None) == AxisNaming()
        True
        >>> checked_naming("embed")
        Traceback (most recent call last):
        ...
        pzbridge.core.errors.LiftError: <root>: naming= expected a pzb.bridge.AxisNaming, found str 'embed'. Fix: pass naming=pzb.bridge.AxisNaming(features='embed') (one field per axis kind).
    """
    if naming is None:
        return AxisNaming()
    if isinstance(naming, AxisNaming):
        return naming
    raise LiftError(
        f"<root>: naming= expected a pzb.bridge.AxisNaming, found {type(naming).__name__} {naming!r:.60}. Fix: pass "
        "naming=pzb.bridge.AxisNaming(features='embed') (one field per axis kind)."
    )
