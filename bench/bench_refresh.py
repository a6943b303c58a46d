"""What a `refresh` costs the broker, against a `ping` (the cheapest request) on the same path.

    python bench/bench_refresh.py [--rounds N] [--frames N]

One process: a broker in JWT mode (HS256, or ES256 with --es256) on 127.0.0.1 and one raw
session that sends frames of 100 `refresh` requests (each a fresh, valid token of its own
principal) and waits for the 100 answers, then the same with 100 `ping`s. The figure is the
broker's share of the wall time per request: (refresh - ping) is what verifying the token and
adopting the new credential add. Median of the rounds; rounds alternate. Logs are JSON lines
to /dev/null at level `info` (each refresh logs `security.refreshed`), or `--level warning`.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import jwt
import trio
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from trio_websocket import connect_websocket_url

from mqbroker.broker import open_broker
from mqbroker.config import AuthConfig, Config, LogConfig, RoleConfig, ServerConfig
from mqbroker.logs import configure
from mqbroker.protocol import ClientConnection, Ping, Refresh
from mqbroker.server.listener import serve

SECRET = "bench-secret-of-at-least-32-characters!"
PER_FRAME = 100


def config(directory: Path, es256: ec.EllipticCurvePrivateKey | None) -> Config:
    if es256 is None:
        (directory / "secret").write_text(SECRET)
        keys = {"jwt_secret_file": str(directory / "secret")}
    else:
        (directory / "public.pem").write_bytes(es256.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
        keys = {"jwt_public_key_file": str(directory / "public.pem")}
    role = RoleConfig(publish=("mcp/session/{session}/#",),
                      subscribe=("mcp/session/{session}/#",))
    return Config(server=ServerConfig(port=0), auth=AuthConfig(
        mode="jwt", roles={"server": role}, **keys))


def token(es256: ec.EllipticCurvePrivateKey | None) -> str:
    claims = {"sub": "bench", "roles": ["server"], "sessions": ["s1"],
              "exp": time.time() + 3600}
    if es256 is None:
        return jwt.encode(claims, SECRET, algorithm="HS256")
    return jwt.encode(claims, es256, algorithm="ES256")


async def per_request(ws: object, connection: ClientConnection, frames: list[bytes | str]
                      ) -> float:
    """Seconds per request: send each frame of PER_FRAME requests, wait for its answers."""
    start = time.perf_counter()
    for frame in frames:
        await ws.send_message(frame)  # type: ignore[attr-defined]
        answered = 0
        while answered < PER_FRAME:
            answered += len(connection.receive(await ws.get_message()))  # type: ignore[attr-defined]
    return (time.perf_counter() - start) / (len(frames) * PER_FRAME)


async def main(rounds: int, frame_count: int, es256: bool) -> None:
    key = ec.generate_private_key(ec.SECP256R1()) if es256 else None
    with tempfile.TemporaryDirectory() as directory:
        settings = config(Path(directory), key)
        async with open_broker(settings, "bench") as broker, trio.open_nursery() as nursery:
            listener = await nursery.start(serve, broker, settings.server)
            async with trio.open_nursery() as client:
                ws = await connect_websocket_url(client, f"ws://127.0.0.1:{listener.port}/")
                connection = ClientConnection()
                await ws.send_message(connection.hello("bench", token(key)))
                connection.receive(await ws.get_message())
                ids = iter(range(1, 10**9))
                refreshes = [connection.encode_batch(
                    [Refresh(id=next(ids), auth=token(key)) for _ in range(PER_FRAME)])
                    for _ in range(frame_count)]
                pings = [connection.encode_batch([Ping(id=next(ids)) for _ in range(PER_FRAME)])
                         for _ in range(frame_count)]
                refresh_times, ping_times = [], []
                for _ in range(rounds):
                    refresh_times.append(await per_request(ws, connection, refreshes))
                    ping_times.append(await per_request(ws, connection, pings))
                await ws.aclose()
            nursery.cancel_scope.cancel()
    refresh, ping = statistics.median(refresh_times), statistics.median(ping_times)
    print(f"{'ES256' if es256 else 'HS256'}: refresh {refresh * 1e6:.1f} us, ping "
          f"{ping * 1e6:.1f} us per request (frames of {PER_FRAME}, {frame_count} frames, "
          f"median of {rounds} rounds); a refresh adds {(refresh - ping) * 1e6:.1f} us")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--frames", type=int, default=20)
    parser.add_argument("--es256", action="store_true")
    parser.add_argument("--level", default="info", choices=["info", "warning"])
    arguments = parser.parse_args()
    configure(LogConfig(level=arguments.level, format="json"),
              stream=open("/dev/null", "w"))
    trio.run(main, arguments.rounds, arguments.frames, arguments.es256)
