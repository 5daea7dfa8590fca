"""The upstream key reaches the upstream, and nothing else: not a client, not a log line.

Prompts stay out of the logs too (the one-shot GET carries one in its query).
"""

from __future__ import annotations

import logging

import aiohttp
import pytest

from streamsvc.simulator import SimulatorServer
from tests.conftest import StartServer

SECRET = "sk-test-0123456789abcdef-do-not-leak"
PROMPT = "my private question 7f3a9"


async def test_upstream_key_is_sent_upstream_but_never_to_clients_or_logs(
    start_server: StartServer, simulator: SimulatorServer, session: aiohttp.ClientSession,
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.setenv("TEST_UPSTREAM_KEY", SECRET)
    caplog.set_level(logging.DEBUG)
    relay = await start_server(overrides={
        "upstreams": {"sim": {"base_url": simulator.url, "api_key_env": "TEST_UPSTREAM_KEY"}},
        "routes": [{"model": "*", "upstreams": ["sim"]}],
        "pipeline": {"retry_backoff_base_ms": 1, "retry_backoff_max_ms": 2},
    })
    seen: list[str] = []
    body = {"model": "echo", "messages": [{"role": "user", "content": PROMPT}]}
    requests = [
        ("POST", "/v1/chat/completions", {**body, "stream": True}),
        ("POST", "/v1/chat/completions", body),
        ("POST", "/v1/chat/stream", body),
        ("POST", "/v1/chat/completions",
         {**body, "stream": True, "simulate": {"fault": "500", "retry_after": 0}}),
        ("POST", "/v1/chat/stream", {**body, "simulate": {"fault": "error_event"}}),
        ("GET", f"/v1/chat/stream?model=echo&q={PROMPT.replace(' ', '%20')}", None),
        ("POST", "/v1/chat/completions", {**body, "n": 0}),
        ("GET", "/v1/models", None),
        ("GET", "/metrics", None),
    ]
    for method, path, payload in requests:
        async with session.request(method, relay.url + path, json=payload) as response:
            seen.append(str(dict(response.headers)))
            seen.append(await response.text())

    authorizations = [r["headers"].get("Authorization") for r in simulator.stats.recent]
    assert authorizations and all(a == f"Bearer {SECRET}" for a in authorizations)
    assert not any(SECRET in text for text in seen)
    assert "/v1/chat/stream" in caplog.text  # the access log was captured
    assert SECRET not in caplog.text
    assert "sk-test" not in caplog.text
    assert "7f3a9" not in caplog.text  # prompts are not logged either
