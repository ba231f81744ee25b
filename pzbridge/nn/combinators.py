"""Combinators: layers built from other layers.

These are the structural vocabulary of a lifted model. Each is a small frozen
struct whose children are layers, so selectors can reach, replace, insert
and remove sublayers (``select(model).at_instances_of(Sequential)...``), and
each forwards every side input to its children unchanged.

Meaningful groups (a transformer block, an MLP) are named subclasses of
:class:`Sequential` with no extra behaviour: the class name documents the
group in renderings and gives selectors something to match
(``at_instances_of(TransformerBlock)``).

Example:
    >>> import jax.numpy as jnp
    >>> import pzbridge as pzb
    >>> double = pzb.nn.Elementwise(lambda v: v * 2)
    >>> model = Sequential([Residual(double), double])
    >>> model(pzb.nx.wrap(jnp.ones(2), "features")).unwrap("features")
    Array([6., 6.], dtype=float32)
"""

from __future__ import annotations

import functools
import operator
from typing import Any

from pzbridge.core.struct import pytree_dataclass
from pzbridge.nn.check_structure import CheckStructure  # noqa: F401 - re-exported; it lives in its own module.
from pzbridge.nn.layer import Layer


@pytree_dataclass
class Sequential(Layer):
    """Runs ``sublayers`` in order, each on the previous one's output.

    Attributes:
      sublayers: The layers, a list (so selectors can insert and remove).

    Example:
        >>> Sequential([Identity(), Identity()])(4)
        4
    """

    sublayers: list[Layer]

    def __call__(self, x: Any, /, **side_inputs: Any) -> Any:
        for layer in self.sublayers:
            x = layer(x, **side_inputs)
        return x


@pytree_dataclass
class Identity(Layer):
    """Returns its input unchanged (a placeholder that selectors can replace).

    Example:
        >>> Identity()(3)
        3
    """

    def __call__(self, x: Any, /, **side_inputs: Any) -> Any:
        return x


@pytree_dataclass
class Residual(Layer):
    """Adds the input to ``delta(input)``: ``x + delta(x)``.

    Attributes:
      delta: The layer whose output is added to the input.

    Example:
        >>> Residual(Identity())(3)
        6
    """

    delta: Layer

    def __call__(self, x: Any, /, **side_inputs: Any) -> Any:
        return x + self.delta(x, **side_inputs)


@pytree_dataclass
class BranchAndAddTogether(Layer):
    """Runs each branch on the same input and sums the outputs.

    Attributes:
      branches: The parallel layers (at least one).

    Example:
        >>> BranchAndAddTogether([Identity(), Identity(), Identity()])(2)
        6
    """

    branches: list[Layer]

    def __call__(self, x: Any, /, **side_inputs: Any) -> Any:
        return functools.reduce(operator.add, (branch(x, **side_inputs) for branch in self.branches))


@pytree_dataclass
class BranchAndMultiplyTogether(Layer):
    """Runs each branch on the same input and multiplies the outputs (e.g. gated MLPs).

    Attributes:
      branches: The parallel layers (at least one).

    Example:
        >>> BranchAndMultiplyTogether([Identity(), Identity()])(3)
        9
    """

    branches: list[Layer]

    def __call__(self, x: Any, /, **side_inputs: Any) -> Any:
        return functools.reduce(operator.mul, (branch(x, **side_inputs) for branch in self.branches))
