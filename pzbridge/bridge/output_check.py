"""The check that a traced lift returns what the original module returns, in shape.

Traced lifting names every axis of every intermediate value; an axis it
cannot tell apart (a size-1 axis in the example, which broadcasting treats
like a missing one) can be dropped or merged without any error. Comparing the
output shapes of the lifted model and of the original on the examples (both
abstractly, with ``jax.eval_shape``: nothing is computed and neither model is
changed) turns such a silent error into a clear one.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax

from pzbridge.core.errors import LiftError
from pzbridge.core.variables import stateless_call

__all__ = ["check_output_shapes"]


def _shapes(tree: Any) -> Any:
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    # Sizes as a multiset: a lost or merged axis shows; the order of the axes is the convention's business.
    return treedef, [(tuple(sorted(leaf.shape)), str(leaf.dtype)) for leaf in leaves]


def _original_shapes(module: Any, framework: str, args: Sequence[Any], kwargs: Mapping[str, Any]) -> Any:
    if framework == "nnx":
        from flax import nnx

        graphdef, state = nnx.split(module)
        # merge builds new module objects: the user's module is never run (NNX calls may write state).
        return jax.eval_shape(lambda s: nnx.merge(graphdef, s)(*args, **kwargs), state)
    import equinox as eqx

    return eqx.filter_eval_shape(module, *args, **kwargs)


def check_output_shapes(module: Any, lifted: Any, framework: str, args: Sequence[Any],
                        kwargs: Mapping[str, Any]) -> None:
    """Raises ``LiftError`` when ``lifted.positional(*args)`` and ``module(*args)`` differ in output shape.

    Args:
      module: The original Equinox / NNX module.
      lifted: Its :class:`~pzbridge.bridge.lifted.LiftedModel`.
      framework: ``"equinox"`` or ``"nnx"``.
      args: The example positional inputs.
      kwargs: The example keyword inputs.

    Example:
        >>> import equinox as eqx, jax, jax.numpy as jnp
        >>> import pzbridge as pzb
        >>> model = eqx.nn.Linear(2, 3, key=jax.random.key(0))
        >>> check_output_shapes(model, pzb.lift(model), "equinox", (jnp.ones(2),), {})
    """
    want = _original_shapes(module, framework, args, kwargs)

    def run(arguments: Any) -> Any:
        x, side = lifted.convention.split_call(*arguments)
        out, _ = stateless_call(lifted.body, (), x, **side)  # Copies state variables: the lifted model is unchanged.
        return lifted.convention.unname_output(out)

    try:
        got = jax.eval_shape(run, (tuple(args), dict(kwargs)))
    except Exception:  # noqa: BLE001 - a call that fails is explained when the user calls it; shapes only here.
        return
    if _shapes(got) != _shapes(want):
        found = [shape for shape, _ in _shapes(got)[1]]
        expected = [shape for shape, _ in _shapes(want)[1]]
        raise LiftError(
            f"<root>: the traced lift of {type(module).__qualname__} returns shapes {found} on the examples, the "
            f"module returns {expected}: an axis was lost in tracing (often a size-1 axis in the example). Fix: "
            "give examples whose axes all have sizes > 1, or name them with input_names=...; lift without "
            "examples to keep the module Foreign."
        )
