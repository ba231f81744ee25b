"""The check that a traced lift returns what the original module returns, in shape.

Traced lifting names every axis of every intermediate value; an axis it
cannot tell apart (a size-1 axis in the example, which broadcasting treats
like a missing one) can be dropped or merged without any error. Comparing the
output shapes of the lifted model and of the original on the examples (both
abstractly, with ``jax.eval_shape``: nothing is computed and neither model is
changed) turns such a silent error into a clear one.

The original's shapes usually need no second evaluation: the root trace
computed them (its ``out_shape``, see
:mod:`~pzbridge.bridge.tracing.trace_log`), and only when those disagree with
the lifted model's is the module evaluated again (a root trace may return
more than the module: the Variables an NNX module writes).

A lift traced on a widened example (:mod:`~pzbridge.bridge.tracing.widening`)
is checked harder, by :func:`disagreement_on_examples`: on the original
examples, the exact output shapes, and the values when the examples are
concrete arrays.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from pzbridge.core import named_axes as nx
from pzbridge.core.errors import LiftError
from pzbridge.core.variables import stateless_call

__all__ = ["check_output_shapes", "disagreement_on_examples"]


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

    return eqx.filter_eval_shape(lambda *a: _call_equinox(module, a, kwargs), *args)


def _call_equinox(module: Any, args: Sequence[Any], kwargs: Mapping[str, Any]) -> Any:
    """``module(*args, **kwargs)``; one needing its batch axis (a batch-coupled NNX model converted) as a batch of one.

    Called with an ``eqx.nn.State`` (``y, state = model(x, state)``), on a copy
    of it, the BatchNorms' ``vmap`` axes bound (a batch of one), returning
    ``y`` only: the lifted model holds its state itself.
    """
    import equinox as eqx

    state = next((a for a in args if isinstance(a, eqx.nn.State)), None)
    if state is not None:
        from pzbridge.bridge.equinox.state_threading import call_threading_state, returned_without_state, with_tokens

        return returned_without_state(call_threading_state(module, with_tokens(tuple(args)), kwargs, state))[0]
    if not getattr(module, "needs_batch_axis", False):
        return module(*args, **kwargs)
    batched = jax.vmap(lambda *a: module(*a, **kwargs), axis_name=module.batch_axis)(*[jnp.asarray(a)[None]
                                                                                       for a in args])
    return jax.tree_util.tree_map(lambda y: y[0], batched)


def _run_lifted(lifted: Any, arguments: Any) -> Any:
    args, kwargs = arguments
    axis = None
    if lifted.framework == "equinox":  # y, state = model(x, state): the lifted model takes the data only.
        from pzbridge.bridge.equinox.adapter_state import batch_statistics_axis
        from pzbridge.bridge.equinox.state import without_state_args

        args, state = without_state_args(args, None)
        axis = batch_statistics_axis(lifted.body, "<root>") if state is not None else None
    x, side = lifted.convention.split_call(args, kwargs)
    if axis is not None:  # BatchNorms taking batch statistics: one example is a batch of one, as for the original.
        x = jax.tree_util.tree_map(lambda a: _with_unit_axis(a, axis), x, is_leaf=nx.is_namedarray)
    out, _ = stateless_call(lifted.body, (), x, **side)  # Copies state variables: the lifted model is unchanged.
    if axis is not None:
        out = jax.tree_util.tree_map(lambda y: y[{axis: 0}] if nx.is_namedarray(y) and axis in y.named_shape else y,
                                     out, is_leaf=nx.is_namedarray)
    return lifted.convention.unname_output(out)


def _with_unit_axis(x: Any, axis: str) -> Any:
    if not nx.is_namedarray(x):
        return x
    canonical = x.canonicalize()
    return nx.NamedArray(canonical.data_array[..., None], {**dict(canonical.named_axes), axis: 1})


def check_output_shapes(module: Any, lifted: Any, framework: str, args: Sequence[Any],
                        kwargs: Mapping[str, Any], traced_output: Any = None) -> None:
    """Raises ``LiftError`` when ``lifted.positional(*args)`` and ``module(*args)`` differ in output shape.

    Args:
      module: The original Equinox / NNX module.
      lifted: Its :class:`~pzbridge.bridge.lifted.LiftedModel`.
      framework: ``"equinox"`` or ``"nnx"``.
      args: The example positional inputs.
      kwargs: The example keyword inputs.
      traced_output: The root trace's output shapes, when the root was
        traced on these examples: a match needs no evaluation of the module.

    Example:
        >>> import equinox as eqx, jax, jax.numpy as jnp
        >>> import pzbridge as pzb
        >>> model = eqx.nn.Linear(2, 3, key=jax.random.key(0))
        >>> check_output_shapes(model, pzb.lift(model), "equinox", (jnp.ones(2),), {})
    """
    try:
        got = jax.eval_shape(lambda arguments: _run_lifted(lifted, arguments), (tuple(args), dict(kwargs)))
    except Exception:  # noqa: BLE001 - a call that fails is explained when the user calls it; shapes only here.
        return
    if traced_output is not None and _layout(got) == _layout(traced_output):
        return
    want = _original_shapes(module, framework, args, kwargs)
    for compare, why, fix in (
            (_shapes, "an axis was lost in tracing (often a size-1 axis in the example)",
             "give examples whose axes all have sizes > 1, or name them with input_names=...; lift without "
             "examples to keep the module Foreign."),
            (_layout, "the output axes come back in another order (the recorded output names are not the ones the "
             "lifted layers produce, a pzbridge bug worth reporting)",
             "lift without examples to keep the module Foreign (it runs the original code).")):
        if compare(got) != compare(want):
            found, expected = ([shape for shape, _ in compare(tree)[1]] for tree in (got, want))
            raise LiftError(f"<root>: the traced lift of {type(module).__qualname__} returns shapes {found} on the "
                            f"examples, the module returns {expected}: {why}. Fix: {fix}")


def _concrete(args: Sequence[Any], kwargs: Mapping[str, Any]) -> bool:
    leaves = jax.tree_util.tree_leaves((tuple(args), dict(kwargs)))
    return all(isinstance(leaf, (jax.Array, np.ndarray, np.generic, int, float, bool, complex)) for leaf in leaves)


def _original_outputs(module: Any, framework: str, args: Sequence[Any], kwargs: Mapping[str, Any]) -> Any:
    if framework == "nnx":
        from flax import nnx

        return nnx.clone(module)(*args, **kwargs)  # A copy runs: NNX calls may write state (merge(*split) shares it).
    return _call_equinox(module, args, kwargs)


def _layout(tree: Any) -> Any:
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    return treedef, [(tuple(leaf.shape), str(leaf.dtype)) for leaf in leaves]


def disagreement_on_examples(module: Any, lifted: Any, framework: str, args: Sequence[Any],
                             kwargs: Mapping[str, Any]) -> str | None:
    """Why ``lifted.positional`` does not compute ``module`` on the examples, or None when it does.

    Compares the exact output layout (tree, shapes, dtypes) and, for concrete
    examples, the values (floating outputs within ``rtol=1e-4, atol=1e-5``,
    others exactly). Used for a lift traced on other shapes than the
    examples'; neither model is changed.

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
        >>> disagreement_on_examples(model, pzb.lift(model), "equinox", (jnp.ones(2),), {}) is None
        True
    """
    arguments = (tuple(args), dict(kwargs))
    try:
        if _concrete(args, kwargs):
            want = _original_outputs(module, framework, args, kwargs)
            got = _run_lifted(lifted, arguments)
        else:
            want = _original_shapes(module, framework, args, kwargs)
            got = jax.eval_shape(lambda a: _run_lifted(lifted, a), arguments)
    except Exception as error:  # noqa: BLE001 - any failure means the lift cannot be trusted on these examples
        return f"running it on the examples failed ({type(error).__name__}: {error})"
    if _layout(got) != _layout(want):
        return f"it returns {_layout(got)[1]}, the module returns {_layout(want)[1]}"
    for index, (g, w) in enumerate(zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want))):
        if isinstance(w, jax.ShapeDtypeStruct):
            continue
        g, w = np.asarray(g), np.asarray(w)
        same = (np.allclose(g, w, rtol=1e-4, atol=1e-5, equal_nan=True) if w.dtype.kind in "fc"
                else np.array_equal(g, w))
        if not same:
            return f"output {index} differs from the module's on the examples"
    return None
