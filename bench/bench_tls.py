"""What TLS costs the broker: the same fan-out workload over ws:// and wss://, side by side.

    python bench/bench_tls.py [--quick] [--rounds N]

Two broker processes (`python -m mqbroker serve`), one plain and one with a test certificate
made at run time (tests/certificates.py, EC P-256), serve alternating rounds of one workload: one
publisher sends frames of 200 publishes of 100 bytes, 4 subscribers receive every message. Each
round gives the deliveries per second and the broker's CPU time per delivery (from
/proc/PID/stat, steadier than wall time on a shared machine); the medians over the rounds and
their wss/ws ratios are printed. The load generator (trio-websocket) pays TLS too, on the same
cores: the wall-time figures include its cost, the CPU figures do not.
"""

from __future__ import annotations

import argparse
import ssl
import statistics
import sys
import tempfile
from functools import partial
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/certificates.py

from bench_e2e import BATCH, Broker, machine, throughput

from tests.certificates import make_pki

SUBSCRIBERS = 4
OUTBOX = 1_000_000


def measure(broker: Broker, url: str, context: ssl.SSLContext | None,
            messages: int) -> tuple[float, float]:
    """(deliveries per second, broker CPU microseconds per delivery) of one round."""
    before = broker.cpu_seconds()
    rate = trio.run(partial(throughput, url, SUBSCRIBERS, messages, "bench/tls",
                            ssl_context=context))
    cpu = broker.cpu_seconds() - before
    return rate, cpu / (messages * SUBSCRIBERS) * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a tenth of the messages")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    messages = 20_000 if args.quick else 200_000
    with tempfile.TemporaryDirectory() as directory:
        pki = make_pki(Path(directory))
        tls = (f'tls_cert = "{pki.server.cert}"\ntls_key = "{pki.server.key}"\n')
        context = pki.client_context()
        plain_figures: list[tuple[float, float]] = []
        tls_figures: list[tuple[float, float]] = []
        # outbox_messages is large so that no round loses a subscriber to the slow-consumer
        # policy. The TLS keys belong in [server]: the secure broker's file is written whole.
        plain, secure = Broker(OUTBOX), Broker(OUTBOX)
        Path(secure.path).write_text(
            f'[server]\noutbox_messages = {OUTBOX}\n{tls}[log]\nlevel = "warning"\n')
        with plain, secure:
            for _ in range(args.rounds):
                plain_figures.append(measure(plain, plain.url, None, messages))
                tls_figures.append(measure(
                    secure, f"wss://127.0.0.1:{secure.port}/", context, messages))
    print(f"machine: {machine()}")
    print(f"workload: 1 publisher, {SUBSCRIBERS} subscribers, {messages} messages of 100 bytes "
          f"in frames of {BATCH}, {args.rounds} alternating rounds (medians)")
    rates = [statistics.median(f[0] for f in figures) for figures in (plain_figures, tls_figures)]
    cpus = [statistics.median(f[1] for f in figures) for figures in (plain_figures, tls_figures)]
    print(f"ws://   {rates[0]:>10,.0f} deliveries/s   {cpus[0]:6.2f} us broker CPU per delivery")
    print(f"wss://  {rates[1]:>10,.0f} deliveries/s   {cpus[1]:6.2f} us broker CPU per delivery")
    print(f"wss/ws  throughput x{rates[1] / rates[0]:.2f}   "
          f"CPU per delivery x{cpus[1] / cpus[0]:.2f}")


if __name__ == "__main__":
    main()
