"""The Redis plugin's log lines never show the password of its URL, whatever renders them.

The server here asks for a password (`requirepass`, set once it runs, and again after a
restart), so the plugin really connects with the URL's credentials.
"""

from __future__ import annotations

import io

import attrs
import redis
import structlog
import trio
from structlog.testing import capture_logs

from mqbroker.config import HistoryConfig, LogConfig
from mqbroker.logs import configure
from mqbroker_plugins.redis import RedisSettings, open_redis_history
from tests.redis_fixtures import open_instance, redis_server, settings_for
from tests.redis_server import RedisServer, free_port
from tests.test_redis_faults import until_health

__all__ = ["redis_server"]  # a fixture used by name below

PASSWORD = "s3cret-pw"


def require_password(server: RedisServer) -> None:
    with redis.Redis.from_url(server.url) as client:
        client.config_set("requirepass", PASSWORD)


def with_password(url: str) -> str:
    return url.replace("redis://", f"redis://:{PASSWORD}@", 1)


async def test_degraded_and_recovered_show_no_password(redis_server: RedisServer) -> None:
    """fanout.degraded and fanout.recovered name the server as redis://:***@host:port/db, in
    the configured log lines and in the event itself (what any renderer gets)."""
    require_password(redis_server)
    settings = settings_for(redis_server)
    settings = attrs.evolve(settings, url=with_password(settings.url))
    out = io.StringIO()
    configure(LogConfig(format="json"), stream=out)
    try:
        with capture_logs() as events:
            # capture_logs replaces the processors: this sees the fields as the plugin gave them.
            async with open_instance(settings, "a") as a:
                await trio.to_thread.run_sync(redis_server.stop)
                await until_health(a.fanout, ok=False)
                await trio.to_thread.run_sync(redis_server.start)
                await trio.to_thread.run_sync(require_password, redis_server)
                await until_health(a.fanout, ok=True)
        async with open_instance(settings, "b") as b:
            await trio.to_thread.run_sync(redis_server.stop)
            await until_health(b.fanout, ok=False)
    finally:
        structlog.reset_defaults()
    names = [event["event"] for event in events if event["event"].startswith("fanout.")]
    assert names == ["fanout.degraded", "fanout.recovered"]
    assert PASSWORD not in repr(events)
    shown = f"redis://:***@127.0.0.1:{redis_server.port}/0"
    assert [event["url"] for event in events if event["event"].startswith("fanout.")] == [
        shown, shown]
    assert "fanout.degraded" in out.getvalue() and shown in out.getvalue()
    assert PASSWORD not in out.getvalue()


async def test_redis_unreachable_at_open_shows_no_password() -> None:
    """history.redis_unreachable (Redis down when the store opens) masks the password."""
    url = with_password(f"redis://127.0.0.1:{free_port()}/0")
    settings = RedisSettings(url=url)
    with capture_logs() as events:
        async with open_redis_history(settings, HistoryConfig()):
            pass
    [event] = [e for e in events if e["event"] == "history.redis_unreachable"]
    assert event["url"] == url.replace(PASSWORD, "***")
    assert PASSWORD not in repr(events)
