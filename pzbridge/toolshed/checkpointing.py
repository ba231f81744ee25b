"""Saving and restoring a lifted model's variables with orbax, by label.

A lifted model's learned state is exactly its variables, and every variable
has a unique label (its model path), so a checkpoint is a mapping
``label -> value`` plus a JSON *description*: each variable's kind, the axis
names, shapes and dtypes of its value's leaves, and the model's structure
(the class at every layer path). Restoring matches labels, not positions,
into a freshly lifted (or freshly built) model of the same architecture, or
rebuilds free-standing variables (:func:`load_variables`) for a model built
with slots (``from_config(..., init_base_rng=None)``).

Three guarantees:

- **All or nothing.** Before anything is loaded, the target is compared with
  the checkpoint; every difference (missing or extra labels, kinds, shapes,
  dtypes, axis names, structure) is collected into ONE
  :class:`CheckpointError`, and the target is left unchanged. Values are only
  assigned once every array has been read and checked.
- **Only committed versions count.** ``directory`` holds numbered versions
  (``directory/3``). A save writes its version into a hidden staging
  directory, writes a commit marker (every file's size and sha256) last, and
  only then renames it to the next number; older versions beyond ``keep``
  are renamed to a hidden trash name before they are deleted. A save killed
  at any moment leaves the previous versions intact and nothing unfinished
  listed; its hidden leftovers are deleted by the next save. Numbered
  directories without a valid marker (an empty ``2/``) are ignored. See
  :mod:`pzbridge.toolshed.checkpoint_store` for the steps.
- **Damage is reported, never loaded.** A restore checks the version's files
  against its marker (sizes, and with ``verify=True`` the sha256 of every
  byte) before orbax reads them, and checks each array read against the
  description.

Every failure is a :class:`CheckpointError` naming the directory, what was
expected and what was found, and the fix; a failed restore touches no file,
and a failed save leaves no version and no temporary directory behind. One
process saves into a directory at a time.

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
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from pzbridge.core import named_axes as nx
from pzbridge.core.abstract import abstract_error
from pzbridge.core.errors import CheckpointError, PzbridgeError
from pzbridge.core.struct import Struct
from pzbridge.core.variables import (
    AbstractVariableSlot,
    LabeledVariable,
    Parameter,
    StateVariable,
    bind_variables,
    unbind_variables,
)
from pzbridge.toolshed import checkpoint_io as cio
from pzbridge.toolshed import checkpoint_store as store
from pzbridge.toolshed.checkpoint_io import FORMAT

_KINDS: dict[str, type[LabeledVariable]] = {"Parameter": Parameter, "StateVariable": StateVariable}


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
            f"cannot checkpoint a variable leaf {leaf!r}: expected arrays, named arrays or Python numbers, found "
            f"{type(leaf).__name__}. Fix: keep variable values as arrays."
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
    """The committed checkpoint versions under ``directory``, oldest first.

    Only versions whose save finished count: unfinished saves, versions being
    deleted and numbered directories without a commit marker are not listed.

    Example:
        >>> import tempfile, pathlib
        >>> root = pathlib.Path(tempfile.mkdtemp()); (root / "2").mkdir()  # no commit marker: not a version
        >>> versions(root)
        []
    """
    root = pathlib.Path(directory)
    if not root.is_dir():
        return []
    try:
        return store.committed_versions(root)
    except OSError as error:
        raise cio.error("versions of", root, f"expected a readable directory, found {cio.summary(error)}",
                        "check the directory's permissions") from error


def save(directory: str | pathlib.Path, model: Any, *, keep: int = 1) -> pathlib.Path:
    """Saves ``model``'s variables (values, axis names, structure) as a new committed version.

    The new version is written and committed completely (staging directory,
    commit marker last, rename to its number) before older versions beyond
    ``keep`` are removed (renamed to a hidden trash name, then deleted), so an
    interrupted save never destroys the previous checkpoint and never leaves
    an unfinished version listed.

    Args:
      directory: The checkpoint root (created if needed).
      model: A lifted model with bound, concrete variables.
      keep: How many committed versions to keep (``>= 1``).

    Returns:
      The path of the version written.

    Raises:
      CheckpointError: If ``keep < 1``, ``directory`` is a file, the model is
        not lifted (no pzbridge variables), is abstract, or holds something
        other than arrays, or writing fails. Nothing is left behind: no
        version, no temporary directory (and a directory the save created is
        removed again).

    Example:
        >>> import tempfile, jax.numpy as jnp
        >>> root = tempfile.mkdtemp()
        >>> save(root, [Parameter(jnp.ones(2), "w")]).name
        '1'
    """
    root = pathlib.Path(directory)
    if isinstance(keep, bool) or not isinstance(keep, int) or keep < 1:
        raise cio.error("save to", root, f"expected keep to be an integer >= 1, found keep={keep!r}",
                        "pass keep=1 or more")
    description, arrays = _contents(model, root)  # Every check that needs no disk comes first.
    created = cio.prepare_root(root)
    try:
        target = cio.write_version(root, arrays, description)
    except BaseException:
        cio.remove_created(created)  # A root this save made goes again: a failed save leaves nothing.
        raise
    cio.prune(root, target, keep)
    return target


def _contents(model: Any, root: pathlib.Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """The description and ``key -> array`` mapping a save writes; raises before anything touches the disk."""
    abstract = abstract_error(model, "saving", CheckpointError)
    if abstract is not None:
        raise CheckpointError(f"save to {str(root)!r}: {abstract}")
    try:
        description = describe(model)
        _, variables = unbind_variables(model)
    except PzbridgeError as error:
        raise CheckpointError(f"save to {str(root)!r}: {error}") from error
    if not variables:
        raise cio.error(
            "save to", root, f"expected a lifted model holding pzbridge variables, found {_unlifted(model)}",
            "lift the module and save that (pzb.checkpoint.save(path, pzb.lift(module))); a model without "
            "variables has nothing to checkpoint",
        )
    arrays: dict[str, Any] = {}
    for index, variable in enumerate(variables):
        leaves, _ = _canonical_leaves(variable.value)
        for j, leaf in enumerate(leaves):
            key = f"v{index}_{j}"
            arrays[key] = _raw_array(leaf)
            description["variables"][index]["leaves"][j]["key"] = key
    return description, arrays


def _unlifted(model: Any) -> str:
    cls = type(model)
    count = sum(1 for leaf in jax.tree_util.tree_leaves(model) if hasattr(leaf, "shape") and hasattr(leaf, "dtype"))
    arrays = f"{count} array{'s' if count != 1 else ''}"
    framework = {"flax": "Flax NNX", "equinox": "Equinox"}.get(cls.__module__.split(".")[0])
    if framework:
        return (f"an un-lifted {framework} module {cls.__module__}.{cls.__qualname__} with no pzbridge variables "
                f"(its {arrays} would not be saved)")
    return f"a {cls.__qualname__} with no pzbridge variables ({arrays}, none inside a Parameter or StateVariable)"


def read_description(directory: str | pathlib.Path, version: int | None = None) -> dict[str, Any]:
    """Reads a checkpoint's description (labels, kinds, axes, shapes, structure) without its arrays.

    Raises:
      CheckpointError: If there is no committed version (or not ``version``),
        or its description files are damaged or not a pzbridge description.

    Example:
        >>> import tempfile, jax.numpy as jnp
        >>> root = tempfile.mkdtemp(); _ = save(root, [Parameter(jnp.ones(2), "w")])
        >>> [v["label"] for v in read_description(root)["variables"]]
        ['w']
    """
    path, marker = cio.find_version(directory, version, "read_description from")
    return cio.read_description_at(path, marker, "read_description from")


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
    directory: str | pathlib.Path,
    target: Any,
    *,
    version: int | None = None,
    check_structure: bool = True,
    verify: bool = True,
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
      version: Which committed version to load (default: the latest).
      check_structure: Also require the same class at every layer path.
      verify: Compare the sha256 of every file with what the save recorded
        before reading (file sizes are always compared). ``False`` skips
        reading the files twice for very large checkpoints.

    Returns:
      The target with the checkpoint's values.

    Raises:
      CheckpointError: Listing EVERY difference between the checkpoint and the
        target (missing / extra labels, kinds, shapes, dtypes, axis names,
        structure), or naming what is wrong on disk (no committed version,
        damaged or unreadable files); nothing is loaded, the target is
        unchanged and no file is touched.

    Example:
        >>> import tempfile, jax.numpy as jnp
        >>> root = tempfile.mkdtemp(); _ = save(root, [Parameter(jnp.ones(2), "w")])
        >>> try:
        ...     restore(root, [Parameter(jnp.ones(3), "w"), Parameter(jnp.ones(1), "b")])
        ... except CheckpointError as e:
        ...     print(str(e).splitlines()[1:-1])
        ["  - missing from checkpoint: Parameter 'b'", "  - 'w': shape (2,) in checkpoint, (3,) in model"]
    """
    action = "restore from"
    path, marker = cio.find_version(directory, version, action)
    description = cio.read_description_at(path, marker, action)
    problems = _differences(description, target, check_structure)
    if problems:
        raise CheckpointError(
            f"restore: the checkpoint in {str(path)!r} does not match the target model "
            f"({len(problems)} difference{'s' if len(problems) > 1 else ''}); nothing was loaded:\n"
            + "\n".join(f"  - {p}" for p in problems)
            + "\nFix: restore into a model of the same architecture (lift the same model class with the same "
            "configuration), or edit the target (e.g. add the same LoRA adapters) before restoring."
        )
    arrays = cio.read_arrays_at(path, marker, description, action, verify)
    slots, variables = unbind_variables(target)
    saved = {entry["label"]: entry for entry in description["variables"]}
    new_values = []
    for variable in variables:
        entry = saved[variable.label]
        leaves, treedef = _canonical_leaves(variable.value)
        rebuilt = [_rebuild_leaf(spec, arrays[spec["key"]], leaf) for leaf, spec in zip(leaves, entry["leaves"])]
        new_values.append(jax.tree_util.tree_unflatten(treedef, rebuilt))
    # Every array is read and checked: only now touch the target.
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


def load_variables(
    directory: str | pathlib.Path, *, version: int | None = None, verify: bool = True
) -> tuple[LabeledVariable, ...]:
    """Rebuilds the checkpoint's variables (labels, kinds, named axes) as new objects.

    Bind them into a model built with slots (``from_config(..., None)``) with
    ``pzb.bind_variables(model, variables)``. ``version`` and ``verify`` are
    as in :func:`restore`, and so are the errors.

    Example:
        >>> import tempfile, jax.numpy as jnp
        >>> root = tempfile.mkdtemp(); _ = save(root, [Parameter(nx.wrap(jnp.ones(2), "features"), "w")])
        >>> (w,) = load_variables(root)
        >>> w.label, dict(w.value.named_shape)
        ('w', {'features': 2})
    """
    action = "load_variables from"
    path, marker = cio.find_version(directory, version, action)
    description = cio.read_description_at(path, marker, action)
    arrays = cio.read_arrays_at(path, marker, description, action, verify)
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
