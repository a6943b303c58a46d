"""The registry's pure rules (mqbroker.registry): session topics, the subscriptions inside each
session's topics (against a brute-force model), and who a request is scoped to."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mqbroker.protocol import SessionCreate, SessionGet, SessionList
from mqbroker.registry import (
    BadRequest,
    Caller,
    Forbidden,
    ScopedSubscriptions,
    SessionsRight,
    SessionTopics,
    scope,
)
from mqbroker.topics import matches

TOPICS = SessionTopics("mcp/session")


@pytest.mark.parametrize(("topic", "reserved"), [
    ("mcp/session/a/lifecycle", True), ("mcp/session/a/presence", True),
    ("mcp/session/a/message", False), ("mcp/session/a/lifecycle/x", False),
    ("mcp/session/lifecycle", False), ("mcp/sessions/a/lifecycle", False),
    ("x/mcp/session/a/lifecycle", False), ("mcp/session//lifecycle", True),
])
def test_reserved_topics_are_the_lifecycle_and_presence_of_one_session(
        topic: str, reserved: bool) -> None:
    assert TOPICS.reserved(topic) is reserved


@pytest.mark.parametrize(("filter", "session"), [
    ("mcp/session/a", "a"), ("mcp/session/a/#", "a"), ("mcp/session/a/+/x", "a"),
    ("mcp/session/+/lifecycle", None), ("mcp/session/#", None), ("mcp/session", None),
    ("mcp/other/a/#", None), ("#", None), ("mcp/session/a.b~c", "a.b~c"),
])
def test_a_filter_lies_inside_a_session_when_its_id_level_is_literal(
        filter: str, session: str | None) -> None:
    assert TOPICS.session_of_filter(filter) == session


def test_the_lifecycle_filter_matches_exactly_the_lifecycle_topics() -> None:
    assert TOPICS.every_lifecycle == "mcp/session/+/lifecycle"
    assert matches(TOPICS.every_lifecycle, TOPICS.lifecycle("abc"))
    assert TOPICS.session_of_lifecycle(TOPICS.lifecycle("abc")) == "abc"
    assert TOPICS.session_of_lifecycle("mcp/session/abc/x/lifecycle") is None
    assert TOPICS.session_of_lifecycle("mcp/session/abc/message") is None


_keys = st.sampled_from(["c1", "c2", "c3"])
_filters = st.sampled_from(["mcp/session/a/#", "mcp/session/b/x", "mcp/session/a",
                            "mcp/session/+/x", "other/a"])
_steps = st.lists(st.one_of(
    st.tuples(st.just("add"), _keys, st.integers(0, 4), _filters),
    st.tuples(st.just("remove"), _keys, st.integers(0, 4)),
    st.tuples(st.just("pop"), st.sampled_from(["a", "b"])),
), max_size=40)


@given(_steps)
def test_scoped_subscriptions_agree_with_a_brute_force_model(steps: list[Any]) -> None:
    """After any sequence of adds (a subscription id used once per key, as the broker does),
    removes and pops, `pop(id)` answers exactly the subscriptions whose filter lies inside
    that session's topics, and nothing else is ever answered."""
    scoped: ScopedSubscriptions[str] = ScopedSubscriptions(TOPICS)
    model: dict[tuple[str, int], str] = {}
    for step in steps:
        if step[0] == "add":
            _, key, sub, filter = step
            if (key, sub) in model:
                continue
            model[(key, sub)] = filter
            scoped.add(key, sub, filter)
        elif step[0] == "remove":
            _, key, sub = step
            model.pop((key, sub), None)
            scoped.remove(key, sub)
        else:
            session = step[1]
            inside = {k: s for k, s in model.items() if TOPICS.session_of_filter(s) == session}
            expected: dict[str, list[int]] = {}
            for key, sub in sorted(inside):
                expected.setdefault(key, []).append(sub)
                del model[(key, sub)]
            assert {k: list(v) for k, v in scoped.pop(session).items()} == expected
    assert len(scoped) == sum(TOPICS.session_of_filter(f) is not None for f in model.values())


ANONYMOUS = Caller(principal=None)
OWN = Caller(principal="alice", right=SessionsRight.OWN)
ANY = Caller(principal="ops", right=SessionsRight.ANY)
NONE = Caller(principal="eve", right=SessionsRight.NONE)


@pytest.mark.parametrize(("caller", "request_", "expected"), [
    (ANONYMOUS, SessionGet(id=1, sessions=("s",), user="u"), "u"),
    (ANONYMOUS, SessionGet(id=1, sessions=("s",)), BadRequest),
    (ANONYMOUS, SessionList(id=1), None),
    (ANONYMOUS, SessionList(id=1, user="*"), None),
    (ANONYMOUS, SessionCreate(id=1, user="*"), BadRequest),
    (OWN, SessionGet(id=1, sessions=("s",)), "alice"),
    (OWN, SessionGet(id=1, sessions=("s",), user="alice"), "alice"),
    (OWN, SessionGet(id=1, sessions=("s",), user="bob"), Forbidden),
    (OWN, SessionList(id=1), "alice"),
    (OWN, SessionList(id=1, user="*"), Forbidden),
    (ANY, SessionGet(id=1, sessions=("s",), user="bob"), "bob"),
    (ANY, SessionList(id=1, user="*"), None),
    (ANY, SessionList(id=1), "ops"),
    (NONE, SessionList(id=1), Forbidden),
    (NONE, SessionCreate(id=1, user="eve"), Forbidden),
    (OWN, SessionCreate(id=1, user=""), BadRequest),
    (OWN, SessionCreate(id=1, user="x" * 257), BadRequest),
])
def test_scope_decides_whose_sessions_a_request_reaches(
        caller: Caller, request_: Any, expected: Any) -> None:
    if isinstance(expected, type):
        with pytest.raises(expected):
            scope(caller, request_)
    else:
        assert scope(caller, request_) == expected
