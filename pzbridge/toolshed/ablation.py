"""Ablation in one call: zero, mean (over named axes or from a reference batch), resample, head knockout.

An ablation asks "what if this activation carried no information?" and the
answer depends on what replaces it. :func:`ablate` offers the usual choices
and places them with the same location language as every other tool (a
:class:`~pzbridge.toolshed.where.Where`, a selection, a class or a
predicate), so knocking out one head is a ``Where`` index, not a mask built
by hand:

- ``how="zero"``: zeros;
- ``how="mean"``: the mean over named axes ``over`` of the activation
  itself, or, given ``reference`` inputs, the mean of the activations the
  model produces on that reference batch (a fixed vector, the usual "mean
  ablation" of interpretability papers);
- ``how="resample"``: each example gets the activation of a random example
  of the reference batch, drawn with ``key`` (the :class:`Resample` layer).

:func:`knockout_heads` ablates attention heads: by default it finds where
the model has per-head outputs (the output of every ``AttendToValues`` of
pzbridge / Equinox / NNX attention, or, in a traced custom model, the input
of each linear map that contracts ``heads``: the output projection) and
ablates the given heads there.

Reference activations are captured with
:func:`~pzbridge.toolshed.intermediates.capture_intermediates`, so the
model is never modified and no variable is written. Only core and nn are
imported (docs/architecture.md, "Layers of the package").

Example:
    >>> import jax.numpy as jnp
    >>> import pzbridge as pzb
    >>> model = pzb.nn.Sequential([pzb.nn.Elementwise(jnp.square)])
    >>> x = pzb.nx.wrap(jnp.array([[1.0, 2.0], [3.0, 4.0]]), "batch", "f")
    >>> ablate(model, Where(layer="Elementwise", index={"f": 0}), "mean", over="batch")(x).unwrap("batch", "f").tolist()
    [[5.0, 4.0], [5.0, 16.0]]
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import jax

from pzbridge.core import named_axes as nx
from pzbridge.core.errors import (
    NamedAxisError,
    PzbridgeError,
    SelectionError,
    format_path,
)
from pzbridge.core.selectors import KeyPath, select
from pzbridge.core.struct import pytree_dataclass, static_field
from pzbridge.nn.attention import AttendToValues
from pzbridge.nn.layer import Layer
from pzbridge.nn.linear import Linear
from pzbridge.toolshed.intermediates import (
    LayerSelector,
    capture_intermediates,
    insert_layers,
    side_of,
)
from pzbridge.toolshed.interventions import Ablate, AtIndex, Patch, ZeroAblation
from pzbridge.toolshed.where import IndexEntry, Where

__all__ = ["ABLATIONS", "Resample", "ablate", "head_sites", "knockout_heads"]

ABLATIONS = ("zero", "mean", "resample")
"""The values :func:`ablate` accepts for ``how``."""


@pytree_dataclass
class Resample(Layer):
    """Replaces each example's activation by that of a random reference example (resampling ablation).

    For an activation with ``axis`` of size ``n`` it draws ``n`` indices into
    the reference's ``axis`` with ``key`` (uniformly, with replacement) and
    patches in those reference activations. The draw depends only on
    ``key`` and the sizes, so runs are reproducible and ``jax.jit`` gives the
    same draw as eager.

    Attributes:
      values: Reference activations, a ``NamedArray`` with ``axis`` (the
        reference examples) and otherwise a subset of the activation's axes.
      key: A JAX random key.
      axis: The examples axis (static), usually ``"batch"``.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> import pzbridge as pzb
        >>> ref = pzb.nx.wrap(jnp.array([10.0, 20.0]), "batch")
        >>> out = Resample(ref, jax.random.key(0))(pzb.nx.zeros({"batch": 3}))
        >>> set(out.unwrap("batch").tolist()) <= {10.0, 20.0}
        True
    """

    values: Any
    key: Any
    axis: str = static_field(default="batch")

    def __call__(self, x: Any, /, **side_inputs: Any) -> Any:
        for what, value in (("activation", x), ("reference values", self.values)):
            if not nx.is_namedarray(value) or self.axis not in value.named_shape:
                raise NamedAxisError(
                    f"Resample: the {what} must be a NamedArray with the examples axis {self.axis!r}, found "
                    f"{dict(getattr(value, 'named_shape', {}))}. Fix: run on a batch with that axis, or pass "
                    "axis= naming the examples axis."
                )
        count = self.values.named_shape[self.axis]
        draws = jax.random.randint(self.key, (x.named_shape[self.axis],), 0, count)
        drawn = self.values[{self.axis: nx.wrap(draws, self.axis)}]
        return Patch(drawn)(x)


def _over(over: str | Sequence[str] | None, default: tuple[str, ...]) -> tuple[str, ...]:
    if over is None:
        return default
    return (over,) if isinstance(over, str) else tuple(over)


def _reference_values(
    model: Any, at: LayerSelector, where: str, reference: Any, reference_side_inputs: Mapping[str, Any] | None
) -> dict[str, Any]:
    """Whole (unindexed) activations at ``at`` on the reference inputs, keyed by path."""
    whole = dataclasses.replace(at, index=()) if isinstance(at, Where) else at
    _, values = capture_intermediates(model, whole, reference, where=where, **dict(reference_side_inputs or {}))
    for path, value in values.items():
        if not nx.is_namedarray(value):
            raise NamedAxisError(
                f"ablate: the activation at {path} is {type(value).__name__}, expected a NamedArray to take a "
                "reference mean or resample from. Fix: select a layer whose output is one named array."
            )
    return values


def _reference_mean(value: Any, over: tuple[str, ...], path: str) -> Any:
    missing = [name for name in over if name not in value.named_shape]
    if missing:
        raise NamedAxisError(
            f"ablate('mean') at {path}: the reference activation lacks the axes {missing} to average over "
            f"(it has {dict(value.named_shape)}). Fix: pass over= axes it has, e.g. over=('batch',)."
        )
    return value.mean(*over)


def ablate(
    model: Any,
    at: LayerSelector,
    how: str = "zero",
    *,
    over: str | Sequence[str] | None = None,
    reference: Any = None,
    key: Any = None,
    where: str | None = None,
    reference_side_inputs: Mapping[str, Any] | None = None,
) -> Any:
    """Returns a copy of ``model`` whose activations at ``at`` are ablated.

    Args:
      model: The model (not modified).
      at: Where (a ``Where``, whose ``index`` limits the ablation to those
        units, a selection, a class or a predicate).
      how: ``"zero"``, ``"mean"`` or ``"resample"``.
      over: Named axes averaged over for ``"mean"`` (required without
        ``reference``; default ``("batch",)`` with it), or the examples
        axis for ``"resample"`` (default ``"batch"``).
      reference: Inputs of a reference run: ``"mean"`` then uses the mean of
        its activations over ``over``, ``"resample"`` draws from them.
      key: A JAX random key, required for ``"resample"``.
      where: ``"after"`` (the output) or ``"before"`` (the input); default:
        the ``Where``'s side, else ``"after"``.
      reference_side_inputs: Side inputs of the reference run.

    Returns:
      The ablated model (run it like the original).

    Raises:
      PzbridgeError: For an unknown ``how`` or a missing ``over`` / ``reference`` / ``key``.
      SelectionError: If ``at`` selects nothing.
      NamedAxisError: If the reference activations lack the ``over`` axes.

    Example:
        >>> import jax.numpy as jnp
        >>> import pzbridge as pzb
        >>> model = pzb.nn.Sequential([pzb.nn.Identity(), pzb.nn.Elementwise(jnp.negative)])
        >>> ref = pzb.nx.wrap(jnp.array([[2.0], [4.0]]), "batch", "f")
        >>> ablate(model, pzb.nn.Identity, "mean", reference=ref)(pzb.nx.zeros({"batch": 1, "f": 1})).unwrap("batch", "f")
        Array([[-3.]], dtype=float32)
    """
    if how not in ABLATIONS:
        raise PzbridgeError(
            f"ablate: how must be one of {ABLATIONS}, found {how!r}. Fix: ablate(model, at, 'zero'), "
            "'mean' (with over= or reference=) or 'resample' (with reference= and key=)."
        )
    side = side_of(at, where)
    index = at if isinstance(at, Where) and at.index else None
    return _ablate(model, at, side, index, how, over, reference, key, reference_side_inputs)


def _ablate(
    model: Any,
    at: LayerSelector,
    side: str,
    index: Where | None,
    how: str,
    over: str | Sequence[str] | None,
    reference: Any,
    key: Any,
    reference_side_inputs: Mapping[str, Any] | None,
) -> Any:
    """:func:`ablate` with the side and the index (a ``Where`` or None) already resolved."""

    def placed(layer: Layer) -> Layer:
        return AtIndex(layer, index) if index is not None else layer

    if how == "zero":
        layer = placed(ZeroAblation())
        return insert_layers(model, at, lambda path, node: layer, where=side)
    if how == "mean" and reference is None:
        axes = _over(over, ())
        if not axes:
            raise PzbridgeError(
                "ablate('mean') without reference= needs over=, the named axes to average over. Fix: "
                "ablate(model, at, 'mean', over=('batch',)), or pass reference= inputs to average their activations."
            )
        layer = placed(Ablate("mean", axes=axes))
        return insert_layers(model, at, lambda path, node: layer, where=side)
    if reference is None:
        raise PzbridgeError(
            f"ablate({how!r}) needs reference= inputs to draw activations from, found none. Fix: pass a "
            "reference batch, e.g. ablate(model, at, 'resample', reference=xs, key=jax.random.key(0))."
        )
    values = _reference_values(model, at, side, reference, reference_side_inputs)
    if how == "mean":
        axes = _over(over, ("batch",))
        means = {path: _reference_mean(value, axes, path) for path, value in values.items()}

        def make_mean(path: KeyPath, node: Any) -> Layer:
            return placed(Patch(means[format_path(path)]))

        return insert_layers(model, at, make_mean, where=side)
    if key is None:
        raise PzbridgeError(
            "ablate('resample') needs key=, the random key that draws reference examples. Fix: pass "
            "key=jax.random.key(0)."
        )
    axes = _over(over, ("batch",))
    if len(axes) != 1:
        raise PzbridgeError(
            f"ablate('resample'): over= names the one examples axis to draw along, found {axes}. Fix: e.g. "
            "over='batch'."
        )
    axis = axes[0]
    keys = dict(zip(values, jax.random.split(key, len(values))))

    def make_resample(path: KeyPath, node: Any) -> Layer:
        text = format_path(path)
        return placed(Resample(values[text], keys[text], axis))

    return insert_layers(model, at, make_resample, where=side)


def head_sites(model: Any, axis: str = "heads") -> list[Where]:
    """The places where ``model`` has per-head outputs, as ``Where`` values (without an index).

    The output of every ``AttendToValues`` (pzbridge attention and lifted
    Equinox / NNX attention), else the input of every ``Linear`` that
    contracts ``axis`` (the output projection of a traced custom attention;
    one ``Where`` per weight label).

    Raises:
      SelectionError: If the model has neither.

    Example:
        >>> import jax
        >>> import pzbridge as pzb
        >>> attn = pzb.nn.Attention.from_config("a", jax.random.key(0), d_model=4, num_heads=2, qk_size=2)
        >>> head_sites(attn)
        [Where(layer='AttendToValues', path='', label='', module='', side='after', index=())]
    """
    if not select(model).at_instances_of(AttendToValues).is_empty():
        return [Where(layer="AttendToValues")]
    outputs = select(model).at_subtrees_where(lambda n: isinstance(n, Linear) and axis in n.in_axis_names)
    labels = [getattr(layer.weights, "label", None) for layer in outputs.get_sequence()]
    if outputs.is_empty() or not all(isinstance(label, str) for label in labels):
        raise SelectionError(
            f"knockout_heads: found no per-head outputs in this model: expected an AttendToValues layer or a "
            f"Linear contracting {axis!r} (with a labelled weight), found {len(labels)} such Linear layers. "
            "Fix: pass at=Where(...) naming the layer whose output (or input) carries the heads axis, or "
            "axis= if the heads axis has another name."
        )
    return [Where(label=label, side="before") for label in dict.fromkeys(labels)]


def knockout_heads(
    model: Any,
    heads: IndexEntry | Sequence[int],
    *,
    at: Where | None = None,
    how: str = "zero",
    axis: str = "heads",
    over: str | Sequence[str] | None = None,
    reference: Any = None,
    key: Any = None,
    reference_side_inputs: Mapping[str, Any] | None = None,
) -> Any:
    """Returns a copy of ``model`` with attention heads ``heads`` ablated (zero by default).

    Args:
      model: The model (not modified).
      heads: A head, several (``[0, 2]``) or a ``slice``, on ``axis``.
      at: Where the per-head outputs are (default: :func:`head_sites`, every
        attention layer of the model); it must not index ``axis`` itself.
      how: ``"zero"``, ``"mean"`` or ``"resample"`` (see :func:`ablate`).
      axis: The heads axis name.
      over, reference, key, reference_side_inputs: As for :func:`ablate`.

    Returns:
      The edited model.

    Raises:
      PzbridgeError: If ``at`` already indexes ``axis``.
      SelectionError: If no per-head outputs are found.

    Example:
        >>> import jax
        >>> import pzbridge as pzb
        >>> attn = pzb.nn.Attention.from_config("a", jax.random.key(0), d_model=4, num_heads=2, qk_size=2)
        >>> x = pzb.nx.ones({"seq": 3, "features": 4})
        >>> knocked = knockout_heads(attn, [0, 1])
        >>> float(abs(knocked(x).unwrap("seq", "features")).max())
        0.0
    """
    if how not in ABLATIONS:
        raise PzbridgeError(f"knockout_heads: how must be one of {ABLATIONS}, found {how!r}. Fix: how='zero'.")
    if at is not None:
        if any(name == axis for name, _ in at.index):
            raise PzbridgeError(
                f"knockout_heads: {at.describe()} already indexes {axis!r}. Fix: pass the heads as heads= and "
                "leave them out of at.index."
            )
        indexed = dataclasses.replace(at, index=at.index + ((axis, heads),))
        return ablate(model, indexed, how, over=over, reference=reference, key=key,
                      reference_side_inputs=reference_side_inputs)
    sites = head_sites(model, axis)
    # One selection of every site, so references are captured once on the unedited model.
    union = select(model).at_subtrees_where(lambda path, node: any(s.matches(path, node) for s in sites),
                                            with_keypath=True)
    index = Where(layer="Layer", index=((axis, heads),))
    return _ablate(model, union, sites[0].side, index, how, over, reference, key, reference_side_inputs)
