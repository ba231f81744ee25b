"""Saving and restoring a lifted model's variables with orbax, by label.

A lifted model's learned state is exactly its variables, and every variable
has a unique label (its model path), so a checkpoint is a mapping
``label -> value`` plus a JSON *description*: each variable's kind, the axis
names, shapes and dtypes of its value's leaves, and the model's structure
(the class at every layer path). Restoring matches labels, not positions,
into a freshly lifted (or freshly built) model of the same architecture, or
rebuilds free-standing variables (:func:`load_variables`) for a model built
with slots (``from_config(..., init_base_rng=None)``).

Two guarantees:

- **All or nothing.** Before anything is loaded, the target is compared with
  the checkpoint; every difference (missing or extra labels, kinds, shapes,
  dtypes, axis names, structure) is collected into ONE
  :class:`CheckpointError`, and the target is left unchanged. Values are only
  assigned once every array has been read.
- **Atomic saves.** ``directory`` holds numbered versions (``directory/3``).
  Each save writes a new version with orbax, which writes into a temporary
  directory and renames it when complete; only then are older versions
  removed. A save killed midway leaves an unfinished temporary directory
  that restore ignores, and the previous version intact.

Both follow the rule every pzbridge operation keeps: a failed operation
leaves the user's model, parameters and files exactly as they were.

Example:
    >>> import tempfile, jax, jax.numpy as jnp, pzbridge as pzb
    >>> from pzbridge.nn.linear import Linear
    >>> model = Linear.from_config("d", jax.random.key(0), {"features": 2}, {"features": 3})
    >>> path = tempfile.mkdtemp()
    >>> _ = save(path, model)
    >>> fresh = Linear.from_config("d", jax.random.key(7), {"features": 2}, {"features": 3})
    >>> restored = restore(path, fresh)
    >>> bool((restored.weights.value.data_array == model.weights.value.data_array).all())
    True
"""

from __future__ import annotations

import pathlib
import shutil
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from pzbridge.core import named_axes as nx
from pzbridge.core.errors import PzbridgeError
from pzbridge.core.struct import Struct
from pzbridge.core.variables import (
    AbstractVariableSlot,
    LabeledVariable,
    Parameter,
    StateVariable,
    bind_variables,
    unbind_variables,
)

FORMAT = "pzbridge-checkpoint/1"
_KINDS: dict[str, type[LabeledVariable]] = {"Parameter": Parameter, "StateVariable": StateVariable}


class CheckpointError(PzbridgeError, ValueError):
    """A checkpoint cannot be saved or does not match the model it is restored into.

    Example:
        >>> isinstance(CheckpointError("missing 'w'"), ValueError)
        True
    """


# ---------------------------------------------------------------------------
# Describing a model's variables.


def _leaf_spec(leaf: Any) -> dict[str, Any]:
    if nx.is_namedarray(leaf):
        data = leaf.data_array
        spec = {
            "named_axes": list(leaf.named_shape),
            "named_sizes": [int(s) for s in leaf.named_shape.values()],
            "positional_shape": [int(s) for s in leaf.positional_shape],
        }
        array = data
    else:
        spec = {"named_axes": None}
        array = leaf
    if isinstance(array, (bool, int, float)):
        spec["python"] = type(array).__name__
        array = np.asarray(array)
    dtype = getattr(array, "dtype", None)
    if dtype is None:
        raise CheckpointError(
            f"cannot checkpoint a variable leaf of type {type(leaf).__name__} ({leaf!r}): only arrays, named "
            "arrays and Python numbers are supported. Fix: keep variable values as arrays."
        )
    if jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
        spec["prng_impl"] = str(jax.random.key_impl(array))
        array = jax.random.key_data(array)
    spec["dtype"] = str(np.dtype(array.dtype))
    spec["shape"] = [int(s) for s in np.shape(array)]
    return spec


def _raw_array(leaf: Any) -> Any:
    array = leaf.data_array if nx.is_namedarray(leaf) else leaf
    if isinstance(array, (bool, int, float)):
        return np.asarray(array)
    if jax.dtypes.issubdtype(getattr(array, "dtype", np.float32), jax.dtypes.prng_key):
        return jax.random.key_data(array)
    return array


def _canonical_leaves(value: Any) -> tuple[list[Any], Any]:
    leaves, treedef = jax.tree_util.tree_flatten(value, is_leaf=nx.is_namedarray)
    # Views store data in any layout; canonical form = positional prefix then names in order.
    return [leaf.canonicalize() if isinstance(leaf, nx.NamedArrayView) else leaf for leaf in leaves], treedef


def structure_of(model: Any) -> list[list[str]]:
    """The class at every struct path of ``model`` (variables and arrays excluded).

    This is the architecture fingerprint a checkpoint records; two lifts of
    the same architecture have equal structures.

    Example:
        >>> import pzbridge as pzb
        >>> structure_of(pzb.nn.Sequential([pzb.nn.Identity()]))
        [['<root>', 'Sequential'], ['sublayers[0]', 'Identity']]
    """
    from pzbridge.core.errors import format_path

    found: list[list[str]] = []

    def visit(path: tuple, node: Any) -> None:
        if isinstance(node, Struct) and not nx.is_namedarray(node):
            found.append([format_path(path), type(node).__qualname__])
            for child_path, child in jax.tree_util.tree_flatten_with_path(
                node, is_leaf=lambda x: x is not node and isinstance(x, Struct)
            )[0]:
                if isinstance(child, Struct):
                    visit(path + child_path, child)

    visit((), model)
    return [entry for entry in found if not entry[1].endswith(("Slot", "Value"))]


def describe(model: Any) -> dict[str, Any]:
    """The JSON description a checkpoint of ``model`` stores (no array data).

    Args:
      model: A lifted model whose variables are bound (mutable or frozen).

    Returns:
      ``{"format", "variables": [{"label", "kind", "treedef", "leaves": [...]}], "structure"}``.

    Example:
        >>> import jax.numpy as jnp
        >>> d = describe([Parameter(nx.wrap(jnp.ones((2, 3)), "a", "b"), "w")])
        >>> d["variables"][0]["leaves"][0]["named_axes"], d["variables"][0]["leaves"][0]["shape"]
        (['a', 'b'], [2, 3])
    """
    slots, variables = unbind_variables(model)
    entries = []
    for variable in variables:
        leaves, treedef = _canonical_leaves(variable.value)
        entries.append(
            {
                "label": variable.label,
                "kind": _kind_of(variable),
                "treedef": str(treedef),
                "leaves": [_leaf_spec(leaf) for leaf in leaves],
            }
        )
    return {"format": FORMAT, "variables": entries, "structure": structure_of(slots)}


def _kind_of(variable: LabeledVariable) -> str:
    return "Parameter" if isinstance(variable, Parameter) else "StateVariable"


# ---------------------------------------------------------------------------
# Versions on disk.


def versions(directory: str | pathlib.Path) -> list[int]:
    """The finished checkpoint versions under ``directory``, oldest first.

    Unfinished saves (orbax temporary directories) are not listed.

    Example:
        >>> import tempfile
        >>> versions(tempfile.mkdtemp())
        []
    """
    root = pathlib.Path(directory)
    if not root.is_dir():
        return []
    return sorted(int(p.name) for p in root.iterdir() if p.is_dir() and p.name.isdigit())


def _checkpointer() -> Any:
    import orbax.checkpoint as ocp

    return ocp, ocp.Checkpointer(ocp.CompositeCheckpointHandler())


def save(directory: str | pathlib.Path, model: Any, *, keep: int = 1) -> pathlib.Path:
    """Saves ``model``'s variables (values, axis names, structure) as a new version.

    The new version is written completely (orbax writes to a temporary
    directory and renames it) before older versions beyond ``keep`` are
    deleted, so an interrupted save never destroys the previous checkpoint.

    Args:
      directory: The checkpoint root (created if needed).
      model: A lifted model with bound variables.
      keep: How many versions to keep (``>= 1``).

    Returns:
      The path of the version written.

    Raises:
      CheckpointError: If a variable holds something other than arrays, or
        ``keep < 1``.

    Example:
        >>> import tempfile, jax.numpy as jnp
        >>> root = tempfile.mkdtemp()
        >>> save(root, [Parameter(jnp.ones(2), "w")]).name
        '1'
    """
    if keep < 1:
        raise CheckpointError(f"save: keep must be >= 1, found {keep}. Fix: pass keep=1 or more.")
    description = describe(model)
    _, variables = unbind_variables(model)
    arrays: dict[str, Any] = {}
    for index, variable in enumerate(variables):
        leaves, _ = _canonical_leaves(variable.value)
        for j, leaf in enumerate(leaves):
            key = f"v{index}_{j}"
            arrays[key] = _raw_array(leaf)
            description["variables"][index]["leaves"][j]["key"] = key
    root = pathlib.Path(directory)
    root.mkdir(parents=True, exist_ok=True)
    existing = versions(root)
    target = root / str((existing[-1] if existing else 0) + 1)
    ocp, checkpointer = _checkpointer()
    checkpointer.save(
        target.absolute(),
        args=ocp.args.Composite(arrays=ocp.args.StandardSave(arrays), description=ocp.args.JsonSave(description)),
    )
    for old in versions(root)[:-keep]:
        shutil.rmtree(root / str(old), ignore_errors=True)
    return target


def _latest(directory: str | pathlib.Path, version: int | None) -> pathlib.Path:
    found = versions(directory)
    if not found:
        raise CheckpointError(
            f"restore: no finished checkpoint in {str(directory)!r} (nothing numbered there). "
            "Fix: check the path, or save one with pzb.checkpoint.save(path, model)."
        )
    if version is None:
        return pathlib.Path(directory) / str(found[-1])
    if version not in found:
        raise CheckpointError(f"restore: version {version} not in {str(directory)!r}; available: {found}.")
    return pathlib.Path(directory) / str(version)


def read_description(directory: str | pathlib.Path, version: int | None = None) -> dict[str, Any]:
    """Reads a checkpoint's description (labels, kinds, axes, shapes, structure) without its arrays.

    Example:
        >>> import tempfile, jax.numpy as jnp
        >>> root = tempfile.mkdtemp(); _ = save(root, [Parameter(jnp.ones(2), "w")])
        >>> [v["label"] for v in read_description(root)["variables"]]
        ['w']
    """
    ocp, checkpointer = _checkpointer()
    path = _latest(directory, version)
    restored = checkpointer.restore(path.absolute(), args=ocp.args.Composite(description=ocp.args.JsonRestore()))
    description = restored["description"]
    if description.get("format") != FORMAT:
        raise CheckpointError(
            f"restore: {str(path)!r} is not a pzbridge checkpoint (format {description.get('format')!r}, "
            f"expected {FORMAT!r}). Fix: restore it with the tool that wrote it."
        )
    return description


def _read_arrays(directory: str | pathlib.Path, version: int | None, description: Mapping[str, Any]) -> dict[str, Any]:
    ocp, checkpointer = _checkpointer()
    abstract = {
        leaf["key"]: jax.ShapeDtypeStruct(tuple(leaf["shape"]), np.dtype(leaf["dtype"]))
        for entry in description["variables"]
        for leaf in entry["leaves"]
    }
    path = _latest(directory, version)
    restored = checkpointer.restore(path.absolute(), args=ocp.args.Composite(arrays=ocp.args.StandardRestore(abstract)))
    return dict(restored["arrays"])


def _rebuild_leaf(spec: Mapping[str, Any], array: Any, like: Any = None) -> Any:
    array = jnp.asarray(array)
    if "prng_impl" in spec:
        array = jax.random.wrap_key_data(array, impl=spec["prng_impl"])
    if "python" in spec:
        return {"int": int, "float": float, "bool": bool}[spec["python"]](array)
    if spec.get("named_axes") is None:
        return array
    saved = dict(zip(spec["named_axes"], spec["named_sizes"]))
    positional = len(spec["positional_shape"])
    value = nx.NamedArray(array, saved) if not positional else nx.wrap(array).tag(
        *[f"__p{i}" for i in range(positional)], *spec["named_axes"]
    ).untag(*[f"__p{i}" for i in range(positional)])
    if like is not None and nx.is_namedarray(like) and tuple(like.named_shape) != tuple(saved):
        value = value.order_as(*like.named_shape) if not positional else value.order_like(like)
    return value


# ---------------------------------------------------------------------------
# Restoring.


def _differences(description: Mapping[str, Any], target: Any, check_structure: bool) -> list[str]:
    _, variables = unbind_variables(target)
    saved = {entry["label"]: entry for entry in description["variables"]}
    slots = _slot_labels(target)
    problems: list[str] = []
    here = {v.label: v for v in variables}
    for label in here:
        if label not in saved:
            problems.append(f"missing from checkpoint: {type(here[label]).__name__} {label!r}")
    for label in slots:
        if label not in saved:
            problems.append(f"missing from checkpoint: slot {label!r}")
    for label, entry in saved.items():
        if label not in here and label not in slots:
            problems.append(f"extra in checkpoint (not in the model): {entry['kind']} {label!r}")
    for label, variable in here.items():
        entry = saved.get(label)
        if entry is None:
            continue
        if _kind_of(variable) != entry["kind"]:
            problems.append(f"{label!r}: kind {entry['kind']} in checkpoint, {_kind_of(variable)} in model")
            continue
        leaves, treedef = _canonical_leaves(variable.value)
        if str(treedef) != entry["treedef"] or len(leaves) != len(entry["leaves"]):
            problems.append(
                f"{label!r}: value structure {entry['treedef']} in checkpoint, {treedef} in model"
            )
            continue
        for j, (leaf, spec) in enumerate(zip(leaves, entry["leaves"])):
            problems.extend(_leaf_differences(f"{label!r}" + (f" leaf {j}" if len(leaves) > 1 else ""), leaf, spec))
    if check_structure:
        ours = {path: cls for path, cls in structure_of(unbind_variables(target)[0])}
        theirs = {path: cls for path, cls in description["structure"]}
        for path in sorted(set(ours) | set(theirs)):
            if ours.get(path) != theirs.get(path):
                problems.append(
                    f"structure at {path}: {theirs.get(path, 'nothing')} in checkpoint, {ours.get(path, 'nothing')} in model"
                )
    return problems


def _leaf_differences(where: str, leaf: Any, spec: Mapping[str, Any]) -> list[str]:
    mine = _leaf_spec(leaf)
    problems = []
    if (mine["named_axes"] is None) != (spec["named_axes"] is None):
        kind = lambda s: "named array" if s["named_axes"] is not None else "plain array"  # noqa: E731
        return [f"{where}: {kind(spec)} in checkpoint, {kind(mine)} in model"]
    if mine["named_axes"] is not None:
        saved_named = dict(zip(spec["named_axes"], spec["named_sizes"]))
        our_named = dict(zip(mine["named_axes"], mine["named_sizes"]))
        if set(saved_named) != set(our_named):
            problems.append(f"{where}: axes {saved_named} in checkpoint, {our_named} in model")
        elif saved_named != our_named or spec["positional_shape"] != mine["positional_shape"]:
            problems.append(
                f"{where}: shape {saved_named} (positional {spec['positional_shape']}) in checkpoint, "
                f"{our_named} (positional {mine['positional_shape']}) in model"
            )
    elif spec["shape"] != mine["shape"]:
        problems.append(f"{where}: shape {tuple(spec['shape'])} in checkpoint, {tuple(mine['shape'])} in model")
    if spec["dtype"] != mine["dtype"] or spec.get("prng_impl") != mine.get("prng_impl"):
        problems.append(f"{where}: dtype {spec['dtype']} in checkpoint, {mine['dtype']} in model")
    return problems


def _slot_labels(tree: Any) -> set[str]:
    leaves = jax.tree_util.tree_leaves(tree, is_leaf=lambda x: isinstance(x, AbstractVariableSlot))
    return {leaf.label for leaf in leaves if isinstance(leaf, AbstractVariableSlot)}


def restore(
    directory: str | pathlib.Path, target: Any, *, version: int | None = None, check_structure: bool = True
) -> Any:
    """Loads a checkpoint's values into ``target``'s variables, matched by label.

    Mutable variables in ``target`` are updated in place (and ``target`` is
    returned); slots in ``target`` are filled with new variables (and the
    filled tree is returned). Named-array values come back with the target's
    axis order (a transpose when the checkpoint stored another order), so a
    model lifted from a framework with another layout still loads.

    Args:
      directory: The checkpoint root given to :func:`save`.
      target: A model of the same architecture (freshly lifted or built).
      version: Which version to load (default: the latest finished one).
      check_structure: Also require the same class at every layer path.

    Returns:
      The target with the checkpoint's values.

    Raises:
      CheckpointError: Listing EVERY difference between the checkpoint and the
        target (missing / extra labels, kinds, shapes, dtypes, axis names,
        structure); nothing is loaded and the target is unchanged.

    Example:
        >>> import tempfile, jax.numpy as jnp
        >>> root = tempfile.mkdtemp(); _ = save(root, [Parameter(jnp.ones(2), "w")])
        >>> try:
        ...     restore(root, [Parameter(jnp.ones(3), "w"), Parameter(jnp.ones(1), "b")])
        ... except CheckpointError as e:
        ...     print(str(e).splitlines()[1:-1])
        ["  - missing from checkpoint: Parameter 'b'", "  - 'w': shape (2,) in checkpoint, (3,) in model"]
    """
    description = read_description(directory, version)
    problems = _differences(description, target, check_structure)
    if problems:
        raise CheckpointError(
            f"restore: the checkpoint in {str(directory)!r} does not match the target model "
            f"({len(problems)} difference{'s' if len(problems) > 1 else ''}); nothing was loaded:\n"
            + "\n".join(f"  - {p}" for p in problems)
            + "\nFix: restore into a model of the same architecture (lift the same model class with the same "
            "configuration), or edit the target (e.g. add the same LoRA adapters) before restoring."
        )
    arrays = _read_arrays(directory, version, description)
    slots, variables = unbind_variables(target)
    saved = {entry["label"]: entry for entry in description["variables"]}
    new_values = []
    for variable in variables:
        entry = saved[variable.label]
        leaves, treedef = _canonical_leaves(variable.value)
        rebuilt = [_rebuild_leaf(spec, arrays[spec["key"]], leaf) for leaf, spec in zip(leaves, entry["leaves"])]
        new_values.append(jax.tree_util.tree_unflatten(treedef, rebuilt))
    # Every array is read: only now touch the target.
    for variable, value in zip(variables, new_values):
        variable.value = value
    slot_labels = _slot_labels(target)
    if not slot_labels:
        return target
    fresh = [_new_variable(saved[label], arrays) for label in slot_labels]
    return bind_variables(target, fresh)


def _new_variable(entry: Mapping[str, Any], arrays: Mapping[str, Any]) -> LabeledVariable:
    leaves = [_rebuild_leaf(spec, arrays[spec["key"]]) for spec in entry["leaves"]]
    value = leaves[0] if entry["treedef"] == "PyTreeDef(*)" else _unflatten_from_text(entry, leaves)
    return _KINDS[entry["kind"]](value, entry["label"])


def _unflatten_from_text(entry: Mapping[str, Any], leaves: list[Any]) -> Any:
    raise CheckpointError(
        f"load_variables: {entry['label']!r} holds a pytree value ({entry['treedef']}), which can only be "
        "restored into a model that already has this variable. Fix: restore into a bound model with "
        "pzb.checkpoint.restore(path, model)."
    )


def load_variables(directory: str | pathlib.Path, *, version: int | None = None) -> tuple[LabeledVariable, ...]:
    """Rebuilds the checkpoint's variables (labels, kinds, named axes) as new objects.

    Bind them into a model built with slots (``from_config(..., None)``) with
    ``pzb.bind_variables(model, variables)``.

    Example:
        >>> import tempfile, jax.numpy as jnp
        >>> root = tempfile.mkdtemp(); _ = save(root, [Parameter(nx.wrap(jnp.ones(2), "features"), "w")])
        >>> (w,) = load_variables(root)
        >>> w.label, dict(w.value.named_shape)
        ('w', {'features': 2})
    """
    description = read_description(directory, version)
    arrays = _read_arrays(directory, version, description)
    return tuple(_new_variable(entry, arrays) for entry in description["variables"])


__all__ = [
    "CheckpointError",
    "describe",
    "load_variables",
    "read_description",
    "restore",
    "save",
    "structure_of",
    "versions",
]
