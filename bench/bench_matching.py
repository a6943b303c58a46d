"""Benchmark of matching under overlapping wildcard filters, the old index against this one.

Run: python bench/bench_matching.py [--old-ref main] [--repeat N]

The old index is `mqbroker/index.py` as git has it at --old-ref (default `main`), loaded into a
temporary module, so both run side by side in one process on one machine (it is noisy: compare
the ratios, not the absolute figures across runs). Cases:

- overlap 1 x 999: one session holds 999 wildcard filters that all match the published 32-level
  topic: filter j puts `+` at the levels where bit i of j is set among the first 10 levels, the
  topic's own level elsewhere, then `#` (so the filter trie stays small and each match gathers
  999 filters);
- overlap 20 x 1,000 shared: 20 sessions each hold those same 1,000 filters (20,000 ids/match);
- overlap 20 x 1,000 own: 20 sessions each hold 1,000 filters of their own (bits over the first
  15 levels): 20,000 distinct filters, so the trie walk grows too;
- deep 1 x 999: as overlap 1 x 999 but every filter runs the full 32 levels instead of `#`;
- at the default limits: 100 sessions x 100 shared overlapping filters, the most the defaults
  allow (max_wildcard_subscriptions = 100 per session, max_wildcard_filters = 10,000 in all);
- the reference workload of bench_core.py (issue 2): 10,000 sessions with an exact filter each
  plus 100 wildcard filters, random session topics, routed publishes/s warm and with cache off;
- subscribe churn: in the reference workload with a warm cache, one wildcard subscribe and
  unsubscribe of an unrelated filter between every 1,000 publishes (the old index cleared its
  whole cache on each).

Uncached cases run with cache_size=0 and report the best of --repeat timings per match; old and
new alternate within each repeat, so that both see the same background load.
"""

from __future__ import annotations

import argparse
import importlib.util
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from random import Random
from types import ModuleType
from typing import Any

from bench_core import cpu_model, session_topic, wildcard_filters

from mqbroker import index as new_index

LEVELS = 32
TOPIC = "/".join(f"l{n}" for n in range(LEVELS))


def load_old(ref: str) -> ModuleType:
    """mqbroker/index.py at git `ref`, imported as a module of its own."""
    root = Path(__file__).resolve().parent.parent
    source = subprocess.run(["git", "show", f"{ref}:mqbroker/index.py"], cwd=root, check=True,
                            capture_output=True, text=True).stdout
    path = Path(tempfile.mkdtemp()) / "old_index.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("old_index", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def overlapping(j: int, bits: int, deep: bool) -> str:
    """Filter j: `+` where bit i of j is set among the first `bits` levels, then `#` or the rest."""
    levels = [("+" if j >> i & 1 else f"l{i}") for i in range(bits)]
    levels += [f"l{i}" for i in range(bits, LEVELS)] if deep else ["#"]
    return "/".join(levels)


def per_match(index: Any, topic: str, repeat: int, inner: int) -> float:
    """Best seconds per `index.match(topic)` over `repeat` runs of `inner` matches."""
    best = float("inf")
    for _ in range(repeat):
        started = time.perf_counter()
        for _ in range(inner):
            index.match(topic)
        best = min(best, (time.perf_counter() - started) / inner)
    return best


def overlap_case(cls: Any, sessions: int, filters: int, own: bool, deep: bool) -> Any:
    index = cls(cache_size=0)
    bits = 15 if own else 10
    for session in range(sessions):
        for n in range(filters):
            j = session * filters + n if own else n
            index.add(session, n + 1, overlapping(j, bits, deep))
    return index


def reference_index(cls: Any, sessions: int, seed: int, cache_size: int) -> Any:
    rng = Random(seed)
    index = cls(cache_size=cache_size)
    for session in range(sessions):
        index.add(session, 1, session_topic(session))
    for sub_id, filter in enumerate(wildcard_filters(rng, sessions), start=2):
        index.add(rng.randrange(sessions), sub_id, filter)
    return index


def rate(index: Any, topics: Sequence[str], between: Callable[[Any], None] | None = None,
         every: int = 1000) -> float:
    match = index.match
    started = time.perf_counter()
    for n, topic in enumerate(topics):
        if between is not None and n % every == 0:
            between(index)
        match(topic)
    return len(topics) / (time.perf_counter() - started)


def churn(index: Any) -> None:
    index.add(-1, 1, "other/+/x")
    index.remove(-1, 1)


def row(label: str, old: float, new: float, unit: str, lower_is_better: bool) -> None:
    ratio = old / new if lower_is_better else new / old
    print(f"{label:<44} old {old:>12,.1f} {unit:<6} new {new:>12,.1f} {unit:<6} "
          f"({ratio:,.1f}x {'faster' if ratio >= 1 else 'slower'})")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--old-ref", default="main")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--publishes", type=int, default=300_000)
    parser.add_argument("--sessions", type=int, default=10_000)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    old = load_old(args.old_ref).SubscriptionIndex
    new = new_index.SubscriptionIndex
    print(f"machine: {cpu_model()}, python {sys.version.split()[0]}; old = {args.old_ref}")

    cases = [("overlap 1 x 999, uncached", 1, 999, False, False, 20),
             ("overlap 20 x 1,000 shared, uncached", 20, 1000, False, False, 3),
             ("overlap 20 x 1,000 own, uncached", 20, 1000, True, False, 1),
             ("deep 1 x 999 (32 levels), uncached", 1, 999, False, True, 20),
             ("default limits 100 x 100 shared, uncached", 100, 100, False, False, 5)]
    for label, sessions, filters, own, deep, inner in cases:
        indexes = [overlap_case(cls, sessions, filters, own, deep) for cls in (old, new)]
        for index in indexes:
            assert sum(len(ids) for _, ids in index.match(TOPIC)) == sessions * filters
        best = [float("inf")] * 2
        for _ in range(args.repeat):  # old and new alternate, so both see the same noise
            for n, index in enumerate(indexes):
                best[n] = min(best[n], per_match(index, TOPIC, 1, inner) * 1e6)
        row(label, *best, "us", lower_is_better=True)

    rng = Random(args.seed)
    topics = [session_topic(rng.randrange(args.sessions)) for _ in range(args.publishes)]
    print(f"reference workload: {args.sessions:,} exact + 100 wildcard filters, "
          f"{args.publishes:,} random session topics")
    for label, cache_size, between in [("reference, cache off", 0, None),
                                       ("reference, warm cache", 65536, None),
                                       ("reference, warm cache + subscribe churn", 65536, churn)]:
        rates = [0.0, 0.0]
        for _ in range(args.repeat):  # old and new alternate, so both see the same noise
            for n, cls in enumerate((old, new)):
                index = reference_index(cls, args.sessions, args.seed, cache_size)
                rate(index, topics)  # fills the cache when there is one
                rates[n] = max(rates[n], rate(index, topics, between))
        row(label, *rates, "/s", lower_is_better=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
