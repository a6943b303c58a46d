"""The only module that imports redis: redis-py's sync client driven from trio on worker threads.

redis-py has no trio support, so commands run on worker threads (`RedisBridge.run`), one hop
per batch of work, and pub/sub is read by one dedicated thread (`PubSubReceiver`) that hands
what it drains to trio a batch at a time. redis' exceptions end here: they leave as
`RedisUnavailable`, which is a `HistoryUnavailable`, a `FanoutUnavailable` and a
`StoreUnavailable` (the session registry's).
"""

from __future__ import annotations

import queue
import random
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any, TypeVar

import redis
import redis.backoff
import redis.exceptions
import redis.retry
import trio
from attrs import define, field

from mqbroker.fanout import FanoutOutcomeUnknown, FanoutUnavailable
from mqbroker.history import HistoryUnavailable
from mqbroker.sessions import StoreUnavailable

from .channels import (
    Arrived,
    Confirmed,
    Connected,
    Disconnected,
    Kind,
    Received,
    Subscription,
)
from .scripts import SCRIPTS, Arg, ScriptName
from .settings import RedisSettings

T = TypeVar("T")

#: The longest a pub/sub read blocks before the thread looks at its stop flag and its queue
#: again. A wake-up message (see `RedisFanout`) usually ends the wait far sooner.
POLL_SECONDS = 1.0
#: The most pub/sub messages handed to trio in one batch.
RECEIVE_BATCH = 1000
#: Channels or patterns per SUBSCRIBE / PSUBSCRIBE when re-subscribing everything.
SUBSCRIBE_CHUNK = 1000
#: Keys per SCAN step and per DEL.
SCAN_COUNT = 1000
FIRST_RETRY_DELAY = 0.05


class RedisUnavailable(HistoryUnavailable, FanoutUnavailable, StoreUnavailable):
    """Redis could not be reached or refused the command: the operation did not complete.
    Each extension point's own error, so that callers need not know this plugin."""


class RedisOutcomeUnknown(RedisUnavailable, FanoutOutcomeUnknown):
    """A script was sent whole, then the connection failed or timed out before its answer: it
    may have run (Redis paused by SIGSTOP runs it when it resumes). Issue 9, item 3."""


#: Per thread: whether the script call under way has been sent whole (see `_SentMarking`).
_sent = threading.local()
_SCRIPT_COMMANDS = frozenset({"EVALSHA", "EVAL"})


class _SentMarking:
    """Mixed into the pool's connection class: notes, per thread, that a script command left
    completely. A failure before that point means Redis never ran it (an incomplete command
    dies with its connection); one after it leaves the outcome unknown."""

    def send_command(self, *args: Any, **kwargs: Any) -> None:
        super().send_command(*args, **kwargs)  # type: ignore[misc]
        if args and str(args[0]).upper() in _SCRIPT_COMMANDS:
            _sent.script = True


def _marking(connection_class: type[Any]) -> type[Any]:
    return type(f"SentMarking{connection_class.__name__}", (_SentMarking, connection_class), {})


@contextmanager
def script_errors() -> Iterator[None]:
    """translated_errors for one script call: RedisOutcomeUnknown when the call failed after
    the script was sent whole and without an answer from Redis."""
    _sent.script = False
    try:
        yield
    except redis.exceptions.ResponseError as error:  # Redis answered: it did not run it
        raise RedisUnavailable(f"redis: {error or type(error).__name__}") from error
    except redis.exceptions.RedisError as error:
        message = f"redis: {error or type(error).__name__}"
        if getattr(_sent, "script", False):
            raise RedisOutcomeUnknown(f"{message} (the script may have run)") from error
        raise RedisUnavailable(message) from error


@contextmanager
def translated_errors() -> Iterator[None]:
    """Turn redis' exceptions into RedisUnavailable: the one place that knows them."""
    try:
        yield
    except redis.exceptions.RedisError as error:
        raise RedisUnavailable(f"redis: {error or type(error).__name__}") from error


def _connection_options(settings: RedisSettings) -> dict[str, Any]:
    # No retries inside redis-py: the plugin owns the retry policy (backoff, publish_timeout).
    return {
        "socket_connect_timeout": settings.connect_timeout,
        "socket_timeout": settings.socket_timeout,
        "retry": redis.retry.Retry(redis.backoff.NoBackoff(), 0),
    }


@define(eq=False)
class RedisBridge:
    """A pooled client, its scripts, and the worker threads that run them for trio.

    The `*_sync` methods run on a worker thread (`run` puts them there; the pub/sub thread
    calls them directly). Each raises RedisUnavailable on any Redis failure.
    """

    settings: RedisSettings
    _client: Any
    _scripts: dict[ScriptName, Any]
    _limiter: trio.CapacityLimiter

    @classmethod
    def open(
        cls, settings: RedisSettings, scripts: Mapping[ScriptName, str] = SCRIPTS
    ) -> RedisBridge:
        """A bridge to `settings.url` running `scripts` (the history's and fan-out's by
        default); connects lazily, so it opens with Redis down too."""
        # Blocking: a command waits (up to connect_timeout) for a free connection.
        pool = redis.BlockingConnectionPool.from_url(
            settings.url,
            max_connections=settings.pool_size,
            timeout=settings.connect_timeout,
            **_connection_options(settings),
        )
        pool.connection_class = _marking(pool.connection_class)
        client = redis.Redis(connection_pool=pool)
        registered = {name: client.register_script(lua) for name, lua in scripts.items()}
        return cls(settings, client, registered, trio.CapacityLimiter(settings.pool_size))

    def close(self) -> None:
        self._client.close()
        self._client.connection_pool.disconnect()

    async def run(self, call: Callable[[], T]) -> T:
        """`call()` on a worker thread: one hop there and back.

        A cancel (a caller's deadline, a shutdown) returns at once and leaves the thread to
        finish on its own, its result dropped: the caller treats that as an answer that never
        came (the call may still be carried out). Waiting for it instead held every deadline
        up to socket_timeout, and a shutdown with Redis hung for socket_timeout per call."""
        return await trio.to_thread.run_sync(call, limiter=self._limiter,
                                             abandon_on_cancel=True)

    async def command(self, *args: Arg) -> Any:
        return await self.run(lambda: self.command_sync(*args))

    async def script(self, name: ScriptName, args: Sequence[Arg]) -> Any:
        return await self.run(lambda: self.script_sync(name, args))

    async def load_scripts(self) -> None:
        """Load the scripts now rather than on the first call; raises RedisUnavailable."""
        await self.run(self.load_scripts_sync)

    def load_scripts_sync(self) -> None:
        """SCRIPT LOAD every script, so the first EVALSHA finds it (a NOSCRIPT reloads too)."""
        with translated_errors():
            for script in self._scripts.values():
                script.sha = self._client.script_load(script.script)

    def command_sync(self, *args: Arg) -> Any:
        with translated_errors():
            return self._client.execute_command(*args)

    def script_sync(self, name: ScriptName, args: Sequence[Arg]) -> Any:
        # redis-py's Script runs EVALSHA and, on NOSCRIPT (a restarted Redis), loads it again.
        with script_errors():
            return self._scripts[name](keys=[], args=args)

    def scripts_sync(self, name: ScriptName, calls: Sequence[Sequence[Arg]]) -> list[Any]:
        """Several calls of one script in one pipeline (one round trip)."""
        if not calls:
            return []
        with translated_errors():
            pipeline = self._client.pipeline(transaction=False)
            for args in calls:
                self._scripts[name](keys=[], args=args, client=pipeline)
            return list(pipeline.execute())

    def scan_sync(self, match: bytes) -> list[bytes]:
        with translated_errors():
            return list(self._client.scan_iter(match=match, count=SCAN_COUNT))

    def delete_sync(self, keys: Sequence[bytes]) -> int:
        deleted = 0
        with translated_errors():
            for start in range(0, len(keys), SCAN_COUNT):
                deleted += self._client.delete(*keys[start : start + SCAN_COUNT])
        return deleted

    def receiver(self, home: bytes) -> PubSubReceiver:
        """A pub/sub receiver on its own connection, always subscribed to `home`."""
        options = _connection_options(self.settings)
        pool = redis.ConnectionPool.from_url(self.settings.url, **options)
        client = redis.Redis(connection_pool=pool)
        return PubSubReceiver(settings=self.settings, client=client, home=home)


#: The thread's way into trio: hands a batch over and returns once trio has taken it.
HandOver = Callable[[list[Received]], None]
#: Called on the thread once a new connection's subscriptions are live; returns what was
#: recorded while the connection was down.
Refill = Callable[[], list[Received]]


@define(eq=False, kw_only=True)
class PubSubReceiver:
    """One pub/sub connection, owned by one worker thread: redis-py's PubSub is not thread-safe,
    so trio never touches it and asks for (un)subscriptions through `want`.

    `run` is the thread's body: connect, subscribe everything wanted, wait for Redis to confirm
    it, refill, then hand every batch it drains to trio in the order Redis sent it; on any
    failure report `Disconnected`, back off (exponential, with jitter) and start over.
    """

    settings: RedisSettings
    client: Any
    home: bytes
    #: Data messages received on topic channels (the home channel's are not counted).
    received: int = 0
    #: Pub/sub connections made (the first one included).
    connections: int = 0
    # Failed connection attempts since the last connection that went live.
    _failures: int = 0
    _lock: threading.Lock = field(factory=threading.Lock)
    # Subscriptions to restore on a new connection; dict for its insertion order.
    _wanted: dict[Subscription, None] = field(factory=dict)
    _commands: queue.SimpleQueue[tuple[Subscription, bool]] = field(factory=queue.SimpleQueue)
    _stopping: threading.Event = field(factory=threading.Event)
    _reconnect: threading.Event = field(factory=threading.Event)

    def want(self, subscription: Subscription, active: bool) -> None:
        """Ask for a (p)subscribe or a (p)unsubscribe; thread-safe, returns at once."""
        with self._lock:
            if active:
                self._wanted[subscription] = None
            else:
                self._wanted.pop(subscription, None)
            self._commands.put((subscription, active))

    def request_reconnect(self) -> None:
        self._reconnect.set()

    def stop(self) -> None:
        """Ask `run` to return (within POLL_SECONDS; at once if woken by a message)."""
        self._stopping.set()

    def run(self, hand_over: HandOver, refill: Refill) -> None:
        while not self._stopping.is_set():
            try:
                self._connection(hand_over, refill)
            except RedisUnavailable as error:
                hand_over([Disconnected(str(error))])
                self._failures += 1
                self._stopping.wait(self._backoff())
        self.client.connection_pool.disconnect()

    def _backoff(self) -> float:
        """Exponential from FIRST_RETRY_DELAY up to reconnect_max_delay, with jitter so that
        many instances do not reconnect in step after an outage."""
        exponent = self._failures - 1
        delay = min(self.settings.reconnect_max_delay, FIRST_RETRY_DELAY * 2.0**exponent)
        return delay * random.uniform(0.5, 1.0)

    def _connection(self, hand_over: HandOver, refill: Refill) -> None:
        """One connection's life; returns when stopping, raises RedisUnavailable on failure."""
        pubsub = self.client.pubsub()
        try:
            with translated_errors():
                held = self._subscribe_all(pubsub)
            self.connections += 1
            self._failures = 0
            # Refilled messages were recorded before anything held here was published.
            hand_over([Connected(), *refill(), *held])
            while not self._stopping.is_set():
                if self._reconnect.is_set():
                    self._reconnect.clear()
                    raise RedisUnavailable("the pub/sub probe was lost; reconnecting")
                with translated_errors():
                    batch, failure = self._drain(pubsub)
                    if failure is None:
                        self._send_commands(pubsub)
                if batch:
                    hand_over(batch)
                if failure is not None:
                    # Raised only now: what arrived before the connection broke is delivered.
                    raise RedisUnavailable(f"redis: {failure or type(failure).__name__}"
                                           ) from failure
        finally:
            self._close(pubsub)

    def _subscribe_all(self, pubsub: Any) -> list[Received]:
        """Subscribe the home channel and everything wanted; return what arrived up to the
        last confirmation, in order."""
        with self._lock:
            wanted = [Subscription(Kind.CHANNEL, self.home), *self._wanted]
            # The snapshot already holds what the queued commands asked for.
            while not self._commands.empty():
                self._commands.get_nowait()
        for kind in Kind:
            names = [s.name for s in wanted if s.kind is kind]
            for start in range(0, len(names), SUBSCRIBE_CHUNK):
                _subscribe(pubsub, kind, names[start : start + SUBSCRIBE_CHUNK], True)
        return self._until_confirmed(pubsub, len(wanted))

    def _until_confirmed(self, pubsub: Any, expected: int) -> list[Received]:
        held: list[Received] = []
        deadline = time.monotonic() + self.settings.socket_timeout
        while expected > 0:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise RedisUnavailable("redis did not confirm the subscriptions in time")
            message = pubsub.get_message(timeout=remaining)
            item = self._item(message) if message is not None else None
            if isinstance(item, Confirmed) and item.active:
                expected -= 1
            if item is not None:
                held.append(item)
        return held

    def _drain(self, pubsub: Any) -> tuple[list[Received], redis.exceptions.RedisError | None]:
        """What the connection holds (up to RECEIVE_BATCH), and the error that ended the read
        if it broke: the messages read before the break must still be handed over (they were
        lost with the batch before, and a refill from a restarted Redis cannot bring them)."""
        batch: list[Received] = []
        try:
            message = pubsub.get_message(timeout=POLL_SECONDS)
            while message is not None:
                item = self._item(message)
                if item is not None:
                    batch.append(item)
                if len(batch) >= RECEIVE_BATCH:
                    break
                message = pubsub.get_message(timeout=0)
        except redis.exceptions.RedisError as error:
            if not batch:
                raise
            return batch, error
        return batch, None

    def _send_commands(self, pubsub: Any) -> None:
        while not self._commands.empty():
            subscription, active = self._commands.get_nowait()
            _subscribe(pubsub, subscription.kind, [subscription.name], active)

    def _item(self, message: dict[str, Any]) -> Received | None:
        kind = message["type"]
        if kind == "message" or kind == "pmessage":
            channel = message["channel"]
            if channel != self.home:
                self.received += 1
            return Arrived(channel, message["pattern"], message["data"])
        if kind in _CONFIRMATIONS:
            subscribed_kind, active = _CONFIRMATIONS[kind]
            return Confirmed(Subscription(subscribed_kind, message["channel"]), active)
        return None

    @staticmethod
    def _close(pubsub: Any) -> None:
        try:
            pubsub.close()
        except (redis.exceptions.RedisError, OSError):
            pass  # the connection is being dropped anyway


_CONFIRMATIONS = {
    "subscribe": (Kind.CHANNEL, True),
    "unsubscribe": (Kind.CHANNEL, False),
    "psubscribe": (Kind.PATTERN, True),
    "punsubscribe": (Kind.PATTERN, False),
}


def _subscribe(pubsub: Any, kind: Kind, names: Sequence[bytes], active: bool) -> None:
    if not names:
        return
    if kind is Kind.CHANNEL:
        (pubsub.subscribe if active else pubsub.unsubscribe)(*names)
    else:
        (pubsub.psubscribe if active else pubsub.punsubscribe)(*names)
