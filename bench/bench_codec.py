"""Benchmark of the codec's publish fast path and delivery encoding, this tree against a git ref.

Run: python bench/bench_codec.py [--baseline REF] [--rounds N] [--number N]

Loads mqbroker/protocol/codec.py as it is at REF (default `main`) beside the working tree's, and
times both on the same frames, alternating round by round (the machine is noisy: the best round
of each is compared). Workload, per format (msgpack and JSON): decoding one client frame holding
one `publish` (topic `mcp/session/42/message`, an id and a msg_id) whose payload is a short
string, 64 bytes of binary, or a small map {"text": ..., "n": 3, "ok": true}; and encoding one
delivery of such a message for one session (`EncodedMessage(...).fragment`). Reports ns per
operation and the ratio this tree / baseline.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import msgpack

from mqbroker.message import Message, Position
from mqbroker.protocol import codec as current

ROOT = Path(__file__).resolve().parent.parent


def load_baseline(ref: str) -> ModuleType:
    source = subprocess.run(["git", "show", f"{ref}:mqbroker/protocol/codec.py"], cwd=ROOT,
                            check=True, capture_output=True, text=True).stdout
    path = Path(tempfile.mkdtemp()) / "codec_baseline.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("codec_baseline", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


PAYLOADS: dict[str, Any] = {
    "str": "hello, this is a short chat message",
    "bytes": bytes(range(64)),
    "map": {"text": "hello, this is a short chat message", "n": 3, "ok": True},
}


def publish_frames(payload: Any) -> dict[str, bytes | str]:
    event = {"op": "publish", "topic": "mcp/session/42/message", "payload": payload,
             "id": 17, "msg_id": "c1-17"}
    json_payload = payload
    if isinstance(payload, bytes):
        json_payload = {"$base64": __import__("base64").b64encode(payload).decode()}
    return {"msgpack": msgpack.packb(event, use_bin_type=True),
            "json": json.dumps({**event, "payload": json_payload}, separators=(",", ":"))}


def cases(codec: ModuleType) -> dict[str, Callable[[], Any]]:
    result: dict[str, Callable[[], Any]] = {}
    for name, payload in PAYLOADS.items():
        for fmt_name, frame in publish_frames(payload).items():
            result[f"decode publish {fmt_name:7} {name:5}"] = (
                lambda frame=frame: codec.decode(frame, codec.CLIENT_SPECS))
        message = Message(topic="mcp/session/42/message", payload=payload,
                          published_at=1735689600.25, position=Position("a1b2c3d4", 17))
        for fmt in codec.Format:
            result[f"encode delivery {fmt.value:7} {name:5}"] = (
                lambda message=message, fmt=fmt: codec.EncodedMessage(message).fragment(
                    fmt, (1,)))
    return result


def best(fn: Callable[[], Any], number: int) -> float:
    start = time.perf_counter()
    for _ in range(number):
        fn()
    return (time.perf_counter() - start) / number


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", default="main")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--number", type=int, default=20_000)
    args = parser.parse_args()
    baseline = load_baseline(args.baseline)
    print(f"python {sys.version.split()[0]}, {platform.machine()}, baseline {args.baseline}, "
          f"{args.rounds} rounds x {args.number}, best round")
    new_cases, old_cases = cases(current), cases(baseline)
    print(f"{'case':34} {'baseline':>10} {'this tree':>10} {'ratio':>7}")
    for label in new_cases:
        new_fn, old_fn = new_cases[label], old_cases[label]
        assert new_fn() == old_fn(), label  # the same work, the same result
        old_best = new_best = float("inf")
        for _ in range(args.rounds):
            old_best = min(old_best, best(old_fn, args.number))
            new_best = min(new_best, best(new_fn, args.number))
        print(f"{label:34} {old_best * 1e9:8.0f}ns {new_best * 1e9:8.0f}ns "
              f"{new_best / old_best:7.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
