"""The daemon as users run it: a real process, stopped by a signal."""

from __future__ import annotations

import signal
import socket
import sys
from pathlib import Path

import pytest
import trio

from mqbroker.protocol import CloseCode, SubAck, Subscribe
from tests.daemon import running_daemon
from tests.harness import raw_session


async def test_sigterm_closes_sessions_with_1001_and_exits_0() -> None:
    """On SIGTERM the broker stops accepting, closes every session with 1001 and exits 0."""
    async with running_daemon() as daemon, raw_session(daemon.url) as session:
        await session.send(Subscribe(id=1, filter="#"))
        assert isinstance(await session.next_event(), SubAck)
        daemon.process.send_signal(signal.SIGTERM)
        assert await session.closed_with() == CloseCode.GOING_AWAY
        with trio.fail_after(10):
            assert await daemon.process.wait() == 0
        events = [line["event"] for line in daemon.lines]
        assert "broker.stopping" in events


async def test_sigint_stops_the_broker_too() -> None:
    """SIGINT (Ctrl-C) is a graceful shutdown as well, exiting 0."""
    async with running_daemon() as daemon:
        daemon.process.send_signal(signal.SIGINT)
        with trio.fail_after(10):
            assert await daemon.process.wait() == 0


async def test_logs_are_json_lines_with_session_fields() -> None:
    """Off a TTY the log is JSON lines; lines about a session carry its id and peer."""
    async with running_daemon() as daemon:
        async with raw_session(daemon.url):
            pass
        daemon.process.send_signal(signal.SIGTERM)
        with trio.fail_after(10):
            await daemon.process.wait()
        opened = [line for line in daemon.lines if line["event"] == "session.opened"]
        assert opened and {"session", "peer", "level", "timestamp"} <= opened[0].keys()


async def test_new_connections_are_refused_after_shutdown() -> None:
    """Once stopped, the port no longer accepts sessions."""
    async with running_daemon() as daemon:
        daemon.process.send_signal(signal.SIGTERM)
        with trio.fail_after(10):
            await daemon.process.wait()
    with pytest.raises(OSError):
        await trio.open_tcp_stream("127.0.0.1", daemon.port)


@pytest.mark.parametrize("where", ["server", "metrics"])
async def test_a_taken_port_is_one_clear_line_and_exit_2(tmp_path: Path, where: str) -> None:
    """A port already in use stops the start with `cannot listen on HOST:PORT: ...` and exit
    code 2, no traceback: like a bad config, it is the operator's to fix."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        args = ["--port", str(port)]
        if where == "metrics":
            config = tmp_path / "config.toml"
            config.write_text(f"[metrics]\nport = {port}\n")
            args = ["--port", "0", "--config", str(config)]
        with trio.fail_after(20):
            result = await trio.run_process([sys.executable, "-m", "mqbroker", "serve", *args],
                                            capture_stderr=True, check=False)
    assert result.returncode == 2
    last = result.stderr.decode().strip().splitlines()[-1]
    assert last == f"mqbroker: cannot listen on 127.0.0.1:{port}: Address already in use"
    assert "Traceback" not in result.stderr.decode()
