"""Writing and reading one checkpoint version with orbax, checking everything on the way.

:mod:`pzbridge.toolshed.checkpointing` decides *what* a checkpoint holds;
this module puts it on disk through the commit protocol of
:mod:`pzbridge.toolshed.checkpoint_store` and reads it back, turning every
failure (a missing or damaged file, an orbax / tensorstore / JSON error, a
malformed description, an array of the wrong shape) into a
:class:`~pzbridge.core.errors.CheckpointError` that names the directory,
what was expected and found, and the fix. Reading never writes.

Example:
    >>> import tempfile, pathlib, numpy as np
    >>> root = pathlib.Path(tempfile.mkdtemp())
    >>> description = {"format": FORMAT, "variables": [], "structure": []}
    >>> write_version(root, {}, description).name
    '1'
    >>> path, marker = find_version(root, None, "read from")
    >>> read_description_at(path, marker, "read from")["variables"] == description["variables"]
    True
"""

from __future__ import annotations

import pathlib
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

from pzbridge.core.errors import CheckpointError
from pzbridge.toolshed import checkpoint_store as store

FORMAT_NAME = "pzbridge-checkpoint"
FORMAT_VERSION = 2  # 2: arrays keyed by label, optimizer state, lowered modules; 1: keys v<i>_<j>
FORMAT = f"{FORMAT_NAME}/{FORMAT_VERSION}"
KIND_NAMES = ("Parameter", "StateVariable")
MODEL_KINDS = ("pzbridge", "equinox", "nnx")
# Files a description read needs; the arrays are checked when they are read.
_DESCRIPTION_FILES = ("description/", "_CHECKPOINT_METADATA")


def error(action: str, where: str | pathlib.Path, problem: str, fix: str) -> CheckpointError:
    """``<action> '<where>': <problem: expected ..., found ...>. Fix: <fix>.``

    Example:
        >>> print(error("save to", "ckpt", "expected a directory, found a file", "move the file away"))
        save to 'ckpt': expected a directory, found a file. Fix: move the file away.
    """
    separator = "\n" if "\n" in problem.rstrip() else ". "
    return CheckpointError(f"{action} {str(where)!r}: {problem.rstrip()}{separator}Fix: {fix}.")


def summary(exception: BaseException) -> str:
    """The type and first line of a foreign exception, for a message.

    Example:
        >>> summary(KeyError("v0_0"))
        "KeyError: 'v0_0'"
    """
    lines = str(exception).strip().splitlines()
    return f"{type(exception).__name__}: {lines[0][:300]}" if lines else type(exception).__name__


def _checkpointer() -> Any:
    import orbax.checkpoint as ocp

    return ocp, ocp.Checkpointer(ocp.CompositeCheckpointHandler())


# ---------------------------------------------------------------------------
# Writing.


def prepare_root(root: pathlib.Path) -> list[pathlib.Path]:
    """Creates ``root`` if needed; returns the directories it created, deepest first.

    Example:
        >>> import tempfile, pathlib
        >>> base = pathlib.Path(tempfile.mkdtemp())
        >>> [p.name for p in prepare_root(base / "a" / "b")]
        ['b', 'a']
    """
    if root.exists() and not root.is_dir():
        raise error("save to", root, "expected a directory (or a path where one can be created), found a file",
                    "choose another path, or move the file away")
    missing = [path for path in (root, *root.parents) if not path.exists()]
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exception:
        remove_created(missing)
        raise error("save to", root, f"expected a directory that can be created, found {summary(exception)}",
                    "choose a path under a writable directory (no part of it may be a file)") from exception
    return missing


def remove_created(created: list[pathlib.Path]) -> None:
    """Removes the directories :func:`prepare_root` created, while they are empty.

    Example:
        >>> import tempfile, pathlib
        >>> base = pathlib.Path(tempfile.mkdtemp()); remove_created(prepare_root(base / "a"))
        >>> list(base.iterdir())
        []
    """
    for path in created:
        try:
            path.rmdir()  # Only while empty: never anything the user put there meanwhile.
        except OSError:
            return


def write_version(root: pathlib.Path, arrays: Mapping[str, Any], description: Mapping[str, Any]) -> pathlib.Path:
    """Writes and commits a new version under the existing ``root``; returns its path.

    Staged in a hidden directory, sealed with the commit marker, then renamed
    to the next number. On any failure the staging directory (and orbax's
    temporary one) is removed and a :class:`CheckpointError` raised; the
    earlier versions are untouched.

    Example:
        >>> import tempfile, pathlib, numpy as np
        >>> root = pathlib.Path(tempfile.mkdtemp())
        >>> write_version(root, {"arrays": {"w": np.ones(2)}}, {"format": FORMAT, "variables": [], "structure": []}).name
        '1'
    """
    return write_step(root, None, arrays, description)


def write_step(root: pathlib.Path, step: int | None, arrays: Mapping[str, Mapping[str, Any]],
               description: Mapping[str, Any]) -> pathlib.Path:
    """:func:`write_version` at a chosen step number (``None``: the next free one).

    Example:
        >>> import tempfile, pathlib
        >>> root = pathlib.Path(tempfile.mkdtemp())
        >>> write_step(root, 0, {}, {"format": FORMAT, "variables": [], "structure": []}).name
        '0'
    """
    staging = store.new_staging(root)
    try:
        store.clean(root)  # Leftovers of killed saves: hidden, never listed, removed here.
        _write_with_orbax(staging, arrays, description)
        store.seal(staging)
        return store.publish(staging, root, step)
    except BaseException as exception:
        store.remove_staging(staging)
        if isinstance(exception, Exception) and not isinstance(exception, CheckpointError):
            raise error(
                "save to", root,
                f"expected to write and commit the new version, found {summary(exception)}; nothing was written and the "
                "earlier versions are unchanged",
                "check the free space and write permission of the directory, then save again",
            ) from exception
        raise


def _write_with_orbax(staging: pathlib.Path, arrays: Mapping[str, Any], description: Mapping[str, Any]) -> None:
    ocp, checkpointer = _checkpointer()
    items = {"description": ocp.args.JsonSave(dict(description))}
    # ``arrays`` maps an orbax item name ("arrays", "opt_state") to its key -> array mapping. orbax refuses an
    # empty item ("Found empty item"): values without leaves have no arrays.
    for item, contents in arrays.items():
        if contents:
            items[item] = ocp.args.StandardSave(dict(contents))
    checkpointer.save(staging.absolute(), args=ocp.args.Composite(**items))


def prune(root: pathlib.Path, target: pathlib.Path, keep: int) -> None:
    """Removes committed versions beyond the newest ``keep`` (trash rename first, then delete).

    Example:
        >>> import tempfile, pathlib
        >>> root = pathlib.Path(tempfile.mkdtemp()); d = {"format": FORMAT, "variables": [], "structure": []}
        >>> paths = [write_version(root, {}, d) for _ in range(3)]; prune(root, paths[-1], 1)
        >>> store.committed_versions(root)
        [3]
    """
    for old in store.committed_versions(root)[:-keep]:
        try:
            store.discard(root / str(old))
        except OSError as exception:
            raise error(
                "save to", root,
                f"version {target.name} was saved, but removing old version {old} failed: expected to rename it to "
                f"a hidden trash name, found {summary(exception)}",
                "check the directory's write permission; the next save removes it",
            ) from exception


# ---------------------------------------------------------------------------
# Reading: find the version, check its files, read and check what orbax returns.


def find_version(directory: str | pathlib.Path, version: int | None, action: str) -> tuple[pathlib.Path, store.Marker]:
    """The committed step to read (``None``: the latest) and its commit marker.

    Example:
        >>> import tempfile
        >>> try:
        ...     find_version(tempfile.mkdtemp(), None, "restore from")
        ... except CheckpointError as e:
        ...     print("no numbered directory" in str(e))
        True
    """
    root = pathlib.Path(directory)
    if not root.is_dir():
        raise error(action, root, f"expected a checkpoint directory, found {'a file' if root.exists() else 'nothing'}",
                    "pass the directory given to pzb.checkpoint.save(path, model)")
    try:
        committed, ignored = store.committed_versions(root), store.uncommitted(root)
    except OSError as exception:
        raise error(action, root, f"expected a readable directory, found {summary(exception)}",
                    "check the directory's permissions") from exception
    if not committed:
        found = ", ".join(f"{n}/ ({why})" for n, why in ignored.items()) or "no numbered directory"
        raise error(
            action, root,
            f"expected a committed step (a numbered directory holding {store.COMMIT_FILE}, which save writes "
            f"last), found {found}",
            "check the path, or save one with pzb.checkpoint.save(path, model); numbered directories without a "
            "valid commit marker are unfinished saves (or not pzbridge's) and are ignored",
        )
    chosen = committed[-1] if version is None else version
    if chosen not in committed:
        found = f"step {chosen!r} uncommitted ({ignored[chosen]})" if chosen in ignored else f"no step {chosen!r}"
        raise error(action, root, f"expected one of the committed steps {committed}, found {found}",
                    f"pass step= one of {committed}, or leave it out for the latest")
    path = root / str(chosen)
    marker = store.read_marker(path)
    if isinstance(marker, str):  # Removed or damaged since it was listed.
        raise error(action, path, f"expected a committed step, found {marker}",
                    "list the steps again (pzb.checkpoint.all_steps(directory)) and retry")
    return path, marker


def _check_files(path: pathlib.Path, marker: store.Marker, action: str, *, contents: bool,
                 under: tuple[str, ...] = ()) -> None:
    problems = store.verify(path, marker, contents=contents, under=under)
    if not problems:
        return
    older = [v for v in store.committed_versions(path.parent) if v < int(path.name)]
    other = f"restore the previous step (step={older[-1]})" if older else "save the model again"
    raise error(
        action, path,
        f"the step is damaged: its files differ from what its save recorded in {store.COMMIT_FILE} "
        "(nothing was loaded, no file was changed):\n" + "".join(f"  - {p}\n" for p in problems),
        f"{other}, or copy this step back from a backup",
    )


def _orbax_restore(path: pathlib.Path, action: str, **items: Any) -> dict[str, Any]:
    ocp, checkpointer = _checkpointer()
    try:
        return dict(checkpointer.restore(path.absolute(), args=ocp.args.Composite(**items)))
    except Exception as exception:  # tensorstore, orbax and json raise many unrelated types
        raise error(
            action, path, f"expected orbax data pzbridge can read, found {summary(exception)}",
            "restore another step (pzb.checkpoint.all_steps(directory) lists them) or save again; no file was "
            "changed",
        ) from exception


def read_description_at(path: pathlib.Path, marker: store.Marker, action: str) -> dict[str, Any]:
    """Checks (sha256) and reads the description of the step at ``path``, and checks its form and version.

    Format 1 (arrays keyed ``v<i>_<j>``, no optimizer state) is read as
    format 2: the description names every array's key, so only the missing
    fields are filled in.

    Example:
        >>> import tempfile, pathlib
        >>> root = pathlib.Path(tempfile.mkdtemp())
        >>> path = write_version(root, {}, {"format": FORMAT, "variables": [], "structure": []})
        >>> read_description_at(path, store.read_marker(path), "read from")["format"]
        'pzbridge-checkpoint/2'
    """
    import orbax.checkpoint as ocp

    _check_files(path, marker, action, contents=True, under=_DESCRIPTION_FILES)  # Small: always hashed.
    description = _orbax_restore(path, action, description=ocp.args.JsonRestore())["description"]
    found = description.get("format") if isinstance(description, dict) else type(description).__name__
    version = format_version(found)
    if version is None:
        raise error(action, path, f"expected a pzbridge checkpoint (format {FORMAT!r}), found format {found!r}",
                    "restore it with the tool that wrote it")
    if version > FORMAT_VERSION:
        raise error(
            action, path,
            f"expected a checkpoint format this pzbridge reads (versions 1 to {FORMAT_VERSION}), found format "
            f"{found!r}, written by a newer pzbridge",
            "upgrade pzbridge (pip install -U pzbridge) to restore it",
        )
    try:
        _check_schema(description)
    except (KeyError, IndexError, TypeError, ValueError) as exception:
        raise error(
            action, path,
            f"expected a description as pzb.checkpoint.describe writes it, found a malformed one "
            f"({summary(exception)})",
            "save the model again, or restore another step",
        ) from exception
    # The directory's number is the step (orbax's layout); older descriptions lack the newer fields.
    return {"model": "pzbridge", "opt_state": None, "metadata": None, **description, "step": int(path.name)}


def format_version(text: Any) -> int | None:
    """The version number of a ``pzbridge-checkpoint/<n>`` format string (``None``: not pzbridge's).

    Example:
        >>> format_version("pzbridge-checkpoint/1"), format_version("pzbridge-checkpoint/17"), format_version("x/1")
        (1, 17, None)
    """
    name, _, number = text.partition("/") if isinstance(text, str) else ("", "", "")
    if name != FORMAT_NAME or not (number.isascii() and number.isdigit()) or int(number) < 1:
        return None
    return int(number)


def _check_schema(description: Mapping[str, Any]) -> None:
    """Raises KeyError / TypeError / ValueError where ``description`` is not what ``describe`` writes."""

    def need(ok: bool, what: str) -> None:
        if not ok:
            raise ValueError(what)

    model = description.get("model", "pzbridge")
    need(model in MODEL_KINDS, f"unknown model kind {model!r}")
    need(isinstance(description["variables"], list), "'variables' is not a list")
    for entry in description["variables"]:
        need(isinstance(entry["label"], str) and isinstance(entry["treedef"], str), f"bad entry {entry!r}")
        need(entry["kind"] in KIND_NAMES or model != "pzbridge", f"{entry['label']!r}: unknown kind {entry['kind']!r}")
        _check_leaves(entry["leaves"], need)
    need(all(len(item) == 2 for item in description["structure"]), "bad 'structure'")
    opt_state = description.get("opt_state")
    if opt_state is not None:
        need(isinstance(opt_state["treedef"], str) and isinstance(opt_state["trainable"], list), "bad 'opt_state'")
        need(len(opt_state["names"]) == len(opt_state["leaves"]), "bad 'opt_state' names")
        _check_leaves(opt_state["leaves"], need)


def _check_leaves(leaves: Any, need: Any) -> None:
    need(isinstance(leaves, list), f"bad leaves {leaves!r}")
    for leaf in leaves:
        np.dtype(leaf["dtype"])
        need(isinstance(leaf["key"], str) and all(isinstance(s, int) for s in leaf["shape"]), f"bad leaf {leaf!r}")
        if leaf["named_axes"] is not None:
            need(len(leaf["named_axes"]) == len(leaf["named_sizes"]), f"bad named axes {leaf!r}")
            need(all(isinstance(s, int) for s in leaf["positional_shape"]), f"bad positional shape {leaf!r}")


def model_leaf_specs(description: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    """Every leaf spec of the model's variables (what ``read_arrays_at(..., "arrays")`` reads).

    Example:
        >>> model_leaf_specs({"variables": [{"leaves": [{"key": "w"}]}, {"leaves": []}]})
        [{'key': 'w'}]
    """
    return [leaf for entry in description["variables"] for leaf in entry["leaves"]]


def read_arrays_at(
    path: pathlib.Path, marker: store.Marker, specs: list[Mapping[str, Any]], action: str, verify: bool,
    item: str = "arrays",
) -> dict[str, Any]:
    """Checks the step's files (sha256 with ``verify``), reads one item's arrays and checks them against ``specs``.

    Args:
      path: The step directory.
      marker: Its commit marker.
      specs: The leaf specs (``key``, ``shape``, ``dtype``) of the arrays to read.
      action: For messages ("restore from").
      verify: Hash every file first.
      item: The orbax item: ``"arrays"`` (the model) or ``"opt_state"``.

    Example:
        >>> import tempfile, pathlib, numpy as np
        >>> root = pathlib.Path(tempfile.mkdtemp())
        >>> leaf = {"key": "w", "dtype": "float32", "shape": [2], "named_axes": None}
        >>> d = {"format": FORMAT, "structure": [],
        ...      "variables": [{"label": "w", "kind": "Parameter", "treedef": "PyTreeDef(*)", "leaves": [leaf]}]}
        >>> path = write_version(root, {"arrays": {"w": np.ones(2, np.float32)}}, d)
        >>> read_arrays_at(path, store.read_marker(path), [leaf], "read from", True)["w"].tolist()
        [1.0, 1.0]
    """
    import orbax.checkpoint as ocp

    _check_files(path, marker, action, contents=verify)
    expected = {leaf["key"]: jax.ShapeDtypeStruct(tuple(leaf["shape"]), np.dtype(leaf["dtype"])) for leaf in specs}
    if not expected:
        return {}
    arrays = dict(_orbax_restore(path, action, **{item: ocp.args.StandardRestore(expected)})[item])
    problems = [_array_problem(key, want, arrays.get(key)) for key, want in expected.items()]
    problems = [p for p in problems if p]
    if problems:
        listed = "".join(f"  - {p}\n" for p in problems)
        raise error(action, path, f"the arrays read differ from the description:\n{listed}",
                    "save the model again, or restore another step")
    return arrays


def _array_problem(key: str, want: jax.ShapeDtypeStruct, found: Any) -> str | None:
    if found is None:
        return f"array {key}: expected {want.dtype}{list(want.shape)}, found nothing"
    shape, dtype = tuple(found.shape), np.dtype(found.dtype)
    if (shape, dtype) != (want.shape, want.dtype):
        return f"array {key}: expected {want.dtype}{list(want.shape)}, found {dtype}{list(shape)}"
    return None


__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "format_version",
    "model_leaf_specs",
    "write_step",
    "error",
    "find_version",
    "prepare_root",
    "prune",
    "read_arrays_at",
    "read_description_at",
    "remove_created",
    "summary",
    "write_version",
]
