"""Private redis-server processes for tests and benchmarks: started, stopped, restarted at will.

Each server listens on a free port of 127.0.0.1 with persistence off (`--save "" --appendonly no`)
and works in its own temporary directory, so a restart is an empty Redis (a new epoch) on the
same port. Never the shared server on 6379. A missing `redis-server` binary is an error that
says how to install it: a test that needs Redis must fail loudly, never skip.
"""

from __future__ import annotations

import ctypes
import os
import selectors
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from types import TracebackType
from typing import IO

from attrs import define, field

#: What redis-server prints once it accepts connections.
READY_LINE = b"Ready to accept connections"
START_TIMEOUT = 10.0
STOP_TIMEOUT = 10.0
#: prctl(2) option: the signal a child gets when its parent dies.
PR_SET_PDEATHSIG = 1


class RedisServerError(RuntimeError):
    """The redis-server binary is missing or the server did not start."""


def redis_server_binary() -> str:
    """The path of `redis-server`; raises RedisServerError saying how to install it."""
    found = shutil.which("redis-server")
    if found is None:
        raise RedisServerError(
            "redis-server not found on PATH: install it: apt-get install redis-server"
        )
    return found


def free_port() -> int:
    """A TCP port of 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


@define
class RedisServer:
    """One redis-server process on a fixed port; `start`, `stop` and `restart` it at will."""

    port: int = field(factory=free_port)
    _directory: tempfile.TemporaryDirectory[str] = field(
        factory=lambda: tempfile.TemporaryDirectory(prefix="mqb-redis-"), init=False
    )
    _process: subprocess.Popen[bytes] | None = field(default=None, init=False)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def start(self) -> None:
        """Start the server and return once it accepts connections."""
        if self.running:
            return
        command = [
            redis_server_binary(),
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--save", "",
            "--appendonly", "no",
            "--dir", self._directory.name,
            "--logfile", "",
        ]  # fmt: skip
        # Unbuffered bytes: the readiness wait selects on the pipe itself, so nothing may sit
        # unseen in a Python-side buffer.
        self._process = subprocess.Popen(
            command,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            bufsize=0,
            preexec_fn=_die_with_parent,
        )
        self._wait_ready(self._process)

    def stop(self) -> None:
        """Stop the server (SIGTERM, then wait for the process to end)."""
        process, self._process = self._process, None
        if process is None:
            return
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()

    def pause(self) -> None:
        """SIGSTOP the server: it keeps its connections but answers nothing until `resume`."""
        assert self._process is not None
        self._process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        """SIGCONT a paused server: it then runs what it was sent meanwhile."""
        assert self._process is not None
        self._process.send_signal(signal.SIGCONT)

    def kill(self) -> None:
        """SIGKILL the server (no shutdown, no save) and wait for it to end."""
        process, self._process = self._process, None
        if process is not None:
            process.kill()
            process.wait()

    def restart(self) -> None:
        """Stop, then start an empty server on the same port."""
        self.stop()
        self.start()

    def close(self) -> None:
        """Stop the server and remove its directory."""
        self.stop()
        self._directory.cleanup()

    def __enter__(self) -> RedisServer:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def _wait_ready(self, process: subprocess.Popen[bytes]) -> None:
        # Read the server's own log until it says it is ready: an event, not a polling loop.
        assert process.stdout is not None
        deadline = time.monotonic() + START_TIMEOUT
        log = b""
        with selectors.DefaultSelector() as selector:
            selector.register(process.stdout, selectors.EVENT_READ)
            while (remaining := deadline - time.monotonic()) > 0:
                if not selector.select(remaining):
                    break
                chunk = os.read(process.stdout.fileno(), 65536)
                if not chunk:
                    break
                log += chunk
                if READY_LINE in log:
                    _drain_in_background(process.stdout)
                    return
        self.stop()
        process.stdout.close()
        tail = "\n".join(log.decode(errors="replace").splitlines()[-20:]) or "(no output)"
        raise RedisServerError(f"redis-server on port {self.port} did not start:\n{tail}")


def _die_with_parent() -> None:
    # Linux: the server gets SIGTERM when the test process dies, even by SIGKILL, so no
    # redis-server outlives an interrupted test run.
    if sys.platform == "linux":
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def _drain_in_background(stream: IO[bytes]) -> None:
    # The log pipe must keep being read, or a chatty server blocks on a full pipe; the reader
    # closes it at EOF (the process ended).
    def drain() -> None:
        with stream:
            while os.read(stream.fileno(), 65536):
                pass

    threading.Thread(target=drain, daemon=True, name="redis-server-log").start()
