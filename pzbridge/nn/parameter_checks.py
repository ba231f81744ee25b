"""``assert_no_parameter_slots``: fail early when a model still has unbound parameters.

A model built with ``init_base_rng=None`` (or unbound with
``unbind_params``) holds :class:`~pzbridge.ParameterSlot` placeholders; calling
it fails deep inside a layer. This check, as Penzai's of the same name, names
every slot at once, with its path.

Example:
    >>> import jax
    >>> import pzbridge as pzb
    >>> assert_no_parameter_slots(pzb.nn.AddBias.from_config("b", jax.random.key(0), {"f": 2}))
"""

from __future__ import annotations

from typing import Any

import jax

from pzbridge.core.errors import VariableError, format_path
from pzbridge.core.variables import ParameterSlot


def assert_no_parameter_slots(model: Any) -> None:
    """Raises if ``model`` contains a :class:`~pzbridge.ParameterSlot`.

    Args:
      model: Any pytree (a lifted model, a layer).

    Raises:
      VariableError: Naming each slot's path and label and how to bind them.

    Example:
        >>> assert_no_parameter_slots([pzb.ParameterSlot("w")])
        Traceback (most recent call last):
        ...
        pzbridge.core.errors.VariableError: The model has 1 unbound parameter slot: [0] ('w'). Fix: bind values with pzb.bind_variables(model, params) (or call model.stateless_call(values, x)), or build it with an init_base_rng.
    """
    found = [(path, leaf) for path, leaf in jax.tree_util.tree_flatten_with_path(
        model, is_leaf=lambda x: isinstance(x, ParameterSlot))[0] if isinstance(leaf, ParameterSlot)]
    if found:
        shown = ", ".join(f"{format_path(path)} ({leaf.label!r})" for path, leaf in found[:8])
        more = f", ... ({len(found) - 8} more)" if len(found) > 8 else ""
        raise VariableError(
            f"The model has {len(found)} unbound parameter slot{'s' if len(found) != 1 else ''}: {shown}{more}. "
            "Fix: bind values with pzb.bind_variables(model, params) (or call model.stateless_call(values, x)), "
            "or build it with an init_base_rng."
        )
