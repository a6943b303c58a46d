"""Presence, pure: which application sessions the connections of this instance are present in,
and what the presence store has to be told about it.

A connection is *present* in application session S while it holds at least one subscription
whose filter spells `{topic_prefix}/S/...` literally: the prefix's levels and S itself, not
`+` or `#`, then at least one more level (of any kind: `{topic_prefix}/S/#` counts). A wildcard
in place of the id (`{topic_prefix}/+/message`) makes it present nowhere: it names no session.
Nor does a filter on one of the broker's own event topics of S (`{topic_prefix}/S/presence`,
`{topic_prefix}/S/lifecycle`): watching who comes and goes is not taking part (a dashboard
watching a thousand sessions is present in none).

`PresenceTracker` counts, per connection, its subscriptions per session, so that the last
unsubscribe leaves. What changed is kept as a set of dirty keys, not a queue: a connection
that subscribes and unsubscribes a thousand times between two writes costs one key, and the
writer (mqbroker.server.presence) computes the difference with what it announced. Pure: no I/O,
no clock.
"""

from __future__ import annotations

import enum
import itertools
from collections.abc import Collection
from typing import Any

from attrs import define, field, frozen

from mqbroker.registry import LIFECYCLE, PRESENCE
from mqbroker.sessions import PresenceEntry, check_session_id

__all__ = [
    "BROKER_LEVELS",
    "Change",
    "Holder",
    "LeaveReason",
    "PresenceTracker",
    "entry_map",
    "event_payload",
    "session_of",
]

#: The levels under `{topic_prefix}/{id}` the broker publishes its own events on.
BROKER_LEVELS = frozenset({LIFECYCLE, PRESENCE})


def session_of(filter: str, prefix: str) -> str | None:
    """The application session a subscription with `filter` makes its connection present in,
    or None (see the module's docstring)."""
    if not filter.startswith(prefix) or filter[len(prefix):len(prefix) + 1] != "/":
        return None
    session, separator, rest = filter[len(prefix) + 1:].partition("/")
    if not separator or rest in BROKER_LEVELS:
        return None
    try:
        check_session_id(session)  # no wildcard, no empty level, nothing a store cannot key
    except ValueError:
        return None
    return session


def entry_map(entry: PresenceEntry) -> dict[str, Any]:
    """One entry of the `present` reply (docs/protocol.md, `present`)."""
    return {"instance": entry.instance, "connection": entry.connection, "client": entry.client,
            "principal": entry.principal, "expires": entry.expires}


def event_payload(event: str, session: str, instance: str, holder: Holder,
                  reason: str | None = None) -> dict[str, Any]:
    """The payload of a join or leave event (docs/sessions.md, "Presence")."""
    payload: dict[str, Any] = {
        "event": event, "session": session, "instance": instance,
        "connection": holder.connection, "client": holder.client, "principal": holder.principal}
    if reason is not None:
        payload["reason"] = reason
    return payload


@frozen(kw_only=True)
class Holder:
    """A connection of this instance, as its presence entries describe it."""

    connection: str
    #: The hello's `client`.
    client: str = ""
    #: Who it authenticated as; None in anonymous mode.
    principal: str | None = None


class LeaveReason(enum.StrEnum):
    """Why a connection left a session (the `reason` of a leave event)."""

    UNSUBSCRIBED = "unsubscribed"
    CLOSED = "closed"
    #: The application session ended (deleted, expired, invalidated): the broker ended the
    #: subscriptions inside its topics.
    ENDED = "ended"
    #: Its entry ran out (its instance stopped announcing it: dead, or cut off from the store).
    EXPIRED = "expired"


@frozen
class Change:
    """One thing to tell the store: `holder` joined `session`, or left it for `reason`."""

    session: str
    holder: Holder
    #: None for a join.
    reason: LeaveReason | None = None
    #: The instance whose entry it is, when not this one (an expired entry another left).
    instance: str | None = None
    #: A withdrawal of an entry whose join was never told: no event (see `restore`).
    silent: bool = False

    @property
    def joined(self) -> bool:
        return self.reason is None

    @property
    def key(self) -> tuple[str, str]:
        return (self.session, self.holder.connection)


@define
class PresenceTracker:
    """The presence of one instance's connections, and what its store does not know yet."""

    prefix: str
    _holders: dict[str, Holder] = field(factory=dict)
    #: connection -> session -> how many of its subscriptions make it present there; a
    #: connection present in one session by one subscription maps to that session's id alone
    #: (no dict: the common idle connection).
    _counts: dict[str, str | dict[str, int]] = field(factory=dict)
    #: (session, connection) keys changed since they were last written, each with the reason it
    #: would leave for (used only if it is absent when written).
    _dirty: dict[tuple[str, str], LeaveReason] = field(factory=dict)
    #: What this instance has announced and not withdrawn: what the store holds of it.
    _announced: dict[tuple[str, str], Holder] = field(factory=dict)
    #: Joins whose write failed but may have been carried out all the same (see `restore`).
    _unsure: dict[tuple[str, str], Holder] = field(factory=dict)

    # --- what the connections do (never blocks, never grows with churn) ---------------------

    def subscribed(self, holder: Holder, filter: str) -> bool:
        """A subscription was added; True when something is left to write."""
        session = session_of(filter, self.prefix)
        if session is None:
            return False
        connection = holder.connection
        counts = self._counts.get(connection)
        if counts is None:
            self._holders[connection] = holder
            self._counts[connection] = session
        else:
            if isinstance(counts, str):
                counts = self._counts[connection] = {counts: 1}
            counts[session] = counts.get(session, 0) + 1
            if counts[session] > 1:
                return False
        return self._mark((session, connection), LeaveReason.UNSUBSCRIBED)

    def unsubscribed(self, connection: str, filter: str,
                     reason: LeaveReason = LeaveReason.UNSUBSCRIBED) -> bool:
        """A subscription was removed; True when something is left to write."""
        session = session_of(filter, self.prefix)
        if session is None or session not in self._sessions(connection):
            return False
        counts = self._counts[connection]
        if isinstance(counts, dict):
            counts[session] -= 1
            if counts[session] > 0:
                return False
            del counts[session]
            if len(counts) == 1 and 1 in counts.values():  # back to the lean form
                self._counts[connection] = next(iter(counts))
        else:
            del self._counts[connection]
            del self._holders[connection]
        return self._mark((session, connection), reason)

    def closed(self, connection: str) -> bool:
        """The connection closed; True when something is left to write."""
        sessions = self._sessions(connection)
        self._counts.pop(connection, None)
        self._holders.pop(connection, None)
        marked = False
        for session in sessions:
            marked = self._mark((session, connection), LeaveReason.CLOSED) or marked
        return marked

    def _sessions(self, connection: str) -> Collection[str]:
        """The sessions `connection` is present in."""
        counts = self._counts.get(connection, ())
        return (counts,) if isinstance(counts, str) else counts

    def _mark(self, key: tuple[str, str], reason: LeaveReason) -> bool:
        self._dirty[key] = reason
        return True

    # --- what the writer does ---------------------------------------------------------------

    def take(self, limit: int) -> list[Change]:
        """At most `limit` dirty keys turned into changes (a key whose state ends as the store
        has it gives none), counted as announced or withdrawn from now on."""
        changes: list[Change] = []
        for key in list(itertools.islice(self._dirty, limit)):
            reason = self._dirty.pop(key)
            session, connection = key
            present = session in self._sessions(connection)
            if present and key not in self._announced:
                self._unsure.pop(key, None)
                holder = self._holders[connection]
                self._announced[key] = holder
                changes.append(Change(session, holder))
            elif not present and key in self._announced:
                changes.append(Change(session, self._announced.pop(key), reason))
            elif not present and key in self._unsure:
                changes.append(Change(session, self._unsure.pop(key), reason, silent=True))
        return changes

    def restore(self, changes: list[Change], *, maybe_written: bool = False) -> None:
        """The store did not take `changes`: undo them here, so that the next `take` gives them
        again (or what they have become meanwhile). With `maybe_written` (no answer came: a
        call past its deadline may still be carried out), a join that is no longer present
        when next taken is withdrawn all the same, silently: no leave is told for it."""
        for change in changes:
            if change.joined or change.silent:
                self._announced.pop(change.key, None)
                if maybe_written or change.silent:
                    self._unsure[change.key] = change.holder
                self._dirty.setdefault(change.key, LeaveReason.UNSUBSCRIBED)
            else:
                assert change.reason is not None
                self._announced[change.key] = change.holder
                self._dirty.setdefault(change.key, change.reason)

    def lost(self, session: str, connection: str) -> bool:
        """The store let one of this instance's entries run out (it was not announced again in
        time): forget it was announced, so that it is announced again (a join) if present."""
        key = (session, connection)
        if self._announced.pop(key, None) is None:
            return False
        return self._mark(key, LeaveReason.UNSUBSCRIBED)

    def announces(self, session: str, connection: str) -> bool:
        """Whether this instance has announced the entry and not withdrawn it."""
        return (session, connection) in self._announced

    def announced(self) -> list[tuple[str, Holder]]:
        """(session, holder) of every entry this instance announced: what it re-announces."""
        return [(session, holder) for (session, _), holder in self._announced.items()]

    @property
    def pending(self) -> int:
        """Keys changed and not yet written."""
        return len(self._dirty)

    @property
    def present(self) -> int:
        """Entries this instance has announced (a gauge in /metrics)."""
        return len(self._announced)

    def sessions_of(self, connection: str) -> list[str]:
        """The sessions a connection is present in (announced or not yet)."""
        return sorted(self._sessions(connection))
