"""The event ids the MCP adapter gives the SDK, and what its stored messages hold. Pure.

An SSE event id names the session and the stream it belongs to, the message's sequence number
in its session, and an anchor: a broker event id at or before the message in the session's
topic, from which a replay starts. The session is in the id, so a replay can never cross
sessions, although stream ids ("1", the GET stream) repeat in every session.

Sequence numbers are dense per session (1, 2, 3 ...): a replay that finds one missing knows
that a message was lost (a store that failed, or history dropped by the broker's bounds) and
says so, instead of skipping it silently.
"""

from __future__ import annotations

import base64
import binascii
import re
from typing import Any

from attrs import frozen

#: An id longer than this is not one of ours (they are well under 300 characters).
MAX_EVENT_ID = 2048
#: A broker event id from before any message: its epoch is no broker's, so a replay from it
#: gives every message the broker retains (docs/protocol.md: `unknown_epoch`).
FROM_THE_START = "0-0"
_SEQ = re.compile(r"[0-9]{1,19}")


def _b64(text: str) -> str:
    return base64.urlsafe_b64encode(text.encode()).decode().rstrip("=")


def _unb64(text: str) -> str | None:
    try:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4)).decode()
    except (binascii.Error, ValueError):  # ValueError: not ASCII, or not UTF-8
        return None


@frozen
class EventRef:
    """What one of the adapter's SSE event ids says."""

    session: str
    stream: str
    #: The message's sequence number in its session (dense from 1).
    seq: int
    #: A broker event id at or before this message in the session's topic; None: the start.
    anchor: str | None

    def encode(self) -> str:
        return f"{_b64(self.session)}.{_b64(self.stream)}.{self.seq}.{self.anchor or ''}"

    @property
    def since(self) -> str:
        """The broker event id a replay of this session starts from."""
        return self.anchor or FROM_THE_START

    @classmethod
    def parse(cls, text: str) -> EventRef | None:
        """The id's parts, or None for anything that is not one of the adapter's ids (another
        store's, a forged or damaged one): a client header, so nothing here may raise."""
        if len(text) > MAX_EVENT_ID or not text.isascii():
            return None
        parts = text.split(".")
        if len(parts) != 4 or not _SEQ.fullmatch(parts[2]):
            return None
        session, stream = _unb64(parts[0]), _unb64(parts[1])
        if not session or stream is None:
            return None
        return cls(session, stream, int(parts[2]), parts[3] or None)


def request_id(stream: str) -> int | str:
    """The JSON-RPC id of the request a stream answers: the SDK names a request's stream by
    str(id), and its client numbers requests with integers."""
    return int(stream) if stream.isdigit() and str(int(stream)) == stream else stream


def record(seq: int, stream: str, json: str | None, *, final: bool = False) -> dict[str, Any]:
    """The payload stored for one SDK event: its sequence number, stream and JSON-RPC message
    as JSON text (None for the SDK's priming events, which carry no message); `final` for a
    response (or error), which ends its request's stream."""
    payload: dict[str, Any] = {"seq": seq, "stream": stream}
    if json is not None:
        payload["json"] = json
    if final:
        payload["final"] = True
    return payload


def omitted(seq: int, stream: str, reason: str) -> dict[str, Any]:
    """What is stored in place of a message that could not be (over the broker's size limit):
    a replay of its stream reaches it and reports a gap."""
    return {"seq": seq, "stream": stream, "omitted": reason}
