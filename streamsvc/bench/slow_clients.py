"""Slow and stalled clients against ``streamsvc serve``: what they get, what they cost.

Two scenarios, each against fresh processes (a ``streamsvc simulate`` upstream
and a ``streamsvc serve`` relay in front of it, so the relay's memory is its own):

- ``trickle``: one client per streaming endpoint reads through a 4 KiB receive
  window at a fixed rate (default 3 KB/s) with ``server.send_buffer_bytes =
  4096`` and ``server.write_timeout_s = 5``. It must get the whole answer.
- ``stalled``: N clients (default 20) ask ``POST /v1/chat/completions`` for a
  200,000-token answer and never read. Reported: the relay's RSS growth per
  stalled stream, whether the upstream was paused (its answers still in
  progress, not completed), and how long until each was closed.

Run: ``python -m streamsvc.bench.slow_clients`` (both), or ``--only trickle``.
Traffic goes to 127.0.0.1 only, bounded in count and time.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp

from streamsvc.bench.services import Service, free_port

__all__ = ["main"]

PROMPT = "tell me a story"


class RawClient:
    """An HTTP/1.1 request on a raw socket with a small receive window."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.received = 0
        self.body = bytearray()
        self.eof = False
        self.closed_at: float | None = None

    @classmethod
    async def open(cls, port: int, path: str, body: dict[str, Any]) -> RawClient:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.setblocking(False)
        loop = asyncio.get_running_loop()
        await loop.sock_connect(sock, ("127.0.0.1", port))
        data = json.dumps(body).encode()
        head = (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n"
                f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n\r\n")
        await loop.sock_sendall(sock, head.encode() + data)
        return cls(sock)

    async def read(self, size: int) -> None:
        try:
            piece = await asyncio.get_running_loop().sock_recv(self.sock, size)
        except ConnectionError:
            piece = b""
        if not piece:
            self.eof = True
            self.closed_at = time.monotonic()
        self.received += len(piece)
        self.body += piece

    def ending(self) -> str:
        """How the body ended: ``[DONE]``, ``done``, an error frame, or ``cut``."""
        tail = bytes(self.body[-600:])
        if b"data: [DONE]" in tail:
            return "[DONE]"
        if b"event: done" in tail:
            return "done"
        if b'"error"' in tail or b"event: error" in tail:
            return "error"
        return "cut"

    def close(self) -> None:
        self.sock.close()


async def _relay(env: dict[str, str], logs: Path) -> tuple[Service, Service]:
    sim_port, relay_port = free_port(), free_port()
    sim = Service("simulator", [sys.executable, "-m", "streamsvc", "simulate", "--port",
                                str(sim_port)], port=sim_port, log_path=logs / "sim.log")
    await sim.start()
    relay = Service("streamsvc", [sys.executable, "-m", "streamsvc", "serve", "--port",
                                  str(relay_port), "--upstream", sim.url + "/v1"],
                    port=relay_port, log_path=logs / "serve.log", env=env)
    await relay.start()
    return sim, relay


async def trickle(rate: int, tokens: int, logs: Path) -> list[dict[str, Any]]:
    """One client per streaming endpoint reading ``rate`` bytes a second."""
    env = {"STREAMSVC__SERVER__SEND_BUFFER_BYTES": "4096",
           "STREAMSVC__SERVER__WRITE_TIMEOUT_S": "5"}
    sim, relay = await _relay(env, logs)
    results = []
    try:
        for path in ("/v1/chat/completions", "/v1/chat/stream"):
            body = {"model": "sim-small", "stream": True, "simulate": {"tokens": tokens,
                    "rate": 0}, "messages": [{"role": "user", "content": PROMPT}]}
            client = await RawClient.open(relay.port, path, body)
            start = time.monotonic()
            step = 0.1
            try:
                while not client.eof and time.monotonic() - start < 600:
                    await asyncio.sleep(step)
                    await client.read(max(1, int(rate * step)))
            finally:
                client.close()
            seconds = time.monotonic() - start
            results.append({"path": path, "bytes": client.received, "seconds": round(seconds, 1),
                            "rate_bytes_per_s": round(client.received / seconds),
                            "ending": client.ending()})
    finally:
        await relay.stop()
        await sim.stop()
    return results


async def stalled(
    count: int, tokens: int, logs: Path, env: dict[str, str] | None = None
) -> dict[str, Any]:
    """``count`` clients that never read, on ``POST /v1/chat/completions`` (default config,
    or ``env``'s overrides)."""
    sim, relay = await _relay(env or {}, logs)
    clients: list[RawClient] = []
    try:
        async with aiohttp.ClientSession() as session:  # warm up: imports, first stream
            async with session.post(relay.url + "/v1/chat/completions", json={
                "model": "sim-small", "messages": [{"role": "user", "content": PROMPT}],
                "stream": True, "simulate": {"tokens": 50, "rate": 0}}) as response:
                await response.read()
            baseline = relay.sample().rss_bytes
            body = {"model": "sim-small", "stream": True, "simulate": {"tokens": tokens,
                    "rate": 0}, "messages": [{"role": "user", "content": PROMPT}]}
            start = time.monotonic()
            clients = [await RawClient.open(relay.port, "/v1/chat/completions", body)
                       for _ in range(count)]
            peak = baseline
            paused_seen: dict[str, int] | None = None
            first_cancel: float | None = None
            after: dict[str, int] = {}
            # A client that never reads cannot see its connection close (its receive
            # buffer is full): the upstream's hang-ups tell when each stream was stopped.
            while time.monotonic() - start < 180:
                await asyncio.sleep(0.25)
                peak = max(peak, relay.sample().rss_bytes)
                async with session.get(sim.url + "/_sim/stats") as response:
                    after = await response.json()
                if paused_seen is None and time.monotonic() - start > 5:
                    paused_seen = after
                if after["disconnected"] and first_cancel is None:
                    first_cancel = time.monotonic() - start
                if after["disconnected"] + after["completed"] - 1 >= count:
                    break
            last_cancel = time.monotonic() - start
        return {
            "clients": count, "tokens": tokens,
            "rss_growth_mib": round((peak - baseline) / 2**20, 1),
            "rss_growth_per_stream_mib": round((peak - baseline) / 2**20 / count, 2),
            "upstream_after_5s": paused_seen, "upstream_at_end": after,
            "upstream_cancelled_after_s": [round(first_cancel or 0, 1), round(last_cancel, 1)],
        }
    finally:
        for client in clients:
            client.close()
        await relay.stop()
        await sim.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m streamsvc.bench.slow_clients",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", choices=["trickle", "stalled"])
    parser.add_argument("--rate", type=int, default=3000, help="trickle: bytes/s (3000)")
    parser.add_argument("--tokens", type=int, default=12_000,
                        help="trickle: tokens per answer (12000: about 60 KB of text)")
    parser.add_argument("--stalled", type=int, default=20, help="stalled clients (20)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="streamsvc-slow-") as folder:
        logs = Path(folder)
        report: dict[str, Any] = {}
        if args.only in (None, "trickle"):
            report["trickle"] = asyncio.run(trickle(args.rate, args.tokens, logs))
        if args.only in (None, "stalled"):
            report["stalled"] = asyncio.run(stalled(args.stalled, 200_000, logs))
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
