"""Sharding by axis names: place a lifted model's arrays on a device mesh by what their axes mean.

A lifted model already says what every axis of every array is (``heads``,
``features``, ``batch``), so a sharding layout is just a table from those
names to mesh axes, ``{"heads": "model", "batch": "data"}``
(:class:`ShardingRules`), instead of one ``PartitionSpec`` per array
written by hand in storage order. From that table:

- :func:`partition_spec` / :func:`named_sharding` give the spec of one named
  array (or named shape): each data axis gets the rule of its name,
  positional axes and names without a rule are replicated;
- :func:`shard_model` places every variable's value with ``jax.device_put``
  on a copy of the model (the input is never changed, sharing is kept), and
  :func:`sharding_specs` lists the resulting spec per variable label;
- :class:`ConstrainSharding` is a layer that pins the layout of the
  activation flowing through it (``jax.lax.with_sharding_constraint`` by
  names), :func:`constrain_sharding` inserts it after (or before) selected
  layers, and :func:`shard_inputs` places input activations.

Names travel with the data, so the same rules fit a ``pzb.nn`` model, a
lifted stock-layer model and a traced custom module alike, and the spec
follows a transposed or re-laid-out array without any bookkeeping.
Lowering keeps the placed buffers (see
:func:`pzbridge.bridge.sharding.lower_sharded` for the NNX metadata).
Bad rules are found before JAX sees them: a mesh axis the mesh lacks, a
mesh axis used twice in one spec and an axis whose size the mesh axis does
not divide are each a :class:`ShardingError` naming the variable, the
sizes and a fix. Only ``core`` and ``nn`` are imported (docs/architecture.md,
"Layers of the package").

Example:
    >>> import jax, jax.numpy as jnp, numpy as np
    >>> import pzbridge as pzb
    >>> mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]).reshape(1, 1), ("data", "model"))
    >>> rules = ShardingRules({"heads": "model", "batch": "data"})
    >>> x = pzb.nx.wrap(jnp.ones((2, 4, 3)), "batch", "heads", "features")
    >>> named_sharding(x, mesh, rules).spec
    P('data', 'model', None)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any, Union

import jax
from jax.sharding import AbstractMesh, Mesh, NamedSharding, PartitionSpec

from pzbridge.core import named_axes as nx
from pzbridge.core.errors import PzbridgeError, format_path
from pzbridge.core.struct import pytree_dataclass, static_field
from pzbridge.core.variables import (
    AbstractVariableValue,
    LabeledVariable,
    Parameter,
    ParameterValue,
)
from pzbridge.nn.layer import Layer
from pzbridge.toolshed.intermediates import LayerSelector, insert_layers

__all__ = [
    "ConstrainSharding",
    "MeshAxes",
    "ShardingError",
    "ShardingRules",
    "axis_rules",
    "constrain_sharding",
    "named_sharding",
    "partition_spec",
    "shard_inputs",
    "shard_model",
    "sharding_specs",
]

MeshAxes = Union[str, tuple[str, ...], None]
"""Where one named axis goes: a mesh axis name, several (sharded over their product), or None (replicated)."""

AnyMesh = Union[Mesh, AbstractMesh]


class ShardingError(PzbridgeError, ValueError):
    """Sharding rules that do not fit an array or a mesh.

    Example:
        >>> try:
        ...     ShardingRules({"heads": 3})
        ... except ShardingError as err:
        ...     print(str(err).split(":")[0])
        ShardingRules
    """


def _mesh_axes(axis: str, value: Any) -> MeshAxes:
    """Normalises one rule's right-hand side: one name stays a str, several a tuple, none is None."""
    if value is None:
        return None
    items = (value,) if isinstance(value, str) else value
    if not isinstance(items, (tuple, list)) or not all(isinstance(v, str) and v for v in items):
        raise ShardingError(
            f"ShardingRules: the rule for axis {axis!r} must be a mesh axis name, a tuple of them or None, "
            f"found {value!r}. Fix: e.g. {{{axis!r}: 'model'}} or {{{axis!r}: ('data', 'model')}}."
        )
    if len(set(items)) != len(items):
        raise ShardingError(
            f"ShardingRules: the rule for axis {axis!r} names a mesh axis twice ({tuple(items)}). "
            "Fix: give each mesh axis once."
        )
    if not items:
        return None
    return items[0] if len(items) == 1 else tuple(items)


def _as_tuple(mesh_axes: MeshAxes) -> tuple[str, ...]:
    if mesh_axes is None:
        return ()
    return (mesh_axes,) if isinstance(mesh_axes, str) else mesh_axes


@dataclasses.dataclass(frozen=True)
class ShardingRules:
    """A frozen table from named axes to mesh axes.

    An axis without a rule, or with the rule ``None``, is replicated. The
    table is hashable, so it can be a static field of a layer and a ``jit``
    static argument.

    Attributes:
      rules: ``((axis name, mesh axes), ...)``; build it from a mapping
        ``{"heads": "model", "batch": "data", "features": None}``. The mesh
        axes of one name are a mesh axis name or a tuple of them (the axis is
        split over their product).

    Raises:
      ShardingError: If a name is not a non-empty string or a rule is not a
        mesh axis name, a tuple of them or None.

    Example:
        >>> rules = ShardingRules({"heads": "model", "batch": ("data",), "seq": None})
        >>> rules.mesh_axes("heads"), rules.mesh_axes("batch"), rules.mesh_axes("features")
        ('model', 'data', None)
    """

    # A mapping is accepted and stored as the normalised tuple of pairs.
    rules: tuple[tuple[str, MeshAxes], ...] | Mapping[str, Any] = ()

    def __post_init__(self) -> None:
        items = self.rules.items() if isinstance(self.rules, Mapping) else self.rules
        pairs: list[tuple[str, MeshAxes]] = []
        for pair in items:
            if not (isinstance(pair, tuple) and len(pair) == 2 and isinstance(pair[0], str) and pair[0]):
                raise ShardingError(
                    f"ShardingRules: rules must map axis names to mesh axes, found {self.rules!r:.80}. "
                    "Fix: e.g. ShardingRules({'heads': 'model', 'batch': 'data'})."
                )
            pairs.append((pair[0], _mesh_axes(pair[0], pair[1])))
        names = [name for name, _ in pairs]
        if len(set(names)) != len(names):
            raise ShardingError(f"ShardingRules: an axis name is given twice ({names}). Fix: give each name once.")
        object.__setattr__(self, "rules", tuple(pairs))

    @classmethod
    def of(cls, rules: ShardingRules | Mapping[str, Any]) -> ShardingRules:
        """``rules`` as a :class:`ShardingRules` (a mapping is converted).

        Example:
            >>> ShardingRules.of({"heads": "model"}) == ShardingRules({"heads": "model"})
            True
        """
        return rules if isinstance(rules, ShardingRules) else cls(rules)

    def as_dict(self) -> dict[str, MeshAxes]:
        """The table as a plain dict.

        Example:
            >>> ShardingRules({"heads": "model"}).as_dict()
            {'heads': 'model'}
        """
        return dict(self.rules)

    def mesh_axes(self, name: str | None) -> MeshAxes:
        """The mesh axes of the named axis ``name`` (None: replicated; a positional axis passes None).

        Example:
            >>> ShardingRules({"heads": "model"}).mesh_axes("heads")
            'model'
        """
        return None if name is None else dict(self.rules).get(name)


def axis_rules(rules: Mapping[str, Any] | None = None, /, **named: Any) -> ShardingRules:
    """Builds :class:`ShardingRules` from a mapping and/or keywords.

    Example:
        >>> axis_rules(heads="model", batch="data").as_dict()
        {'heads': 'model', 'batch': 'data'}
    """
    return ShardingRules({**dict(rules or {}), **named})


# -- specs ------------------------------------------------------------------------------


def _data_axis_names(x: Any, what: str) -> tuple[str | None, ...]:
    """The name of each data axis of ``x`` in storage order (None for positional axes)."""
    if isinstance(x, nx.NamedArray):
        return (None,) * len(x.positional_shape) + tuple(x.named_axes)
    if isinstance(x, nx.NamedArrayView):
        names: list[str | None] = [None] * len(x.data_shape)
        for name, axis in x.data_axis_for_name.items():
            names[axis] = name
        return tuple(names)
    if isinstance(x, Mapping):
        return tuple(x)
    raise ShardingError(
        f"{what}: expected a named array or a named shape {{name: size}}, found {type(x).__name__}. "
        "Fix: wrap the array first, e.g. pzb.nx.wrap(array, 'batch', 'features')."
    )


def _data_shape(x: Any) -> tuple[int, ...]:
    if isinstance(x, nx.NamedArrayView):
        return tuple(x.data_shape)
    if isinstance(x, Mapping):
        return tuple(x.values())
    return tuple(x.data_array.shape)


def _spec_entries(names: Sequence[str | None], rules: ShardingRules, what: str) -> tuple[MeshAxes, ...]:
    entries = tuple(rules.mesh_axes(name) for name in names)
    owner: dict[str, str] = {}
    for name, entry in zip(names, entries):
        for mesh_axis in _as_tuple(entry):
            if mesh_axis in owner:
                raise ShardingError(
                    f"{what}: mesh axis {mesh_axis!r} is used by both axis {owner[mesh_axis]!r} and axis {name!r} "
                    f"of one array (axes {list(names)}), and an array can be split over a mesh axis only once. "
                    f"Fix: map one of them to another mesh axis or to None, e.g. {{{name!r}: None}}."
                )
            owner[mesh_axis] = name  # type: ignore[assignment]
    return entries


def partition_spec(x: Any, rules: ShardingRules | Mapping[str, Any], *, label: str = "") -> PartitionSpec:
    """The ``PartitionSpec`` of a named array (or named shape) under ``rules``, one entry per data axis.

    Entry ``i`` is the rule of the name stored at data axis ``i``; positional
    axes and names without a rule are ``None`` (replicated). A
    ``NamedArrayView`` gets the spec of its data as stored.

    Args:
      x: A ``NamedArray`` / ``NamedArrayView``, or an ordered named shape
        ``{name: size}`` (all axes named, in storage order).
      rules: The rules (a mapping is converted).
      label: What to call ``x`` in errors (a variable label or a model path).

    Returns:
      A ``PartitionSpec`` with as many entries as ``x`` has data axes.

    Raises:
      ShardingError: If ``x`` is not named, or two of its axes map to one mesh axis.

    Example:
        >>> import jax.numpy as jnp, pzbridge as pzb
        >>> x = pzb.nx.wrap(jnp.ones((5, 4, 3))).tag_prefix("heads")   # positional (5,) then names
        >>> partition_spec(x.untag_prefix("heads"), {"heads": "model"})
        P(None, None, None)
        >>> partition_spec({"batch": 2, "heads": 4}, {"heads": "model"})
        P(None, 'model')
    """
    what = label or "partition_spec"
    return PartitionSpec(*_spec_entries(_data_axis_names(x, what), ShardingRules.of(rules), what))


def _check_mesh(spec: PartitionSpec, names: Sequence[str | None], shape: Sequence[int], mesh: AnyMesh,
                what: str) -> None:
    sizes = dict(mesh.shape)
    for name, size, entry in zip(names, shape, spec):
        mesh_axes = _as_tuple(entry)
        missing = [a for a in mesh_axes if a not in sizes]
        if missing:
            raise ShardingError(
                f"{what}: axis {name!r} is mapped to mesh axis {missing[0]!r}, which the mesh does not have "
                f"(mesh axes: {sizes}). Fix: map {name!r} to one of {list(sizes)} or to None, or build the mesh "
                f"with an axis named {missing[0]!r}."
            )
        parts = 1
        for a in mesh_axes:
            parts *= sizes[a]
        if size % parts:
            raise ShardingError(
                f"{what}: axis {name!r} has size {size}, which mesh axes {mesh_axes} of total size {parts} do not "
                f"divide, so it cannot be split evenly. Fix: map {name!r} to a mesh axis whose size divides "
                f"{size} (or to None to replicate it), or change the mesh shape."
            )


def named_sharding(x: Any, mesh: AnyMesh, rules: ShardingRules | Mapping[str, Any], *,
                   label: str = "") -> NamedSharding:
    """The ``NamedSharding`` that places ``x`` on ``mesh`` by its axis names.

    Args:
      x: A named array or an ordered named shape (see :func:`partition_spec`).
      mesh: A ``jax.sharding.Mesh`` (or ``AbstractMesh``).
      rules: The rules (a mapping is converted).
      label: What to call ``x`` in errors (a variable label or a model path).

    Returns:
      ``NamedSharding(mesh, partition_spec(x, rules))``.

    Raises:
      ShardingError: If a rule names a mesh axis ``mesh`` lacks, two axes of
        ``x`` map to one mesh axis, or an axis size is not divisible by the
        size of its mesh axes (the axis, both sizes and a fix are named).

    Example:
        >>> from jax.sharding import AbstractMesh
        >>> mesh = AbstractMesh((2, 4), ("data", "model"))
        >>> named_sharding({"batch": 6, "heads": 8}, mesh, {"batch": "data", "heads": "model"}).spec
        P('data', 'model')
        >>> try:
        ...     named_sharding({"heads": 6}, mesh, {"heads": "model"}, label="attn.query.weights")
        ... except ShardingError as err:
        ...     print(str(err)[:55])
        attn.query.weights: axis 'heads' has size 6, which mesh
    """
    what = label or "named_sharding"
    _check_mesh_type(mesh, what, concrete=False)
    names = _data_axis_names(x, what)
    spec = PartitionSpec(*_spec_entries(names, ShardingRules.of(rules), what))
    _check_mesh(spec, names, _data_shape(x), mesh, what)
    return NamedSharding(mesh, spec)


# -- placing a model -----------------------------------------------------------------


def _place_value(value: Any, mesh: AnyMesh, rules: ShardingRules, label: str) -> Any:
    """``value`` with every named array placed by its names and every other jax array replicated on ``mesh``."""

    def place(leaf: Any) -> Any:
        if nx.is_namedarray(leaf):
            sharding = named_sharding(leaf, mesh, rules, label=label)
            return dataclasses.replace(leaf, data_array=jax.device_put(leaf.data_array, sharding))
        if isinstance(leaf, jax.Array):
            # A raw array (a Foreign child's weight) has no names: replicated, but on the mesh.
            return jax.device_put(leaf, NamedSharding(mesh, PartitionSpec()))
        return leaf

    return jax.tree_util.tree_map(place, value, is_leaf=nx.is_namedarray)


def _is_variable_leaf(node: Any) -> bool:
    return isinstance(node, (LabeledVariable, AbstractVariableValue))


def _chosen(variable: Any, state: bool) -> bool:
    return isinstance(variable, (Parameter, ParameterValue)) or state


def _check_mesh_type(mesh: Any, where: str, *, concrete: bool = True) -> None:
    # Placing needs devices; a constraint or a spec check can work on an AbstractMesh.
    if not isinstance(mesh, Mesh if concrete else (Mesh, AbstractMesh)):
        raise ShardingError(
            f"{where}: expected a jax.sharding.Mesh{'' if concrete else ' (or AbstractMesh)'}, found "
            f"{type(mesh).__name__}. Fix: build one over your devices, e.g. "
            "jax.sharding.Mesh(np.array(jax.devices()).reshape(2, 4), ('data', 'model'))."
        )


def shard_model(model: Any, mesh: Mesh, rules: ShardingRules | Mapping[str, Any], *, state: bool = True) -> Any:
    """A copy of ``model`` whose variable values are placed on ``mesh`` by their axis names.

    Every ``Parameter`` (and, with ``state=True``, every ``StateVariable``)
    is replaced by a new variable of the same kind, label and metadata whose
    value is ``jax.device_put`` with :func:`named_sharding`; frozen values
    are placed the same way. One variable reached from several places gives
    one new variable (sharing is kept). Raw arrays without names are
    replicated on the mesh. ``model`` and its variables are not changed.

    Args:
      model: A lifted model (any pytree holding variables).
      mesh: The device mesh.
      rules: The rules (a mapping is converted).
      state: Also place (and copy) the state variables. With ``False`` they
        are copied unplaced, so the result still shares no state with ``model``.

    Returns:
      The placed copy.

    Raises:
      ShardingError: If the rules do not fit a variable (its label is named).

    Example:
        >>> import jax, jax.numpy as jnp, numpy as np, pzbridge as pzb
        >>> mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]).reshape(1, 1), ("data", "model"))
        >>> w = pzb.Parameter(pzb.nx.wrap(jnp.ones((4, 3)), "heads", "features"), "w")
        >>> placed = shard_model([w, w], mesh, {"heads": "model"})
        >>> placed[0] is placed[1], placed[0] is w, placed[0].value.data_array.sharding.spec
        (True, False, P('model', None))
    """
    _check_mesh_type(mesh, "shard_model")
    rules = ShardingRules.of(rules)
    leaves, treedef = jax.tree_util.tree_flatten(model, is_leaf=_is_variable_leaf)
    copies: dict[int, Any] = {}
    out = []
    for leaf in leaves:
        if isinstance(leaf, LabeledVariable):
            if id(leaf) not in copies:
                value = _place_value(leaf.value, mesh, rules, f"{type(leaf).__name__} {leaf.label!r}") \
                    if _chosen(leaf, state) else leaf.value
                copies[id(leaf)] = type(leaf)(value, leaf.label, leaf.metadata)
            out.append(copies[id(leaf)])
        elif isinstance(leaf, AbstractVariableValue) and _chosen(leaf, state):
            value = _place_value(leaf.value, mesh, rules, f"{type(leaf).__name__} {leaf.label!r}")
            out.append(dataclasses.replace(leaf, value=value))
        else:
            out.append(leaf)
    return jax.tree_util.tree_unflatten(treedef, out)


def sharding_specs(model: Any, rules: ShardingRules | Mapping[str, Any], *, mesh: AnyMesh | None = None,
                   state: bool = True) -> dict[str, Any]:
    """``{label: PartitionSpec}`` for every variable of ``model`` under ``rules`` (for inspection).

    A named value gets its spec by names (see :func:`partition_spec`); a raw
    array gets a fully replicated spec; a value that is a pytree of arrays
    gets the same pytree of specs; variables holding no array (an empty
    cache, a slot) are left out.

    Args:
      model: A lifted model.
      rules: The rules (a mapping is converted).
      mesh: If given, the specs are also checked against it (see :func:`named_sharding`).
      state: Include the state variables.

    Returns:
      A dict in order of first occurrence.

    Example:
        >>> import jax, pzbridge as pzb
        >>> from pzbridge.models.gpt import build_gpt
        >>> gpt = build_gpt("g", jax.random.key(0), 8, 1, 2, 4, 8, 4)
        >>> sharding_specs(gpt, {"heads": "model"})["g.blocks.0.attn.query.weights"]
        P(None, 'model', None)
    """
    rules = ShardingRules.of(rules)
    specs: dict[str, Any] = {}
    for leaf in jax.tree_util.tree_leaves(model, is_leaf=_is_variable_leaf):
        if not _is_variable_leaf(leaf) or not _chosen(leaf, state) or leaf.label in specs:
            continue
        what = f"{type(leaf).__name__} {leaf.label!r}"

        def spec_of(x: Any, what: str = what) -> Any:
            if nx.is_namedarray(x):
                return named_sharding(x, mesh, rules, label=what).spec if mesh is not None \
                    else partition_spec(x, rules, label=what)
            return PartitionSpec() if hasattr(x, "shape") else None

        value = leaf.value
        spec = spec_of(value) if nx.is_namedarray(value) else jax.tree_util.tree_map(
            spec_of, value, is_leaf=nx.is_namedarray)
        if spec is not None and jax.tree_util.tree_leaves(spec, is_leaf=lambda s: isinstance(s, PartitionSpec)):
            specs[leaf.label] = spec
    return specs


def shard_inputs(x: Any, mesh: Mesh, rules: ShardingRules | Mapping[str, Any]) -> Any:
    """Places input activations on ``mesh`` by their names (``batch`` -> ``data``, ...).

    Every named array in the pytree ``x`` is placed by :func:`named_sharding`;
    plain jax arrays are replicated on the mesh; other leaves are kept.
    Inside ``jax.jit`` this acts as a placement constraint.

    Args:
      x: A named array or a pytree of them (and other leaves).
      mesh: The device mesh.
      rules: The rules (a mapping is converted).

    Returns:
      ``x`` with placed data.

    Raises:
      ShardingError: If the rules do not fit one of the arrays.

    Example:
        >>> import jax, jax.numpy as jnp, numpy as np, pzbridge as pzb
        >>> mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]).reshape(1, 1), ("data", "model"))
        >>> tokens = pzb.nx.wrap(jnp.zeros((2, 5), jnp.int32), "batch", "seq")
        >>> shard_inputs(tokens, mesh, {"batch": "data"}).data_array.sharding.spec
        P('data', None)
    """
    _check_mesh_type(mesh, "shard_inputs")
    return _place_value(x, mesh, ShardingRules.of(rules), "shard_inputs")


# -- constraints inside a model ---------------------------------------------------------------


@pytree_dataclass
class ConstrainSharding(Layer):
    """Pins the layout of the activation passing through: ``with_sharding_constraint`` by axis names.

    Each named array in the input (a pytree of them is accepted) is
    constrained to the :func:`named_sharding` of its own names, so the
    layer fits any place in a model whatever the activation's storage
    order; other leaves pass unchanged. Outside ``jit`` this places the
    value.

    Attributes:
      rules: The rules (static).
      mesh: The mesh (static), or None for the mesh set with
        ``jax.set_mesh(mesh)`` around the call.
      name: What to call this constraint in errors (static; e.g. the path it
        was inserted at).

    Raises:
      ShardingError: (when called) if no mesh is available, the input holds
        no named array, or the rules do not fit it.

    Example:
        >>> import jax, jax.numpy as jnp, numpy as np, pzbridge as pzb
        >>> mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]).reshape(1, 1), ("data", "model"))
        >>> layer = ConstrainSharding(ShardingRules({"batch": "data"}), mesh)
        >>> x = pzb.nx.wrap(jnp.ones((2, 3)), "batch", "features")
        >>> "sharding_constraint" in str(jax.make_jaxpr(layer)(x)), pzb.tree_equal(jax.jit(layer)(x), x)
        (True, True)
    """

    rules: ShardingRules = static_field()
    mesh: AnyMesh | None = static_field(default=None)
    name: str = static_field(default="ConstrainSharding")

    def __post_init__(self) -> None:
        if not isinstance(self.rules, ShardingRules):
            object.__setattr__(self, "rules", ShardingRules.of(self.rules))
        if self.mesh is not None:
            _check_mesh_type(self.mesh, self.name, concrete=False)

    def _mesh(self) -> AnyMesh:
        if self.mesh is not None:
            return self.mesh
        mesh = jax.sharding.get_abstract_mesh()
        if mesh is None or mesh.empty:
            raise ShardingError(
                f"{self.name}: no mesh: the layer was built with mesh=None and no mesh is set. "
                "Fix: pass mesh= when building it, or call the model under `with jax.set_mesh(mesh):`."
            )
        return mesh

    def __call__(self, x: Any, /, **side_inputs: Any) -> Any:
        mesh = self._mesh()
        found = []

        def constrain(leaf: Any) -> Any:
            if not nx.is_namedarray(leaf):
                return leaf
            found.append(leaf)
            sharding = named_sharding(leaf, mesh, self.rules, label=self.name)
            target: Any = sharding if isinstance(mesh, Mesh) else sharding.spec
            return dataclasses.replace(leaf, data_array=jax.lax.with_sharding_constraint(leaf.data_array, target))

        out = jax.tree_util.tree_map(constrain, x, is_leaf=nx.is_namedarray)
        if not found:
            raise ShardingError(
                f"{self.name}: expected a named array (or a pytree holding some), found {type(x).__name__}. "
                "Fix: insert the constraint where activations are named arrays (after a layer of the lifted model)."
            )
        return out


def constrain_sharding(model: Any, at: LayerSelector, rules: ShardingRules | Mapping[str, Any],
                       mesh: AnyMesh | None = None, *, where: str | None = None) -> Any:
    """Returns a copy of ``model`` with a :class:`ConstrainSharding` after (or before) every selected layer.

    Args:
      model: The model (not modified).
      at: Which layers: a :class:`~pzbridge.toolshed.where.Where`, a
        ``Selection``, a layer class or a predicate (see
        :func:`~pzbridge.toolshed.intermediates.resolve_selection`).
      rules: The rules (a mapping is converted).
      mesh: The mesh, or None for the one set with ``jax.set_mesh``.
      where: ``"after"`` (constrain the output) or ``"before"`` (the input);
        default: the ``Where``'s side, else ``"after"``.

    Returns:
      The edited model; each inserted layer is named after the path it follows.

    Raises:
      SelectionError: If ``at`` selects nothing.

    Example:
        >>> import pzbridge as pzb
        >>> model = pzb.nn.Sequential([pzb.nn.Identity(), pzb.nn.Identity()])
        >>> edited = constrain_sharding(model, pzb.nn.Identity, {"batch": "data"})
        >>> [type(l).__name__ for l in edited.sublayers]
        ['Identity', 'ConstrainSharding', 'Identity', 'ConstrainSharding']
    """
    rules = ShardingRules.of(rules)

    def make(path: Any, node: Any) -> Layer:
        return ConstrainSharding(rules, mesh, name=f"ConstrainSharding at {format_path(path)}")

    return insert_layers(model, at, make, where=where)

