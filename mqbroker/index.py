"""The subscription index: which sessions' subscriptions match a published topic.

Pure: no I/O. Exact filters live in a dict keyed by topic, so routing to an exact subscription
never looks at a wildcard; wildcard filters live in a trie keyed by level, with `+` and `#`
as ordinary children. Match results are cached per topic, and a change forgets only the cached
topics it can affect: an exact filter the one topic spelled like it, a wildcard filter the cached
topics it matches, found by walking a second trie that holds the cached topics (so a wildcard
subscribe costs what it touches, not a cleared cache that every later publish pays for again).

A match gathers the holders of every matching filter and merges them in one pass; the index
also counts wildcard subscriptions, per session and in all, for the broker's limits: each
overlapping wildcard filter adds to the cost of every publish it matches.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterator, Mapping, Sequence
from itertools import chain
from typing import Generic, TypeVar

from attrs import define, field

from mqbroker.topics import MULTI_LEVEL, SEPARATOR, SINGLE_LEVEL, is_wildcard

K = TypeVar("K", bound=Hashable)

#: One match result: each matching session once, with its matching subscription ids ascending.
Match = tuple[tuple[K, tuple[int, ...]], ...]
#: Who subscribed at one place: session -> its subscription ids there, ascending.
Holders = dict[K, tuple[int, ...]]


@define(slots=True)
class _Node(Generic[K]):
    """A trie node: the filters that end here, and the next level down."""

    holders: Holders[K] = field(factory=dict)
    children: dict[str, _Node[K]] = field(factory=dict)

    def is_empty(self) -> bool:
        return not self.holders and not self.children


@define(slots=True)
class _TopicNode:
    """A node of the trie of cached topics: whether the topic ending here is cached, and below."""

    cached: bool = False
    children: dict[str, _TopicNode] = field(factory=dict)


@define(slots=True)
class _CachedTopics:
    """The topics the match cache holds, as a trie by level, to find those a wildcard matches."""

    root: _TopicNode = field(factory=_TopicNode)

    def add(self, topic: str) -> None:
        node = self.root
        for level in topic.split(SEPARATOR):
            child = node.children.get(level)
            if child is None:
                child = node.children[level] = _TopicNode()
            node = child
        node.cached = True

    def discard(self, topic: str) -> None:
        levels = topic.split(SEPARATOR)
        path = [self.root]
        for level in levels:
            child = path[-1].children.get(level)
            if child is None:
                return
            path.append(child)
        path[-1].cached = False
        # Prune the nodes left empty, deepest first, so the trie only holds cached topics.
        for depth in range(len(levels), 0, -1):
            node = path[depth]
            if node.cached or node.children:
                break
            del path[depth - 1].children[levels[depth - 1]]

    def matching(self, filter: str) -> Iterator[str]:
        """The cached topics that the wildcard `filter` matches (as `topics.matches` says)."""
        yield from _walk_topics(self.root, filter.split(SEPARATOR), 0, [])

    def is_empty(self) -> bool:
        return not self.root.children


def _walk_topics(node: _TopicNode, levels: list[str], depth: int, path: list[str]
                 ) -> Iterator[str]:
    if depth == len(levels):
        if node.cached:
            yield SEPARATOR.join(path)
        return
    level = levels[depth]
    if level == MULTI_LEVEL:
        # MQTT-4.7.1-2: `#` matches its parent level and everything below it...
        if depth > 0 and node.cached:
            yield SEPARATOR.join(path)
        for name, child in node.children.items():
            # ...but MQTT-4.7.2-1: a filter starting with a wildcard never matches a `$` topic.
            if depth > 0 or not name.startswith("$"):
                yield from _subtree(child, [*path, name])
        return
    if level == SINGLE_LEVEL:
        for name, child in node.children.items():
            if depth > 0 or not name.startswith("$"):
                yield from _walk_topics(child, levels, depth + 1, [*path, name])
        return
    same = node.children.get(level)
    if same is not None:
        yield from _walk_topics(same, levels, depth + 1, [*path, level])


def _subtree(node: _TopicNode, path: list[str]) -> Iterator[str]:
    if node.cached:
        yield SEPARATOR.join(path)
    for name, child in node.children.items():
        yield from _subtree(child, [*path, name])


@define(kw_only=True)
class SubscriptionIndex(Generic[K]):
    """Every subscription of every session on this instance, indexed for `match`.

    Filters are assumed already validated (`mqbroker.topics.validate_filter`).
    Subscriptions are named by (session key, subscription id); a session key is any hashable
    value, the server uses its session objects.
    """

    #: Topics whose match result is kept; the oldest is forgotten first. 0 turns caching off.
    cache_size: int = 65536
    #: Which topics are matched without being cached (asked on a cache miss only): those
    #: published on once or twice, whose results would only push out the others'. None:
    #: every topic is cached.
    uncached: Callable[[str], bool] | None = None
    _by_session: dict[K, dict[int, str]] = field(init=False, factory=dict)
    #: filter -> how many subscriptions use it, to tell the first and the last.
    _uses: dict[str, int] = field(init=False, factory=dict)
    _exact: dict[str, Holders[K]] = field(init=False, factory=dict)
    _root: _Node[K] = field(init=False, factory=_Node)
    _cache: dict[str, Match[K]] = field(init=False, factory=dict)
    _cached_topics: _CachedTopics = field(init=False, factory=_CachedTopics)
    _count: int = field(init=False, default=0)
    #: session -> how many of its subscriptions have a wildcard filter.
    _wildcards_of: dict[K, int] = field(init=False, factory=dict)
    #: Wildcard subscriptions of every session.
    _wildcards: int = field(init=False, default=0)

    def add(self, key: K, sub_id: int, filter: str) -> bool:
        """Subscribe; True when no subscription used `filter` before.

        Adding a (key, sub_id) that exists replaces its filter, returning what `remove` then
        `add` would. The filter it replaced is not reported: call `remove` first to learn
        whether it lost its last subscription.
        """
        self.remove(key, sub_id)
        self._by_session.setdefault(key, {})[sub_id] = filter
        self._count += 1
        if is_wildcard(filter):
            self._wildcards_of[key] = self._wildcards_of.get(key, 0) + 1
            self._wildcards += 1
        uses = self._uses.get(filter, 0)
        self._uses[filter] = uses + 1
        holders = self._holders_for(filter)
        # Kept sorted here, so that building a match result rarely needs a sort.
        holders[key] = tuple(sorted((*holders.get(key, ()), sub_id)))
        self._forget(filter)
        return uses == 0

    def remove(self, key: K, sub_id: int) -> tuple[str, bool] | None:
        """Unsubscribe; (its filter, True if that was the filter's last subscription).

        None if the session has no such subscription.
        """
        subs = self._by_session.get(key)
        if subs is None or sub_id not in subs:
            return None
        filter = subs.pop(sub_id)
        if not subs:
            del self._by_session[key]
        self._count -= 1
        if is_wildcard(filter):
            self._wildcards -= 1
            left = self._wildcards_of[key] - 1
            if left:
                self._wildcards_of[key] = left
            else:
                del self._wildcards_of[key]
        self._drop_holder(filter, key, sub_id)
        self._forget(filter)
        return filter, self._release(filter)

    def remove_session(self, key: K) -> list[str]:
        """Unsubscribe all of a session's subscriptions; the filters that lost their last one."""
        lost: list[str] = []
        for sub_id in sorted(self.filters_of(key)):
            removed = self.remove(key, sub_id)
            if removed is not None and removed[1]:
                lost.append(removed[0])
        return lost

    def match(self, topic: str) -> Sequence[tuple[K, tuple[int, ...]]]:
        """Each session with a subscription matching `topic`, once, with all its matching ids.

        The ids are ascending. The result is immutable and may be shared between calls.
        `topic` is assumed valid (`mqbroker.topics.validate_topic`).
        """
        found = self._cache.get(topic)
        if found is None:
            found = self._match_uncached(topic)
        return found

    def filters_of(self, key: K) -> Mapping[int, str]:
        """sub_id -> filter for one session's subscriptions (a copy; empty if it has none)."""
        return dict(self._by_session.get(key, {}))

    def wildcards_of(self, key: K) -> int:
        """How many of one session's subscriptions have a wildcard filter."""
        return self._wildcards_of.get(key, 0)

    @property
    def wildcards(self) -> int:
        """How many subscriptions, of all sessions, have a wildcard filter."""
        return self._wildcards

    def __len__(self) -> int:
        return self._count

    def _match_uncached(self, topic: str) -> Match[K]:
        found: list[Holders[K]] = []
        exact = self._exact.get(topic)
        if exact:
            found.append(exact)
        _collect(self._root, topic.split(SEPARATOR), topic.startswith("$"), found)
        result = _merge(found)
        if self.cache_size > 0 and (self.uncached is None or not self.uncached(topic)):
            if len(self._cache) >= self.cache_size:
                # Dicts keep insertion order, so the first key is the oldest entry.
                self._uncache(next(iter(self._cache)))
            self._cache[topic] = result
            self._cached_topics.add(topic)
        return result

    def _uncache(self, topic: str) -> None:
        if self._cache.pop(topic, None) is not None:
            self._cached_topics.discard(topic)

    def _holders_for(self, filter: str) -> Holders[K]:
        if not is_wildcard(filter):
            return self._exact.setdefault(filter, {})
        node = self._root
        for level in filter.split(SEPARATOR):
            child = node.children.get(level)
            if child is None:
                child = node.children[level] = _Node()
            node = child
        return node.holders

    def _drop_holder(self, filter: str, key: K, sub_id: int) -> None:
        if not is_wildcard(filter):
            _discard(self._exact, filter, key, sub_id)
            return
        path = [self._root]
        levels = filter.split(SEPARATOR)
        for level in levels:
            path.append(path[-1].children[level])
        _discard_holder(path[-1].holders, key, sub_id)
        # Prune the nodes left empty, deepest first, so the trie only holds live filters.
        for depth in range(len(levels), 0, -1):
            if not path[depth].is_empty():
                break
            del path[depth - 1].children[levels[depth - 1]]

    def _release(self, filter: str) -> bool:
        uses = self._uses[filter] - 1
        if uses:
            self._uses[filter] = uses
            return False
        del self._uses[filter]
        return True

    def _forget(self, filter: str) -> None:
        """Drop the cached results that a change of `filter`'s subscriptions can affect."""
        if not self._cache:
            return
        if not is_wildcard(filter):
            # An exact filter only ever matches the topic spelled like it.
            self._uncache(filter)
            return
        # Listed first: the walk must not see the trie change under it.
        for topic in list(self._cached_topics.matching(filter)):
            self._uncache(topic)


def _collect(root: _Node[K], levels: list[str], dollar: bool, found: list[Holders[K]]) -> None:
    """Append the holders of every wildcard filter in the trie that matches `levels`."""
    nodes = [root]
    for depth, level in enumerate(levels):
        # MQTT-4.7.2-1: a filter starting with a wildcard never matches a `$` topic.
        wild = depth > 0 or not dollar
        following: list[_Node[K]] = []
        for node in nodes:
            children = node.children
            if wild:
                rest = children.get(MULTI_LEVEL)
                if rest is not None:
                    found.append(rest.holders)
                one = children.get(SINGLE_LEVEL)
                if one is not None:
                    following.append(one)
            same = children.get(level)
            if same is not None:
                following.append(same)
        if not following:
            return
        nodes = following
    _collect_ends(nodes, found)


def _collect_ends(nodes: list[_Node[K]], found: list[Holders[K]]) -> None:
    """Append the holders of filters ending at `nodes`, where the topic's levels ran out."""
    for node in nodes:
        if node.holders:
            found.append(node.holders)
        # MQTT-4.7.1-2: `#` also matches its parent level ("a/#" matches "a").
        parent = node.children.get(MULTI_LEVEL)
        if parent is not None:
            found.append(parent.holders)


def _merge(found: list[Holders[K]]) -> Match[K]:
    """One entry per session, its ids from every matching filter in one ascending tuple.

    Each session's id tuples are gathered first and sorted once at the end: re-sorting the
    merged tuple at every further filter cost O(n^2 log n) for a session whose n wildcard
    filters all match (999 filters: 5 ms per publish). The index keeps each tuple sorted and a
    session's ids are distinct, so the final sort only merges sorted runs (Timsort finds them).
    """
    if len(found) == 1:
        return tuple(found[0].items())
    merged: dict[K, tuple[int, ...]] = {}
    # Sessions matched through more than one filter: every id tuple they were found with.
    # Made on the first such session only: most publishes have none, and pay nothing for it.
    runs_of: dict[K, list[tuple[int, ...]]] | None = None
    for holders in found:
        for key, ids in holders.items():
            prior = merged.get(key)
            if prior is None:
                merged[key] = ids
            elif runs_of is None:
                runs_of = {key: [prior, ids]}
            else:
                runs = runs_of.get(key)
                if runs is None:
                    runs_of[key] = [prior, ids]
                else:
                    runs.append(ids)
    if runs_of is not None:
        for key, runs in runs_of.items():
            merged[key] = tuple(sorted(chain.from_iterable(runs)))
    return tuple(merged.items())


def _discard(table: dict[str, Holders[K]], filter: str, key: K, sub_id: int) -> None:
    holders = table[filter]
    _discard_holder(holders, key, sub_id)
    if not holders:
        del table[filter]


def _discard_holder(holders: Holders[K], key: K, sub_id: int) -> None:
    ids = tuple(i for i in holders[key] if i != sub_id)
    if ids:
        holders[key] = ids
    else:
        del holders[key]
