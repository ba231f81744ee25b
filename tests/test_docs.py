"""The guide's examples run: every ```python block of docs/*.md and README.md.

The blocks of one file run in order in one fresh namespace, so a later block
may use names an earlier one defined (as a reader running the page top to
bottom would). Blocks that must not run are fenced as ```text (or ```bash).
A failure names the file, the block number and the block's first line in
the file.
"""

from __future__ import annotations

import re
import sys
import traceback
import types
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOC_FILES = sorted((ROOT / "docs").glob("*.md")) + [ROOT / "README.md"]
_FENCE = re.compile(r"^```python[ \t]*\n(.*?)^```[ \t]*$", re.S | re.M)


def python_blocks(text: str) -> list[tuple[int, str]]:
    """Returns ``(first_code_line, code)`` for each ```python block of a markdown text."""
    blocks = []
    for match in _FENCE.finditer(text):
        first_line = text.count("\n", 0, match.start(1)) + 1
        blocks.append((first_line, match.group(1)))
    return blocks


def test_python_blocks_are_found_with_their_line_numbers() -> None:
    text = "intro\n```python\nx = 1\n```\n```text\nnot run\n```\n```python\ny = x + 1\n```\n"
    assert python_blocks(text) == [(3, "x = 1\n"), (9, "y = x + 1\n")]


@pytest.mark.parametrize("path", DOC_FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_doc_examples_run_in_order(path: Path) -> None:
    relative = path.relative_to(ROOT)
    # A real module, so classes defined in examples (dataclasses, pickling) find their module.
    module = types.ModuleType(f"pzbridge_docs_{path.stem}")
    module.__file__ = str(path)
    sys.modules[module.__name__] = module
    try:
        _run_blocks(path, relative, module.__dict__)
    finally:
        del sys.modules[module.__name__]


def _run_blocks(path: Path, relative: Path, namespace: dict) -> None:
    for number, (line, code) in enumerate(python_blocks(path.read_text()), start=1):
        # Pad with blank lines so tracebacks report line numbers of the markdown file.
        compiled = compile("\n" * (line - 1) + code, str(relative), "exec")
        try:
            exec(compiled, namespace)
        except Exception:  # noqa: BLE001 - reported with where it happened.
            pytest.fail(
                f"{relative}: python block {number} (starting at line {line}) failed:\n{traceback.format_exc()}",
                pytrace=False,
            )


def test_index_lists_every_page() -> None:
    index = (ROOT / "docs" / "index.md").read_text()
    missing = [p.name for p in DOC_FILES if p.parent.name == "docs" and p.name != "index.md"
               and f"docs/{p.name}" not in index]
    assert not missing, f"docs/index.md 'Where to read next' does not list {missing}"
