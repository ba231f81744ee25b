"""How checkpoint versions appear on disk and disappear from it, each step safe to interrupt.

A checkpoint root holds numbered step directories (``root/3``), as orbax's
``CheckpointManager`` lays them out. Only a
*committed* version counts: one holding a valid commit marker
(:data:`COMMIT_FILE`: every file of the version with its size and sha256).
A save goes through these steps; a SIGKILL between any two leaves the
previous versions intact and listed, and nothing unfinished listed:

1. orbax writes the version into a hidden staging directory
   (``root/.pzb-tmp-<id>``; orbax itself writes ``...orbax-checkpoint-tmp-*``
   first and renames it when complete);
2. the marker is written last inside it (temporary file, fsync, rename);
3. the staging directory is renamed to the next free number, so a numbered
   directory pzbridge writes is complete the moment it appears;
4. versions beyond ``keep`` are renamed to a hidden trash name
   (``root/.pzb-trash-<id>``: atomic, they leave the listing at once), and
   only then deleted.

Hidden leftovers (``.pzb-*``) of a killed save are never listed and are
deleted by the next save. A numbered directory without a valid marker (an
empty ``2/``, a copy in progress, a version of an older pzbridge) is ignored
and never deleted: pzbridge did not commit it. One process saves into a root
at a time.

Example:
    >>> import tempfile, pathlib
    >>> root = pathlib.Path(tempfile.mkdtemp()); (root / "2").mkdir()
    >>> committed_versions(root), uncommitted(root)
    ([], {2: 'no commit marker pzbridge_commit.json'})
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import shutil
import uuid
from typing import Any

COMMIT_FILE = "pzbridge_commit.json"
COMMIT_FORMAT = "pzbridge-commit/1"
HIDDEN = ".pzb-"
STAGING = HIDDEN + "tmp-"
TRASH = HIDDEN + "trash-"
_MAX_LISTED = 8  # Problems listed in one message; a missing tree of thousands of chunks is summarised.

Marker = dict[str, Any]


# ---------------------------------------------------------------------------
# Reading: which versions are committed.


def numbered(root: pathlib.Path) -> dict[int, pathlib.Path]:
    """Every entry of ``root`` named by a version number, committed or not.

    Example:
        >>> import tempfile, pathlib
        >>> root = pathlib.Path(tempfile.mkdtemp())
        >>> for name in ("3", "03", "x"): (root / name).mkdir()
        >>> sorted(numbered(root))
        [3]
    """
    if not root.is_dir():
        return {}
    # Only canonical ASCII numbers: "03" is not version 3, and "²".isdigit() is True.
    return {
        int(entry.name): entry
        for entry in root.iterdir()
        if entry.name.isascii() and entry.name.isdigit() and entry.name == str(int(entry.name))
    }


def read_marker(version_dir: pathlib.Path) -> Marker | str:
    """The commit marker of ``version_dir``, or (a string) why it has no valid one.

    Example:
        >>> import tempfile, pathlib
        >>> read_marker(pathlib.Path(tempfile.mkdtemp()))
        'no commit marker pzbridge_commit.json'
    """
    if not version_dir.is_dir():
        return "a file, not a directory"
    try:
        text = (version_dir / COMMIT_FILE).read_text()
    except FileNotFoundError:
        return f"no commit marker {COMMIT_FILE}"
    except (OSError, UnicodeDecodeError) as error:
        return f"unreadable commit marker {COMMIT_FILE} ({error})"
    try:
        marker = json.loads(text)
    except ValueError:
        return f"commit marker {COMMIT_FILE} is not valid JSON"
    if not _is_marker(marker):
        return f"commit marker {COMMIT_FILE} is not a {COMMIT_FORMAT} marker"
    return marker


def _is_marker(marker: Any) -> bool:
    files = marker.get("files") if isinstance(marker, dict) else None
    return (
        marker.get("format") == COMMIT_FORMAT
        and isinstance(files, dict)
        and all(
            isinstance(entry, dict) and isinstance(entry.get("size"), int) and isinstance(entry.get("sha256"), str)
            for entry in files.values()
        )
    )


def committed_versions(root: pathlib.Path) -> list[int]:
    """The committed version numbers under ``root``, oldest first.

    Example:
        >>> import tempfile, pathlib
        >>> committed_versions(pathlib.Path(tempfile.mkdtemp()))
        []
    """
    return sorted(n for n, path in numbered(root).items() if isinstance(read_marker(path), dict))


def uncommitted(root: pathlib.Path) -> dict[int, str]:
    """Numbered entries of ``root`` that do not count as versions, with the reason.

    Example:
        >>> import tempfile, pathlib
        >>> root = pathlib.Path(tempfile.mkdtemp()); _ = (root / "1").write_text("")
        >>> uncommitted(root)
        {1: 'a file, not a directory'}
    """
    found = {n: read_marker(path) for n, path in sorted(numbered(root).items())}
    return {n: reason for n, reason in found.items() if isinstance(reason, str)}


def verify(version_dir: pathlib.Path, marker: Marker, *, contents: bool, under: tuple[str, ...] = ()) -> list[str]:
    """What differs between ``version_dir``'s files and its marker (sizes; sha256 too with ``contents``).

    Args:
      version_dir: A committed version directory.
      marker: Its commit marker (:func:`read_marker`).
      contents: Also compare every file's sha256 (reads every byte).
      under: Only check files whose relative path starts with one of these.

    Example:
        >>> import tempfile, pathlib
        >>> d = pathlib.Path(tempfile.mkdtemp()); _ = (d / "a").write_text("data"); seal(d)
        >>> _ = (d / "a").write_text("dat")
        >>> verify(d, read_marker(d), contents=True)
        ['a: expected 4 bytes, found 3 (truncated or overwritten)']
    """
    problems: list[str] = []
    missing_directories: dict[str, int] = {}
    for relative, expected in sorted(marker["files"].items()):
        if under and not relative.startswith(under):
            continue
        top, _, rest = relative.partition("/")
        if rest and not (version_dir / top).is_dir():
            # A whole missing subtree (say arrays/) is one problem, not one per chunk file.
            missing_directories[top] = missing_directories.get(top, 0) + 1
            continue
        problem = _file_problem(version_dir / relative, relative, expected, contents)
        if problem:
            problems.append(problem)
    problems[:0] = [
        f"{top}/: expected a directory of {count} file{'s' if count > 1 else ''}, found none"
        for top, count in missing_directories.items()
    ]
    if len(problems) > _MAX_LISTED:
        problems[_MAX_LISTED:] = [f"... and {len(problems) - _MAX_LISTED} more"]
    return problems


def _file_problem(path: pathlib.Path, relative: str, expected: Marker, contents: bool) -> str | None:
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return f"{relative}: expected a file of {expected['size']} bytes, found nothing"
    except OSError as error:
        return f"{relative}: expected a readable file, found {error.strerror}"
    if size != expected["size"]:
        return f"{relative}: expected {expected['size']} bytes, found {size} (truncated or overwritten)"
    if contents:
        digest = _sha256(path)
        if digest != expected["sha256"]:
            return (
                f"{relative}: expected sha256 {expected['sha256'][:16]}..., found {digest[:16]}... "
                "(the bytes changed after the save)"
            )
    return None


# ---------------------------------------------------------------------------
# Writing: stage, seal, publish; discard and clean.


def new_staging(root: pathlib.Path) -> pathlib.Path:
    """A fresh hidden staging path in ``root`` (not created: orbax creates it).

    Example:
        >>> new_staging(pathlib.Path("ckpt")).name.startswith(STAGING)
        True
    """
    return root / f"{STAGING}{uuid.uuid4().hex}"


def seal(staging: pathlib.Path) -> None:
    """Writes ``staging``'s commit marker, last and atomically: every file with its size and sha256.

    Example:
        >>> import tempfile, pathlib
        >>> d = pathlib.Path(tempfile.mkdtemp()); _ = (d / "a").write_text("x"); seal(d)
        >>> read_marker(d)["files"]["a"]["size"]
        1
    """
    files = {relative: {"size": path.stat().st_size, "sha256": _sha256(path)} for relative, path in _files(staging)}
    partial = staging / (COMMIT_FILE + ".partial")
    with open(partial, "w") as handle:
        json.dump({"format": COMMIT_FORMAT, "files": files}, handle, indent=1, sort_keys=True)
        handle.flush()
        os.fsync(handle.fileno())
    # os.replace is atomic: the marker is either absent or complete.
    os.replace(partial, staging / COMMIT_FILE)
    _fsync_directory(staging)


def publish(staging: pathlib.Path, root: pathlib.Path, step: int | None = None) -> pathlib.Path:
    """Renames the sealed ``staging`` directory to ``root/<step>`` (default: the next free number); atomic.

    The caller has checked that ``root/<step>`` does not exist (one process
    saves into a root at a time): ``os.rename`` would replace an empty
    directory of that name.

    Example:
        >>> import tempfile, pathlib
        >>> root = pathlib.Path(tempfile.mkdtemp()); (root / "4").mkdir()  # an uncommitted 4 still takes its number
        >>> staging = new_staging(root); staging.mkdir(); seal(staging)
        >>> publish(staging, root).name
        '5'
    """
    target = root / str(max(numbered(root), default=0) + 1 if step is None else step)
    os.rename(staging, target)
    _fsync_directory(root)
    return target


def discard(version_dir: pathlib.Path) -> None:
    """Removes a version: renamed to a hidden trash name first (atomic), then deleted.

    A kill during the deletion leaves only a hidden directory, never a listed
    half-deleted version; the next save deletes it.

    Example:
        >>> import tempfile, pathlib
        >>> root = pathlib.Path(tempfile.mkdtemp()); (root / "1").mkdir(); discard(root / "1")
        >>> list(root.iterdir())
        []
    """
    trash = version_dir.with_name(f"{TRASH}{version_dir.name}-{uuid.uuid4().hex}")
    os.rename(version_dir, trash)
    _fsync_directory(version_dir.parent)
    shutil.rmtree(trash, ignore_errors=True)


def clean(root: pathlib.Path) -> None:
    """Deletes the hidden leftovers (staging and trash) of earlier, interrupted saves.

    Example:
        >>> import tempfile, pathlib
        >>> root = pathlib.Path(tempfile.mkdtemp()); (root / (TRASH + "1-x")).mkdir(); clean(root)
        >>> list(root.iterdir())
        []
    """
    for entry in root.iterdir():
        if entry.name.startswith(HIDDEN):
            remove(entry)


def remove_staging(staging: pathlib.Path) -> None:
    """Deletes ``staging`` and orbax's temporary directories for it (after a failed save).

    Example:
        >>> import tempfile, pathlib
        >>> root = pathlib.Path(tempfile.mkdtemp()); staging = new_staging(root)
        >>> (root / (staging.name + ".orbax-checkpoint-tmp-1")).mkdir(); remove_staging(staging)
        >>> list(root.iterdir())
        []
    """
    if staging.parent.is_dir():
        for entry in staging.parent.iterdir():
            if entry.name.startswith(staging.name):
                remove(entry)


def remove(path: pathlib.Path) -> None:
    """Deletes a file or a directory tree, ignoring what is already gone.

    Example:
        >>> import tempfile, pathlib
        >>> remove(pathlib.Path(tempfile.mkdtemp()) / "absent")
    """
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


# ---------------------------------------------------------------------------
# Helpers.


def _files(directory: pathlib.Path) -> list[tuple[str, pathlib.Path]]:
    found = []
    for parent, _, names in os.walk(directory):
        for name in names:
            path = pathlib.Path(parent, name)
            relative = path.relative_to(directory).as_posix()
            if not relative.startswith(COMMIT_FILE):
                found.append((relative, path))
    return sorted(found)


def _sha256(path: pathlib.Path) -> str:
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def _fsync_directory(directory: pathlib.Path) -> None:
    # Makes a rename durable across a power cut; a SIGKILL alone never loses it.
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # Some file systems cannot fsync a directory; the rename itself is still atomic.
    finally:
        os.close(fd)


__all__ = [
    "COMMIT_FILE",
    "clean",
    "committed_versions",
    "discard",
    "new_staging",
    "numbered",
    "publish",
    "read_marker",
    "remove",
    "remove_staging",
    "seal",
    "uncommitted",
    "verify",
]
