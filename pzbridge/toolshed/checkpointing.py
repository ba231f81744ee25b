"""Saving and restoring a lifted model's variables (and its optimizer state) with orbax, by label.

A lifted model's learned state is exactly its variables, and every variable
has a unique label (its model path), so a checkpoint is a mapping
``label -> value`` plus a JSON *description*: each variable's kind, the axis
names, shapes and dtypes of its value's leaves, and the model's structure
(the class at every layer path). The arrays are stored under their labels
(``layers.0.weights``; see :mod:`pzbridge.toolshed.checkpoint_leaves` for
the escaping). Restoring matches labels, not positions, into a freshly
lifted (or freshly built) model of the same architecture, or rebuilds
free-standing variables (:func:`load_variables`) for a model built with
slots (``from_config(..., init_base_rng=None)``). An optax state saved with
the model (``opt_state=``) comes back with :func:`restore_optimizer_state`,
so training resumes exactly where it stopped.

The directory follows orbax's ``CheckpointManager`` layout: one numbered
directory per *step* (``directory/1200``), the latest step being the
highest number; :class:`~pzbridge.toolshed.checkpoint_manager.CheckpointManager`
adds retention, save intervals and asynchronous saves on top. Other kinds of
models (lowered Equinox and NNX modules) plug in through :func:`register_codec`.

Three guarantees:

- **All or nothing.** Before anything is loaded, the target is compared with
  the checkpoint; every difference (missing or extra labels, kinds, shapes,
  dtypes, axis names, structure) is collected into ONE
  :class:`CheckpointError`, and the target is left unchanged. Values are only
  assigned once every array has been read and checked.
- **Only committed steps count.** A save writes its step into a hidden
  staging directory, writes a commit marker (every file's size and sha256)
  last, and only then renames it to its number; older steps beyond ``keep``
  are renamed to a hidden trash name before they are deleted. A save killed
  at any moment leaves the previous steps intact and nothing unfinished
  listed; its hidden leftovers are deleted by the next save. Numbered
  directories without a valid marker (an empty ``2/``) are ignored. See
  :mod:`pzbridge.toolshed.checkpoint_store` for the steps.
- **Damage is reported, never loaded.** A restore checks the step's files
  against its marker (sizes, and with ``verify=True`` the sha256 of every
  byte) before orbax reads them, and checks each array read against the
  description. The description records its format version; a checkpoint of
  a newer, unknown format is refused with a clear error, and format 1
  (arrays keyed ``v0_0``) is still read.

Every failure is a :class:`CheckpointError` naming the directory, what was
expected and what was found, and the fix; a failed restore touches no file,
and a failed save leaves no step and no temporary directory behind. One
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

import dataclasses
import json
import pathlib
from collections.abc import Callable, Mapping
from typing import Any, Protocol

import jax

from pzbridge.core import named_axes as nx
from pzbridge.core.abstract import abstract_error
from pzbridge.core.errors import CheckpointError, PzbridgeError, format_path
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
from pzbridge.toolshed.checkpoint_leaves import (
    canonical_leaves,
    flat_tree,
    host_array,
    leaf_differences,
    leaf_spec,
    rebuild_leaf,
    unique_keys,
)

_KINDS: dict[str, type[LabeledVariable]] = {"Parameter": Parameter, "StateVariable": StateVariable}


# ---------------------------------------------------------------------------
# Codecs: how a kind of model becomes labelled leaves and comes back.


class ModelCodec(Protocol):
    """How one kind of (non-lifted) model is checkpointed: labelled array leaves out, a new model back.

    :mod:`pzbridge.checkpoint` registers codecs for lowered Equinox and NNX
    modules (this layer never imports either framework).

    Attributes:
      kind: The ``model`` name recorded in the description (``"equinox"``).

    Example:
        >>> codec_for([Parameter(1.0, "w")]) is None  # lifted models need no codec
        True
    """

    kind: str

    def accepts(self, model: Any) -> bool:
        """Whether ``model`` is of this kind."""

    def leaves(self, model: Any) -> list[tuple[str, str, Any]]:
        """``(label, kind, leaf)`` for every array leaf (leaves may be abstract, ``jax.ShapeDtypeStruct``)."""

    def structure(self, model: Any) -> list[list[str]]:
        """``[path, class]`` pairs compared on restore with ``check_structure``."""

    def rebuild(self, model: Any, values: Mapping[str, Any]) -> Any:
        """A NEW model like ``model`` with the leaf of every label replaced by ``values[label]``."""


_CODECS: list[ModelCodec] = []


def register_codec(codec: ModelCodec) -> None:
    """Adds (or replaces, by ``kind``) the codec for one kind of model.

    Example:
        >>> class Pairs:
        ...     kind = "pairs-example"
        ...     def accepts(self, m): return isinstance(m, tuple) and m[:1] == ("pairs",)
        ...     def leaves(self, m): return [("x", "array", m[1])]
        ...     def structure(self, m): return []
        ...     def rebuild(self, m, values): return ("pairs", values["x"])
        >>> register_codec(Pairs()); codec_for(("pairs", 1.0)).kind
        'pairs-example'
        >>> _CODECS[:] = [c for c in _CODECS if c.kind != "pairs-example"]  # (the example cleans up)
    """
    _CODECS[:] = [c for c in _CODECS if c.kind != codec.kind] + [codec]


def codec_for(model: Any) -> ModelCodec | None:
    """The registered codec accepting ``model`` (``None``: a lifted model, or nothing known).

    Example:
        >>> codec_for([Parameter(1.0, "w")]) is None
        True
    """
    return next((codec for codec in _CODECS if codec.accepts(model)), None)


# ---------------------------------------------------------------------------
# Describing a model.


def structure_of(model: Any) -> list[list[str]]:
    """The class at every struct path of ``model`` (variables and arrays excluded).

    This is the architecture fingerprint a checkpoint records; two lifts of
    the same architecture have equal structures.

    Example:
        >>> import pzbridge as pzb
        >>> structure_of(pzb.nn.Sequential([pzb.nn.Identity()]))
        [['<root>', 'Sequential'], ['sublayers[0]', 'Identity']]
    """
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


def _kind_of(variable: LabeledVariable) -> str:
    return "Parameter" if isinstance(variable, Parameter) else "StateVariable"


def _entries(model: Any) -> tuple[str, list[dict[str, Any]], list[list[str]], list[list[Any]]]:
    """``(model kind, entries, structure, leaves per entry)`` of a lifted model or a codec's model."""
    codec = codec_for(model)
    if codec is not None:
        triples = codec.leaves(model)
        entries = []
        for label, kind, leaf in triples:
            try:
                spec = leaf_spec(leaf)
            except CheckpointError as error:
                raise CheckpointError(f"{label}: {error}") from error  # say where in the module
            entries.append({"label": label, "kind": kind, "treedef": "PyTreeDef(*)", "leaves": [spec]})
        return codec.kind, entries, codec.structure(model), [[leaf] for _, _, leaf in triples]
    slots, variables = unbind_variables(model)
    entries, leaves_of = [], []
    for variable in variables:
        leaves, treedef = canonical_leaves(variable.value)
        entries.append({"label": variable.label, "kind": _kind_of(variable), "treedef": str(treedef),
                        "leaves": [leaf_spec(leaf) for leaf in leaves]})
        leaves_of.append(leaves)
    return "pzbridge", entries, structure_of(slots), leaves_of


def describe(model: Any) -> dict[str, Any]:
    """The JSON description a checkpoint of ``model`` stores (no array data, no keys).

    Args:
      model: A lifted model whose variables are bound (mutable or frozen), or
        a model a registered codec accepts (a lowered Equinox / NNX module).

    Returns:
      ``{"format", "model", "variables": [{"label", "kind", "treedef", "leaves": [...]}], "structure"}``.

    Example:
        >>> import jax.numpy as jnp
        >>> d = describe([Parameter(nx.wrap(jnp.ones((2, 3)), "a", "b"), "w")])
        >>> d["format"], d["variables"][0]["leaves"][0]["named_axes"], d["variables"][0]["leaves"][0]["shape"]
        ('pzbridge-checkpoint/2', ['a', 'b'], [2, 3])
    """
    kind, entries, structure, _ = _entries(model)
    return {"format": FORMAT, "model": kind, "variables": entries, "structure": structure}


# ---------------------------------------------------------------------------
# Steps on disk.


def all_steps(directory: str | pathlib.Path) -> list[int]:
    """The committed steps under ``directory``, oldest first (orbax's ``all_steps``).

    Only steps whose save finished count: unfinished saves, steps being
    deleted and numbered directories without a commit marker are not listed.

    Example:
        >>> import tempfile, pathlib
        >>> root = pathlib.Path(tempfile.mkdtemp()); (root / "2").mkdir()  # no commit marker: not a step
        >>> all_steps(root)
        []
    """
    root = pathlib.Path(directory)
    if not root.is_dir():
        return []
    try:
        return store.committed_versions(root)
    except OSError as error:
        raise cio.error("list the steps of", root, f"expected a readable directory, found {cio.summary(error)}",
                        "check the directory's permissions") from error


def versions(directory: str | pathlib.Path) -> list[int]:
    """The same as :func:`all_steps` (the name of earlier pzbridge releases).

    Example:
        >>> import tempfile
        >>> versions(tempfile.mkdtemp())
        []
    """
    return all_steps(directory)


def latest_step(directory: str | pathlib.Path) -> int | None:
    """The highest committed step under ``directory``, or ``None`` (orbax's ``latest_step``).

    Example:
        >>> import tempfile, jax.numpy as jnp
        >>> root = tempfile.mkdtemp(); _ = save(root, [Parameter(jnp.ones(2), "w")], step=40)
        >>> latest_step(root)
        40
    """
    steps = all_steps(directory)
    return steps[-1] if steps else None


@dataclasses.dataclass(frozen=True)
class PreparedSave:
    """What a save writes, already copied to host memory: the description and ``item -> key -> array``.

    Built on the caller's thread by :func:`prepare_save` (every check that
    needs no disk, and the device-to-host copies), written by
    :func:`write_prepared`, possibly on another thread.

    Example:
        >>> import jax.numpy as jnp
        >>> sorted(prepare_save([Parameter(jnp.ones(2), "w")], "ckpt").items["arrays"])
        ['w']
    """

    description: dict[str, Any]
    items: dict[str, dict[str, Any]]


def prepare_save(
    model: Any,
    directory: str | pathlib.Path,
    *,
    opt_state: Any = None,
    trainable: Callable[[LabeledVariable], bool] | None = None,
    metadata: Mapping[str, Any] | None = None,
) -> PreparedSave:
    """Checks ``model`` (and ``opt_state``) and copies their arrays to host memory.

    Args: as in :func:`save`.

    Raises:
      CheckpointError: As :func:`save`, before anything touches the disk.

    Example:
        >>> import jax.numpy as jnp
        >>> prepare_save([Parameter(jnp.ones(2), "w")], "ckpt").description["variables"][0]["leaves"][0]["key"]
        'w'
    """
    root = pathlib.Path(directory)
    abstract = abstract_error(model, "saving", CheckpointError)
    if abstract is not None:
        raise CheckpointError(f"save to {str(root)!r}: {abstract}")
    try:
        kind, entries, structure, leaves_of = _entries(model)
    except PzbridgeError as error:
        raise CheckpointError(f"save to {str(root)!r}: {error}") from error
    if not entries and kind == "pzbridge":
        raise cio.error(
            "save to", root, f"expected a lifted model holding pzbridge variables, found {_unlifted(model)}",
            "lift the module and save that (pzb.checkpoint.save(path, pzb.lift(module))), or save the Equinox / "
            "NNX module itself with pzb.checkpoint.save; a model without variables has nothing to checkpoint",
        )
    names = [entry["label"] if len(leaves) == 1 else f"{entry['label']}[{j}]"
             for entry, leaves in zip(entries, leaves_of) for j in range(len(leaves))]
    keys = iter(unique_keys(names))
    arrays: dict[str, Any] = {}
    for entry, leaves in zip(entries, leaves_of):
        for spec, leaf in zip(entry["leaves"], leaves):
            spec["key"] = next(keys)
            arrays[spec["key"]] = host_array(leaf)
    if metadata is not None:
        try:
            json.dumps(dict(metadata))
        except (TypeError, ValueError) as error:
            raise cio.error("save to", root, f"expected JSON-serialisable metadata, found {cio.summary(error)}",
                            "pass numbers, strings, lists and dicts only (convert arrays with float() or .tolist())"
                            ) from error
    description = {"format": FORMAT, "model": kind, "variables": entries, "structure": structure,
                   "opt_state": None, "metadata": None if metadata is None else dict(metadata)}
    items = {"arrays": arrays}
    if opt_state is not None:
        description["opt_state"], items["opt_state"] = _describe_opt_state(root, model, kind, opt_state, trainable)
    return PreparedSave(description, items)


def _describe_opt_state(
    root: pathlib.Path, model: Any, kind: str, opt_state: Any, trainable: Callable[[LabeledVariable], bool] | None
) -> tuple[dict[str, Any], dict[str, Any]]:
    names, leaves, treedef = flat_tree(opt_state)
    abstract = [n for n, leaf in zip(names, leaves) if isinstance(leaf, jax.ShapeDtypeStruct)]
    if abstract:
        raise cio.error("save to", root, f"expected a concrete optimizer state, found abstract leaves {abstract[:4]}",
                        "pass the optimizer state training uses (optimizer.init(...) or the trainer's opt_state)")
    specs = [leaf_spec(leaf) for leaf in leaves]
    for spec, key in zip(specs, unique_keys(names)):
        spec["key"] = key
    labels: list[str] = []
    if kind == "pzbridge":
        chosen = (lambda v: isinstance(v, Parameter)) if trainable is None else (
            lambda v: isinstance(v, Parameter) and bool(trainable(v)))
        labels = [v.label for v in unbind_variables(model)[1] if chosen(v)]
    description = {"treedef": str(treedef), "names": names, "leaves": specs, "trainable": labels}
    return description, {spec["key"]: host_array(leaf) for spec, leaf in zip(specs, leaves)}


def write_prepared(
    directory: str | pathlib.Path, prepared: PreparedSave, *, step: int | None = None, keep: int | None = 1
) -> pathlib.Path:
    """Writes and commits a :class:`PreparedSave` as ``step``; then keeps the newest ``keep`` steps.

    Example:
        >>> import tempfile, jax.numpy as jnp
        >>> root = tempfile.mkdtemp()
        >>> write_prepared(root, prepare_save([Parameter(jnp.ones(2), "w")], root), step=3).name
        '3'
    """
    root = pathlib.Path(directory)
    _check_keep(root, keep)
    if step is not None:
        check_new_step(root, step)
    created = cio.prepare_root(root)
    try:
        target = cio.write_step(root, step, prepared.items, prepared.description)
    except BaseException:
        cio.remove_created(created)  # A root this save made goes again: a failed save leaves nothing.
        raise
    if keep is not None:
        cio.prune(root, target, keep)
    return target


def _check_keep(root: pathlib.Path, keep: int | None) -> None:
    if keep is not None and (isinstance(keep, bool) or not isinstance(keep, int) or keep < 1):
        raise cio.error("save to", root, f"expected keep to be an integer >= 1 (or None: keep all), found "
                        f"keep={keep!r}", "pass keep=1 or more")


def check_new_step(root: pathlib.Path, step: Any) -> None:
    """Raises a :class:`CheckpointError` unless ``step`` is an integer >= 0, new, and after the latest step.

    Example:
        >>> import tempfile, pathlib
        >>> check_new_step(pathlib.Path(tempfile.mkdtemp()), 0)
    """
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise cio.error("save to", root, f"expected step to be an integer >= 0, found step={step!r}",
                        "pass the training step, e.g. step=trainer.step_count")
    existing = store.numbered(root)
    if step in existing:
        why = store.read_marker(existing[step])
        found = "a committed step" if isinstance(why, dict) else f"an uncommitted directory ({why})"
        raise cio.error("save to", root, f"expected a new step, found step {step} already there ({found})",
                        "save under another step number, or delete that step first")
    committed = store.committed_versions(root)
    if committed and step < committed[-1]:
        raise cio.error(
            "save to", root, f"expected a step after the latest committed step {committed[-1]}, found step={step}",
            "save under a higher step number (retention removes the lowest steps first)",
        )


def save(
    directory: str | pathlib.Path,
    model: Any,
    *,
    step: int | None = None,
    keep: int | None = 1,
    opt_state: Any = None,
    trainable: Callable[[LabeledVariable], bool] | None = None,
    metadata: Mapping[str, Any] | None = None,
) -> pathlib.Path:
    """Saves ``model``'s variables (values, axis names, structure) as a new committed step.

    The new step is written and committed completely (staging directory,
    commit marker last, rename to its number) before older steps beyond
    ``keep`` are removed (renamed to a hidden trash name, then deleted), so an
    interrupted save never destroys the previous checkpoint and never leaves
    an unfinished step listed.

    Args:
      directory: The checkpoint root (created if needed).
      model: A lifted model with bound, concrete variables (or a lowered
        Equinox / NNX module, through :mod:`pzbridge.checkpoint`).
      step: The step number (default: one more than the highest number in
        ``directory``); it must be new and after the latest committed step.
      keep: How many committed steps to keep (``>= 1``; ``None``: all).
      opt_state: An optax state to save with the model (restore it with
        :func:`restore_optimizer_state`).
      trainable: The predicate choosing which parameters ``opt_state`` trains
        (default: every ``Parameter``); recorded to explain mismatches.
      metadata: A JSON-serialisable mapping stored with the step.

    Returns:
      The path of the step written.

    Raises:
      CheckpointError: If ``keep`` or ``step`` is invalid, ``directory`` is a
        file, the model is not lifted (no pzbridge variables), is abstract, or
        holds something other than arrays, or writing fails. Nothing is left
        behind: no step, no temporary directory (and a directory the save
        created is removed again).

    Example:
        >>> import tempfile, jax.numpy as jnp
        >>> root = tempfile.mkdtemp()
        >>> save(root, [Parameter(jnp.ones(2), "w")]).name
        '1'
    """
    root = pathlib.Path(directory)
    _check_keep(root, keep)
    prepared = prepare_save(model, root, opt_state=opt_state, trainable=trainable, metadata=metadata)
    return write_prepared(root, prepared, step=step, keep=keep)


def _unlifted(model: Any) -> str:
    cls = type(model)
    count = sum(1 for leaf in jax.tree_util.tree_leaves(model) if hasattr(leaf, "shape") and hasattr(leaf, "dtype"))
    arrays = f"{count} array{'s' if count != 1 else ''}"
    framework = {"flax": "Flax NNX", "equinox": "Equinox"}.get(cls.__module__.split(".")[0])
    if framework:
        return (f"an un-lifted {framework} module {cls.__module__}.{cls.__qualname__} with no pzbridge variables "
                f"(its {arrays} would not be saved by pzbridge.toolshed.checkpointing)")
    return f"a {cls.__qualname__} with no pzbridge variables ({arrays}, none inside a Parameter or StateVariable)"


def _resolve_step(step: int | None, version: int | None) -> int | None:
    if step is not None and version is not None and step != version:
        raise CheckpointError(f"expected one step, found step={step!r} and version={version!r}. Fix: pass step= only.")
    return step if step is not None else version


def read_description(
    directory: str | pathlib.Path, step: int | None = None, *, version: int | None = None
) -> dict[str, Any]:
    """Reads a checkpoint's description (labels, kinds, axes, shapes, structure, step) without its arrays.

    Args:
      directory: The checkpoint root.
      step: Which committed step (default: the latest); ``version`` is its older name.

    Raises:
      CheckpointError: If there is no committed step (or not ``step``), or
        its description files are damaged, not a pzbridge description, or of
        a newer format than this pzbridge reads.

    Example:
        >>> import tempfile, jax.numpy as jnp
        >>> root = tempfile.mkdtemp(); _ = save(root, [Parameter(jnp.ones(2), "w")])
        >>> [v["label"] for v in read_description(root)["variables"]]
        ['w']
    """
    path, marker = cio.find_version(directory, _resolve_step(step, version), "read_description from")
    return cio.read_description_at(path, marker, "read_description from")


# ---------------------------------------------------------------------------
# Restoring.


def _differences(description: Mapping[str, Any], target: Any, check_structure: bool) -> list[str]:
    saved_kind = description.get("model", "pzbridge")
    codec = codec_for(target)
    target_kind = codec.kind if codec is not None else "pzbridge"
    if saved_kind != target_kind:
        return [f"the checkpoint holds {_KIND_TEXT.get(saved_kind, saved_kind)}, the target is "
                f"{_KIND_TEXT.get(target_kind, target_kind)}"]
    _, entries, structure, leaves_of = _entries(target)
    saved = {entry["label"]: entry for entry in description["variables"]}
    here = {entry["label"]: (entry, leaves) for entry, leaves in zip(entries, leaves_of)}
    slots = _slot_labels(target) if codec is None else set()
    problems: list[str] = []
    for label, (entry, _) in here.items():
        if label not in saved:
            problems.append(f"missing from checkpoint: {entry['kind']} {label!r}")
    for label in sorted(slots):
        if label not in saved:
            problems.append(f"missing from checkpoint: slot {label!r}")
    for label, entry in saved.items():
        if label not in here and label not in slots:
            problems.append(f"extra in checkpoint (not in the model): {entry['kind']} {label!r}")
    for label, (entry, leaves) in here.items():
        theirs = saved.get(label)
        if theirs is None:
            continue
        if entry["kind"] != theirs["kind"]:
            problems.append(f"{label!r}: kind {theirs['kind']} in checkpoint, {entry['kind']} in model")
            continue
        if entry["treedef"] != theirs["treedef"] or len(leaves) != len(theirs["leaves"]):
            problems.append(f"{label!r}: value structure {theirs['treedef']} in checkpoint, {entry['treedef']} in model")
            continue
        for j, (mine, spec) in enumerate(zip(entry["leaves"], theirs["leaves"])):
            problems.extend(leaf_differences(f"{label!r}" + (f" leaf {j}" if len(leaves) > 1 else ""), mine, spec))
    if check_structure:
        ours = {path: cls for path, cls in structure}
        theirs_structure = {path: cls for path, cls in description["structure"]}
        for path in sorted(set(ours) | set(theirs_structure)):
            if ours.get(path) != theirs_structure.get(path):
                problems.append(f"structure at {path}: {theirs_structure.get(path, 'nothing')} in checkpoint, "
                                f"{ours.get(path, 'nothing')} in model")
    return problems


_KIND_TEXT = {"pzbridge": "a lifted model", "equinox": "an Equinox module", "nnx": "a Flax NNX module"}


def _slot_labels(tree: Any) -> set[str]:
    leaves = jax.tree_util.tree_leaves(tree, is_leaf=lambda x: isinstance(x, AbstractVariableSlot))
    return {leaf.label for leaf in leaves if isinstance(leaf, AbstractVariableSlot)}


def _mismatch(path: pathlib.Path, problems: list[str], what: str) -> CheckpointError:
    return CheckpointError(
        f"restore: the checkpoint in {str(path)!r} does not match the {what} "
        f"({len(problems)} difference{'s' if len(problems) > 1 else ''}); nothing was loaded:\n"
        + "\n".join(f"  - {p}" for p in problems)
        + "\nFix: restore into a model of the same architecture (lift or build the same model class with the same "
        "configuration), or edit the target (e.g. add the same LoRA adapters) before restoring."
    )


def restore(
    directory: str | pathlib.Path,
    target: Any,
    *,
    step: int | None = None,
    version: int | None = None,
    check_structure: bool = True,
    verify: bool = True,
) -> Any:
    """Loads a checkpoint's values into ``target``'s variables, matched by label.

    For a lifted model this is a restore *into* the target: its mutable
    variables are updated in place (and ``target`` is returned); slots in
    ``target`` are filled with new variables (and the filled tree is
    returned). For a model a codec handles (a lowered Equinox / NNX module)
    a NEW model like ``target`` is returned and ``target`` is not touched
    (it may be abstract: ``eqx.filter_eval_shape`` / ``nnx.eval_shape``).
    Named-array values come back with the target's axis order (a transpose
    when the checkpoint stored another order), so a model lifted from a
    framework with another layout still loads.

    Args:
      directory: The checkpoint root given to :func:`save`.
      target: A model of the same architecture (freshly lifted or built).
      step: Which committed step to load (default: the latest); ``version``
        is its older name.
      check_structure: Also require the same class at every layer path.
      verify: Compare the sha256 of every file with what the save recorded
        before reading (file sizes are always compared). ``False`` skips
        reading the files twice for very large checkpoints.

    Returns:
      The target with the checkpoint's values (or the new model).

    Raises:
      CheckpointError: Listing EVERY difference between the checkpoint and the
        target (missing / extra labels, kinds, shapes, dtypes, axis names,
        structure), or naming what is wrong on disk (no committed step,
        damaged or unreadable files, a newer format); nothing is loaded, the
        target is unchanged and no file is touched.

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
    path, marker = cio.find_version(directory, _resolve_step(step, version), action)
    description = cio.read_description_at(path, marker, action)
    problems = _differences(description, target, check_structure)
    if problems:
        raise _mismatch(path, problems, "target model")
    arrays = cio.read_arrays_at(path, marker, cio.model_leaf_specs(description), action, verify)
    saved = {entry["label"]: entry for entry in description["variables"]}
    codec = codec_for(target)
    if codec is not None:
        likes = {label: leaf for label, _, leaf in codec.leaves(target)}
        values = {label: rebuild_leaf(saved[label]["leaves"][0], arrays[saved[label]["leaves"][0]["key"]])
                  for label in likes}
        return codec.rebuild(target, values)
    _, variables = unbind_variables(target)
    new_values = []
    for variable in variables:
        entry = saved[variable.label]
        leaves, treedef = canonical_leaves(variable.value)
        rebuilt = [rebuild_leaf(spec, arrays[spec["key"]], leaf) for leaf, spec in zip(leaves, entry["leaves"])]
        new_values.append(jax.tree_util.tree_unflatten(treedef, rebuilt))
    # Every array is read and checked: only now touch the target.
    for variable, value in zip(variables, new_values):
        variable.value = value
    slot_labels = _slot_labels(target)
    if not slot_labels:
        return target
    fresh = [_new_variable(saved[label], arrays) for label in sorted(slot_labels)]
    return bind_variables(target, fresh)


def restore_optimizer_state(
    directory: str | pathlib.Path,
    like: Any,
    *,
    step: int | None = None,
    model: Any = None,
    trainable: Callable[[LabeledVariable], bool] | None = None,
    verify: bool = True,
) -> Any:
    """The optax state saved with a step, in the structure of ``like`` (a new tree; ``like`` is not touched).

    ``like`` is a state of the same optimizer for the same parameters, e.g.
    ``optimizer.init(trainable_values(model))`` or ``jax.eval_shape`` of it.
    With ``model`` (and ``trainable``), the labels of the parameters the
    state trains are compared too, which explains a mismatch in words.

    Raises:
      CheckpointError: If the step has no optimizer state, or its tree
        structure, leaf shapes or dtypes differ from ``like`` (all listed),
        or the files are damaged; nothing is returned.

    Example:
        >>> import tempfile, jax.numpy as jnp, optax
        >>> w = Parameter(jnp.ones(2), "w"); opt = optax.adam(0.1); state = opt.init((w.value,))
        >>> root = tempfile.mkdtemp(); _ = save(root, [w], opt_state=state)
        >>> restored = restore_optimizer_state(root, opt.init((jnp.zeros(2),)))
        >>> jax.tree_util.tree_structure(restored) == jax.tree_util.tree_structure(state)
        True
    """
    action = "restore the optimizer state from"
    path, marker = cio.find_version(directory, step, action)
    description = cio.read_description_at(path, marker, action)
    saved = description.get("opt_state")
    if saved is None:
        raise cio.error(action, path, "expected a step saved with opt_state=..., found none in this step",
                        "save with pzb.checkpoint.save(path, model, opt_state=state) (Trainer.save does), or "
                        "start the optimizer afresh with optimizer.init(...)")
    names, leaves, treedef = flat_tree(like)
    problems = []
    if model is not None and codec_for(model) is None:
        chosen = (lambda v: isinstance(v, Parameter)) if trainable is None else (
            lambda v: isinstance(v, Parameter) and bool(trainable(v)))
        labels = [v.label for v in unbind_variables(model)[1] if chosen(v)]
        if labels != saved["trainable"]:
            missing = [x for x in labels if x not in saved["trainable"]]
            extra = [x for x in saved["trainable"] if x not in labels]
            problems.append(f"trained parameters: {len(saved['trainable'])} in checkpoint, {len(labels)} in model "
                            f"(only in model: {missing[:4]}, only in checkpoint: {extra[:4]}, or another order)")
    if str(treedef) != saved["treedef"]:
        problems.append(f"optimizer state structure {saved['treedef'][:300]} in checkpoint, {str(treedef)[:300]} in like")
    else:
        for name, leaf, spec in zip(names, leaves, saved["leaves"]):
            problems.extend(leaf_differences(f"optimizer state {name}", leaf_spec(leaf), spec))
    if problems:
        raise _mismatch(path, problems, "optimizer state `like`")
    arrays = cio.read_arrays_at(path, marker, saved["leaves"], action, verify, item="opt_state")
    rebuilt = [rebuild_leaf(spec, arrays[spec["key"]]) for spec in saved["leaves"]]
    return jax.tree_util.tree_unflatten(treedef, rebuilt)


def _new_variable(entry: Mapping[str, Any], arrays: Mapping[str, Any]) -> LabeledVariable:
    if entry["treedef"] != "PyTreeDef(*)":
        raise CheckpointError(
            f"load_variables: {entry['label']!r} holds a pytree value ({entry['treedef']}), which can only be "
            "restored into a model that already has this variable. Fix: restore into a bound model with "
            "pzb.checkpoint.restore(path, model)."
        )
    return _KINDS[entry["kind"]](rebuild_leaf(entry["leaves"][0], arrays[entry["leaves"][0]["key"]]), entry["label"])


def load_variables(
    directory: str | pathlib.Path, *, step: int | None = None, version: int | None = None, verify: bool = True
) -> tuple[LabeledVariable, ...]:
    """Rebuilds the checkpoint's variables (labels, kinds, named axes) as new objects.

    Bind them into a model built with slots (``from_config(..., None)``) with
    ``pzb.bind_variables(model, variables)``. ``step`` and ``verify`` are
    as in :func:`restore`, and so are the errors.

    Example:
        >>> import tempfile, jax.numpy as jnp
        >>> root = tempfile.mkdtemp(); _ = save(root, [Parameter(nx.wrap(jnp.ones(2), "features"), "w")])
        >>> (w,) = load_variables(root)
        >>> w.label, dict(w.value.named_shape)
        ('w', {'features': 2})
    """
    action = "load_variables from"
    path, marker = cio.find_version(directory, _resolve_step(step, version), action)
    description = cio.read_description_at(path, marker, action)
    if description.get("model", "pzbridge") != "pzbridge":
        raise cio.error(action, path, f"expected a checkpoint of a lifted model, found "
                        f"{_KIND_TEXT.get(description['model'], description['model'])}",
                        "restore it into a module of the same architecture with pzb.checkpoint.restore(path, like)")
    arrays = cio.read_arrays_at(path, marker, cio.model_leaf_specs(description), action, verify)
    return tuple(_new_variable(entry, arrays) for entry in description["variables"])


__all__ = [
    "CheckpointError",
    "ModelCodec",
    "PreparedSave",
    "all_steps",
    "check_new_step",
    "codec_for",
    "describe",
    "latest_step",
    "load_variables",
    "prepare_save",
    "read_description",
    "register_codec",
    "restore",
    "restore_optimizer_state",
    "save",
    "structure_of",
    "versions",
    "write_prepared",
]
