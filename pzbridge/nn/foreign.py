"""``Foreign``: the escape hatch for modules pzbridge has no rule for.

A module of an unknown class (a user's ``TransformerBlock``, a third-party
layer) is not flattened into primitives, because its ``__call__`` may wire
its children in any way: reading a child's weight directly, calling a child
twice, passing extra arguments. Instead it is kept as a *template* and its
children are lifted, so selectors, variables, LoRA and inserted layers still
reach everything inside it. Calling a ``Foreign`` rebuilds the original
module from its (lowered) children and calls the original ``__call__``; an
edited child lowers to an adapter module, so the original code runs the edit
when it calls that child.

The template is framework-specific (it lives in :mod:`pzbridge.bridge`) and
static, so ``nn`` stays free of Equinox and Flax; it only has to satisfy the
small :class:`ForeignTemplate` interface. See docs/architecture.md
("Foreign: modules without a rule").

Example:
    >>> class Doubler(ForeignTemplate):
    ...     class_name = "Doubler"
    ...     def rebuild(self, children, ctx=None): return lambda v: v * children["factor"]
    ...     def invoke(self, module, x, side_inputs, children): return module(x)
    >>> Foreign({"factor": 2}, Doubler())(21)
    42
"""

from __future__ import annotations

import abc
from collections.abc import Mapping
from typing import Any

from pzbridge.core.struct import pytree_dataclass, static_field
from pzbridge.nn.layer import Layer


class ForeignTemplate(abc.ABC):
    """How to rebuild and call an original module from its lifted children.

    Implementations must be hashable and comparable (they are static tree
    metadata). ``class_name`` names the original class in renderings and errors.

    Example:
        >>> issubclass(ForeignTemplate, abc.ABC)
        True
    """

    class_name: str

    @abc.abstractmethod
    def rebuild(self, children: Mapping[str, Any], ctx: Any = None) -> Any:
        """Returns the original framework module with ``children`` lowered into place.

        ``ctx`` is the bridge's lower context when the rebuild is part of a
        whole-model lowering (so sharing across the model is kept); ``None``
        for a rebuild made to run the module.
        """

    @abc.abstractmethod
    def invoke(self, module: Any, x: Any, side_inputs: Mapping[str, Any], children: Mapping[str, Any]) -> Any:
        """Calls ``module`` on the named input ``x``; returns a named output."""


@pytree_dataclass
class Foreign(Layer):
    """A module with no lifting rule: its children lifted, its code kept.

    Attributes:
      children: Lifted children by attribute path relative to the module
        (``"attn"``, ``"layers[0]"``): layers, variables, or other Foreigns.
      template: The framework-specific rebuild-and-call recipe (static).

    Example:
        >>> class Adder(ForeignTemplate):
        ...     class_name = "Adder"
        ...     def rebuild(self, children, ctx=None): return lambda v: v + children["b"]
        ...     def invoke(self, module, x, side_inputs, children): return module(x)
        >>> Foreign({"b": 1}, Adder())(1)
        2
    """

    children: dict[str, Any]
    template: ForeignTemplate = static_field()

    def __call__(self, x: Any, /, **side_inputs: Any) -> Any:
        return self.template.invoke(self.rebuild(), x, side_inputs, self.children)

    def rebuild(self) -> Any:
        """Returns the original module rebuilt from the current children.

        Example:
            >>> class Const(ForeignTemplate):
            ...     class_name = "Const"
            ...     def rebuild(self, children, ctx=None): return children["c"]
            ...     def invoke(self, module, x, side_inputs, children): return module
            >>> Foreign({"c": 5}, Const()).rebuild()
            5
        """
        return self.template.rebuild(self.children)

    def __treescope_repr__(self, path: str | None, subtree_renderer: Any) -> Any:
        from treescope import repr_lib

        return repr_lib.render_object_constructor(
            object_type=type(self),
            attributes={"original": self.template.class_name, "children": self.children},
            path=path,
            subtree_renderer=subtree_renderer,
            roundtrippable=False,
        )
