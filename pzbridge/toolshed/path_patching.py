"""Path patching and multi-source interchange on a worlds axis, in one forward pass.

Activation patching (:func:`~pzbridge.toolshed.worlds.patch_worlds`) changes
a *node*: everything downstream of the patched activation sees the other
world's value. Path patching changes an *edge*: the sender's value from
another world reaches the chosen receivers, and only them. Every other
consumer of the sender, and every component between the sender and a
receiver, still sees the clean run, so the measured effect is the one that
travels along the path sender -> receivers.

Here the three runs of the usual recipe (clean, "sender world", patched
clean) are worlds of one pass. For each world ``t`` whose receivers read
another world (``routes[t] != t``), :func:`patch_paths` adds two helper
worlds, both copies of ``t``'s input:

- a *pure* copy ``p``, never edited: the clean reference;
- a *sender world* ``h``: at the sender it reads the source world's value,
  at every frozen component it reads ``p`` (so the sender's effect reaches
  nothing through them), everything else computes freely.

At each receiver, world ``t`` adds ``h - p``: the change the sender makes
there through the unfrozen plumbing only. The addition (rather than a copy
of ``h``) makes several receivers compose: a receiver downstream of another
keeps the effect of the first and gains its own direct contribution, which
is what makes "receivers = every consumer of the sender" equal ordinary
activation patching of the sender on residual-stream models. The helper
worlds are cut off again at the output, so the edited model maps the
``N`` input worlds to ``N`` output worlds. All routing is
:class:`~pzbridge.toolshed.worlds.RouteWorlds` (copies) and
:class:`TransferWorlds` (the additions), placed with the ordinary location
language (:class:`~pzbridge.toolshed.where.Where`, whose index restricts a
site to some units, e.g. one head).

The default frozen components are the ``delta`` of every
:class:`~pzbridge.nn.combinators.Residual` (what writes into a residual
stream: blocks of a ``pzb.nn`` model, traced child calls such as
``x = x + attn(x)``), except those containing the sender or contained in
it. The plumbing between sender and receiver (the residual sums, glue ops)
is recomputed, so the result is exact for residual-stream models and for
any model where nothing unfrozen lies on the way.

:func:`interchange` is the multi-source form of activation patching: several
sites, each with its own routes (head 0 from source 1, layer 1's output from
source 2), all resolved on the original model and inserted together.

Only core and nn are imported (docs/architecture.md, "Layers of the package").

Example:
    >>> import jax, jax.numpy as jnp, pzbridge as pzb
    >>> ka, kb = jax.random.split(jax.random.key(0))
    >>> model = pzb.nn.Sequential([
    ...     pzb.nn.Residual(pzb.nn.Elementwise(lambda v: 2.0 * v)),
    ...     pzb.nn.Residual(pzb.nn.Elementwise(lambda v: 10.0 * v)),
    ... ])
    >>> x = pzb.nx.wrap(jnp.array([1.0, 2.0]), "worlds")     # clean = 1, corrupt = 2
    >>> # the first block's corrupt output reaches only the second block's input:
    >>> # clean 1 + 2*1, plus 10 * (1 + 2*2)
    >>> patched = patch_paths(model, Where(path="sublayers[0].delta"),
    ...                       Where(path="sublayers[1].delta", side="before"), routes=(1, 1))
    >>> patched(x).unwrap("worlds").tolist()
    [53.0, 66.0]
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

from pzbridge.core import named_axes as nx
from pzbridge.core.errors import NamedAxisError, PzbridgeError, format_path
from pzbridge.core.selectors import KeyPath, select
from pzbridge.core.struct import pytree_dataclass, static_field
from pzbridge.nn.combinators import Residual, Sequential
from pzbridge.nn.layer import Layer
from pzbridge.toolshed.intermediates import LayerSelector, resolve_selection, side_of
from pzbridge.toolshed.interventions import AtIndex
from pzbridge.toolshed.where import Where
from pzbridge.toolshed.worlds import WORLDS, RouteWorlds

__all__ = ["RESIDUAL_DELTAS", "SelectWorlds", "TransferWorlds", "interchange", "patch_paths", "residual_deltas"]

RESIDUAL_DELTAS = "residual_deltas"
"""The default ``freeze=`` of :func:`patch_paths`: the ``delta`` of every ``Residual`` (see :func:`residual_deltas`)."""


def _worlds_of(leaf: Any, axis: str, who: str, expected: int | None = None) -> int:
    """The size of ``axis`` on ``leaf``; an error naming the fix when it is missing (or not ``expected``)."""
    size = leaf.named_shape.get(axis) if nx.is_namedarray(leaf) else None
    if size is None or (expected is not None and size != expected):
        want = f"the axis {axis!r}" + (f" of size {expected}" if expected is not None else "")
        raise NamedAxisError(
            f"{who}: expected an activation with {want}, found named shape "
            f"{dict(getattr(leaf, 'named_shape', {}))}. Fix: run the model on stack_worlds([...]) with one input "
            "per world (as many as routes has entries)."
        )
    return size


def _world_vector(indices: Sequence[int], axis: str) -> nx.NamedArray:
    return nx.wrap(jnp.asarray(tuple(indices), dtype=jnp.int32), axis)


@pytree_dataclass
class SelectWorlds(Layer):
    """World ``i`` of the output is world ``indices[i]`` of the input (the output may have more or fewer worlds).

    :class:`~pzbridge.toolshed.worlds.RouteWorlds` keeps the number of
    worlds; this layer changes it, which is how :func:`patch_paths` adds its
    helper worlds at the input and drops them at the output.

    Attributes:
      indices: The input world of each output world (static).
      size: The number of input worlds expected (static).
      axis: The worlds axis (static).

    Example:
        >>> import jax.numpy as jnp, pzbridge as pzb
        >>> SelectWorlds((0, 1, 0), size=2)(pzb.nx.wrap(jnp.array([4.0, 7.0]), "worlds")).unwrap("worlds").tolist()
        [4.0, 7.0, 4.0]
    """

    indices: tuple[int, ...] = static_field()
    size: int = static_field()
    axis: str = static_field(default=WORLDS)

    def __post_init__(self) -> None:
        indices = tuple(self.indices)
        if not indices or not all(_is_world(i, self.size) for i in indices):
            raise PzbridgeError(
                f"SelectWorlds: indices must name worlds in [0, {self.size}), found {indices}. "
                "Fix: give at least one index, each below the number of input worlds."
            )
        object.__setattr__(self, "indices", indices)

    def __call__(self, x: Any, /, **side_inputs: Any) -> Any:
        picked = _world_vector(self.indices, self.axis)

        def pick(leaf: Any) -> Any:
            _worlds_of(leaf, self.axis, "SelectWorlds", self.size)
            return leaf[{self.axis: picked}]

        return jax.tree_util.tree_map(pick, x, is_leaf=nx.is_namedarray)

    def reads_across(self) -> tuple[str, ...]:
        """The worlds axis: the layer mixes its entries (an adapter runs it on all of them at once)."""
        return (self.axis,)


def _is_world(value: Any, n: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < n


@pytree_dataclass
class TransferWorlds(Layer):
    """Adds to world ``targets[k]`` the difference of worlds ``plus[k]`` and ``minus[k]`` (all read from the input).

    This is how a path arrives at a receiver: the change the sender made in
    its helper world (``plus``, the sender world, minus ``minus``, the pure
    copy) is added to the target world, optionally only at the units
    ``at.index`` names. Other worlds and units pass through unchanged
    (bitwise: a ``where`` with a constant mask).

    Attributes:
      targets: The worlds that receive (static).
      plus: For each target, the world whose activation is added (static).
      minus: For each target, the world whose activation is subtracted (static).
      at: The ``Where`` whose index limits the units (static; ``None``: every unit).
      site: The model path of the receiver, for messages (static).
      axis: The worlds axis (static).

    Example:
        >>> import jax.numpy as jnp, pzbridge as pzb
        >>> layer = TransferWorlds(targets=(0,), plus=(2,), minus=(1,))
        >>> layer(pzb.nx.wrap(jnp.array([1.0, 10.0, 13.0]), "worlds")).unwrap("worlds").tolist()
        [4.0, 10.0, 13.0]
    """

    targets: tuple[int, ...] = static_field()
    plus: tuple[int, ...] = static_field()
    minus: tuple[int, ...] = static_field()
    at: Where | None = static_field(default=None)
    site: str = static_field(default="")
    axis: str = static_field(default=WORLDS)

    def __post_init__(self) -> None:
        for name in ("targets", "plus", "minus"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        if not len(self.targets) == len(self.plus) == len(self.minus):
            raise PzbridgeError(
                f"TransferWorlds: targets, plus and minus must have one entry each per target, found lengths "
                f"{len(self.targets)}, {len(self.plus)}, {len(self.minus)}. Fix: pass equally long tuples."
            )

    def reads_across(self) -> tuple[str, ...]:
        """The worlds axis: the layer mixes its entries (an adapter runs it on all of them at once)."""
        return (self.axis,)

    def __call__(self, x: Any, /, **side_inputs: Any) -> Any:
        who = f"TransferWorlds at {self.site}" if self.site else "TransferWorlds"
        if not self.targets:
            return x

        def transfer(leaf: Any) -> Any:
            n = _worlds_of(leaf, self.axis, who)
            bad = [w for w in self.targets + self.plus + self.minus if not _is_world(w, n)]
            if bad:
                raise NamedAxisError(
                    f"{who}: worlds {bad} are outside the {n} worlds of the activation. Fix: build the layer for "
                    f"this number of worlds (patch_paths does)."
                )
            if not jnp.issubdtype(leaf.dtype, jnp.inexact):
                raise PzbridgeError(
                    f"{who}: a receiver's activation must be a float array to add a path's change to it, found "
                    f"dtype {leaf.dtype}. Fix: choose a receiver with a float input or output (not token ids)."
                )
            plus, minus = list(range(n)), list(range(n))
            for t, p, m in zip(self.targets, self.plus, self.minus):
                plus[t], minus[t] = p, m
            moved = leaf + (leaf[{self.axis: _world_vector(plus, self.axis)}]
                            - leaf[{self.axis: _world_vector(minus, self.axis)}])
            mask = nx.wrap(jnp.isin(jnp.arange(n), jnp.asarray(self.targets, dtype=jnp.int32)), self.axis)
            if self.at is not None and self.at.index:
                mask = mask & self.at.index_mask(leaf, who)
            return nx.where(mask, moved, leaf)

        return jax.tree_util.tree_map(transfer, x, is_leaf=nx.is_namedarray)


def residual_deltas(model: Any) -> tuple[KeyPath, ...]:
    """The keypaths of the ``delta`` of every :class:`~pzbridge.nn.combinators.Residual` in ``model``.

    These are the components that write into a residual stream, and the
    default set :func:`patch_paths` freezes.

    Example:
        >>> import pzbridge as pzb
        >>> model = pzb.nn.Sequential([pzb.nn.Residual(pzb.nn.Identity()), pzb.nn.Identity()])
        >>> [pzb.errors.format_path(p) for p in residual_deltas(model)]
        ['sublayers[0].delta']
    """
    found = select(model).at_instances_of(Residual).get_by_path()
    paths = [tuple(path) + (jax.tree_util.GetAttrKey("delta"),) for path in found]
    # Nested residuals (a Residual inside a delta) are found too: at_instances_of stops at the outermost,
    # so walk into each delta as well.
    for path, node in found.items():
        inner = residual_deltas(node.delta)
        paths.extend(tuple(path) + (jax.tree_util.GetAttrKey("delta"),) + tuple(p) for p in inner)
    return tuple(paths)


# -- placing several routing layers at once ---------------------------------------------------------


_Placement = tuple[KeyPath, str, Layer]  # (keypath, "before"/"after", layer)


def _sites(model: Any, at: LayerSelector, default_side: str, what: str) -> tuple[list[KeyPath], str, Where | None]:
    """The keypaths ``at`` selects, the side to act on and the ``Where`` (for its index)."""
    side = side_of(at, None) if isinstance(at, Where) else default_side
    paths = [tuple(p) for p in resolve_selection(model, at, what=what).get_keypaths()]
    return paths, side, at if isinstance(at, Where) else None


def _place(model: Any, placements: Sequence[_Placement]) -> Any:
    """``model`` with each layer placed before / after its keypath, in the given order per place.

    All keypaths refer to the *original* model. Each place is wrapped in a
    ``Sequential`` in place (never spliced into a list, which would move its
    siblings' keypaths), deepest first, so an outer place wraps a subtree
    that already holds its inner edits.
    """
    grouped: dict[KeyPath, tuple[list[Layer], list[Layer]]] = {}
    for path, side, layer in placements:
        before, after = grouped.setdefault(path, ([], []))
        (before if side == "before" else after).append(layer)
    edited = model
    share = False  # The first edit makes fresh StateVariables (never the user's); later edits keep those.
    for path in sorted(grouped, key=len, reverse=True):
        before, after = grouped[path]
        edited = select(edited).at_keypaths([path]).apply(
            lambda node, b=before, a=after: Sequential([*b, node, *a]), share_state=share)
        share = True
    return edited


def _restricted(layer: Layer, at: Where | None) -> Layer:
    return AtIndex(layer, at) if at is not None and at.index else layer


def _check_routes(routes: Sequence[int], who: str) -> tuple[int, ...]:
    routes = tuple(routes)
    if not routes or not all(_is_world(r, len(routes)) for r in routes):
        raise PzbridgeError(
            f"{who}: routes must name, for each of the {len(routes)} worlds, a world in [0, {len(routes)}), "
            f"found {routes}. Fix: e.g. routes=(1, 1) with worlds [clean, corrupt] makes the clean world read "
            "the corrupt one."
        )
    return routes


def _several(selector: Any) -> list[Any]:
    """A list of ``Where``s as several selectors; anything else (a tuple of classes too) as one."""
    if isinstance(selector, (list, tuple)) and selector and all(isinstance(s, Where) for s in selector):
        return list(selector)
    return [selector]


def _is_related(a: KeyPath, b: KeyPath) -> bool:
    """Whether one keypath is a strict prefix of the other (one place contains the other)."""
    return a != b and (a[: len(b)] == b or b[: len(a)] == a)


def patch_paths(
    model: Any,
    sender: LayerSelector,
    receivers: LayerSelector | Sequence[Where],
    routes: Sequence[int],
    *,
    freeze: LayerSelector | Sequence[Where] | str | None = RESIDUAL_DELTAS,
    axis: str = WORLDS,
) -> Any:
    """Returns a copy of ``model`` in which world ``w``'s receivers read the sender from world ``routes[w]``.

    Run the result on :func:`~pzbridge.toolshed.worlds.stack_worlds` of one
    input per world (``len(routes)`` of them). World ``w`` of the output is
    the run on ``w``'s input in which the sender's value from world
    ``routes[w]``'s run reaches the receivers through the direct path only:
    the frozen components keep ``w``'s own values there, and every other
    consumer of the sender sees ``w``'s own sender. A world with
    ``routes[w] == w`` is an ordinary run; ``tuple(range(n))`` changes nothing.

    Args:
      model: The model (not modified).
      sender: The sender site (a ``Where``: its side, default its output, and its index, e.g. one head;
        a selection, class or predicate: the selected layers' outputs). Several matches are all senders.
      receivers: One receiver site or a list of ``Where``s (a ``Where`` acts at its side; a selection,
        class or predicate acts on the selected layers' inputs).
      routes: For each world, the world whose sender its receivers read.
      freeze: The components the sender's effect must not pass through: the default, the ``delta`` of
        every ``Residual``; a ``Where`` or list of them (at their sides), a selection / class / predicate
        (at the outputs); or ``None``.
        Components containing the sender or contained in it are never frozen.
      axis: The worlds axis name.

    Returns:
      The edited model, mapping ``N`` worlds to ``N`` worlds (the helper worlds live inside it).

    Raises:
      PzbridgeError: If ``routes`` is not one valid world per world, or a receiver is not a float activation.
      SelectionError: If the sender, a receiver or ``freeze`` selects nothing.
      NamedAxisError: At run time, if the input does not have ``len(routes)`` worlds.

    Example:
        >>> import jax.numpy as jnp, pzbridge as pzb
        >>> model = pzb.nn.Sequential([pzb.nn.Elementwise(jnp.square), pzb.nn.Elementwise(jnp.negative)])
        >>> x = pzb.nx.wrap(jnp.array([3.0, 5.0]), "worlds")
        >>> patched = patch_paths(model, Where(path="sublayers[0]"), Where(path="sublayers[1]", side="before"),
        ...                       routes=(1, 1), freeze=None)
        >>> patched(x).unwrap("worlds").tolist()   # -(9 + (25 - 9)): every consumer, so activation patching
        [-25.0, -25.0]
    """
    routes = _check_routes(routes, "patch_paths")
    n = len(routes)
    targets = [w for w in range(n) if routes[w] != w]
    pure = {t: n + k for k, t in enumerate(targets)}
    helper = {t: n + len(targets) + k for k, t in enumerate(targets)}

    def source(w: int) -> int:
        return pure.get(w, w)  # A target world is edited, so read its pure copy.

    sender_paths, sender_side, sender_at = _sites(model, sender, "after", "the sender")
    receiver_list = _several(receivers)
    size = n + 2 * len(targets)

    transfers: list[_Placement] = []
    for k, receiver in enumerate(receiver_list):
        paths, side, at = _sites(model, receiver, "before", f"receiver {k}")
        for path in paths:
            layer = TransferWorlds(tuple(targets), tuple(helper[t] for t in targets), tuple(pure[t] for t in targets),
                                   at=at, site=f"{format_path(path)} ({side})", axis=axis)
            transfers.append((path, side, layer))

    freezes: list[_Placement] = []
    if freeze is not None:
        if isinstance(freeze, str):
            if freeze != RESIDUAL_DELTAS:
                raise PzbridgeError(
                    f"patch_paths: freeze={freeze!r} is not known; expected {RESIDUAL_DELTAS!r}, a Where, a "
                    "selection, a class, a predicate or None. Fix: e.g. freeze=Where(module='attns.*')."
                )
            groups: list[tuple[list[KeyPath], str, Where | None]] = [(list(residual_deltas(model)), "after", None)]
        else:
            groups = [_sites(model, f, "after", f"freeze {k}") for k, f in enumerate(_several(freeze))]
        route = list(range(size))
        for t in targets:
            route[helper[t]] = pure[t]
        for freeze_paths, freeze_side, freeze_at in groups:
            frozen = _restricted(RouteWorlds(tuple(route), axis), freeze_at)
            freezes.extend((path, freeze_side, frozen) for path in freeze_paths
                           if not any(_is_related(path, s) for s in sender_paths))

    route = list(range(size))
    for t in targets:
        route[helper[t]] = source(routes[t])
    sending = _restricted(RouteWorlds(tuple(route), axis), sender_at)
    senders = [(path, sender_side, sending) for path in sender_paths]

    # At one place: receivers first (they read the sender world before it is frozen there), then freezes,
    # then the sender (it wins over a freeze of the same units). Each reads only worlds no earlier one wrote.
    edited = _place(model, transfers + freezes + senders)
    expand = tuple(range(n)) + tuple(targets) + tuple(targets)
    return Sequential([SelectWorlds(expand, n, axis), edited, SelectWorlds(tuple(range(n)), size, axis)])


def interchange(
    model: Any, sites: Sequence[tuple[LayerSelector, Sequence[int]]], *, axis: str = WORLDS
) -> Any:
    """Returns a copy of ``model`` in which, at each site, world ``w`` reads world ``routes[w]``'s activation.

    Multi-source interchange in one pass: with worlds ``[base, source_1,
    source_2]``, ``[(site_a, (1, 1, 2)), (site_b, (2, 1, 2))]`` gives the base
    run site ``a`` from source 1 and site ``b`` from source 2, the sources
    running unchanged. Every site is resolved on the original model before
    anything is inserted, so path-based ``Where``s stay valid. At one place,
    sites apply in the order given (a later one sees the earlier's result).

    Args:
      model: The model (not modified).
      sites: ``(at, routes)`` pairs; ``at`` as for
        :func:`~pzbridge.toolshed.worlds.patch_worlds` (a ``Where``'s index limits the units).
      axis: The worlds axis name.

    Returns:
      The edited model.

    Raises:
      PzbridgeError: If ``sites`` is empty or a site's routes are invalid or differ in length.
      SelectionError: If a site selects nothing.

    Example:
        >>> import jax.numpy as jnp, pzbridge as pzb
        >>> model = pzb.nn.Sequential([pzb.nn.Identity()])
        >>> x = pzb.nx.wrap(jnp.array([[0.0, 0.0], [1.0, 1.0], [2.0, 2.0]]), "worlds", "seq")
        >>> sites = [(Where(layer="Identity", index={"seq": 0}), (1, 1, 2)),
        ...          (Where(layer="Identity", index={"seq": 1}), (2, 1, 2))]
        >>> interchange(model, sites)(x).unwrap("worlds", "seq").tolist()
        [[1.0, 2.0], [1.0, 1.0], [2.0, 2.0]]
    """
    if not sites:
        raise PzbridgeError("interchange: expected at least one (at, routes) site, found none. "
                            "Fix: e.g. interchange(model, [(Where(module='attns.0'), (1, 1))]).")
    placements: list[_Placement] = []
    n = None
    for k, (at, routes) in enumerate(sites):
        routes = _check_routes(routes, f"interchange site {k}")
        if n is not None and len(routes) != n:
            raise PzbridgeError(
                f"interchange: site {k} has {len(routes)} routes but site 0 has {n}; every site routes the same "
                "worlds. Fix: give each site one route per world."
            )
        n = len(routes)
        paths, side, where_at = _sites(model, at, "after", f"interchange site {k}")
        layer = _restricted(RouteWorlds(routes, axis), where_at)
        placements.extend((path, side, layer) for path in paths)
    return _place(model, placements)

