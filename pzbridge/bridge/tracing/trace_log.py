"""What the traces of one ``pzb.lift`` call saw: the root's output shapes and whether any trace failed.

``pzb.lift`` needs two facts that only the tracing code sees, deep inside a
framework's traversal: the output shapes of the root module (the root trace
computes them as ``make_jaxpr``'s ``out_shape``, so the output check need not
evaluate the whole module a second time) and whether some module failed to
trace (a lift on a widened example that traced less than the original would
have is not taken; see :mod:`~pzbridge.bridge.tracing.widening`). Rather than
threading them through every rule, :func:`recording` opens a log for the
duration of one lift and :func:`~pzbridge.bridge.tracing.assemble.trace_call`
writes to it. Nested lifts (a lift inside a rule) open their own log.

Example:
    >>> import jax
    >>> from pzbridge.bridge.tracing.assemble import trace_call
    >>> with recording() as log:
    ...     _ = trace_call(lambda x: x.sum(0), jax.ShapeDtypeStruct((3, 2), "float32"))
    >>> log.first_output.shape, log.failures
    ((2,), 0)
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
from collections.abc import Iterator
from typing import Any

__all__ = ["TraceLog", "note_failure", "note_output", "recording"]


@dataclasses.dataclass
class TraceLog:
    """The traces made during one lift.

    Attributes:
      first_output: The ``out_shape`` (a pytree of ``ShapeDtypeStruct`` s) of
        the first module traced, which is the root when the root is traced
        (it is traced before any of its children). None when nothing traced.
      traces: How many module traces succeeded.
      failures: How many module traces failed (their module stays ``Foreign``).

    Example:
        >>> TraceLog().traces
        0
    """

    first_output: Any = None
    traces: int = 0
    failures: int = 0


_CURRENT: contextvars.ContextVar[TraceLog | None] = contextvars.ContextVar("pzb_trace_log", default=None)


@contextlib.contextmanager
def recording() -> Iterator[TraceLog]:
    """A fresh :class:`TraceLog` that the traces made inside the ``with`` block write to.

    Example:
        >>> with recording() as log:
        ...     pass
        >>> log.first_output is None
        True
    """
    log = TraceLog()
    token = _CURRENT.set(log)
    try:
        yield log
    finally:
        _CURRENT.reset(token)


def note_output(out_shape: Any) -> None:
    """Records one successful module trace and its output shapes (no-op outside :func:`recording`).

    Example:
        >>> note_output(None)  # nothing is recording
    """
    log = _CURRENT.get()
    if log is not None:
        if log.traces == 0 and log.failures == 0:
            log.first_output = out_shape
        log.traces += 1


def note_failure() -> None:
    """Records one module trace that failed (no-op outside :func:`recording`).

    Example:
        >>> with recording() as log:
        ...     note_failure()
        >>> log.failures
        1
    """
    log = _CURRENT.get()
    if log is not None:
        log.failures += 1
