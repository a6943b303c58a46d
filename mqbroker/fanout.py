"""The fan-out extension point: carries each published message to every broker instance.

Pure: the contract only. The in-process fan-out is in `mqbroker_plugins.memory`; the Redis one,
which bridges instances, in `mqbroker_plugins.redis`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import ClassVar, Protocol

from attrs import frozen

from mqbroker.history import HistoryStore
from mqbroker.message import Draft, Message

#: Hands messages to this instance's matching sessions. Never blocks and never raises.
Deliver = Callable[[Sequence[Message]], None]
#: Tells the broker that live delivery of these watched filters to this instance may have
#: been interrupted: their subscriptions may have missed messages that `deliver` will never
#: bring. Called in stream order (after every message delivered before the interruption and
#: before any delivered after it). Never blocks and never raises.
Interrupted = Callable[[Sequence[str]], None]


def _nobody_told(filters: Sequence[str]) -> None:
    """The default for fan-outs opened outside a broker (tests, benchmarks)."""


@frozen(kw_only=True)
class FanoutContext:
    """What the broker gives a fan-out when it opens it."""

    #: This broker instance's id (unique per process run).
    instance_id: str
    #: The history store that records drafts whose `record` is set.
    history: HistoryStore
    #: Called with every message that reaches this instance, its own publishes included:
    #: there is one delivery path, single-instance too.
    deliver: Deliver
    #: A repeat of (topic, msg_id) within this many seconds is not delivered again.
    dedup_window: float
    #: Bounds of the (topic, msg_id) pairs an instance remembers for that, where it keeps them.
    dedup_max_entries: int = 100_000
    dedup_max_bytes: int = 64 * 1024 * 1024
    #: Called with the watched filters whose live delivery may have been interrupted.
    interrupted: Interrupted = _nobody_told


@frozen(kw_only=True)
class Health:
    ok: bool
    detail: str = ""


class Fanout(Protocol):
    """Publishes messages so that every instance's matching sessions receive them.

    Contract (tests/contract/test_fanout_contract.py checks it for every backend):
    - `publish` positions the drafts (recorded ones through the history store, in one atomic
      step with their fan-out where the backend allows), hands them to `deliver` on every
      instance that watches a matching filter, and returns them in draft order.
      Every instance sees one topic's messages in the same order, and that order agrees with
      the history's positions.
    - A draft whose (topic, msg_id) was published within `dedup_window` is not delivered
      again; it returns a message with the original's position (so its event id), whose other
      fields may be the repeat's own: a backend need not keep payloads to recognise a repeat
      (the broker answers it with the event id only). A repeat within one publish returns the
      first draft's message itself.
    - `watch(filter)` returns once messages matching `filter` published from then on are
      certain to reach this instance's `deliver`; `unwatch` undoes one `watch`
      (watches are counted: two watches of one filter need two unwatches).
    - `publish` raises `FanoutUnavailable` when the message cannot be carried (nothing was
      published), and `FanoutOutcomeUnknown` when it may or may not have been (a timeout
      after the backend got it). A message whose publish returned is never lost silently:
      either every watching instance's `deliver` gets it, or, when delivery to an instance
      may have been interrupted (its backend connection lost or dropped for lagging), that
      instance's `interrupted` is called with every watched filter that may have missed
      something and that the fan-out does not refill from the history itself.

    Stats: `stats()` values are running totals (exported as counters), except the names a
    class lists in an optional `STAT_GAUGES: ClassVar[frozenset[str]]`, which are levels
    (exported as gauges). The same holds for `HistoryStore.stats()`.
    """

    #: True when `publish` waits on no I/O (the in-process fan-out): sessions then publish
    #: inline, from the task that reads their frames. Otherwise each session pipelines its
    #: publishes through a task of its own, so that a round trip to the backend does not stop
    #: it reading (its publishes keep their order either way).
    local: ClassVar[bool]

    async def publish(self, drafts: Sequence[Draft]) -> Sequence[Message]: ...

    async def watch(self, filter: str) -> None: ...

    async def unwatch(self, filter: str) -> None: ...

    def health(self) -> Health: ...

    def stats(self) -> Mapping[str, int]: ...


class FanoutUnavailable(Exception):
    """The fan-out's backend cannot be reached; the publish did not happen."""


class FanoutOutcomeUnknown(FanoutUnavailable):
    """The publish may or may not have happened (the backend got it, then the answer was lost).
    A subclass, so code that only knows `FanoutUnavailable` still fails the publish; the
    broker answers `outcome_unknown` rather than `unavailable`, which promises nothing was done."""
