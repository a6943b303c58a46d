"""The daemon: the broker, its listener and its HTTP endpoints, run until SIGINT or SIGTERM."""

from __future__ import annotations

import gc
import secrets
import signal

import structlog
import trio

from mqbroker.broker import open_broker
from mqbroker.config import Config
from mqbroker.server.listener import Listener, serve
from mqbroker.server.presence import open_presence
from mqbroker.server.registry import open_registry

logger = structlog.get_logger("mqbroker")


#: Allocations between two young-generation collections (CPython's default is 700). Every
#: message allocates a few dozen short-lived containers; collecting ten times less often cut the
#: broker's CPU per paced delivery by about a sixth (docs/performance.md), and a young
#: generation of this size is still collected in well under a millisecond.
GC_YOUNG_THRESHOLD = 7000


def _tune_gc() -> None:
    """Once started: what exists now (code, config, plugins) lives as long as the process, so
    the collector need never scan it again; and young collections run less often."""
    gc.collect()
    gc.freeze()
    _, older, oldest = gc.get_threshold()
    gc.set_threshold(GC_YOUNG_THRESHOLD, older, oldest)


async def run(config: Config, *,
              task_status: trio.TaskStatus[Listener] = trio.TASK_STATUS_IGNORED) -> None:
    """Serve until SIGINT or SIGTERM, then shut down gracefully (sessions closed with 1001)."""
    instance_id = config.server.instance_id or secrets.token_hex(4)
    log = logger.bind(instance=instance_id)
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        # Presence before the listener: no subscription goes untracked; and after it, so that
        # the leaves of the connections a shutdown closes are written and published.
        async with open_broker(config, instance_id) as broker, \
                open_registry(broker, config), open_presence(broker, config), \
                trio.open_nursery() as nursery:
            listener: Listener = await nursery.start(serve, broker, config.server)
            _tune_gc()
            if config.metrics.port:
                from mqbroker.server.http import serve_http

                await nursery.start(serve_http, broker, config.metrics)
            log.info("broker.started", host=config.server.host, port=listener.port,
                     history=config.history.plugin, fanout=config.fanout.plugin,
                     auth=config.auth.mode, sessions=config.sessions.plugin)
            task_status.started(listener)
            async for signum in signals:
                log.info("broker.stopping", signal=signal.Signals(signum).name,
                         grace=config.server.shutdown_grace)
                break
            await listener.shutdown()
            nursery.cancel_scope.cancel()
    log.info("broker.stopped")
