"""Treescope rendering of mutable variables.

A variable renders in constructor form with its label first and its value
inline, coloured by kind, so a model printed in a notebook shows which
leaves are trainable. Variables compare by identity (like plain Python
objects), so treescope's shared-object tracking marks a variable that is
reached from two places ("Repeated python obj at 0x...") — sharing is visible
in the rendering. Frozen values and slots are ordinary structs and use
treescope's dataclass rendering. Imported lazily from
``LabeledVariable.__treescope_repr__`` so that treescope is loaded only when
something is rendered; this module does not import
:mod:`pzbridge.core.variables_kinds` back (the variable passes its kind), so
the dependency points one way.

Example:
    >>> import treescope, jax.numpy as jnp
    >>> from pzbridge.core.variables_kinds import Parameter
    >>> w = Parameter(jnp.zeros(2), label="w")
    >>> text = treescope.render_to_text([w, w])
    >>> "label='w'" in text and "Repeated" in text
    True
"""

from __future__ import annotations

from typing import Any

PARAMETER_COLOR = "#93cce1"
STATE_VARIABLE_COLOR = "#f0c090"


def variable_color(kind: str) -> str:
    """The background colour of a variable's rendering, by kind.

    Args:
      kind: ``"Parameter"`` or ``"StateVariable"``, as
        :func:`pzbridge.core.variables_kinds.kind_name` gives it.

    Example:
        >>> variable_color("StateVariable") == STATE_VARIABLE_COLOR
        True
    """
    return STATE_VARIABLE_COLOR if kind == "StateVariable" else PARAMETER_COLOR


def render_variable(variable: Any, kind: str, path: str | None, subtree_renderer: Any) -> Any:
    """Renders ``Kind(label=..., value=..., metadata=...)`` for treescope.

    Args:
      variable: The variable to render (a ``LabeledVariable``).
      kind: Its kind, ``"Parameter"`` or ``"StateVariable"`` (picks the colour).
      path: The path treescope passes to ``__treescope_repr__``.
      subtree_renderer: Treescope's renderer for the children.

    Returns:
      A treescope rendering (metadata is omitted when empty).

    Example:
        >>> import treescope
        >>> from pzbridge.core.variables_kinds import StateVariable
        >>> "StateVariable(" in treescope.render_to_text(StateVariable(0, "n"))
        True
    """
    from treescope import repr_lib

    attributes: dict[str, Any] = {"label": variable.label, "value": variable.value}
    if variable.metadata:
        attributes["metadata"] = variable.metadata
    return repr_lib.render_object_constructor(
        type(variable), attributes, path, subtree_renderer, roundtrippable=False, color=variable_color(kind)
    )
