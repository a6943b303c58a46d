"""The frame codec: msgpack (binary frames) and JSON (text frames), single events or batches.

Decoding checks every field against its event class and turns each bad item into a `Rejected`
value rather than an exception, so one bad event in a batch does not spoil the rest.
msgpack and json errors are translated here and nowhere else. Pure: no I/O.
"""

from __future__ import annotations

import base64
import enum
import json
import typing
from collections.abc import Callable, Iterable, Sequence
from typing import Any, NamedTuple

import attrs
import msgpack
from attrs import frozen

from mqbroker.message import Message
from mqbroker.protocol.events import (
    CLIENT_EVENTS,
    SERVER_EVENTS,
    ErrorCode,
    Event,
    Publish,
)

#: Ids are unsigned and JSON-safe (exactly representable as a double).
MAX_ID = 2**53 - 1


class Format(enum.Enum):
    """A session's encoding, chosen by the frame type of its `hello`."""

    MSGPACK = "msgpack"  # binary frames
    JSON = "json"  # text frames

    @classmethod
    def of(cls, frame: bytes | str) -> Format:
        return cls.JSON if isinstance(frame, str) else cls.MSGPACK


Frame = bytes | str


@frozen
class Rejected:
    """An item of a received frame that is not a valid event; answered with an `error`."""

    code: ErrorCode
    message: str
    id: int | None = None
    ref: str | None = None


# --- field checks, derived once per event class from its annotations -------------------------

Check = Callable[[Any], Any]  # returns the (possibly converted) value or raises ValueError


def _check_int(value: Any) -> int:
    if type(value) is not int or not 0 <= value <= MAX_ID:
        raise ValueError(f"an integer from 0 to {MAX_ID}")
    return value


def _check_str(value: Any) -> str:
    if type(value) is not str:
        raise ValueError("a string")
    return value


def _check_float(value: Any) -> float:
    if type(value) not in (int, float):
        raise ValueError("a number")
    return float(value)


def _check_bool(value: Any) -> bool:
    if type(value) is not bool:
        raise ValueError("a boolean")
    return value


def _check_dict(value: Any) -> dict[str, Any]:
    if type(value) is not dict:
        raise ValueError("a map")
    return value


def _check_int_tuple(value: Any) -> tuple[int, ...]:
    if type(value) not in (list, tuple):
        raise ValueError("an array of integers")
    return tuple(_check_int(item) for item in value)


_INT_RANGE = range(-(2**63), 2**64)


def _check_payload(value: Any) -> Any:
    """A payload every session can receive: encodable in msgpack and in JSON alike."""
    kind = type(value)
    if kind in (str, bytes, bool, float) or value is None:
        return value
    problem = _payload_problem(value, depth=0)
    if problem is not None:
        raise ValueError(f"a value every session can receive: {problem}")
    return value


def _payload_problem(value: Any, depth: int) -> str | None:
    # Bytes map keys and huge integers decode from one format but cannot be encoded in the
    # other; refusing them here is what keeps one publisher from breaking a delivery.
    if depth > 64:
        return "nested deeper than 64 levels"
    kind = type(value)
    if kind is int:
        return None if value in _INT_RANGE else "an integer outside -2^63..2^64-1"
    if kind is dict:
        for key, item in value.items():
            if type(key) is not str:
                return f"a map key that is not a string ({type(key).__name__})"
            problem = _payload_problem(item, depth + 1)
            if problem is not None:
                return problem
        return None
    if kind is list:
        for item in value:
            problem = _payload_problem(item, depth + 1)
            if problem is not None:
                return problem
    return None


_CHECKS: dict[Any, Check] = {
    int: _check_int,
    str: _check_str,
    float: _check_float,
    bool: _check_bool,
    dict[str, Any]: _check_dict,
    tuple[int, ...]: _check_int_tuple,
}


class _FieldSpec(NamedTuple):
    # A tuple rather than an attrs class: it is unpacked for every field of every event.
    name: str
    #: None for fields that take any value (payloads).
    check: Check | None
    required: bool


def _field_specs(cls: type[Any]) -> tuple[_FieldSpec, ...]:
    hints = typing.get_type_hints(cls)
    specs = []
    for f in attrs.fields(cls):
        hint = hints[f.name]
        args = typing.get_args(hint)
        if type(None) in args:  # `X | None`
            hint = next(arg for arg in args if arg is not type(None))
        required = f.default is attrs.NOTHING
        # Payloads are the only field of any type; checking them is the caller's choice.
        check = (_check_payload if f.name == "payload" and cls.OP == "publish"
                 else None if hint is Any else _CHECKS[hint])
        specs.append(_FieldSpec(f.name, check, required))
    return tuple(specs)


@frozen
class _EventSpec:
    cls: type[Any]
    fields: tuple[_FieldSpec, ...]


def _event_specs(classes: Iterable[type[Any]]) -> dict[str, _EventSpec]:
    return {cls.OP: _EventSpec(cls, _field_specs(cls)) for cls in classes}


CLIENT_SPECS = _event_specs(CLIENT_EVENTS)
SERVER_SPECS = _event_specs(SERVER_EVENTS)


# --- decoding --------------------------------------------------------------------------------


def _from_json_object(obj: dict[str, Any]) -> Any:
    # Binary values travel in JSON as {"$base64": "..."} (docs/protocol.md, "Payloads").
    if len(obj) == 1 and "$base64" in obj and isinstance(obj["$base64"], str):
        return base64.b64decode(obj["$base64"])
    return obj


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _refuse_ext(code: int, data: bytes) -> Any:
    raise ValueError(f"msgpack extension type {code} is not part of the protocol")


def _parse(frame: Frame) -> Any:
    """The frame's raw value; raises ValueError with a reason."""
    try:
        if isinstance(frame, str):
            return json.loads(frame, object_hook=_from_json_object,
                              parse_constant=_refuse_constant)
        return msgpack.unpackb(frame, raw=False, ext_hook=_refuse_ext)
    except (ValueError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError) as e:
        kind = "JSON" if isinstance(frame, str) else "msgpack"
        raise ValueError(f"the frame is not valid {kind}: {e}") from None


def decode(frame: Frame, specs: dict[str, _EventSpec], max_items: int | None = None
           ) -> list[Any]:
    """Decode one frame into events and `Rejected` items, in frame order. A batch of more than
    `max_items` events is refused whole, before any of its events is looked at."""
    if max_items is not None and not isinstance(frame, str):
        # Refused from the array header, before a single item is unpacked: a 1 MiB frame of
        # tens of thousands of tiny items takes tens of milliseconds to unpack, and the cap
        # is there to bound the work one frame costs.
        announced = _announced_items(frame)
        if announced > max_items:
            return [_too_many(max_items, announced)]
    try:
        raw = _parse(frame)
    except ValueError as e:
        return [Rejected(ErrorCode.BAD_FRAME, str(e))]
    if isinstance(raw, list):
        if not raw:
            return [Rejected(ErrorCode.BAD_FRAME, "a batch must hold at least one event")]
        if max_items is not None and len(raw) > max_items:
            return [_too_many(max_items, len(raw))]
        return [decode_item(item, specs) for item in raw]
    return [decode_item(raw, specs)]


def _announced_items(frame: bytes) -> int:
    """The item count a msgpack array 16 or array 32 header announces; 0 for anything else
    (a fixarray holds at most 15: under any cap worth having)."""
    if frame[:1] == b"\xdc" and len(frame) >= 3:
        return int.from_bytes(frame[1:3], "big")
    if frame[:1] == b"\xdd" and len(frame) >= 5:
        return int.from_bytes(frame[1:5], "big")
    return 0


def _too_many(max_items: int, count: int) -> Rejected:
    return Rejected(ErrorCode.BAD_FRAME, f"a batch holds at most {max_items} events, not {count}")


def _request_id(item: dict[Any, Any]) -> int | None:
    value = item.get("id")
    return value if type(value) is int and 0 <= value <= MAX_ID else None


_SCALAR_PAYLOADS = (str, bytes, bool, float, type(None))


def _fast_publish(item: dict[Any, Any]) -> Publish | None:
    """A well-formed publish, checked inline; None sends it to the generic path (which also
    words the errors). Publishes are most of the traffic, so they skip the field loop."""
    topic, payload = item.get("topic"), item.get("payload")
    request_id, msg_id = item.get("id"), item.get("msg_id")
    if (type(topic) is not str or type(payload) not in _SCALAR_PAYLOADS
            or (request_id is not None and (type(request_id) is not int
                                            or not 0 <= request_id <= MAX_ID))
            or (msg_id is not None and type(msg_id) is not str)):
        return None
    return Publish(topic=topic, payload=payload, id=request_id, msg_id=msg_id)


def decode_item(item: Any, specs: dict[str, _EventSpec]) -> Any:
    """One event from its map, or a `Rejected` saying what is wrong with it."""
    if type(item) is dict and item.get("op") == "publish" and specs is CLIENT_SPECS:
        fast = _fast_publish(item)
        if fast is not None:
            return fast
    if type(item) is not dict:
        return Rejected(ErrorCode.BAD_FRAME, "an event must be a map with an `op` key")
    op = item.get("op")
    spec = specs.get(op) if type(op) is str else None
    if spec is None:
        known = ", ".join(specs)
        return Rejected(ErrorCode.UNKNOWN_OP, f"unknown op {op!r} (known: {known})",
                        _request_id(item), op if type(op) is str else None)
    values = {}
    for name, check, required in spec.fields:
        value = item.get(name)
        if value is None:
            if required:
                return Rejected(ErrorCode.BAD_EVENT, f"{op}: `{name}` is required",
                                _request_id(item), op)
            continue
        if check is None:
            values[name] = value
            continue
        try:
            values[name] = check(value)
        except ValueError as e:
            return Rejected(ErrorCode.BAD_EVENT, f"{op}: `{name}` must be {e}",
                            _request_id(item), op)
    return spec.cls(**values)


# --- encoding --------------------------------------------------------------------------------


def _to_json_default(value: Any) -> Any:
    if isinstance(value, bytes | bytearray | memoryview):
        return {"$base64": base64.b64encode(value).decode("ascii")}
    raise TypeError(f"cannot encode {type(value).__name__} in JSON")


def _dumps(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False, default=_to_json_default)


# One Packer for the process: `msgpack.packb` builds a new one per call, which costs twice the
# packing of a small map. Sharing it is safe: packing plain values never releases the GIL or
# calls back into Python, so two threads cannot interleave inside `pack`.
_packer = msgpack.Packer(use_bin_type=True)


def _packb(value: Any) -> bytes:
    packed: bytes = _packer.pack(value)
    return packed


def event_map(event: Event) -> dict[str, Any]:
    """The wire map of an event: its op and every field that is not None."""
    values: dict[str, Any] = {"op": event.OP}
    for name, value in attrs.asdict(event, recurse=False).items():
        if value is not None:
            values[name] = list(value) if isinstance(value, tuple) else value
    return values


def encode(event: Event, fmt: Format) -> Frame:
    """One event as a frame fragment (a whole frame on its own, or one item of a batch)."""
    values = event_map(event)
    return _dumps(values) if fmt is Format.JSON else _packb(values)


def join(fragments: Sequence[Frame], fmt: Format) -> Frame:
    """One frame out of encoded fragments: the fragment itself, or a batch (an array)."""
    if len(fragments) == 1:
        return fragments[0]
    if fmt is Format.JSON:
        return "[" + ",".join(typing.cast(Sequence[str], fragments)) + "]"
    return _array_header(len(fragments)) + b"".join(typing.cast(Sequence[bytes], fragments))


def _array_header(n: int) -> bytes:
    # msgpack array headers (fixarray, array 16, array 32): a batch is the header followed by
    # the already-encoded events, so coalescing never re-encodes a message.
    if n < 16:
        return bytes([0x90 | n])
    if n < 2**16:
        return b"\xdc" + n.to_bytes(2, "big")
    return b"\xdd" + n.to_bytes(4, "big")


class EncodedMessage:
    """A message encoded once for all the sessions it reaches.

    Each session's delivery differs only in `subs`, so the rest of the map (the tail) is encoded
    once per format and each session's fragment is a short prefix plus that shared tail.
    """

    __slots__ = ("_json_tail", "_msgpack_tail", "message")

    def __init__(self, message: Message) -> None:
        self.message = message
        self._msgpack_tail: bytes | None = None
        self._json_tail: str | None = None

    def _tail_map(self) -> dict[str, Any]:
        m = self.message
        return {"op": "message", "topic": m.topic, "event": m.event_id,
                "payload": m.payload, "time": m.published_at}

    def msgpack_tail(self) -> bytes:
        if self._msgpack_tail is None:
            # The five shared pairs of the delivery map, packed value by value after their
            # pre-packed keys (the same bytes as packing `_tail_map`, without building it).
            m = self.message
            self._msgpack_tail = b"".join((
                _OP_MESSAGE_TOPIC, _packb(m.topic), _EVENT, _packb(m.event_id),
                _PAYLOAD, _packb(m.payload), _TIME, _packb(m.published_at)))
        return self._msgpack_tail

    def json_tail(self) -> str:
        if self._json_tail is None:
            self._json_tail = _dumps(self._tail_map())[1:]
        return self._json_tail

    def fragment(self, fmt: Format, subs: tuple[int, ...]) -> Frame:
        if fmt is Format.MSGPACK:
            return _subs_prefix(subs) + self.msgpack_tail()
        return '{"subs":' + _dumps(list(subs)) + "," + self.json_tail()


_SUBS_KEY = _packb("subs")
_OP_MESSAGE_TOPIC = _packb("op") + _packb("message") + _packb("topic")
_EVENT, _PAYLOAD, _TIME = _packb("event"), _packb("payload"), _packb("time")
_prefix_cache: dict[tuple[int, ...], bytes] = {}


def _subs_prefix(subs: tuple[int, ...]) -> bytes:
    prefix = _prefix_cache.get(subs)
    if prefix is None:
        # 0x86: a fixmap of six pairs, `subs` first, then the five shared pairs.
        prefix = b"\x86" + _SUBS_KEY + _packb(list(subs))
        if len(_prefix_cache) < 4096:
            _prefix_cache[subs] = prefix
    return prefix


def payload_size(payload: Any) -> int:
    """The payload's encoded size in msgpack: what `max_frame_bytes` is measured against.

    Binary payloads, the common case on the hot path, are measured without encoding them.
    """
    if type(payload) is bytes:
        return len(payload) + (2 if len(payload) < 256 else 3 if len(payload) < 65536 else 5)
    return len(_packb(payload))
