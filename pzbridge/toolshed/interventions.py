"""Interventions: layers that change an activation, and helpers to put them in a model.

An intervention is an ordinary pzbridge :class:`~pzbridge.nn.layer.Layer`
inserted next to the layer whose output (or input) it changes:

- :class:`ZeroAblation` / :class:`Ablate`: replace the activation by zeros or
  by its mean over some named axes (e.g. the batch), optionally only where a
  named boolean mask is true (one head, some positions);
- :class:`AddVector`: add a (steering) vector, broadcast by name;
- :class:`Patch`: replace the activation by stored values (activation
  patching), optionally only where a mask is true;
- :class:`InterveneWith`: any function of the activation;
- :class:`AtIndex`: runs any of these only at the units a
  :class:`~pzbridge.toolshed.where.Where` index names (``{"heads": 2}``),
  so unit locations need no hand-built masks.

Because interventions are layers, the edited model is still plain data:
selectors see them, ``pzb.lower`` turns each into a small adapter module of
the target framework, and ``jax.jit`` traces them like any other layer.

Data an intervention holds (a vector, patch values, a mask) may be a plain
``NamedArray`` or a variable holding one: ``AddVector(pzb.Parameter(v, "steer"))``
makes a trainable steering vector. A layer reads ``.value`` of a variable,
frozen value or slot, and uses a plain array as is.

Every intervention checks that its data fits the activation *by name*: a
vector or patch with an axis the activation lacks would silently broadcast
the activation to a new shape, so it is an error instead.

:func:`insert_intervention` places a layer at a selection (or a ``Where``) and
:func:`patch_activations` does source-to-target activation patching in one
call. Only core and nn are imported (docs/architecture.md, "Layers of the
package").

Example:
    >>> import jax.numpy as jnp
    >>> import pzbridge as pzb
    >>> model = pzb.nn.Sequential([pzb.nn.Elementwise(jnp.exp), pzb.nn.Elementwise(jnp.negative)])
    >>> ablated = insert_intervention(model, lambda l: l is model.sublayers[0], ZeroAblation())
    >>> ablated(pzb.nx.wrap(jnp.ones(2), "f")).unwrap("f")
    Array([-0., -0.], dtype=float32)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from pzbridge.core import named_axes as nx
from pzbridge.core.errors import NamedAxisError, PzbridgeError, format_path
from pzbridge.core.selectors import KeyPath
from pzbridge.core.struct import pytree_dataclass, static_field
from pzbridge.core.variables import (
    AbstractVariable,
    AbstractVariableSlot,
    AbstractVariableValue,
    stateless_call,
)
from pzbridge.nn.layer import Layer
from pzbridge.toolshed.intermediates import (
    LayerSelector,
    capture_intermediates,
    insert_layers,
    side_of,
)
from pzbridge.toolshed.where import Where

__all__ = [
    "Ablate",
    "AddVector",
    "AtIndex",
    "InterveneWith",
    "Patch",
    "ZeroAblation",
    "insert_intervention",
    "patch_activations",
]

_VARIABLE_FORMS = (AbstractVariable, AbstractVariableValue, AbstractVariableSlot)


def _read(data: Any) -> Any:
    """The array held by ``data``: ``.value`` of a variable / frozen value / slot, else ``data``."""
    return data.value if isinstance(data, _VARIABLE_FORMS) else data


def _require_fits(x: Any, data: Any, role: str, layer: str) -> None:
    """Raises unless every named axis of ``data`` is an axis of ``x`` with the same size."""
    if not nx.is_namedarray(data):
        return
    found = dict(x.named_shape) if nx.is_namedarray(x) else {}
    wanted = dict(data.named_shape)
    bad = {name: size for name, size in wanted.items() if found.get(name) != size}
    if bad:
        raise NamedAxisError(
            f"{layer}: its {role} has named axes {wanted} but the activation has {found} "
            f"(positional shape {getattr(x, 'positional_shape', getattr(x, 'shape', ()))}); the axes {bad} are "
            f"missing or differ in size. Fix: build the {role} with a subset of the activation's axes "
            "(capture one with capture_intermediates to see them), or insert the layer elsewhere."
        )


def _apply_mask(mask: Any, replacement: Any, x: Any, layer: str) -> Any:
    """``replacement`` where ``mask`` is true, ``x`` elsewhere (everywhere without a mask)."""
    if mask is None:
        if nx.is_namedarray(x):
            named = replacement if nx.is_namedarray(replacement) else nx.wrap(jnp.asarray(replacement))
            return named.broadcast_like(x)
        return jnp.broadcast_to(replacement, jnp.shape(x))
    mask = _read(mask)
    _require_fits(x, mask, "mask", layer)
    return nx.where(mask, replacement, x)


@pytree_dataclass
class Ablate(Layer):
    """Replaces the activation by zeros (``mode="zero"``) or by its mean over ``axes`` (``"mean"``).

    Mean ablation averages over the named ``axes`` (typically ``"batch"``)
    and broadcasts the mean back, so every example gets the average
    activation. With a ``mask`` (a boolean ``NamedArray`` on some of the
    activation's axes, or a variable holding one) only the places where it
    is true are ablated.

    Attributes:
      mode: ``"zero"`` or ``"mean"`` (static).
      axes: Named axes averaged over in ``"mean"`` mode (static).
      mask: Optional boolean mask; ``None`` ablates everywhere.

    Example:
        >>> import jax.numpy as jnp
        >>> import pzbridge as pzb
        >>> x = pzb.nx.wrap(jnp.array([[1.0, 2.0], [3.0, 6.0]]), "batch", "features")
        >>> Ablate("mean", axes=("batch",))(x).unwrap("batch", "features").tolist()
        [[2.0, 4.0], [2.0, 4.0]]
    """

    mode: str = static_field(default="zero")
    axes: tuple[str, ...] = static_field(default=())
    mask: Any = None

    def __post_init__(self) -> None:
        axes = (self.axes,) if isinstance(self.axes, str) else tuple(self.axes)
        object.__setattr__(self, "axes", axes)
        if self.mode not in ("zero", "mean"):
            raise PzbridgeError(
                f"Ablate: mode must be 'zero' or 'mean', found {self.mode!r}. Fix: Ablate('zero') or "
                "Ablate('mean', axes=('batch',)); use Patch(values) to set a specific value."
            )
        if self.mode == "mean" and not axes:
            raise PzbridgeError(
                "Ablate('mean') needs the named axes to average over. Fix: Ablate('mean', axes=('batch',))."
            )
        if self.mode == "zero" and axes:
            raise PzbridgeError(
                f"Ablate('zero') takes no axes (found {axes}). Fix: drop axes=..., or use mode='mean'."
            )

    def __call__(self, x: Any, /, **side_inputs: Any) -> Any:
        if self.mode == "zero":
            replacement = nx.zeros_like(x) if nx.is_namedarray(x) else jnp.zeros_like(x)
        else:
            found = dict(x.named_shape) if nx.is_namedarray(x) else {}
            missing = [name for name in self.axes if name not in found]
            if missing:
                raise NamedAxisError(
                    f"Ablate('mean'): the activation lacks axes {missing} to average over (it has named axes "
                    f"{found}). Fix: pass axes that the activation has, e.g. axes=('batch',) on a batched input."
                )
            replacement = x.mean(*self.axes)
        return _apply_mask(self.mask, replacement, x, "Ablate")


@pytree_dataclass
class ZeroAblation(Ablate):
    """Replaces the activation by zeros (where ``mask`` is true, or everywhere).

    The same as ``Ablate("zero", mask=mask)``, under a name that reads well
    in renderings.

    Attributes:
      mask: Optional boolean mask; ``None`` zeroes everything.

    Example:
        >>> import jax.numpy as jnp
        >>> import pzbridge as pzb
        >>> mask = pzb.nx.wrap(jnp.array([True, False]), "features")
        >>> ZeroAblation(mask=mask)(pzb.nx.wrap(jnp.array([5.0, 7.0]), "features")).unwrap("features")
        Array([0., 7.], dtype=float32)
    """

    def __init__(self, mask: Any = None) -> None:
        object.__setattr__(self, "mode", "zero")
        object.__setattr__(self, "axes", ())
        object.__setattr__(self, "mask", mask)


@pytree_dataclass
class AddVector(Layer):
    """Adds ``scale * vector`` to the activation, broadcast by name (activation steering).

    Attributes:
      vector: A ``NamedArray`` whose axes are a subset of the activation's
        (usually just ``features``), or a variable holding one; a
        ``pzb.Parameter`` makes the steering vector trainable.
      scale: A multiplier (static).

    Example:
        >>> import jax.numpy as jnp
        >>> import pzbridge as pzb
        >>> steer = AddVector(pzb.nx.wrap(jnp.array([1.0, -1.0]), "features"), scale=2.0)
        >>> steer(pzb.nx.zeros({"seq": 2, "features": 2})).unwrap("seq", "features").tolist()
        [[2.0, -2.0], [2.0, -2.0]]
    """

    vector: Any
    scale: float = static_field(default=1.0)

    def __call__(self, x: Any, /, **side_inputs: Any) -> Any:
        vector = _read(self.vector)
        _require_fits(x, vector, "vector", "AddVector")
        return x + self.scale * vector


@pytree_dataclass
class Patch(Layer):
    """Replaces the activation by ``values`` (where ``mask`` is true, or everywhere).

    The basis of activation patching: ``values`` is usually an activation
    captured on another input (see :func:`patch_activations`). Its named
    axes must be a subset of the activation's, with equal sizes; missing
    axes broadcast (a single example patched into a whole batch).

    Attributes:
      values: A ``NamedArray`` (or a variable holding one).
      mask: Optional boolean ``NamedArray`` (e.g. over ``seq``) choosing the
        positions to patch; ``None`` patches everything.

    Example:
        >>> import jax.numpy as jnp
        >>> import pzbridge as pzb
        >>> at_first = pzb.nx.wrap(jnp.array([True, False, False]), "seq")
        >>> patch = Patch(pzb.nx.full({"seq": 3}, 9.0), mask=at_first)
        >>> patch(pzb.nx.wrap(jnp.zeros(3), "seq")).unwrap("seq").tolist()
        [9.0, 0.0, 0.0]
    """

    values: Any
    mask: Any = None

    def __call__(self, x: Any, /, **side_inputs: Any) -> Any:
        values = _read(self.values)

        def patch_leaf(v: Any, a: Any) -> Any:
            _require_fits(a, v, "values", "Patch")
            if not nx.is_namedarray(a) and jnp.shape(v) != jnp.shape(a):
                raise NamedAxisError(
                    f"Patch: values of shape {jnp.shape(v)} cannot replace a positional activation of shape "
                    f"{jnp.shape(a)}. Fix: capture the values at the same place on an input of the same shape."
                )
            return _apply_mask(self.mask, v, a, "Patch")

        values_def = jax.tree_util.tree_structure(values, is_leaf=nx.is_namedarray)
        x_def = jax.tree_util.tree_structure(x, is_leaf=nx.is_namedarray)
        if values_def != x_def:
            raise NamedAxisError(
                f"Patch: the values' structure {values_def} differs from the activation's {x_def}. "
                "Fix: capture the values at the same place in the same model."
            )
        return jax.tree_util.tree_map(patch_leaf, values, x, is_leaf=nx.is_namedarray)


@pytree_dataclass
class InterveneWith(Layer):
    """Applies an arbitrary function to the activation.

    Attributes:
      fn: ``fn(x)`` (or ``fn(x, **side_inputs)`` with ``pass_side_inputs``);
        it must return an activation the next layer accepts (static).
      pass_side_inputs: Whether ``fn`` receives the side inputs (static).

    Example:
        >>> import jax.numpy as jnp
        >>> import pzbridge as pzb
        >>> clip = InterveneWith(lambda x: pzb.nx.nmap(jnp.clip)(x, 0.0, 1.0))
        >>> clip(pzb.nx.wrap(jnp.array([-1.0, 0.5, 3.0]), "f")).unwrap("f").tolist()
        [0.0, 0.5, 1.0]
    """

    fn: Callable[..., Any] = static_field()
    pass_side_inputs: bool = static_field(default=False)

    def __call__(self, x: Any, /, **side_inputs: Any) -> Any:
        return self.fn(x, **side_inputs) if self.pass_side_inputs else self.fn(x)


@pytree_dataclass
class AtIndex(Layer):
    """Runs ``intervention`` and keeps its result only at the units ``at.index`` names.

    Elsewhere the activation passes through unchanged (bitwise: a
    ``where`` with a constant mask), so an index that names no unit (e.g.
    ``{"heads": ()}``) is an exact no-op. The mask is built from the
    activation's sizes at call time, so negative positions and slices work
    on any sequence length, and under ``jax.jit`` it is a constant.

    Attributes:
      intervention: Any layer that returns an activation of the input's shape.
      at: The ``Where`` whose ``index`` names the units (static; only the index is used).

    Example:
        >>> import jax.numpy as jnp
        >>> import pzbridge as pzb
        >>> knock = AtIndex(ZeroAblation(), Where(layer="Layer", index={"heads": [0, 2]}))
        >>> knock(pzb.nx.ones({"heads": 3})).unwrap("heads").tolist()
        [0.0, 1.0, 0.0]
    """

    intervention: Layer
    at: Where = static_field()

    def __call__(self, x: Any, /, **side_inputs: Any) -> Any:
        new = self.intervention(x, **side_inputs)
        if not nx.is_namedarray(x):
            raise NamedAxisError(
                f"AtIndex: {self.at.describe()} indexes named axes, but the activation is "
                f"{type(x).__name__} without names. Fix: select a layer whose output (or input) is a NamedArray."
            )
        mask = self.at.index_mask(x, f"AtIndex({type(self.intervention).__name__})")
        if not nx.is_namedarray(new) or dict(new.named_shape) != dict(x.named_shape):
            raise NamedAxisError(
                f"AtIndex: {type(self.intervention).__name__} returned named shape "
                f"{dict(getattr(new, 'named_shape', {}))}, expected the activation's {dict(x.named_shape)}. "
                "Fix: an indexed intervention must keep the activation's shape."
            )
        return nx.where(mask, new, x)


def _indexed(intervention: Layer, selection: LayerSelector) -> Layer:
    """``intervention`` restricted to the ``Where``'s index (itself when there is none)."""
    if isinstance(selection, Where) and selection.index:
        return AtIndex(intervention, selection)
    return intervention


def _unindexed(selection: LayerSelector) -> LayerSelector:
    """The same places without the index (to capture whole activations)."""
    if isinstance(selection, Where) and selection.index:
        return dataclasses.replace(selection, index=())
    return selection


def insert_intervention(
    model: Any, selection: LayerSelector, intervention: Layer, *, where: str | None = None, share_state: bool = False
) -> Any:
    """Returns a copy of ``model`` with ``intervention`` after (or before) every selected layer.

    Args:
      model: The model (not modified).
      selection: Where (a :class:`~pzbridge.toolshed.where.Where`, a
        ``Selection`` of ``model``, a layer class, or a predicate; see
        :func:`~pzbridge.toolshed.intermediates.resolve_selection`). A
        ``Where`` with an ``index`` restricts the intervention to those units
        (an :class:`AtIndex` around it).
      intervention: A layer, e.g. ``ZeroAblation()``; the same layer goes
        to every selected place.
      where: ``"after"`` changes the selected layer's output, ``"before"``
        its input (default: the ``Where``'s side, else ``"after"``).
      share_state: Let the copy keep the model's ``StateVariable`` objects.
        By default it gets fresh copies, so running the edited model (a
        steered decode) never advances the original's KV cache or counters.

    Returns:
      The edited model (list parents get the layer spliced in; other
      places are wrapped in a ``Sequential``).

    Raises:
      PzbridgeError: If ``intervention`` is not a layer.
      SelectionError: If the selection is empty or ``where`` is invalid.

    Example:
        >>> import pzbridge as pzb
        >>> model = pzb.nn.Sequential([pzb.nn.Identity()])
        >>> edited = insert_intervention(model, pzb.nn.Identity, ZeroAblation(), where="before")
        >>> [type(l).__name__ for l in edited.sublayers]
        ['ZeroAblation', 'Identity']
    """
    if not isinstance(intervention, Layer):
        raise PzbridgeError(
            f"insert_intervention: the intervention must be a pzbridge layer, found "
            f"{type(intervention).__name__}. Fix: wrap a function as InterveneWith(fn)."
        )
    placed = _indexed(intervention, selection)
    return insert_layers(model, selection, lambda path, node: placed, where=where, share_state=share_state)


def patch_activations(
    model: Any,
    source_inputs: Any,
    target_inputs: Any,
    *,
    at: LayerSelector,
    mask: Any = None,
    where: str | None = None,
    **side_inputs: Any,
) -> Any:
    """Runs ``model`` on ``target_inputs`` with the activations at ``at`` taken from a run on ``source_inputs``.

    Captures the selected layers' outputs (or inputs, ``where="before"``)
    on the source run, inserts a :class:`Patch` with those values at the same
    places, and runs the patched copy on the target. Both runs are pure:
    ``model`` and its variables are unchanged. Works under ``jax.jit`` with
    a model of frozen values (see
    :func:`~pzbridge.toolshed.intermediates.capture_intermediates`).

    Args:
      model: The model (not modified).
      source_inputs: The input whose activations are patched in.
      target_inputs: The input the patched model runs on (same named shape
        at the patched places).
      at: Which layers (a Where, selection, class or predicate); a Where's index patches only those units.
      mask: Optional boolean ``NamedArray`` choosing which positions to patch.
      where: ``"after"`` or ``"before"`` the selected layers.
      **side_inputs: Forwarded to both runs.

    Returns:
      The output of the patched run on ``target_inputs``.

    Raises:
      SelectionError: If the selection is empty.
      NamedAxisError: If source and target activations do not have the same named shape.

    Example:
        >>> import jax.numpy as jnp
        >>> import pzbridge as pzb
        >>> model = pzb.nn.Sequential([pzb.nn.Elementwise(jnp.square), pzb.nn.Elementwise(jnp.negative)])
        >>> src, tgt = pzb.nx.wrap(jnp.array([3.0]), "f"), pzb.nx.wrap(jnp.array([5.0]), "f")
        >>> patch_activations(model, src, tgt, at=lambda l: l is model.sublayers[0]).unwrap("f")
        Array([-9.], dtype=float32)
    """
    where = side_of(at, where)
    _, captured = capture_intermediates(model, _unindexed(at), source_inputs, where=where, **side_inputs)

    def make_patch(path: KeyPath, node: Any) -> Layer:
        return _indexed(Patch(captured[format_path(path)], mask=mask), at)

    patched = insert_layers(model, at, make_patch, where=where)
    output, _ = stateless_call(patched, (), target_inputs, **side_inputs)
    return output
