"""The sans-IO protocol state of one session, from either side: frames in, events out.

Like h11 and wsproto: no sockets here. The server and the client each hold one of these per
connection, feed it the frames they receive and ask it to encode what they send. A broken
handshake raises `HandshakeFailed`, which carries the error event to send before closing.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Sequence
from typing import Any

import attrs
from attrs import define, field

from mqbroker.protocol.codec import (
    CLIENT_SPECS,
    SERVER_SPECS,
    Format,
    Frame,
    Rejected,
    decode,
    encode,
    join,
)
from mqbroker.protocol.events import (
    PROTOCOL_VERSION,
    ClientEvent,
    Error,
    ErrorCode,
    Event,
    Hello,
    ServerEvent,
    Welcome,
)


class State(enum.Enum):
    AWAITING_HELLO = "awaiting_hello"
    OPEN = "open"


class HandshakeFailed(Exception):
    """The peer did not open the session properly; send `error` (if any) and close with 4000."""

    def __init__(self, error: Error) -> None:
        super().__init__(error.message)
        self.error = error


def _error_of(item: Rejected) -> Error:
    return Error(code=item.code, message=item.message, id=item.id, ref=item.ref)


_SURROGATE = re.compile("[\ud800-\udfff]")
#: The longest `client` a hello may name, in characters: it is copied into the connection's
#: logs and into every presence entry and event of the connection (one per session it is
#: present in), so it must stay a name, not a payload.
MAX_CLIENT_CHARS = 256
#: How much client text an error may echo, in characters (`ref` holds an op, which is short).
MAX_ERROR_MESSAGE, MAX_ERROR_REF = 1000, 64


def _safe_text(text: str, limit: int) -> str:
    """`text` cut to `limit` characters (saying how long it was), its lone surrogates replaced
    by U+FFFD: an error may echo what a client sent, and must be encodable in any format."""
    if len(text) > limit:
        text = f"{text[:limit]}... ({len(text)} characters)"
    return text if text.isascii() else _SURROGATE.sub("\ufffd", text)


def safe_error(error: Error) -> Error:
    """The error as the broker sends it: client text it echoes cut and made encodable."""
    ref = None if error.ref is None else _safe_text(error.ref, MAX_ERROR_REF)
    return attrs.evolve(error, message=_safe_text(error.message, MAX_ERROR_MESSAGE), ref=ref)


@define
class ServerConnection:
    """The broker's side: the first event must be a supported `hello`."""

    state: State = State.AWAITING_HELLO
    #: The session's format, set by the frame type of its `hello`.
    format: Format = Format.MSGPACK
    client: str = ""
    #: The hello's credential, for the authenticator; dropped once checked.
    auth: str | None = field(default=None, repr=False)
    #: A batch of more events than this is refused whole (`max_frame_items` in the welcome).
    max_items: int | None = None

    def receive(self, frame: Frame) -> list[ClientEvent | Rejected]:
        """The events of one received frame; `Rejected` items are to be answered with errors."""
        items: list[Any] = decode(frame, CLIENT_SPECS, self.max_items)
        if self.state is State.AWAITING_HELLO:
            self._open(frame, items[0])
            items = items[1:]
        if any(type(item) is Hello for item in items):  # rare: spare the common case the call
            return [self._check_open(item) for item in items]
        return items

    def _open(self, frame: Frame, first: Any) -> None:
        self.format = Format.of(frame)
        if isinstance(first, Rejected):
            raise HandshakeFailed(_error_of(first))
        if not isinstance(first, Hello):
            raise HandshakeFailed(Error(code=ErrorCode.HELLO_REQUIRED, ref=first.OP,
                                        message="the first event must be `hello`"))
        if first.version != PROTOCOL_VERSION:
            raise HandshakeFailed(Error(
                code=ErrorCode.UNSUPPORTED_VERSION, ref="hello",
                message=f"protocol version {first.version} is not supported "
                        f"(supported: {PROTOCOL_VERSION})"))
        if len(first.client) > MAX_CLIENT_CHARS:
            raise HandshakeFailed(Error(
                code=ErrorCode.BAD_EVENT, ref="hello",
                message=f"`client` is at most {MAX_CLIENT_CHARS} characters, "
                        f"not {len(first.client)}"))
        self.client = first.client
        self.auth = first.auth
        self.state = State.OPEN

    @staticmethod
    def _check_open(item: Any) -> ClientEvent | Rejected:
        if isinstance(item, Hello):
            return Rejected(ErrorCode.ALREADY_HELLO, "the session is already open", ref="hello")
        result: ClientEvent | Rejected = item
        return result

    def encode(self, event: ServerEvent) -> Frame:
        if type(event) is Error:
            event = safe_error(event)
        return encode(event, self.format)

    def error(self, item: Rejected) -> Frame:
        return self.encode(_error_of(item))


@define
class ClientConnection:
    """The client's side: send `hello`, then expect `welcome` before anything else."""

    format: Format = Format.MSGPACK
    state: State = State.AWAITING_HELLO
    welcome: Welcome | None = field(default=None)

    def hello(self, client: str = "", auth: str | None = None) -> Frame:
        return encode(Hello(version=PROTOCOL_VERSION, client=client, auth=auth), self.format)

    def receive(self, frame: Frame) -> list[ServerEvent | Rejected]:
        items: list[Any] = decode(frame, SERVER_SPECS)
        if self.state is State.AWAITING_HELLO:
            first = items[0]
            if isinstance(first, Error):
                raise HandshakeFailed(first)
            if not isinstance(first, Welcome):
                raise HandshakeFailed(Error(code=ErrorCode.BAD_EVENT,
                                            message="the broker did not answer with `welcome`"))
            self.welcome = first
            self.state = State.OPEN
        return items

    def encode(self, event: ClientEvent) -> Frame:
        return encode(event, self.format)

    def encode_batch(self, events: Sequence[Event]) -> Frame:
        return join([encode(e, self.format) for e in events], self.format)
