"""The MCP SDK's own resumability tests, run against mqbroker.mcp's store.

The tests come from the SDK's source distribution, fetched at test time with pip (never copied
into this repository), for the SDK version installed. tests/mcp_sdk/swap_store.py replaces
their event stores with mqbroker.mcp's (against a broker this test runs). The only failures
allowed are the tests that assert the SDK test store's literal ids ("3", "4" ...) or read its
internal rows (`_events`): mqbroker.mcp's ids are its own (they carry the session), by design.
"""

from __future__ import annotations

import os
import re
import sys
import tarfile
from importlib.metadata import version
from pathlib import Path

import trio

from tests.harness import running_broker

#: The SDK's test modules that exercise an event store.
MODULES = [
    "tests/interaction/transports/test_hosting_resume.py",
    "tests/interaction/transports/test_client_transport_http.py",
    "tests/shared/test_streamable_http.py",
]
#: The tests that assert the SDK test store's literal event ids or its internal rows.
LITERAL_ID_TESTS = {
    # priming.id == "3", first.id == "4"
    "tests/interaction/transports/test_hosting_resume.py::"
    "test_a_post_sse_stream_begins_with_a_priming_event_and_stamps_every_event",
    # reads store._events
    "tests/interaction/transports/test_hosting_resume.py::"
    "test_the_priming_row_is_stored_before_any_handler_output_for_that_stream",
    # (priming.id, first.id) == ("3", "4"), then ids ["5", "6", "8"]
    "tests/interaction/transports/test_hosting_resume.py::"
    "test_get_with_last_event_id_replays_only_that_streams_missed_events",
    # ids ("5", "6"), then len(store._events) == 6
    "tests/interaction/transports/test_hosting_resume.py::"
    "test_a_pre_2025_11_25_reconnect_replays_without_minting_a_priming_event",
    # captured resumption tokens == ["3", "4"]
    "tests/interaction/transports/test_hosting_resume.py::"
    "test_a_captured_resumption_token_replays_missed_messages_on_a_new_connection",
    # reads event_store._events
    "tests/shared/test_streamable_http.py::"
    "test_initialize_with_unknown_protocol_version_gets_no_priming_event",
}
PLUGIN_DIR = Path(__file__).resolve().parent / "mcp_sdk"


async def fetch_sdist(into: Path) -> Path:
    """The installed SDK version's source distribution, downloaded and unpacked into `into`."""
    wanted = version("mcp")
    with trio.fail_after(300):
        result = await trio.run_process(
            [sys.executable, "-m", "pip", "download", "--quiet", "--no-binary", ":all:",
             "--no-deps", f"mcp=={wanted}", "-d", str(into)],
            capture_stdout=True, capture_stderr=True, check=False)
    assert result.returncode == 0, (
        f"cannot download the source distribution of mcp=={wanted} (pip download: "
        f"{result.stderr.decode()[-2000:]}); the test needs the package index")
    return await trio.to_thread.run_sync(_unpacked, into, wanted)


def _unpacked(into: Path, wanted: str) -> Path:
    (archive_path,) = into.glob(f"mcp-{wanted}.tar.gz")
    with tarfile.open(archive_path) as archive:
        archive.extractall(into, filter="data")
    return into / f"mcp-{wanted}"


async def test_the_sdk_resumability_tests_pass_against_the_adapter(tmp_path: Path) -> None:
    sdk = await fetch_sdist(tmp_path)
    async with running_broker() as running:
        env = {**os.environ, "MQBROKER_URL": running.url,
               "PYTHONPATH": os.pathsep.join([str(sdk), str(PLUGIN_DIR)])}
        with trio.fail_after(600):
            result = await trio.run_process(
                [sys.executable, "-m", "pytest", "--noconftest", "-o", "addopts=",
                 "-o", "log_cli=false", "-p", "anyio", "-p", "swap_store", "-p",
                 "no:cacheprovider", "-p", "no:randomly", "-q", "-rf",
                 "-W", "ignore::pytest.PytestUnraisableExceptionWarning",
                 "-W", "ignore::ResourceWarning", *MODULES],
                cwd=sdk, env=env, capture_stdout=True, capture_stderr=True, check=False)
    output = result.stdout.decode(errors="replace")
    summary = output.strip().splitlines()[-1]
    failed = set(re.findall(r"^FAILED (\S+?)(?: - .*)?$", output, re.MULTILINE))
    passed = int(m[1]) if (m := re.search(r"(\d+) passed", summary)) else 0
    print(f"the SDK's tests against mqbroker.mcp: {summary}")
    assert failed <= LITERAL_ID_TESTS, f"unexpected failures: {failed - LITERAL_ID_TESTS}\n" \
                                       f"{output[-6000:]}"
    assert passed >= 80, output[-6000:]
