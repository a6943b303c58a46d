"""The session registry in Redis: its keys, its Lua scripts, and their calling convention.

Pure: no redis, no trio. Every change of a session record is one script, which checks (the
user, the version, the state) and writes (the hash and every index) in one atomic step, so of
two instances changing one session at once each sees the other's result. docs/redis.md, "The
session registry", lists the keys and walks through the scripts.

Times are Unix seconds chosen by the caller (the stores never read a clock, Redis' included).
They travel as `repr(float)` text and Lua writes the ones it computes with `%.17g`: both
round-trip exactly, so a record read back from Redis equals the one the memory store would
hold. Metadata is msgpack (what the protocol carries, bytes included), opaque to Lua.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal

import msgpack
from attrs import frozen

from mqbroker.sessions import (
    PresenceEntry,
    PresenceKey,
    SessionRecord,
    SessionState,
    can_transition,
)

from .scripts import Arg, ScriptName

#: The hash fields of a session, in the order every script returns them (after the id).
FIELDS = ("user", "state", "created", "updated", "expires", "ttl", "metadata", "version")


@frozen
class RegistryKeys:
    """The registry's key names under one prefix (the scripts build the same names)."""

    prefix: str

    def session(self, session_id: str) -> bytes:
        return f"{self.prefix}session:{session_id}".encode()

    @property
    def due(self) -> bytes:
        return f"{self.prefix}sessions:due".encode()

    @property
    def ids(self) -> bytes:
        return f"{self.prefix}sessions:ids".encode()

    def of_state(self, state: SessionState) -> bytes:
        return f"{self.prefix}sessions:state:{state}".encode()

    def of_user(self, user: str) -> bytes:
        return f"{self.prefix}sessions:user:{user}".encode()

    def presence(self, session: str) -> bytes:
        return f"{self.prefix}presence:of:{session}".encode()

    @property
    def presence_due(self) -> bytes:
        return f"{self.prefix}presence:due".encode()


# --- Lua -----------------------------------------------------------------------------------

_SESSION_PRELUDE = r"""
local prefix = ARGV[1]
local FIELDS = {'user', 'state', 'created', 'updated', 'expires', 'ttl', 'metadata', 'version'}
local USER, STATE, EXPIRES, TTL, METADATA, VERSION = 1, 2, 5, 6, 7, 8
local UPDATED = 4
local ENDED = {expired = true, invalidated = true}
local DUE, IDS = prefix .. 'sessions:due', prefix .. 'sessions:ids'

local function key_of(id) return prefix .. 'session:' .. id end
local function of_state(state) return prefix .. 'sessions:state:' .. state end
local function of_user(user) return prefix .. 'sessions:user:' .. user end

-- The record's fields, or false when it is absent or, scoped, another user's.
local function find(id, scoped, user)
  local r = redis.call('HMGET', key_of(id), unpack(FIELDS))
  if not r[USER] or (scoped and r[USER] ~= user) then return false end
  return r
end

-- What a script answers for a record: its id, then its fields in FIELDS order.
local function reply(id, r)
  return {id, r[1], r[2], r[3], r[4], r[5], r[6], r[7], r[8]}
end

local function set_state(id, r, state)
  redis.call('ZREM', of_state(r[STATE]), id)
  redis.call('ZADD', of_state(state), 0, id)
  r[STATE] = state
end

-- '%.17g' round-trips a double exactly (Lua's tostring keeps 14 digits only).
local function set_expires(id, r, expires)
  r[EXPIRES] = string.format('%.17g', expires)
  redis.call('ZADD', DUE, r[EXPIRES], id)
end

-- One more version, written with every field a change may touch (metadata aside).
local function save(id, r, now)
  r[UPDATED] = now
  r[VERSION] = string.format('%d', tonumber(r[VERSION]) + 1)
  redis.call('HSET', key_of(id), 'state', r[STATE], 'updated', r[UPDATED],
             'expires', r[EXPIRES], 'ttl', r[TTL], 'version', r[VERSION])
end

local function remove(id, r)
  redis.call('DEL', key_of(id))
  redis.call('ZREM', DUE, id)
  redis.call('ZREM', IDS, id)
  redis.call('ZREM', of_state(r[STATE]), id)
  redis.call('ZREM', of_user(r[USER]), id)
end
"""

# ARGV: prefix, id, then the FIELDS. Answers 1, or 0 when the id is taken.
_CREATE = r"""
local id = ARGV[2]
if redis.call('EXISTS', key_of(id)) == 1 then return 0 end
local args = {}
for i, name in ipairs(FIELDS) do
  args[#args + 1] = name
  args[#args + 1] = ARGV[2 + i]
end
redis.call('HSET', key_of(id), unpack(args))
redis.call('ZADD', DUE, ARGV[2 + EXPIRES], id)
redis.call('ZADD', IDS, 0, id)
redis.call('ZADD', of_user(ARGV[2 + USER]), 0, id)
redis.call('ZADD', of_state(ARGV[2 + STATE]), 0, id)
return 1
"""

# ARGV: prefix, scoped ('1' or '0'), user, ids... Answers a record or nil per id.
_GET = r"""
local scoped, user = ARGV[2] == '1', ARGV[3]
local out = {}
for i = 4, #ARGV do
  local r = find(ARGV[i], scoped, user)
  out[#out + 1] = r and reply(ARGV[i], r)
end
return out
"""

# ARGV: prefix, scoped, user, now, ttl ('' keeps each record's), ids...
_TOUCH = r"""
local scoped, user, now, ttl = ARGV[2] == '1', ARGV[3], ARGV[4], ARGV[5]
local out = {}
for i = 6, #ARGV do
  local id = ARGV[i]
  local r = find(id, scoped, user)
  if r and not ENDED[r[STATE]] then
    if ttl ~= '' then r[TTL] = ttl end
    set_expires(id, r, tonumber(now) + tonumber(r[TTL]))
    save(id, r, now)
    out[#out + 1] = reply(id, r)
  else
    out[#out + 1] = false
  end
end
return out
"""

# ARGV: prefix, id, scoped, user, now, state ('' keeps it), the states it may be reached
# from (space-separated, decided in Python by can_transition), whether metadata is given
# ('1' or '0'), metadata, expected version ('' for any), retain.
# Answers {'ok', record}, {'not_found'}, {'conflict', version} or {'illegal', state}.
_CHANGE = r"""
local id, scoped, user, now = ARGV[2], ARGV[3] == '1', ARGV[4], ARGV[5]
local state, sources, has_metadata = ARGV[6], ' ' .. ARGV[7] .. ' ', ARGV[8] == '1'
local expected, retain = ARGV[10], ARGV[11]
local r = find(id, scoped, user)
if not r then return {'not_found'} end
if expected ~= '' and r[VERSION] ~= expected then return {'conflict', r[VERSION]} end
if state ~= '' then
  if not string.find(sources, ' ' .. r[STATE] .. ' ', 1, true) then
    return {'illegal', r[STATE]}
  end
  set_state(id, r, state)
  if ENDED[state] then set_expires(id, r, tonumber(now) + tonumber(retain)) end
end
if has_metadata then
  r[METADATA] = ARGV[9]
  redis.call('HSET', key_of(id), 'metadata', r[METADATA])
end
save(id, r, now)
return {'ok', reply(id, r)}
"""

# ARGV: prefix, id, scoped, user. Answers the removed record, or nil.
_DELETE = r"""
local id = ARGV[2]
local r = find(id, ARGV[3] == '1', ARGV[4])
if not r then return false end
remove(id, r)
return reply(id, r)
"""

# ARGV: prefix, scoped, user, state ('' for any), after ('' from the first), limit.
# Walks the smallest index that holds every match, in id order, up to one match past the
# page (proof that a next page exists); answers {next or nil, records}.
_LIST = r"""
local scoped, user, state, after = ARGV[2] == '1', ARGV[3], ARGV[4], ARGV[5]
local limit = tonumber(ARGV[6])
local source = IDS
if scoped and state ~= '' then
  local mine, theirs = of_user(user), of_state(state)
  source = redis.call('ZCARD', mine) <= redis.call('ZCARD', theirs) and mine or theirs
elseif scoped then
  source = of_user(user)
elseif state ~= '' then
  source = of_state(state)
end
local start = after == '' and '-' or '(' .. after
local records, more = {}, false
while not more do
  local chunk = math.min(1000, math.max(64, limit + 1 - #records))
  local ids = redis.call('ZRANGEBYLEX', source, start, '+', 'LIMIT', 0, chunk)
  for _, id in ipairs(ids) do
    local r = find(id, scoped, user)
    if r and (state == '' or r[STATE] == state) then
      if #records == limit then more = true; break end
      records[#records + 1] = reply(id, r)
    end
  end
  if #ids < chunk then break end
  start = '(' .. ids[#ids]
end
return {more and records[#records][1] or false, records}
"""

# ARGV: prefix, now, limit, retain. Takes due sessions one at a time in (expires, id) order:
# a live one becomes expired (due again at now + retain: with retain 0, purged in this same
# call if there is room), an ended one is removed; stops at the first one whose kind is full.
_REAP = r"""
local now, limit, retain = ARGV[2], tonumber(ARGV[3]), ARGV[4]
local expired, purged = {}, {}
while true do
  local id = redis.call('ZRANGEBYSCORE', DUE, '-inf', now, 'LIMIT', 0, 1)[1]
  if not id then break end
  local r = find(id, false, '')
  if not r then
    redis.call('ZREM', DUE, id)
  elseif ENDED[r[STATE]] then
    if #purged == limit then break end
    remove(id, r)
    purged[#purged + 1] = reply(id, r)
  else
    if #expired == limit then break end
    set_state(id, r, 'expired')
    set_expires(id, r, tonumber(now) + tonumber(retain))
    save(id, r, now)
    expired[#expired + 1] = reply(id, r)
  end
end
return {expired, purged}
"""

# ARGV: prefix, states... Answers the number of records in each.
_COUNTS = r"""
local out = {}
for i = 2, #ARGV do out[#out + 1] = redis.call('ZCARD', of_state(ARGV[i])) end
return out
"""

_PRESENCE_PRELUDE = r"""
local prefix = ARGV[1]
local DUE = prefix .. 'presence:due'
local function key_of(session) return prefix .. 'presence:of:' .. session end
-- The reaper's member names its entry's session and field: '<length>:<session><field>'.
local function member(session, field) return #session .. ':' .. session .. field end
"""

# ARGV: prefix, then (session, field, value, expires) per entry.
_ANNOUNCE = r"""
for i = 2, #ARGV, 4 do
  local session, field = ARGV[i], ARGV[i + 1]
  redis.call('HSET', key_of(session), field, ARGV[i + 2])
  redis.call('ZADD', DUE, ARGV[i + 3], member(session, field))
end
return {}
"""

# ARGV: prefix, then (session, field) per entry.
_WITHDRAW = r"""
for i = 2, #ARGV, 2 do
  local session, field = ARGV[i], ARGV[i + 1]
  redis.call('HDEL', key_of(session), field)
  redis.call('ZREM', DUE, member(session, field))
end
return {}
"""

# ARGV: prefix, now, limit. Answers {session, field, value} per entry removed.
_PRESENCE_REAP = r"""
local out = {}
for _, m in ipairs(redis.call('ZRANGEBYSCORE', DUE, '-inf', ARGV[2], 'LIMIT', 0, ARGV[3])) do
  local colon = string.find(m, ':', 1, true)
  local length = tonumber(string.sub(m, 1, colon - 1))
  local session = string.sub(m, colon + 1, colon + length)
  local field = string.sub(m, colon + length + 1)
  local value = redis.call('HGET', key_of(session), field)
  redis.call('HDEL', key_of(session), field)
  redis.call('ZREM', DUE, m)
  if value then out[#out + 1] = {session, field, value} end
end
return out
"""



def _script(prelude: str, body: str) -> str:
    """A script whose answer is packed with msgpack: one bulk string for a whole batch, which
    redis-py hands over as is and Python unpacks in C (a nested RESP answer costs redis-py
    about 3 us per element to parse: 9 elements a record). Lua's false packs as false."""
    return f"{prelude}\nlocal function run()\n{body}\nend\nreturn cmsgpack.pack(run())\n"


REGISTRY_SCRIPTS: dict[ScriptName, str] = {
    "session_create": _script(_SESSION_PRELUDE, _CREATE),
    "session_get": _script(_SESSION_PRELUDE, _GET),
    "session_touch": _script(_SESSION_PRELUDE, _TOUCH),
    "session_change": _script(_SESSION_PRELUDE, _CHANGE),
    "session_delete": _script(_SESSION_PRELUDE, _DELETE),
    "session_list": _script(_SESSION_PRELUDE, _LIST),
    "session_reap": _script(_SESSION_PRELUDE, _REAP),
    "session_counts": _script(_SESSION_PRELUDE, _COUNTS),
    "presence_announce": _script(_PRESENCE_PRELUDE, _ANNOUNCE),
    "presence_withdraw": _script(_PRESENCE_PRELUDE, _WITHDRAW),
    "presence_reap": _script(_PRESENCE_PRELUDE, _PRESENCE_REAP),
}


def unpack_answer(reply: bytes) -> Any:
    """A script's answer: strings as bytes (metadata and names need not be UTF-8 to Lua)."""
    return msgpack.unpackb(reply, raw=True)


# --- Python's side of the convention -------------------------------------------------------


def seconds(value: float) -> str:
    """A time or a duration as the scripts take it: exact (`repr` of a float round-trips)."""
    return repr(float(value))


def scope(user: str | None) -> list[Arg]:
    """The (scoped, user) pair of arguments: None means any user."""
    return ["0", ""] if user is None else ["1", user]


def pack_metadata(metadata: Mapping[str, Any]) -> bytes:
    packed: bytes = msgpack.packb(dict(metadata), use_bin_type=True)
    return packed


def create_args(prefix: str, record: SessionRecord) -> list[Arg]:
    return [
        prefix,
        record.id,
        record.user,
        record.state.value,
        seconds(record.created),
        seconds(record.updated),
        seconds(record.expires),
        seconds(record.ttl),
        pack_metadata(record.metadata),
        record.version,
    ]


def change_args(
    prefix: str,
    session_id: str,
    user: str | None,
    now: float,
    *,
    state: SessionState | None,
    metadata: Mapping[str, Any] | None,
    expect_version: int | None,
    retain: float,
) -> list[Arg]:
    # The script checks the transition against the states `can_transition` allows it from,
    # so the rule has one home (mqbroker.sessions).
    sources = [] if state is None else [s.value for s in SessionState if can_transition(s, state)]
    return [
        prefix,
        session_id,
        *scope(user),
        seconds(now),
        "" if state is None else state.value,
        " ".join(sources),
        "0" if metadata is None else "1",
        b"" if metadata is None else pack_metadata(metadata),
        "" if expect_version is None else str(expect_version),
        seconds(retain),
    ]


def decode_record(reply: Sequence[bytes]) -> SessionRecord:
    """A record as the scripts answer it: its id, then its FIELDS."""
    session_id, user, state, created, updated, expires, ttl, metadata, version = reply
    return SessionRecord(
        id=session_id.decode(),
        user=user.decode(),
        state=SessionState(state.decode()),
        created=float(created),
        updated=float(updated),
        expires=float(expires),
        ttl=float(ttl),
        metadata=msgpack.unpackb(metadata, raw=False),
        version=int(version),
    )


def decode_optional(reply: Sequence[bytes] | Literal[False]) -> SessionRecord | None:
    """A record, or None where the script answered false (absent, or not this user's)."""
    return None if reply is False else decode_record(reply)


# A presence entry: its hash field is msgpack [instance, connection], its value msgpack
# [client, principal, expires]; Lua moves both as opaque strings.


def presence_field(instance: str, connection: str) -> bytes:
    packed: bytes = msgpack.packb([instance, connection], use_bin_type=True)
    return packed


def announce_args(entries: Sequence[PresenceEntry]) -> list[Arg]:
    """The arguments after the prefix: (session, field, value, expires) per entry."""
    args: list[Arg] = []
    for entry in entries:
        value = msgpack.packb([entry.client, entry.principal, entry.expires], use_bin_type=True)
        field = presence_field(entry.instance, entry.connection)
        args += [entry.session, field, value, seconds(entry.expires)]
    return args


def withdraw_args(keys: Sequence[PresenceKey]) -> list[Arg]:
    """The arguments after the prefix: (session, field) per entry."""
    args: list[Arg] = []
    for session, instance, connection in keys:
        args += [session, presence_field(instance, connection)]
    return args


def decode_presence(session: str, field: bytes, value: bytes) -> PresenceEntry:
    instance, connection = msgpack.unpackb(field, raw=False)
    client, principal, expires = msgpack.unpackb(value, raw=False)
    return PresenceEntry(
        session=session,
        instance=instance,
        connection=connection,
        client=client,
        principal=principal,
        expires=expires,
    )
