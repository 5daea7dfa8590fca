"""The time a continuation adds: from the last token before an upstream's cut to the first
continued token, against the stream's normal gap between tokens.

Runs ``streamsvc simulate`` and ``streamsvc serve --upstream`` (with
``STREAMSVC__PIPELINE__CONTINUE_ON_FAILURE=true``) as their own processes,
and ``--streams`` streams on ``POST /v1/chat/stream`` at ``--rate`` tokens/s,
each cut after 7 tokens on its first request. Traffic to 127.0.0.1 only.

Run: ``python -m streamsvc.bench.continuation``.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp

from streamsvc.bench.relays import simulator_service
from streamsvc.bench.services import Service, free_port
from streamsvc.sse import SSEDecoder

__all__ = ["main"]


async def _one(session: aiohttp.ClientSession, url: str, key: str, rate: float
               ) -> tuple[float, float]:
    """(the seam's gap, the median other gap) of one continued stream, in ms."""
    body = {"model": "sim-small", "messages": [{"role": "user", "content": "tell me a story"}],
            "simulate": {"tokens": 40, "rate": rate, "fault": "drop", "fault_at": 7,
                         "fail_times": 1, "key": key}}
    decoder = SSEDecoder()
    times: list[tuple[float, str]] = []
    async with session.post(url + "/v1/chat/stream", json=body) as response:
        async for data in response.content.iter_any():
            now = time.monotonic()
            times += [(now, e.event) for e in decoder.feed(data)
                      if e.event in ("message", "failover")]
    messages = [t for t, kind in times if kind == "message"]
    seam = next(i for i, (_, kind) in enumerate(times) if kind == "failover")
    before = max(t for t, kind in times[:seam] if kind == "message")
    after = min(t for t, kind in times[seam:] if kind == "message")
    gaps = [b - a for a, b in itertools.pairwise(messages)]
    return (after - before) * 1000, statistics.median(gaps) * 1000


async def run(streams: int, rate: float, logs: Path) -> dict[str, Any]:
    relay_port = free_port()
    sim = simulator_service(logs)
    async with sim:
        relay = Service("streamsvc", [sys.executable, "-m", "streamsvc", "serve", "--port",
                                      str(relay_port), "--upstream", sim.url + "/v1"],
                        port=relay_port, log_path=logs / "serve.log",
                        env={"STREAMSVC__PIPELINE__CONTINUE_ON_FAILURE": "true"})
        async with relay, aiohttp.ClientSession() as session:
            results = await asyncio.gather(*(_one(session, relay.url, f"k{i}", rate)
                                             for i in range(streams)))
    seams = sorted(r[0] for r in results)
    gaps = [r[1] for r in results]
    added = sorted(s - g for s, g in zip(seams, gaps, strict=False))
    return {"streams": streams, "rate": rate,
            "seam_gap_ms": {"p50": round(statistics.median(seams), 1),
                            "max": round(seams[-1], 1)},
            "normal_gap_ms_p50": round(statistics.median(gaps), 1),
            "added_ms": {"p50": round(statistics.median(added), 1), "max": round(added[-1], 1)}}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m streamsvc.bench.continuation",
                                     description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--streams", type=int, default=20)
    parser.add_argument("--rate", type=float, default=20.0, help="tokens/s per stream (20)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="streamsvc-continuation-") as folder:
        print(json.dumps(asyncio.run(run(args.streams, args.rate, Path(folder))), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
