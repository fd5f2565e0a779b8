"""A headless Chromium driven over the Chrome DevTools protocol (CDP), for page tests and benchmarks.

Uses the system's ``chromium`` (Debian's package; ``.ci/run`` installs it) and the ``websockets``
client; nothing is downloaded. The browser is started with a dead proxy for every host but the
loopback, and with its background services off, so a test page can reach only the local server.

    with Chromium(tmp_path) as browser:
        browser.open("http://127.0.0.1:8000/")
        browser.wait_for("window.worldsmith.state.connected")
        browser.key("KeyW", down=True)
        png = browser.screenshot(tmp_path / "page.png")
"""

from __future__ import annotations

import base64
import itertools
import json
import os
import re
import select
import shutil
import subprocess
import threading
import time
from pathlib import Path
from typing import Any, Optional

from websockets.sync.client import connect

__all__ = ["Chromium", "chromium_path", "KEYS"]

# DOM code -> (key, Windows virtual key code) for the keys the play page uses.
KEYS = {
    "KeyW": ("w", 87), "KeyA": ("a", 65), "KeyS": ("s", 83), "KeyD": ("d", 68), "KeyR": ("r", 82), "Space": (" ", 32),
    "ArrowLeft": ("ArrowLeft", 37), "ArrowUp": ("ArrowUp", 38), "ArrowRight": ("ArrowRight", 39), "ArrowDown": ("ArrowDown", 40),
}


def chromium_path() -> Optional[str]:
    """The Chromium executable on PATH (Debian: ``chromium``), or None."""
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        path = shutil.which(name)
        if path:
            return path
    return None


class Chromium:
    """One headless browser with one page, controlled through CDP (flattened target sessions)."""

    def __init__(self, workdir: Path, width: int = 1360, height: int = 900, timeout: float = 30.0):
        exe = chromium_path()
        if exe is None:
            raise FileNotFoundError("no chromium on PATH (Debian: apt-get install chromium)")
        self.workdir = Path(workdir)
        self.downloads = self.workdir / "downloads"
        self.downloads.mkdir(parents=True, exist_ok=True)
        self.timeout = timeout
        args = [
            exe, "--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run", "--no-default-browser-check",
            "--disable-extensions", "--disable-background-networking", "--disable-component-update", "--disable-sync",
            "--disable-default-apps", "--disable-domain-reliability", "--no-pings", "--metrics-recording-only",
            "--disable-client-side-phishing-detection", "--disable-features=Translate,OptimizationHints,MediaRouter",
            "--proxy-server=http://127.0.0.1:9",  # nothing but the loopback (bypassed by default) is reachable
            "--disable-renderer-backgrounding", "--disable-background-timer-throttling",
            "--remote-debugging-port=0", f"--user-data-dir={self.workdir / 'profile'}", f"--window-size={width},{height}",
            "about:blank",
        ]
        self.proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        url = self._devtools_url()
        threading.Thread(target=self._drain, daemon=True).start()
        self._connection = connect(url, max_size=None, open_timeout=timeout)
        self.ws = self._connection.__enter__()
        self._ids = itertools.count(1)
        self.events: list[dict[str, Any]] = []
        target = self.call("Target.createTarget", url="about:blank")["targetId"]
        self.session = self.call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        self.call("Browser.setDownloadBehavior", behavior="allow", downloadPath=str(self.downloads), eventsEnabled=True)
        for domain in ("Page", "Runtime"):
            self.call(f"{domain}.enable", session=self.session)
        self.call("Emulation.setFocusEmulationEnabled", enabled=True, session=self.session)
        self.call("Emulation.setDeviceMetricsOverride", width=width, height=height, deviceScaleFactor=1, mobile=False,
                  session=self.session)

    # ------------------------------------------------------------------ plumbing
    def _devtools_url(self) -> str:
        deadline, buf = time.monotonic() + self.timeout, b""
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"chromium exited with {self.proc.returncode}: {buf.decode(errors='replace')[-2000:]}")
            ready, _, _ = select.select([self.proc.stderr], [], [], 0.2)
            if ready:
                chunk = os.read(self.proc.stderr.fileno(), 65536)
                buf += chunk
                m = re.search(rb"DevTools listening on (ws://\S+)", buf)
                if m:
                    return m.group(1).decode()
        self.close()
        raise RuntimeError(f"chromium did not open its DevTools port within {self.timeout} s: {buf.decode(errors='replace')[-2000:]}")

    def _drain(self) -> None:
        try:
            while self.proc.stderr.read(65536):
                pass
        except (OSError, ValueError):
            pass

    def call(self, method: str, session: Optional[str] = None, **params: Any) -> dict[str, Any]:
        """Send one CDP command and return its result (events that arrive meanwhile go to ``events``)."""
        msg_id = next(self._ids)
        msg: dict[str, Any] = {"id": msg_id, "method": method, "params": params}
        if session:
            msg["sessionId"] = session
        self.ws.send(json.dumps(msg))
        deadline = time.monotonic() + self.timeout
        while True:
            reply = json.loads(self.ws.recv(timeout=max(0.1, deadline - time.monotonic())))
            if reply.get("id") == msg_id:
                if "error" in reply:
                    raise RuntimeError(f"CDP {method}: {reply['error']}")
                return reply.get("result", {})
            self.events.append(reply)

    # ------------------------------------------------------------------ page
    def open(self, url: str) -> None:
        self.call("Page.navigate", url=url, session=self.session)
        self.wait_for("document.readyState === 'complete'")

    def evaluate(self, expression: str) -> Any:
        """The JSON value of a JavaScript expression in the page (promises are awaited)."""
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True,
                           session=self.session)
        if "exceptionDetails" in result:
            raise RuntimeError(f"page error in {expression!r}: {result['exceptionDetails'].get('exception', {}).get('description')}")
        return result["result"].get("value")

    def wait_for(self, expression: str, timeout: Optional[float] = None, poll: float = 0.05) -> Any:
        """Poll until ``expression`` is truthy in the page; returns its value."""
        deadline = time.monotonic() + (timeout or self.timeout)
        while True:
            value = self.evaluate(expression)
            if value:
                return value
            if time.monotonic() > deadline:
                raise TimeoutError(f"page: {expression!r} still false after {timeout or self.timeout} s")
            time.sleep(poll)

    def key(self, code: str, down: bool) -> None:
        """Press or release a key (DOM ``code``, e.g. KeyW, ArrowLeft) as a real keyboard event."""
        key, vk = KEYS[code]
        params: dict[str, Any] = {"type": "keyDown" if down else "keyUp", "key": key, "code": code,
                                  "windowsVirtualKeyCode": vk, "nativeVirtualKeyCode": vk}
        if down and len(key) == 1:
            params.update(type="keyDown", text=key)
        self.call("Input.dispatchKeyEvent", session=self.session, **params)

    def click(self, selector: str) -> None:
        self.evaluate(f"document.querySelector({json.dumps(selector)}).click()")

    def screenshot(self, path: Path) -> Path:
        data = self.call("Page.captureScreenshot", format="png", captureBeyondViewport=True, session=self.session)["data"]
        Path(path).write_bytes(base64.b64decode(data))
        return Path(path)

    def wait_download(self, suffix: str, timeout: Optional[float] = None) -> Path:
        """The first finished download whose name ends with ``suffix``."""
        deadline = time.monotonic() + (timeout or self.timeout)
        while time.monotonic() < deadline:
            done = [p for p in self.downloads.iterdir() if p.name.endswith(suffix) and not p.name.endswith(".crdownload")]
            if done:
                return done[0]
            time.sleep(0.1)
        raise TimeoutError(f"no *{suffix} download in {self.downloads} after {timeout or self.timeout} s")

    def close(self) -> None:
        try:
            if getattr(self, "ws", None) is not None:
                self.ws.close()
        finally:
            if self.proc.poll() is None:
                self.proc.terminate()
                try:
                    self.proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait()

    def __enter__(self) -> "Chromium":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
