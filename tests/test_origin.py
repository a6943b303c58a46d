"""The Origin policy (issue 10): a web page cannot reach the broker unless its origin is allowed.

Browsers apply no CORS to WebSockets; what they do send is an `Origin` header a page cannot
forge. These tests connect with a real WebSocket client (trio-websocket) carrying the header a
browser would, against a real listener: the cross-site page of the issue is refused with HTTP
403 before the upgrade under the default configuration, an allowed origin connects, and a
program (no `Origin`) is unaffected.
"""

from __future__ import annotations

import pytest
import structlog
import trio
from trio_websocket import ConnectionRejected, open_websocket_url

from mqbroker.client import connect
from mqbroker.server.security import LOGGED_ORIGIN_CHARS, origin_allowed
from tests.harness import broker_config, running_broker

EVIL = "https://evil.example"
APP = "https://app.example.com"


async def upgrade_status(url: str, origin: str | None) -> int:
    """The HTTP status a WebSocket handshake with `origin` gets (101 once upgraded)."""
    headers = [] if origin is None else [(b"Origin", origin.encode())]
    try:
        with trio.fail_after(5):
            async with open_websocket_url(url, extra_headers=headers):
                return 101
    except ConnectionRejected as rejected:
        return int(rejected.status_code)


async def test_a_cross_site_page_is_refused_by_default() -> None:
    """The attack of the issue: a page of evil.example subscribing to `#` never gets a
    session; it is told 403, logged as a security event and counted."""
    async with running_broker() as running:
        with structlog.testing.capture_logs() as logs:
            assert await upgrade_status(running.url, EVIL) == 403
        refused = [entry for entry in logs if entry["event"] == "security.origin_refused"]
        assert len(refused) == 1
        assert refused[0]["origin"] == EVIL
        assert refused[0]["peer"].startswith("127.0.0.1:")
        assert running.broker.stats()["security_origin_refused"] == 1
        assert not running.broker.sessions


async def test_a_program_without_origin_is_unaffected() -> None:
    """Servers and CLIs send no Origin: the two-command start keeps working."""
    async with running_broker() as running:
        assert await upgrade_status(running.url, None) == 101
        async with connect(running.url) as client:
            await client.publish("a/b", "still served")
        assert running.broker.stats()["security_origin_refused"] == 0


async def test_an_allowed_origin_connects_and_others_stay_refused() -> None:
    config = broker_config(allowed_origins=(APP,))
    async with running_broker(config) as running:
        assert await upgrade_status(running.url, APP) == 101
        # Browsers serialize origins in lower case; the comparison ignores case anyway.
        assert await upgrade_status(running.url, APP.upper()) == 101
        assert await upgrade_status(running.url, EVIL) == 403
        # An origin is compared whole, not as a prefix or a suffix.
        assert await upgrade_status(running.url, APP + ".evil.example") == 403
        assert await upgrade_status(running.url, "null") == 403


async def test_star_allows_any_page() -> None:
    async with running_broker(broker_config(allowed_origins=("*",))) as running:
        assert await upgrade_status(running.url, EVIL) == 101


async def test_a_huge_origin_is_cut_in_the_log() -> None:
    origin = "https://" + "x" * 4000 + ".example"
    async with running_broker() as running:
        with structlog.testing.capture_logs() as logs:
            assert await upgrade_status(running.url, origin) == 403
        refused = [entry for entry in logs if entry["event"] == "security.origin_refused"]
        assert len(refused[0]["origin"]) <= LOGGED_ORIGIN_CHARS + 3


@pytest.mark.parametrize(("origin", "allowed", "expected"), [
    (None, (), True),
    (EVIL, (), False),
    (APP, (APP,), True),
    (" " + APP, (APP,), True),
    (APP + "/", (APP,), False),
    ("http://app.example.com", (APP,), False),
    ("https://app.example.com:8443", (APP,), False),
    (EVIL, ("*",), True),
])
def test_origin_allowed(origin: str | None, allowed: tuple[str, ...], expected: bool) -> None:
    assert origin_allowed(origin, allowed) is expected
