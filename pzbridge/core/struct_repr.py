"""Short ``repr`` for structs: arrays as one-line summaries, laid out like Equinox's.

A lifted model is a tree of structs whose leaves are arrays; the dataclass
``repr`` would print every number (17,284 characters for a small MLP). Here
arrays become their dtype and shape (``f32[8,4]``), named arrays also their
axis names (``NamedArray(f32[3] {features: 4})``), variables their label and
value summary, and functions their name. The result is laid out within a
line width: a node whose one-line form fits stays on one line, otherwise its
fields go one per line, indented.

This is the text form only; notebooks render structs with treescope (see
``docs/architecture.md``), which this module does not touch.
:func:`pzbridge.pytree_dataclass` installs :func:`struct_repr` as the
``__repr__`` of every struct class that does not define its own.

Example:
    >>> import jax.numpy as jnp
    >>> import pzbridge as pzb
    >>> pzb.nx.wrap(jnp.ones((3, 4))).tag_prefix("batch")
    NamedArrayView(f32[4] {batch: 3})
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import numpy as np

from pzbridge.core.variable_base import AbstractVariable

WIDTH = 88
_INDENT = "  "

# Equinox's abbreviations, so the two reprs read alike side by side.
_DTYPE_NAMES = {
    "float16": "f16", "bfloat16": "bf16", "float32": "f32", "float64": "f64",
    "int8": "i8", "int16": "i16", "int32": "i32", "int64": "i64",
    "uint8": "u8", "uint16": "u16", "uint32": "u32", "uint64": "u64",
    "complex64": "c64", "complex128": "c128", "bool": "bool",
}


def dtype_name(dtype: Any) -> str:
    """The short name of a dtype (``f32``, ``bf16``, ``i32``); other dtypes by their own name.

    Example:
        >>> dtype_name(np.dtype("float32")), dtype_name(np.dtype("bool"))
        ('f32', 'bool')
    """
    name = str(getattr(dtype, "name", dtype))
    return _DTYPE_NAMES.get(name, name)


def array_summary(x: Any) -> str | None:
    """``f32[8,4]`` for anything with a shape and a dtype (arrays, tracers, ``ShapeDtypeStruct``), else ``None``.

    Example:
        >>> array_summary(np.zeros((8, 4), np.float32)), array_summary(3)
        ('f32[8,4]', None)
    """
    # Only true arrays: a struct that merely has a shape and a dtype (a spec) keeps its fields.
    if not isinstance(x, (jax.Array, np.ndarray, np.generic, jax.ShapeDtypeStruct)):
        return None
    shape, dtype = x.shape, x.dtype
    return f"{dtype_name(dtype)}[{','.join(str(n) for n in shape)}]"


def _named_summary(x: Any) -> str | None:
    """``NamedArray(f32[3] {features: 4})``, or ``None`` when ``x`` is no (well-formed) named array."""
    if not (_is_struct(x) and all(hasattr(x, a) for a in ("data_array", "named_shape", "positional_shape"))):
        return None
    data = array_summary(x.data_array)
    if data is None:  # A hole or a placeholder during a tree rebuild: show the fields.
        return None
    try:
        positional, named = x.positional_shape, x.named_shape
    except Exception:  # noqa: BLE001 - an inconsistent view still gets a repr
        return None
    dtype = data.split("[")[0]
    shape = f"[{','.join(str(n) for n in positional)}]" if positional else ""
    axes = ", ".join(f"{name}: {size}" for name, size in named.items())
    return f"{type(x).__name__}({dtype}{shape} {{{axes}}})"


def _variable_summary(x: Any) -> str | None:
    if not isinstance(x, AbstractVariable):
        return None
    metadata = getattr(x, "metadata", None)
    extra = f", metadata={dict(metadata)!r}" if metadata else ""
    return f"{type(x).__name__}(label={x.label!r}, value={_one_line(x.value)}{extra})"


def _function_summary(x: Any) -> str | None:
    if isinstance(x, type) or not callable(x):
        return None
    name = getattr(x, "__name__", None)
    if not isinstance(name, str) or dataclasses.is_dataclass(x):
        return None
    return f"<function {name}>"


def _leaf(x: Any) -> str | None:
    """The one-line form of a node that has no layout of its own, or ``None`` for structs and containers."""
    for summarize in (_named_summary, _variable_summary, array_summary, _function_summary):
        text = summarize(x)
        if text is not None:
            return text
    if _is_struct(x) or isinstance(x, (list, tuple, dict)):
        return None
    text = repr(x)
    if "\n" in text or len(text) > WIDTH:  # A large static (a template, a treedef): name it instead.
        described = getattr(x, "class_name", None)
        return f"<{type(x).__name__}{f' for {described}' if described else ''}>"
    return text


def _is_struct(x: Any) -> bool:
    # The marker pytree_dataclass sets (pzbridge.core.struct._DECORATED_MARKER). Read by name, because
    # struct.py imports this module: importing struct.py (or the named-array module) here would be a cycle.
    return dataclasses.is_dataclass(x) and getattr(type(x), "__pzbridge_pytree_dataclass__", None) is not None


def _parts(x: Any) -> tuple[str, str, list[str], list[Any]]:
    """``(open, close, prefixes, children)`` of a struct or container, for layout."""
    if _is_struct(x):
        fields = [f for f in dataclasses.fields(x) if f.repr]
        return f"{type(x).__name__}(", ")", [f"{f.name}=" for f in fields], [getattr(x, f.name) for f in fields]
    if isinstance(x, dict):
        return "{", "}", [f"{k!r}: " for k in x], list(x.values())
    if isinstance(x, tuple) and hasattr(x, "_fields"):  # A namedtuple: keep its field names.
        return f"{type(x).__name__}(", ")", [f"{name}=" for name in x._fields], list(x)
    open_, close = ("[", "]") if isinstance(x, list) else ("(", ")")
    if isinstance(x, tuple) and len(x) == 1:
        close = ",)"
    return open_, close, [""] * len(x), list(x)


def _holds_struct(x: Any) -> bool:
    """Whether ``x`` is, or a container in it holds, a struct (what makes breaking lines worth it)."""
    if _is_struct(x) and _leaf(x) is None:
        return True
    if isinstance(x, dict):
        return any(map(_holds_struct, x.values()))
    return isinstance(x, (list, tuple)) and any(map(_holds_struct, x))


def _one_line(x: Any) -> str:
    leaf = _leaf(x)
    if leaf is not None:
        return leaf
    open_, close, prefixes, children = _parts(x)
    return open_ + ", ".join(p + _one_line(c) for p, c in zip(prefixes, children)) + close


def _layout(x: Any, depth: int, column: int) -> str:
    """``x`` laid out starting at ``column`` of a line indented ``depth`` levels."""
    flat = _one_line(x)
    if column + len(flat) <= WIDTH or _leaf(x) is not None:
        return flat
    open_, close, prefixes, children = _parts(x)
    if not any(map(_holds_struct, children)):
        return flat  # Only leaves inside (like `AncestorRef(node_type=..., skip=0)`): one line reads better.
    inner = _INDENT * (depth + 1)
    lines = [f"{inner}{p}{_layout(c, depth + 1, len(inner) + len(p))}" for p, c in zip(prefixes, children)]
    trailing, close = (",", ")") if close == ",)" else ("", close)  # A one-element tuple keeps its comma.
    return open_ + "\n" + ",\n".join(lines) + trailing + "\n" + _INDENT * depth + close


def struct_repr(self: Any) -> str:
    """The ``__repr__`` of structs: fields with arrays summarised, wrapped at 88 columns.

    Example:
        >>> import jax.numpy as jnp
        >>> import pzbridge as pzb
        >>> pzb.nn.Sequential([pzb.nn.Identity(), pzb.nn.Elementwise(jnp.tanh)])
        Sequential(sublayers=[Identity(), Elementwise(fn=<function tanh>)])
    """
    return _layout(self, 0, 0)
