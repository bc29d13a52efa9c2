#!/usr/bin/env python
"""Use the web demo in a real browser and take a screenshot: headless Chromium opens the page, types the
prompt, clicks Generate, waits for the images to arrive in the gallery, and saves a PNG.

    python scripts/demo_screenshot.py http://127.0.0.1:7860/ docs/demo.png [--prompt "a red circle"]

Chromium is driven through the Chrome DevTools Protocol over ``--remote-debugging-pipe`` (JSON
messages on file descriptors 3 and 4, ended by a NUL byte), which needs nothing beyond the standard
library and Debian's ``chromium`` package. Exits non-zero, with the reason, when the page or the
images do not appear in time. ``scripts/demo_screenshot.sh`` starts the demo and calls this.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--hide-scrollbars", "--remote-debugging-pipe",
]


class DevTools:
    """One browser over the DevTools pipe: ``call`` sends a command and returns its result."""

    def __init__(self, chromium: str, user_data_dir: str):
        to_browser_read, self._to_browser = os.pipe()
        self._from_browser, from_browser_write = os.pipe()

        def wire_pipes():  # in the child: the protocol's descriptors are 3 (commands in) and 4 (replies out)
            import fcntl

            # Move both ends above 4 first, so that placing one cannot overwrite the other.
            commands_in = fcntl.fcntl(to_browser_read, fcntl.F_DUPFD, 10)
            replies_out = fcntl.fcntl(from_browser_write, fcntl.F_DUPFD, 10)
            os.dup2(commands_in, 3)  # dup2 leaves the copies inheritable: they survive exec
            os.dup2(replies_out, 4)

        self.process = subprocess.Popen(
            [chromium, *CHROMIUM_FLAGS, f"--user-data-dir={user_data_dir}", "about:blank"],
            preexec_fn=wire_pipes, close_fds=False,  # Python's own descriptors are not inheritable (PEP 446)
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        os.close(to_browser_read)
        os.close(from_browser_write)
        self._buffer = b""
        self._next_id = 0
        self.session_id: str | None = None

    def _read_message(self) -> dict:
        while b"\0" not in self._buffer:
            chunk = os.read(self._from_browser, 1 << 20)
            if not chunk:
                raise RuntimeError(f"chromium closed the DevTools pipe (exit status {self.process.poll()})")
            self._buffer += chunk
        message, self._buffer = self._buffer.split(b"\0", 1)
        return json.loads(message)

    def call(self, method: str, session: bool = True, **params) -> dict:
        self._next_id += 1
        message = {"id": self._next_id, "method": method, "params": params}
        if session and self.session_id:
            message["sessionId"] = self.session_id
        os.write(self._to_browser, json.dumps(message).encode() + b"\0")
        while True:
            reply = self._read_message()
            if reply.get("id") == self._next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})

    def evaluate(self, expression: str):
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"page script failed: {result['exceptionDetails'].get('text')} in {expression[:80]!r}")
        return result["result"].get("value")

    def wait_for(self, expression: str, what: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not self.evaluate(expression):
            if time.monotonic() > deadline:
                raise TimeoutError(f"{what} did not happen within {timeout:.0f} s")
            time.sleep(0.25)

    def close(self) -> None:
        try:
            self.call("Browser.close", session=False)
        except Exception:  # the browser may already be gone
            pass
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("url", help="address of the running demo, e.g. http://127.0.0.1:7860/")
    parser.add_argument("out", help="screenshot file (PNG)")
    parser.add_argument("--prompt", default=None, help="prompt to type (default: the page's own example prompt)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the first image (default %(default)s)")
    parser.add_argument("--width", type=int, default=1200, help="window width in CSS pixels (default %(default)s)")
    parser.add_argument("--height", type=int, default=1100, help="window height in CSS pixels (default %(default)s)")
    parser.add_argument("--timeout", type=float, default=300, help="seconds to wait for the images (default %(default)s)")
    parser.add_argument("--chromium", default=shutil.which("chromium") or "chromium", help="browser executable")
    args = parser.parse_args(argv)
    if not shutil.which(args.chromium) and not os.path.isfile(args.chromium):
        parser.error(f"no browser at {args.chromium!r}: apt-get install chromium (Debian's package)")

    with tempfile.TemporaryDirectory(prefix="latentdiff-chromium-") as profile:
        browser = DevTools(args.chromium, profile)
        try:
            (page,) = [t for t in browser.call("Target.getTargets", session=False)["targetInfos"] if t["type"] == "page"][:1]
            browser.session_id = browser.call("Target.attachToTarget", session=False, targetId=page["targetId"],
                                              flatten=True)["sessionId"]
            browser.call("Emulation.setDeviceMetricsOverride", width=args.width, height=args.height,
                         deviceScaleFactor=1, mobile=False)
            browser.call("Page.enable")
            browser.call("Page.navigate", url=args.url)
            browser.wait_for("!!document.querySelector('#text-to-image-run')", "the demo page loading", 60)

            if args.prompt is not None:  # type it as a visitor would: the page listens to input events
                browser.evaluate(
                    "(() => { const box = document.querySelector('#text-to-image-prompt textarea');"
                    f" box.value = {json.dumps(args.prompt)}; box.dispatchEvent(new Event('input', {{bubbles: true}})); }})()"
                )
            # A fixed seed, so the screenshot can be made again: untick "random seed", then enter the seed.
            browser.evaluate(
                "(() => { const box = document.querySelector('#text-to-image-random-seed input');"
                " if (box.checked) box.click(); })()"
            )
            browser.evaluate(
                "(() => { const field = [...document.querySelectorAll('input[type=number]')].find("
                "  input => input.closest('.block')?.innerText.startsWith('Seed'));"
                f" field.value = {args.seed}; field.dispatchEvent(new Event('input', {{bubbles: true}})); }})()"
            )
            browser.evaluate("document.querySelector('#text-to-image-run').click()")
            browser.wait_for(
                "[...document.querySelectorAll('#text-to-image-gallery img')]"
                ".filter(image => image.complete && image.naturalWidth > 0).length > 0",
                "images appearing in the gallery", args.timeout,
            )
            time.sleep(1.0)  # let the gallery finish its layout
            shot = browser.call("Page.captureScreenshot", format="png", captureBeyondViewport=False)
            os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
            with open(args.out, "wb") as file:
                file.write(base64.b64decode(shot["data"]))
        finally:
            browser.close()
    print(f"{args.out}: the demo at {args.url} after Generate")
    return 0


if __name__ == "__main__":
    sys.exit(main())
