"""Steering: add a vector (or apply a function) at chosen sites and positions, also while decoding.

Steering is an intervention at a site (docs/interventions.md), with one
twist: *positions*. On a full forward pass "position 3" is index 3 of the
input's ``seq`` axis. During cached decoding each call sees only the new
tokens (one per step), so an index into the call's input would mean nothing;
position must mean the token's **absolute** position in the sequence.

The :class:`Steer` layer therefore carries, when the model decodes through
a key/value cache, its own position counter: a ``StateVariable`` holding the
absolute position of the first token of the next call. :func:`steer` starts
it at the model's cache index (every attention layer with a ``cache_index``
state: ``KVCachingAttention``, a lifted ``nnx.MultiHeadAttention`` with an
initialised cache) and each call advances it by the number of tokens it
sees, in lockstep with the caches. The decoding loop
(:mod:`pzbridge.toolshed.decoding`, or ``pzbridge.models.gpt.greedy_decode``)
threads it like any other state, so a steered cached decode computes what
steering the full recomputation of the growing sequence computes (the law
``tests/toolshed/test_steering.py`` checks on pzbridge's GPT, a lifted NNX
model and a lifted Equinox model).

``positions`` is ``"all"`` (every token), ``"last"`` (the last token of
every call: the prompt's last token, then each generated one), absolute
positions (``3``, ``(0, 2)``), or an ``AxisSlice`` / ``slice`` (``slice(4,
None)``: from position 4 on). Negative positions count from the end of the
input, which is only known without a cache.

A steered model is a copy: the input model is never changed, and the copy
gets fresh state variables, so decoding it does not advance the original's
caches. Only core and nn (and the toolshed) are imported
(docs/architecture.md, "Layers of the package").

Example:
    >>> import jax.numpy as jnp
    >>> import pzbridge as pzb
    >>> model = pzb.nn.Sequential([pzb.nn.Identity()])
    >>> steered = steer(model, pzb.nn.Identity, pzb.nx.wrap(jnp.ones(2), "features"), positions=1, scale=2.0)
    >>> steered(pzb.nx.zeros({"seq": 3, "features": 2})).unwrap("seq", "features").tolist()
    [[0.0, 0.0], [2.0, 2.0], [0.0, 0.0]]
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from pzbridge.core import named_axes as nx
from pzbridge.core.errors import NamedAxisError, PzbridgeError, format_path
from pzbridge.core.selectors import KeyPath, select
from pzbridge.core.struct import pytree_dataclass, static_field
from pzbridge.core.variables import (
    AbstractVariable,
    AbstractVariableSlot,
    AbstractVariableValue,
    StateVariable,
)
from pzbridge.core.variables_kinds import LabeledVariable
from pzbridge.nn.layer import Layer
from pzbridge.toolshed.intermediates import LayerSelector, insert_layers, side_of
from pzbridge.toolshed.interventions import AddVector, AtIndex, InterveneWith
from pzbridge.toolshed.where import AxisSlice, Where

__all__ = ["Positions", "Steer", "cache_start", "resolve_last", "steer"]

Positions = str | int | Sequence[int] | slice | AxisSlice | None
"""What :func:`steer` accepts as ``positions``: ``"all"`` / None, ``"last"``, positions, or a slice."""

_VARIABLE_FORMS = (AbstractVariable, AbstractVariableValue, AbstractVariableSlot)


def _normalize_positions(positions: Positions, decoding: bool) -> str | tuple[int, ...] | AxisSlice:
    """``"all"``, ``"last"``, a tuple of positions or an ``AxisSlice``; checks what decoding cannot resolve."""
    if positions is None or positions == "all":
        return "all"
    if positions == "last":
        return "last"
    if isinstance(positions, str):
        raise PzbridgeError(
            f"steer: positions must be 'all', 'last', positions or a slice, found {positions!r}. "
            "Fix: e.g. positions='last', positions=3, positions=(0, 2) or positions=slice(4, None)."
        )
    if isinstance(positions, slice):
        positions = AxisSlice(positions.start, positions.stop, positions.step)
    if isinstance(positions, AxisSlice):
        negative = [v for v in (positions.start, positions.stop, positions.step) if v is not None and v < 0]
        if decoding and negative:
            raise PzbridgeError(
                f"steer: the slice {positions.as_slice()} counts from the end, but a decoding model sees one token "
                "per call and the sequence's end is not known. Fix: use absolute positions (slice(4, None)) or "
                "positions='last'."
            )
        return positions
    wanted = (positions,) if isinstance(positions, (int, np.integer)) else tuple(positions)
    if not all(isinstance(p, (int, np.integer)) and not isinstance(p, bool) for p in wanted):
        raise PzbridgeError(
            f"steer: positions must be ints, found {positions!r}. Fix: e.g. positions=(0, 2)."
        )
    if decoding and any(p < 0 for p in wanted):
        raise PzbridgeError(
            f"steer: positions {wanted} count from the end, but a decoding model sees one token per call and the "
            "sequence's end is not known. Fix: use absolute positions (>= 0) or positions='last'."
        )
    return tuple(int(p) for p in wanted)


@pytree_dataclass
class Steer(Layer):
    """Runs ``edit`` on the activation and keeps its result at the chosen (absolute) ``positions``.

    Without a ``position`` counter the input's ``seq`` index is the
    position (a full forward pass). With one (a model decoding through a
    cache) the input's first token is at ``position.value``, and every call
    advances the counter by the input's ``seq`` size. Elsewhere the
    activation passes through unchanged (a ``where`` with the input), so a
    zero vector is an exact no-op.

    Attributes:
      edit: The change: an ``AddVector``, an ``InterveneWith`` (either
        possibly inside an ``AtIndex`` for other axes such as ``heads``).
      positions: ``"all"``, ``"last"``, a tuple of positions or an
        ``AxisSlice`` (static).
      position: ``StateVariable`` (int32 scalar) with the absolute position
        of the next input's first token, or None.
      seq_axis: The sequence axis (static).

    Example:
        >>> import jax.numpy as jnp
        >>> import pzbridge as pzb
        >>> layer = Steer(AddVector(pzb.nx.wrap(jnp.ones(1), "f")), (2,), pzb.StateVariable(jnp.int32(2), "p"))
        >>> [layer(pzb.nx.zeros({"seq": 1, "f": 1})).unwrap("seq", "f").tolist() for _ in range(2)]
        [[[1.0]], [[0.0]]]
    """

    edit: Layer
    positions: Any = static_field(default="all")
    position: Any = None
    seq_axis: str = static_field(default="seq")

    def __call__(self, x: Any, /, **side_inputs: Any) -> Any:
        if self.positions == "all" and self.position is None:
            return self.edit(x, **side_inputs)
        if not nx.is_namedarray(x) or self.seq_axis not in x.named_shape:
            raise NamedAxisError(
                f"Steer: positions={self.positions!r} need the activation's {self.seq_axis!r} axis, but it has "
                f"named shape {dict(getattr(x, 'named_shape', {}))}. Fix: steer a site whose activation has "
                f"{self.seq_axis!r} (the residual stream), or use positions='all'."
            )
        length = x.named_shape[self.seq_axis]
        start = None if self.position is None else jnp.asarray(self.position.value, jnp.int32)
        new = self.edit(x, **side_inputs)
        if not nx.is_namedarray(new) or dict(new.named_shape) != dict(x.named_shape):
            raise NamedAxisError(
                f"Steer: the edit returned named shape {dict(getattr(new, 'named_shape', {}))}, expected the "
                f"activation's {dict(x.named_shape)}. Fix: a steering function must keep the activation's shape."
            )
        mask = self._mask(length, start)
        out = new if mask is None else nx.where(mask, new, x)
        if self.position is not None:
            self.position.value = start + length
        return out

    def _mask(self, length: int, start: Any) -> Any:
        """Boolean ``NamedArray`` over ``seq``: true where the token's absolute position is steered."""
        relative = nx.arange(self.seq_axis, length, dtype=jnp.int32)
        if self.positions == "all":
            return None
        if self.positions == "last":
            return relative == length - 1
        if start is None:
            # Without a cache the input is the whole sequence: negative positions and slices resolve on it.
            if isinstance(self.positions, AxisSlice):
                keep = self.positions.positions(length)
            else:
                bad = [p for p in self.positions if p < -length]
                if bad:
                    raise NamedAxisError(
                        f"Steer: positions {bad} are before the start of a sequence of length {length}. "
                        f"Fix: use positions in [-{length}, ...)."
                    )
                keep = tuple(p % length if p < 0 else p for p in self.positions)
            absolute = relative
        else:
            absolute = relative + start
            if isinstance(self.positions, AxisSlice):
                first = self.positions.start or 0
                step = self.positions.step or 1
                inside = (absolute >= first) & (nx.nmap(jnp.mod)(absolute - first, step) == 0)
                return inside if self.positions.stop is None else inside & (absolute < self.positions.stop)
            keep = self.positions
        # Positions past the end are kept: an absolute position not reached yet is simply not steered.
        wanted = jnp.asarray(keep if keep else (-1,), dtype=jnp.int32)
        return nx.nmap(lambda a: jnp.isin(a, wanted))(absolute)


def cache_start(model: Any) -> int | None:
    """The cache index every decode cache of ``model`` agrees on (None without caches).

    A cache is the ``cache_index`` ``StateVariable`` of a layer
    (``KVCachingAttention``, a lifted NNX ``MultiHeadAttention`` after
    ``init_cache``).

    Raises:
      PzbridgeError: If the caches disagree or their index cannot be read
        (a traced value, an unbound slot).

    Example:
        >>> import jax, pzbridge as pzb
        >>> from pzbridge.models.gpt import build_gpt, make_kv_cached
        >>> gpt = build_gpt("g", jax.random.key(0), 5, 1, 1, 4, 8, 4)
        >>> cache_start(gpt), cache_start(make_kv_cached(gpt, {"batch": 1}))
        (None, 0)
    """
    found = select(model).at_subtrees_where(
        lambda path, node: isinstance(node, Layer) and isinstance(getattr(node, "cache_index", None), _VARIABLE_FORMS),
        with_keypath=True,
    ).get_by_path()
    if not found:
        return None
    starts: dict[str, int] = {}
    for path, layer in found.items():
        variable = layer.cache_index
        try:
            starts[format_path(path)] = int(np.asarray(variable.value))
        except Exception as exc:  # noqa: BLE001 - a slot has no value, a tracer cannot be read
            raise PzbridgeError(
                f"steer: cannot read the cache index at {format_path(path)} ({type(variable).__name__}): {exc}. "
                "Fix: steer the bound model outside jax.jit (steer(model, ...) before unbind_variables)."
            ) from None
    if len(set(starts.values())) > 1:
        raise PzbridgeError(
            f"steer: the decode caches are at different positions {starts}; expected one position for the whole "
            "model. Fix: steer a model whose caches were filled together (or freshly initialised)."
        )
    return next(iter(starts.values()))


def resolve_last(positions: Positions, start: int, prompt_length: int) -> Positions:
    """``"last"`` of a decode as absolute positions: the prompt's last token and every token after it.

    Other values are returned unchanged. Steering ``"last"`` on a model fed
    one token per call would steer every prompt token; this form means the
    same on every way of feeding the prompt, and on full recomputation.

    Example:
        >>> resolve_last("last", 0, 4), resolve_last(2, 0, 4)
        (AxisSlice(start=3, stop=None, step=None), 2)
    """
    return AxisSlice(start + prompt_length - 1, None) if positions == "last" else positions


def _edit_of(vector_or_fn: Any, scale: float) -> Layer:
    """``AddVector(vector, scale)`` for a named vector (or a variable holding one), ``InterveneWith(fn)`` for a function."""
    held = vector_or_fn.value if isinstance(vector_or_fn, (AbstractVariable, AbstractVariableValue)) else None
    if nx.is_namedarray(vector_or_fn) or nx.is_namedarray(held) or isinstance(vector_or_fn, AbstractVariableSlot):
        return AddVector(vector_or_fn, scale=scale)
    if isinstance(vector_or_fn, Layer):
        return vector_or_fn if scale == 1.0 else _scale_error(vector_or_fn)
    if callable(vector_or_fn) and not isinstance(vector_or_fn, jax.Array):
        return InterveneWith(vector_or_fn) if scale == 1.0 else _scale_error(vector_or_fn)
    raise PzbridgeError(
        f"steer: expected a NamedArray steering vector (or a variable holding one) or a function, found "
        f"{type(vector_or_fn).__name__} of shape {getattr(vector_or_fn, 'shape', '?')}. Fix: name the vector's "
        "axes, e.g. pzb.nx.wrap(v, 'features'), or pass a function of the activation."
    )


def _scale_error(fn: Any) -> Layer:
    raise PzbridgeError(
        f"steer: scale applies to a steering vector, but a function ({getattr(fn, '__name__', type(fn).__name__)}) "
        "was given. Fix: put the scale inside the function, e.g. lambda x: x + 2.0 * v."
    )


def _split_index(at: LayerSelector, positions: Positions, seq_axis: str) -> tuple[LayerSelector, Positions, Where | None]:
    """Takes ``seq`` out of a ``Where``'s index as positions; the rest of the index stays for an ``AtIndex``."""
    if not isinstance(at, Where) or not at.index:
        return at, positions, None
    index = dict(at.index)
    if seq_axis in index:
        if positions is not None:
            raise PzbridgeError(
                f"steer: positions are given twice, in {at.describe()} and as positions={positions!r}. "
                f"Fix: drop one (the Where's index[{seq_axis!r}] is read as absolute positions)."
            )
        positions = index.pop(seq_axis)
    rest = Where(layer="Layer", index=tuple(index.items())) if index else None
    return dataclasses.replace(at, index=()), positions, rest


def _labels(model: Any) -> set[str]:
    return {leaf.label for leaf in jax.tree_util.tree_leaves(model, is_leaf=lambda n: isinstance(n, _VARIABLE_FORMS))
            if isinstance(leaf, (LabeledVariable, *_VARIABLE_FORMS)) and hasattr(leaf, "label")}


def steer(
    model: Any,
    at: LayerSelector,
    vector_or_fn: Any,
    *,
    positions: Positions = None,
    scale: float = 1.0,
    where: str | None = None,
    decoding: bool | None = None,
    seq_axis: str = "seq",
) -> Any:
    """Returns a steered copy of ``model``: ``vector_or_fn`` applied at ``at``, at ``positions`` only.

    Args:
      model: Any lifted or pzbridge model (not modified).
      at: The sites (a :class:`~pzbridge.toolshed.where.Where`, selection,
        layer class or predicate). A ``Where``'s ``index`` over ``seq``
        gives the positions; over other axes (``heads``) it limits the edit.
      vector_or_fn: A ``NamedArray`` on (a subset of) the activation's axes,
        usually ``features`` (or a ``pzb.Parameter`` holding one: a
        trainable steering vector), added as ``scale * vector``; or a
        function ``fn(x) -> x'`` (or a pzbridge layer) returning the steered
        activation.
      positions: ``None`` / ``"all"``, ``"last"``, absolute positions, or a
        slice (see the module docstring).
      scale: Multiplier of a vector (a function takes none).
      where: ``"after"`` (the site's output, default) or ``"before"``.
      decoding: Count absolute positions across calls with a counter
        (``True``; starts at the model's cache index, or 0 for a model that
        gets its caches later, as ``greedy_decode`` does), or treat every
        call as a whole sequence (``False``). Default: whether the model
        holds a decode cache.
      seq_axis: The sequence axis.

    Returns:
      The steered copy, with fresh state variables (the original's caches
      never move when the copy runs).

    Raises:
      PzbridgeError: For an unknown positions form, a scale with a function,
        an unnamed vector, or caches at different positions.
      SelectionError: If ``at`` selects nothing.

    Example:
        >>> import jax.numpy as jnp
        >>> import pzbridge as pzb
        >>> model = pzb.nn.Sequential([pzb.nn.Identity()])
        >>> steered = steer(model, pzb.nn.Identity, lambda x: 2 * x, positions="last")
        >>> steered(pzb.nx.ones({"seq": 2})).unwrap("seq").tolist()
        [1.0, 2.0]
    """
    at, positions, rest = _split_index(at, positions, seq_axis)
    start = cache_start(model)
    decoding = start is not None if decoding is None else decoding
    spec = _normalize_positions(positions, decoding)
    edit = _edit_of(vector_or_fn, scale)
    if rest is not None:
        edit = AtIndex(edit, rest)
    taken = _labels(model)

    def make(path: KeyPath, node: Any) -> Layer:
        counter = None
        if decoding and spec != "all":
            base = f"steer.{format_path(path) or 'root'}.position"
            label, n = base, 1
            while label in taken:
                label, n = f"{base}.{n}", n + 1
            taken.add(label)
            counter = StateVariable(jnp.asarray(start or 0, jnp.int32), label)
        return Steer(edit, spec, counter, seq_axis)

    return insert_layers(model, at, make, where=side_of(at, where))
