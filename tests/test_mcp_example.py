"""examples/mcp end to end: two MCP server instances (examples/mcp/server.py, the docs/mcp.md
recipe, each a uvicorn process), a broker (memory, and Redis on a private redis-server), and the
SDK's client (examples/mcp/client.py) whose tool call is cut after its k-th SSE event and resumed
with Last-Event-ID on the other instance. For every cut point, from right after the first event
(the priming one) to right before the response: every notification once, in order, and the
result."""

from __future__ import annotations

import importlib.util
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from types import ModuleType

import anyio
import attrs
import pytest
import trio

from mqbroker.client import connect
from mqbroker.config import HistoryConfig, ServerConfig, SessionsConfig
from tests.contract.backends import BACKENDS
from tests.harness import free_port, running_broker

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "mcp"
#: Ticks per call: cut points 1 (after the priming event) .. TICKS + 1 (before the response).
TICKS = 4
START_TIMEOUT = 30.0


def example_client() -> ModuleType:
    spec = importlib.util.spec_from_file_location("mcp_example_client", EXAMPLE / "client.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _start(port: int, broker_url: str) -> subprocess.Popen[bytes]:
    """One examples/mcp/server.py instance, its output in a temporary file (read on failure)."""
    return subprocess.Popen(
        [sys.executable, str(EXAMPLE / "server.py")],
        env={**os.environ, "PORT": str(port), "MQBROKER_URL": broker_url},
        stdout=tempfile.TemporaryFile(), stderr=subprocess.STDOUT)


def _wait_listening(port: int, process: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the MCP server on port {port} exited: {_output(process)}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"the MCP server on port {port} did not start in {START_TIMEOUT} s: "
                       f"{_output(process)}")


def _output(process: subprocess.Popen[bytes]) -> str:
    assert process.stdout is not None
    process.stdout.seek(0)
    return process.stdout.read()[-4000:].decode(errors="replace")


@asynccontextmanager
async def mcp_servers(broker_url: str, count: int = 2) -> AsyncIterator[list[str]]:
    """`count` instances of examples/mcp/server.py; yields their endpoint URLs."""
    async with mcp_server_processes(broker_url, count) as servers:
        yield [url for url, _ in servers]


@asynccontextmanager
async def mcp_server_processes(broker_url: str, count: int = 2
                               ) -> AsyncIterator[list[tuple[str, subprocess.Popen[bytes]]]]:
    """`count` instances of examples/mcp/server.py; yields their endpoint URLs and processes.
    (Waits in a thread: the broker they connect to runs in this test's trio loop.)"""
    processes: list[subprocess.Popen[bytes]] = []
    try:
        ports = [free_port() for _ in range(count)]
        for port in ports:
            processes.append(await trio.to_thread.run_sync(_start, port, broker_url))
        for port, process in zip(ports, processes, strict=True):
            await trio.to_thread.run_sync(_wait_listening, port, process)
        yield [(f"http://127.0.0.1:{port}/mcp", process)
               for port, process in zip(ports, processes, strict=True)]
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            await trio.to_thread.run_sync(_stopped, process)


def _stopped(process: subprocess.Popen[bytes]) -> None:
    try:
        process.wait(10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(10)


@asynccontextmanager
async def broker_of(backend_name: str, sessions: SessionsConfig | None = None
                    ) -> AsyncIterator[str]:
    backend = BACKENDS[backend_name]
    config = backend.broker_config(backend.broker_plugins(), HistoryConfig(),
                                   ServerConfig(port=0))
    if sessions is not None:
        config = attrs.evolve(config, sessions=sessions)
    async with running_broker(config, presence=True) as running:  # as the daemon serves
        yield running.url


@pytest.mark.parametrize("backend_name", sorted(BACKENDS))
async def test_a_cut_call_resumes_on_the_other_instance_with_no_loss_and_no_duplicate(
        backend_name: str) -> None:
    client = example_client()
    expected = [f"tick {i}" for i in range(1, TICKS + 1)]
    async with broker_of(backend_name) as broker_url:
        async with mcp_servers(broker_url) as (first, second):
            for cut_after in range(1, TICKS + 2):
                # A short delay between ticks: some are replayed, the rest followed live.
                call = partial(client.call_cut, first, second, cut_after=cut_after, n=TICKS,
                               delay=0.02)
                with trio.fail_after(60):
                    outcome = await trio.to_thread.run_sync(anyio.run, call)
                assert outcome.resumes == 1, cut_after
                assert outcome.ticks == expected, cut_after
                assert outcome.result == f"counted to {TICKS}", cut_after


def test_the_recipe_in_docs_mcp_md_is_the_example_and_adds_fewer_than_10_lines() -> None:
    """docs/mcp.md's recipe is the example the test above runs: each line it marks `# +` (the
    lines added to a plain MCPServer) is in examples/mcp/server.py, and there are fewer than 10;
    the example marks the same lines. README.md shows the same recipe."""
    docs = (EXAMPLE.parent.parent / "docs" / "mcp.md").read_text(encoding="utf-8")
    block = re.search(r"<!-- recipe: examples/mcp/server.py -->\n```python\n(.*?)```", docs,
                      re.DOTALL)
    assert block is not None, "docs/mcp.md lost its recipe block"
    added = [line for line in block[1].splitlines() if line.endswith("# +")]
    example = (EXAMPLE / "server.py").read_text(encoding="utf-8").splitlines()
    assert 0 < len(added) < 10
    assert added == [line for line in example if line.endswith("# +")]
    readme = (EXAMPLE.parent.parent / "README.md").read_text(encoding="utf-8")
    assert all(line in readme for line in added)


async def test_hostile_resumes_are_refused_or_answered_with_a_gap_and_harm_nobody() -> None:
    """Resumes an attacker can send to the resume route: another session's event id (404, as
    the SDK answers an unknown session), a forged anchor or sequence of a registered session
    (the gap error, not a crash), garbage ids (left to the SDK), a huge header. The servers
    keep serving calls."""
    import httpx2

    from mqbroker.mcp import GAP_ERROR_CODE, EventRef
    from mqbroker.mcp.registry import ANONYMOUS_USER

    client = example_client()
    async with broker_of("memory") as broker_url, mcp_servers(broker_url) as (first, second):
        async with connect(broker_url) as broker:  # s1: registered, with no owner named
            await broker.create_session(session="s1", user=ANONYMOUS_USER, state="active")

        async def attack() -> list[tuple[int, str]]:
            answers = []
            victim = EventRef("victim-session", "1", 3, None).encode()
            forged = EventRef("s1", "1", 2, "zz-not-an-id").encode()
            cases = [("someone-else", victim), ("s1", forged), ("s1", "garbage"),
                     ("s1", "a" * 60_000), ("s1", EventRef("s1", "1", 10**18, "0-0").encode())]
            async with httpx2.AsyncClient(timeout=10) as http:
                for session, last in cases:
                    response = await http.get(second, headers={
                        "accept": "text/event-stream", "mcp-session-id": session,
                        "last-event-id": last, "mcp-protocol-version": "2025-11-25"})
                    answers.append((response.status_code, response.text[:400]))
            return answers

        with trio.fail_after(60):
            answers = await trio.to_thread.run_sync(anyio.run, attack)
            outcome = await trio.to_thread.run_sync(anyio.run, partial(
                client.call_cut, first, second, cut_after=2, n=TICKS))
        assert answers[0][0] == 404  # another session's id: as the SDK answers
        assert answers[1][0] == 200 and str(GAP_ERROR_CODE) in answers[1][1]
        assert answers[2][0] == 404 and answers[3][0] in (404, 431)  # the SDK's: no session s1
        assert answers[4][0] == 200 and str(GAP_ERROR_CODE) in answers[4][1]
        assert outcome.ticks == [f"tick {i}" for i in range(1, TICKS + 1)]
