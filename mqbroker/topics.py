"""Topic names and topic filters: validation and matching, as MQTT 3.1.1 section 4.7 defines them.

Pure: no I/O. A topic is the name a message is published to; a filter is what a session subscribes
with. Both are split into levels on `/`; levels may be empty. `matches` is the plain reference
matcher (the subscription index in `mqbroker.index` is checked against it); `FilterSet` answers
"does any of these filters match this topic" for a fixed set, such as the recorded filters;
`TopicTree` the other way round: "which of these topics does this filter match", for a set that
changes, such as the topics a history retains.
"""

from __future__ import annotations

from collections.abc import Iterable

from attrs import define, field, frozen

SEPARATOR = "/"
SINGLE_LEVEL = "+"
MULTI_LEVEL = "#"
#: Longest part of an offending topic or filter quoted in an error message.
_QUOTE_LIMIT = 64


@frozen(kw_only=True)
class TopicLimits:
    """How long a topic or filter may be. MQTT-4.7.3-3 caps both at 65535 bytes; we cap lower."""

    #: In UTF-8 bytes, not characters.
    max_length: int = 1024
    max_levels: int = 32


DEFAULT_LIMITS = TopicLimits()


class InvalidTopic(ValueError):
    """A topic or filter that breaks a rule; `str()` is a sentence naming it and the rule."""


def validate_topic(topic: str, limits: TopicLimits = DEFAULT_LIMITS) -> None:
    """Raise InvalidTopic unless `topic` may be published to."""
    _check_common("topic", topic, limits)
    # MQTT-4.7.1-1: wildcards may appear in filters but never in a topic name.
    if SINGLE_LEVEL in topic or MULTI_LEVEL in topic:
        raise InvalidTopic(
            f"topic {_quote(topic)} contains a wildcard ('+' or '#'); "
            "wildcards are only allowed in subscription filters"
        )


def validate_filter(filter: str, limits: TopicLimits = DEFAULT_LIMITS) -> None:
    """Raise InvalidTopic unless `filter` may be subscribed with."""
    _check_common("filter", filter, limits)
    if not is_wildcard(filter):
        return
    levels = filter.split(SEPARATOR)
    last = len(levels) - 1
    for index, level in enumerate(levels):
        _check_filter_level(filter, level, index, last)


def is_wildcard(filter: str) -> bool:
    """Whether a (valid) filter contains `+` or `#`, so it may match more than one topic."""
    return SINGLE_LEVEL in filter or MULTI_LEVEL in filter


def matches(filter: str, topic: str) -> bool:
    """Whether `filter` matches `topic`: the reference matcher, one level at a time.

    Both are assumed valid. Matching is on the exact characters: MQTT-4.7.3-4 forbids any
    normalisation.
    """
    if topic.startswith("$") and filter[:1] in (SINGLE_LEVEL, MULTI_LEVEL):
        # MQTT-4.7.2-1: a filter starting with a wildcard never matches a `$` topic.
        return False
    topic_levels = topic.split(SEPARATOR)
    filter_levels = filter.split(SEPARATOR)
    for index, level in enumerate(filter_levels):
        if level == MULTI_LEVEL:
            # MQTT-4.7.1-2: `#` matches the parent level and any number of levels below it.
            return True
        if index >= len(topic_levels):
            return False
        if level != SINGLE_LEVEL and level != topic_levels[index]:
            return False
    return len(filter_levels) == len(topic_levels)


def covers(wide: str, narrow: str) -> bool:
    """Whether every topic `narrow` can match is matched by `wide` (both valid filters).

    Authorization needs it: a subscribe with a wildcard filter is allowed only when the rights
    cover everything it could deliver, not merely some of it.
    """
    if wide[:1] in (SINGLE_LEVEL, MULTI_LEVEL) and narrow.startswith("$"):
        # A `$` topic is never matched by a leading wildcard (MQTT-4.7.2-1).
        return False
    return _covers(wide.split(SEPARATOR), narrow.split(SEPARATOR))


def _covers(wide: list[str], narrow: list[str]) -> bool:
    for index, level in enumerate(wide):
        if level == MULTI_LEVEL:
            return True  # matches whatever remains, including nothing (the parent level)
        if index >= len(narrow):
            return False
        other = narrow[index]
        if other == MULTI_LEVEL:
            # `narrow` reaches any depth from here on, the parent level included; only a
            # leading `#` has no parent (every topic has a first level), which `+/#` covers.
            return index == 0 and level == SINGLE_LEVEL and wide[1:] == [MULTI_LEVEL]
        if level != SINGLE_LEVEL and (other == SINGLE_LEVEL or other != level):
            return False
    return len(wide) == len(narrow)


def _to_filters(filters: Iterable[str]) -> frozenset[str]:
    # A lone string is an iterable of characters: refuse it rather than subscribe to each letter.
    if isinstance(filters, str):
        raise TypeError("FilterSet takes an iterable of filters, not one string")
    return frozenset(filters)


def _validate_filters(_instance: object, _attribute: object, filters: frozenset[str]) -> None:
    for filter in filters:
        validate_filter(filter)


@frozen
class FilterSet:
    """An immutable set of filters that answers `matches_any(topic)`, cached per topic.

    The history uses one to decide which topics it records. The cache holds at most
    `cache_size` topics and forgets the oldest first.
    """

    filters: frozenset[str] = field(converter=_to_filters, validator=_validate_filters)
    cache_size: int = field(default=4096, kw_only=True, eq=False)
    _exact: frozenset[str] = field(init=False, repr=False, eq=False)
    _wildcards: tuple[str, ...] = field(init=False, repr=False, eq=False)
    _cache: dict[str, bool] = field(init=False, factory=dict, repr=False, eq=False)

    @_exact.default
    def _exact_filters(self) -> frozenset[str]:
        return frozenset(f for f in self.filters if not is_wildcard(f))

    @_wildcards.default
    def _wildcard_filters(self) -> tuple[str, ...]:
        return tuple(sorted(f for f in self.filters if is_wildcard(f)))

    def matches_any(self, topic: str) -> bool:
        """Whether at least one filter of the set matches `topic`."""
        found = self._cache.get(topic)
        if found is None:
            found = topic in self._exact or any(matches(f, topic) for f in self._wildcards)
            self._remember(topic, found)
        return found

    def __contains__(self, filter: object) -> bool:
        return filter in self.filters

    def __len__(self) -> int:
        return len(self.filters)

    def _remember(self, topic: str, found: bool) -> None:
        if self.cache_size <= 0:
            return
        if len(self._cache) >= self.cache_size:
            # Dicts keep insertion order, so the first key is the oldest entry.
            del self._cache[next(iter(self._cache))]
        self._cache[topic] = found


class _Level:
    """One level of a `TopicTree`: the topic ending here, if any, and the levels below."""

    __slots__ = ("below", "topic")

    def __init__(self) -> None:
        self.topic: str | None = None
        #: Made with the first level below (most levels are a topic's last: no dict then).
        self.below: dict[str, _Level] | None = None


@define
class TopicTree:
    """A changing set of topics, by level: `matching(filter)` visits only the branches the
    filter's levels allow, so a filter with literal first levels (`mcp/session/S/#`) costs
    the topics under them, not every topic of the set."""

    _root: _Level = field(factory=_Level)
    _count: int = 0

    def __len__(self) -> int:
        return self._count

    def add(self, topic: str) -> None:
        node = self._root
        for level in topic.split(SEPARATOR):
            if node.below is None:
                node.below = {}
            below = node.below.get(level)
            if below is None:
                below = node.below[level] = _Level()
            node = below
        if node.topic is None:
            node.topic = topic
            self._count += 1

    def discard(self, topic: str) -> None:
        path: list[tuple[_Level, str]] = []
        node = self._root
        for level in topic.split(SEPARATOR):
            below = node.below.get(level) if node.below is not None else None
            if below is None:
                return
            path.append((node, level))
            node = below
        if node.topic is None:
            return
        node.topic = None
        self._count -= 1
        for parent, level in reversed(path):  # prune the levels left holding nothing
            if node.topic is not None or node.below:
                break
            assert parent.below is not None
            del parent.below[level]
            node = parent

    def matching(self, filter: str) -> list[str]:
        """The topics of the set that `filter` matches (as `matches` decides)."""
        levels = filter.split(SEPARATOR)
        found: list[str] = []
        stack = [(self._root, 0)]
        while stack:
            node, index = stack.pop()
            if index == len(levels):
                if node.topic is not None:
                    found.append(node.topic)
                continue
            level = levels[index]
            if level == MULTI_LEVEL:
                found.extend(_every_topic(node))
            elif node.below is None:
                continue
            elif level == SINGLE_LEVEL:
                stack.extend((below, index + 1) for below in node.below.values())
            elif (below := node.below.get(level)) is not None:
                stack.append((below, index + 1))
        # `matches` has the last word: a leading wildcard never matches a `$` topic.
        return [topic for topic in found if matches(filter, topic)]


def _every_topic(node: _Level) -> list[str]:
    """The topics at `node` and below it."""
    found: list[str] = []
    stack = [node]
    while stack:
        node = stack.pop()
        if node.topic is not None:
            found.append(node.topic)
        if node.below:
            stack.extend(node.below.values())
    return found


def _check_common(kind: str, text: str, limits: TopicLimits) -> None:
    # MQTT-4.7.3-1: at least one character long.
    if not text:
        raise InvalidTopic(f"the {kind} is empty; a {kind} must be at least one character long")
    # MQTT-4.7.3-2 (and MQTT-1.5.3-2): no U+0000 anywhere.
    if "\0" in text:
        raise InvalidTopic(f"{kind} {_quote(text)} contains the null character U+0000")
    _check_length(kind, text, limits)
    levels = text.count(SEPARATOR) + 1
    if levels > limits.max_levels:
        raise InvalidTopic(
            f"{kind} {_quote(text)} has {levels} levels; at most {limits.max_levels} are allowed"
        )


def _check_length(kind: str, text: str, limits: TopicLimits) -> None:
    # Every character takes at least one UTF-8 byte, so a long string fails before encoding it.
    if len(text) > limits.max_length:
        size = len(text.encode("utf-8", "surrogatepass"))
    else:
        try:
            size = len(text.encode("utf-8"))
        except UnicodeEncodeError:
            # MQTT-1.5.3-1: surrogate code points are not well-formed UTF-8.
            raise InvalidTopic(
                f"{kind} {_quote(text)} is not valid UTF-8 (it contains a surrogate)"
            ) from None
    if size > limits.max_length:
        raise InvalidTopic(
            f"{kind} {_quote(text)} is {size} bytes long in UTF-8; "
            f"at most {limits.max_length} are allowed"
        )


def _check_filter_level(filter: str, level: str, index: int, last: int) -> None:
    if level == MULTI_LEVEL:
        # MQTT-4.7.1-2: `#` must be the last level of the filter.
        if index != last:
            raise InvalidTopic(
                f"filter {_quote(filter)} has '#' at level {index + 1} of {last + 1}; "
                "'#' is only allowed as the last level"
            )
    elif MULTI_LEVEL in level:
        # MQTT-4.7.1-2: `#` alone or after a separator, never inside a level.
        raise InvalidTopic(
            f"filter {_quote(filter)} has '#' inside level {index + 1} ({level!r}); "
            "'#' must be a whole level"
        )
    elif level != SINGLE_LEVEL and SINGLE_LEVEL in level:
        # MQTT-4.7.1-3: `+` must occupy an entire level.
        raise InvalidTopic(
            f"filter {_quote(filter)} has '+' inside level {index + 1} ({level!r}); "
            "'+' must be a whole level"
        )


def _quote(text: str) -> str:
    if len(text) <= _QUOTE_LIMIT:
        return repr(text)
    return f"{text[:_QUOTE_LIMIT]!r}... ({len(text)} characters)"
