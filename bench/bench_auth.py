"""The cost of authorization per publish ([auth] on vs off), and of JWT verification per hello.

    python bench/bench_auth.py [--quick] [--rounds N]

Per publish: the broker runs as its own process (bench_e2e's setup); one publisher sends
100-byte publishes to one subscriber on `mcp/session/s1/message`, in batches of 200 per frame
and one per frame (the fast path). "off" is anonymous mode; "on" is token mode with a role of
four rules ({session} substituted), so that every publish is checked (a cached decision) and
allowed. Rounds alternate off/on so the machine's noise falls on both; the figure is the
broker's CPU time per message, median of the rounds.

Per hello: mqbroker.auth's authenticators called in-process on one valid credential
(a static token; HS256, RS256 and ES256 JWTs), microseconds per call, best of the rounds.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import timeit
from functools import partial
from pathlib import Path

import jwt
import trio
from cryptography.hazmat.primitives.asymmetric import ec, rsa

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_e2e import Broker, machine, one_to_one

from mqbroker.auth import JwtAuthenticator, Principal, TokenAuthenticator, token_hash

TOKEN = "bench-token-0123456789abcdef"
TOPIC = "mcp/session/s1/message"
AUTH_ON = f"""
[auth]
mode = "token"
[[auth.tokens]]
sha256 = "{token_hash(TOKEN)}"
principal = "bench"
roles = ["server"]
sessions = ["s1"]
[auth.roles.server]
publish = ["mcp/session/{{session}}/#", "mcp/broadcast/#", "mcp/principal/{{principal}}/#"]
subscribe = ["mcp/session/{{session}}/#", "mcp/broadcast/#"]
"""


def measure(extra: str, auth: str | None, messages: int, per_frame: int) -> float:
    """Broker CPU microseconds per message."""
    with Broker(10_000, extra) as broker:
        before = broker.cpu_seconds()
        trio.run(partial(one_to_one, broker.url, messages, per_frame, TOPIC, auth=auth))
        time.sleep(0.1)  # let the broker finish writing before its CPU time is read
        return (broker.cpu_seconds() - before) / messages * 1e6


def per_publish(rounds: int, scale: float) -> None:
    for per_frame, n in ((200, int(200_000 * scale)), (1, int(40_000 * scale))):
        off: list[float] = []
        on: list[float] = []
        for _ in range(rounds):
            off.append(measure("", None, n, per_frame))
            on.append(measure(AUTH_ON, TOKEN, n, per_frame))
        a, b = statistics.median(off), statistics.median(on)
        print(f"1 -> 1, {per_frame:>3} publishes/frame, {n} messages x {rounds} rounds: "
              f"ACLs off {a:.2f} us/message, on {b:.2f} us/message, on/off {b / a:.3f} "
              f"(rounds off {', '.join(f'{x:.2f}' for x in off)}; "
              f"on {', '.join(f'{x:.2f}' for x in on)})")


def per_hello(rounds: int) -> None:
    claims = {"sub": "bench", "roles": ["server"], "sessions": ["s1"], "aud": "mqbroker",
              "iss": "bench", "exp": time.time() + 3600}
    secret = "s" * 40
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    ec_key = ec.generate_private_key(ec.SECP256R1())
    settings = {"issuer": "bench", "audience": "mqbroker"}
    cases = {
        "static token": (TokenAuthenticator({token_hash(TOKEN): Principal(name="bench")}),
                         TOKEN),
        "JWT HS256": (JwtAuthenticator(key=secret, algorithms=("HS256",), **settings),
                      jwt.encode(claims, secret, algorithm="HS256")),
        "JWT RS256 (2048)": (JwtAuthenticator(key=rsa_key.public_key(),
                                              algorithms=("RS256",), **settings),
                             jwt.encode(claims, rsa_key, algorithm="RS256")),
        "JWT ES256": (JwtAuthenticator(key=ec_key.public_key(), algorithms=("ES256",),
                                       **settings),
                      jwt.encode(claims, ec_key, algorithm="ES256")),
    }
    for name, (authenticator, credential) in cases.items():
        calls = 2000
        best = min(timeit.repeat(lambda: authenticator.check(credential),  # noqa: B023
                                 number=calls, repeat=rounds))
        print(f"hello, {name}: {best / calls * 1e6:.1f} us per verification "
              f"(best of {rounds} x {calls})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a tenth of the messages")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    print(f"machine: {machine()}")
    per_hello(args.rounds)
    per_publish(args.rounds, 0.1 if args.quick else 1.0)


if __name__ == "__main__":
    main()
