"""The switch from replay to live for one subscription resuming with `since`, sans-IO.

While a subscription replays history, live messages keep arriving for it. They cannot be sent
yet (they would overtake the replay), and some of them may also be in the history being read
(published after the subscription's watch began but before the read). `ReplaySwitch` holds the
live ones back and, once the replay is queued, releases those after the last position sent, in
order: every message after `since` exactly once, history first, then live.

A live message may also arrive after the switch although the history read already had it: with
Redis, a message is recorded and published in one step, but its pub/sub delivery can reach this
instance after a read of the stream saw it. So once live, the switch still filters (`admit`)
until the first live message past the last one sent; from there on, one topic's live messages
arrive in order and need no filter. Like centrifuge's PubSubSync, it only decides; the broker
moves the messages.

Pure: no I/O, no clock.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Iterator

from attrs import define, field

from mqbroker.message import Position
from mqbroker.protocol.codec import EncodedMessage


@define(eq=False)
class ReplaySwitch:
    """One subscription's hold-back while it replays from `since`.

    Positions compare within one epoch only: a message of another epoch (a history that was
    replaced meanwhile) is never taken for one already sent, so it is sent rather than lost.
    """

    since: Position
    #: How many live messages may wait; past that `hold` refuses (the session is too slow).
    max_held: int
    #: ... and how many bytes (their msgpack encoding): a few large messages must not make a
    #: replaying session hold gigabytes. Unbounded when None.
    max_held_bytes: int | None = None
    _held: deque[EncodedMessage] = field(factory=deque, init=False)
    _held_bytes: int = field(default=0, init=False)
    #: The replay and the held messages were handed out: `admit` filters from now on.
    live: bool = field(default=False, init=False)
    #: The last position handed out, history or live.
    _last: Position = field(init=False)

    def __attrs_post_init__(self) -> None:
        self._last = self.since

    def __len__(self) -> int:
        return len(self._held)

    def hold(self, message: EncodedMessage) -> bool:
        """Keep a live message until the switch; False when `max_held` are already waiting."""
        if len(self._held) >= self.max_held:
            return False
        if self.max_held_bytes is not None:
            size = len(message.msgpack_tail())
            if self._held_bytes + size > self.max_held_bytes:
                return False
            self._held_bytes += size
        self._held.append(message)
        return True

    def replayed(self, messages: Iterable[EncodedMessage]) -> Iterator[EncodedMessage]:
        """The history messages to send, in order: those after everything sent so far."""
        for message in messages:
            if self._is_new(message.message.position):
                yield message

    def next_live(self) -> EncodedMessage | None:
        """The next held message to send, or None when none is left: then the subscription is
        live, and the caller must stop holding for it before it next awaits anything."""
        while self._held:
            message = self._held.popleft()
            if self.max_held_bytes is not None:
                self._held_bytes -= len(message.msgpack_tail())
            if self._is_new(message.message.position):
                return message
        self.live = True
        return None

    def admit(self, message: EncodedMessage) -> bool:
        """Once live: whether this live message is new (to be sent). After the first True the
        caller may drop the switch: later messages of the topic come after this one."""
        return self._is_new(message.message.position)

    def _is_new(self, position: Position) -> bool:
        last = self._last
        if position.epoch == last.epoch and position.offset <= last.offset:
            return False
        self._last = position
        return True
