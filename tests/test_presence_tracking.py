"""Presence tracking, pure (mqbroker.presence): which filters make a connection present in which
session, counted per connection, and how changes coalesce before they reach the store."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mqbroker.presence import Change, Holder, LeaveReason, PresenceTracker, session_of

PREFIX = "mcp/session"
ALICE = Holder(connection="c1", client="app/1.0", principal="alice")
BOB = Holder(connection="c2", client="", principal=None)


@pytest.mark.parametrize(("filter", "session"), [
    ("mcp/session/S/message", "S"),
    ("mcp/session/S/#", "S"),
    ("mcp/session/S/+", "S"),
    ("mcp/session/S/a/b/c", "S"),
    ("mcp/session/S/", "S"),  # one empty level after the id is still one of its topics
    ("mcp/session/a.b_c~d-9/message", "a.b_c~d-9"),
    ("mcp/session/+/message", None),  # a wildcard id names no session
    ("mcp/session/#", None),
    ("mcp/+/S/message", None),  # the prefix spelled with a wildcard
    ("+/session/S/message", None),
    ("#", None),
    ("mcp/session/S", None),  # the id alone is not one of the session's topics
    ("mcp/session/S/presence", None),  # watching presence is not taking part
    ("mcp/session/S/lifecycle", None),
    ("mcp/sessions/S/message", None),
    ("mcp/session", None),
    ("mcp/session//message", None),  # an empty id
    ("mcp/session/S!/message", None),  # not a session id
    ("mcp/session/" + "x" * 129 + "/message", None),
    ("other/S/message", None),
])
def test_which_filters_make_a_connection_present(filter: str, session: str | None) -> None:
    assert session_of(filter, PREFIX) == session


def test_another_prefix() -> None:
    assert session_of("app/s/S/m", "app/s") == "S"
    assert session_of("mcp/session/S/m", "app/s") is None


def test_a_join_is_one_change_and_the_last_unsubscribe_leaves() -> None:
    """Two subscriptions to one session: one join; the first unsubscribe changes nothing, the
    second leaves with reason unsubscribed."""
    tracker = PresenceTracker(PREFIX)
    assert tracker.subscribed(ALICE, "mcp/session/S/message")
    assert not tracker.subscribed(ALICE, "mcp/session/S/#")
    assert tracker.take(100) == [Change("S", ALICE)]
    assert tracker.present == 1
    assert not tracker.unsubscribed("c1", "mcp/session/S/message")
    assert tracker.take(100) == []
    assert tracker.unsubscribed("c1", "mcp/session/S/#")
    assert tracker.take(100) == [Change("S", ALICE, LeaveReason.UNSUBSCRIBED)]
    assert tracker.present == 0


def test_a_close_leaves_every_session_with_reason_closed() -> None:
    tracker = PresenceTracker(PREFIX)
    for session in ("A", "B", "C"):
        tracker.subscribed(ALICE, f"mcp/session/{session}/message")
    tracker.subscribed(BOB, "mcp/session/A/message")
    assert len(tracker.take(100)) == 4
    assert tracker.closed("c1")
    leaves = tracker.take(100)
    assert sorted(leaves, key=lambda c: c.session) == [
        Change(s, ALICE, LeaveReason.CLOSED) for s in ("A", "B", "C")]
    assert tracker.announced() == [("A", BOB)]
    assert not tracker.closed("c1")  # closed twice: nothing more


def test_filters_that_name_no_session_change_nothing() -> None:
    tracker = PresenceTracker(PREFIX)
    assert not tracker.subscribed(ALICE, "mcp/session/+/message")
    assert not tracker.subscribed(ALICE, "mcp/session/S/presence")
    assert not tracker.unsubscribed("c1", "mcp/session/+/message")
    assert not tracker.unsubscribed("c1", "mcp/session/S/message")  # never subscribed
    assert not tracker.closed("c1")
    assert tracker.pending == 0 and tracker.take(100) == []


def test_churn_coalesces_into_one_key() -> None:
    """A thousand subscribe/unsubscribe pairs between two writes leave one dirty key, and no
    change at all when the connection ends as the store already has it."""
    tracker = PresenceTracker(PREFIX)
    for _ in range(1000):
        tracker.subscribed(ALICE, "mcp/session/S/message")
        tracker.unsubscribed("c1", "mcp/session/S/message")
    assert tracker.pending == 1
    assert tracker.take(100) == []  # never announced, absent now: nothing to say
    tracker.subscribed(ALICE, "mcp/session/S/message")
    assert tracker.take(100) == [Change("S", ALICE)]
    for _ in range(1000):
        tracker.unsubscribed("c1", "mcp/session/S/message")
        tracker.subscribed(ALICE, "mcp/session/S/message")
    assert tracker.pending == 1
    assert tracker.take(100) == []  # announced, present now: nothing to say


def test_take_is_bounded_and_keeps_the_rest_for_later() -> None:
    tracker = PresenceTracker(PREFIX)
    for n in range(250):
        tracker.subscribed(ALICE, f"mcp/session/s{n}/message")
    sizes = [len(tracker.take(100)) for _ in range(4)]
    assert sizes == [100, 100, 50, 0]
    assert tracker.present == 250


def test_restore_gives_the_changes_again() -> None:
    """A write the store refused is undone: the next take gives the same changes again, or what
    they have become meanwhile."""
    tracker = PresenceTracker(PREFIX)
    tracker.subscribed(ALICE, "mcp/session/S/message")
    tracker.subscribed(ALICE, "mcp/session/T/message")
    joins = tracker.take(100)
    tracker.restore(joins)
    assert tracker.present == 0
    assert sorted(tracker.take(100), key=lambda c: c.session) == joins
    tracker.unsubscribed("c1", "mcp/session/S/message")
    leaves = tracker.take(100)
    assert leaves == [Change("S", ALICE, LeaveReason.UNSUBSCRIBED)]
    tracker.restore(leaves)
    assert tracker.present == 2
    assert tracker.take(100) == leaves
    # Refused, then the connection came back to S meanwhile: nothing left to say about S.
    tracker.subscribed(ALICE, "mcp/session/S/message")
    joins = tracker.take(100)
    tracker.unsubscribed("c1", "mcp/session/S/message")
    tracker.restore(joins)
    assert tracker.take(100) == []


def test_a_join_without_an_answer_that_leaves_is_withdrawn_silently() -> None:
    """A join whose write got no answer may be in the store all the same (a call past its
    deadline still runs): if its connection leaves before it is written again, the entry is
    withdrawn, with no leave told (no join was); if it stays, the join is written again."""
    tracker = PresenceTracker(PREFIX)
    tracker.subscribed(ALICE, "mcp/session/S/message")
    tracker.subscribed(ALICE, "mcp/session/T/message")
    tracker.restore(tracker.take(100), maybe_written=True)
    tracker.unsubscribed("c1", "mcp/session/S/message")
    assert sorted(tracker.take(100), key=lambda c: c.session) == [
        Change("S", ALICE, LeaveReason.UNSUBSCRIBED, silent=True), Change("T", ALICE)]
    assert tracker.present == 1
    assert tracker.take(100) == []


def test_a_lost_entry_is_announced_again_if_still_present() -> None:
    tracker = PresenceTracker(PREFIX)
    tracker.subscribed(ALICE, "mcp/session/S/message")
    tracker.take(100)
    assert tracker.lost("S", "c1")
    assert tracker.take(100) == [Change("S", ALICE)]
    assert not tracker.lost("S", "elsewhere")
    tracker.unsubscribed("c1", "mcp/session/S/message")
    tracker.take(100)
    assert not tracker.lost("S", "c1")  # withdrawn already: not ours to announce


_sessions = st.sampled_from(["A", "B", "C"])
_connections = st.sampled_from(["c1", "c2"])
_filters = st.sampled_from(["message", "#", "x/y", "presence"])
_ops = st.one_of(
    st.tuples(st.just("sub"), _connections, _sessions, _filters),
    st.tuples(st.just("unsub"), _connections, _sessions, _filters),
    st.tuples(st.just("close"), _connections),
    st.tuples(st.just("take"), st.integers(1, 3)),
    st.tuples(st.just("fail"), st.integers(1, 3)),
)


@settings(max_examples=300, deadline=None)
@given(st.lists(_ops, max_size=60))
def test_what_is_announced_follows_a_model(ops: list[tuple[object, ...]]) -> None:
    """Against a model of per-connection subscriptions: whatever the order of subscribes,
    unsubscribes, closes, partial writes and refused writes, once everything is written the
    announced entries are exactly the (session, connection) pairs with a live subscription to
    a non-broker topic, and per key the changes alternate join, leave, join..."""
    tracker = PresenceTracker(PREFIX)
    subs: dict[str, list[str]] = {"c1": [], "c2": []}
    last: dict[tuple[str, str], bool] = {}

    def record(changes: list[Change]) -> None:
        for change in changes:
            assert last.get(change.key, False) != change.joined, change
            last[change.key] = change.joined

    for op in ops:
        if op[0] == "sub":
            _, connection, session, level = op
            tracker.subscribed(Holder(connection=str(connection)),
                               f"mcp/session/{session}/{level}")
            subs[str(connection)].append(f"mcp/session/{session}/{level}")
        elif op[0] == "unsub":
            _, connection, session, level = op
            filter = f"mcp/session/{session}/{level}"
            if filter in subs[str(connection)]:
                subs[str(connection)].remove(filter)
                tracker.unsubscribed(str(connection), filter)
        elif op[0] == "close":
            tracker.closed(str(op[1]))
            subs[str(op[1])] = []
        elif op[0] == "take":
            record(tracker.take(int(str(op[1]))))
        else:
            tracker.restore(tracker.take(int(str(op[1]))))
    record(tracker.take(10_000))
    expected = {(f.split("/")[2], c) for c, filters in subs.items() for f in filters
                if not f.endswith("/presence")}
    assert {(s, h.connection) for s, h in tracker.announced()} == expected
    for connection, filters in subs.items():
        assert tracker.sessions_of(connection) == sorted(
            {f.split("/")[2] for f in filters if not f.endswith("/presence")})
    assert {k for k, joined in last.items() if joined} == expected
