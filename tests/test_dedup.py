"""The dedup window (mqbroker.dedup): which repeats count as duplicates, and its bound."""

from __future__ import annotations

import sys

from hypothesis import given
from hypothesis import strategies as st

from mqbroker.dedup import ENTRY_OVERHEAD, DedupWindow, Original
from mqbroker.message import Message, Position


def message(n: int, topic: str = "t") -> Original:
    """The identity of the n-th first publish (the window keeps nothing else)."""
    return Original(Position("e", n), published_at=float(n))


def test_a_pair_is_a_duplicate_until_its_window_ends() -> None:
    """get finds the first message while now < put time + window, and nothing from then on."""
    window = DedupWindow(window=10.0, max_entries=100)
    window.put("t", "k", message(1), now=5.0)
    assert window.get("t", "k", now=5.0) == message(1)
    assert window.get("t", "k", now=14.99) == message(1)
    assert window.get("t", "k", now=15.0) is None


def test_a_msg_id_is_only_unique_within_its_topic() -> None:
    """The same msg_id on another topic is not a duplicate."""
    window = DedupWindow(window=10.0, max_entries=100)
    window.put("t", "k", message(1), now=0.0)
    assert window.get("u", "k", now=0.0) is None


def test_a_put_after_the_window_starts_a_new_one() -> None:
    """Putting a pair again (a new first publish) remembers the new message from then on."""
    window = DedupWindow(window=10.0, max_entries=100)
    window.put("t", "k", message(1), now=0.0)
    window.put("t", "k", message(2), now=10.0)
    assert window.get("t", "k", now=19.0) == message(2)
    assert len(window) == 1


def test_expired_pairs_are_let_go_on_put() -> None:
    """Entries past their window do not stay in memory."""
    window = DedupWindow(window=10.0, max_entries=100)
    for n in range(5):
        window.put("t", f"k{n}", message(n), now=float(n))
    window.put("t", "late", message(9), now=13.0)
    assert len(window) == 2  # k4 (put at 4.0) and late
    assert window.evicted == 0


def test_past_max_entries_the_oldest_pair_is_forgotten_and_counted() -> None:
    """The bound holds by forgetting the oldest pair first, counted as an early eviction."""
    window = DedupWindow(window=100.0, max_entries=2)
    for n in range(3):
        window.put("t", f"k{n}", message(n), now=0.0)
    assert window.get("t", "k0", now=0.0) is None
    assert window.get("t", "k1", now=0.0) == message(1)
    assert (len(window), window.evicted) == (2, 1)


def test_a_re_put_pair_counts_as_the_newest() -> None:
    """A pair put again moves to the end of the eviction order."""
    window = DedupWindow(window=100.0, max_entries=2)
    window.put("t", "a", message(1), now=0.0)
    window.put("t", "b", message(2), now=0.0)
    window.put("t", "a", message(3), now=1.0)
    window.put("t", "c", message(4), now=1.0)
    assert window.get("t", "a", now=1.0) == message(3)
    assert window.get("t", "b", now=1.0) is None


@given(st.lists(st.tuples(st.integers(0, 20), st.floats(0, 3)), max_size=200))
def test_the_window_stays_bounded_and_remembers_the_newest(puts: list[tuple[int, float]]) -> None:
    """Whatever is put, at most max_entries pairs are kept and the newest put is found."""
    window = DedupWindow(window=5.0, max_entries=8)
    now = 0.0
    for n, (key, elapsed) in enumerate(puts):
        now += elapsed
        window.put("t", str(key), message(n), now)
        assert len(window) <= 8
        assert window.get("t", str(key), now) == message(n)


def test_the_window_keeps_no_payload() -> None:
    """What a repeat needs is the original's position and time: Original.of keeps only those."""
    published = Message(topic="t", payload=b"x" * 1024, published_at=3.0,
                        position=Position("e", 7), msg_id="k")
    window = DedupWindow(window=10.0, max_entries=10)
    window.put("t", "k", Original.of(published), now=0.0)
    assert window.get("t", "k", now=1.0) == Original(Position("e", 7), 3.0)
    assert window.bytes < 1024


def test_past_max_bytes_the_oldest_pairs_are_forgotten_and_counted() -> None:
    """Long msg_ids cannot grow the window past max_bytes: the oldest pairs go first."""
    msg_id = "m" * 10_000
    entry = sys.getsizeof("t") + sys.getsizeof(msg_id + "0") + ENTRY_OVERHEAD
    window = DedupWindow(window=100.0, max_entries=1000, max_bytes=3 * entry)
    for n in range(5):
        window.put("t", f"{msg_id}{n}", message(n), now=0.0)
        assert window.bytes <= 3 * entry
    assert (len(window), window.evicted, window.bytes) == (3, 2, 3 * entry)
    assert window.get("t", f"{msg_id}1", now=0.0) is None
    assert window.get("t", f"{msg_id}2", now=0.0) == message(2)


def test_expire_lets_go_of_ended_pairs_without_a_put() -> None:
    """expire(now), called by the fan-out's timer, frees what aged out with no publish needed."""
    window = DedupWindow(window=10.0, max_entries=100)
    for n in range(5):
        window.put("t", f"k{n}", message(n), now=float(n))
    window.expire(now=12.0)
    assert (len(window), window.evicted) == (2, 0)  # k3 and k4 are inside their window
    window.expire(now=14.0)
    assert (len(window), window.bytes) == (0, 0)


@given(st.lists(st.tuples(st.integers(0, 20), st.integers(0, 300), st.floats(0, 3)),
                max_size=200))
def test_the_byte_count_is_the_entries_sizes(puts: list[tuple[int, int, float]]) -> None:
    """Whatever is put, re-put and expired, `bytes` is the sum of the kept entries' sizes and
    stays within max_bytes."""
    window = DedupWindow(window=5.0, max_entries=50, max_bytes=4000)
    now = 0.0
    kept: dict[str, int] = {}
    for n, (key, length, elapsed) in enumerate(puts):
        now += elapsed
        msg_id = str(key) * length
        window.put("t", msg_id, message(n), now)
        kept[msg_id] = sys.getsizeof("t") + sys.getsizeof(msg_id) + ENTRY_OVERHEAD
        assert window.bytes <= 4000
        assert window.bytes == sum(kept[m] for t, m in window._entries)
