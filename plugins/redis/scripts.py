"""The Lua scripts Redis runs for us, and the Python side of their calling convention.

Pure: no redis, no trio. `PUBLISH_LUA` positions, records, de-duplicates and publishes a whole
batch in one atomic step, so the history's order and the live order agree (centrifuge's Redis
engine does the same). `READ_LUA` reads a topic's stream with the epoch and counter it must be
judged against. docs/redis.md walks through both.

Encodings (msgpack): a draft's *body* is the array [topic, payload, published_at, msg_id]
without its one-byte array header; a stream entry keeps the body. What is published (and kept
as the dedup answer) is the *wire* form
[epoch, offset, recorded, topic, payload, published_at, msg_id]: the script prepends the
seven-element array header, the position and whether Redis recorded the message to the body,
so the payload is packed once, in Python, and never unpacked by Redis. A dedup key keeps only
[epoch, offset], the first publish's position: a repeat is answered with its event id.
A batch's consecutive drafts to one topic (a run) are published as one channel message: the
wire alone for a run of one, else a msgpack array of the wires (`decode_published` reads both).
"""

from __future__ import annotations

import secrets
import threading
from collections.abc import Sequence
from typing import Any, Literal, NamedTuple

import msgpack
from attrs import define, field, frozen

from mqbroker.config import HistoryConfig
from mqbroker.history import Gap, Replay
from mqbroker.message import Draft, Message, Position

from .channels import KeyLayout

#: One argument of a script call, as redis-py sends it.
Arg = bytes | str | int | float
ScriptName = Literal[
    "publish",
    "read",
    "latest",
    # The session registry's (registry_scripts.py).
    "session_create",
    "session_get",
    "session_touch",
    "session_change",
    "session_delete",
    "session_list",
    "session_reap",
    "session_counts",
    "presence_announce",
    "presence_withdraw",
    "presence_reap",
]

# ARGV of PUBLISH_LUA: seven header fields (see PublishCall.args), then one msgpack array of
# every draft's [mode, topic, msg_id, epoch, offset], then the drafts' bodies. Few, large
# arguments: redis-py packs each argument in Python, which cost more than the script itself
# did at six arguments per draft.

#: msgpack's header byte of a four-element array.
ARRAY4 = b"\x94"
#: msgpack's header byte of a two-element array: what a dedup key holds, [epoch, offset].
REMEMBERED_HEADER = b"\x92"

#: msgpack's header of an array of n elements (fixarray, array 16 or array 32).
ARRAY_HEADER_LUA = r"""
local function array_header(n)
  if n < 16 then return string.char(144 + n) end
  if n < 65536 then return '\220' .. string.char(math.floor(n / 256), n % 256) end
  return '\221' .. string.char(math.floor(n / 16777216), math.floor(n / 65536) % 256,
                               math.floor(n / 256) % 256, n % 256)
end
"""

_PUBLISH_BODY_LUA = r"""
local prefix, candidate = ARGV[1], ARGV[2]
local dedup_ms, max_messages = tonumber(ARGV[3]), ARGV[4]
local max_age_ms, offset_ttl_ms = ARGV[5], ARGV[6]
local publish = ARGV[7] == '1'
local drafts = cmsgpack.unpack(ARGV[8])
local BODIES = 8

local clock = redis.call('TIME')
local now_us = tonumber(clock[1]) * 1000000 + tonumber(clock[2])
local now_ms = string.format('%d', math.floor(now_us / 1000))
local epoch = false
local evicted = 0
local touched = {}

-- The epoch names this life of the Redis data: a flushed or replaced Redis gets a new one.
local function redis_epoch()
  if not epoch then
    local key = prefix .. 'epoch'
    redis.call('SET', key, candidate, 'NX')
    epoch = redis.call('GET', key)
  end
  return epoch
end

-- A counter that is (re)created starts above every offset the topic ever had: at the clock in
-- microseconds, or past the stream's newest entry if that is later. So an expired counter
-- never hands out a position an old subscriber still holds.
local function restarted_offset(counter, stream)
  local base = now_us
  local newest = redis.call('XREVRANGE', stream, '+', '-', 'COUNT', 1)[1]
  if newest then
    local top = tonumber(string.match(newest[1], '^0%-(%d+)$'))
    if top and top > base then base = top end
  end
  redis.call('SET', counter, string.format('%d', base + 1))
  return base + 1
end

local function record(topic, body)
  local counter = prefix .. 'o:' .. topic
  local stream = prefix .. 's:' .. topic
  local offset = redis.call('INCR', counter)
  if offset == 1 then offset = restarted_offset(counter, stream) end
  redis.call('XADD', stream, '0-' .. string.format('%d', offset), 'm', body, 't', now_ms)
  touched[topic] = true
  return offset
end

-- Consecutive drafts to one topic leave as one PUBLISH: one wire alone, several as a msgpack
-- array of wires. A channel carries one topic, so its order is unchanged, and subscribers
-- parse (and Redis sends) one pub/sub message per run instead of one per draft.
local run_topic, run = false, {}

local function publish_run()
  if #run == 1 then
    redis.call('PUBLISH', prefix .. 't:' .. run_topic, run[1])
  elseif #run > 1 then
    redis.call('PUBLISH', prefix .. 't:' .. run_topic, array_header(#run) .. table.concat(run))
  end
  run = {}
end

local function publish_later(topic, wire)
  if topic ~= run_topic then
    publish_run()
    run_topic = topic
  end
  run[#run + 1] = wire
end

local results = {}
for i, draft in ipairs(drafts) do
  local mode, topic, msg_id = draft[1], draft[2], draft[3]
  local body = ARGV[BODIES + i]
  local dedup_key, original = false, false
  if msg_id ~= '' and dedup_ms > 0 then
    dedup_key = prefix .. 'd:' .. #topic .. ':' .. topic .. ':' .. msg_id
    original = redis.call('GET', dedup_key)
  end
  if original then
    results[i] = {original}
  else
    local ep, offset
    if mode == 'r' then
      ep = redis_epoch()
      offset = record(topic, body)
    else
      ep, offset = draft[4], draft[5]
    end
    if dedup_key then
      -- The position only, [epoch, offset]: a repeat needs its event id, not the payload.
      redis.call('SET', dedup_key, '\146' .. cmsgpack.pack(ep) .. cmsgpack.pack(offset),
                 'PX', ARGV[3])
    end
    if publish then
      local recorded = mode == 'r' and '\195' or '\194'
      publish_later(topic, '\151' .. cmsgpack.pack(ep) .. cmsgpack.pack(offset) .. recorded .. body)
    end
    results[i] = {ep, string.format('%d', offset)}
  end
end

publish_run()

-- Bounds and expiry once per topic of the batch, after its appends.
for topic in pairs(touched) do
  local stream = prefix .. 's:' .. topic
  evicted = evicted + redis.call('XTRIM', stream, 'MAXLEN', '~', max_messages)
  redis.call('PEXPIRE', stream, max_age_ms)
  redis.call('PEXPIRE', prefix .. 'o:' .. topic, offset_ttl_ms)
end
return cmsgpack.pack({evicted, results})
"""

PUBLISH_LUA = ARRAY_HEADER_LUA + _PUBLISH_BODY_LUA

READ_LUA = r"""
local prefix, candidate, topic, since_epoch, start = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5]
local key = prefix .. 'epoch'
redis.call('SET', key, candidate, 'NX')
local epoch = redis.call('GET', key)
-- A position of another epoch says nothing about this one: everything retained is news.
if epoch ~= since_epoch then start = '-' end
local clock = redis.call('TIME')
return {epoch, redis.call('GET', prefix .. 'o:' .. topic),
        redis.call('XRANGE', prefix .. 's:' .. topic, start, '+'), clock[1], clock[2]}
"""

# The newest entry of a topic's stream, with the epoch it belongs to and Redis' clock (its age
# is judged against max_age as a read would).
LATEST_LUA = r"""
local prefix, candidate, topic = ARGV[1], ARGV[2], ARGV[3]
local key = prefix .. 'epoch'
redis.call('SET', key, candidate, 'NX')
local clock = redis.call('TIME')
local newest = redis.call('XREVRANGE', prefix .. 's:' .. topic, '+', '-', 'COUNT', 1)
return {redis.call('GET', key), newest, clock[1], clock[2]}
"""

SCRIPTS: dict[ScriptName, str] = {"publish": PUBLISH_LUA, "read": READ_LUA,
                                  "latest": LATEST_LUA}

#: The largest offset a stream id can hold (ids are `0-<offset>`, two unsigned 64-bit parts).
MAX_OFFSET = 2**64 - 1


def new_epoch() -> str:
    """A candidate epoch, used only if Redis has none: fresh per call, so that a flushed Redis
    never gets back an epoch it had before."""
    return secrets.token_hex(8)


_local = threading.local()


def _packer() -> msgpack.Packer:
    """This thread's packer: making one per call costs more than packing a small message
    (2.4 against 0.5 us), and a Packer is not thread-safe."""
    packer: msgpack.Packer | None = getattr(_local, "packer", None)
    if packer is None:
        packer = _local.packer = msgpack.Packer(use_bin_type=True)
    return packer


def encode_body(draft: Draft) -> bytes:
    packed: bytes = _packer().pack([draft.topic, draft.payload, draft.published_at, draft.msg_id])
    return packed[1:]  # drop the array header: the script or the reader puts one back


class Carried(NamedTuple):
    """A message as pub/sub carried it, and whether Redis recorded it (its stream has it)."""

    message: Message
    recorded: bool


def decode_wire(wire: bytes) -> Carried:
    """A published (or dedup-remembered) message; raises ValueError if it is not one."""
    return _carried(_unpacked(wire))


def decode_published(data: bytes) -> list[Carried]:
    """The messages one channel message carries, in order: one wire, or an array of wires
    (a batch's consecutive drafts to the topic); raises ValueError if it is neither."""
    value = _unpacked(data)
    if isinstance(value, list) and value and isinstance(value[0], list):
        return [_carried(fields) for fields in value]
    return [_carried(value)]


def _unpacked(data: bytes) -> Any:
    try:
        return msgpack.unpackb(data, raw=False)
    except (ValueError, TypeError, msgpack.UnpackException) as error:
        raise ValueError(f"not a message: {error}") from error


def _carried(fields: Any) -> Carried:
    try:
        epoch, offset, recorded, topic, payload, published_at, msg_id = fields
        position = Position(epoch, offset)
    except (ValueError, TypeError) as error:
        raise ValueError(f"not a message: {error}") from error
    message = Message(
        topic=topic, payload=payload, published_at=published_at, position=position, msg_id=msg_id
    )
    return Carried(message, recorded is True)


def decode_entry(epoch: str, offset: int, body: bytes) -> Message:
    topic, payload, published_at, msg_id = msgpack.unpackb(ARRAY4 + body, raw=False)
    return Message(
        topic=topic,
        payload=payload,
        published_at=published_at,
        position=Position(epoch, offset),
        msg_id=msg_id,
    )


@frozen(kw_only=True)
class StreamBounds:
    """A topic's bounds in Redis, in the units the scripts take."""

    max_messages: int
    max_age_ms: int
    offset_ttl_ms: int

    @classmethod
    def of(cls, config: HistoryConfig, offset_ttl: float) -> StreamBounds:
        max_age_ms = max(1, round(config.max_age * 1000))
        # The counter must outlive the stream, or a resumed read could not tell "nothing new"
        # from "everything expired".
        offset_ttl_ms = max(max_age_ms, round(offset_ttl * 1000))
        return cls(
            max_messages=config.max_messages, max_age_ms=max_age_ms, offset_ttl_ms=offset_ttl_ms
        )


@frozen
class Outbound:
    """A draft on its way to the publish script; `position` is set unless Redis records it.

    `of` packs the body in the publisher's task: a payload msgpack cannot pack fails that
    publish alone, not the batch it would have joined.
    """

    draft: Draft
    position: Position | None
    body: bytes = field(repr=False, eq=False)

    @classmethod
    def of(cls, draft: Draft, position: Position | None = None) -> Outbound:
        return cls(draft, position, encode_body(draft))

    def stamped(self, position: Position) -> Outbound:
        return Outbound(self.draft, position, self.body)


@frozen(kw_only=True)
class Written:
    """What one publish-script call did."""

    messages: Sequence[Message]
    #: Messages Redis recorded in their streams.
    recorded: int
    #: Drafts answered with an earlier message of the same (topic, msg_id).
    duplicates: int
    #: Stream entries trimmed by max_messages.
    evicted: int


@frozen(kw_only=True)
class PublishCall:
    """How batches are written: which drafts Redis records, whether it publishes them."""

    layout: KeyLayout
    bounds: StreamBounds
    #: 0 turns de-duplication off.
    dedup_ms: int
    publish: bool
    #: "all": every draft is recorded (a history append); "flagged": the drafts whose
    #: `record` is set; "none": Redis records nothing (another store gave the positions).
    record: Literal["all", "flagged", "none"]

    def records(self, draft: Draft) -> bool:
        return self.record == "all" or (self.record == "flagged" and draft.record)

    def args(self, batch: Sequence[Outbound]) -> list[Arg]:
        heads = [_head(outbound) for outbound in batch]
        return [
            self.layout.prefix,
            new_epoch(),
            self.dedup_ms,
            self.bounds.max_messages,
            self.bounds.max_age_ms,
            self.bounds.offset_ttl_ms,
            int(self.publish),
            _packer().pack(heads),
            *(outbound.body for outbound in batch),
        ]

    def written(self, reply: bytes, batch: Sequence[Outbound]) -> Written:
        # raw: a dedup answer (from an older broker, a wire message) need not be UTF-8.
        evicted, results = msgpack.unpackb(reply, raw=True)
        pairs = list(zip(results, batch, strict=True))
        duplicates = sum(len(result) == 1 for result in results)
        messages: list[Message] = []
        # A repeat of a draft of this same batch is answered with that draft's message.
        in_batch: dict[Position, Message] = {}
        for result, outbound in pairs:
            message = _message(result, outbound.draft)
            if len(result) == 2:
                in_batch[message.position] = message
            messages.append(in_batch.get(message.position, message))
        return Written(
            messages=messages,
            recorded=sum(len(result) == 2 and o.position is None for result, o in pairs),
            duplicates=duplicates,
            evicted=int(evicted),
        )


def _head(outbound: Outbound) -> list[str | int]:
    draft, position = outbound.draft, outbound.position
    # "r": Redis records the draft and positions it; "p": it comes positioned.
    if position is None:
        return ["r", draft.topic, draft.msg_id or "", "", 0]
    return ["p", draft.topic, draft.msg_id or "", position.epoch, position.offset]


def _message(result: Sequence[bytes], draft: Draft) -> Message:
    if len(result) == 2:
        epoch, offset = result
        return Message.from_draft(draft, Position(epoch.decode(), int(offset)))
    remembered = result[0]
    if not remembered.startswith(REMEMBERED_HEADER):
        # A whole wire message: remembered by a broker from before positions alone were.
        return decode_wire(remembered).message
    # A repeat: the first publish's position, with the repeat's own draft (the same message).
    epoch, offset = msgpack.unpackb(remembered, raw=True)
    return Message.from_draft(draft, Position(epoch.decode(), int(offset)))


@define
class InstanceClock:
    """Positions for messages Redis does not record: this instance's own epoch and counter."""

    epoch: str = field(factory=lambda: secrets.token_hex(6))
    _offset: int = 0

    def next(self) -> Position:
        self._offset += 1
        return Position(self.epoch, self._offset)


# --- Reading a stream back ---------------------------------------------------------------


def read_args(layout: KeyLayout, topic: str, since: Position | None) -> list[Arg]:
    """Arguments of READ_LUA; `since` None reads everything retained."""
    if since is None:
        return [layout.prefix, new_epoch(), topic, "", "-"]
    start = f"0-{min(since.offset + 1, MAX_OFFSET)}"
    return [layout.prefix, new_epoch(), topic, since.epoch, start]


def replay_of(reply: Any, since: Position | None, bounds: StreamBounds) -> Replay:
    """What READ_LUA's reply means for a subscriber resuming after `since`.

    Entries past the bounds that Redis still holds (MAXLEN ~ trims whole nodes; an idle
    stream expires, a busy one does not) count as evicted: the bounds are exact on read.
    """
    epoch_bytes, last_bytes, entries, seconds, micros = reply
    epoch = epoch_bytes.decode()
    last = int(last_bytes) if last_bytes is not None else None
    now_ms = int(seconds) * 1000 + int(micros) // 1000
    oldest_offset = last - bounds.max_messages if last is not None else -1
    messages = [
        decode_entry(epoch, offset, fields[b"m"])
        for offset, fields in map(_entry, entries)
        if offset > oldest_offset and now_ms - int(fields[b"t"]) <= bounds.max_age_ms
    ]
    return Replay(messages=messages, gap=_gap(epoch, last, messages, since))


def latest_args(layout: KeyLayout, topic: str) -> list[Arg]:
    """Arguments of LATEST_LUA."""
    return [layout.prefix, new_epoch(), topic]


def latest_of(reply: Any, bounds: StreamBounds) -> Position | None:
    """The position LATEST_LUA's reply names: None when the stream is empty, or its newest
    entry is past max_age (a read would not return it either)."""
    epoch_bytes, entries, seconds, micros = reply
    if not entries:
        return None
    offset, fields = _entry(entries[0])
    now_ms = int(seconds) * 1000 + int(micros) // 1000
    if now_ms - int(fields[b"t"]) > bounds.max_age_ms:
        return None
    return Position(epoch_bytes.decode(), offset)


def _entry(entry: Sequence[Any]) -> tuple[int, dict[bytes, bytes]]:
    entry_id, flat = entry
    return int(entry_id.partition(b"-")[2]), dict(zip(flat[::2], flat[1::2], strict=True))


def _gap(
    epoch: str, last: int | None, messages: Sequence[Message], since: Position | None
) -> Gap | None:
    if since is None:
        return None
    if since.epoch != epoch:
        return Gap.UNKNOWN_EPOCH
    if messages:
        # Offsets are dense per topic (one INCR per recorded message): a hole is a loss.
        return Gap.TRIMMED if messages[0].position.offset > since.offset + 1 else None
    # Nothing retained after `since`: complete only if nothing was recorded after it either.
    # No counter at all (it expired) cannot prove that, so it errs towards TRIMMED.
    return None if last == since.offset else Gap.TRIMMED
