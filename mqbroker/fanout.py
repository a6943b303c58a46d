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
    - A draft whose (topic, msg_id) was published within `dedup_window` returns the original
      message and is not delivered again.
    - `watch(filter)` returns once messages matching `filter` published from then on are
      certain to reach this instance's `deliver`; `unwatch` undoes one `watch`
      (watches are counted: two watches of one filter need two unwatches).
    - `publish` raises `FanoutUnavailable` when the message cannot be carried; a message
      whose publish returned is never lost by the fan-out.
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
