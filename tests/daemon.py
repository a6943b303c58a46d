"""Running `python -m mqbroker serve` as a real process, for tests that need one."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import attrs
import trio


@attrs.define(eq=False)
class Daemon:
    process: trio.Process
    port: int
    lines: list[dict[str, Any]]

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/"


async def _read_lines(stream: trio.abc.ReceiveStream) -> AsyncIterator[dict[str, Any]]:
    buffer = b""
    async for chunk in stream:
        buffer += chunk
        *lines, buffer = buffer.split(b"\n")
        for line in lines:
            if line.strip():
                try:
                    yield json.loads(line)
                except ValueError:  # not a log line: a traceback, say; kept for the test to see
                    yield {"event": None, "raw": line.decode("utf-8", "replace")}


@asynccontextmanager
async def running_daemon(config: Path | None = None, *args: str,
                         env: dict[str, str] | None = None, **options: Any
                         ) -> AsyncIterator[Daemon]:
    """Start the daemon on an ephemeral port, collecting its JSON log lines (stderr).

    `options` go to subprocess.Popen (a `preexec_fn` setting a resource limit, say)."""
    command: Sequence[str] = [sys.executable, "-m", "mqbroker", "serve", "--port", "0", *args]
    if config is not None:
        command = [*command, "--config", str(config)]
    process = await trio.lowlevel.open_process(command, stderr=subprocess.PIPE, env=env,
                                                  **options)
    assert process.stderr is not None
    lines: list[dict[str, Any]] = []
    try:
        async with trio.open_nursery() as nursery:
            started = trio.Event()
            port = 0

            async def collect() -> None:
                nonlocal port
                assert process.stderr is not None
                async for line in _read_lines(process.stderr):
                    lines.append(line)
                    if line.get("event") == "broker.started":
                        port = line["port"]
                        started.set()

            nursery.start_soon(collect)
            with trio.fail_after(15):
                await started.wait()
            yield Daemon(process, port, lines)
            nursery.cancel_scope.cancel()
    finally:
        if process.returncode is None:
            process.kill()
        with trio.move_on_after(5, shield=True):
            await process.wait()
