"""A headless Chromium driven over the DevTools protocol, with only the standard library.

tests/test_browser.py opens pzbridge's treescope HTML in a real browser. Chromium speaks the
DevTools protocol over a websocket; the client below implements just what that needs (the
RFC 6455 opening handshake, masked text frames out, fragmented frames in, ping / close) so the
test suite gains no dependency for one test file.

Example (skipped where Chromium is missing):

    >>> browser = find_chromium()
    >>> browser is None or browser.endswith("chromium") or "chrom" in browser
    True
"""

from __future__ import annotations

import base64
import json
import os
import pathlib
import shutil
import socket
import struct
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Callable
from typing import Any

# Every switch that stops Chromium from reaching the network on its own (updates, sync,
# field trials, QUIC probes), so any request the page log shows came from the page.
CHROMIUM_FLAGS = (
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--disable-default-apps", "--disable-extensions", "--no-default-browser-check",
    # Containers often give /dev/shm a few MiB, too little for the renderer.
    "--disable-dev-shm-usage",
)


def find_chromium() -> str | None:
    """Path of a Chromium (or Chrome) binary, or ``None`` where there is none.

    Example:
        >>> find_chromium() is None or os.path.exists(find_chromium())
        True
    """
    for name in ("chromium", "chromium-browser", "google-chrome", "chrome"):
        found = shutil.which(name)
        if found:
            return found
    return None


class DevToolsError(RuntimeError):
    """The browser answered a command with an error, closed the socket, or timed out."""


class WebSocket:
    """A blocking websocket client: text messages out and in, nothing more.

    Example:
        >>> WebSocket._frame(b"hi", mask=b"\\x00\\x00\\x00\\x00")
        b'\\x81\\x82\\x00\\x00\\x00\\x00hi'
    """

    def __init__(self, url: str, timeout: float = 30.0) -> None:
        parts = urllib.parse.urlsplit(url)
        self._sock = socket.create_connection((parts.hostname, parts.port), timeout=timeout)
        key = base64.b64encode(os.urandom(16)).decode()
        request = (
            f"GET {parts.path} HTTP/1.1\r\nHost: {parts.hostname}:{parts.port}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
        )
        self._sock.sendall(request.encode())
        self._buffer = b""
        head = self._read_until(b"\r\n\r\n")
        if b" 101 " not in head.split(b"\r\n", 1)[0]:
            raise DevToolsError(f"websocket handshake with {url} refused: {head[:200]!r}")

    def _read_until(self, marker: bytes) -> bytes:
        while marker not in self._buffer:
            self._fill()
        head, self._buffer = self._buffer.split(marker, 1)
        return head

    def _fill(self) -> None:
        chunk = self._sock.recv(1 << 16)
        if not chunk:
            raise DevToolsError("the browser closed the DevTools socket")
        self._buffer += chunk

    def _read_exactly(self, count: int) -> bytes:
        while len(self._buffer) < count:
            self._fill()
        data, self._buffer = self._buffer[:count], self._buffer[count:]
        return data

    @staticmethod
    def _frame(payload: bytes, opcode: int = 0x1, mask: bytes | None = None) -> bytes:
        # Clients must mask every frame they send (RFC 6455 section 5.3).
        mask = os.urandom(4) if mask is None else mask
        size = len(payload)
        if size < 126:
            header = struct.pack("!BB", 0x80 | opcode, 0x80 | size)
        elif size < 1 << 16:
            header = struct.pack("!BBH", 0x80 | opcode, 0x80 | 126, size)
        else:
            header = struct.pack("!BBQ", 0x80 | opcode, 0x80 | 127, size)
        masked = bytes(byte ^ mask[i % 4] for i, byte in enumerate(payload))
        return header + mask + masked

    def send(self, text: str) -> None:
        """Sends one text message."""
        self._sock.sendall(self._frame(text.encode()))

    def receive(self) -> str:
        """The next text message, reassembled from its fragments; answers pings on the way."""
        parts: list[bytes] = []
        while True:
            first, second = self._read_exactly(2)
            opcode, size = first & 0x0F, second & 0x7F
            if size == 126:
                (size,) = struct.unpack("!H", self._read_exactly(2))
            elif size == 127:
                (size,) = struct.unpack("!Q", self._read_exactly(8))
            mask = self._read_exactly(4) if second & 0x80 else b""
            payload = self._read_exactly(size)
            if mask:
                payload = bytes(byte ^ mask[i % 4] for i, byte in enumerate(payload))
            if opcode == 0x8:
                raise DevToolsError("the browser closed the DevTools socket")
            if opcode == 0x9:
                self._sock.sendall(self._frame(payload, opcode=0xA))
                continue
            if opcode in (0x0, 0x1, 0x2):
                parts.append(payload)
                if first & 0x80:
                    return b"".join(parts).decode()

    def close(self) -> None:
        """Closes the socket (the browser is stopped separately)."""
        self._sock.close()


class Page:
    """One browser tab: DevTools commands in order, every event kept in ``events``.

    Example:
        >>> Page.__name__
        'Page'
    """

    def __init__(self, socket_url: str) -> None:
        self._ws = WebSocket(socket_url)
        self._next_id = 0
        self.events: list[dict[str, Any]] = []

    def command(self, method: str, **params: Any) -> dict[str, Any]:
        """Sends ``method`` and returns its result, keeping the events that arrive meanwhile."""
        self._next_id += 1
        self._ws.send(json.dumps({"id": self._next_id, "method": method, "params": params}))
        while True:
            message = json.loads(self._ws.receive())
            if message.get("id") == self._next_id:
                if "error" in message:
                    raise DevToolsError(f"{method} failed: {message['error']}")
                return message.get("result", {})
            if "method" in message:
                self.events.append(message)

    def evaluate(self, expression: str) -> Any:
        """The value of a JavaScript expression in the page (promises awaited)."""
        result = self.command("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in result:
            raise DevToolsError(f"{expression[:80]!r} threw: {result['exceptionDetails']}")
        return result["result"].get("value")

    def wait_for(self, expression: str, timeout: float = 20.0) -> Any:
        """Polls ``expression`` until it is truthy; returns its value."""
        deadline = time.monotonic() + timeout
        while True:
            value = self.evaluate(expression)
            if value or time.monotonic() > deadline:
                return value
            time.sleep(0.1)

    def wait_event(self, method: str, timeout: float = 30.0) -> dict[str, Any]:
        """Blocks until an event named ``method`` has arrived; returns it."""
        deadline = time.monotonic() + timeout
        while True:
            for event in self.events:
                if event["method"] == method:
                    return event
            if time.monotonic() > deadline:
                raise DevToolsError(f"no {method} event within {timeout} s")
            self.events.append(json.loads(self._ws.receive()))

    def close(self) -> None:
        """Closes the tab's socket."""
        self._ws.close()


class Browser:
    """A headless Chromium with its own profile directory and a DevTools port it picked itself.

    Example:
        >>> Browser.__name__
        'Browser'
    """

    def __init__(self, binary: str, profile: pathlib.Path) -> None:
        self._process = subprocess.Popen(
            [binary, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "--remote-debugging-port=0", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        # Port 0 lets Chromium choose a free port; it writes the choice to this file.
        port_file = profile / "DevToolsActivePort"
        deadline = time.monotonic() + 60
        while not (port_file.exists() and len(port_file.read_text().splitlines()) >= 2):
            if self._process.poll() is not None or time.monotonic() > deadline:
                self.close()
                raise DevToolsError(f"{binary} did not open a DevTools port (exit code {self._process.poll()})")
            time.sleep(0.1)
        self.port = int(port_file.read_text().splitlines()[0])

    def new_page(self) -> Page:
        """Opens a blank tab and connects to it."""
        request = urllib.request.Request(f"http://127.0.0.1:{self.port}/json/new?about:blank", method="PUT")
        with urllib.request.urlopen(request, timeout=30) as response:
            target = json.load(response)
        return Page(target["webSocketDebuggerUrl"])

    def close(self) -> None:
        """Stops the browser process (the one this object started, by its pid)."""
        if self._process.poll() is None:
            self._process.terminate()
            try:
                self._process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait(timeout=10)


def console_errors(events: list[dict[str, Any]]) -> list[str]:
    """The console errors, uncaught exceptions and error log entries among DevTools events.

    Example:
        >>> console_errors([{"method": "Log.entryAdded", "params": {"entry": {"level": "error", "text": "x"}}}])
        ['log: x']
        >>> console_errors([{"method": "Runtime.consoleAPICalled", "params": {"type": "log", "args": []}}])
        []
    """
    found: list[str] = []
    for event in events:
        method, params = event["method"], event.get("params", {})
        if method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
            texts = [str(arg.get("value", arg.get("description", ""))) for arg in params.get("args", [])]
            found.append("console: " + " ".join(texts))
        elif method == "Runtime.exceptionThrown":
            details = params.get("exceptionDetails", {})
            found.append("exception: " + str(details.get("exception", {}).get("description", details.get("text"))))
        elif method == "Log.entryAdded" and params.get("entry", {}).get("level") == "error":
            found.append("log: " + params["entry"].get("text", ""))
    return found


def network_requests(events: list[dict[str, Any]], allowed: Callable[[str], bool]) -> list[str]:
    """The URLs of requests the page sent that ``allowed`` rejects.

    Example:
        >>> local = lambda url: url.startswith(("file:", "data:"))
        >>> network_requests([{"method": "Network.requestWillBeSent", "params": {"request": {"url": "https://x"}}}], local)
        ['https://x']
    """
    urls = [e["params"]["request"]["url"] for e in events if e["method"] == "Network.requestWillBeSent"]
    return [url for url in urls if not allowed(url)]
