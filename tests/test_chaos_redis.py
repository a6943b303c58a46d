"""Redis killed and its pub/sub connections dropped under load, two instances: no acknowledged
message is lost without a Gap before it, for any kind of subscriber (issue 9, item 1).

bench/chaos_redis.py runs the same harness (tests/chaos.py) with 10 or more faults of each kind.
"""

from __future__ import annotations

from pathlib import Path

from tests.chaos import run_chaos, table
from tests.redis_server import RedisServer


async def test_kills_under_load_lose_nothing_silently(
        tmp_path: Path, redis_server: RedisServer) -> None:
    """Three kill -9s of Redis (restarted empty) and two pub/sub disconnects while a publisher
    on A streams to subscribers on B: every acknowledged message is delivered or covered by a
    Gap, for exact recorded, exact unrecorded and wildcard subscriptions alike."""
    faults = ["kill", "pubsub-kill", "kill", "pubsub-kill", "kill"]
    rows, published = await run_chaos(tmp_path, redis_server, faults, spacing=0.7)
    print(table(rows))
    for row in rows:
        assert row.acknowledged > 0 and row.delivered > 0, table(rows)
        assert row.lost_silently == 0, table(rows)
    assert sum(published.refused.values()) > 0  # the faults were felt by the publisher
