"""Gradients with respect to activations, and attribution patching, in one backward pass.

An activation is not an argument of the model, so "the gradient of a metric
with respect to what layer X produced" needs a place to differentiate at.
Here that place is an *edit*, like every intervention: a :class:`Perturb`
layer after (or before) each selected layer adds a zero ``delta`` and
records the value it saw. Differentiating the metric with respect to the
deltas at zero gives the gradient with respect to each activation, for every
site at once, in one forward and one backward pass; the user's model is
never changed (the copy runs through ``stateless_call``).

Attribution patching builds on it: the effect on the metric of patching a
site's activation from a corrupted run into the clean run is estimated to
first order as ``(a_corrupt - a_clean) . dmetric/da`` at the clean run. The
estimate is exact when the metric is affine in the activation (a linear
model) and a cheap screen elsewhere; ``keep=`` keeps named axes (``heads``,
``seq``) so each unit gets its own estimate. Only core and nn are imported
(docs/architecture.md, "Layers of the package").

Example:
    >>> import jax.numpy as jnp
    >>> import pzbridge as pzb
    >>> model = pzb.nn.Sequential([pzb.nn.Elementwise(jnp.square), pzb.nn.Elementwise(jnp.sin)])
    >>> x = pzb.nx.wrap(jnp.array([0.0, 1.0]), "f")
    >>> _, grads = activation_gradients(model, Where(path="sublayers[0]"), lambda y: y.unwrap("f").sum(), x)
    >>> [round(g, 4) for g in grads["sublayers[0]"].unwrap("f").tolist()]
    [1.0, 0.5403]
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from pzbridge.core import named_axes as nx
from pzbridge.core.errors import PzbridgeError, format_path
from pzbridge.core.selectors import KeyPath
from pzbridge.core.struct import pytree_dataclass, static_field
from pzbridge.core.variables import StateVariableSlot, StateVariableValue, stateless_call
from pzbridge.nn.layer import Layer
from pzbridge.toolshed.capture import capture_shapes
from pzbridge.toolshed.intermediates import LayerSelector, capture_intermediates, insert_layers, side_of
from pzbridge.toolshed.where import Where

__all__ = ["Perturb", "activation_gradients", "attribution_patching"]

_LABEL_PREFIX = "attribution:"


@pytree_dataclass
class Perturb(Layer):
    """Records its input in a state slot and returns ``x + delta`` (leaf by leaf).

    With ``delta`` zero it changes nothing; differentiating with respect to
    ``delta`` gives the gradient with respect to the activation.

    Attributes:
      delta: The perturbation (same structure and named shapes as the activation).
      label: The label of the slot the input is recorded in (static).
      saved: The slot (bound by ``stateless_call``).

    Example:
        >>> import jax.numpy as jnp, pzbridge as pzb
        >>> layer = Perturb(pzb.nx.wrap(jnp.ones(2), "f"), "p", saved=pzb.StateVariable(None, "p"))
        >>> layer(pzb.nx.wrap(jnp.zeros(2), "f")).unwrap("f").tolist(), layer.saved.value.unwrap("f").tolist()
        ([1.0, 1.0], [0.0, 0.0])
    """

    delta: Any
    label: str = static_field()
    saved: Any = None

    def __post_init__(self) -> None:
        if self.saved is None:
            object.__setattr__(self, "saved", StateVariableSlot(self.label))

    def __call__(self, x: Any, /, **side_inputs: Any) -> Any:
        self.saved.value = x
        return jax.tree_util.tree_map(lambda a, d: a + d, x, self.delta, is_leaf=nx.is_namedarray)


def _unindexed(at: LayerSelector) -> LayerSelector:
    if isinstance(at, Where) and at.index:
        return Where(at.layer, at.path, at.label, at.module, at.side)
    return at


def _zeros(path: str, shape: Any) -> Any:
    def zero(leaf: Any) -> Any:
        if not jnp.issubdtype(leaf.dtype, jnp.inexact):
            raise PzbridgeError(
                f"activation_gradients: the activation at {path} has dtype {leaf.dtype}, expected a float "
                "array to differentiate. Fix: select a layer with a float output (not token ids or masks)."
            )
        return jnp.zeros(leaf.shape, leaf.dtype)

    return jax.tree_util.tree_map(zero, shape)


def _scalar(value: Any) -> jax.Array:
    array = value.unwrap() if nx.is_namedarray(value) else jnp.asarray(value)
    if array.shape != () or not jnp.issubdtype(array.dtype, jnp.inexact):
        raise PzbridgeError(
            f"attribution: the metric must return a float scalar, found shape {array.shape} and dtype "
            f"{array.dtype}. Fix: reduce it, e.g. lambda y: y.unwrap('batch', 'vocabulary')[:, answer].mean()."
        )
    return array


def _gradient_run(
    model: Any, at: LayerSelector, metric: Callable[[Any], Any], x: Any, side_inputs: dict[str, Any]
) -> tuple[jax.Array, dict[str, Any], dict[str, Any]]:
    """``(metric value, {path: gradient}, {path: activation})`` for whole (unindexed) activations."""
    side = side_of(at, None)
    whole = _unindexed(at)
    _, shapes = capture_shapes(model, whole, x, where=side, **side_inputs)
    deltas = {path: _zeros(path, shape) for path, shape in shapes.items()}

    def run(deltas: dict[str, Any]) -> tuple[jax.Array, dict[str, Any]]:
        def perturb(path: KeyPath, node: Any) -> Perturb:
            return Perturb(deltas[format_path(path)], _LABEL_PREFIX + format_path(path))

        perturbed = insert_layers(model, whole, perturb, where=side)
        slots = [StateVariableValue(None, _LABEL_PREFIX + path) for path in deltas]
        output, states = stateless_call(perturbed, slots, x, **side_inputs)
        by_label = {state.label: state.value for state in states}
        return _scalar(metric(output)), {path: by_label[_LABEL_PREFIX + path] for path in deltas}

    (value, activations), grads = jax.value_and_grad(run, has_aux=True)(deltas)
    return value, grads, activations


def activation_gradients(
    model: Any, at: LayerSelector, metric: Callable[[Any], Any], x: Any, /, **side_inputs: Any
) -> tuple[jax.Array, dict[str, Any]]:
    """The gradient of ``metric(model(x))`` with respect to the activation at every selected site.

    Args:
      model: The model (not modified).
      at: Which layers (a ``Where``, selection, class or predicate); a ``Where``'s side picks output
        or input, its index returns only those units of each gradient.
      metric: Maps the model output to a float scalar.
      x: The input.
      **side_inputs: Forwarded to the model.

    Returns:
      ``(metric value, {path: gradient})``, each gradient shaped like its activation.

    Raises:
      SelectionError: If ``at`` selects nothing.
      PzbridgeError: If the metric is not a float scalar or an activation is not a float array.

    Example:
        >>> import jax.numpy as jnp, pzbridge as pzb
        >>> model = pzb.nn.Sequential([pzb.nn.Identity(), pzb.nn.Elementwise(lambda v: 3.0 * v)])
        >>> value, grads = activation_gradients(model, pzb.nn.Identity, lambda y: y.unwrap("f").sum(),
        ...                                     pzb.nx.wrap(jnp.ones(2), "f"))
        >>> float(value), grads["sublayers[0]"].unwrap("f").tolist()
        (6.0, [3.0, 3.0])
    """
    value, grads, _ = _gradient_run(model, at, metric, x, side_inputs)
    if isinstance(at, Where) and at.index:
        return value, {path: at.take(g, path) for path, g in grads.items()}
    return value, grads


def attribution_patching(
    model: Any,
    at: LayerSelector,
    metric: Callable[[Any], Any],
    clean: Any,
    corrupt: Any,
    *,
    keep: Sequence[str] = (),
    **side_inputs: Any,
) -> dict[str, Any]:
    """First-order estimates of the metric change from patching each site's corrupt activation into the clean run.

    For each selected site, ``sum((a_corrupt - a_clean) * dmetric/da)`` with
    the gradient taken on the clean run: one forward pass on ``corrupt``, one
    forward and backward pass on ``clean``, for all sites together. The sum
    runs over every named axis except ``keep`` (so ``keep=("heads",)``
    estimates patching each head separately) and over a ``Where``'s index only.

    Args:
      model: The model (not modified).
      at: Which layers (a ``Where``, selection, class or predicate).
      metric: Maps the model output to a float scalar.
      clean: The input of the run that is patched.
      corrupt: The input whose activations are patched in.
      keep: Named axes kept in the estimates (one estimate per unit along them).
      **side_inputs: Forwarded to both runs.

    Returns:
      ``{path: estimate}``, each a ``NamedArray`` over ``keep`` (0-d without it).

    Raises:
      SelectionError: If ``at`` selects nothing.
      PzbridgeError: If the metric is not a float scalar, or an activation lacks a ``keep`` axis.

    Example:
        >>> import jax.numpy as jnp, pzbridge as pzb
        >>> model = pzb.nn.Sequential([pzb.nn.Identity(), pzb.nn.Elementwise(lambda v: 2.0 * v)])
        >>> clean, corrupt = pzb.nx.wrap(jnp.array([1.0, 1.0]), "f"), pzb.nx.wrap(jnp.array([1.0, 4.0]), "f")
        >>> est = attribution_patching(model, pzb.nn.Identity, lambda y: y.unwrap("f").sum(), clean, corrupt,
        ...                            keep=("f",))
        >>> est["sublayers[0]"].unwrap("f").tolist()
        [0.0, 6.0]
    """
    side = side_of(at, None)
    _, grads, clean_acts = _gradient_run(model, at, metric, clean, side_inputs)
    _, corrupt_acts = capture_intermediates(model, _unindexed(at), corrupt, where=side, **side_inputs)
    keep = tuple(keep)
    estimates: dict[str, Any] = {}
    for path, grad in grads.items():
        product = jax.tree_util.tree_map(lambda c, a, g: (c - a) * g, corrupt_acts[path], clean_acts[path], grad,
                                         is_leaf=nx.is_namedarray)
        if isinstance(at, Where) and at.index:
            mask = at.index_mask(product, path)
            product = jax.tree_util.tree_map(lambda p: nx.where(mask, p, 0.0), product, is_leaf=nx.is_namedarray)
        total = None
        for leaf in jax.tree_util.tree_leaves(product, is_leaf=nx.is_namedarray):
            names = dict(leaf.named_shape)
            missing = [axis for axis in keep if axis not in names]
            if missing:
                raise PzbridgeError(
                    f"attribution_patching: the activation at {path} lacks the keep axes {missing} (it has "
                    f"named axes {names}). Fix: keep only axes the activation has, or select another site."
                )
            summed = leaf.sum(*[axis for axis in names if axis not in keep]) if len(names) > len(keep) else leaf
            if summed.positional_shape:  # Unnamed axes are summed too.
                summed = nx.nmap(jnp.sum)(summed)
            total = summed if total is None else total + summed
        estimates[path] = total
    return estimates
