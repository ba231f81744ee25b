"""The treescope HTML that the demo and ``python -m pzbridge show --html`` write works in a real browser.

Each page is opened from a ``file://`` address in headless Chromium (Debian's ``chromium``,
which ``.ci/run`` installs when missing) and watched over the DevTools protocol: it must load
with no console error, no uncaught exception and no request that leaves the machine, and a
mouse click on a collapsed node must expand it. Where no Chromium can be found the tests skip
and say so.
"""

from __future__ import annotations

import contextlib
import pathlib
from collections.abc import Iterator

import jax
import pytest
from devtools_client import (
    Browser,
    Page,
    console_errors,
    find_chromium,
    network_requests,
)

CHROMIUM = find_chromium()
pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="no Chromium on PATH (Debian: apt-get install -y chromium; .ci/run does this)")

# The page is the file itself; treescope inlines its scripts and styles and inflates its
# compressed payload from data it carries, so nothing else may be fetched.
LOCAL_SCHEMES = ("file:", "data:", "blob:", "about:")

# A treescope page builds its tree inside the shadow root of <treescope-container> once the
# container scrolls into view; foldable nodes are a label wrapping a checkbox (unchecked:
# collapsed).
_ROOTS = "Array.from(document.querySelectorAll('treescope-container')).map((c) => c.shadowRoot)"
_RENDERED = f"{_ROOTS}.every((r) => r && r.querySelector('.treescope_root') !== null)"
_VISIBLE_TEXT = f"{_ROOTS}.map((r) => r.querySelector('.treescope_root').innerText).join('')"
_FIRST_COLLAPSED = f"""(() => {{
  for (const root of {_ROOTS}) {{
    const toggle = Array.from(root.querySelectorAll('.foldable_node_toggle')).find((t) => !t.checked);
    if (toggle) {{
      const label = toggle.closest('label');
      label.scrollIntoView({{block: 'center'}});
      const box = label.getBoundingClientRect();
      window.__pzbToggle = toggle;
      return {{x: box.left + box.width / 2, y: box.top + box.height / 2}};
    }}
  }}
  return null;
}})()"""
_COLLAPSE_FIRST = f"""(() => {{
  const toggle = {_ROOTS}.flatMap((r) => Array.from(r.querySelectorAll('.foldable_node_toggle')))[0];
  toggle.checked = false;
  return true;
}})()"""


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Browser]:
    assert CHROMIUM is not None
    started = Browser(CHROMIUM, tmp_path_factory.mktemp("chromium-profile"))
    try:
        yield started
    finally:
        started.close()


@contextlib.contextmanager
def opened(browser: Browser, page_file: pathlib.Path) -> Iterator[Page]:
    """A tab that has loaded ``page_file`` and rendered every treescope container in it."""
    page = browser.new_page()
    try:
        for domain in ("Runtime", "Log", "Network", "Page"):
            page.command(f"{domain}.enable")
        page.command("Page.navigate", url=page_file.resolve().as_uri())
        page.wait_event("Page.loadEventFired")
        assert page.wait_for(_RENDERED), f"{page_file.name}: treescope never rendered its tree"
        yield page
    finally:
        page.close()


def click(page: Page, x: float, y: float) -> None:
    """A real left click (press and release) at viewport coordinates."""
    for kind in ("mousePressed", "mouseReleased"):
        page.command("Input.dispatchMouseEvent", type=kind, x=x, y=y, button="left", clickCount=1)


def check_page(browser: Browser, page_file: pathlib.Path) -> None:
    """Loads cleanly, offline, and a click on a collapsed node expands it."""
    with opened(browser, page_file) as page:
        if page.evaluate(_FIRST_COLLAPSED) is None:
            # A small tree renders fully expanded: fold its outermost node, then unfold it by a click.
            page.evaluate(_COLLAPSE_FIRST)
        target = page.evaluate(_FIRST_COLLAPSED)
        assert target is not None, f"{page_file.name}: no foldable node"
        before = page.evaluate(_VISIBLE_TEXT)
        click(page, target["x"], target["y"])
        assert page.wait_for("window.__pzbToggle.checked", timeout=5), f"{page_file.name}: the click did not unfold"
        after = page.evaluate(_VISIBLE_TEXT)
        assert len(after) > len(before), f"{page_file.name}: unfolding showed nothing new"
        assert console_errors(page.events) == [], page_file.name
        assert network_requests(page.events, lambda url: url.startswith(LOCAL_SCHEMES)) == [], page_file.name


def test_show_html_opens_offline_and_expands_on_click(browser: Browser, tmp_path: pathlib.Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    from pzbridge.__main__ import main

    page_file = tmp_path / "mlp.html"
    args = '{"in_size": 4, "out_size": 2, "width_size": 8, "depth": 2}'
    assert main(["show", "equinox.nn:MLP", "--args", args, "--html", str(page_file)]) == 0
    assert "wrote " in capsys.readouterr().out
    check_page(browser, page_file)


def test_show_html_of_the_builtin_gpt_opens_offline_and_expands_on_click(
        browser: Browser, tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]) -> None:
    from pzbridge.__main__ import main

    page_file = tmp_path / "gpt.html"
    assert main(["show", "gpt", "--html", str(page_file)]) == 0
    capsys.readouterr()
    check_page(browser, page_file)


def test_demo_renderings_open_offline_and_expand_on_click(browser: Browser, tmp_path: pathlib.Path) -> None:
    # The demo's own code: its core section writes core_model.html and gpt_model.html; the
    # Equinox and NNX sections render their lifted models with these builders and this writer.
    import pzbridge as pzb
    from pzbridge.demo.core_demo import run_core_demo
    from pzbridge.demo.equinox_demo import build_equinox_model
    from pzbridge.demo.nnx_demo import build_nnx_model
    from pzbridge.demo.report import Report
    from pzbridge.demo.roundtrip import write_html

    report = Report(verbose=False)
    run_core_demo(report, tmp_path)
    assert report.ok, report.summary()
    pages = [
        tmp_path / "core_model.html",
        tmp_path / "gpt_model.html",
        write_html(pzb.lift(build_equinox_model(jax.random.key(0))), tmp_path / "equinox_lifted.html"),
        write_html(pzb.lift(build_nnx_model(0)), tmp_path / "nnx_lifted.html"),
    ]
    for page_file in pages:
        check_page(browser, page_file)


def test_a_page_that_fetches_or_throws_is_caught(browser: Browser, tmp_path: pathlib.Path) -> None:
    # The checks above must be able to fail: a page with a remote image and a thrown error.
    import pzbridge as pzb
    from pzbridge.demo.roundtrip import write_html

    page_file = write_html(pzb.nn.Identity(), tmp_path / "bad.html")
    page_file.write_text(page_file.read_text()
                         + '<img src="http://192.0.2.1/x.png"><script>throw new Error("boom")</script>')
    with opened(browser, page_file) as page:
        page.wait_for("document.images.length > 0")
        errors = console_errors(page.events)
        leaks = network_requests(page.events, lambda url: url.startswith(LOCAL_SCHEMES))
    assert any("boom" in error for error in errors), errors
    assert leaks == ["http://192.0.2.1/x.png"]
