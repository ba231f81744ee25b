"""Choosing one of several layers at run time: ``lax.cond`` / ``lax.switch`` on named axes.

Traced code that branches with ``jax.lax.cond(pred, f, g, x)`` lifts to a
:class:`Switch` whose branches are the lifted ``f`` and ``g``: selectors,
capture of parameters, patching and LoRA reach inside both, and the choice is
still made by the traced predicate at run time.

Example:
    >>> import jax.numpy as jnp
    >>> import pzbridge as pzb
    >>> switch = Switch([pzb.nn.Elementwise(jnp.negative), pzb.nn.Elementwise(jnp.tanh)], out_names=(("features",),))
    >>> x = pzb.nx.wrap(jnp.array([1.0, -2.0]), "features")
    >>> switch((pzb.nx.wrap(jnp.int32(0)), x)).unwrap("features").tolist()
    [-1.0, 2.0]
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

from pzbridge.core import named_axes as nx
from pzbridge.core.errors import NamedAxisError
from pzbridge.core.struct import pytree_dataclass, static_field
from pzbridge.nn.layer import Layer


@pytree_dataclass
class Switch(Layer):
    """Runs ``branches[index]`` (``jax.lax.switch``): all branches take and return the same structure.

    The input is the tuple ``(index, data, *others)``: an integer scalar
    choosing the branch (clamped into range, as ``lax.switch`` does), the
    branches' data input, and further inputs passed to every branch as side
    inputs named ``side_names``.

    Attributes:
      branches: One layer per case.
      side_names: Side-input names of the inputs after ``data`` (static).
      out_names: Per output, its axis names: every branch's output is put in
        this order, so all branches return one structure (static).

    Example:
        >>> double = pzb.nn.Elementwise(lambda v: 2 * v)
        >>> switch = Switch([pzb.nn.Identity(), double], out_names=((),))
        >>> float(switch((pzb.nx.wrap(jnp.int32(1)), pzb.nx.wrap(jnp.float32(3.0)))).unwrap())
        6.0
    """

    branches: list[Layer]
    side_names: tuple[str, ...] = static_field(default=())
    out_names: tuple[tuple[str, ...], ...] = static_field(default=())

    def __call__(self, x: Any, /, **side_inputs: Any) -> Any:
        index, data, *others = x
        index = index.unwrap() if nx.is_namedarray(index) else jnp.asarray(index)
        if jnp.ndim(index) != 0:
            raise NamedAxisError(
                f"Switch: the branch index must be a scalar, found shape {jnp.shape(index)}. "
                "Fix: reduce the condition to one value per call (vmap the module for per-example choices)."
            )
        side = dict(zip(self.side_names, others))

        def case(branch: Layer) -> Any:
            def run(operand: Any) -> tuple[Any, ...]:
                out = branch(operand, **{**side_inputs, **side})
                outs = out if len(self.out_names) > 1 else (out,)
                return tuple(_ordered(o, names) for o, names in zip(outs, self.out_names))
            return run

        outs = jax.lax.switch(index.astype(jnp.int32), [case(b) for b in self.branches], data)
        return outs if len(outs) > 1 else outs[0]


def _ordered(value: Any, names: Sequence[str]) -> Any:
    if not nx.is_namedarray(value):
        return value
    if set(value.named_shape) != set(names) or value.positional_shape:
        raise NamedAxisError(
            f"Switch: a branch returned axes {dict(value.named_shape)} (positional {value.positional_shape}) "
            f"where every branch must return exactly {list(names)}. Fix: make the branches agree on their output."
        )
    return value.order_as(*names) if names else value
