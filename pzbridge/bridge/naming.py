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


@dataclasses.dataclass(frozen=True)
class AxisNaming:
    """Names for the axes of lifted layers (all fields are plain strings).

    Example:
        >>> AxisNaming(channels="c").channels
        'c'
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

    def spatial(self, num_spatial_dims: int) -> tuple[str, ...]:
        """Names of 1-, 2- or 3-d spatial axes (``width``; ``height, width``; ``depth, height, width``).

        Example:
            >>> AxisNaming().spatial(1)
            ('width',)
        """
        names = (self.depth, self.height, self.width)
        if not 1 <= num_spatial_dims <= 3:
            raise ValueError(f"spatial axes: expected 1, 2 or 3 dimensions, found {num_spatial_dims}")
        return names[3 - num_spatial_dims :]
