"""A calling convention read off the example inputs, for a root whose rule records none.

Stock layers that keep their input's shape (``eqx.nn.Identity``,
``eqx.nn.Lambda``, ``eqx.nn.Dropout``, a Sequential made only of such layers,
an empty ``nnx.Sequential``) take any rank, so their lift rules record no
calling convention. Converting such a root still needs names for its
positional axes; the examples passed to ``pzb.convert`` say how many there
are, so each input is named as traced lifting names it (``..., seq,
features``, NNX inputs with ``batch`` in front) and the output like the first
input. The conversion's check on the examples catches a root that does not
keep its input's shape.

Example:
    >>> import jax.numpy as jnp
    >>> import pzbridge as pzb
    >>> lifted = LiftedModel(pzb.nn.Identity(), "equinox")
    >>> example_convention(lifted, (jnp.ones(2),)).convention.inputs
    (('features',),)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax.numpy as jnp

from pzbridge.bridge.lifted import CallingConvention, LiftedModel
from pzbridge.bridge.naming import AxisNaming, checked_naming
from pzbridge.bridge.tracing.assemble import default_input_names

__all__ = ["example_convention"]


def example_convention(lifted: LiftedModel, args: Sequence[Any], naming: AxisNaming | None = None) -> LiftedModel:
    """``lifted`` with a convention named from ``args`` when it has none with inputs (else ``lifted`` itself).

    Args:
      lifted: A lifted model (its ``framework`` decides whether a leading
        ``batch`` name is used: NNX modules are called on batches).
      args: The example positional inputs (arrays or ``jax.ShapeDtypeStruct`` s).
      naming: The axis naming (``seq``, ``features`` and ``batch`` names).

    Returns:
      The lifted model, with a convention naming every example input and an
      output named like the first input when it had no convention.

    Example:
        >>> import jax.numpy as jnp
        >>> import pzbridge as pzb
        >>> lifted = LiftedModel(pzb.nn.Identity(), "nnx")
        >>> example_convention(lifted, (jnp.ones((4, 3)),)).convention.output
        ('batch', 'features')
    """
    naming = checked_naming(naming)
    if not args or not all(hasattr(a, "shape") for a in args):
        return lifted
    leading = (naming.batch,) if lifted.framework == "nnx" else ()
    own = _own_input_names(lifted.body, len(args[0].shape) - len(leading))
    # A convention naming no axes (a layer of any rank) still takes the names a layer gives its input itself.
    if lifted.convention.inputs and (own is None or any(lifted.convention.inputs)):
        return lifted
    inputs = tuple(default_input_names(len(a.shape), (naming.seq, naming.features), jnp.result_type(a), leading)
                   for a in args)
    if own is not None:
        inputs = ((*leading, *own), *inputs[1:])
    convention = CallingConvention(inputs, inputs[0], lifted.convention.side_names)
    return dataclasses.replace(lifted, convention=convention)


def _own_input_names(body: Any, rank: int) -> tuple[str, ...] | None:
    """Names a shape-keeping layer gives a rank-``rank`` input itself (Equinox's BatchNorm: channels first).

    In a Sequential of shape-keeping layers the first layer with names of
    its own decides.
    """
    for layer in getattr(body, "sublayers", None) or (body,):
        names = getattr(layer, "input_names", None)
        if callable(names):
            return names(rank)
    return None
