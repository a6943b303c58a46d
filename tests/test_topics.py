"""Topic and filter rules (MQTT 3.1.1 section 4.7): Mosquitto's conformance vectors, our limits."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mqbroker.index import SubscriptionIndex
from mqbroker.topics import (
    FilterSet,
    InvalidTopic,
    TopicLimits,
    TopicTree,
    is_wildcard,
    matches,
    validate_filter,
    validate_topic,
)
from tests.test_index import filters as index_filters
from tests.test_index import topics as index_topics

#: Facts from Mosquitto's own tests, kept in the repository (tests/conformance/README.md).
VECTORS_PATH = Path(__file__).resolve().parent / "conformance" / "topic-vectors.json"


def _load_vectors() -> dict[str, Any]:
    vectors: dict[str, Any] = json.loads(VECTORS_PATH.read_text(encoding="utf-8"))
    return vectors


VECTORS = _load_vectors()


def _pairs(key: str) -> list[Any]:
    return [pytest.param(f, t, id=f"{f!r} ~ {t!r}") for f, t in VECTORS[key]]


def _texts(key: str) -> list[Any]:
    return [pytest.param(text, id=repr(text)) for text in VECTORS[key]]


def _indexed(filter: str) -> SubscriptionIndex[str]:
    index: SubscriptionIndex[str] = SubscriptionIndex()
    index.add("session", 7, filter)
    return index


def test_vectors_are_not_empty() -> None:
    """Every vector family is present and non-empty, so the parametrised tests test something."""
    families = ("match", "no_match", "valid_filters", "invalid_filters")
    for key in (*families, "valid_topics", "invalid_topics"):
        assert VECTORS[key], key


@pytest.mark.parametrize(("filter", "topic"), _pairs("match"))
def test_vector_matches(filter: str, topic: str) -> None:
    """A `match` vector: filter and topic are valid and the reference matcher agrees."""
    validate_filter(filter)
    validate_topic(topic)
    assert matches(filter, topic)


@pytest.mark.parametrize(("filter", "topic"), _pairs("match"))
def test_vector_matches_through_index(filter: str, topic: str) -> None:
    """A `match` vector: the subscription index routes the topic to the filter's subscription."""
    assert list(_indexed(filter).match(topic)) == [("session", (7,))]


@pytest.mark.parametrize(("filter", "topic"), _pairs("no_match"))
def test_vector_does_not_match(filter: str, topic: str) -> None:
    """A `no_match` vector: the reference matcher says no."""
    validate_filter(filter)
    validate_topic(topic)
    assert not matches(filter, topic)


@pytest.mark.parametrize(("filter", "topic"), _pairs("no_match"))
def test_vector_does_not_match_through_index(filter: str, topic: str) -> None:
    """A `no_match` vector: the subscription index routes the topic nowhere."""
    assert list(_indexed(filter).match(topic)) == []


def test_all_vectors_in_one_index() -> None:
    """With every vector filter subscribed at once, each topic reaches exactly the filters that
    match it: the trie and the exact dict do not leak into each other."""
    filters = sorted({f for f, _ in VECTORS["match"] + VECTORS["no_match"]})
    topics = sorted({t for _, t in VECTORS["match"] + VECTORS["no_match"]})
    index: SubscriptionIndex[str] = SubscriptionIndex()
    for sub_id, filter in enumerate(filters):
        index.add("session", sub_id, filter)
    for topic in topics:
        expected = tuple(i for i, f in enumerate(filters) if matches(f, topic))
        assert list(index.match(topic)) == ([("session", expected)] if expected else []), topic


@pytest.mark.parametrize("filter", _texts("valid_filters"))
def test_vector_valid_filter(filter: str) -> None:
    """A `valid_filters` vector is accepted at subscribe."""
    validate_filter(filter)


@pytest.mark.parametrize("filter", _texts("invalid_filters"))
def test_vector_invalid_filter(filter: str) -> None:
    """An `invalid_filters` vector is refused at subscribe, with a message naming the problem."""
    with pytest.raises(InvalidTopic, match="filter"):
        validate_filter(filter)


@pytest.mark.parametrize("topic", _texts("valid_topics"))
def test_vector_valid_topic(topic: str) -> None:
    """A `valid_topics` vector is accepted at publish."""
    validate_topic(topic)


@pytest.mark.parametrize("topic", _texts("invalid_topics"))
def test_vector_invalid_topic(topic: str) -> None:
    """An `invalid_topics` vector is refused at publish, with a message naming the problem."""
    with pytest.raises(InvalidTopic, match="topic"):
        validate_topic(topic)


# Limits -------------------------------------------------------------------------------------------

LIMITS = TopicLimits(max_length=10, max_levels=3)


@pytest.mark.parametrize("validate", [validate_topic, validate_filter])
def test_length_limit_is_in_utf8_bytes(validate: Any) -> None:
    """The length limit counts UTF-8 bytes: 10 ASCII characters pass, 5 two-byte ones pass,
    6 two-byte ones (12 bytes in 6 characters) are refused."""
    validate("a" * 10, LIMITS)
    validate("é" * 5, LIMITS)
    with pytest.raises(InvalidTopic, match="12 bytes"):
        validate("é" * 6, LIMITS)
    with pytest.raises(InvalidTopic, match="11 bytes"):
        validate("a" * 11, LIMITS)


@pytest.mark.parametrize("validate", [validate_topic, validate_filter])
def test_level_limit(validate: Any) -> None:
    """At most max_levels levels, empty levels counted: 'a/b/c' and '//' pass, 'a/b/c/d' and
    '///' are refused."""
    validate("a/b/c", LIMITS)
    validate("//", LIMITS)
    for text in ("a/b/c/d", "///"):
        with pytest.raises(InvalidTopic, match="4 levels"):
            validate(text, LIMITS)


def test_level_limit_counts_wildcard_levels() -> None:
    """A filter's '+' and '#' levels count towards the level limit."""
    validate_filter("a/+/#", LIMITS)
    with pytest.raises(InvalidTopic, match="levels"):
        validate_filter("a/+/b/#", LIMITS)


def test_default_limits() -> None:
    """Default limits: 1024 bytes and 32 levels, both inclusive."""
    validate_topic("a" * 1024)
    validate_topic("/".join(["a"] * 32))
    with pytest.raises(InvalidTopic):
        validate_topic("a" * 1025)
    with pytest.raises(InvalidTopic):
        validate_topic("/".join(["a"] * 33))


def test_long_text_is_shortened_in_the_message() -> None:
    """An over-long topic is quoted only in part, so an error never echoes megabytes back."""
    with pytest.raises(InvalidTopic) as caught:
        validate_topic("x" * 100_000)
    assert len(str(caught.value)) < 300
    assert "100000 bytes" in str(caught.value)


@pytest.mark.parametrize("validate", [validate_topic, validate_filter])
@pytest.mark.parametrize("text", ["\0", "a\0", "a/\0/b", "\0/#"])
def test_null_character_is_refused(validate: Any, text: str) -> None:
    """MQTT-4.7.3-2: U+0000 anywhere is refused, in topics and filters."""
    with pytest.raises(InvalidTopic, match="U\\+0000"):
        validate(text)


@pytest.mark.parametrize("validate", [validate_topic, validate_filter])
def test_empty_is_refused(validate: Any) -> None:
    """MQTT-4.7.3-1: the empty string is neither a topic nor a filter."""
    with pytest.raises(InvalidTopic, match="empty"):
        validate("")


@pytest.mark.parametrize("validate", [validate_topic, validate_filter])
def test_surrogates_are_refused(validate: Any) -> None:
    """MQTT-1.5.3-1: a lone surrogate is not UTF-8 and is refused rather than crashing later."""
    with pytest.raises(InvalidTopic, match="UTF-8"):
        validate("a/\ud800")


def test_error_messages_name_the_filter_and_the_rule() -> None:
    """The message of InvalidTopic says which filter and what is wrong with it."""
    with pytest.raises(InvalidTopic) as caught:
        validate_filter("a/#/b")
    assert "'a/#/b'" in str(caught.value)
    assert "last level" in str(caught.value)
    with pytest.raises(InvalidTopic) as caught:
        validate_filter("a/b+")
    assert "'a/b+'" in str(caught.value)
    assert "whole level" in str(caught.value)


def test_is_wildcard() -> None:
    """is_wildcard is true exactly for filters containing '+' or '#'."""
    assert is_wildcard("+") and is_wildcard("a/#") and is_wildcard("a/+/b")
    assert not is_wildcard("a/b") and not is_wildcard("$SYS/x") and not is_wildcard("/")


# The `$` rule ------------------------------------------------------------------------------------

DOLLAR_CASES = [
    ("#", "$SYS", False),
    ("#", "$SYS/a", False),
    ("+", "$SYS", False),
    ("+/a", "$SYS/a", False),
    ("+/#", "$x/a", False),
    ("$SYS/#", "$SYS", True),
    ("$SYS/#", "$SYS/a/b", True),
    ("$SYS/+", "$SYS/a", True),
    ("$SYS", "$SYS", True),
    ("a/#", "a/$SYS", True),
    ("a/+", "a/$SYS", True),
    ("+/+", "a/$", True),
    ("#", "a$", True),
    ("+", "a$", True),
]


@pytest.mark.parametrize(("filter", "topic", "expected"), DOLLAR_CASES)
def test_dollar_topics(filter: str, topic: str, expected: bool) -> None:
    """MQTT-4.7.2-1: a filter whose first level is a wildcard never matches a topic starting with
    `$`; a `$` later in the topic, or a filter naming the `$` level, matches as usual. The
    reference matcher and the index agree."""
    assert matches(filter, topic) is expected
    assert bool(_indexed(filter).match(topic)) is expected


def test_dollar_topic_is_publishable() -> None:
    """A topic starting with `$` is a valid topic name; only wildcard filters skip it."""
    validate_topic("$SYS/broker/uptime")


# FilterSet ---------------------------------------------------------------------------------------


def test_filter_set_matches_any() -> None:
    """matches_any is true when an exact or a wildcard filter of the set matches the topic."""
    recorded = FilterSet(["mcp/session/+/message", "mcp/broadcast/#", "exact/topic"])
    assert recorded.matches_any("mcp/session/42/message")
    assert recorded.matches_any("mcp/broadcast")
    assert recorded.matches_any("mcp/broadcast/a/b")
    assert recorded.matches_any("exact/topic")
    assert not recorded.matches_any("mcp/session/42/other")
    assert not recorded.matches_any("exact/topic/below")
    assert not recorded.matches_any("$SYS/x")


def test_filter_set_answers_are_stable_when_cached() -> None:
    """A cached answer is the same as the first one, even once the cache has overflowed."""
    recorded = FilterSet(["a/+"], cache_size=2)
    topics = ["a/1", "b/1", "a/2", "a/1/x", "a/3"]
    first = [recorded.matches_any(t) for t in topics]
    again = [recorded.matches_any(t) for t in topics]
    assert first == again == [True, False, True, False, True]


def test_filter_set_cache_is_bounded() -> None:
    """The cache never holds more than cache_size topics."""
    recorded = FilterSet(["a/#"], cache_size=3)
    for n in range(10):
        recorded.matches_any(f"a/{n}")
    assert len(recorded._cache) == 3


def test_filter_set_is_a_value() -> None:
    """FilterSets compare by their filters only, and report their size and members."""
    one = FilterSet(("a/#", "b"))
    one.matches_any("a/x")
    assert one == FilterSet(["b", "a/#", "b"])
    assert len(one) == 2 and "a/#" in one and "a" not in one


def test_filter_set_refuses_invalid_filters() -> None:
    """A FilterSet refuses an invalid filter up front rather than never matching it."""
    with pytest.raises(InvalidTopic, match="'a#'"):
        FilterSet(["ok/+", "a#"])


def test_filter_set_refuses_one_string() -> None:
    """Passing one string (an iterable of characters) is a TypeError, not a set of letters."""
    with pytest.raises(TypeError):
        FilterSet("a/#")


def test_empty_filter_set_matches_nothing() -> None:
    """An empty FilterSet records no topic."""
    assert not FilterSet([]).matches_any("a")


# --- TopicTree: which topics of a set a filter matches -----------------------------------------


@given(st.lists(st.tuples(st.booleans(), index_topics()), max_size=30), index_filters())
def test_topic_tree_agrees_with_matches(changes: list[tuple[bool, str]], filter: str) -> None:
    """After any adds and discards, the tree holds the topics a plain set would, and
    `matching` gives exactly those `matches` accepts (the `$` rule included)."""
    tree, plain = TopicTree(), set()
    for add, topic in changes:
        if add:
            tree.add(topic)
            plain.add(topic)
        else:
            tree.discard(topic)
            plain.discard(topic)
    assert len(tree) == len(plain)
    assert sorted(tree.matching(filter)) == sorted(t for t in plain if matches(filter, t))
    for topic in plain:
        assert tree.matching(topic) == [topic]


def test_topic_tree_prunes_what_it_no_longer_holds() -> None:
    """Discarding every topic leaves an empty tree (no levels kept for topics gone)."""
    tree = TopicTree()
    for n in range(100):
        tree.add(f"mcp/session/s{n}/message")
        tree.add(f"mcp/session/s{n}")
    for n in range(100):
        tree.discard(f"mcp/session/s{n}/message")
        tree.discard(f"mcp/session/s{n}")
    tree.discard("never/added")
    assert len(tree) == 0 and not tree._root.below
