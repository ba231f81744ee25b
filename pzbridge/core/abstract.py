"""Abstract models: trees whose arrays are ``jax.ShapeDtypeStruct`` placeholders.

``pzb.lift`` accepts a module built with ``eqx.filter_eval_shape`` or
``nnx.eval_shape``: the lifted model then has the right structure, labels
and shapes but no data, which is what ``pzb.checkpoint.restore`` needs as a
target. Running or saving such a model cannot work, so the places that need
real arrays ask :func:`check_concrete` first (or, for a call, after it fails:
a model passed *into* ``jax.eval_shape`` holds tracers, not placeholders, and
must keep working).

Example:
    >>> import jax, jax.numpy as jnp
    >>> import pzbridge as pzb
    >>> abstract_leaves([pzb.Parameter(jax.ShapeDtypeStruct((2,), jnp.float32), "w")])
    [('w', ShapeDtypeStruct(shape=(2,), dtype=float32))]
"""

from __future__ import annotations

from typing import Any

import jax

from pzbridge.core.errors import PzbridgeError, VariableError, format_path
from pzbridge.core.variables_kinds import AbstractVariableValue, LabeledVariable


def _is_placeholder(leaf: Any) -> bool:
    return isinstance(leaf, jax.ShapeDtypeStruct)


def abstract_leaves(tree: Any, limit: int | None = None) -> list[tuple[str, jax.ShapeDtypeStruct]]:
    """The ``jax.ShapeDtypeStruct`` placeholders in ``tree``, with where they are.

    A placeholder inside a variable is named by the variable's label, any
    other by its tree path.

    Args:
      tree: Any pytree (a lifted model, a list of variables ...).
      limit: Stop after this many (default: all).

    Returns:
      ``[(label_or_path, placeholder), ...]`` in flattening order.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> abstract_leaves({"b": jax.ShapeDtypeStruct((), jnp.int32), "a": jnp.zeros(1)})
        [("['b']", ShapeDtypeStruct(shape=(), dtype=int32))]
    """
    found: list[tuple[str, jax.ShapeDtypeStruct]] = []
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree, is_leaf=_is_placeholder)[0]:
        if isinstance(leaf, (LabeledVariable, AbstractVariableValue)):
            inner = jax.tree_util.tree_leaves(leaf.value, is_leaf=_is_placeholder)
            found.extend((leaf.label, x) for x in inner if _is_placeholder(x))
        elif _is_placeholder(leaf):
            found.append((format_path(path), leaf))
        if limit is not None and len(found) >= limit:
            return found[:limit]
    return found


def abstract_error(
    tree: Any, action: str, error_type: type[PzbridgeError] = VariableError
) -> PzbridgeError | None:
    """The error for ``action`` on an abstract ``tree``, or None when it holds real arrays.

    Args:
      tree: The model (or any pytree).
      action: What needs real arrays, e.g. ``"calling the model"``, ``"saving"``.
      error_type: The pzbridge error class to build (e.g. ``CheckpointError``).

    Example:
        >>> import jax.numpy as jnp
        >>> abstract_error([jnp.zeros(2)], "saving") is None
        True
    """
    found = abstract_leaves(tree, limit=4)
    if not found:
        return None
    where, first = found[0]
    more = f" (and more: {', '.join(w for w, _ in found[1:])}{', ...' if len(found) == 4 else ''})" if found[1:] else ""
    return error_type(
        f"{where}: {action} needs real arrays, but the model is abstract: expected an array, found "
        f"jax.ShapeDtypeStruct(shape={tuple(first.shape)}, dtype={first.dtype}){more}, as eqx.filter_eval_shape "
        "or nnx.eval_shape produce. Fix: restore values into it first (model = pzb.checkpoint.restore(directory, "
        "model)), or build the module for real (e.g. eqx.nn.Linear(4, 3, key=key) or nnx.Linear(4, 3, "
        "rngs=nnx.Rngs(0))) and lift that."
    )


def check_concrete(tree: Any, action: str, error_type: type[PzbridgeError] = VariableError) -> None:
    """Raises :func:`abstract_error`'s error if ``tree`` holds ``ShapeDtypeStruct`` placeholders.

    ``pzb.checkpoint.save`` should call ``check_concrete(model, "saving",
    CheckpointError)`` before writing anything.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> import pzbridge as pzb
        >>> check_concrete([pzb.Parameter(jax.ShapeDtypeStruct((3,), jnp.float32), "w")], "saving")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        pzbridge.core.errors.VariableError: w: saving needs real arrays, but the model is abstract: ...
    """
    error = abstract_error(tree, action, error_type)
    if error is not None:
        raise error
