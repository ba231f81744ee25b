"""Low-rank adapters (LoRA) on lifted models: add them, run them, fold them back.

LoRA is an *edit*: a selected ``Linear`` (or single-weight ``NamedEinsum``)
is wrapped in a :class:`LowRankAdapter` that keeps the original layer as its
``base`` and adds ``scale * (x @ A) @ B``. Because the base layer is kept
untouched inside the adapter, the base weights stay the very same
``Parameter`` objects (and buffers), lowering can recognise the base layer
and produce the target framework's native LoRA class, and :func:`merge_lora`
can put a plain layer back with the original storage layout.

Axis layout: ``A`` holds the base's input axes (in the weight's storage order)
then ``lora_rank``; ``B`` holds ``lora_rank`` then every other weight axis
(output and parallel axes, again in storage order). These are the layouts of
``nnx.LoRA`` (``(in, rank)`` and ``(rank, out)``), so lowering to NNX needs no
transpose. ``B`` starts at zero, so an adapted model computes exactly what the
original computed until it is trained.

Sharing: one base weight ``Parameter`` gets one adapter pair, wherever it is
used, and merging a shared base gives one shared merged ``Parameter``; a base
weight also read outside the adapters (a tie) is split only when asked
(``merge_lora(model, untie=True)``).

This module imports only ``core`` and ``nn``; framework lowering rules live in
:mod:`pzbridge.bridge.equinox.lora` and :mod:`pzbridge.bridge.nnx.lora`. See
docs/architecture.md ("Lowering edited models") for how a lowered adapter
trains with the framework's own tools.

Example:
    >>> import jax, jax.numpy as jnp
    >>> import pzbridge as pzb
    >>> from pzbridge.nn.linear import Linear
    >>> model = pzb.nn.Sequential([Linear.from_config("dense", jax.random.key(0), {"features": 3}, {"features": 2})])
    >>> adapted = loraify_linears_in_selection(pzb.select(model).at_instances_of(Linear), 2, jax.random.key(1))
    >>> [v.label for v in pzb.unbind_params(adapted)[1]]
    ['dense.weights', 'dense.lora_a', 'dense.lora_b']
    >>> x = pzb.nx.wrap(jnp.ones((4, 3)), "batch", "features")
    >>> bool(jnp.allclose(adapted(x).unwrap("batch", "features"), model(x).unwrap("batch", "features")))
    True
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

from pzbridge.core import named_axes as nx
from pzbridge.core.errors import SelectionError, VariableError, format_path
from pzbridge.core.selectors import Selection, select
from pzbridge.core.struct import pytree_dataclass, static_field
from pzbridge.core.variables import Parameter, ParameterSlot, ParameterValue
from pzbridge.nn.basic import NamedEinsum
from pzbridge.nn.combinators import Sequential
from pzbridge.nn.contraction import contract
from pzbridge.nn.initializers import key_for_label, variance_scaling
from pzbridge.nn.layer import Layer
from pzbridge.nn.layer_stack import STACK_AXIS
from pzbridge.nn.linear import Linear, weight_output_name

RANK_AXIS = "lora_rank"
"""The default name of the low-rank axis shared by ``A`` and ``B``."""


def _weight_of(base: Linear | NamedEinsum, where: str) -> Any:
    if isinstance(base, Linear):
        return base.weights
    if isinstance(base, NamedEinsum):
        if len(base.weights) != 1:
            raise SelectionError(
                f"{where}: LoRA needs a NamedEinsum with exactly one weight, found {len(base.weights)} "
                f"(labels {[getattr(w, 'label', '?') for w in base.weights]}). Fix: select only single-weight "
                "einsums, or adapt the individual weights' layers."
            )
        return base.weights[0]
    raise SelectionError(
        f"{where}: LoRA applies to pzb.nn.Linear or pzb.nn.NamedEinsum, found {type(base).__name__}. "
        "Fix: narrow the selection, e.g. pzb.select(model).at_instances_of(pzb.nn.Linear)."
    )


def _input_axes(base: Linear | NamedEinsum) -> tuple[str, ...]:
    return base.in_axis_names if isinstance(base, Linear) else base.contract_axes


def _output_rename(base: Linear | NamedEinsum) -> dict[str, str]:
    if isinstance(base, Linear):
        return {weight_output_name(n, base.in_axis_names): n for n in base.out_axis_names}
    return dict(base.rename)


def _named_value(weight: Any, where: str) -> nx.NamedArrayBase:
    try:
        value = weight.value
    except VariableError:
        raise VariableError(
            f"{where}: the base weight {weight.label!r} is an unbound slot, so its axis sizes are unknown. "
            "Fix: bind the model's variables first (pzb.bind_variables) and then add LoRA."
        ) from None
    if not nx.is_namedarray(value) or value.positional_shape:
        raise VariableError(
            f"{where}: the base weight {getattr(weight, 'label', '?')!r} must hold a fully named array, found "
            f"{type(value).__name__} with shape {getattr(value, 'shape', '?')}. Fix: adapt only layers whose "
            "weights were lifted with named axes."
        )
    return value


@pytree_dataclass
class LowRankAdapter(Layer):
    """A ``Linear`` / ``NamedEinsum`` plus a trainable low-rank update.

    Computes ``base(x) + (alpha / rank) * contract(contract(x, A), B)``:
    ``A`` contracts the base's input axes into ``lora_rank``, ``B`` maps
    ``lora_rank`` to the base's output (and parallel) axes. Any other axis of
    the input passes through, as for the base layer.

    Attributes:
      base: The original layer, unchanged (its weights are the same objects).
      lora_a: A ``Parameter`` over the input axes and ``rank_axis``.
      lora_b: A ``Parameter`` over ``rank_axis`` and the other weight axes.
      alpha: The LoRA scaling numerator (static); the update is scaled by
        ``alpha / rank``.
      rank_axis: The name of the low-rank axis (static).

    Example:
        >>> import jax, jax.numpy as jnp
        >>> import pzbridge as pzb
        >>> lin = Linear(pzb.Parameter(pzb.nx.wrap(jnp.eye(2), "features", "features_out"), "w"),
        ...              ("features",), ("features",))
        >>> a = pzb.Parameter(pzb.nx.wrap(jnp.ones((2, 1)), "features", "lora_rank"), "a")
        >>> b = pzb.Parameter(pzb.nx.wrap(jnp.ones((1, 2)), "lora_rank", "features_out"), "b")
        >>> LowRankAdapter(lin, a, b, alpha=1.0)(pzb.nx.wrap(jnp.array([1.0, 2.0]), "features")).unwrap("features")
        Array([4., 5.], dtype=float32)
    """

    base: Any
    lora_a: Any
    lora_b: Any
    alpha: float = static_field(default=1.0)
    rank_axis: str = static_field(default=RANK_AXIS)

    @property
    def rank(self) -> int:
        """The size of the low-rank axis (read from ``lora_a``)."""
        return int(self.lora_a.value.named_shape[self.rank_axis])

    @property
    def scale(self) -> float:
        """``alpha / rank``, the factor applied to the low-rank update."""
        return float(self.alpha) / self.rank

    def __call__(self, x: nx.NamedArrayBase, /, **side_inputs: Any) -> nx.NamedArrayBase:
        y = self.base(x, **side_inputs)
        return y + self.update(x)

    def update(self, x: nx.NamedArrayBase) -> nx.NamedArrayBase:
        """The low-rank term alone, ``(alpha / rank) * contract(contract(x, A), B)``.

        Bridges use it where the framework's LoRA layer adds the update after
        the base layer's bias (``nnx.LoRALinear``), to compute in that order.

        Example:
            >>> import jax.numpy as jnp, pzbridge as pzb
            >>> lin = Linear(pzb.Parameter(pzb.nx.wrap(jnp.eye(2), "features", "features_out"), "w"),
            ...              ("features",), ("features",))
            >>> a = pzb.Parameter(pzb.nx.wrap(jnp.ones((2, 1)), "features", "lora_rank"), "a")
            >>> b = pzb.Parameter(pzb.nx.wrap(jnp.ones((1, 2)), "lora_rank", "features_out"), "b")
            >>> x = pzb.nx.wrap(jnp.array([1.0, 2.0]), "features")
            >>> LowRankAdapter(lin, a, b, alpha=1.0).update(x).unwrap("features")
            Array([3., 3.], dtype=float32)
        """
        hidden = contract([x, self.lora_a.value], _input_axes(self.base))
        update = contract([hidden, self.lora_b.value], (self.rank_axis,), _output_rename(self.base))
        scale = self.scale
        if scale != 1.0:
            update = update * jnp.asarray(scale, update.dtype)
        return update

    def merged(self) -> nx.NamedArray:
        """The base weight plus ``scale * A @ B``, in the base weight's storage order.

        Example:
            >>> import jax.numpy as jnp, pzbridge as pzb
            >>> lin = Linear(pzb.Parameter(pzb.nx.wrap(jnp.zeros((2, 2)), "features", "features_out"), "w"),
            ...              ("features",), ("features",))
            >>> a = pzb.Parameter(pzb.nx.wrap(jnp.ones((2, 1)), "features", "lora_rank"), "a")
            >>> b = pzb.Parameter(pzb.nx.wrap(jnp.ones((1, 2)), "lora_rank", "features_out"), "b")
            >>> LowRankAdapter(lin, a, b, alpha=2.0).merged().unwrap("features", "features_out")
            Array([[2., 2.],
                   [2., 2.]], dtype=float32)
        """
        weight = _weight_of(self.base, "merge_lora")
        value = _named_value(weight, "merge_lora")
        order = tuple(value.named_shape)
        product = contract([self.lora_a.value, self.lora_b.value], (self.rank_axis,)).order_as(*order)
        data = value.order_as(*order).data_array
        return nx.wrap(data + (product.data_array * self.scale).astype(data.dtype), *order)


_WEIGHT_NAMES = ("weight", "weights", "kernel", "embedding", "embeddings", "w")


def _adapter_label(weight_label: str, part: str) -> str:
    """``blocks.0.query.kernel`` -> ``blocks.0.query.lora_a``; a raw weight keeps its name: ``attn.W_Q.lora_a``.

    Only a layer's conventional weight name is replaced, so two raw arrays of
    one module (``W_Q``, ``W_K``) get distinct adapter labels.
    """
    prefix, _, last = weight_label.rpartition(".")
    if last in _WEIGHT_NAMES:
        return f"{prefix}.{part}" if prefix else part
    return f"{weight_label}.{part}"


def _check_fits(
    weight: Any, value: nx.NamedArrayBase, rank: int, a_shape: dict[str, int], b_shape: dict[str, int],
    rank_axis: str, stacked: dict[str, int], where: str,
) -> None:
    """A float weight, and a rank no larger than both of the layer's sides.

    A rank between the smaller and the larger side is accepted: the update
    is then over-parameterised (``A @ B`` has rank at most the smaller side)
    but exact, which happens when one rank is applied to every layer of a
    model with a narrow head. A rank above both sides can only be a mistake.
    """
    if not jnp.issubdtype(value.dtype, jnp.inexact):
        raise SelectionError(
            f"{where}: LoRA trains a low-rank update of the weight {weight.label!r}, expected a floating-point "
            f"dtype, found {value.dtype}. Fix: exclude this layer from the selection, or store the weight as "
            "float (e.g. a Parameter holding value.astype(jnp.float32))."
        )
    n_in = math.prod(s for n, s in a_shape.items() if n != rank_axis and n not in stacked)
    n_out = math.prod(s for n, s in b_shape.items() if n != rank_axis and n not in stacked)
    if rank > max(n_in, n_out):
        raise SelectionError(
            f"{where}: LoRA rank {rank} is larger than the layer's dimensions (input {n_in}, output {n_out}) of "
            f"{weight.label!r}: expected rank <= {max(n_in, n_out)}, found {rank}. Fix: pass a rank well below "
            f"the layer's sizes (at most {min(n_in, n_out)} adds rank), or narrow the selection to larger layers."
        )


def _check_arguments(rank: Any, init_base_rng: Any) -> int:
    """The rank as an int; raises for a rank that is not a positive int or a key that is not a key."""
    if isinstance(rank, bool) or not isinstance(rank, numbers.Integral) or rank < 1:
        raise SelectionError(
            f"loraify_linears_in_selection: rank must be a positive int, expected an int >= 1, found "
            f"{type(rank).__name__} {rank!r}. Fix: pass e.g. rank=8 (an int no larger than the layers' sizes)."
        )
    if init_base_rng is None or _is_key(init_base_rng):
        return int(rank)
    raise SelectionError(
        f"loraify_linears_in_selection: init_base_rng expected a JAX PRNG key or None, found "
        f"{type(init_base_rng).__name__} {init_base_rng!r:.40}. Fix: pass jax.random.key(seed) "
        "(or None for unbound ParameterSlots)."
    )


def _is_key(value: Any) -> bool:
    """A typed key (``jax.random.key``) or a raw ``uint32[2]`` one (``jax.random.PRNGKey``)."""
    dtype = getattr(value, "dtype", None)
    if not isinstance(value, jax.Array) or dtype is None:
        return False
    if jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
        return True
    return dtype == jnp.uint32 and tuple(value.shape) == (2,)


def _make_adapter_params(
    base: Linear | NamedEinsum, rank: int, init_base_rng: jax.Array | None, rank_axis: str, where: str,
    stack_axes: Sequence[str] = (),
) -> tuple[Any, Any]:
    weight = _weight_of(base, where)
    value = _named_value(weight, where)
    inputs = _input_axes(base)
    shape = dict(value.named_shape)
    missing = [name for name in inputs if name not in shape]
    if missing:
        raise SelectionError(
            f"{where}: the weight {weight.label!r} has axes {shape} but the layer contracts {list(inputs)}; "
            f"{missing} are not in the weight. Fix: adapt only layers whose weight holds every contracted axis."
        )
    if rank_axis in shape:
        raise SelectionError(
            f"{where}: the weight {weight.label!r} already has an axis named {rank_axis!r}. "
            "Fix: pass rank_axis=... with an unused name."
        )
    # Each entry of a stack axis (a layer stack's ``layers``) is its own layer: both factors carry it.
    stacked = {n: s for n, s in shape.items() if n in stack_axes and n not in inputs}
    a_shape = {**stacked, **{n: s for n, s in shape.items() if n in inputs}, rank_axis: rank}
    b_shape = {rank_axis: rank, **{n: s for n, s in shape.items() if n not in inputs}}
    _check_fits(weight, value, rank, a_shape, b_shape, rank_axis, stacked, where)
    a_label, b_label = _adapter_label(weight.label, "lora_a"), _adapter_label(weight.label, "lora_b")
    dtype = value.dtype
    if init_base_rng is None:
        return ParameterSlot(a_label), ParameterSlot(b_label)
    a = Parameter(variance_scaling(key_for_label(init_base_rng, a_label), a_shape, inputs, dtype), a_label)
    b = Parameter(nx.wrap(jnp.zeros(tuple(b_shape.values()), dtype), *b_shape), b_label)
    return a, b


def loraify_linears_in_selection(
    selection: Selection,
    rank: int,
    init_base_rng: jax.Array | None,
    alpha: float | None = None,
    rank_axis: str = RANK_AXIS,
    stack_axes: Sequence[str] = (STACK_AXIS,),
) -> Any:
    """Wraps every selected ``Linear`` / ``NamedEinsum`` in a :class:`LowRankAdapter`.

    ``A`` is initialised with LeCun-normal noise from a key derived from
    ``init_base_rng`` and the label (so the result does not depend on
    traversal order); ``B`` is zero, so the edited model computes exactly
    what the original did. A base weight shared by several layers gets one
    adapter pair shared by all of them. Labels are the base weight's label
    with its last component, when that is a layer's weight name (``weight``,
    ``kernel`` ...), replaced by ``lora_a`` / ``lora_b``
    (``blocks.0.attn.query.kernel`` -> ``blocks.0.attn.query.lora_a``), else
    extended (a raw array ``attn.W_Q`` -> ``attn.W_Q.lora_a``).

    Args:
      selection: A selection (``pzb.select(model).at_instances_of(pzb.nn.Linear)``)
        whose selected nodes are ``Linear`` or single-weight ``NamedEinsum`` layers.
      rank: The size of the low-rank axis: an int from 1 to the larger of each
        selected layer's input and output sizes (above the smaller one the
        update gains parameters but no rank).
      init_base_rng: Base key for ``A``; ``None`` gives ``ParameterSlot`` placeholders.
      alpha: Scaling numerator; the update is scaled by ``alpha / rank``.
        Defaults to ``rank`` (scale 1, the convention of ``nnx.LoRA``).
      rank_axis: Name of the low-rank axis.
      stack_axes: Weight axes that index separate layers (the ``layers`` axis
        of a :class:`~pzbridge.nn.LayerStack`): ``A`` and ``B`` both carry
        them, so every layer of a stack gets its own adapter. Other axes of the
        weight that the layer does not contract (``heads``) are carried by
        ``B`` only.

    Returns:
      The edited model (the selection's tree with adapters in place).

    Raises:
      SelectionError: If a selected node is not an adaptable layer or has a
        non-float weight, ``rank`` is not an int in ``[1, max(input size,
        output size)]`` of every selected layer, or ``init_base_rng`` is not a
        key (nor None).
      VariableError: If a base weight is an unbound slot or not a named array.

    Example:
        >>> import jax, pzbridge as pzb
        >>> from pzbridge.nn.linear import Linear
        >>> lin = Linear.from_config("q", jax.random.key(0), {"features": 4}, {"heads": 2, "projection": 3})
        >>> adapted = loraify_linears_in_selection(pzb.select([lin, lin]).at_instances_of(Linear), 2, jax.random.key(1))
        >>> adapted[0].lora_a is adapted[1].lora_a, dict(adapted[0].lora_b.value.named_shape)
        (True, {'lora_rank': 2, 'heads': 2, 'projection': 3})
    """
    rank = _check_arguments(rank, init_base_rng)
    pairs: dict[int, tuple[Any, Any]] = {}
    keep_alive: list[Any] = []

    def adapt(path: tuple, layer: Any) -> LowRankAdapter:
        where = _path_text(path)
        weight = _weight_of(layer, where)
        key = id(weight)
        if key not in pairs:
            pairs[key] = _make_adapter_params(layer, rank, init_base_rng, rank_axis, where, tuple(stack_axes))
            keep_alive.append(weight)
        a, b = pairs[key]
        return LowRankAdapter(layer, a, b, alpha=float(rank if alpha is None else alpha), rank_axis=rank_axis)

    return selection.apply(adapt, with_keypath=True)


def _path_text(path: tuple) -> str:
    return format_path(path)


def merge_lora(model: Any, *, untie: bool = False) -> Any:
    """Folds every :class:`LowRankAdapter` back into its base layer.

    Each adapter is replaced by its base layer whose weight is a new
    ``Parameter`` (same label and metadata as the base weight) holding
    ``W + scale * A @ B`` in the base weight's storage axis order, so
    lowering gives the original framework class and layout. Adapters that
    share a base weight get one shared merged ``Parameter``.

    A base weight that the model also reads outside the adapters (a tied
    embedding table whose output use was adapted, a traced weight used once
    as a ``Linear`` and once in other glue) cannot hold the merged value for
    every use: by default that is an error; ``untie=True`` gives the adapted
    uses their own merged ``Parameter`` labelled ``<label>.merged`` while the
    other uses keep the base weight (the model then lowers to an adapter
    module, or raises where the framework class must keep the tie).

    Args:
      model: Any lifted model (adapters may be nested anywhere).
      untie: Split a tied base weight instead of raising.

    Returns:
      The model without adapters; the input model is not changed.

    Raises:
      VariableError: If an adapter's variables are unbound slots, or a base
        weight is also read outside the adapters and ``untie`` is False.

    Example:
        >>> import jax, pzbridge as pzb
        >>> from pzbridge.nn.linear import Linear
        >>> lin = Linear.from_config("d", jax.random.key(0), {"features": 2}, {"features": 2})
        >>> adapted = loraify_linears_in_selection(pzb.select(lin).at_instances_of(Linear), 1, jax.random.key(1))
        >>> merged = merge_lora(adapted)
        >>> type(merged).__name__, merged.weights.label, bool((merged.weights.value.data_array == lin.weights.value.data_array).all())
        ('Linear', 'd.weights', True)
    """
    merged_params: dict[int, Parameter] = {}
    keep_alive: list[Any] = []
    tied = _reads_outside_adapters(model)

    def fold(adapter: LowRankAdapter) -> Any:
        base = adapter.base
        weight = _weight_of(base, "merge_lora")
        key = id(weight)
        if key not in merged_params:
            label = weight.label
            if key in tied:
                if not untie:
                    raise VariableError(
                        f"merge_lora: the base weight {label!r} is adapted at some uses but also read without "
                        f"an adapter at {tied[key]}: expected every use to be adapted, found "
                        f"{len(tied[key])} plain use(s), so no single merged weight computes what the adapted "
                        "model does. Fix: merge_lora(model, untie=True) gives the adapted uses their own "
                        f"weight {label + '.merged'!r}, or adapt every use of the weight."
                    )
                label = f"{label}.merged"
            metadata = getattr(weight, "metadata", None)
            merged_params[key] = Parameter(adapter.merged(), label, dict(metadata or {}))
            keep_alive.append(weight)
        new_weight = merged_params[key]
        if isinstance(base, Linear):
            return dataclasses.replace(base, weights=new_weight)
        return dataclasses.replace(base, weights=(new_weight,))

    return select(model).at_instances_of(LowRankAdapter).apply(fold)


def _reads_outside_adapters(model: Any) -> dict[int, list[str]]:
    """For each ``Parameter`` read somewhere other than an adapter's base layer: the paths of those reads."""
    outside = select(model).at_instances_of(LowRankAdapter).apply(lambda adapter: None)
    reads: dict[int, list[str]] = {}
    for path, variable in select(outside).at_instances_of(Parameter).get_by_path().items():
        reads.setdefault(id(variable), []).append(format_path(path))
    return reads


def split_adapter(layer: Any) -> tuple[LowRankAdapter, Any] | None:
    """Splits a lifted linear group whose first layer is a LoRA adapter into (adapter, group without it).

    Bridges use it to lower ``Group([LowRankAdapter(base), AddBias])`` (or a
    bare adapter) by lowering ``Group([base, AddBias])`` and wrapping the result.

    Args:
      layer: A ``Sequential`` group or a single layer.

    Returns:
      ``(adapter, layer_with_base)``, or None when there is no adapter in front.

    Example:
        >>> lin = Linear.from_config("l", jax.random.key(0), {"f": 2}, {"g": 3})
        >>> split_adapter(lin) is None
        True
    """
    sublayers = layer.sublayers if isinstance(layer, Sequential) else [layer]
    if not sublayers or not isinstance(sublayers[0], LowRankAdapter):
        return None
    adapter = sublayers[0]
    if isinstance(layer, Sequential):
        return adapter, dataclasses.replace(layer, sublayers=[adapter.base, *sublayers[1:]])
    return adapter, adapter.base


def is_lora_parameter(variable: Any) -> bool:
    """True for a variable created by :func:`loraify_linears_in_selection` (label ends in ``.lora_a``/``.lora_b``).

    Useful as a predicate for training only the adapters
    (``pzb.unbind_variables(model, is_lora_parameter)``). A frozen value of
    such a parameter (what an Equinox adapter module holds) counts too.

    Example:
        >>> is_lora_parameter(Parameter(1.0, "q.lora_a")), is_lora_parameter(Parameter(1.0, "q.kernel"))
        (True, False)
        >>> is_lora_parameter(Parameter(1.0, "q.lora_b").freeze())
        True
    """
    label = getattr(variable, "label", "")
    return isinstance(variable, (Parameter, ParameterValue)) and (
        label.endswith(".lora_a") or label.endswith(".lora_b") or label in ("lora_a", "lora_b")
    )
