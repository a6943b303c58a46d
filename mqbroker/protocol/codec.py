"""The frame codec: msgpack (binary frames) and JSON (text frames), single events or batches.

Decoding checks every field against its event class and turns each bad item into a `Rejected`
value rather than an exception, so one bad event in a batch does not spoil the rest.
msgpack and json errors are translated here and nowhere else. Pure: no I/O.
"""

from __future__ import annotations

import base64
import binascii
import enum
import json
import re
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
#: The most arrays and maps a payload may nest (docs/protocol.md, "Payloads").
MAX_DEPTH = 64


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


# --- the payload rule (docs/protocol.md, "Payloads") ------------------------------------------
#
# One rule, checked here on the decode side of every publish and nowhere else: a payload is
# accepted only if every session, of either format, can receive it and decode the same value,
# now and on every replay. Whatever a publisher can put in a frame beyond that data model is
# refused with bad_event before it is positioned, recorded or delivered.

_INT_MIN, _INT_MAX = -(2**63), 2**64 - 1
_PLAIN_PAYLOADS: tuple[type[Any], ...] = (str, bytes, bool, type(None))


class _InvalidBase64:
    """What a JSON `{"$base64": "..."}` object that is not canonical base64 decodes into in a
    client's frame: a value no check accepts, so that only the event holding it is refused
    (with its id), not the whole frame."""

    __slots__ = ("text",)

    def __init__(self, text: str) -> None:
        self.text = text


class _Extension:
    """A msgpack extension value (other than a timestamp, which msgpack decodes itself): kept as
    a value the payload rule refuses, reserved (negative) types included."""

    __slots__ = ("code",)

    def __init__(self, code: int, data: bytes) -> None:
        self.code = code


def _check_payload(value: Any) -> Any:
    """A payload every session can receive: encodable in msgpack and in JSON alike."""
    kind = type(value)
    if kind in _PLAIN_PAYLOADS or (kind is float and value - value == 0.0):
        return value  # the common case, checked without a call (x - x is NaN unless finite)
    problem = payload_problem(value)
    if problem is not None:
        raise ValueError(f"a value every session can receive, not {problem}")
    return value


def payload_problem(value: Any, depth: int = 0) -> str | None:
    """What puts `value` outside the payload data model, or None; `depth` is how many arrays
    and maps enclose it. Strings are not looked at: a frame's text is checked as a whole."""
    kind = type(value)
    if kind in _PLAIN_PAYLOADS:
        return None
    if kind is int:
        return None if _INT_MIN <= value <= _INT_MAX else "an integer outside -2^63..2^64-1"
    if kind is float:
        # JSON has no NaN or infinity (a JSON 1e400 reads as an infinity).
        return None if value - value == 0.0 else "NaN or an infinity"
    if kind is list or kind is dict:
        if depth >= MAX_DEPTH:
            return f"arrays and maps nested deeper than {MAX_DEPTH} levels"
        if kind is dict:
            return _map_problem(value, depth + 1)
        for item in value:
            problem = payload_problem(item, depth + 1)
            if problem is not None:
                return problem
        return None
    if kind is _InvalidBase64:
        return "a `$base64` string that is not canonical base64 (RFC 4648, padded)"
    if kind is _Extension:
        return f"a msgpack extension type ({value.code})"
    if kind is msgpack.Timestamp:
        return "a msgpack extension type (-1, timestamp)"
    return f"a value of type {kind.__name__}"  # nothing else decodes; kept for safety


def _map_problem(value: dict[Any, Any], depth: int) -> str | None:
    if len(value) == 1 and type(value.get("$base64")) is str:
        # In JSON this map *is* binary data: a JSON session would read bytes where a msgpack
        # session reads a map. (A JSON frame never yields it: its decoder turns it to bytes.)
        return "a map of one string `$base64` (send binary data as msgpack bin)"
    for key, item in value.items():
        if type(key) is not str:
            return f"a map key that is not a string ({type(key).__name__})"
        problem = payload_problem(item, depth)
        if problem is not None:
            return problem
    return None


# Lone surrogates: a JSON string may spell one with a \u escape (valid JSON, not Unicode text);
# no UTF-8 encoder (msgpack's, the WebSocket layer's, a log's) accepts it. msgpack frames cannot
# hold one (their strings are decoded as strict UTF-8), and a JSON frame without a `\u` escape
# cannot either, so only those frames are searched, every string of every event, keys too.
_SURROGATE = re.compile("[\ud800-\udfff]")


def _text_problem(item: dict[Any, Any]) -> str | None:
    """The first string of the event that is not Unicode text, shown escaped, or None."""
    stack: list[Any] = [item]
    while stack:  # iterative: the event may be nested hundreds of levels deep
        value = stack.pop()
        kind = type(value)
        if kind is str:
            if not value.isascii() and _SURROGATE.search(value):
                return _shown(value)
        elif kind is dict:
            stack.extend(value)
            stack.extend(value.values())
        elif kind is list:
            stack.extend(value)
    return None


def _shown(text: str, limit: int = 40) -> str:
    """Client text as an error message may show it: escaped to ASCII and cut short."""
    shown = ascii(text[:limit])
    return shown if len(text) <= limit else f"{shown}... ({len(text)} characters)"


def _check_str_tuple(value: Any) -> tuple[str, ...]:
    if type(value) not in (list, tuple) or not all(type(item) is str for item in value):
        raise ValueError("an array of strings")
    return tuple(value)


def _check_map_tuple(value: Any) -> tuple[dict[str, Any] | None, ...]:
    if type(value) not in (list, tuple) or not all(
            item is None or type(item) is dict for item in value):
        raise ValueError("an array of maps (or nulls)")
    return tuple(value)


_CHECKS: dict[Any, Check] = {
    int: _check_int,
    str: _check_str,
    float: _check_float,
    bool: _check_bool,
    dict[str, Any]: _check_dict,
    tuple[int, ...]: _check_int_tuple,
    tuple[str, ...]: _check_str_tuple,
    tuple[dict[str, Any] | None, ...]: _check_map_tuple,
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


#: Base64 digits whose low 4 (or 2) bits are zero: the only ones that may stand before "=="
#: (or "="), since the bits past the last byte must be zero in canonical base64.
_BEFORE_TWO_PADS, _BEFORE_ONE_PAD = frozenset("AQgw"), frozenset("AEIMQUYcgkosw048")


def _binary(text: str) -> bytes | None:
    """The bytes `text` encodes in canonical base64 (RFC 4648 section 4, padded, nothing else
    around it), or None: lenient decoders read "!!!!" as no bytes and drop trailing data."""
    try:
        # strict_mode: only the alphabet, whole quanta, padding only at the end, nothing after.
        data = binascii.a2b_base64(text, strict_mode=True)
    except (binascii.Error, ValueError):  # ValueError: not ASCII
        return None
    if text.endswith("=="):
        return data if text[-3] in _BEFORE_TWO_PADS else None
    if text.endswith("="):
        return data if text[-2] in _BEFORE_ONE_PAD else None
    return data


def _from_json_object(obj: dict[str, Any]) -> Any:
    # Binary values travel in JSON as {"$base64": "..."} (docs/protocol.md, "Payloads").
    if len(obj) == 1 and "$base64" in obj and isinstance(obj["$base64"], str):
        data = _binary(obj["$base64"])
        if data is None:
            raise ValueError("a `$base64` string is not canonical base64")
        return data
    return obj


def _from_client_json_object(obj: dict[str, Any]) -> Any:
    # In a client's frame a bad `$base64` spoils only its event, which can then be answered
    # with its id (a broker's frame never holds one: it is refused whole, as before).
    if len(obj) == 1 and "$base64" in obj and isinstance(obj["$base64"], str):
        data = _binary(obj["$base64"])
        return data if data is not None else _InvalidBase64(obj["$base64"])
    return obj


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _parse_json(frame: str, object_hook: Callable[[dict[str, Any]], Any]) -> Any:
    """The frame's raw value; raises ValueError with a reason."""
    try:
        return json.loads(frame, object_hook=object_hook, parse_constant=_refuse_constant)
    except ValueError as e:
        raise ValueError(f"the frame is not valid JSON: {_shown(str(e), 200)}") from None
    except RecursionError:  # nested some hundreds of levels
        raise ValueError("the frame is not valid JSON: nested too deeply to parse") from None


def _parse_msgpack(frame: bytes) -> Any:
    """The frame's raw value; raises ValueError with a reason."""
    try:
        # Extension types decode as values the payload rule refuses where they matter (keys
        # an event does not define are ignored, whatever they hold).
        return msgpack.unpackb(frame, raw=False, ext_hook=_Extension)
    except (ValueError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError) as e:
        raise ValueError(f"the frame is not valid msgpack: {_shown(str(e), 200)}") from None


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
        if isinstance(frame, str):
            from_client = specs is CLIENT_SPECS
            raw = _parse_json(frame, _from_client_json_object if from_client
                              else _from_json_object)
            # A string that is not Unicode text can only come from a \u escape in a JSON
            # frame: only such frames are searched (after decoding), so the common case pays
            # nothing for it. One character first: memchr, ten times faster than "\\u".
            suspect = from_client and "\\" in frame and "\\u" in frame
        else:
            raw, suspect = _parse_msgpack(frame), False
    except ValueError as e:
        return [Rejected(ErrorCode.BAD_FRAME, str(e))]
    if isinstance(raw, list):
        if not raw:
            return [Rejected(ErrorCode.BAD_FRAME, "a batch must hold at least one event")]
        if max_items is not None and len(raw) > max_items:
            return [_too_many(max_items, len(raw))]
        items = [decode_item(item, specs) for item in raw]
    else:
        items = [decode_item(raw, specs)]
    if suspect:
        _refuse_non_text(raw if isinstance(raw, list) else [raw], items)
    return items


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


def _fast_publish(item: dict[Any, Any]) -> Publish | None:
    """A well-formed publish, checked inline; None sends it to the generic path (which also
    words the errors). Publishes are most of the traffic, so they skip the field loop."""
    topic, request_id, msg_id = item.get("topic"), item.get("id"), item.get("msg_id")
    payload: Any = item.get("payload")
    kind: type[Any] = type(payload)
    if (type(topic) is not str
            # The payload rule's scalar cases, inline: maps and arrays take the generic path.
            or (kind not in _PLAIN_PAYLOADS and (kind is not float or payload - payload != 0.0))
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


def _refuse_non_text(raw: list[Any], items: list[Any]) -> None:
    """Replace, in `items`, each event whose map in `raw` holds a string that is not text."""
    for n, item in enumerate(raw):
        if type(item) is dict:
            problem = _text_problem(item)
            if problem is not None:
                items[n] = _not_text(item, problem)


def _not_text(item: dict[Any, Any], problem: str) -> Rejected:
    op = item.get("op")
    # The op is echoed in `ref` only when it is text itself (replies must be encodable).
    ref = op if type(op) is str and not _SURROGATE.search(op) else None
    return Rejected(ErrorCode.BAD_EVENT,
                    f"{ref or 'event'}: the string {problem} is not Unicode text "
                    "(it holds a lone surrogate)", _request_id(item), ref)


# --- encoding --------------------------------------------------------------------------------


def _to_json_default(value: Any) -> Any:
    if isinstance(value, bytes | bytearray | memoryview):
        return {"$base64": base64.b64encode(value).decode("ascii")}
    raise TypeError(f"cannot encode {type(value).__name__} in JSON")


def _dumps(value: Any) -> str:
    # allow_nan=False: `NaN` and `Infinity` are not JSON, and a JSON client drops such a frame.
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False, allow_nan=False,
                      default=_to_json_default)


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


#: What encoding a message for a format can raise: a value that format cannot carry.
_UNENCODABLE = (TypeError, ValueError, OverflowError, RecursionError)


class EncodedMessage:
    """A message encoded once for all the sessions it reaches.

    Each session's delivery differs only in `subs`, so the rest of the map (the tail) is encoded
    once per format and each session's fragment is a short prefix plus that shared tail.

    A message that a format cannot carry (the payload rule refuses such publishes, so this is
    defence in depth) never raises into the deliverer: each delivery of it in that format is
    replaced by `dropped` with count 1, and `problem` says why, for the caller to log once.
    """

    __slots__ = ("_json_tail", "_msgpack_tail", "message", "problem")

    def __init__(self, message: Message) -> None:
        self.message = message
        self._msgpack_tail: bytes | None = None
        self._json_tail: str | None = None
        #: Why the message could not be encoded for some format; None while it could.
        self.problem: str | None = None

    def _tail_map(self) -> dict[str, Any]:
        m = self.message
        return {"op": "message", "topic": m.topic, "event": m.event_id,
                "payload": m.payload, "time": m.published_at}

    def msgpack_tail(self) -> bytes:
        if self._msgpack_tail is None:
            # The five shared pairs of the delivery map, packed value by value after their
            # pre-packed keys (the same bytes as packing `_tail_map`, without building it).
            m = self.message
            try:
                self._msgpack_tail = b"".join((
                    _OP_MESSAGE_TOPIC, _packb(m.topic), _EVENT, _packb(m.event_id),
                    _PAYLOAD, _packb(m.payload), _TIME, _packb(m.published_at)))
            except _UNENCODABLE as e:
                self._msgpack_tail = self._failed(Format.MSGPACK, e)
        return self._msgpack_tail

    def json_tail(self) -> str:
        if self._json_tail is None:
            try:
                tail = _dumps(self._tail_map())[1:]
                # The WebSocket layer sends text as UTF-8: a lone surrogate would fail there,
                # in the session's writer. ASCII, the common case, needs no encoding to know.
                if not tail.isascii():
                    tail.encode("utf-8")
                self._json_tail = tail
            except _UNENCODABLE as e:
                self._json_tail = self._failed(Format.JSON, e)
        return self._json_tail

    def _failed(self, fmt: Format, error: Exception) -> Any:
        self.problem = f"cannot encode for {fmt.value} sessions: {_shown(str(error), 120)}"
        return _NOT_ENCODED

    def fragment(self, fmt: Format, subs: tuple[int, ...]) -> Frame:
        if fmt is Format.MSGPACK:
            tail = self.msgpack_tail()
            if tail is _NOT_ENCODED:
                return _DROPPED_ONE[fmt]
            return _subs_prefix(subs) + tail
        json_tail = self.json_tail()
        if json_tail is _NOT_ENCODED:
            return _DROPPED_ONE[fmt]
        return '{"subs":' + _dumps(list(subs)) + "," + json_tail


#: The tail of a message that could not be encoded (compared by identity).
_NOT_ENCODED: Any = object()


_SUBS_KEY = _packb("subs")
_OP_MESSAGE_TOPIC = _packb("op") + _packb("message") + _packb("topic")
_EVENT, _PAYLOAD, _TIME = _packb("event"), _packb("payload"), _packb("time")
_prefix_cache: dict[tuple[int, ...], bytes] = {}
#: What replaces the delivery of a message that cannot be encoded in that format.
_DROPPED_ONE: dict[Format, Frame] = {
    Format.MSGPACK: _packb({"op": "dropped", "count": 1}),
    Format.JSON: _dumps({"op": "dropped", "count": 1}),
}


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


def fitting(values: Sequence[Any], budget: int) -> int:
    """How many of the first `values` fit in `budget` bytes packed (at least one, if any): an
    answer listing what clients made (a page of records, presence entries) stays in a frame."""
    used = 0
    for count, value in enumerate(values):
        used += payload_size(value)
        if used > budget and count:
            return count
    return len(values)
