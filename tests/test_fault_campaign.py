"""The seeded fault campaign over real sockets: every stream's outcome classified, no bad one.

The relay runs in front of the standalone simulator; each stream has one of
the simulator's faults and one client behaviour (see
:mod:`streamsvc.bench.faults`). CI runs a few hundred streams; more with
``STREAMSVC_CAMPAIGN_STREAMS=1000`` (and another draw with
``STREAMSVC_CAMPAIGN_SEED``). A bad outcome prints its scenario, seed and
index, so it can be run again alone.
"""

from __future__ import annotations

import os

import aiohttp
import pytest

from streamsvc.bench.faults import BAD, format_report, run_campaign, scenarios
from streamsvc.simulator import SimulatorServer
from tests.conftest import StartServer, relay_overrides

STREAMS = int(os.environ.get("STREAMSVC_CAMPAIGN_STREAMS", "400"))
SEED = int(os.environ.get("STREAMSVC_CAMPAIGN_SEED", "12"))
# Timeouts short enough that a hung upstream ends within the campaign: a hang is only
# a hang when nothing ends the stream within the deadline.
PIPELINE = {"first_token_timeout_s": 3.0, "idle_timeout_s": 0.5,
            "retry_backoff_base_ms": 1, "retry_backoff_max_ms": 20}


@pytest.mark.timeout(max(120, STREAMS // 4))
async def test_fault_campaign_has_no_lost_duplicated_cut_or_hung_stream(
    start_server: StartServer, simulator: SimulatorServer, capsys: pytest.CaptureFixture[str],
) -> None:
    relay = await start_server(overrides=relay_overrides(
        simulator.url, pipeline=PIPELINE, limits={"max_streams": 0, "max_streams_per_key": 0}))
    report = await run_campaign(relay.url, streams=STREAMS, seed=SEED, upstream=simulator.url,
                                concurrency=32, deadline_s=30)
    table = format_report(report)
    with capsys.disabled():
        print("\n" + table)
    assert len(report.outcomes) == STREAMS
    assert not report.bad, table
    # The faults did bite: answers came whole, and failures came as typed errors.
    assert report.counts["exact"] > STREAMS // 5, table
    assert report.counts["prefix_then_error"] > STREAMS // 10, table
    assert report.counts["left"] > 0, table
    async with aiohttp.ClientSession() as session, session.get(relay.url + "/readyz") as r:
        assert r.status == 200  # and the relay goes on


def test_campaign_scenarios_are_reproducible_from_their_seed() -> None:
    first, again, other = scenarios(7, 200), scenarios(7, 200), scenarios(8, 200)
    assert first == again and first != other
    assert {s.fault for s in first} >= {"none", "429", "500", "drop", "hang", "malformed",
                                        "error_event", "sse_error", "no_done", "no_finish",
                                        "slow_first", "slow_headers", "split_surrogates"}
    assert {s.client for s in first} == {"read", "slow", "leave", "resume", "repost"}
    assert {s.endpoint for s in first} == {"openai", "direct", "resumable", "oneshot"}
    assert BAD == {"lost", "duplicated", "silent_cut", "hang", "extra_upstream_request",
                   "bad_error", "error_not_answer"}
