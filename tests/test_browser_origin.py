"""The Origin policy with a real browser (issue 10): headless Chromium, a real page, a real broker.

tests/test_origin.py sends the `Origin` header a browser would send; this file checks that a
browser does send it and that the policy holds against it. A tiny HTTP server on 127.0.0.1
serves a page whose script opens `ws://127.0.0.1:<broker port>/`, sends a JSON `hello`, and
writes what happened into the DOM. Chromium (`--headless=new --dump-dom`) loads the page and
prints the DOM once the script is done; the test reads the outcome from it. By default the page
is refused (the broker logs `security.origin_refused` with the page's origin, the page sees the
error); once the page's origin is in `[server] allowed_origins`, it gets its welcome.

Chromium is Debian's `chromium` package (`apt-get install chromium`); .ci/run installs it. The
test fails, never skips, when it is missing: a skipped browser test would hide that the policy is
no longer checked against a browser.
"""

from __future__ import annotations

import re
import shutil
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path

import attrs
import structlog
import trio

from tests.harness import broker_config, running_broker

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome")

# Generous bounds (a cold Chromium start on a loaded 2-core machine takes seconds), but bounds:
# the page gives up on its own well before the browser is killed, and the browser before pytest.
PAGE_TIMEOUT_MS = 20_000
BROWSER_TIMEOUT_S = 60

PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>mqbroker origin test</title></head>
<body><pre id="outcome">pending</pre>
<script>
  const outcome = document.getElementById("outcome");
  let parts = [];
  // --dump-dom prints the DOM once the load event has fired. The image /held below keeps the
  // load event back: the server answers it only after the page, its outcome written, asks
  // /release. So the DOM is printed with the outcome in it, with no guessed delay.
  function finish(text) {
    if (outcome.dataset.done) return;
    outcome.dataset.done = "1";
    outcome.textContent = text;
    fetch("/release");
  }
  setTimeout(() => finish("timeout " + parts.join("+")), PAGE_TIMEOUT_MS);
  const ws = new WebSocket("BROKER_URL");
  ws.onopen = () => {
    parts.push("opened");
    ws.send(JSON.stringify({op: "hello", version: 1, client: "page"}));
  };
  ws.onmessage = (event) => {
    const data = JSON.parse(event.data);
    const events = Array.isArray(data) ? data : [data];
    if (events.some((e) => e.op === "welcome")) {
      parts.push("welcome");
      finish(parts.join("+"));
      ws.close(1000);
    }
  };
  ws.onerror = () => { parts.push("error"); };
  ws.onclose = (event) => {
    parts.push("close " + event.code);
    finish(parts.join("/"));
  };
  document.write("<img src='/held'>");
</script>
</body></html>
"""


def chromium() -> str:
    """The Chromium binary, or a failure that says how to install it."""
    for name in CHROMIUM_NAMES:
        found = shutil.which(name)
        if found:
            return found
    raise AssertionError(
        "Chromium is missing: this test drives a real browser. Install Debian's package:\n"
        "    sudo apt-get install -y chromium\n"
        "(.ci/run installs it on a fresh machine)."
    )


@attrs.define
class PageServer:
    """Serves the test page at `/`; `/held` answers only once the page asked `/release`."""

    port: int = 0
    broker_url: str = ""
    released: trio.Event = attrs.Factory(trio.Event)

    @property
    def origin(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def page(self) -> bytes:
        return (PAGE.replace("BROKER_URL", self.broker_url)
                .replace("PAGE_TIMEOUT_MS", str(PAGE_TIMEOUT_MS)).encode())


@asynccontextmanager
async def page_server() -> AsyncIterator[PageServer]:
    server = PageServer()
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(partial(
            trio.serve_tcp, partial(_serve_page, server), 0, host="127.0.0.1"))
        server.port = listeners[0].socket.getsockname()[1]
        yield server
        nursery.cancel_scope.cancel()


async def _serve_page(server: PageServer, stream: trio.SocketStream) -> None:
    """One HTTP/1.0-style exchange per connection: enough for a browser, nothing more."""
    request = b""
    with trio.move_on_after(BROWSER_TIMEOUT_S):
        while b"\r\n\r\n" not in request and len(request) < 65536:
            chunk = await stream.receive_some()
            if not chunk:
                return
            request += chunk
        path = request.split(b" ", 2)[1] if request.count(b" ") >= 2 else b"/"
        if path == b"/":
            await _respond(stream, b"200 OK", b"text/html; charset=utf-8", server.page())
        elif path == b"/release":
            server.released.set()
            await _respond(stream, b"200 OK", b"text/plain", b"released")
        elif path == b"/held":
            await server.released.wait()
            await _respond(stream, b"404 Not Found", b"text/plain", b"no image")
        else:
            await _respond(stream, b"404 Not Found", b"text/plain", b"not found")
    await stream.aclose()


async def _respond(stream: trio.SocketStream, status: bytes, kind: bytes, body: bytes) -> None:
    head = (b"HTTP/1.1 " + status + b"\r\nContent-Type: " + kind
            + b"\r\nContent-Length: " + str(len(body)).encode()
            + b"\r\nConnection: close\r\nCache-Control: no-store\r\n\r\n")
    await stream.send_all(head + body)


async def browser_outcome(browser: str, url: str, profile: Path) -> str:
    """Load `url` in headless Chromium and return the page's outcome, as written in its DOM."""
    command = [
        browser, "--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run",
        "--disable-extensions", "--disable-background-networking",
        f"--user-data-dir={profile}", "--dump-dom", url,
    ]
    with trio.fail_after(BROWSER_TIMEOUT_S):
        done = await trio.run_process(command, capture_stdout=True, capture_stderr=True,
                                      check=False)
    dom = done.stdout.decode(errors="replace")
    found = re.search(r'<pre id="outcome"[^>]*>([^<]*)</pre>', dom)
    assert found, f"no outcome in the page (exit {done.returncode}):\n{dom}\n" \
        f"{done.stderr.decode(errors='replace')[-2000:]}"
    return found.group(1)


async def test_a_page_is_refused_by_default(tmp_path: Path) -> None:
    browser = chromium()  # first: a missing browser fails here, plainly
    async with running_broker() as running, page_server() as pages:
        pages.broker_url = running.url
        with structlog.testing.capture_logs() as logs:
            outcome = await browser_outcome(browser, pages.origin + "/", tmp_path)
        # Chromium reports a refused handshake as an error then an abnormal close (1006),
        # without the HTTP status: the page learns only that it may not connect.
        assert outcome == "error/close 1006"
        refused = [entry for entry in logs if entry["event"] == "security.origin_refused"]
        assert [entry["origin"] for entry in refused] == [pages.origin]
        assert running.broker.stats()["security_origin_refused"] == 1


async def test_a_page_whose_origin_is_allowed_gets_its_welcome(tmp_path: Path) -> None:
    browser = chromium()
    async with page_server() as pages:
        # The page's origin names the page server's port: start that first, then the broker.
        config = broker_config(allowed_origins=(pages.origin,))
        async with running_broker(config) as running:
            pages.broker_url = running.url
            with structlog.testing.capture_logs() as logs:
                outcome = await browser_outcome(browser, pages.origin + "/", tmp_path)
            assert outcome == "opened+welcome"
            assert not [entry for entry in logs if entry["event"] == "security.origin_refused"]
            assert running.broker.stats()["security_origin_refused"] == 0
