"""Headless Chromium, driven through the DevTools protocol over a pipe: open the book's
pages as a reader would, see every request they make, ask the page what it shows, and
take screenshots.  Used by the browser tests and by the command that makes the README's
screenshot:

    python -m cnnderive.book.browser OUT/layers/conv2d.html docs/book-conv2d.png

With ``--remote-debugging-pipe`` Chromium reads protocol messages (JSON, each ended by
a NUL byte) on its file descriptor 3 and writes its answers and events on descriptor 4:
no port, no websocket library.
"""

from __future__ import annotations

import argparse
import base64
import fcntl
import json
import os
import select
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# Debian's package, then other common names; $CNNDERIVE_CHROMIUM names another.
CANDIDATES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-dev-shm-usage",
    "--hide-scrollbars",
    "--remote-debugging-pipe",
)
TIMEOUT = 60.0  # seconds for any one answer; a page of the book loads in well under 1 s


class BrowserError(RuntimeError):
    pass


def find_chromium() -> str | None:
    named = os.environ.get("CNNDERIVE_CHROMIUM")
    if named:
        return shutil.which(named)
    for name in CANDIDATES:
        found = shutil.which(name)
        if found:
            return found
    return None


class Browser:
    """One headless Chromium with one tab; use as a context manager."""

    def __init__(self, executable: str | None = None) -> None:
        executable = executable or find_chromium()
        if executable is None:
            raise BrowserError(
                "no Chromium found (Debian: apt-get install chromium; or set CNNDERIVE_CHROMIUM)"
            )
        self.profile = tempfile.mkdtemp(prefix="cnnderive-chromium-")
        commands_read, self._commands = os.pipe()
        self._answers, answers_write = os.pipe()

        def descriptors_3_and_4() -> None:  # in the child, before exec
            # Moved out of the way first: a pipe end may itself be descriptor 3 or 4.
            low = fcntl.fcntl(commands_read, fcntl.F_DUPFD, 10)
            high = fcntl.fcntl(answers_write, fcntl.F_DUPFD, 10)
            os.dup2(low, 3)
            os.dup2(high, 4)

        self.process = subprocess.Popen(
            [executable, *FLAGS, f"--user-data-dir={self.profile}", "about:blank"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            close_fds=False,  # descriptors 3 and 4 must survive; Python's own are not inherited
            preexec_fn=descriptors_3_and_4,
        )
        os.close(commands_read)
        os.close(answers_write)
        self._buffer = b""
        self._next_id = 0
        self.events: list[dict] = []
        try:
            target = self.send("Target.createTarget", url="about:blank")["targetId"]
            self.session = self.send("Target.attachToTarget", targetId=target, flatten=True)[
                "sessionId"
            ]
            for domain in ("Page", "Network", "Runtime"):
                self.send(f"{domain}.enable", session=True)
        except BaseException:
            self.close()
            raise

    # -- the protocol ---------------------------------------------------------
    def _message(self, deadline: float) -> dict:
        while b"\0" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self._answers], [], [], left)[0]:
                raise BrowserError("Chromium did not answer in time")
            chunk = os.read(self._answers, 1 << 16)
            if not chunk:
                raise BrowserError("Chromium closed its pipe (did it crash?)")
            self._buffer += chunk
        message, self._buffer = self._buffer.split(b"\0", 1)
        return json.loads(message)

    def send(self, method: str, session: bool = False, **params) -> dict:
        """Send one command and wait for its answer; events that arrive meanwhile are kept."""
        self._next_id += 1
        message = {"id": self._next_id, "method": method, "params": params}
        if session:
            message["sessionId"] = self.session
        os.write(self._commands, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + TIMEOUT
        while True:
            answer = self._message(deadline)
            if answer.get("id") == self._next_id:
                if "error" in answer:
                    raise BrowserError(f"{method}: {answer['error'].get('message')}")
                return answer.get("result", {})
            self.events.append(answer)

    def wait_for(self, method: str) -> dict:
        deadline = time.monotonic() + TIMEOUT
        while True:
            for number, event in enumerate(self.events):
                if event.get("method") == method:
                    return self.events.pop(number)
            self.events.append(self._message(deadline))

    # -- what the tests and the screenshot use ---------------------------------
    def open(
        self, url: str, width: int = 1280, height: int = 900, mobile: bool = False
    ) -> list[str]:
        """Load ``url`` in a window ``width`` CSS pixels wide, wait for it and its fonts;
        returns the URL of every request the page made."""
        self.send(
            "Emulation.setDeviceMetricsOverride",
            session=True,
            width=width,
            height=height,
            deviceScaleFactor=1,
            mobile=mobile,
        )
        self.events.clear()
        self.send("Page.navigate", session=True, url=url)
        self.wait_for("Page.loadEventFired")
        self.evaluate("document.fonts.ready.then(() => true)")
        return [
            event["params"]["request"]["url"]
            for event in self.events
            if event.get("method") == "Network.requestWillBeSent"
        ]

    def failed_requests(self) -> list[str]:
        """Error texts of the requests since the last ``open`` that did not load."""
        return [
            event["params"].get("errorText", "failed")
            for event in self.events
            if event.get("method") == "Network.loadingFailed"
        ]

    def evaluate(self, expression: str):
        """The value of a JavaScript expression in the page (promises are awaited)."""
        result = self.send(
            "Runtime.evaluate",
            session=True,
            expression=expression,
            returnByValue=True,
            awaitPromise=True,
        )
        if "exceptionDetails" in result:
            raise BrowserError(f"{expression[:60]}...: {result['exceptionDetails'].get('text')}")
        return result["result"].get("value")

    def screenshot(self, full_page: bool = True) -> bytes:
        """A PNG of the page (all of it with ``full_page``)."""
        params = {"format": "png"}
        if full_page:
            params["captureBeyondViewport"] = True
            size = self.send("Page.getLayoutMetrics", session=True)["cssContentSize"]
            params["clip"] = {
                "x": 0,
                "y": 0,
                "width": size["width"],
                "height": size["height"],
                "scale": 1,
            }
        return base64.b64decode(self.send("Page.captureScreenshot", session=True, **params)["data"])

    def close(self) -> None:
        for descriptor in (self._commands, self._answers):
            try:
                os.close(descriptor)
            except OSError:
                pass
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        shutil.rmtree(self.profile, ignore_errors=True)

    def __enter__(self) -> Browser:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m cnnderive.book.browser",
        description="Screenshot a page of the book in headless Chromium (how docs/ is made).",
    )
    parser.add_argument(
        "page", help="an HTML page of a built book, optionally with #section to scroll to"
    )
    parser.add_argument("png", type=Path, help="where to write the screenshot")
    parser.add_argument("--width", type=int, default=1280, help="window width in CSS pixels")
    parser.add_argument("--height", type=int, default=900, help="window height (full page: 0)")
    args = parser.parse_args(argv)
    page, _, section = args.page.partition("#")
    if not Path(page).is_file():
        print(f"{page} does not exist; build the book first (cnnderive book OUT)", file=sys.stderr)
        return 2
    url = Path(page).resolve().as_uri() + (f"#{section}" if section else "")
    from cnnderive.files import replace_atomically

    try:
        with Browser() as browser:
            browser.open(url, width=args.width, height=args.height or 900)
            picture = browser.screenshot(full_page=args.height == 0)
    except BrowserError as error:
        print(f"screenshot: {error}", file=sys.stderr)
        return 1
    args.png.parent.mkdir(parents=True, exist_ok=True)
    replace_atomically(args.png, lambda stream: stream.write(picture))
    print(f"wrote {args.png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
