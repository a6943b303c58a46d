"""The subscription index: add/remove bookkeeping, one delivery per session, cache invalidation,
and agreement with the reference matcher `mqbroker.topics.matches` under random use."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from mqbroker.index import SubscriptionIndex
from mqbroker.topics import is_wildcard, matches, validate_filter, validate_topic


def as_dict(result: Sequence[tuple[object, tuple[int, ...]]]) -> dict[object, tuple[int, ...]]:
    """A match result as {session: ids}, checking that no session appears twice."""
    pairs = list(result)
    keys = [key for key, _ in pairs]
    assert len(keys) == len(set(keys)), f"a session appears more than once: {pairs}"
    return dict(pairs)


# add / remove / replace / remove_session ---------------------------------------------------------


def test_add_reports_the_first_subscription_of_a_filter() -> None:
    """add is True only when no subscription, of any session, had the filter before."""
    index: SubscriptionIndex[str] = SubscriptionIndex()
    assert index.add("s1", 1, "a/+") is True
    assert index.add("s1", 2, "a/+") is False
    assert index.add("s2", 1, "a/+") is False
    assert index.add("s2", 2, "a/b") is True
    assert len(index) == 4


def test_remove_reports_the_last_subscription_of_a_filter() -> None:
    """remove returns the filter and whether it was that filter's last subscription."""
    index: SubscriptionIndex[str] = SubscriptionIndex()
    index.add("s1", 1, "a/#")
    index.add("s2", 1, "a/#")
    assert index.remove("s1", 1) == ("a/#", False)
    assert index.remove("s2", 1) == ("a/#", True)
    assert len(index) == 0


def test_remove_unknown_returns_none() -> None:
    """Removing an unknown subscription, or one of an unknown session, returns None and changes
    nothing."""
    index: SubscriptionIndex[str] = SubscriptionIndex()
    index.add("s1", 1, "a")
    assert index.remove("s1", 2) is None
    assert index.remove("s2", 1) is None
    assert index.remove("s1", 1) == ("a", True)
    assert index.remove("s1", 1) is None
    assert len(index) == 0


def test_add_again_replaces_the_filter() -> None:
    """Adding an existing (key, sub_id) replaces its filter: the old one stops matching and the
    count of subscriptions stays the same."""
    index: SubscriptionIndex[str] = SubscriptionIndex()
    index.add("s1", 1, "old/+")
    assert index.add("s1", 1, "new/#") is True
    assert len(index) == 1
    assert index.filters_of("s1") == {1: "new/#"}
    assert as_dict(index.match("old/x")) == {}
    assert as_dict(index.match("new/x")) == {"s1": (1,)}
    assert index.remove("s1", 1) == ("new/#", True)


def test_replace_return_value_is_that_of_remove_then_add() -> None:
    """Re-adding a subscription with its own filter answers as remove+add would: True if it was
    the filter's only subscription, False if another subscription shares it."""
    index: SubscriptionIndex[str] = SubscriptionIndex()
    index.add("s1", 1, "a/+")
    assert index.add("s1", 1, "a/+") is True
    index.add("s2", 1, "a/+")
    assert index.add("s1", 1, "a/+") is False
    assert index.add("s1", 1, "b") is True
    assert index.remove("s2", 1) == ("a/+", True)


def test_remove_session_reports_filters_that_lost_their_last_subscription() -> None:
    """remove_session drops every subscription of the session and returns, once each, the filters
    no other subscription uses any more."""
    index: SubscriptionIndex[str] = SubscriptionIndex()
    index.add("s1", 1, "shared/+")
    index.add("s1", 2, "mine/#")
    index.add("s1", 3, "mine/#")
    index.add("s1", 4, "exact")
    index.add("s2", 1, "shared/+")
    assert sorted(index.remove_session("s1")) == ["exact", "mine/#"]
    assert len(index) == 1
    assert index.filters_of("s1") == {}
    assert as_dict(index.match("mine/x")) == {}
    assert as_dict(index.match("shared/x")) == {"s2": (1,)}
    assert index.remove_session("s1") == []
    assert index.remove_session("s2") == ["shared/+"]
    assert len(index) == 0


def test_filters_of_is_a_copy() -> None:
    """filters_of lists a session's subscriptions; changing what it returned changes nothing."""
    index: SubscriptionIndex[str] = SubscriptionIndex()
    index.add("s1", 2, "b")
    index.add("s1", 1, "a/+")
    found = index.filters_of("s1")
    assert found == {1: "a/+", 2: "b"}
    if isinstance(found, dict):
        found.clear()
    assert index.filters_of("s1") == {1: "a/+", 2: "b"}


def test_removing_everything_leaves_nothing_behind() -> None:
    """Once every subscription is gone, no trie node or table entry is left (churn cannot leak)."""
    index: SubscriptionIndex[str] = SubscriptionIndex()
    for n, filter in enumerate(["a/+/c", "a/+/d", "a/#", "a", "+", "#", "a/b/c"]):
        index.add(f"s{n % 2}", n, filter)
    index.remove("s0", 0)
    index.remove_session("s1")
    index.remove_session("s0")
    assert index._root.is_empty()
    assert not index._exact and not index._uses and not index._by_session


# match -------------------------------------------------------------------------------------------


def test_one_copy_per_session_with_all_matching_ids() -> None:
    """A session with several matching subscriptions appears once, with every matching id in
    ascending order; its subscriptions that do not match are left out."""
    index: SubscriptionIndex[str] = SubscriptionIndex()
    index.add("s1", 9, "a/b")
    index.add("s1", 3, "a/#")
    index.add("s1", 5, "+/b")
    index.add("s1", 1, "#")
    index.add("s1", 4, "c/#")
    index.add("s2", 2, "a/+")
    assert as_dict(index.match("a/b")) == {"s1": (1, 3, 5, 9), "s2": (2,)}


def test_session_keys_may_be_any_hashable_object() -> None:
    """Session keys are compared as the objects they are (the server passes session objects)."""
    first, second = object(), object()
    index: SubscriptionIndex[object] = SubscriptionIndex()
    index.add(first, 1, "t")
    index.add(second, 1, "t")
    assert as_dict(index.match("t")) == {first: (1,), second: (1,)}


def test_exact_and_wildcard_filters_of_one_topic_shape() -> None:
    """An exact filter and a wildcard one over the same levels both match, and an exact filter
    matches only its own spelling."""
    index: SubscriptionIndex[str] = SubscriptionIndex()
    index.add("s1", 1, "a/b")
    index.add("s2", 1, "a/+")
    assert as_dict(index.match("a/b")) == {"s1": (1,), "s2": (1,)}
    assert as_dict(index.match("a/c")) == {"s2": (1,)}
    assert as_dict(index.match("a/b/")) == {}


def test_hash_matches_its_parent_level_once() -> None:
    """'a/#' matches 'a' (its parent level) and 'a/b/c', and yields its id once per match."""
    index: SubscriptionIndex[str] = SubscriptionIndex()
    index.add("s1", 1, "a/#")
    index.add("s1", 2, "a/+/#")
    assert as_dict(index.match("a")) == {"s1": (1,)}
    assert as_dict(index.match("a/b")) == {"s1": (1, 2)}
    assert as_dict(index.match("a/b/c")) == {"s1": (1, 2)}


def test_dollar_topics_skip_leading_wildcards_in_the_index() -> None:
    """MQTT-4.7.2-1 in the index: '#' and '+/...' skip '$SYS/x', '$SYS/#' gets it."""
    index: SubscriptionIndex[str] = SubscriptionIndex()
    index.add("s1", 1, "#")
    index.add("s1", 2, "+/x")
    index.add("s1", 3, "$SYS/#")
    index.add("s1", 4, "$SYS/x")
    assert as_dict(index.match("$SYS/x")) == {"s1": (3, 4)}
    assert as_dict(index.match("SYS/x")) == {"s1": (1, 2)}


# the per-topic cache -----------------------------------------------------------------------------


@pytest.mark.parametrize("filter", ["t/1", "t/+", "t/#", "#", "+/1"])
def test_topics_matched_uncached_answer_the_same_and_are_not_cached(filter: str) -> None:
    """`uncached` (topics published on once, say): the same answers, the cache untouched, and
    still right after a change; other topics are cached as before."""
    index: SubscriptionIndex[str] = SubscriptionIndex(uncached=lambda topic: topic == "t/1")
    index.add("s1", 1, filter)
    assert as_dict(index.match("t/1")) == {"s1": (1,)}
    assert "t/1" not in index._cache and index._cached_topics.is_empty()
    index.add("s2", 1, "t/1")
    assert as_dict(index.match("t/1")) == {"s1": (1,), "s2": (1,)}
    index.match("u/1")
    assert list(index._cache) == ["u/1"]


@pytest.mark.parametrize("filter", ["t/1", "t/+", "t/#", "#", "+/1"])
def test_subscribe_after_a_cached_match_is_seen(filter: str) -> None:
    """A subscription added after a topic's (empty) result was cached is matched at once."""
    index: SubscriptionIndex[str] = SubscriptionIndex()
    index.add("other", 1, "u/1")
    assert as_dict(index.match("t/1")) == {}
    assert index.add("s1", 1, filter)
    assert as_dict(index.match("t/1")) == {"s1": (1,)}


@pytest.mark.parametrize("filter", ["t/1", "t/+", "t/#", "#", "+/1"])
def test_unsubscribe_after_a_cached_match_is_seen(filter: str) -> None:
    """A subscription removed after a topic's result was cached stops matching at once."""
    index: SubscriptionIndex[str] = SubscriptionIndex()
    index.add("s1", 1, filter)
    index.add("s2", 1, "t/1")
    assert as_dict(index.match("t/1")) == {"s1": (1,), "s2": (1,)}
    index.remove("s1", 1)
    assert as_dict(index.match("t/1")) == {"s2": (1,)}


def test_remove_session_and_replace_invalidate_the_cache() -> None:
    """remove_session and a replacing add are seen by the next match of a cached topic."""
    index: SubscriptionIndex[str] = SubscriptionIndex()
    index.add("s1", 1, "t/1")
    index.add("s2", 1, "t/+")
    assert as_dict(index.match("t/1")) == {"s1": (1,), "s2": (1,)}
    index.remove_session("s1")
    assert as_dict(index.match("t/1")) == {"s2": (1,)}
    index.add("s2", 1, "u/+")
    assert as_dict(index.match("t/1")) == {}


def test_exact_change_keeps_other_cached_topics_right() -> None:
    """An exact subscription change leaves other topics' answers correct (it forgets only its
    own topic), and a wildcard change reaches every cached topic."""
    index: SubscriptionIndex[str] = SubscriptionIndex()
    index.add("s1", 1, "a")
    index.add("s2", 1, "b")
    assert as_dict(index.match("a")) == {"s1": (1,)}
    assert as_dict(index.match("b")) == {"s2": (1,)}
    index.add("s3", 1, "a")
    assert as_dict(index.match("a")) == {"s1": (1,), "s3": (1,)}
    assert as_dict(index.match("b")) == {"s2": (1,)}
    index.add("s4", 1, "+")
    assert as_dict(index.match("a")) == {"s1": (1,), "s3": (1,), "s4": (1,)}
    assert as_dict(index.match("b")) == {"s2": (1,), "s4": (1,)}


def recomputed(index: SubscriptionIndex[str], before: dict[str, object]) -> set[str]:
    """The topics of `before` whose match is no longer the very result cached before."""
    return {topic for topic, result in before.items() if index.match(topic) is not result}


PUBLISHED = ["a/1", "a/2", "b/1", "$SYS/a", "a"]


@pytest.mark.parametrize(("filter", "affected"), [
    ("a/+", {"a/1", "a/2"}), ("+/1", {"a/1", "b/1"}), ("a/#", {"a", "a/1", "a/2"}),
    ("#", {"a", "a/1", "a/2", "b/1"}), ("$SYS/#", {"$SYS/a"}), ("+/+/+", set()),
])
def test_a_wildcard_change_forgets_only_the_cached_topics_it_matches(
    filter: str, affected: set[str]
) -> None:
    """A wildcard subscribe or unsubscribe recomputes the topics its filter matches and keeps
    every other cached answer: one overlapping subscribe must not make every publish pay again."""
    index: SubscriptionIndex[str] = SubscriptionIndex()
    for n, topic in enumerate(PUBLISHED):
        index.add("s1", n, topic)  # every answer non-empty, so each is a new object when computed
    cached = {topic: index.match(topic) for topic in PUBLISHED}
    index.add("s2", 1, filter)
    assert recomputed(index, cached) == affected
    cached = {topic: index.match(topic) for topic in PUBLISHED}
    index.remove("s2", 1)
    assert recomputed(index, cached) == affected
    for n, topic in enumerate(PUBLISHED):
        assert as_dict(index.match(topic)) == {"s1": (n,)}


def test_an_exact_change_forgets_only_its_own_topic() -> None:
    """An exact subscribe recomputes its one topic and no other."""
    index: SubscriptionIndex[str] = SubscriptionIndex()
    index.add("s1", 1, "a")
    index.add("s1", 2, "b")
    cached = {topic: index.match(topic) for topic in ["a", "b"]}
    index.add("s2", 1, "a")
    assert recomputed(index, cached) == {"a"}
    assert as_dict(index.match("a")) == {"s1": (1,), "s2": (1,)}


def test_wildcard_subscriptions_are_counted_per_session_and_in_all() -> None:
    """The counts the broker's wildcard limits use: exact filters do not count, replacing a
    subscription moves it between the counts, removing one gives its place back."""
    index: SubscriptionIndex[str] = SubscriptionIndex()
    index.add("s1", 1, "a/+")
    index.add("s1", 2, "a/#")
    index.add("s1", 3, "a/b")
    index.add("s2", 1, "#")
    assert (index.wildcards_of("s1"), index.wildcards_of("s2"), index.wildcards) == (2, 1, 3)
    index.add("s1", 1, "a/c")
    assert (index.wildcards_of("s1"), index.wildcards) == (1, 2)
    index.remove_session("s1")
    assert (index.wildcards_of("s1"), index.wildcards) == (0, 1)
    index.remove("s2", 1)
    assert (index.wildcards_of("s2"), index.wildcards) == (0, 0)


@pytest.mark.parametrize("cache_size", [0, 1, 3])
def test_cache_is_bounded(cache_size: int) -> None:
    """The cache never holds more than cache_size topics (none when 0), and answers stay right
    after older topics were evicted."""
    index: SubscriptionIndex[str] = SubscriptionIndex(cache_size=cache_size)
    index.add("s1", 1, "t/+")
    for round_ in range(2):
        for n in range(10):
            assert as_dict(index.match(f"t/{n}")) == {"s1": (1,)}, round_
            assert len(index._cache) <= cache_size


# agreement with the reference matcher -------------------------------------------------------------

KEYS = ["s1", "s2", "s3"]
SUB_IDS = st.integers(min_value=1, max_value=4)
TOPIC_LEVELS = ["a", "b", "", "$SYS", "$"]
FILTER_LEVELS = [*TOPIC_LEVELS, "+"]


@st.composite
def topics(draw: st.DrawFn) -> str:
    levels = draw(st.lists(st.sampled_from(TOPIC_LEVELS), min_size=1, max_size=3))
    topic = "/".join(levels)
    if not topic:
        topic = "/"
    validate_topic(topic)
    return topic


@st.composite
def wildcard_filters(draw: st.DrawFn) -> str:
    levels = draw(st.lists(st.sampled_from(FILTER_LEVELS), min_size=0, max_size=4))
    if draw(st.booleans()) or not levels:
        levels.append("#")
    filter = "/".join(levels)
    if not filter:
        filter = "/"
    validate_filter(filter)
    return filter


def filters() -> st.SearchStrategy[str]:
    """Exact filters drawn like topics (so they often equal a published one), and wildcards."""
    return st.one_of(topics(), wildcard_filters())


def expected_match(
    subscriptions: dict[tuple[str, int], str], topic: str
) -> dict[object, tuple[int, ...]]:
    found: defaultdict[object, list[int]] = defaultdict(list)
    for (key, sub_id), filter in subscriptions.items():
        if matches(filter, topic):
            found[key].append(sub_id)
    return {key: tuple(sorted(ids)) for key, ids in found.items()}


@settings(max_examples=1000)
@given(st.lists(filters(), max_size=12), st.lists(topics(), min_size=1, max_size=8))
def test_index_agrees_with_reference_matcher(subscribed: list[str], published: list[str]) -> None:
    """For random filters (one session each, several subscriptions per session), every topic
    reaches exactly the subscriptions the reference matcher says it should, cached or not."""
    index: SubscriptionIndex[str] = SubscriptionIndex()
    subscriptions: dict[tuple[str, int], str] = {}
    for n, filter in enumerate(subscribed):
        key = KEYS[n % len(KEYS)]
        index.add(key, n, filter)
        subscriptions[key, n] = filter
    for topic in published + published:
        assert as_dict(index.match(topic)) == expected_match(subscriptions, topic), topic


class IndexAgainstModel(RuleBasedStateMachine):
    """Random add/remove/remove_session/match sequences against a plain dict and `matches`."""

    def __init__(self) -> None:
        super().__init__()
        self.index: SubscriptionIndex[str] = SubscriptionIndex(cache_size=8)
        self.model: dict[tuple[str, int], str] = {}

    def _in_use(self, filter: str) -> bool:
        return filter in self.model.values()

    @rule(key=st.sampled_from(KEYS), sub_id=SUB_IDS, filter=filters())
    def add(self, key: str, sub_id: int, filter: str) -> None:
        self.model.pop((key, sub_id), None)
        first = not self._in_use(filter)
        self.model[key, sub_id] = filter
        assert self.index.add(key, sub_id, filter) is first

    @rule(key=st.sampled_from(KEYS), sub_id=SUB_IDS)
    def remove(self, key: str, sub_id: int) -> None:
        filter = self.model.pop((key, sub_id), None)
        expected = None if filter is None else (filter, not self._in_use(filter))
        assert self.index.remove(key, sub_id) == expected

    @rule(key=st.sampled_from(KEYS))
    def remove_session(self, key: str) -> None:
        mine = {f for (k, _), f in self.model.items() if k == key}
        self.model = {ks: f for ks, f in self.model.items() if ks[0] != key}
        lost = self.index.remove_session(key)
        assert len(lost) == len(set(lost))
        assert set(lost) == {f for f in mine if not self._in_use(f)}

    @rule(topic=topics())
    def match(self, topic: str) -> None:
        assert as_dict(self.index.match(topic)) == expected_match(self.model, topic)

    @invariant()
    def nothing_left_behind(self) -> None:
        # Trie nodes and table entries of removed filters are pruned, so churn cannot leak memory.
        if not self.model:
            assert self.index._root.is_empty()
            assert not self.index._exact and not self.index._uses

    @invariant()
    def cached_topics_are_the_cache(self) -> None:
        # The trie of cached topics follows the cache exactly: evicted topics do not stay in it.
        cached = self.index._cached_topics
        assert set(cached.matching("#")) | set(cached.matching("$SYS/#")) | set(
            cached.matching("$/#")) == set(self.index._cache)

    @invariant()
    def sizes_agree(self) -> None:
        assert len(self.index) == len(self.model)
        wildcards = [k for (k, _), f in self.model.items() if is_wildcard(f)]
        assert self.index.wildcards == len(wildcards)
        for key in KEYS:
            assert self.index.wildcards_of(key) == wildcards.count(key)
        for key in KEYS:
            mine = {s: f for (k, s), f in self.model.items() if k == key}
            assert self.index.filters_of(key) == mine


IndexAgainstModel.TestCase.settings = settings(max_examples=1000, stateful_step_count=30)
TestIndexAgainstModel = IndexAgainstModel.TestCase


class IndexWithRoomyCacheAgainstModel(IndexAgainstModel):
    """The same, with a cache that never evicts: every answer must come from invalidation alone
    (a wildcard change forgets only the cached topics its filter matches)."""

    def __init__(self) -> None:
        super().__init__()
        self.index = SubscriptionIndex(cache_size=65536)


IndexWithRoomyCacheAgainstModel.TestCase.settings = settings(
    max_examples=500, stateful_step_count=30
)
TestIndexWithRoomyCacheAgainstModel = IndexWithRoomyCacheAgainstModel.TestCase
