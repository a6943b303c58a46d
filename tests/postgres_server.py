"""Private PostgreSQL servers for tests and benchmarks, as tests/redis_server.py starts Redis.

Each server is a fresh cluster (`initdb`) in its own temporary directory, listening on a free
port of 127.0.0.1 and on a Unix socket in that directory, with durability off (fsync, full page
writes) since its data dies with it. Never the shared server on 5432. PostgreSQL refuses to
run as root: as root, the cluster belongs to the `postgres` system user and both `initdb` and
the server run as that user. A missing `initdb` is an error that says how to install it.
"""

from __future__ import annotations

import glob
import itertools
import os
import pwd
import selectors
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType
from typing import Any

from attrs import define, field

from tests.redis_server import _die_with_parent, _drain_in_background, free_port

READY_LINE = b"database system is ready to accept connections"
START_TIMEOUT = 60.0
STOP_TIMEOUT = 10.0
_databases = itertools.count()


class PostgresServerError(RuntimeError):
    """The PostgreSQL binaries are missing or the server did not start."""


def postgres_binary(name: str) -> str:
    """The path of `initdb` or `postgres`: on PATH, else the newest /usr/lib/postgresql/*/bin."""
    found = shutil.which(name)
    if found is None:
        candidates = sorted(
            glob.glob(f"/usr/lib/postgresql/*/bin/{name}"),
            key=lambda path: int(Path(path).parts[-3]) if Path(path).parts[-3].isdigit() else 0,
        )
        found = candidates[-1] if candidates else None
    if found is None:
        raise PostgresServerError(
            f"{name} not found on PATH nor under /usr/lib/postgresql/*/bin: install Debian's "
            "postgresql package (apt-get install postgresql)"
        )
    return found


def _run_as() -> dict[str, Any]:
    """Popen arguments that run a command as the `postgres` user when we are root."""
    if os.geteuid() != 0:
        return {}
    try:
        user = pwd.getpwnam("postgres")
    except KeyError as error:
        raise PostgresServerError(
            "running as root, and no 'postgres' user to run PostgreSQL as: install Debian's "
            "postgresql package (it creates the user), or run the tests as another user"
        ) from error
    return {"user": user.pw_uid, "group": user.pw_gid, "extra_groups": []}


@define
class PostgresServer:
    """One PostgreSQL cluster and server on a fixed port; `start` and `stop` it at will."""

    port: int = field(factory=free_port)
    _directory: str = field(factory=lambda: tempfile.mkdtemp(prefix="mqb-postgres-"), init=False)
    _process: subprocess.Popen[bytes] | None = field(default=None, init=False)

    @property
    def data(self) -> str:
        return os.path.join(self._directory, "data")

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def start(self) -> None:
        """Create the cluster on first start, start the server, return once it accepts
        connections."""
        if self.running:
            return
        run_as = _run_as()
        if run_as:
            os.chown(self._directory, run_as["user"], run_as["group"])
        if not os.path.exists(self.data):
            self._initdb(run_as)
        command = [
            postgres_binary("postgres"), "-D", self.data, "-p", str(self.port),
            "-k", self._directory, "-c", "listen_addresses=127.0.0.1",
            "-c", "fsync=off", "-c", "full_page_writes=off", "-c", "synchronous_commit=off",
            "-c", "max_connections=200", "-c", "shared_buffers=32MB",
        ]  # fmt: skip
        self._process = subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, bufsize=0,
            preexec_fn=_die_with_parent, **run_as,
        )  # fmt: skip
        self._wait_ready(self._process)

    def _initdb(self, run_as: dict[str, Any]) -> None:
        done = subprocess.run(
            [postgres_binary("initdb"), "-D", self.data, "-U", "postgres", "--auth=trust",
             "--encoding=UTF8", "--locale=C", "--no-sync"],
            capture_output=True, timeout=START_TIMEOUT, **run_as,
        )  # fmt: skip
        if done.returncode != 0:
            output = (done.stdout + done.stderr).decode(errors="replace")
            raise PostgresServerError(f"initdb failed:\n{output[-2000:]}")

    def stop(self) -> None:
        """Stop the server (a fast shutdown: SIGINT), waiting for it to end."""
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGINT)
        try:
            process.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    def pause(self) -> None:
        """SIGSTOP the server's every process: it keeps its connections but answers nothing
        (not even new connections) until `resume`."""
        for pid in self._pids():
            os.kill(pid, signal.SIGSTOP)

    def resume(self) -> None:
        """SIGCONT a paused server: it then runs what it was sent meanwhile."""
        for pid in self._pids():
            os.kill(pid, signal.SIGCONT)

    def _pids(self) -> list[int]:
        """The postmaster and its children (each backend is a session of its own: Linux's
        /proc tells them by their parent)."""
        assert self._process is not None
        postmaster = self._process.pid
        children = []
        for entry in os.listdir("/proc"):
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except (OSError, ValueError):
                continue  # not a process, or gone
            if entry.isdigit() and int(stat.rsplit(")", 1)[1].split()[1]) == postmaster:
                children.append(int(entry))
        return [postmaster, *children]

    def close(self) -> None:
        """Stop the server and remove its directory."""
        self.stop()
        shutil.rmtree(self._directory, ignore_errors=True)

    def create_database(self) -> str:
        """A new, empty database on this server; its URL."""
        import psycopg

        name = f"t{os.getpid()}_{next(_databases)}"
        with psycopg.connect(self.url(), autocommit=True) as connection:
            connection.execute(f"CREATE DATABASE {name}")
        return self.url(name)

    def drop_database(self, url: str) -> None:
        import psycopg

        name = url.rsplit("/", 1)[1]
        with psycopg.connect(self.url(), autocommit=True) as connection:
            connection.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")

    def __enter__(self) -> PostgresServer:
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
        raise PostgresServerError(f"postgres on port {self.port} did not start:\n{tail}")
