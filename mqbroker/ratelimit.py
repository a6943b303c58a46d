"""Rate limits: token buckets, violation tracking, and a bounded table of buckets per peer.

Pure: no clock of its own (like mqbroker/dedup.py). The caller passes `now` (any monotonic
clock, in seconds, never decreasing between calls) to every call, so the limits are tested
without a clock and the server uses trio's.
"""

from __future__ import annotations

import collections
import math
from collections.abc import Iterable
from typing import Any, Protocol

from attrs import define, field, frozen

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

    def give_back(self, n: float) -> None:
        """Return `n` tokens taken for a request that was refused after all (by another bucket)."""
        self.tokens = min(self.burst, self.tokens + n)


def effective_burst(rate: float, burst: float) -> float:
    """The burst a limit configured as (`rate`, `burst`) allows: `burst`, or when it is 0 one
    second's worth of `rate` (at least 1, so that one request fits); 0 when the limit is off."""
    if rate <= 0:
        return 0.0
    return burst if burst > 0 else max(rate, 1.0)


def bucket(rate: float, burst: float) -> TokenBucket | None:
    """A bucket for `rate` per second with `burst` (0: one second's worth); None when `rate` is
    0, which turns the limit off."""
    if rate <= 0:
        return None
    return TokenBucket(rate, effective_burst(rate, burst))


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


@frozen
class Refusal:
    """What a refused request calls for, besides its `rate_limited` error."""

    #: Write the `security.rate_limited` log line (at most once per session per window).
    log: bool
    #: The session reached max_violations within the window: close it (4029).
    exceeded: bool


@define
class SessionLimits:
    """One session's rate limits: its buckets, and the violations they led to.

    A violation is a frame in which at least one request was refused, however many were: a
    batch of a thousand publishes over the limit is one violation, not a thousand, so a client
    is closed for persisting, not for one burst. The session calls `new_frame()` before each
    frame it handles.
    """

    messages: TokenBucket | None
    bytes: TokenBucket | None
    requests: TokenBucket | None
    violations: Violations
    _frame: int = 0
    _violated_frame: int = -1
    _reported_frame: int = -1
    _log_after: float = -math.inf

    @classmethod
    def of(cls, rates: RateSettings) -> SessionLimits:
        return cls(
            bucket(rates.publish_messages_per_second, rates.publish_messages_burst),
            bucket(rates.publish_bytes_per_second, rates.publish_bytes_burst),
            bucket(rates.requests_per_second, rates.requests_burst),
            Violations(rates.max_violations, rates.violation_window),
        )

    def new_frame(self) -> None:
        self._frame += 1

    def publish(self, size: int, now: float) -> str | None:
        """Admit one publish of `size` bytes at `now`: None, or the name of the limit it is
        over (then nothing is taken from either bucket)."""
        messages, size_bucket = self.messages, self.bytes
        if messages is not None and not messages.take(1, now):
            return "publish_messages_per_second"
        if size_bucket is not None and not size_bucket.take(size, now):
            if messages is not None:
                messages.give_back(1)
            return "publish_bytes_per_second"
        return None

    def publish_run(self, count: int, size: int, now: float) -> bool:
        """Admit `count` publishes of `size` bytes in all at once, or take nothing: a run within
        the limits (the common case) costs one check, not one per publish. When this says no,
        the caller checks each publish with `publish`, to admit what fits."""
        messages, size_bucket = self.messages, self.bytes
        if messages is not None and not messages.take(count, now):
            return False
        if size_bucket is not None and not size_bucket.take(size, now):
            if messages is not None:
                messages.give_back(count)
            return False
        return True

    def request(self, now: float) -> str | None:
        """Admit one subscribe, unsubscribe or forget at `now`: None, or the limit's name."""
        if self.requests is not None and not self.requests.take(1, now):
            return "requests_per_second"
        return None

    def refused(self, now: float) -> Refusal:
        """Record that a request was refused at `now`: what that calls for."""
        if self._violated_frame == self._frame:
            return Refusal(log=False, exceeded=False)
        self._violated_frame = self._frame
        log = now >= self._log_after
        if log:
            self._log_after = now + self.violations.window
        return Refusal(log=log, exceeded=self.violations.record(now))

    def report_unacknowledged(self) -> bool:
        """Whether to send the `rate_limited` error for a dropped publish without an id: one
        per frame at most, since there is no id to tell them apart."""
        if self._reported_frame == self._frame:
            return False
        self._reported_frame = self._frame
        return True


#: The per-session keys of [limits], in the order the welcome lists them.
RATE_KEYS = ("publish_messages_per_second", "publish_messages_burst",
             "publish_bytes_per_second", "publish_bytes_burst", "requests_per_second",
             "requests_burst", "max_violations", "violation_window")


@frozen(kw_only=True)
class Rates:
    """One session's rate limits as applied: a rate of 0 is no limit, and every burst is
    resolved (`effective_burst`: 0 when the rate is off, never 0 while it is on)."""

    publish_messages_per_second: float = 0.0
    publish_messages_burst: float = 0.0
    publish_bytes_per_second: float = 0.0
    publish_bytes_burst: float = 0.0
    requests_per_second: float = 0.0
    requests_burst: float = 0.0
    max_violations: int = 10
    violation_window: float = 10.0

    @classmethod
    def of(cls, settings: RateSettings) -> Rates:
        """The limits `settings` ([limits], or a role's) describe, bursts resolved."""
        return cls(
            publish_messages_per_second=settings.publish_messages_per_second,
            publish_messages_burst=effective_burst(settings.publish_messages_per_second,
                                                   settings.publish_messages_burst),
            publish_bytes_per_second=settings.publish_bytes_per_second,
            publish_bytes_burst=effective_burst(settings.publish_bytes_per_second,
                                                settings.publish_bytes_burst),
            requests_per_second=settings.requests_per_second,
            requests_burst=effective_burst(settings.requests_per_second,
                                           settings.requests_burst),
            max_violations=settings.max_violations,
            violation_window=settings.violation_window)

    @property
    def session_limited(self) -> bool:
        """Whether any limit is on (when none is, the session skips the checks)."""
        return bool(self.publish_messages_per_second or self.publish_bytes_per_second
                    or self.requests_per_second)

    def as_dict(self) -> dict[str, Any]:
        """The limits as the welcome tells them."""
        return {key: getattr(self, key) for key in RATE_KEYS}


def _most_generous_rate(values: list[float]) -> float:
    return 0.0 if 0 in values else max(values)


def most_generous(rates: Iterable[Rates]) -> Rates:
    """The limits of a principal with several roles: for each key, the most generous of the
    roles' values (a rate of 0, no limit, beats any other; then the highest rate and the
    largest burst; the most violations, in the shortest window). So a role only ever adds to
    what a principal may do, whatever the order its roles are listed in."""
    every = list(rates)
    if not every:
        raise ValueError("most_generous() of no rates")
    def rate(key: str) -> float:
        return _most_generous_rate([getattr(r, key) for r in every])

    def burst(key: str, rate_key: str) -> float:
        return max(getattr(r, key) for r in every) if rate(rate_key) else 0.0

    return Rates(
        publish_messages_per_second=rate("publish_messages_per_second"),
        publish_messages_burst=burst("publish_messages_burst", "publish_messages_per_second"),
        publish_bytes_per_second=rate("publish_bytes_per_second"),
        publish_bytes_burst=burst("publish_bytes_burst", "publish_bytes_per_second"),
        requests_per_second=rate("requests_per_second"),
        requests_burst=burst("requests_burst", "requests_per_second"),
        max_violations=max(r.max_violations for r in every),
        violation_window=min(r.violation_window for r in every))


class RateSettings(Protocol):
    """What SessionLimits needs of the configuration (mqbroker.config.LimitsConfig)."""

    @property
    def publish_messages_per_second(self) -> float: ...
    @property
    def publish_messages_burst(self) -> float: ...
    @property
    def publish_bytes_per_second(self) -> float: ...
    @property
    def publish_bytes_burst(self) -> float: ...
    @property
    def requests_per_second(self) -> float: ...
    @property
    def requests_burst(self) -> float: ...
    @property
    def max_violations(self) -> int: ...
    @property
    def violation_window(self) -> float: ...
