"""``CheckpointManager``: numbered steps in one directory, retention, intervals, asynchronous saves.

The names and the layout are orbax's ``CheckpointManager``'s: ``save(step,
...)`` returns whether it saved, ``should_save(step)``, ``all_steps()``,
``latest_step()``, ``max_to_keep``, ``save_interval_steps``,
``wait_until_finished()``, ``close()`` and use as a context manager. Each
step is written by :mod:`pzbridge.toolshed.checkpointing`, so every save
keeps its guarantees (commit marker last, nothing unfinished listed, one
error listing every mismatch on restore).

Asynchronous saves work as orbax's: ``save`` checks the model and copies its
arrays to host memory (a blocking device-to-host transfer, so training may
go on updating the parameters at once), then a background thread writes the
step. The whole commit protocol runs in that thread, because the commit
marker must be written after orbax has written every file; orbax's own
async checkpointer would finalise its directory before pzbridge could seal
it. At most one save is in flight: the next ``save`` (and ``restore``) first
waits for it. An error in the background is raised by
``wait_until_finished()`` (and by the next ``save`` or ``close``). The
thread is not a daemon, so an interpreter that exits still finishes the
write.

Example:
    >>> import tempfile, jax.numpy as jnp
    >>> from pzbridge.core.variables import Parameter
    >>> w = Parameter(jnp.ones(2), "w")
    >>> with CheckpointManager(tempfile.mkdtemp(), max_to_keep=2) as manager:
    ...     saved = [manager.save(step, [w]) for step in (0, 10, 20)]
    ...     manager.wait_until_finished()
    ...     print(saved, manager.all_steps(), manager.latest_step())
    [True, True, True] [10, 20] 20
"""

from __future__ import annotations

import pathlib
import threading
from collections.abc import Callable, Mapping
from types import TracebackType
from typing import Any

from pzbridge.core.errors import CheckpointError
from pzbridge.core.variables import LabeledVariable
from pzbridge.toolshed import checkpoint_io as cio
from pzbridge.toolshed import checkpointing


class CheckpointManager:
    """Saves a model (and its optimizer state) every few steps into numbered step directories.

    Args:
      directory: The root holding one directory per step.
      max_to_keep: How many of the newest steps to keep (``None``: all, as in orbax).
      save_interval_steps: ``save`` only writes steps that are a multiple of
        this (unless ``force=True``).
      async_save: Write in a background thread after the host copy (default
        True, as orbax's ``enable_async_checkpointing``).

    Raises:
      CheckpointError: If ``max_to_keep`` or ``save_interval_steps`` is not a
        positive integer.

    Example:
        >>> import tempfile, jax.numpy as jnp
        >>> from pzbridge.core.variables import Parameter
        >>> manager = CheckpointManager(tempfile.mkdtemp(), save_interval_steps=5, async_save=False)
        >>> [manager.save(step, [Parameter(jnp.ones(2), "w")]) for step in (3, 5)], manager.all_steps()
        ([False, True], [5])
    """

    def __init__(
        self,
        directory: str | pathlib.Path,
        *,
        max_to_keep: int | None = None,
        save_interval_steps: int = 1,
        async_save: bool = True,
    ) -> None:
        self.directory = pathlib.Path(directory)
        for name, value in (("max_to_keep", max_to_keep), ("save_interval_steps", save_interval_steps)):
            if value is None and name == "max_to_keep":
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise cio.error("CheckpointManager for", self.directory,
                                f"expected {name} to be an integer >= 1, found {name}={value!r}",
                                f"pass {name}=1 or more" + (" (or None to keep every step)" if name == "max_to_keep"
                                                            else ""))
        self.max_to_keep = max_to_keep
        self.save_interval_steps = save_interval_steps
        self.async_save = async_save
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._in_flight: int | None = None

    # -- Listing ---------------------------------------------------------------------------------------------

    def all_steps(self) -> list[int]:
        """The committed steps, oldest first (a save in flight is not listed until it commits).

        Example:
            >>> import tempfile
            >>> CheckpointManager(tempfile.mkdtemp()).all_steps()
            []
        """
        return checkpointing.all_steps(self.directory)

    def latest_step(self) -> int | None:
        """The highest committed step, or ``None``.

        Example:
            >>> import tempfile
            >>> CheckpointManager(tempfile.mkdtemp()).latest_step() is None
            True
        """
        steps = self.all_steps()
        return steps[-1] if steps else None

    def should_save(self, step: int) -> bool:
        """Whether ``save(step, ...)`` would write: a multiple of the interval, after the latest step.

        Example:
            >>> import tempfile
            >>> manager = CheckpointManager(tempfile.mkdtemp(), save_interval_steps=100)
            >>> manager.should_save(200), manager.should_save(250)
            (True, False)
        """
        latest = self.latest_step() if self._in_flight is None else max(self._in_flight, self.latest_step() or 0)
        return step % self.save_interval_steps == 0 and (latest is None or step > latest)

    # -- Saving ----------------------------------------------------------------------------------------------

    def save(
        self,
        step: int,
        model: Any,
        *,
        opt_state: Any = None,
        trainable: Callable[[LabeledVariable], bool] | None = None,
        metadata: Mapping[str, Any] | None = None,
        force: bool = False,
    ) -> bool:
        """Saves ``model`` (and ``opt_state``) as ``step`` when :meth:`should_save` (or ``force``); returns whether.

        The arguments after ``step`` are those of
        :func:`pzbridge.toolshed.checkpointing.save`. With ``async_save`` the
        call returns once the arrays are on the host; the step is listed
        when its write commits (:meth:`wait_until_finished`).

        Raises:
          CheckpointError: For a bad model or step (before anything is
            written), or for an earlier asynchronous save that failed.

        Example:
            >>> import tempfile, jax.numpy as jnp
            >>> from pzbridge.core.variables import Parameter
            >>> manager = CheckpointManager(tempfile.mkdtemp(), async_save=False)
            >>> manager.save(7, [Parameter(jnp.ones(2), "w")]), manager.save(7, [Parameter(jnp.ones(2), "w")])
            (True, False)
        """
        self.wait_until_finished()
        if not (force or self.should_save(step)):
            return False
        checkpointing.check_new_step(self.directory, step)  # Here, not in the thread: a bad step fails at once.
        prepared = checkpointing.prepare_save(model, self.directory, opt_state=opt_state, trainable=trainable,
                                              metadata=metadata)
        if not self.async_save:
            checkpointing.write_prepared(self.directory, prepared, step=step, keep=self.max_to_keep)
            return True
        self._in_flight = step
        self._thread = threading.Thread(target=self._write, args=(prepared, step), name=f"pzbridge-save-{step}")
        self._thread.start()
        return True

    def _write(self, prepared: checkpointing.PreparedSave, step: int) -> None:
        try:
            checkpointing.write_prepared(self.directory, prepared, step=step, keep=self.max_to_keep)
        except BaseException as error:  # noqa: BLE001 - handed to the caller's thread by wait_until_finished
            self._error = error

    def wait_until_finished(self) -> None:
        """Blocks until the save in flight (if any) has committed; raises its error if it failed.

        Raises:
          CheckpointError: The background save's error (the step was not
            written; the earlier steps are intact).

        Example:
            >>> import tempfile
            >>> CheckpointManager(tempfile.mkdtemp()).wait_until_finished()
        """
        thread, self._thread = self._thread, None
        if thread is not None:
            thread.join()
        step, self._in_flight = self._in_flight, None
        error, self._error = self._error, None
        if error is None:
            return
        if isinstance(error, CheckpointError):
            raise CheckpointError(f"the asynchronous save of step {step} failed: {error}") from error
        raise CheckpointError(
            f"the asynchronous save of step {step} into {str(self.directory)!r} failed: expected it to commit, "
            f"found {cio.summary(error)}. Fix: check the directory and save again."
        ) from error

    def close(self) -> None:
        """Waits for the save in flight (orbax's ``close``).

        Example:
            >>> import tempfile
            >>> CheckpointManager(tempfile.mkdtemp()).close()
        """
        self.wait_until_finished()

    def __enter__(self) -> CheckpointManager:
        return self

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None,
                 traceback: TracebackType | None) -> None:
        if kind is None:
            self.close()
            return
        try:
            self.close()
        except CheckpointError:
            pass  # The error already propagating is the one to see.

    # -- Restoring -------------------------------------------------------------------------------------------

    def restore(self, step: int | None, target: Any, **options: Any) -> Any:
        """:func:`pzbridge.toolshed.checkpointing.restore` of ``step`` (``None``: the latest), after waiting.

        Example:
            >>> import tempfile, jax.numpy as jnp
            >>> from pzbridge.core.variables import Parameter
            >>> manager = CheckpointManager(tempfile.mkdtemp())
            >>> _ = manager.save(3, [Parameter(jnp.ones(2), "w")])
            >>> manager.restore(None, [Parameter(jnp.zeros(2), "w")])[0].value.tolist()
            [1.0, 1.0]
        """
        self.wait_until_finished()
        return checkpointing.restore(self.directory, target, step=step, **options)

    def restore_optimizer_state(self, step: int | None, like: Any, **options: Any) -> Any:
        """:func:`pzbridge.toolshed.checkpointing.restore_optimizer_state` of ``step``, after waiting.

        Example:
            >>> import tempfile, jax.numpy as jnp, optax
            >>> from pzbridge.core.variables import Parameter
            >>> manager = CheckpointManager(tempfile.mkdtemp())
            >>> state = optax.sgd(0.1, momentum=0.9).init((jnp.ones(2),))
            >>> _ = manager.save(1, [Parameter(jnp.ones(2), "w")], opt_state=state)
            >>> type(manager.restore_optimizer_state(1, state)).__name__
            'tuple'
        """
        self.wait_until_finished()
        return checkpointing.restore_optimizer_state(self.directory, like, step=step, **options)

    def __repr__(self) -> str:
        return (f"CheckpointManager({str(self.directory)!r}, max_to_keep={self.max_to_keep}, "
                f"save_interval_steps={self.save_interval_steps}, async_save={self.async_save})")


__all__ = ["CheckpointManager"]
