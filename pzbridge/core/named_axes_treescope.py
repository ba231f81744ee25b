"""Treescope rendering for named arrays (loaded on first render only).

:class:`~pzbridge.core.named_axes_core.NamedArrayBase` defines
``__treescope_repr__`` and ``__treescope_ndarray_adapter__`` which import this
module lazily, so ``import pzbridge`` never imports treescope. This module does
not import ``named_axes_core`` back: it works on the array through its
attributes and methods, so the dependency points one way. The one-line
summary shows dtype, positional sizes and ``name:size`` pairs, e.g.
``NamedArray float32(4 | batch:2, seq:3)``; the array visualiser
(``treescope.render_array``) labels named axes by name through
:class:`NamedArrayAdapter`.

Example:
    >>> import jax.numpy as jnp
    >>> import treescope
    >>> from pzbridge.core.named_axes_core import wrap
    >>> "seq:3" in treescope.render_to_text(wrap(jnp.zeros((2, 3)), "batch", "seq"))
    True
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import numpy as np
from treescope import dtype_util, lowering, ndarray_adapters, rendering_parts
from treescope.external import jax_support

from pzbridge.core.errors import NamedAxisError


def shape_summary(array: Any) -> str:
    """``dtype(positional | name:size, ...)``, the compact shape used in labels.

    Example:
        >>> import jax.numpy as jnp
        >>> from pzbridge.core.named_axes_core import wrap
        >>> shape_summary(wrap(jnp.zeros((4, 2)), "t", "b"))
        'float32(| t:4, b:2)'
    """
    positional = ", ".join(str(s) for s in array.positional_shape)
    named = ", ".join(f"{n}:{s}" for n, s in array.named_shape.items())
    separator = " | " if positional else "| "
    if not named:
        return f"{dtype_util.get_dtype_name(array.dtype)}({positional})"
    return f"{dtype_util.get_dtype_name(array.dtype)}({positional}{separator}{named})"


def _data_summary(array: Any, inspect_data: bool) -> str:
    data = array.data_array
    if inspect_data and isinstance(data, jax.Array) and jax_support.safe_to_summarize(data):
        return jax_support.summarize_array_data(data)
    return ""


def render_named_array(node: Any, path: str | None, subtree_renderer: Any) -> Any:
    """Renders a named array as a foldable node labelled with its axis names.

    Falls back to treescope's default rendering (``NotImplemented``) for an
    invalid array, so broken objects can still be inspected.

    Example:
        >>> import jax.numpy as jnp
        >>> import treescope
        >>> from pzbridge.core.named_axes_core import wrap
        >>> "NamedArray" in treescope.render_to_text(wrap(jnp.zeros(2), "a"))
        True
    """
    try:
        node.check_valid()
    except NamedAxisError:
        return NotImplemented
    summary = shape_summary(node)
    type_name = type(node).__name__

    def label(inspect_data: bool) -> Any:
        text = f"{summary}{_data_summary(node, inspect_data)}"
        return rendering_parts.summarizable_condition(
            summary=rendering_parts.abbreviation_color(rendering_parts.text(f"<{type_name} {text}>")),
            detail=rendering_parts.siblings(
                rendering_parts.maybe_qualified_type_name(type(node)),
                "(",
                rendering_parts.fold_condition(
                    expanded=rendering_parts.comment_color(rendering_parts.text("  # " + text))
                ),
            ),
        )

    children = rendering_parts.build_field_children(
        node, path, subtree_renderer, fields_or_attribute_names=dataclasses.fields(node)
    )
    return rendering_parts.build_custom_foldable_tree_node(
        label=lowering.maybe_defer_rendering(
            main_thunk=lambda _: label(inspect_data=True),
            placeholder_thunk=lambda: label(inspect_data=False),
        ),
        contents=rendering_parts.summarizable_condition(
            detail=rendering_parts.siblings(rendering_parts.indented_children(children), ")")
        ),
        path=path,
        expand_state=rendering_parts.ExpandState.COLLAPSED,
    )


class NamedArrayAdapter(ndarray_adapters.NDArrayAdapter[Any]):
    """Lets ``treescope.render_array`` show named axes by name.

    Every ``array`` argument is a named array (``NamedArrayBase``); it is typed
    ``Any`` because this module does not import ``named_axes_core``.

    Example:
        >>> import jax.numpy as jnp
        >>> from pzbridge.core.named_axes_core import wrap
        >>> info = NamedArrayAdapter().get_axis_info_for_array_data(wrap(jnp.zeros((2, 3))).tag_prefix("b"))
        >>> [type(i).__name__ for i in info]
        ['NamedPositionlessAxisInfo', 'PositionalAxisInfo']
    """

    def get_axis_info_for_array_data(self, array: Any) -> tuple[ndarray_adapters.AxisInfo, ...]:
        view = array.as_namedarrayview()
        infos: dict[int, ndarray_adapters.AxisInfo] = {}
        for name, axis in view.data_axis_for_name.items():
            infos[axis] = ndarray_adapters.NamedPositionlessAxisInfo(axis_name=name, size=view.data_shape[axis])
        for logical, axis in enumerate(view.data_axis_for_logical_axis):
            infos[axis] = ndarray_adapters.PositionalAxisInfo(axis_logical_index=logical, size=view.data_shape[axis])
        return tuple(infos[i] for i in range(len(infos)))

    def get_array_data_with_truncation(
        self, array: Any, mask: Any, edge_items_per_axis: tuple[int | None, ...]
    ) -> tuple[np.ndarray, np.ndarray]:
        view = array.as_namedarrayview()
        # The mask (named or plain) is broadcast to the array and laid out
        # exactly like the array's data.
        mask_data = None if mask is None else array._aligned_data(mask)  # noqa: SLF001 - same package.
        return jax_support.JAXArrayAdapter().get_array_data_with_truncation(
            array=view.data_array, mask=mask_data, edge_items_per_axis=edge_items_per_axis
        )

    def get_array_summary(self, array: Any, fast: bool) -> str:
        return f"{type(array).__name__} {shape_summary(array)}{_data_summary(array, not fast)}"

    def get_numpy_dtype(self, array: Any) -> np.dtype | None:
        return array.dtype if isinstance(array.dtype, np.dtype) else None

    def get_sharding_info_for_array_data(self, array: Any) -> ndarray_adapters.ShardingInfo | None:
        data = array.data_array
        if not isinstance(data, jax.Array) or isinstance(data, jax.core.Tracer):
            return None
        return jax_support.JAXArrayAdapter().get_sharding_info_for_array_data(data)

    def should_autovisualize(self, array: Any) -> bool:
        data = array.data_array
        return isinstance(data, jax.Array) and not isinstance(data, jax.core.Tracer) and not data.is_deleted()
