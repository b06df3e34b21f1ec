"""A minimal headless-Chromium driver over the Chrome DevTools Protocol (CDP), for page tests.

    with Chromium(tmp_path) as browser:
        browser.navigate("file:///.../page.html")
        assert browser.evaluate("document.title") == "..."
        assert browser.errors == []          # console errors, uncaught exceptions, failed loads
        png = browser.screenshot()

Chromium is started with `--remote-debugging-port=0`; the port is read from the profile's DevToolsActivePort
file and the page target's websocket URL from http://127.0.0.1:PORT/json. Chromium runs in a process group
of its own, marked with tests/processes.py's marker, and is killed (group, then any marked process left) on
close. Uses the `websockets` sync client.
"""
from __future__ import annotations

import base64
import contextlib
import itertools
import json
import os
import shutil
import signal
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Any

from tests.processes import kill_marked, new_marker, wait_until_gone

INSTALL_HINT = "`make test` (as root) installs it: apt-get install -y chromium"


def find_chromium() -> str | None:
    """Debian's chromium (/usr/bin/chromium) or a chromium/chromium-browser/google-chrome on PATH."""
    if os.access("/usr/bin/chromium", os.X_OK):
        return "/usr/bin/chromium"
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        found = shutil.which(name)
        if found:
            return found
    return None


class CDPError(RuntimeError):
    pass


class Chromium:
    def __init__(self, work_dir: Path, binary: str | None = None, *, width: int = 1280, height: int = 1000,
                 timeout: float = 60.0) -> None:
        self.binary = binary or find_chromium()
        if self.binary is None:
            raise FileNotFoundError(f"no chromium found; {INSTALL_HINT}")
        self.work_dir = Path(work_dir)
        self.width, self.height, self.timeout = width, height, timeout
        self.events: list[dict[str, Any]] = []
        self.errors: list[str] = []
        self._ids = itertools.count(1)
        self._ws = None
        self._ws_stack = contextlib.ExitStack()
        self._process: subprocess.Popen | None = None
        self._env = {**os.environ, **new_marker()}

    # --- start / stop -------------------------------------------------------------------------------------
    def __enter__(self) -> "Chromium":
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def start(self) -> None:
        from websockets.sync.client import connect

        profile = self.work_dir / "chromium-profile"
        profile.mkdir(parents=True, exist_ok=True)
        port_file = profile / "DevToolsActivePort"
        port_file.unlink(missing_ok=True)  # a reused profile: the port of an earlier browser
        self._log = (self.work_dir / "chromium.log").open("wb")
        self._process = subprocess.Popen(
            [
                self.binary, "--headless=new", "--no-sandbox", "--disable-gpu", "--remote-debugging-port=0",
                f"--user-data-dir={profile}", f"--window-size={self.width},{self.height}", "--no-first-run",
                "--no-default-browser-check", "--disable-extensions", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--hide-scrollbars", "--mute-audio", "about:blank",
            ],
            stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT, env=self._env,
            start_new_session=True,
        )
        deadline = time.monotonic() + self.timeout
        while not (port_file.is_file() and port_file.read_text().strip()):
            self._check_alive(deadline, "DevToolsActivePort")
            time.sleep(0.05)
        port = int(port_file.read_text().split()[0])
        url = None
        while url is None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/json", timeout=5) as response:
                    targets = json.load(response)
                url = next((t["webSocketDebuggerUrl"] for t in targets if t.get("type") == "page"), None)
            except OSError:
                pass
            if url is None:
                self._check_alive(deadline, "a page target")
                time.sleep(0.1)
        self._ws = self._ws_stack.enter_context(connect(url, max_size=None, open_timeout=self.timeout))
        for domain in ("Page", "Runtime", "Log"):
            self.send(f"{domain}.enable")

    def _check_alive(self, deadline: float, waiting_for: str) -> None:
        if self._process.poll() is not None:
            raise CDPError(f"chromium exited ({self._process.returncode}) before {waiting_for}: {self.log_tail()}")
        if time.monotonic() > deadline:
            raise CDPError(f"no {waiting_for} within {self.timeout} s: {self.log_tail()}")

    def log_tail(self) -> str:
        try:
            return (self.work_dir / "chromium.log").read_text(errors="replace")[-2000:]
        except OSError:
            return ""

    def close(self) -> None:
        if self._ws is not None:
            try:
                self._ws_stack.close()
            except Exception:  # noqa: BLE001 - best effort: the process is killed next
                pass
            self._ws = None
        if self._process is not None:
            try:
                os.killpg(self._process.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                self._process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(self._process.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                self._process.wait(timeout=10)
            # Helpers that left the process group (none expected) still carry the marker.
            if wait_until_gone(self._env, timeout=5):
                kill_marked(self._env)
            self._process = None
            self._log.close()

    def leftover_processes(self) -> dict[int, str]:
        from tests.processes import marked_processes

        return marked_processes(self._env)

    # --- protocol -----------------------------------------------------------------------------------------
    def _record(self, message: dict[str, Any]) -> None:
        self.events.append(message)
        method, params = message.get("method"), message.get("params", {})
        if method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
            text = " ".join(str(arg.get("value", arg.get("description", ""))) for arg in params.get("args", []))
            self.errors.append(f"console.{params['type']}: {text}")
        elif method == "Runtime.exceptionThrown":
            details = params.get("exceptionDetails", {})
            description = details.get("exception", {}).get("description") or details.get("text")
            self.errors.append(f"exception: {description}")
        elif method == "Page.javascriptDialogOpening":  # alert() etc. would block the page: dismiss, count as an error
            self.errors.append(f"dialog ({params.get('type')}): {params.get('message')}")
            dismiss = {"id": next(self._ids), "method": "Page.handleJavaScriptDialog", "params": {"accept": False}}
            self._ws.send(json.dumps(dismiss))  # its reply is not waited for
        elif method == "Log.entryAdded" and params.get("entry", {}).get("level") == "error":
            entry = params["entry"]
            self.errors.append(f"log ({entry.get('source')}): {entry.get('text')} {entry.get('url', '')}".strip())

    def _receive(self, deadline: float) -> dict[str, Any]:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError("no CDP message in time")
        try:
            message = json.loads(self._ws.recv(timeout=remaining))
        except TimeoutError:
            raise TimeoutError("no CDP message in time") from None
        if "method" in message:
            self._record(message)
        return message

    def send(self, method: str, params: dict[str, Any] | None = None, timeout: float | None = None) -> dict[str, Any]:
        """Send a command and return its result (events arriving meanwhile are recorded)."""
        call_id = next(self._ids)
        self._ws.send(json.dumps({"id": call_id, "method": method, "params": params or {}}))
        deadline = time.monotonic() + (timeout or self.timeout)
        while True:
            message = self._receive(deadline)
            if message.get("id") == call_id:
                if "error" in message:
                    raise CDPError(f"{method}: {message['error']}")
                return message.get("result", {})

    def wait_event(self, method: str, timeout: float | None = None, since: int = 0) -> dict[str, Any]:
        """The first event `method` recorded at index >= since, waiting for it if needed."""
        deadline = time.monotonic() + (timeout or self.timeout)
        while True:
            for event in self.events[since:]:
                if event.get("method") == method:
                    return event
            since = len(self.events)
            self._receive(deadline)

    # --- helpers ------------------------------------------------------------------------------------------
    def navigate(self, url: str) -> None:
        mark = len(self.events)
        result = self.send("Page.navigate", {"url": url})
        if result.get("errorText"):
            raise CDPError(f"navigating to {url}: {result['errorText']}")
        self.wait_event("Page.loadEventFired", since=mark)

    def evaluate(self, expression: str) -> Any:
        result = self.send(
            "Runtime.evaluate", {"expression": expression, "returnByValue": True, "awaitPromise": True}
        )
        if "exceptionDetails" in result:
            details = result["exceptionDetails"]
            raise CDPError(f"evaluating {expression[:80]!r}: {details.get('exception', {}).get('description') or details}")
        return result.get("result", {}).get("value")

    def screenshot(self, path: Path | None = None) -> bytes:
        data = base64.b64decode(self.send("Page.captureScreenshot", {"format": "png"})["data"])
        if path is not None:
            Path(path).write_bytes(data)
        return data
