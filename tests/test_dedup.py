"""The dedup window (mqbroker.dedup): which repeats count as duplicates, and its bound."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from mqbroker.dedup import DedupWindow
from mqbroker.message import Message, Position


def message(n: int, topic: str = "t") -> Message:
    return Message(topic=topic, payload=n, published_at=0.0, position=Position("e", n))


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
