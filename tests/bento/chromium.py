"""A headless Chromium (Debian's package) driven over the DevTools protocol, as a user drives the
page: load it, type, click, pick a file, and read the DOM back. No browser download, no driver:
a page target's WebSocket and a few protocol commands."""

from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from websockets.sync.client import connect

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
# Generous bounds on a failure on a loaded host; never the property a test checks.
START_TIMEOUT_S = 60.0
COMMAND_TIMEOUT_S = 120.0


def require_chromium() -> str:
    """The browser's path; skips without it, and fails in CI, which installs it (.ci/chromium.sh)."""
    if CHROMIUM is None:
        if os.environ.get("CI") == "true":
            pytest.fail("chromium is missing in CI: .ci/chromium.sh installs it (make test runs it)")
        pytest.skip("chromium is not installed (apt-get install chromium, or make chromium as root)")
    return CHROMIUM


class Browser:
    """One headless Chromium with one page; ``args`` are extra command-line switches (a fake
    microphone, say). Stop it with ``close`` (or use it as a context manager)."""

    def __init__(self, profile: Path, log: Path, args: tuple[str, ...] = ()) -> None:
        command = [
            require_chromium(), "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
            "--disable-background-networking", "--disable-component-update", "--disable-sync", "--no-first-run",
            "--no-default-browser-check", "--window-size=1100,1500", f"--user-data-dir={profile}",
            "--remote-debugging-port=0", *args, "about:blank",
        ]
        self._log = log.open("wb")
        self.process = subprocess.Popen(command, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True)
        self._id = 0
        try:
            port = self._devtools_port(profile)
            page = next(t for t in httpx.get(f"http://127.0.0.1:{port}/json/list", timeout=30).json() if t["type"] == "page")
            self.socket = connect(page["webSocketDebuggerUrl"], max_size=None, open_timeout=30)
            self.send("Page.enable")
            self.send("Runtime.enable")
        except BaseException:
            self.close()
            raise

    def _devtools_port(self, profile: Path) -> int:
        # Chromium writes the port it chose (port 0: any free one) to this file once it listens.
        active = profile / "DevToolsActivePort"
        deadline = time.monotonic() + START_TIMEOUT_S
        while not (active.is_file() and active.read_text().strip()):
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"chromium did not start (exit {self.process.poll()}); see {self._log.name}")
            time.sleep(0.1)
        return int(active.read_text().split()[0])

    def send(self, method: str, **params: Any) -> dict[str, Any]:
        """One protocol command; its result (events that arrive meanwhile are dropped)."""
        self._id += 1
        self.socket.send(json.dumps({"id": self._id, "method": method, "params": params}))
        deadline = time.monotonic() + COMMAND_TIMEOUT_S
        while True:
            message = json.loads(self.socket.recv(timeout=max(0.1, deadline - time.monotonic())))
            if message.get("id") == self._id:
                if "error" in message:
                    raise AssertionError(f"{method}: {message['error']}")
                return message.get("result", {})

    def evaluate(self, expression: str, *, gesture: bool = False) -> Any:
        """The value of a JavaScript expression in the page (promises awaited); ``gesture``: as if
        a user's click ran it (what a microphone or an audio context may need)."""
        result = self.send("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True, userGesture=gesture)
        if "exceptionDetails" in result:
            raise AssertionError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def open(self, url: str) -> None:
        self.send("Page.navigate", url=url)
        self.wait_for("document.readyState === 'complete' && location.href !== 'about:blank'", f"{url} loaded")

    def wait_for(self, expression: str, what: str, timeout_s: float = 180.0) -> Any:
        """Poll ``expression`` until it is true(ish), and return it; ``timeout_s`` only bounds a failure."""
        deadline = time.monotonic() + timeout_s
        while not (value := self.evaluate(expression)):
            if time.monotonic() > deadline:
                raise AssertionError(f"not within {timeout_s:g} s: {what}")
            time.sleep(0.2)
        return value

    def set_files(self, selector: str, *paths: Path) -> None:
        """Pick files in a file input, as a user does (its input and change events fire)."""
        root = self.send("DOM.getDocument")["root"]["nodeId"]
        node = self.send("DOM.querySelector", nodeId=root, selector=selector)["nodeId"]
        self.send("DOM.setFileInputFiles", nodeId=node, files=[str(p) for p in paths])

    def screenshot(self, path: Path) -> Path:
        data = self.send("Page.captureScreenshot", format="png", captureBeyondViewport=True)["data"]
        path.write_bytes(base64.b64decode(data))
        return path

    def close(self) -> None:
        socket = getattr(self, "socket", None)
        if socket is not None:
            socket.close()
        if self.process.poll() is None:
            # Its own process group (start_new_session): the renderer and helpers go with it.
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        self._log.close()

    def __enter__(self) -> Browser:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
