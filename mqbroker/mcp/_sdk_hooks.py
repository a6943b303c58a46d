"""Every use of the MCP SDK's private API, in one place (docs/mcp.md, "The private hooks").

The SDK never tells an `EventStore` which session an event belongs to, and keeps its sessions
in process memory. To give each session its own store, to forget a session's events when the
SDK ends it, and to check a resuming request's credential against the session's, mqbroker.mcp
reaches into `StreamableHTTPSessionManager` (`_admit_session`, `_discard_session`,
`_session_owners`, `_server_instances`) and `StreamableHTTPServerTransport` (`_event_store`).
`check()` verifies they are all there, so an SDK version without them fails at start with a
clear message rather than misbehaving; tests/test_mcp_hooks.py checks them against the SDK.
"""

from __future__ import annotations

from typing import Any

import anyio
from mcp.server.auth.middleware.bearer_auth import AuthenticatedUser, authorization_context
from mcp.server.streamable_http import StreamableHTTPServerTransport
from mcp.server.streamable_http_manager import StreamableHTTPSessionManager

from mqbroker.mcp.store import BrokerEventStore

#: The private names used, per class.
MANAGER_HOOKS = ("_admit_session", "_discard_session", "_session_owners", "_server_instances")
TRANSPORT_HOOKS = ("_event_store",)


class UnsupportedSdk(RuntimeError):
    """This version of the MCP SDK lacks a private hook mqbroker.mcp needs."""


def check(manager: StreamableHTTPSessionManager) -> None:
    """Raise UnsupportedSdk unless every hook is where this module expects it."""
    version = _sdk_version()
    missing = [name for name in MANAGER_HOOKS if not hasattr(manager, name)]
    probe = StreamableHTTPServerTransport(mcp_session_id=None)
    missing += [name for name in TRANSPORT_HOOKS if not hasattr(probe, name)]
    if missing:
        raise UnsupportedSdk(f"mqbroker.mcp: this MCP SDK ({version}) lacks {missing}; "
                             "see docs/mcp.md for the supported versions")


def _sdk_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("mcp")
    except PackageNotFoundError:
        return "?"


def bind_sessions(manager: StreamableHTTPSessionManager, store: BrokerEventStore) -> None:
    """Give each session `manager` opens its own view of `store`, and end a session in the
    broker (deleted from the registry, its events forgotten) once the SDK ends it (a DELETE,
    the idle timeout, a crash), unless the server is shutting down (another instance may
    resume its sessions then)."""
    check(manager)
    admit = manager._admit_session
    discard = manager._discard_session

    def admitted(requestor: Any) -> StreamableHTTPServerTransport | None:
        transport = admit(requestor)
        if transport is not None and transport.mcp_session_id is not None:
            transport._event_store = store.session(transport.mcp_session_id)
        return transport

    async def discarded(session_id: str, transport: StreamableHTTPServerTransport) -> None:
        await discard(session_id, transport)
        if not store.shutting_down and store.is_bound(session_id):
            with anyio.CancelScope(shield=True):
                await store.end_session(session_id)

    manager._admit_session = admitted  # type: ignore[method-assign]
    manager._discard_session = discarded  # type: ignore[method-assign]


def foreign_credential(manager: StreamableHTTPSessionManager, session_id: str,
                       scope: dict[str, Any]) -> bool:
    """Whether the request's credential is not the one that opened the session (as the SDK
    checks for its own requests). Only this instance's sessions can be checked: for a session
    opened on another instance, this needs the session registry (docs/mcp.md)."""
    owners = manager._session_owners
    if session_id not in owners and session_id not in manager._server_instances:
        return False
    user = scope.get("user")
    requestor = authorization_context(user) if isinstance(user, AuthenticatedUser) else None
    return requestor != owners.get(session_id)
