"""Why a call of a lifted model failed, for the mistakes users make most.

A lifted model runs user code (``Foreign``) and JAX primitives, so a wrong
call surfaces as a raw error deep inside (``'ArrayImpl' object has no
attribute 'named_shape'``, an einsum on a ``ShapeDtypeStruct``, a matmul on
a scalar inside a vmap). :func:`explain_call_failure` is asked *after* a call
failed, never before: checking up front would cost a tree walk per call and
would reject calls that work (a ``Foreign`` root happily takes a plain
array; a model passed into ``jax.eval_shape`` holds tracers). It recognises
three mistakes and returns the pzbridge error to raise instead (the original
error stays chained):

- the model is abstract (``jax.ShapeDtypeStruct`` placeholders);
- a plain array was passed where named arrays are expected;
- a named input to an Equinox module kept ``Foreign`` at the root, which
  vectorises over every named axis, so the module sees no axes of its own.

Example:
    >>> import jax.numpy as jnp
    >>> import pzbridge as pzb
    >>> from pzbridge.bridge.lifted import CallingConvention, LiftedModel
    >>> model = LiftedModel(pzb.nn.Identity(), "equinox", CallingConvention((("features",),), ("features",)))
    >>> error = explain_call_failure(model, (jnp.ones(3),), AttributeError("named_shape"), positional=False)
    >>> type(error).__name__
    'NamedAxisError'
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

from pzbridge.core import named_axes as nx
from pzbridge.core.abstract import abstract_error
from pzbridge.core.errors import NamedAxisError, PzbridgeError
from pzbridge.nn.foreign import Foreign


def _leaves(inputs: Sequence[Any]) -> list[Any]:
    return jax.tree_util.tree_leaves(tuple(inputs), is_leaf=nx.is_namedarray)


def _plain_arrays(inputs: Sequence[Any]) -> list[Any]:
    return [leaf for leaf in _leaves(inputs) if isinstance(leaf, (jax.Array, np.ndarray))]


def _named_shapes(inputs: Sequence[Any]) -> list[dict[str, int]]:
    return [dict(leaf.named_shape) for leaf in _leaves(inputs) if nx.is_namedarray(leaf) and leaf.named_shape]


def _original(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}"


def _plain_input_error(model: Any, plain: list[Any], exc: BaseException) -> NamedAxisError:
    names = model.convention.inputs[0] if model.convention.inputs else ()
    example = ", ".join(repr(n) for n in names) or "'seq', 'features'"
    return NamedAxisError(
        f"<root>: the lifted model takes named arrays, expected a pzb.nx.NamedArray, found a plain "
        f"{type(plain[0]).__name__} of shape {tuple(plain[0].shape)} (the call failed with {_original(exc)}). "
        f"Fix: call it like the original with lifted.positional(x), or name the axes, e.g. "
        f"lifted(pzb.nx.wrap(x, {example}))."
    )


def _foreign_root_error(model: Any, named: list[dict[str, int]], exc: BaseException) -> NamedAxisError:
    name = model.body.template.class_name
    return NamedAxisError(
        f"<root>: {name} has no lifting rule, so the lifted model runs its original __call__ on one example: "
        f"every named axis of the input is vectorised over, expected the module's own axes to stay positional, "
        f"found named axes {named[0]} and the call failed with {_original(exc)}. Fix: call it like the original "
        "with lifted.positional(x) (under jax.vmap for a batch), leave the module's own axes positional "
        "(pzb.nx.wrap(x).tag_prefix('batch')), or lift it with an example input, pzb.lift(model, x), to trace "
        "it into named layers."
    )


def explain_call_failure(
    model: Any, inputs: Sequence[Any], exc: BaseException, *, positional: bool
) -> PzbridgeError | None:
    """The pzbridge error explaining why calling ``model`` on ``inputs`` raised ``exc``, if recognised.

    Args:
      model: The :class:`~pzbridge.bridge.lifted.LiftedModel` that was called.
      inputs: The positional arguments of the call.
      exc: The error the call raised (not a pzbridge error: those already explain).
      positional: Whether the call was ``model.positional(...)`` (plain arrays expected).

    Returns:
      The error to raise (``from exc``), or None to let ``exc`` propagate.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> import pzbridge as pzb
        >>> from pzbridge.bridge.lifted import LiftedModel
        >>> model = LiftedModel(pzb.Parameter(jax.ShapeDtypeStruct((2,), jnp.float32), "w"), "equinox")
        >>> str(explain_call_failure(model, (), TypeError("einsum"), positional=True)).split(":")[0]
        'w'
    """
    abstract = abstract_error(model.body, "calling the model")
    if abstract is not None:
        return abstract
    if positional:
        return None
    if not isinstance(model.body, Foreign):  # A Foreign root takes plain arrays as its original did.
        plain = _plain_arrays(inputs)
        return _plain_input_error(model, plain, exc) if plain else None
    named = _named_shapes(inputs)
    if named and model.framework == "equinox":
        return _foreign_root_error(model, named, exc)
    return None
