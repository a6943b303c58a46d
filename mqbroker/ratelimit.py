"""Rate limits: token buckets, violation tracking, and a bounded table of buckets per peer.

Pure: no clock of its own (like mqbroker/dedup.py). The caller passes `now` (any monotonic
clock, in seconds, never decreasing between calls) to every call, so the limits are tested
without a clock and the server uses trio's.
"""

from __future__ import annotations

import collections

from attrs import define, field

#: Tokens a request may be short of and still pass (rounding of `elapsed * rate`).
_SLACK = 1e-9


@define
class TokenBucket:
    """Admits at most `burst + rate * elapsed` units over any interval.

    The bucket starts full (`burst` tokens) and refills at `rate` tokens per second up to
    `burst`. `take(n, now)` admits a request of `n` units when `n` tokens are there, and takes
    them; a refused request takes nothing, so a client that backs off gets through again. A
    request larger than `burst` can never pass: the caller sizes `burst` accordingly.
    """

    rate: float
    burst: float
    tokens: float = field(init=False)
    #: When `tokens` was last brought up to date; None until the first call.
    _updated: float | None = field(default=None, init=False)

    def __attrs_post_init__(self) -> None:
        self.tokens = self.burst

    def take(self, n: float, now: float) -> bool:
        """Take `n` tokens at time `now` if there are that many; whether it did."""
        if self._updated is not None:
            elapsed = now - self._updated
            if elapsed > 0:
                self.tokens = min(self.burst, self.tokens + elapsed * self.rate)
        self._updated = now
        # The slack absorbs float rounding: a client paced at exactly the rate must pass.
        if n <= self.tokens + _SLACK:
            self.tokens = max(0.0, self.tokens - n)
            return True
        return False


def bucket(rate: float, burst: float) -> TokenBucket | None:
    """A bucket for `rate` per second with `burst` (0: one second's worth); None when `rate` is
    0, which turns the limit off."""
    if rate <= 0:
        return None
    return TokenBucket(rate, burst if burst > 0 else max(rate, 1.0))


@define
class Violations:
    """Counts violations in a sliding window: `record(now)` says when `max_violations` have
    happened within the last `window` seconds. Holds at most `max_violations` times."""

    max_violations: int
    window: float
    _times: collections.deque[float] = field(factory=collections.deque, init=False)

    def record(self, now: float) -> bool:
        """Record one violation at `now`; True when that makes `max_violations` in the window."""
        times = self._times
        times.append(now)
        while times and times[0] <= now - self.window:
            times.popleft()
        while len(times) > self.max_violations:
            times.popleft()
        return len(times) >= self.max_violations


@define
class PeerLimiter:
    """One token bucket per peer address, at most `max_peers` of them (least recently seen
    forgotten first), so a flood from many addresses costs bounded memory.

    Forgetting a peer gives it a full bucket when it comes back: the table is sized so that this
    only happens under a flood from more than `max_peers` addresses at once, which a per-peer
    limit cannot stop anyway.
    """

    rate: float
    burst: float
    max_peers: int = 10_000
    _buckets: collections.OrderedDict[str, TokenBucket] = field(
        factory=collections.OrderedDict, init=False)

    def take(self, peer: str, now: float) -> bool:
        """Admit one connection from `peer` at `now`, or not."""
        buckets = self._buckets
        entry = buckets.get(peer)
        if entry is None:
            entry = buckets[peer] = TokenBucket(self.rate, self.burst)
            if len(buckets) > self.max_peers:
                buckets.popitem(last=False)
        else:
            buckets.move_to_end(peer)
        return entry.take(1, now)

    def __len__(self) -> int:
        return len(self._buckets)
