"""The ``Attention`` combinator and the two contractions inside it.

Why attention is a combinator: every step of dot-product attention is an
ordinary layer held in a named field, so a user can select and edit any one
of them (patch the queries, ablate a head in the weights, swap the mask,
capture the attention weights) without touching the others::

    queries = input_to_query(x)        # e.g. Linear(features -> heads, projection), RoPE, 1/sqrt(d)
    keys    = input_to_key(x)          # ..., then RenameAxes(seq -> kv_seq)
    values  = input_to_value(x)        # ..., then RenameAxes(seq -> kv_seq)
    logits  = query_key_to_logits((queries, keys))   # AttentionLogits: sum over projection
    logits  = mask(logits)                           # ApplyCausalMask, ... or Identity
    weights = logits_to_weights(logits)              # Softmax over kv_seq
    output  = attn_value_to_output((weights, values))  # AttendToValues, then the output Linear

Grouped-query attention (GQA): queries carry ``heads`` (size ``H``) while
keys and values carry ``kv_heads`` (size ``H_kv`` dividing ``H``); query head
``h`` uses key/value head ``h // (H / H_kv)``, as in Flax NNX and
``jnp.repeat``. The contractions split the query-side ``heads`` axis of the
*activation* by a free reshape (never the stored weights, so lifted buffers
stay untouched), contract, and merge it back, so logits and outputs always
carry ``heads``. Keys and values are never repeated in memory. With the same
name on both sides (``kv_heads_axis == heads_axis``) this is plain
multi-head attention.

Each contraction is one ``einsum`` on the raw data (see
:mod:`pzbridge.nn.contraction`). See docs/architecture.md ("Framework
behaviours the bridges respect") for how the two frameworks' attentions differ.

Example:
    >>> import jax, jax.numpy as jnp
    >>> import pzbridge as pzb
    >>> attn = Attention.from_config("attn", jax.random.key(0), d_model=8, num_heads=2, qk_size=4)
    >>> y = attn(pzb.nx.ones({"batch": 2, "seq": 3, "features": 8}))
    >>> sorted(y.named_shape.items())
    [('batch', 2), ('features', 8), ('seq', 3)]
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp

from pzbridge.core import named_axes as nx
from pzbridge.core.errors import NamedAxisError
from pzbridge.core.named_axes_core import make_named
from pzbridge.core.struct import pytree_dataclass, static_field
from pzbridge.nn.basic import ConstantRescale, RenameAxes, Softmax
from pzbridge.nn.combinators import Identity, Sequential
from pzbridge.nn.contraction import contract, data_layout
from pzbridge.nn.layer import Layer
from pzbridge.nn.linear import Affine, Linear
from pzbridge.nn.masks import ApplyCausalMask
from pzbridge.nn.rope import ApplyRoPE

_GROUP = "__query_group__"


def split_axis(x: nx.NamedArrayBase, name: str, first: str, first_size: int, second: str) -> nx.NamedArrayBase:
    """Splits named axis ``name`` into ``first`` (major) and ``second`` (minor) by a free reshape.

    The two new names are adjacent, in this order, in the result's axis
    order, so a later contraction keeps them adjacent (see :func:`merge_axes`).

    Args:
      x: A named array with axis ``name``.
      name: The axis to split; its size must be a multiple of ``first_size``.
      first: Name of the major part (size ``first_size``).
      first_size: Size of the major part.
      second: Name of the minor part.

    Returns:
      The same data with ``name`` replaced by ``first`` and ``second``.

    Raises:
      NamedAxisError: If the size does not divide or a new name is taken.

    Example:
        >>> y = split_axis(pzb.nx.wrap(jnp.arange(6), "heads"), "heads", "kv", 2, "g")
        >>> y.unwrap("kv", "g").tolist()
        [[0, 1, 2], [3, 4, 5]]
    """
    data, positional, names = data_layout(x)
    axis = names[name]
    size = data.shape[axis]
    if size % first_size:
        raise NamedAxisError(
            f"attention: the query axis {name!r} has size {size}, not a multiple of the {first!r} size {first_size} "
            f"(query named shape {dict(x.named_shape)}). Fix: grouped-query attention needs the number of query "
            "heads to be a multiple of the number of key/value heads."
        )
    taken = [n for n in (first, second) if n in names and n != name]
    if taken:
        raise NamedAxisError(
            f"attention: cannot split {name!r} into {first!r}/{second!r}: {taken} already present "
            f"(named shape {dict(x.named_shape)}). Fix: rename the conflicting axis."
        )
    shape = data.shape
    data = data.reshape(shape[:axis] + (first_size, size // first_size) + shape[axis + 1 :])
    shift = lambda a: a if a < axis else a + 1  # noqa: E731
    new_names: dict[str, int] = {}
    for n, a in names.items():
        if n == name:
            new_names[first], new_names[second] = axis, axis + 1
        else:
            new_names[n] = shift(a)
    return make_named(data, tuple(shift(a) for a in positional), new_names)


def merge_axes(x: nx.NamedArray, first: str, second: str, merged: str) -> nx.NamedArray:
    """Merges two adjacent named axes (``first`` major) into ``merged`` by a free reshape.

    Example:
        >>> x = pzb.nx.wrap(jnp.arange(6).reshape(2, 3), "kv", "g")
        >>> merge_axes(x, "kv", "g", "heads").unwrap("heads").tolist()
        [0, 1, 2, 3, 4, 5]
    """
    order = list(x.named_axes)
    if order.index(second) != order.index(first) + 1:
        # Only reached for unusual operand layouts: one transpose puts them side by side.
        order.remove(second)
        order.insert(order.index(first) + 1, second)
        x = x.order_as(*order)
    i = order.index(first)
    p = len(x.positional_shape)
    shape = x.data_array.shape
    data = x.data_array.reshape(shape[: p + i] + (shape[p + i] * shape[p + i + 1],) + shape[p + i + 2 :])
    names = order[:i] + [merged] + order[i + 2 :]
    return nx.NamedArray(data, dict(zip(names, data.shape[p:])))


def grouped_contract(
    query_side: nx.NamedArrayBase,
    kv_side: nx.NamedArrayBase,
    contract_axes: tuple[str, ...],
    heads_axis: str,
    kv_heads_axis: str,
) -> nx.NamedArray:
    """Contracts a query-side array with a key/value-side array, grouping heads if needed.

    When ``kv_side`` has ``kv_heads_axis`` (distinct from ``heads_axis``) and
    ``query_side`` has ``heads_axis``, query heads are split into
    ``(kv_heads, group)``, contracted, and merged back into ``heads_axis``.

    Example:
        >>> q = pzb.nx.ones({"heads": 4, "projection": 2})
        >>> k = pzb.nx.ones({"kv_heads": 2, "kv_seq": 3, "projection": 2})
        >>> dict(grouped_contract(q, k, ("projection",), "heads", "kv_heads").named_shape)
        {'heads': 4, 'kv_seq': 3}
    """
    grouped = (
        kv_heads_axis != heads_axis
        and heads_axis in query_side.named_shape
        and kv_heads_axis in kv_side.named_shape
        and heads_axis not in kv_side.named_shape
    )
    if not grouped:
        return contract([query_side, kv_side], contract_axes)
    num_kv = kv_side.named_shape[kv_heads_axis]
    split = split_axis(query_side, heads_axis, kv_heads_axis, num_kv, _GROUP)
    return merge_axes(contract([split, kv_side], contract_axes), kv_heads_axis, _GROUP, heads_axis)


def _pair(x: Any, layer: str, what: str) -> tuple[nx.NamedArrayBase, nx.NamedArrayBase]:
    if not (isinstance(x, tuple) and len(x) == 2 and all(nx.is_namedarray(v) for v in x)):
        raise NamedAxisError(
            f"{layer}: expects a tuple ({what}) of two named arrays, found {type(x).__name__}. "
            "Fix: use it as a sublayer of Attention, or call it as layer((a, b))."
        )
    return x


@pytree_dataclass
class AttentionLogits(Layer):
    """Dot products of queries and keys: ``(queries, keys) -> logits``.

    Sums over ``projection_axis``; every other axis is kept (shared ones such
    as ``batch`` / ``heads`` are matched), so logits carry ``seq``, ``kv_seq``,
    ``heads`` and the batch axes. Scaling is not included (it is a
    ``ConstantRescale`` on the queries).

    Attributes:
      projection_axis: The axis summed over (static).
      heads_axis: Query heads axis (static).
      kv_heads_axis: Key heads axis; differs from ``heads_axis`` for GQA (static).
      kv_seq_axis: The keys' sequence axis, required to be present (static).

    Example:
        >>> q = pzb.nx.ones({"seq": 2, "heads": 1, "projection": 3})
        >>> k = pzb.nx.ones({"kv_seq": 4, "heads": 1, "projection": 3})
        >>> sorted(AttentionLogits()((q, k)).named_shape.items())
        [('heads', 1), ('kv_seq', 4), ('seq', 2)]
    """

    projection_axis: str = static_field(default="projection")
    heads_axis: str = static_field(default="heads")
    kv_heads_axis: str = static_field(default="heads")
    kv_seq_axis: str = static_field(default="kv_seq")

    def __call__(self, x: Any, /, **side_inputs: Any) -> nx.NamedArray:
        query, key = _pair(x, "AttentionLogits", "queries, keys")
        for what, arr in (("queries", query), ("keys", key)):
            if self.projection_axis not in arr.named_shape:
                raise NamedAxisError(
                    f"AttentionLogits: the {what} lack the axis {self.projection_axis!r} (named shape "
                    f"{dict(arr.named_shape)}). Fix: project them onto '{self.projection_axis}' or set projection_axis."
                )
        if self.kv_seq_axis not in key.named_shape:
            raise NamedAxisError(
                f"AttentionLogits: the keys lack the axis {self.kv_seq_axis!r} (named shape {dict(key.named_shape)}). "
                "Fix: end input_to_key with RenameAxes(('seq',), ('kv_seq',))."
            )
        return grouped_contract(query, key, (self.projection_axis,), self.heads_axis, self.kv_heads_axis)


@pytree_dataclass
class AttendToValues(Layer):
    """Weighted sum of values: ``(weights, values) -> per-head outputs``.

    Sums over ``kv_seq_axis``; the result has the weights' axes (``seq``,
    ``heads``, batch) plus the values' ``projection``.

    Attributes:
      kv_seq_axis: The axis summed over (static).
      heads_axis: Query heads axis of the weights (static).
      kv_heads_axis: Value heads axis; differs from ``heads_axis`` for GQA (static).

    Example:
        >>> w = pzb.nx.full({"seq": 1, "kv_seq": 2, "heads": 1}, 0.5)
        >>> v = pzb.nx.wrap(jnp.array([[[1.0]], [[3.0]]]), "kv_seq", "heads", "projection")
        >>> AttendToValues()((w, v)).unwrap("seq", "heads", "projection")
        Array([[[2.]]], dtype=float32)
    """

    kv_seq_axis: str = static_field(default="kv_seq")
    heads_axis: str = static_field(default="heads")
    kv_heads_axis: str = static_field(default="heads")

    def __call__(self, x: Any, /, **side_inputs: Any) -> nx.NamedArray:
        weights, values = _pair(x, "AttendToValues", "attention weights, values")
        for what, arr in (("attention weights", weights), ("values", values)):
            if self.kv_seq_axis not in arr.named_shape:
                raise NamedAxisError(
                    f"AttendToValues: the {what} lack the axis {self.kv_seq_axis!r} (named shape "
                    f"{dict(arr.named_shape)}). Fix: end input_to_value with RenameAxes(('seq',), ('kv_seq',))."
                )
        return grouped_contract(weights, values, (self.kv_seq_axis,), self.heads_axis, self.kv_heads_axis)


@pytree_dataclass
class Attention(Layer):
    """Attention as data: projections, logits, mask, softmax and output are sublayers.

    Attributes:
      input_to_query: Input -> queries (``seq``, ``heads``, ``projection``, ...).
      input_to_key: Input -> keys (``kv_seq``, ``heads`` or ``kv_heads``, ``projection``).
      input_to_value: Input -> values (like keys).
      query_key_to_logits: ``(queries, keys)`` -> logits.
      mask: Logits -> masked logits (``Identity`` for none).
      logits_to_weights: Logits -> attention weights (a ``Softmax`` over ``kv_seq``).
      attn_value_to_output: ``(weights, values)`` -> output.

    Example:
        >>> attn = Attention.from_config("a", None, d_model=4, num_heads=2, qk_size=2)
        >>> type(attn.mask).__name__, attn.input_to_query.sublayers[0].weights.label
        ('ApplyCausalMask', 'a.query.weights')
    """

    input_to_query: Layer
    input_to_key: Layer
    input_to_value: Layer
    query_key_to_logits: Layer
    mask: Layer
    logits_to_weights: Layer
    attn_value_to_output: Layer

    def __call__(self, x: Any, /, **side_inputs: Any) -> Any:
        query = self.input_to_query(x, **side_inputs)
        key = self.input_to_key(x, **side_inputs)
        value = self.input_to_value(x, **side_inputs)
        return self.attend(query, key, value, side_inputs)

    def attend(self, query: Any, key: Any, value: Any, side_inputs: dict[str, Any]) -> Any:
        """Runs the steps after the projections (shared with the key/value-cache variant).

        Example:
            >>> attn = Attention.from_config("a", jax.random.key(0), d_model=4, num_heads=1, qk_size=2, mask=None)
            >>> q = pzb.nx.ones({"seq": 1, "heads": 1, "projection": 2})
            >>> kv = pzb.nx.ones({"kv_seq": 3, "heads": 1, "projection": 2})
            >>> attn.attend(q, kv, kv, {}).named_shape["features"]
            4
        """
        logits = self.query_key_to_logits((query, key), **side_inputs)
        logits = self.mask(logits, **side_inputs)
        weights = self.logits_to_weights(logits, **side_inputs)
        return self.attn_value_to_output((weights, value), **side_inputs)

    @classmethod
    def from_config(
        cls,
        name: str,
        init_base_rng: jax.Array | None,
        d_model: int,
        num_heads: int,
        qk_size: int,
        vo_size: int | None = None,
        num_kv_heads: int | None = None,
        use_qkv_bias: bool = False,
        use_output_bias: bool = False,
        mask: Layer | None = ApplyCausalMask(),
        rope: ApplyRoPE | None = None,
        features_axis: str = "features",
        seq_axis: str = "seq",
        kv_seq_axis: str = "kv_seq",
        heads_axis: str = "heads",
        kv_heads_axis: str = "kv_heads",
        projection_axis: str = "projection",
        dtype: Any = jnp.float32,
    ) -> Attention:
        """Builds standard (optionally grouped-query) self-attention.

        Parameters are labelled ``f"{name}.query.weights"``, ``.key``,
        ``.value``, ``.output`` (and ``.bias`` where enabled). Queries are
        scaled by ``1/sqrt(qk_size)`` after RoPE, as Flax and Equinox do.

        Args:
          name: Layer name (parameter label prefix).
          init_base_rng: Base key, or None for parameter slots.
          d_model: Size of ``features``.
          num_heads: Number of query heads.
          qk_size: Query/key head size.
          vo_size: Value head size (default ``qk_size``).
          num_kv_heads: Key/value heads for GQA (default: ``num_heads``, plain
            multi-head attention with keys/values on ``heads``).
          use_qkv_bias: Bias on the query/key/value projections.
          use_output_bias: Bias on the output projection.
          mask: The mask layer (None for ``Identity``).
          rope: A RoPE layer applied to queries and keys (None for none).
          features_axis, seq_axis, kv_seq_axis, heads_axis, kv_heads_axis,
            projection_axis: Axis names.
          dtype: Parameter dtype.

        Returns:
          The attention layer.

        Raises:
          NamedAxisError: If ``num_heads`` is not a multiple of ``num_kv_heads``.

        Example:
            >>> a = Attention.from_config("a", None, d_model=4, num_heads=4, qk_size=2, num_kv_heads=2)
            >>> a.query_key_to_logits.kv_heads_axis
            'kv_heads'
        """
        vo_size = qk_size if vo_size is None else vo_size
        grouped = num_kv_heads is not None and num_kv_heads != num_heads
        if grouped and num_heads % num_kv_heads:
            raise NamedAxisError(
                f"Attention {name!r}: num_heads={num_heads} is not a multiple of num_kv_heads={num_kv_heads}. "
                "Fix: choose num_kv_heads dividing num_heads."
            )
        kv_heads = kv_heads_axis if grouped else heads_axis
        kv_count = num_kv_heads if grouped else num_heads
        features = {features_axis: d_model}

        def projection(part: str, heads: str, count: int, size: int, bias: bool) -> Layer:
            build = Affine.from_config if bias else Linear.from_config
            return build(f"{name}.{part}", init_base_rng, features, {heads: count, projection_axis: size},
                         dtype=dtype)

        def with_rope(layers: list[Layer]) -> list[Layer]:
            return layers + ([rope] if rope is not None else [])

        to_kv_seq = RenameAxes((seq_axis,), (kv_seq_axis,))
        query = with_rope([projection("query", heads_axis, num_heads, qk_size, use_qkv_bias)])
        key = with_rope([projection("key", kv_heads, kv_count, qk_size, use_qkv_bias)])
        value = projection("value", kv_heads, kv_count, vo_size, use_qkv_bias)
        out_build = Affine.from_config if use_output_bias else Linear.from_config
        output = out_build(f"{name}.output", init_base_rng, {heads_axis: num_heads, projection_axis: vo_size},
                           features, dtype=dtype)
        return cls(
            input_to_query=Sequential(query + [ConstantRescale(1.0 / math.sqrt(qk_size))]),
            input_to_key=Sequential(key + [to_kv_seq]),
            input_to_value=Sequential([value, to_kv_seq]),
            query_key_to_logits=AttentionLogits(projection_axis, heads_axis, kv_heads, kv_seq_axis),
            mask=Identity() if mask is None else mask,
            logits_to_weights=Softmax((kv_seq_axis,)),
            attn_value_to_output=Sequential([AttendToValues(kv_seq_axis, heads_axis, kv_heads), output]),
        )
