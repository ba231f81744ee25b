"""Treescope rendering of a :class:`~pzbridge.core.selectors.Selection`.

A selection renders as the whole tree (not as its internal holes), with each
selected subtree drawn in a highlighted box headed ``# selected [i] at PATH``
(or prefixed by ``<selected [i] at PATH>`` when it fits on one line), so it
reads the same in a notebook (HTML, coloured box) and in a terminal (text). Kept apart from :mod:`pzbridge.core.selectors` so that
selecting never imports treescope.

Example:
    >>> from pzbridge.core.selectors import select
    >>> text = render_selection_to_text(select({"w": 1, "b": 2}).at(lambda t: t["w"]))
    >>> "selected [0] at ['w']" in text
    True
"""

from __future__ import annotations

from typing import Any

import treescope
from treescope import rendering_parts as rp

from pzbridge.core.errors import format_path

_BOX_STYLE = "border: 2px solid #00aaaa; border-left: 1.5ch solid #00aaaa; padding: 0 0.5ch;"
_LABEL_STYLE = "color: #007777; font-weight: bold;"


class _Highlighted:
    """Stands for a selected subtree while the whole tree is rendered."""

    __slots__ = ("value", "index", "path")

    def __init__(self, value: Any, index: int, path: tuple) -> None:
        self.value = value
        self.index = index
        self.path = path

    def __treescope_repr__(self, path: str | None, subtree_renderer: Any) -> Any:
        inner = subtree_renderer(self.value, path=None)
        where = format_path(self.path)
        label = rp.fold_condition(
            expanded=rp.custom_style(rp.text(f"# selected [{self.index}] at {where}"), css_style=_LABEL_STYLE),
            collapsed=rp.custom_style(rp.text(f"<selected [{self.index}] at {where}> "), css_style=_LABEL_STYLE),
        )
        box = rp.in_outlined_box(rp.on_separate_lines([label, inner.renderable]), css_style=_BOX_STYLE)
        return rp.siblings_with_annotations(
            rp.build_custom_foldable_tree_node(contents=box, expand_state=rp.ExpandState.EXPANDED),
            extra_annotations=[inner.annotations],
        )


def _highlighted_tree(selection: Any) -> Any:
    flat = selection._flat()  # noqa: SLF001 - same package, rendering needs the flat form.
    keys = flat.entry_keys()
    marks = [_Highlighted(v, i, k) for i, (k, v) in enumerate(zip(keys, flat.values))]
    return flat.fill(marks)


def render_selection(selection: Any, subtree_renderer: Any) -> Any:
    """The treescope rendering used by ``Selection.__treescope_repr__``.

    Args:
      selection: The selection to draw.
      subtree_renderer: The renderer treescope passes to ``__treescope_repr__``.

    Returns:
      A treescope rendering: a foldable header and the highlighted tree.

    Example:
        >>> from pzbridge.core.selectors import select
        >>> "selected [1]" in treescope.render_to_text(select([1, 2]).at_pytree_leaves())
        True
    """
    n = selection.count()
    header = rp.custom_style(
        rp.text(f"pzb.select(...) with {n} selected node{'s' if n != 1 else ''}:"), css_style=_LABEL_STYLE
    )
    body = subtree_renderer(_highlighted_tree(selection), path=None)
    return rp.siblings_with_annotations(
        rp.build_custom_foldable_tree_node(
            label=header,
            contents=rp.indented_children([body.renderable]),
            expand_state=rp.ExpandState.EXPANDED,
        ),
        extra_annotations=[body.annotations],
    )


def render_selection_to_text(selection: Any) -> str:
    """Renders the selection (tree with selected parts marked) as plain text.

    Example:
        >>> from pzbridge.core.selectors import select
        >>> print(render_selection_to_text(select([1, 2]).at(lambda t: t[1])))  # doctest: +ELLIPSIS
        pzb.select(...) with 1 selected node:
          [1, <selected [0] at [1]> 2]
    """
    return treescope.render_to_text(selection)


def render_selection_to_html(selection: Any, compressed: bool = False) -> str:
    """Renders the selection as standalone treescope HTML (selected parts boxed).

    Args:
      selection: The selection to draw.
      compressed: Compress the HTML payload (smaller, not greppable).

    Example:
        >>> from pzbridge.core.selectors import select
        >>> "selected [0]" in render_selection_to_html(select([1, 2]).at(lambda t: t[1]))
        True
    """
    return treescope.render_to_html(selection, compressed=compressed)


def show_selection(selection: Any) -> None:
    """Displays the selection: treescope in IPython, text on stdout elsewhere.

    Example:
        >>> from pzbridge.core.selectors import select
        >>> show_selection(select([5]).at(lambda t: t[0]))  # doctest: +ELLIPSIS
        pzb.select(...) with 1 selected node:
        ...
    """
    try:
        from IPython import get_ipython  # noqa: PLC0415 - optional dependency.

        shell = get_ipython()
    except ImportError:
        shell = None
    if shell is not None and getattr(shell, "kernel", None) is not None:
        treescope.display(selection)
    else:
        print(render_selection_to_text(selection))
