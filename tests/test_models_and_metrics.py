"""GET /v1/models lists what the routes serve; /metrics counts requests, hang-ups, errors."""

from __future__ import annotations

import asyncio

import aiohttp

from streamsvc.config import load_config
from streamsvc.simulator import MODELS, SimulatorServer
from streamsvc.upstream.routing import Router
from tests.conftest import RunningServer, StartServer, relay_overrides


async def _model_ids(session: aiohttp.ClientSession, url: str) -> list[str]:
    async with session.get(f"{url}/v1/models") as response:
        assert response.status == 200
        body = await response.json()
    assert body["object"] == "list"
    return [m["id"] for m in body["data"]]


async def test_models_of_builtin_simulator(start_server: StartServer,
                                           session: aiohttp.ClientSession) -> None:
    server = await start_server()
    assert await _model_ids(session, server.url) == list(MODELS)


async def test_the_default_routes_serve_the_listed_models_and_no_other(
    start_server: StartServer, session: aiohttp.ClientSession
) -> None:
    server = await start_server()
    listed = await _model_ids(session, server.url)
    for model in listed:
        body = {"model": model, "messages": [{"role": "user", "content": "hi"}]}
        async with session.post(f"{server.url}/v1/chat/completions", json=body) as response:
            assert response.status == 200, model
    body = {"model": "ehco", "messages": [{"role": "user", "content": "hi"}]}
    async with session.post(f"{server.url}/v1/chat/completions", json=body) as response:
        assert response.status == 404
        error = (await response.json())["error"]
    assert error["code"] == "model_not_found" and error["param"] == "model"
    assert error["message"] == ("no route serves model 'ehco'; did you mean 'echo'?"
                                " (GET /v1/models lists the models served)")


async def test_the_start_up_line_says_which_models_go_where(
    session: aiohttp.ClientSession,
) -> None:
    assert Router(load_config(env={}), session).describe() == (
        "routes: echo, sim-small, sim-large -> simulator; any other model: 404 model_not_found")
    config = load_config(env={}, overrides={
        "upstreams": {"a": {"base_url": "https://a.example/v1"},
                      "b": {"base_url": "https://b.example/v1"}},
        "routes": [{"model": "gpt-*", "upstreams": ["a", "b"]},
                   {"model": "*", "upstreams": ["b"]}],
    })
    assert Router(config, session).describe() == "routes: gpt-* -> a, then b; * -> b"


async def test_models_of_a_real_upstream_come_from_its_own_listing(
    relay: RunningServer, session: aiohttp.ClientSession
) -> None:
    # The relay's upstream is a separate simulator process-alike over HTTP, not the built-in one.
    assert await _model_ids(session, relay.url) == list(MODELS)


async def test_models_literal_routes_and_globs(start_server: StartServer,
                                               simulator: SimulatorServer,
                                               session: aiohttp.ClientSession) -> None:
    server = await start_server(overrides={
        "upstreams": {"sim": {"base_url": simulator.url}},
        "routes": [{"model": "my-alias", "upstreams": ["sim"]},
                   {"model": "sim-*", "upstreams": ["sim"]}],
    })
    assert await _model_ids(session, server.url) == ["my-alias", "sim-small", "sim-large"]


async def test_models_unreachable_upstream_lists_nothing(start_server: StartServer,
                                                         session: aiohttp.ClientSession) -> None:
    server = await start_server(overrides=relay_overrides("http://127.0.0.1:9/v1"))
    assert await _model_ids(session, server.url) == []


def _metric(text: str, name: str, **labels: str) -> float:
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        key, _, value = line.rpartition(" ")
        if key == (f"{name}{{{want}}}" if labels else name):
            return float(value)
    return 0.0


async def test_metrics_count_requests_errors_and_hangups(
    relay: RunningServer, simulator: SimulatorServer, session: aiohttp.ClientSession
) -> None:
    async with session.post(f"{relay.url}/v1/chat/completions", data=b"{") as response:
        assert response.status == 400
    body = {"model": "sim-small", "messages": [{"role": "user", "content": "x"}],
            "stream": True, "simulate": {"rate": 20, "tokens": 200}}
    response = await session.post(f"{relay.url}/v1/chat/completions", json=body)
    await response.content.readany()
    response.close()
    for _ in range(100):
        if simulator.stats.disconnected:
            break
        await asyncio.sleep(0.02)
    async with session.get(f"{relay.url}/metrics") as response:
        text = await response.text()
    assert _metric(text, "streamsvc_stream_errors_total", code="bad_request") == 1
    assert _metric(text, "streamsvc_requests_total",
                   endpoint="/v1/chat/completions", status="400") == 1
    assert _metric(text, "streamsvc_client_hangups_total") == 1
    assert _metric(text, "streamsvc_streams_started_total", kind="openai") == 1


async def test_metrics_time_to_first_token_gaps_tokens_and_retries(
    start_server: StartServer, simulator: SimulatorServer, session: aiohttp.ClientSession
) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    server = await start_server(overrides=relay_overrides(
        simulator.url, pipeline={"retry_backoff_base_ms": 1, "retry_backoff_max_ms": 50,
                                 "coalesce": False}))
    body = {"model": "sim-small", "messages": [{"role": "user", "content": "x"}],
            "simulate": {"tokens": 6, "rate": 100, "fault": "500", "fail_times": 1, "key": "m"}}
    async with session.post(f"{server.url}/v1/chat/stream", json=body) as response:
        text = await response.text()
    assert "event: done" in text
    async with session.get(f"{server.url}/metrics") as response:
        families = {f.name: f for f in text_string_to_metric_families(await response.text())}

    def value(family: str, sample: str, **labels: str) -> float:
        return next(s.value for s in families[family].samples
                    if s.name == sample and all(s.labels.get(k) == v for k, v in labels.items()))

    first = "streamsvc_time_to_first_token_seconds"
    gaps = "streamsvc_inter_token_gap_seconds"
    assert value(first, first + "_count") == 1
    assert value(first, first + "_sum") > 0
    assert text.count("event: ") == 1  # only the done event is named
    deltas = text.count("data: {") - 1  # every event but the done event
    assert value(gaps, gaps + "_count") == deltas - 1
    assert value("streamsvc_tokens_relayed", "streamsvc_tokens_relayed_total") == deltas
    retries = families["streamsvc_upstream_retries"].samples
    assert sum(s.value for s in retries if s.name.endswith("_total")) == 1


async def test_metrics_cover_the_openai_endpoint_too(
    start_server: StartServer, simulator: SimulatorServer, session: aiohttp.ClientSession
) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    server = await start_server(overrides=relay_overrides(
        simulator.url, pipeline={"retry_backoff_base_ms": 1, "retry_backoff_max_ms": 50}))
    body = {"model": "sim-small", "messages": [{"role": "user", "content": "x"}], "stream": True,
            "simulate": {"tokens": 5, "rate": 100, "fault": "500", "fail_times": 1, "key": "o"}}
    async with session.post(f"{server.url}/v1/chat/completions", json=body) as response:
        assert (await response.text()).endswith("data: [DONE]\n\n")
    async with session.get(f"{server.url}/metrics") as response:
        samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
                   for f in text_string_to_metric_families(await response.text())
                   for s in f.samples}
    assert samples[("streamsvc_time_to_first_token_seconds_count", ())] == 1
    assert samples[("streamsvc_tokens_relayed_total", ())] >= 2
    assert sum(v for (name, _), v in samples.items()
               if name == "streamsvc_upstream_retries_total") == 1


def test_local_histogram_counts_as_prometheus_does() -> None:
    """The lock-free token histograms: a value on a bound falls in that bound's bucket (le)."""
    from prometheus_client import CollectorRegistry, Histogram, generate_latest

    from streamsvc.server.metrics import LocalHistogram

    bounds = (0.01, 0.1, 1.0)
    ours = LocalHistogram(bounds)
    registry = CollectorRegistry()
    theirs = Histogram("h", "h", buckets=bounds, registry=registry)
    for value in (0.0, 0.01, 0.05, 0.1, 0.5, 1.0, 7.0):
        ours.observe(value)
        theirs.observe(value)
    expected = [line for line in generate_latest(registry).decode().splitlines()
                if line.startswith(("h_bucket", "h_count", "h_sum"))]
    family = ours.family("h", "h")
    got = [f'{s.name}{{le="{s.labels["le"]}"}} {float(s.value)}' if "le" in s.labels
           else f"{s.name} {float(s.value)}" for s in family.samples]
    assert got == expected
