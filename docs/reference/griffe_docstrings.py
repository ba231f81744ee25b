"""A griffe extension that reads pzbridge's docstrings the way they are written.

The codebase writes Google-style docstrings with an ``Example:`` section
(singular) of doctests, Sphinx roles (``:class:`~pzbridge.nn.Linear```) in
prose, and sometimes one description for several names
(``seq_axis, kv_seq_axis: Axis names.``, wrapped over two lines). Griffe's
Google parser knows only ``Examples:``, renders roles literally and cannot
split a wrapped list of names. Rather than edit every docstring (and the
doctests they hold), the site build rewrites the text it parses:

- ``Example:`` becomes ``Examples:``, so doctests render as code;
- a role becomes an *optional* cross-reference: a link where the target is
  documented on the site, plain code where it is not (a private module);
- a list of names wrapped before its colon is joined onto one line.

Only the docstrings griffe renders change; the source is left as it is.
``mkdocs.yml`` loads this file through mkdocstrings' ``extensions`` option.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

_EXAMPLE_HEADER = re.compile(r"^(\s*)Example:[ \t]*$", re.MULTILINE)
# :class:`~a.b.C`, :func:`a.b.f`, :meth:`title <a.b.C.m>` (any Sphinx role).
_ROLE = re.compile(r":(?:py:)?[a-z]+:`(?P<tilde>~?)(?P<body>[^`]+)`")
_TITLED = re.compile(r"^(?P<title>.+?)\s*<(?P<target>[^>]+)>$")
# "a, b, c,\n    d: description" -> "a, b, c, d: description"
_WRAPPED_NAMES = re.compile(r"^(?P<head>[ \t]+(?:\w+,[ \t]*)+)\n[ \t]+(?P<tail>(?:\w+,[ \t]*)*\w+:)", re.MULTILINE)


def _role_to_autoref(match: re.Match[str]) -> str:
    body = match.group("body")
    titled = _TITLED.match(body)
    if titled:
        title, target = titled.group("title"), titled.group("target")
    else:
        target = body.removesuffix("()")
        title = target.rsplit(".", 1)[-1] if match.group("tilde") else target
    # mkdocs-autorefs resolves these after rendering; "optional" keeps a missing target quiet.
    return f'<autoref identifier="{target}" optional><code>{title}</code></autoref>'


def rewrite_docstring(text: str) -> str:
    """Returns ``text`` with the rewrites described in the module docstring.

    Example:
        >>> rewrite_docstring("Sum.\\n\\nExample:\\n    >>> 1 + 1\\n    2")
        'Sum.\\n\\nExamples:\\n    >>> 1 + 1\\n    2'
        >>> rewrite_docstring("See :class:`~pzbridge.nn.Linear`.")
        'See <autoref identifier="pzbridge.nn.Linear" optional><code>Linear</code></autoref>.'
    """
    text = _EXAMPLE_HEADER.sub(r"\1Examples:", text)
    text = _ROLE.sub(_role_to_autoref, text)
    while True:
        joined = _WRAPPED_NAMES.sub(lambda m: f"{m.group('head').rstrip()} {m.group('tail')}", text)
        if joined == text:
            return text
        text = joined


class PzbridgeDocstrings(griffe.Extension):
    """Rewrites each loaded object's docstring with :func:`rewrite_docstring`.

    Example:
        >>> module = griffe.Module("m", docstring=griffe.Docstring("Example:\\n    >>> 1\\n    1"))
        >>> PzbridgeDocstrings().on_instance(obj=module)
        >>> module.docstring.value.splitlines()[0]
        'Examples:'
    """

    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        """Called by griffe once per object it loads (modules, classes, functions, attributes)."""
        if obj.docstring is not None:
            obj.docstring.value = rewrite_docstring(obj.docstring.value)
