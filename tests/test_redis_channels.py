"""How filters become Redis subscriptions, which pub/sub copies an instance keeps, and what
a channel message carries.

The glob of a wildcard filter must match at least every topic the filter matches (the index
does the exact matching downstream), and our reading of the glob must be Redis' own: the
copy filter decides with it which copy of a message to keep.
"""

from __future__ import annotations

import msgpack
import pytest
import redis
from hypothesis import given
from hypothesis import strategies as st

from mqbroker.message import Message, Position
from mqbroker.topics import is_wildcard, matches
from mqbroker_plugins.redis.channels import (
    Confirmed,
    CopyFilter,
    KeyLayout,
    Kind,
    Subscription,
    filter_glob,
    glob_regex,
)
from mqbroker_plugins.redis.scripts import ARRAY_HEADER_LUA, Carried, decode_published
from tests.redis_fixtures import WAIT, redis_server
from tests.redis_server import RedisServer

__all__ = ["redis_server"]  # a fixture used by name below

#: A prefix with glob specials in it: they must be escaped too.
LAYOUT = KeyLayout("m[q]*b?:")
#: Levels made of the characters that mean something to globs, to MQTT, or to neither.
LEVELS = st.text(alphabet="a*?[]\\$", max_size=3)
TOPICS = st.lists(LEVELS, min_size=1, max_size=4).map("/".join)


@st.composite
def topic_and_filter(draw: st.DrawFn) -> tuple[str, str]:
    """A topic and a filter made from it: some levels `+`, maybe a `#` tail."""
    levels = draw(TOPICS).split("/")
    filter_levels = [draw(st.sampled_from([level, "+"])) for level in levels]
    cut = draw(st.integers(0, len(levels)))
    if cut < len(levels):
        filter_levels = [*filter_levels[:cut], "#"]
    return "/".join(levels), "/".join(filter_levels)


def pattern_matches(filter: str, topic: str) -> bool:
    subscription = LAYOUT.subscription_for(filter)
    return glob_regex(subscription.name).fullmatch(LAYOUT.channel(topic)) is not None


@given(topic_and_filter())
def test_a_wildcard_glob_matches_every_topic_its_filter_matches(pair: tuple[str, str]) -> None:
    """Whatever `matches(filter, topic)` accepts, the filter's glob accepts too."""
    topic, filter = pair
    if matches(filter, topic) and is_wildcard(filter):
        assert pattern_matches(filter, topic)


@given(LEVELS, TOPICS)
def test_a_literal_level_matches_only_itself(level: str, topic: str) -> None:
    """Glob specials in a literal level are escaped: the glob of "L/+" matches exactly the
    topics that start with "L/", whatever characters L holds."""
    assert pattern_matches(f"{level}/+", topic) == topic.startswith(f"{level}/")


def test_hash_covers_its_parent_level() -> None:
    """MQTT-4.7.1-2: "a/#" matches "a" itself, so its glob must too."""
    assert filter_glob("a/#") == "a*"
    assert filter_glob("#") == "*"
    assert pattern_matches("a/#", "a") and pattern_matches("a/#", "a/b/c")


def test_exact_filters_subscribe_their_channel() -> None:
    """An exact filter, glob specials and all, is a plain SUBSCRIBE of its topic's channel."""
    assert LAYOUT.subscription_for("a*/[b]") == Subscription(Kind.CHANNEL, b"m[q]*b?:t:a*/[b]")


def test_redis_reads_our_globs_as_we_do(redis_server: RedisServer) -> None:
    """PSUBSCRIBE each glob on a real Redis and publish to tricky topics: Redis delivers a
    topic to a pattern exactly when `glob_regex` says the pattern matches."""
    filters = ["+/b", "a*/#", "#", "a/+", "[x]/+/?", "\\/#", "a/#"]
    topics = ["a/b", "a*/b", "ab/b", "[x]/y/?", "x/y/z", "\\/q", "a", "a/", "/b", "a/b/c"]
    patterns = {LAYOUT.subscription_for(f).name for f in filters}
    expected = {
        (pattern, LAYOUT.channel(topic))
        for pattern in patterns
        for topic in topics
        if glob_regex(pattern).fullmatch(LAYOUT.channel(topic))
    }
    with redis.Redis.from_url(redis_server.url) as client, client.pubsub() as pubsub:
        pubsub.psubscribe(*patterns)
        for topic in topics:
            client.publish(LAYOUT.channel(topic), b"")
        # Its confirmation comes after every copy of the publishes above.
        pubsub.psubscribe(LAYOUT.channel("end"))
        delivered = set()
        while (message := pubsub.get_message(timeout=WAIT)) is not None:
            if message["type"] == "psubscribe" and message["channel"] == LAYOUT.channel("end"):
                break
            if message["type"] == "pmessage":
                delivered.add((message["pattern"], message["channel"]))
    assert delivered == expected
    assert len(expected) > len(topics)


def _confirm(copies: CopyFilter, kind: Kind, name: bytes, active: bool = True) -> None:
    copies.confirm(Confirmed(Subscription(kind, name), active))


def test_a_channel_copy_wins_over_pattern_copies() -> None:
    """With the channel SUBSCRIBEd, its copy is kept and every pattern copy dropped."""
    copies = CopyFilter()
    _confirm(copies, Kind.PATTERN, b"t:*")
    _confirm(copies, Kind.CHANNEL, b"t:a")
    assert copies.keep(b"t:a", None)
    assert not copies.keep(b"t:a", b"t:*")
    assert copies.keep(b"t:b", b"t:*")


def test_of_several_patterns_only_the_smallest_copy_is_kept() -> None:
    """Among the matching patterns, the bytewise smallest one's copy is the one kept, and the
    choice follows the confirmed patterns as they change."""
    copies = CopyFilter()
    for name in (b"t:a*", b"t:*", b"t:*/x"):
        _confirm(copies, Kind.PATTERN, name)
    assert [copies.keep(b"t:a/x", p) for p in (b"t:a*", b"t:*", b"t:*/x")] == [
        False,
        True,
        False,
    ]
    _confirm(copies, Kind.PATTERN, b"t:*", active=False)
    assert [copies.keep(b"t:a/x", p) for p in (b"t:a*", b"t:*/x")] == [False, True]
    assert copies.keep(b"t:a", b"t:a*")


def test_a_new_connection_starts_with_nothing_confirmed() -> None:
    """After reset, a subscription is live only once Redis confirms it again."""
    copies = CopyFilter()
    channel = Subscription(Kind.CHANNEL, b"t:a")
    copies.confirm(Confirmed(channel, True))
    assert copies.is_live(channel)
    copies.reset()
    assert not copies.is_live(channel)


# --- What one channel message carries ------------------------------------------------------

CARRIED = st.builds(
    Carried,
    st.builds(
        Message,
        topic=st.just("a/b"),
        payload=st.one_of(
            st.binary(max_size=8), st.text(max_size=8), st.integers(-(2**63), 2**63 - 1)
        ),
        published_at=st.floats(0, 2e9),
        position=st.builds(Position, st.text(max_size=6), st.integers(0, 2**63)),
        msg_id=st.one_of(st.none(), st.text(max_size=4)),
    ),
    st.booleans(),
)


def _wire(carried: Carried) -> bytes:
    """A message as the publish script sends it (tests/test_redis_fanout.py runs the script)."""
    m = carried.message
    fields = [m.position.epoch, m.position.offset, carried.recorded]
    packed: bytes = msgpack.packb(
        [*fields, m.topic, m.payload, m.published_at, m.msg_id], use_bin_type=True
    )
    return packed


@given(st.lists(CARRIED, min_size=1, max_size=40))
def test_a_channel_message_is_one_wire_or_an_array_of_wires(run: list[Carried]) -> None:
    """One message travels as its wire form, several as a msgpack array of wire forms; both
    decode back to the messages in order."""
    wires = [_wire(carried) for carried in run]
    if len(wires) == 1:
        data = wires[0]
    else:
        data = msgpack.Packer().pack_array_header(len(wires)) + b"".join(wires)
    assert decode_published(data) == run


@pytest.mark.parametrize(
    "data", [b"", b"\xc1", b"\x92\x01\x02", b"\x92" + b"\x97" + b"\x00" * 7 + b"\x91\x01"]
)
def test_a_malformed_channel_message_is_refused_whole(data: bytes) -> None:
    """Anything but a wire or an array of wires raises ValueError (counted as malformed)."""
    with pytest.raises(ValueError, match="not a message"):
        decode_published(data)


def test_the_scripts_array_header_is_msgpacks(redis_server: RedisServer) -> None:
    """The publish script's array header, run by Redis, is the one msgpack writes, for every
    size class (fixarray, array 16, array 32)."""
    script = ARRAY_HEADER_LUA + "return array_header(tonumber(ARGV[1]))"
    sizes = [0, 1, 15, 16, 255, 256, 65535, 65536, 70000, 2**24 + 3]
    with redis.Redis.from_url(redis_server.url) as client:
        headers = [client.eval(script, 0, n) for n in sizes]
    assert headers == [msgpack.Packer().pack_array_header(n) for n in sizes]
