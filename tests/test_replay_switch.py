"""The switch from replay to live (mqbroker.resume.ReplaySwitch), as a property: whatever the
interleaving of live arrivals with the replay, every message after `since` is sent exactly once,
in order, history first."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from mqbroker.message import Message, Position
from mqbroker.protocol import EncodedMessage
from mqbroker.resume import ReplaySwitch

EPOCH = "e1"


def message(offset: int, epoch: str = EPOCH) -> EncodedMessage:
    return EncodedMessage(Message(topic="t", payload=offset, published_at=0.0,
                                  position=Position(epoch, offset)))


@st.composite
def scenarios(draw: st.DrawFn) -> tuple[int, int, int, int, int, list[int]]:
    """(since, first kept, watch start, history read end, last published, arrival points)."""
    last = draw(st.integers(0, 40))
    since = draw(st.integers(0, last))
    kept_from = draw(st.integers(1, last + 1))  # history trimmed below this offset
    watched_after = draw(st.integers(0, last))  # live: offsets watched_after+1 .. last
    # The history read sees up to here: at least `since`, which the client already had.
    read_up_to = draw(st.integers(max(watched_after, since), last))
    live = last - watched_after
    # Where each live message arrives: after that many messages were handed out.
    arrivals = sorted(draw(st.lists(st.integers(0, 2 * last + 2), min_size=live,
                                    max_size=live)))
    return since, kept_from, watched_after, read_up_to, last, arrivals


@settings(max_examples=1000)
@given(scenarios())
def test_every_message_after_since_once_in_order(
        scenario: tuple[int, int, int, int, int, list[int]]) -> None:
    since, kept_from, watched_after, read_up_to, last, arrivals = scenario
    switch: ReplaySwitch | None = ReplaySwitch(Position(EPOCH, since), max_held=1000)
    history = [message(n) for n in range(max(since + 1, kept_from), read_up_to + 1)]
    live = iter(range(watched_after + 1, last + 1))
    pending_arrivals = list(arrivals)
    sent: list[int] = []

    def arrive_due() -> None:
        while pending_arrivals and pending_arrivals[0] <= len(sent):
            pending_arrivals.pop(0)
            assert switch is not None and switch.hold(message(next(live)))

    arrive_due()
    for replayed in switch.replayed(history):
        sent.append(replayed.message.position.offset)
        arrive_due()
    while (held := switch.next_live()) is not None:
        sent.append(held.message.position.offset)
        arrive_due()
    # Live from here on: the switch filters until the first new message, then steps aside.
    assert switch.live
    for offset in live:
        if switch is None or switch.admit(message(offset)):
            sent.append(offset)
            switch = None

    after_since = (set(range(max(since + 1, kept_from), read_up_to + 1))
                   | set(range(max(watched_after, since) + 1, last + 1)))
    assert sent == sorted(set(sent)), "in order, each once"
    if kept_from <= since + 1:
        assert sent == sorted(after_since)
    else:
        # Trimmed: the suback says `recovered: false`; what the history kept is all sent, and
        # a live message older than the first replayed one may be skipped (it would be out of
        # order), never sent twice.
        assert {n for n in after_since if n >= kept_from} <= set(sent) <= after_since


def test_a_message_of_another_epoch_is_never_taken_for_one_already_sent() -> None:
    switch = ReplaySwitch(Position(EPOCH, 5), max_held=10)
    assert switch.hold(message(3, epoch="e2"))
    assert [m.message.position for m in switch.replayed([message(4), message(6)])] == [
        Position(EPOCH, 6)]
    held = switch.next_live()
    assert held is not None and held.message.position == Position("e2", 3)


def test_holding_is_bounded() -> None:
    switch = ReplaySwitch(Position(EPOCH, 0), max_held=2)
    assert switch.hold(message(1)) and switch.hold(message(2))
    assert not switch.hold(message(3))
    assert len(switch) == 2


def test_holding_is_bounded_in_bytes_and_sending_frees_them() -> None:
    size = len(message(1).msgpack_tail())
    switch = ReplaySwitch(Position(EPOCH, 0), max_held=100, max_held_bytes=2 * size)
    assert switch.hold(message(1)) and switch.hold(message(2))
    assert not switch.hold(message(3))
    assert switch.next_live() is not None
    assert switch.hold(message(3))
