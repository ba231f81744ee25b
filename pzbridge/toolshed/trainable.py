"""Trainable interchange interventions (distributed alignment search): rotated, low-rank and masked subspaces.

An interchange intervention runs the model on a *base* input and a *source*
input and, at one site, replaces part of the base activation by the
source's. Distributed alignment search (DAS) learns *which* part: not a set
of neurons, but a subspace of the activation's feature space, found by
gradient descent while the model stays frozen. The layers here do that over
one named feature axis of the activation (``features``, ``neurons``, ...),
chosen by the user:

- :class:`RotatedSubspaceInterchange`: an orthogonal ``d x d`` rotation
  ``R``; the first ``k`` rotated coordinates of the base are replaced by
  the source's;
- :class:`LowRankRotatedInterchange`: only a ``d x k`` orthonormal basis of
  the interchanged subspace (the cheap form for wide sites);
- :class:`BoundlessMask`: a full rotation and a learned soft mask
  ``sigmoid(logits / temperature)`` over the rotated coordinates, so the
  size of the subspace is learned too (boundless DAS).

Base and source run in *one* pass, stacked on a named ``worlds`` axis
(:func:`~pzbridge.toolshed.worlds.stack_worlds`): at the site, world ``w``
reads world ``routes[w]`` as its source, the same convention as
:class:`~pzbridge.toolshed.worlds.RouteWorlds` (default ``(1, 1)``: world 0,
the base, takes its subspace from world 1, the source; world 1 runs
untouched). Every pzbridge layer passes the worlds axis through like a batch,
so this works on pzb.nn models, lifted stock layers and traced custom
modules alike.

The update is written as ``b + Q (m * Q^T (s - b))`` with ``Q`` the
``d x r`` orthonormal basis of the interchanged coordinates and ``m`` the
mask (all ones without one). In exact arithmetic this is DAS's
``R^T ((1 - m) R b + m R s)``; written as a difference it is *bitwise* the
base when nothing is interchanged (``k = 0``, or a world routed to itself:
``s - b`` is exactly zero), which the ``R^T R`` form would only be to
rounding.

**Parametrisation.** Each layer holds an unconstrained raw matrix ``W``
(a ``Parameter``) and uses ``Q`` from the QR decomposition of ``W``. QR was
chosen over ``expm`` of a skew matrix, Cayley or Householder products
because (1) the same map gives the full rotation (``W`` square) and the
``d x k`` basis (``W`` tall), (2) ``Q`` is orthonormal to rounding error at
every forward pass however far optax moves ``W``: nothing drifts and no
re-projection step is needed, (3) it costs ``O(d k^2)`` for a rank-``k``
basis where ``expm`` needs several ``d x d`` products, and (4) every
orthogonal matrix (both determinants) is reachable and the identity is
exactly ``W = I``. The map is redundant (scaling a column of ``W`` does not
change ``Q``), which gradient descent does not mind. One consequence is
documented on :class:`RotatedSubspaceInterchange`: the first ``k`` columns of
``Q`` depend only on the first ``k`` columns of ``W``.

Training (:func:`~pzbridge.toolshed.trainable_fit.train_intervention`) and
evaluation (:func:`~pzbridge.toolshed.trainable_fit.interchange_accuracy`)
live in :mod:`pzbridge.toolshed.trainable_fit`. The layers are registered
as spec operations (``docs/specs.md``), their trained arrays written to the
spec's ``arrays.npz``, and checkpoint with ``pzb.checkpoint`` like any
lifted layer. Only core and nn are imported (docs/architecture.md, "Layers
of the package").

Example:
    >>> import jax, jax.numpy as jnp
    >>> import pzbridge as pzb
    >>> from pzbridge.toolshed.worlds import stack_worlds
    >>> das = RotatedSubspaceInterchange.from_config("das", jax.random.key(0), {"features": 3}, k=3)
    >>> x = stack_worlds([pzb.nx.wrap(jnp.zeros(3), "features"), pzb.nx.wrap(jnp.ones(3), "features")])
    >>> [round(v, 4) for v in das(x)[{"worlds": 0}].unwrap("features").tolist()]  # k = d: the whole source
    [1.0, 1.0, 1.0]
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from pzbridge.core import named_axes as nx
from pzbridge.core.errors import NamedAxisError, PzbridgeError
from pzbridge.core.struct import pytree_dataclass, static_field
from pzbridge.core.variables import (
    AbstractVariable,
    AbstractVariableSlot,
    AbstractVariableValue,
    Parameter,
    StateVariable,
)
from pzbridge.nn.layer import Layer
from pzbridge.toolshed.specs import SpecError, register_spec_operation
from pzbridge.toolshed.worlds import WORLDS

__all__ = [
    "ROTATED",
    "BoundlessMask",
    "LowRankRotatedInterchange",
    "RotatedSubspaceInterchange",
    "SubspaceInterchange",
    "orthonormal_columns",
]

ROTATED = "rotated"
"""The name of the rotated-coordinate axis of the layers' raw matrices and masks."""

_VARIABLE_FORMS = (AbstractVariable, AbstractVariableValue, AbstractVariableSlot)


def _read(data: Any) -> Any:
    return data.value if isinstance(data, _VARIABLE_FORMS) else data


def orthonormal_columns(raw: jax.Array) -> jax.Array:
    """``Q`` of the reduced QR decomposition of ``raw`` (``d x r``, ``r <= d``): ``r`` orthonormal columns.

    Differentiable (jax's QR rule), so optax can train ``raw`` freely while
    the columns stay orthonormal to rounding error.

    Example:
        >>> import jax.numpy as jnp
        >>> q = orthonormal_columns(jnp.array([[2.0, 1.0], [0.0, 1.0], [0.0, 0.0]]))
        >>> bool(jnp.allclose(q.T @ q, jnp.eye(2), atol=1e-6))
        True
    """
    q, _ = jnp.linalg.qr(raw)
    return q


def _single_axis(axis: Mapping[str, int], where: str) -> tuple[str, int]:
    if not isinstance(axis, Mapping) or len(axis) != 1:
        raise PzbridgeError(
            f"{where}: expected the feature axis as a one-entry mapping {{name: size}}, found {axis!r:.80}. "
            "Fix: e.g. {'features': 16} (the named axis of the activation the rotation acts on)."
        )
    ((name, size),) = axis.items()
    if not isinstance(name, str) or name == ROTATED:
        raise PzbridgeError(
            f"{where}: the feature axis must be a string other than {ROTATED!r} (the layer's own axis), "
            f"found {name!r}. Fix: rename the activation's axis or pass another name."
        )
    if not isinstance(size, int) or isinstance(size, bool) or size < 1:
        raise PzbridgeError(f"{where}: the size of axis {name!r} must be a positive int, found {size!r}.")
    return name, size


def _check_k(k: Any, d: int, where: str) -> int:
    if not isinstance(k, int) or isinstance(k, bool) or not 0 <= k <= d:
        raise PzbridgeError(
            f"{where}: k (the number of interchanged coordinates) must be an int in [0, {d}], found {k!r}. "
            f"Fix: pass 0 <= k <= {d}, the size of the feature axis."
        )
    return k


def _check_routes(routes: Sequence[Any], where: str, blocks: Sequence[int] = ()) -> tuple[Any, ...]:
    """``routes`` as a tuple (one source world per world), or with ``blocks`` one such tuple per block."""
    if blocks:
        nested = tuple(tuple(r) if isinstance(r, Sequence) else r for r in routes)
        sizes = tuple(blocks)
        worlds = len(nested[0]) if nested and isinstance(nested[0], tuple) else 0
        if (not all(isinstance(b, int) and not isinstance(b, bool) and b >= 0 for b in sizes)
                or len(nested) != len(sizes) or not all(isinstance(r, tuple) and len(r) == worlds for r in nested)):
            raise PzbridgeError(
                f"{where}: with blocks={sizes} (the number of rotated coordinates each source interchanges), "
                f"routes must hold one tuple of source worlds per block, each as long as the number of worlds, "
                f"found routes={nested}. Fix: e.g. blocks=(2, 2), routes=((1, 1, 2), (2, 1, 2)): world 0 takes "
                "the first 2 coordinates from world 1 and the next 2 from world 2."
            )
        return tuple(_check_routes(r, where) for r in nested)
    routes = tuple(routes)
    if not routes or not all(isinstance(r, int) and not isinstance(r, bool) and 0 <= r < len(routes)
                             for r in routes):
        raise PzbridgeError(
            f"{where}: routes must name, for each of the {len(routes)} worlds, its source world in "
            f"[0, {len(routes)}), found {routes}. Fix: routes=(1, 1) (world 0 reads its subspace from world 1)."
        )
    return routes


def _check_blocks(blocks: Any, where: str) -> tuple[int, ...]:
    if isinstance(blocks, int) and not isinstance(blocks, bool):
        return ()
    sizes = tuple(blocks)
    if not sizes or not all(isinstance(b, int) and not isinstance(b, bool) and b >= 0 for b in sizes):
        raise PzbridgeError(f"{where}: k must be an int or a non-empty tuple of ints >= 0 (one per source), "
                            f"found {blocks!r}.")
    return sizes


def _raw_matrix(key: jax.Array, d: int, r: int, init: str, where: str) -> jax.Array:
    if init == "identity":
        return jnp.eye(d, r, dtype=jnp.float32)
    if init == "random":
        # QR of a Gaussian matrix: a uniformly random orthonormal basis to start from.
        return orthonormal_columns(jax.random.normal(key, (d, r), jnp.float32))
    raise PzbridgeError(f"{where}: init must be 'random' or 'identity', found {init!r}.")


class SubspaceInterchange(Layer):
    """Base of the interchange layers: ``b + Q (m * Q^T (s - b))`` over one named axis, across worlds.

    Subclasses provide :meth:`subspace` (the basis ``Q`` and optional
    weights ``m``) and the fields ``axis``, ``routes`` and ``worlds``. The
    layer needs an activation with both the feature axis and the worlds
    axis (run the model on ``stack_worlds([base, source])``).

    Example:
        >>> issubclass(LowRankRotatedInterchange, SubspaceInterchange)
        True
    """

    # Declared by every subclass as static fields (dataclass field order is set there, after its arrays).
    axis: str
    routes: tuple[Any, ...]
    worlds: str
    blocks: tuple[int, ...]

    @abc.abstractmethod
    def subspace(self) -> tuple[jax.Array, jax.Array | None]:
        """``(Q, m)``: a ``d x r`` orthonormal basis and ``r`` weights in ``[0, 1]`` (``None``: all ones)."""

    def world_count(self) -> int:
        """The number of worlds the layer reads (the size of its worlds axis).

        Example:
            >>> import jax
            >>> LowRankRotatedInterchange.from_config("das", jax.random.key(0), {"f": 4}, k=(1, 1),
            ...                                       routes=((1, 1, 2), (2, 1, 2))).world_count()
            3
        """
        return len(self.routes[0]) if self.blocks else len(self.routes)

    def route_blocks(self, r: int) -> list[tuple[int, int, tuple[int, ...]]]:
        """``(first, stop, routes)`` per block of the ``r`` interchanged coordinates (one block without ``blocks``).

        Multi-source interchange: block ``g`` of world ``w`` is read from world
        ``routes[g][w]`` (distributed alignment search of several causal
        variables, each from its own source).

        Raises:
          NamedAxisError: If the blocks do not add up to ``r``.

        Example:
            >>> import jax
            >>> das = LowRankRotatedInterchange.from_config("das", jax.random.key(0), {"f": 4}, k=(1, 2),
            ...                                             routes=((1, 1, 2), (2, 1, 2)))
            >>> das.route_blocks(3)
            [(0, 1, (1, 1, 2)), (1, 3, (2, 1, 2))]
        """
        if not self.blocks:
            return [(0, r, tuple(self.routes))]
        if sum(self.blocks) != r:
            raise NamedAxisError(
                f"{type(self).__name__}: its blocks {self.blocks} add up to {sum(self.blocks)} coordinates, its "
                f"subspace has {r}. Fix: give blocks that add up to the interchanged coordinates (k).")
        starts = [sum(self.blocks[:g]) for g in range(len(self.blocks))]
        return [(a, a + size, tuple(routes)) for a, size, routes in zip(starts, self.blocks, self.routes)]

    def __call__(self, x: Any, /, **side_inputs: Any) -> Any:
        name = type(self).__name__
        found = dict(x.named_shape) if nx.is_namedarray(x) else {}
        q, weights = self.subspace()
        wanted = {self.axis: q.shape[0], self.worlds: self.world_count()}
        bad = {axis: size for axis, size in wanted.items() if found.get(axis) != size}
        if bad:
            positional = getattr(x, "positional_shape", getattr(x, "shape", ()))
            raise NamedAxisError(
                f"{name}: expected an activation with named axes {wanted}, found named axes {found} (positional "
                f"shape {positional}); {bad} are missing or differ in size. Fix: run the model on "
                f"stack_worlds([base, *sources]) (axis {self.worlds!r}) and insert the layer where the activation "
                f"has the axis {self.axis!r} of size {q.shape[0]}."
            )
        blocks = self.route_blocks(q.shape[1])
        sources = [x[{self.worlds: nx.wrap(jnp.asarray(routes, dtype=jnp.int32), self.worlds)}].untag(self.axis)
                   for _, _, routes in blocks]

        def interchange(base: jax.Array, *srcs: jax.Array) -> jax.Array:
            # Row vectors (..., d): leading positional axes (an NNX adapter's batch) pass through.
            moved_coordinates = None
            for (first, stop, _), src in zip(blocks, srcs):
                basis = q if len(blocks) == 1 else q[:, first:stop]
                coordinates = (src - base) @ basis
                if weights is not None:
                    coordinates = coordinates * (weights if len(blocks) == 1 else weights[first:stop])
                moved_coordinates = coordinates @ basis.T if moved_coordinates is None else (
                    moved_coordinates + coordinates @ basis.T)
            return base + moved_coordinates

        new = nx.nmap(interchange)(x.untag(self.axis), *sources)
        lead = [f"__lead{i}" for i in range(len(new.positional_shape) - 1)]  # leading positional axes stay so
        new = new.tag(*lead, self.axis).untag(*lead) if lead else new.tag(self.axis)
        # A world routed to itself keeps its activation as is, whatever the values (inf - inf would be NaN).
        moved = nx.wrap(jnp.asarray([any(routes[w] != w for _, _, routes in blocks)
                                     for w in range(self.world_count())]), self.worlds)
        return nx.where(moved, new, x)

    def reads_across(self) -> tuple[str, ...]:
        """The worlds axis: the layer reads its source worlds (an adapter runs it on all worlds at once)."""
        return (self.worlds,)

    def basis(self) -> nx.NamedArray:
        """The interchanged subspace's orthonormal basis ``Q`` as a named array ``{axis: d, rotated: r}``.

        Example:
            >>> import jax
            >>> layer = LowRankRotatedInterchange.from_config("das", jax.random.key(0), {"features": 4}, k=2)
            >>> dict(layer.basis().named_shape)
            {'features': 4, 'rotated': 2}
        """
        return nx.wrap(self.subspace()[0], self.axis, ROTATED)


def _weight_matrix(layer: Any) -> jax.Array:
    return _read(layer.weight).unwrap(layer.axis, ROTATED)


@pytree_dataclass
class RotatedSubspaceInterchange(SubspaceInterchange):
    """Interchanges the first ``k`` coordinates of an orthogonal rotation ``R`` of one named feature axis.

    ``R`` is ``Q^T`` for ``Q`` the QR factor of the raw ``d x d`` matrix held
    in ``weight``. With QR, the first ``k`` columns of ``Q`` depend only on
    the first ``k`` columns of ``weight``, so the trailing ``d - k`` columns
    get zero gradient: the learned *subspace* is that of
    :class:`LowRankRotatedInterchange`, and the full rotation is kept for
    :meth:`rotation` / :meth:`rotate` (reading all rotated coordinates) and for
    changing ``k`` after training.

    Attributes:
      weight: ``Parameter`` (or array) holding a named array ``{axis: d, rotated: d}``.
      k: The number of interchanged rotated coordinates (static).
      axis: The activation's feature axis the rotation acts on (static).
      routes: Source world of each world (static); default ``(1, 1)``. With ``blocks``: one such tuple per block.
      worlds: The worlds axis (static).
      blocks: Multi-source interchange: how many of the interchanged coordinates each source block takes, in
        order (static); ``()`` for one source. See :meth:`SubspaceInterchange.route_blocks`.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> das = RotatedSubspaceInterchange.from_config("das", jax.random.key(0), {"neurons": 4}, k=2)
        >>> r = das.rotation().unwrap("rotated", "neurons")
        >>> bool(jnp.allclose(r @ r.T, jnp.eye(4), atol=1e-5))
        True
    """

    weight: Any
    k: int = static_field()
    axis: str = static_field()
    routes: tuple[Any, ...] = static_field(default=(1, 1))
    worlds: str = static_field(default=WORLDS)
    blocks: tuple[int, ...] = static_field(default=())

    def __post_init__(self) -> None:
        object.__setattr__(self, "blocks", tuple(self.blocks))
        object.__setattr__(self, "routes", _check_routes(self.routes, "RotatedSubspaceInterchange", self.blocks))

    @classmethod
    def from_config(cls, label: str, key: jax.Array, axis: Mapping[str, int], k: int | Sequence[int], *,
                    init: str = "random", routes: Sequence[Any] = (1, 1),
                    worlds: str = WORLDS) -> RotatedSubspaceInterchange:
        """A layer with a random (or identity) rotation in a ``Parameter`` labelled ``{label}.rotation``.

        Args:
          label: Prefix of the parameter label.
          key: Random key for ``init="random"``.
          axis: ``{name: size}`` of the feature axis, e.g. ``{"features": 16}``.
          k: Number of interchanged coordinates, ``0 <= k <= size``; or one count per source block
            (multi-source interchange, ``routes`` then one tuple per block).
          init: ``"random"`` (a uniformly random rotation) or ``"identity"``.
          routes: Source world of each world (per block with several blocks).
          worlds: The worlds axis name.

        Raises:
          PzbridgeError: For a malformed axis, ``k`` out of range or an unknown ``init``.

        Example:
            >>> import jax
            >>> das = RotatedSubspaceInterchange.from_config("das", jax.random.key(0), {"f": 4}, k=(1, 2),
            ...                                              routes=((1, 1, 2), (2, 1, 2)))
            >>> das.k, das.blocks
            (3, (1, 2))
        """
        where = "RotatedSubspaceInterchange.from_config"
        name, d = _single_axis(axis, where)
        blocks = _check_blocks(k, where)
        k = _check_k(sum(blocks) if blocks else k, d, where)
        raw = _raw_matrix(key, d, d, init, where)
        return cls(Parameter(nx.wrap(raw, name, ROTATED), f"{label}.rotation"), k, name, tuple(routes), worlds,
                   blocks)

    def subspace(self) -> tuple[jax.Array, None]:
        raw = _weight_matrix(self)
        _check_k(self.k, raw.shape[0], "RotatedSubspaceInterchange")
        # Only the first k columns of Q are used, and they are the QR factor of the first k columns of W.
        return orthonormal_columns(raw[:, : self.k]), None

    def rotation(self) -> nx.NamedArray:
        """The orthogonal matrix ``R`` as ``{rotated: d, axis: d}``: rotated coordinate ``j`` is ``R[j] . x``."""
        return nx.wrap(orthonormal_columns(_weight_matrix(self)).T, ROTATED, self.axis)

    def rotate(self, x: nx.NamedArray) -> nx.NamedArray:
        """``R x`` over the feature axis: ``x``'s axis ``axis`` becomes the axis ``rotated``.

        Example:
            >>> import jax, jax.numpy as jnp, pzbridge as pzb
            >>> das = RotatedSubspaceInterchange.from_config("das", jax.random.key(0), {"f": 3}, k=1, init="identity")
            >>> das.rotate(pzb.nx.wrap(jnp.arange(3.0), "f")).unwrap("rotated").tolist()
            [0.0, 1.0, 2.0]
        """
        r = self.rotation().unwrap(ROTATED, self.axis)
        return nx.nmap(lambda v: r @ v)(x.untag(self.axis)).tag(ROTATED)


@pytree_dataclass
class LowRankRotatedInterchange(SubspaceInterchange):
    """Interchanges the span of a learned ``d x k`` orthonormal basis of one named feature axis.

    The basis is the QR factor of the raw ``d x k`` matrix in ``weight``;
    the cost of a forward pass grows with ``d k``, not ``d^2``.

    Attributes:
      weight: ``Parameter`` (or array) holding a named array ``{axis: d, rotated: k}``.
      axis: The activation's feature axis (static).
      routes: Source world of each world (static); default ``(1, 1)``. With ``blocks``: one such tuple per block.
      worlds: The worlds axis (static).
      blocks: Multi-source interchange: how many of the interchanged coordinates each source block takes, in
        order (static); ``()`` for one source. See :meth:`SubspaceInterchange.route_blocks`.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> das = LowRankRotatedInterchange.from_config("das", jax.random.key(0), {"features": 5}, k=2)
        >>> q = das.basis().unwrap("features", "rotated")
        >>> bool(jnp.allclose(q.T @ q, jnp.eye(2), atol=1e-5))
        True
    """

    weight: Any
    axis: str = static_field()
    routes: tuple[Any, ...] = static_field(default=(1, 1))
    worlds: str = static_field(default=WORLDS)
    blocks: tuple[int, ...] = static_field(default=())

    def __post_init__(self) -> None:
        object.__setattr__(self, "blocks", tuple(self.blocks))
        object.__setattr__(self, "routes", _check_routes(self.routes, "LowRankRotatedInterchange", self.blocks))

    @classmethod
    def from_config(cls, label: str, key: jax.Array, axis: Mapping[str, int], k: int | Sequence[int], *,
                    init: str = "random", routes: Sequence[Any] = (1, 1),
                    worlds: str = WORLDS) -> LowRankRotatedInterchange:
        """A layer with a random (or identity-column) basis in a ``Parameter`` labelled ``{label}.basis``.

        ``k`` is the basis size, or one size per source block (multi-source
        interchange; ``routes`` then holds one tuple per block), as for
        :meth:`RotatedSubspaceInterchange.from_config`.

        Raises:
          PzbridgeError: For a malformed axis, ``k`` out of range or an unknown ``init``.
        """
        where = "LowRankRotatedInterchange.from_config"
        name, d = _single_axis(axis, where)
        blocks = _check_blocks(k, where)
        k = _check_k(sum(blocks) if blocks else k, d, where)
        raw = _raw_matrix(key, d, k, init, where)
        return cls(Parameter(nx.wrap(raw, name, ROTATED), f"{label}.basis"), name, tuple(routes), worlds, blocks)

    @classmethod
    def of_units(cls, axis: Mapping[str, int], units: Sequence[int], *, routes: Sequence[int] = (1, 1),
                 worlds: str = WORLDS) -> LowRankRotatedInterchange:
        """The neuron-aligned interchange of ``units`` (a fixed one-hot basis, held as a plain array).

        Swapping these units with the source's (to rounding: ``b + (s - b)``);
        the baseline DAS is compared against. The basis is data, not a static
        field, so evaluating many unit sets compiles once per set size.

        Example:
            >>> layer = LowRankRotatedInterchange.of_units({"neurons": 4}, [1, 3])
            >>> q = layer.basis().unwrap("neurons", "rotated")  # +-one-hot columns (QR's signs)
            >>> (q @ q.T).diagonal().tolist()                   # the projector onto units 1 and 3
            [0.0, 1.0, 0.0, 1.0]
        """
        name, d = _single_axis(axis, "LowRankRotatedInterchange.of_units")
        units = list(units)
        if len(set(units)) != len(units) or not all(isinstance(u, int) and 0 <= u < d for u in units):
            raise PzbridgeError(f"LowRankRotatedInterchange.of_units: units must be distinct ints in [0, {d}), "
                                f"found {units}.")
        raw = jnp.eye(d, dtype=jnp.float32)[:, jnp.asarray(units, dtype=jnp.int32)]
        return cls(nx.wrap(raw, name, ROTATED), name, tuple(routes), worlds)

    def subspace(self) -> tuple[jax.Array, None]:
        return orthonormal_columns(_weight_matrix(self)), None


@pytree_dataclass
class BoundlessMask(SubspaceInterchange):
    """Interchanges rotated coordinates through a learned soft mask ``sigmoid(logits / temperature)``.

    Boundless DAS: the rotation and the mask train together, so the number
    of interchanged coordinates is learned; lowering ``temperature`` during
    training (``temperature_schedule=`` of ``train_intervention``) drives
    the mask towards 0 / 1. :meth:`mask_size` (the sum of the mask) is the
    usual sparsity penalty.

    Attributes:
      weight: ``Parameter`` (or array) holding the raw rotation ``{axis: d, rotated: d}``.
      mask_logits: ``Parameter`` (or array) holding ``{rotated: d}``.
      temperature: ``StateVariable`` (or number) holding the positive temperature.
      axis: The activation's feature axis (static).
      routes: Source world of each world (static); default ``(1, 1)``. With ``blocks``: one such tuple per block.
      worlds: The worlds axis (static).
      blocks: Multi-source interchange: how many of the interchanged coordinates each source block takes, in
        order (static); ``()`` for one source. See :meth:`SubspaceInterchange.route_blocks`.

    Example:
        >>> import jax
        >>> mask = BoundlessMask.from_config("bdas", jax.random.key(0), {"features": 4})
        >>> mask.mask().unwrap("rotated").tolist()
        [0.5, 0.5, 0.5, 0.5]
    """

    weight: Any
    mask_logits: Any
    temperature: Any
    axis: str = static_field()
    routes: tuple[Any, ...] = static_field(default=(1, 1))
    worlds: str = static_field(default=WORLDS)
    blocks: tuple[int, ...] = static_field(default=())

    def __post_init__(self) -> None:
        object.__setattr__(self, "blocks", tuple(self.blocks))
        object.__setattr__(self, "routes", _check_routes(self.routes, "BoundlessMask", self.blocks))

    @classmethod
    def from_config(cls, label: str, key: jax.Array, axis: Mapping[str, int], *, temperature: float = 1.0,
                    logit: float = 0.0, init: str = "random", routes: Sequence[Any] = (1, 1),
                    worlds: str = WORLDS, blocks: Sequence[int] = ()) -> BoundlessMask:
        """A layer with parameters ``{label}.rotation``, ``{label}.mask_logits`` and state ``{label}.temperature``.

        Args:
          label: Prefix of the variable labels.
          key: Random key for ``init="random"``.
          axis: ``{name: size}`` of the feature axis.
          temperature: The initial temperature (> 0).
          logit: The initial value of every mask logit (0: mask 0.5).
          init: ``"random"`` or ``"identity"`` rotation.
          routes: Source world of each world (per block with ``blocks``).
          worlds: The worlds axis name.
          blocks: For several sources, how many rotated coordinates (adding up to the axis size) each block
            of ``routes`` covers; the mask then learns which coordinates of each block to take.

        Raises:
          PzbridgeError: For a malformed axis, a non-positive temperature or an unknown ``init``.
        """
        name, d = _single_axis(axis, "BoundlessMask.from_config")
        if not float(temperature) > 0:
            raise PzbridgeError(f"BoundlessMask.from_config: temperature must be > 0, found {temperature!r}.")
        raw = _raw_matrix(key, d, d, init, "BoundlessMask.from_config")
        return cls(Parameter(nx.wrap(raw, name, ROTATED), f"{label}.rotation"),
                   Parameter(nx.full({ROTATED: d}, float(logit)), f"{label}.mask_logits"),
                   StateVariable(jnp.float32(temperature), f"{label}.temperature"),
                   name, tuple(routes), worlds, tuple(blocks))

    def subspace(self) -> tuple[jax.Array, jax.Array]:
        return orthonormal_columns(_weight_matrix(self)), self.mask().unwrap(ROTATED)

    def mask(self) -> nx.NamedArray:
        """The soft mask ``{rotated: d}`` over the rotated coordinates, in ``(0, 1)``."""
        logits = _read(self.mask_logits)
        return nx.nmap(jax.nn.sigmoid)(logits / jnp.asarray(_read(self.temperature), jnp.float32))

    def mask_size(self) -> jax.Array:
        """The sum of the mask: the number of interchanged coordinates, softly (a scalar)."""
        return jnp.sum(self.mask().unwrap(ROTATED))

    def rotation(self) -> nx.NamedArray:
        """The orthogonal matrix ``R`` as ``{rotated: d, axis: d}``."""
        return nx.wrap(orthonormal_columns(_weight_matrix(self)).T, ROTATED, self.axis)


# -- Spec operations: the raw matrices and logits go to arrays.npz, labels and static fields to JSON. -----------

_COMMON = ("axis", "routes", "worlds")


def _label(data: Any) -> str | None:
    return data.label if isinstance(data, _VARIABLE_FORMS) and isinstance(getattr(data, "label", None), str) else None


def _put_variable(data: Any, put_array: Callable[[Any], Any]) -> dict[str, Any]:
    return {"value": put_array(_read(data)), "label": _label(data)}


def _get_parameter(ref: Any, field: str, get_array: Callable[[Any, str], Any], where: str) -> Any:
    if not isinstance(ref, Mapping) or set(ref) != {"value", "label"}:
        raise SpecError(f"{where}.params.{field}: expected {{'value': ..., 'label': ...}}, found {ref!r:.80}.")
    value = get_array(ref["value"], field)
    label = ref["label"]
    if label is None:
        return value
    if not isinstance(label, str) or not label:
        raise SpecError(f"{where}.params.{field}.label: expected a non-empty string or null, found {label!r}.")
    return Parameter(value, label)


def _common_to_json(layer: Any) -> dict[str, Any]:
    # "blocks" only for multi-source layers, so single-source specs read as before.
    routes = [list(r) for r in layer.routes] if layer.blocks else list(layer.routes)
    return {"axis": layer.axis, "routes": routes, "worlds": layer.worlds,
            **({"blocks": list(layer.blocks)} if layer.blocks else {})}


def _common_from_json(params: Mapping[str, Any], where: str) -> tuple[str, tuple[Any, ...], str, tuple[int, ...]]:
    axis, routes, worlds = params.get("axis"), params.get("routes"), params.get("worlds")
    blocks = params.get("blocks", [])
    if not isinstance(axis, str) or not isinstance(worlds, str):
        raise SpecError(f"{where}.params: axis and worlds must be strings, found {axis!r} and {worlds!r}.")
    if not isinstance(blocks, list) or not all(type(b) is int for b in blocks):
        raise SpecError(f"{where}.params.blocks: expected a list of ints, found {blocks!r}.")
    rows = routes if blocks else [routes]
    if not isinstance(routes, list) or not all(isinstance(r, list) and all(type(w) is int for w in r) for r in rows):
        raise SpecError(f"{where}.params.routes: expected a list of ints (a list of such lists with blocks), "
                        f"found {routes!r}.")
    return axis, tuple(tuple(r) for r in routes) if blocks else tuple(routes), worlds, tuple(blocks)


def _check(params: Mapping[str, Any], fields: tuple[str, ...], where: str) -> None:
    if isinstance(params, Mapping) and "blocks" in params:
        fields = (*fields, "blocks")
    if not isinstance(params, Mapping) or set(params) != set(fields):
        found = sorted(params) if isinstance(params, Mapping) else type(params).__name__
        raise SpecError(f"{where}.params: expected the fields {sorted(fields)}, found {found}. "
                        "Fix: write the spec with save_spec.")


def _rotated_to_json(layer: Any, put_array: Callable[[Any], Any]) -> dict[str, Any]:
    return {**_common_to_json(layer), "k": layer.k, "weight": _put_variable(layer.weight, put_array)}


def _rotated_from_json(params: Mapping[str, Any], get_array: Callable[[Any, str], Any]) -> RotatedSubspaceInterchange:
    where = "RotatedSubspaceInterchange"
    _check(params, (*_COMMON, "k", "weight"), where)
    axis, routes, worlds, blocks = _common_from_json(params, where)
    if type(params["k"]) is not int:
        raise SpecError(f"{where}.params.k: expected an int, found {params['k']!r}.")
    return RotatedSubspaceInterchange(_get_parameter(params["weight"], "weight", get_array, where), params["k"],
                                      axis, routes, worlds, blocks)


def _low_rank_to_json(layer: Any, put_array: Callable[[Any], Any]) -> dict[str, Any]:
    return {**_common_to_json(layer), "weight": _put_variable(layer.weight, put_array)}


def _low_rank_from_json(params: Mapping[str, Any], get_array: Callable[[Any, str], Any]) -> LowRankRotatedInterchange:
    where = "LowRankRotatedInterchange"
    _check(params, (*_COMMON, "weight"), where)
    axis, routes, worlds, blocks = _common_from_json(params, where)
    return LowRankRotatedInterchange(_get_parameter(params["weight"], "weight", get_array, where), axis, routes,
                                     worlds, blocks)


def _mask_to_json(layer: Any, put_array: Callable[[Any], Any]) -> dict[str, Any]:
    return {**_common_to_json(layer), "weight": _put_variable(layer.weight, put_array),
            "mask_logits": _put_variable(layer.mask_logits, put_array),
            "temperature": {"value": float(_read(layer.temperature)), "label": _label(layer.temperature)}}


def _mask_from_json(params: Mapping[str, Any], get_array: Callable[[Any, str], Any]) -> BoundlessMask:
    where = "BoundlessMask"
    _check(params, (*_COMMON, "weight", "mask_logits", "temperature"), where)
    axis, routes, worlds, blocks = _common_from_json(params, where)
    temperature = params["temperature"]
    if (not isinstance(temperature, Mapping) or set(temperature) != {"value", "label"}
            or type(temperature["value"]) not in (int, float) or not temperature["value"] > 0):
        raise SpecError(f"{where}.params.temperature: expected {{'value': a positive number, 'label': ...}}, "
                        f"found {temperature!r:.80}.")
    label = temperature["label"]
    value = jnp.float32(temperature["value"])
    held = value if label is None else StateVariable(value, label) if isinstance(label, str) and label else None
    if held is None:
        raise SpecError(f"{where}.params.temperature.label: expected a non-empty string or null, found {label!r}.")
    return BoundlessMask(_get_parameter(params["weight"], "weight", get_array, where),
                         _get_parameter(params["mask_logits"], "mask_logits", get_array, where), held, axis, routes,
                         worlds, blocks)


register_spec_operation("RotatedSubspaceInterchange", RotatedSubspaceInterchange, _rotated_to_json,
                        _rotated_from_json)
register_spec_operation("LowRankRotatedInterchange", LowRankRotatedInterchange, _low_rank_to_json,
                        _low_rank_from_json)
register_spec_operation("BoundlessMask", BoundlessMask, _mask_to_json, _mask_from_json)
