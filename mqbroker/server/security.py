"""Transport-level security checks: which web pages may open a session.

Browsers apply no CORS to WebSockets: any page open in a browser on a machine that can reach
the port may connect, and the only sign of it is the `Origin` header the browser adds (and a
page cannot forge). Programs (servers, CLIs) send no `Origin` and are not concerned.
"""

from __future__ import annotations

from collections.abc import Collection

#: An origin longer than this is cut in logs: it is the attacker's text.
LOGGED_ORIGIN_CHARS = 120


def origin_allowed(origin: str | None, allowed: Collection[str]) -> bool:
    """Whether a handshake carrying `origin` (None: no `Origin` header) may upgrade.

    Origins compare without regard to case (RFC 6454 serializes scheme and host in lower case,
    but a configuration may not); "*" in `allowed` lets any page in.
    """
    if origin is None:
        return True
    if "*" in allowed:
        return True
    origin = origin.strip().lower()
    return any(origin == entry.lower() for entry in allowed)


def loggable_origin(origin: str) -> str:
    """`origin` cut to LOGGED_ORIGIN_CHARS, so that a hostile page cannot flood the log."""
    if len(origin) <= LOGGED_ORIGIN_CHARS:
        return origin
    return origin[:LOGGED_ORIGIN_CHARS] + "..."
