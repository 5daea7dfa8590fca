"""The streamsvc event format over real sockets: ``/v1/chat/stream`` and ``/v1/streams``.

Covers the framing (``retry`` in the first event's block, ``id: <stream>:<seq>`` on every event,
deltas, ``done``), resuming by ``Last-Event-ID`` without a second upstream
request, ``204`` after the end, ``DELETE``, the resume grace period and the
retention window.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import aiohttp
import pytest
import reactivex

from streamsvc.pipeline import StreamContext
from streamsvc.server.state import REGISTRY
from streamsvc.simulator import SimulatorServer, echo_tokens, generated_tokens
from streamsvc.sse import ServerSentEvent, SSEDecoder
from streamsvc.streams.generation import Generation, GenerationState
from streamsvc.streams.registry import StreamRegistry
from tests.conftest import RunningServer, StartServer, relay_overrides
from tests.conftest import wait_until as _wait_until
from tests.helpers import PROMPT, Read, expected, get_events, read_events

TORTURE = (
    "  leading spaces\r\ncrlf line\rlone cr\nlf line\n\nblank above\n"
    "data: x\nid: 1\n: c\nevent: done\nretry: 5\n\n\n"
    "東京タワーは高いです 世界 🙂👍🏽 <b>html</b> &amp; \"quotes\" \\back\\slash\t tab  \n"
)


def _body(text: str = "hello", model: str = "echo", **more: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": text}], **more}


def _query(rate: float, tokens: int, **simulate: Any) -> dict[str, str]:
    extra = {"simulate": {"rate": rate, "tokens": tokens, **simulate}}
    return {"q": PROMPT, "model": "sim-small", "extra": json.dumps(extra)}


def _check_framing(read: Read, stream_id: str, *, first_seq: int = 1) -> None:
    assert read.status == 200
    assert read.headers["Content-Type"].startswith("text/event-stream")
    assert read.headers["X-Stream-ID"] == stream_id
    # The retry field goes out in the first event's block, never in a block of its own.
    first = next(block for block in read.raw.split(b"\n\n") if not block.startswith(b":"))
    assert first.startswith(b"retry: 1000\nid: ") and b"\ndata: " in first, first
    assert read.raw.count(b"retry: ") == 1
    assert read.retry == 1000
    assert read.events, "no events"
    assert read.seqs == list(range(first_seq, first_seq + len(read.events)))
    for event in read.events:
        assert event.id is not None and event.id.startswith(stream_id + ":")
        assert event.event in ("message", "done", "error")
    for event in read.events[:-1]:
        assert event.event == "message"
        data = json.loads(event.data)
        assert isinstance(data, dict)
        assert set(data) <= {"content", "role", "index"}, data
    # Every frame ends with its blank line: nothing is left for a browser to discard.
    assert read.raw.endswith(b"\n\n")


# ---------------------------------------------------------------------------
# framing and lossless text


async def test_post_chat_stream_torture_text(
    relay: RunningServer, session: aiohttp.ClientSession, simulator: SimulatorServer
) -> None:
    async with session.post(f"{relay.url}/v1/chat/stream", json=_body(TORTURE)) as r:
        read = await read_events(r)
    stream_id = read.headers["X-Stream-ID"]
    _check_framing(read, stream_id)
    assert read.text == TORTURE
    assert read.text.encode() == TORTURE.encode()
    assert read.events[-1].event == "done"
    done = read.final()
    assert done["finish_reason"] == "stop"
    assert done["usage"]["completion_tokens"] == len(echo_tokens(TORTURE))
    assert done["usage"]["total_tokens"] == (
        done["usage"]["prompt_tokens"] + done["usage"]["completion_tokens"]
    )
    assert "X-Request-ID" in read.headers
    assert simulator.stats.requests == 1
    # Deltas are default events (EventSource.onmessage) and nothing carries a raw CR.
    assert b"\r" not in read.raw
    assert b"event: message" not in read.raw


async def test_post_chat_stream_stream_false_still_streams(
    relay: RunningServer, session: aiohttp.ClientSession
) -> None:
    async with session.post(f"{relay.url}/v1/chat/stream", json=_body(" hi")) as r:
        read = await read_events(r)
    assert read.text == " hi"
    assert read.final()["finish_reason"] == "stop"


async def test_post_chat_stream_n2_carries_index(
    relay: RunningServer, session: aiohttp.ClientSession
) -> None:
    body = _body(PROMPT, model="sim-small", n=2, simulate={"tokens": 20})
    async with session.post(f"{relay.url}/v1/chat/stream", json=body) as r:
        read = await read_events(r)
    texts: dict[int, str] = {0: "", 1: ""}
    for event in read.events[:-1]:
        data = json.loads(event.data)
        texts[data.get("index", 0)] += data.get("content", "")
    assert texts == {i: "".join(generated_tokens("sim-small", PROMPT, 20, choice=i))
                     for i in range(2)}
    done = read.final()
    assert done["finish_reasons"] == {"0": "stop", "1": "stop"}


async def test_one_shot_get_torture_text(
    relay: RunningServer, session: aiohttp.ClientSession, simulator: SimulatorServer
) -> None:
    read = await get_events(session, f"{relay.url}/v1/chat/stream",
                      params={"q": TORTURE, "model": "echo"})
    _check_framing(read, read.headers["X-Stream-ID"])
    assert read.text == TORTURE
    assert read.final()["finish_reason"] == "stop"
    assert simulator.stats.recent[-1]["body"]["messages"] == [{"role": "user", "content": TORTURE}]


async def test_one_shot_get_messages_as_json(
    relay: RunningServer, session: aiohttp.ClientSession
) -> None:
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": " 世界\n"}]
    read = await get_events(session, f"{relay.url}/v1/chat/stream",
                      params={"messages": json.dumps(messages), "model": "echo"})
    assert read.text == " 世界\n"


async def test_create_stream_then_read_events(
    relay: RunningServer, session: aiohttp.ClientSession, simulator: SimulatorServer
) -> None:
    before = time.time()
    async with session.post(f"{relay.url}/v1/streams", json=_body(TORTURE)) as r:
        assert r.status == 201
        created = await r.json()
        assert r.headers["X-Stream-ID"] == created["id"]
    stream_id = created["id"]
    assert created["events_url"] == f"/v1/streams/{stream_id}/events"
    assert created["expires_at"] >= int(before)
    read = await get_events(session, relay.url + created["events_url"])
    _check_framing(read, stream_id)
    assert read.text == TORTURE
    assert read.final()["finish_reason"] == "stop"
    assert simulator.stats.requests == 1


async def test_events_url_two_concurrent_readers_get_everything(
    relay: RunningServer, session: aiohttp.ClientSession, simulator: SimulatorServer
) -> None:
    body = _body(PROMPT, model="sim-small", simulate={"rate": 50, "tokens": 30})
    async with session.post(f"{relay.url}/v1/streams", json=body) as r:
        created = await r.json()
    url = relay.url + created["events_url"]
    async with aiohttp.ClientSession() as other:
        first, second = await asyncio.gather(get_events(session, url), get_events(other, url))
    for read in (first, second):
        _check_framing(read, created["id"])
        assert read.text == expected(30)
        assert read.final()["finish_reason"] == "stop"
    assert [(e.id, e.event, e.data) for e in first.events] == [
        (e.id, e.event, e.data) for e in second.events
    ]
    assert simulator.stats.requests == 1


# ---------------------------------------------------------------------------
# resume


@pytest.mark.parametrize("how", ["header", "lastEventId", "Last-Event-ID"])
async def test_one_shot_get_resumes_without_a_second_upstream_request(
    relay: RunningServer, session: aiohttp.ClientSession, simulator: SimulatorServer, how: str,
) -> None:
    url = f"{relay.url}/v1/chat/stream"
    part = await get_events(session, url, params=_query(50, 40), stop_after=5)  # 0.8 s
    stream_id = part.headers["X-Stream-ID"]
    _check_framing(part, stream_id)
    assert len(part.events) == 5
    assert part.events[-1].event == "message"  # really cut mid-stream
    last_id = part.last_id
    assert last_id == f"{stream_id}:5"

    if how == "header":
        rest = await get_events(session, url, headers={"Last-Event-ID": last_id})
    else:
        rest = await get_events(session, url, params={how: last_id})
    _check_framing(rest, stream_id, first_seq=6)
    assert rest.final()["finish_reason"] == "stop"
    assert part.text + rest.text == expected(40)
    assert simulator.stats.requests == 1

    # After the final event: 204, which stops EventSource for good.
    async with session.get(url, headers={"Last-Event-ID": rest.last_id}) as r:
        assert r.status == 204
        assert await r.read() == b""
    assert simulator.stats.requests == 1

    # A full replay from the start gives the same events again.
    again = await get_events(session, url, headers={"Last-Event-ID": f"{stream_id}:0"})
    assert [e.data for e in again.events] == [e.data for e in part.events + rest.events]
    assert simulator.stats.requests == 1


async def test_events_url_resume_header_and_query(
    relay: RunningServer, session: aiohttp.ClientSession, simulator: SimulatorServer
) -> None:
    body = _body(PROMPT, model="sim-small", simulate={"rate": 50, "tokens": 40})  # 0.8 s
    async with session.post(f"{relay.url}/v1/streams", json=body) as r:
        created = await r.json()
    url = relay.url + created["events_url"]
    part = await get_events(session, url, stop_after=4)
    assert part.events[-1].event == "message"  # left mid-stream
    rest_q = await get_events(session, url, params={"lastEventId": part.last_id})
    rest_h = await get_events(session, url, headers={"Last-Event-ID": part.last_id})
    _check_framing(rest_q, created["id"], first_seq=5)
    assert part.text + rest_q.text == expected(40)
    assert [e.data for e in rest_h.events] == [e.data for e in rest_q.events]
    # The header wins over the query parameter.
    both = await get_events(session, url, headers={"Last-Event-ID": part.last_id},
                      params={"lastEventId": f"{created['id']}:1"})
    assert both.seqs[0] == 5
    async with session.get(url, params={"lastEventId": rest_q.last_id}) as r:
        assert r.status == 204
    assert simulator.stats.requests == 1


async def test_resume_errors(relay: RunningServer, session: aiohttp.ClientSession) -> None:
    url = f"{relay.url}/v1/chat/stream"
    read = await get_events(session, url, params={"q": " a b", "model": "echo"})
    stream_id = read.headers["X-Stream-ID"]
    last = read.seqs[-1]
    async with session.get(url, headers={"Last-Event-ID": f"{stream_id}:{last + 1}"}) as r:
        assert r.status == 400
        error = (await r.json())["error"]
    assert error["param"] == "Last-Event-ID"
    assert "Last-Event-ID" in error["message"]
    events_url = f"{relay.url}/v1/streams/{stream_id}/events"
    async with session.get(events_url, headers={"Last-Event-ID": f"{stream_id}:{last + 5}"}) as r:
        assert r.status == 400
    # A Last-Event-ID from another stream on an events URL.
    other = "st_" + "0" * 24
    async with session.get(events_url, headers={"Last-Event-ID": f"{other}:1"}) as r:
        assert r.status == 400
        assert (await r.json())["error"]["param"] == "Last-Event-ID"
    # Unknown stream ids: 404.
    unknown = "st_" + "ab" * 12
    async with session.get(url, headers={"Last-Event-ID": f"{unknown}:3"}) as r:
        assert r.status == 404
        assert (await r.json())["error"]["code"] == "not_found"
    async with session.get(f"{relay.url}/v1/streams/{unknown}/events") as r:
        assert r.status == 404
        assert (await r.json())["error"]["code"] == "not_found"
    async with session.get(f"{relay.url}/v1/streams/not-a-stream/events") as r:
        assert r.status == 404


# ---------------------------------------------------------------------------
# DELETE


async def test_delete_mid_stream_cancels_upstream(
    relay: RunningServer, session: aiohttp.ClientSession, simulator: SimulatorServer
) -> None:
    body = _body(PROMPT, model="sim-small", simulate={"rate": 20, "tokens": 200})
    async with session.post(f"{relay.url}/v1/streams", json=body) as r:
        created = await r.json()
    stream_id = created["id"]
    url = relay.url + created["events_url"]

    async def read_all(client: aiohttp.ClientSession) -> Read:
        return await get_events(client, url)

    async with aiohttp.ClientSession() as other:
        readers = [asyncio.ensure_future(read_all(session)), asyncio.ensure_future(read_all(other))]
        assert await _wait_until(lambda: simulator.stats.active == 1)
        await asyncio.sleep(0.3)  # a few tokens in
        assert not any(reader.done() for reader in readers)
        async with session.delete(f"{relay.url}/v1/streams/{stream_id}") as r:
            assert r.status == 200
            answer = await r.json()
        assert answer == {"id": stream_id, "object": "stream", "status": "cancelled"}
        results = await asyncio.wait_for(asyncio.gather(*readers), timeout=10)
    for read in results:
        _check_framing(read, stream_id)
        assert read.events[-1].event == "done"
        assert read.final()["finish_reason"] == "cancelled"
        assert read.text and expected(200).startswith(read.text)
        assert read.text != expected(200)
    assert await _wait_until(lambda: simulator.stats.disconnected == 1)
    assert simulator.stats.completed == 0
    # Deleting again: it has ended, nothing to stop; the journal still has it.
    async with session.delete(f"{relay.url}/v1/streams/{stream_id}") as r:
        assert r.status == 200
        assert (await r.json())["status"] == "ended"
    assert simulator.stats.disconnected == 1


async def test_delete_while_first_token_awaited(
    relay: RunningServer, session: aiohttp.ClientSession, simulator: SimulatorServer
) -> None:
    body = _body(PROMPT, model="sim-small", simulate={"first_token_delay": 30, "tokens": 5})
    async with session.post(f"{relay.url}/v1/streams", json=body) as r:
        created = await r.json()
    reader = asyncio.ensure_future(get_events(session, relay.url + created["events_url"]))
    assert await _wait_until(lambda: simulator.stats.active == 1)
    async with session.delete(f"{relay.url}/v1/streams/{created['id']}") as r:
        assert (await r.json())["status"] == "cancelled"
    read = await asyncio.wait_for(reader, timeout=10)
    _check_framing(read, created["id"])
    assert read.final()["finish_reason"] == "cancelled"
    assert read.text == ""
    assert await _wait_until(lambda: simulator.stats.disconnected == 1)


async def test_delete_a_post_chat_stream(
    relay: RunningServer, session: aiohttp.ClientSession, simulator: SimulatorServer
) -> None:
    body = _body(PROMPT, model="sim-small", simulate={"rate": 20, "tokens": 200})
    async with session.post(f"{relay.url}/v1/chat/stream", json=body) as r:
        stream_id = r.headers["X-Stream-ID"]
        decoder = SSEDecoder()
        events: list[ServerSentEvent] = []
        deleted = False
        async for data in r.content.iter_any():
            events.extend(decoder.feed(data))
            if len(events) >= 2 and not deleted:
                deleted = True
                async with session.delete(f"{relay.url}/v1/streams/{stream_id}") as d:
                    assert d.status == 200
    assert events[-1].event == "done"
    assert json.loads(events[-1].data)["finish_reason"] == "cancelled"
    assert await _wait_until(lambda: simulator.stats.disconnected == 1)


async def test_delete_unknown_stream_is_404(
    relay: RunningServer, session: aiohttp.ClientSession
) -> None:
    async with session.delete(f"{relay.url}/v1/streams/st_{'0' * 24}") as r:
        assert r.status == 404
        error = (await r.json())["error"]
    assert error["code"] == "not_found"
    assert error["param"] == "id"
    async with session.delete(f"{relay.url}/v1/streams/nonsense") as r:
        assert r.status == 404


# ---------------------------------------------------------------------------
# grace and retention


async def test_grace_expires_cancels_upstream(
    start_server: StartServer, simulator: SimulatorServer, session: aiohttp.ClientSession
) -> None:
    relay = await start_server(
        overrides=relay_overrides(simulator.url, journal={"resume_grace_s": 0.5})
    )
    body = _body(PROMPT, model="sim-small", simulate={"rate": 20, "tokens": 200})
    async with session.post(f"{relay.url}/v1/streams", json=body) as r:
        created = await r.json()
    url = relay.url + created["events_url"]
    part = await get_events(session, url, stop_after=3)
    left = time.monotonic()
    # Inside the grace the upstream keeps going: looked at once the relay has seen the
    # reader go while the generation still runs. Both are checked in the same turn of the
    # loop as what follows, so the grace timer cannot fire in between.
    generation = relay.app[REGISTRY].get(created["id"])
    assert generation is not None
    assert await _wait_until(lambda: generation.readers == 0)
    assert generation.state is GenerationState.RUNNING
    assert simulator.stats.disconnected == 0
    assert simulator.stats.active == 1
    assert await _wait_until(lambda: simulator.stats.disconnected == 1)
    assert time.monotonic() - left >= 0.5
    assert simulator.stats.requests == 1
    rest = await get_events(session, url, headers={"Last-Event-ID": part.last_id})
    _check_framing(rest, created["id"], first_seq=4)
    assert rest.final()["finish_reason"] == "cancelled"
    text = part.text + rest.text
    assert expected(200).startswith(text)
    # It generated while nobody was reading.
    assert len(rest.events) > 2
    assert simulator.stats.requests == 1


async def test_grace_expires_for_one_shot_get(
    start_server: StartServer, simulator: SimulatorServer, session: aiohttp.ClientSession
) -> None:
    relay = await start_server(
        overrides=relay_overrides(simulator.url, journal={"resume_grace_s": 0.5})
    )
    url = f"{relay.url}/v1/chat/stream"
    part = await get_events(session, url, params=_query(20, 200), stop_after=3)
    assert await _wait_until(lambda: simulator.stats.disconnected == 1)
    rest = await get_events(session, url, headers={"Last-Event-ID": part.last_id})
    assert rest.final()["finish_reason"] == "cancelled"
    assert expected(200).startswith(part.text + rest.text)


async def test_grace_with_nobody_attaching(
    start_server: StartServer, simulator: SimulatorServer, session: aiohttp.ClientSession
) -> None:
    relay = await start_server(
        overrides=relay_overrides(simulator.url, journal={"resume_grace_s": 0.5})
    )
    body = _body(PROMPT, model="sim-small", simulate={"rate": 20, "tokens": 200})
    async with session.post(f"{relay.url}/v1/streams", json=body) as r:
        created = await r.json()
    assert await _wait_until(lambda: simulator.stats.disconnected == 1)
    read = await get_events(session, relay.url + created["events_url"])
    assert read.final()["finish_reason"] == "cancelled"


async def test_reader_back_within_grace_completes_normally(
    start_server: StartServer, simulator: SimulatorServer, session: aiohttp.ClientSession
) -> None:
    relay = await start_server(
        overrides=relay_overrides(simulator.url, journal={"resume_grace_s": 3.0})
    )
    body = _body(PROMPT, model="sim-small", simulate={"rate": 40, "tokens": 60})
    async with session.post(f"{relay.url}/v1/streams", json=body) as r:
        created = await r.json()
    url = relay.url + created["events_url"]
    part = await get_events(session, url, stop_after=3)
    await asyncio.sleep(0.1)
    rest = await get_events(session, url, headers={"Last-Event-ID": part.last_id})
    _check_framing(rest, created["id"], first_seq=4)
    assert rest.final()["finish_reason"] == "stop"
    assert part.text + rest.text == expected(60)
    assert simulator.stats.disconnected == 0
    assert simulator.stats.completed == 1
    assert simulator.stats.requests == 1


async def test_retention_then_404(
    start_server: StartServer, simulator: SimulatorServer, session: aiohttp.ClientSession
) -> None:
    relay = await start_server(
        overrides=relay_overrides(simulator.url, journal={"retention_s": 1.0})
    )
    url = f"{relay.url}/v1/chat/stream"
    read = await get_events(session, url, params={"q": " a b c", "model": "echo"})
    ended = time.monotonic()
    stream_id = read.headers["X-Stream-ID"]
    async with session.get(url, headers={"Last-Event-ID": read.last_id}) as r:
        assert r.status == 204  # at once: well inside the retention window (1 s)
    deadline = time.monotonic() + 5
    while True:  # poll over HTTP: 204 while retained, then 404
        async with session.get(url, headers={"Last-Event-ID": read.last_id}) as r:
            if r.status == 404:
                break
            assert r.status == 204
        assert time.monotonic() < deadline, "the stream never expired"
        await asyncio.sleep(0.05)
    # Retention counts from the final event (just before this client read it).
    assert time.monotonic() - ended >= 0.9
    for headers in ({"Last-Event-ID": read.last_id}, {"Last-Event-ID": f"{stream_id}:0"}):
        async with session.get(url, headers=headers) as r:
            assert r.status == 404
            assert (await r.json())["error"]["code"] == "not_found"
    async with session.get(f"{relay.url}/v1/streams/{stream_id}/events") as r:
        assert r.status == 404
    async with session.delete(f"{relay.url}/v1/streams/{stream_id}") as r:
        assert r.status == 404



# ---------------------------------------------------------------------------
# issue 12, item 9: naive clients that loop


def _dispatched_blocks(raw: bytes) -> list[bytes]:
    """The blocks a client that dispatches at every blank line (fetch-event-source) hands on,
    minus comment-only ones (pings)."""
    blocks = raw.replace(b"\r\n", b"\n").split(b"\n\n")[:-1]
    return [b for b in blocks if not all(line.startswith(b":") for line in b.split(b"\n"))]


async def test_retry_goes_out_with_the_first_event_never_alone(
    relay: RunningServer, session: aiohttp.ClientSession
) -> None:
    reads = []
    async with session.post(f"{relay.url}/v1/chat/stream", json=_body(" hi")) as r:
        reads.append(await read_events(r))
    reads.append(await get_events(session, f"{relay.url}/v1/chat/stream",
                            params={"q": " hi", "model": "echo"}))
    async with session.post(f"{relay.url}/v1/streams", json=_body(" hi")) as r:
        created = await r.json()
    reads.append(await get_events(session, relay.url + created["events_url"]))
    failing = _body(" hi", simulate={"fault": "429"}, streamsvc={"retries": False})
    async with session.post(f"{relay.url}/v1/chat/stream", json=failing) as r:
        reads.append(await read_events(r))  # the first event is the error
    assert reads[-1].events[-1].event == "error"
    for read in reads:
        blocks = _dispatched_blocks(read.raw)
        assert blocks[0].startswith(b"retry: 1000\nid: "), blocks[0]
        for block in blocks:  # each one JSON.parse can take
            (data,) = [line for line in block.split(b"\n") if line.startswith(b"data: ")]
            json.loads(data[6:])


async def test_a_post_with_the_last_event_id_of_an_ended_stream_gets_204_not_a_new_generation(
    relay: RunningServer, session: aiohttp.ClientSession, simulator: SimulatorServer
) -> None:
    body = _body(" hello")
    async with session.post(f"{relay.url}/v1/chat/stream", json=body) as r:
        direct = await read_events(r)
    async with session.post(f"{relay.url}/v1/streams", json=body) as r:
        created = await r.json()
    journaled = await get_events(session, relay.url + created["events_url"])
    assert simulator.stats.requests == 2
    for last_id in (direct.last_id, journaled.last_id):
        # aiohttp-sse-client re-POSTs with Last-Event-ID after each end: three times here.
        for path in ("/v1/chat/stream", "/v1/streams", "/v1/chat/stream"):
            async with session.post(f"{relay.url}{path}", json=body,
                                    headers={"Last-Event-ID": last_id}) as r:
                assert r.status == 204, await r.text()
                assert r.headers["X-Stream-ID"] == last_id.rpartition(":")[0]
        async with session.post(f"{relay.url}/v1/chat/stream", json=body,
                                params={"lastEventId": last_id}) as r:
            assert r.status == 204
    assert simulator.stats.requests == 2  # no generation started again


async def test_a_post_with_the_last_event_id_of_a_running_stream_never_starts_a_generation(
    relay: RunningServer, session: aiohttp.ClientSession, simulator: SimulatorServer
) -> None:
    slow = _body(PROMPT, model="sim-small", simulate={"rate": 40, "tokens": 30})
    async with session.post(f"{relay.url}/v1/streams", json=slow) as r:
        created = await r.json()
    stream_id = created["id"]
    # A journaled stream: POST /v1/chat/stream resumes it; POST /v1/streams names it again.
    async with session.post(f"{relay.url}/v1/streams", json=slow,
                            headers={"Last-Event-ID": f"{stream_id}:0"}) as r:
        assert r.status == 200
        again = await r.json()
    assert again["id"] == stream_id and again["events_url"] == created["events_url"]
    async with session.post(f"{relay.url}/v1/chat/stream", json=slow,
                            headers={"Last-Event-ID": f"{stream_id}:1"}) as r:
        resumed = await read_events(r)
    _check_framing(resumed, stream_id, first_seq=2)
    assert resumed.final()["finish_reason"] == "stop"
    # A direct stream that its one client is reading: 409, and it goes on.
    async with session.post(f"{relay.url}/v1/chat/stream", json=slow) as r:
        first = await read_events(r, stop_after=1)  # hangs up: the stream is cancelled, ended here
        direct_id = first.headers["X-Stream-ID"]
    async with session.post(f"{relay.url}/v1/chat/stream", json=slow) as reading:
        decoder = SSEDecoder()
        event_id = None
        async for data in reading.content.iter_any():
            events = decoder.feed(data)
            if events:
                event_id = events[0].id
                break
        assert event_id is not None
        async with session.post(f"{relay.url}/v1/chat/stream", json=slow,
                                headers={"Last-Event-ID": event_id}) as r:
            assert r.status == 409
            error = (await r.json())["error"]
        assert error["param"] == "Last-Event-ID" and "POST /v1/streams" in error["message"]
        rest = await read_events(reading)
    assert rest.final()["finish_reason"] == "stop"
    async with session.post(f"{relay.url}/v1/chat/stream", json=slow,
                            headers={"Last-Event-ID": f"{direct_id}:1"}) as r:
        assert r.status == 204  # cancelled when its client left: ended, nothing to replay
    assert simulator.stats.requests == 3


STREAM_ID = f"st_{'a' * 24}"


@pytest.mark.parametrize("path", ["/v1/chat/stream", "/v1/streams"])
async def test_a_post_with_an_unknown_or_malformed_last_event_id_starts_nothing(
    relay: RunningServer, session: aiohttp.ClientSession, simulator: SimulatorServer, path: str,
) -> None:
    for value, status, code in ((f"{STREAM_ID}:3", 404, "not_found"),
                                (f"st_{'a' * 24}:²", 400, "bad_request"),
                                ("garbage", 400, "bad_request")):
        async with session.post(f"{relay.url}{path}", json=_body(),
                                headers={"Last-Event-ID": value.encode().decode("latin-1")}) as r:
            assert r.status == status
            error = (await r.json())["error"]
        assert error["code"] == code and error["param"] == "Last-Event-ID", error
    async with session.post(f"{relay.url}{path}", json=_body(),
                            params={"lastEventId": f"{STREAM_ID}:3"}) as r:
        assert r.status == 404 and (await r.json())["error"]["param"] == "lastEventId"
    assert simulator.stats.requests == 0


class _NoSink:
    def put(self, chunk: Any) -> bool:
        return False

    def end(self, ending: Any) -> None:
        pass

    def fail(self, error: Any) -> None:
        pass


async def test_registry_remembers_ended_direct_streams_for_retention_and_up_to_its_bound(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    registry = StreamRegistry(resume_grace_s=10, retention_s=0.2)
    monkeypatch.setattr(StreamRegistry, "MAX_ENDED", 3)

    def run(stream_id: str, *, resumable: bool = False) -> None:
        context = StreamContext(key_id="k")
        registry.start(Generation(stream_id, reactivex.never(), context, _NoSink(),
                                  resumable=resumable), readers=1)

    run("st_live")
    assert registry.direct("st_live") == (True, "k")
    registry.cancel_here("st_live")
    await asyncio.sleep(0)
    assert registry.direct("st_live") == (False, "k")
    for i in range(4):
        run(f"st_{i}")
        registry.cancel_here(f"st_{i}")
        await asyncio.sleep(0)
    assert [registry.direct(f"st_{i}") for i in range(4)] == [None, (False, "k"), (False, "k"),
                                                              (False, "k")]  # the oldest went
    assert registry.direct("st_live") is None
    run("st_resumable", resumable=True)
    registry.cancel_here("st_resumable")
    await asyncio.sleep(0)
    assert registry.direct("st_resumable") is None  # the journal keeps those
    await asyncio.sleep(0.25)
    assert registry.direct("st_3") is None  # past retention_s


async def test_a_generation_calls_what_waits_for_its_end_once_in_the_end_s_own_call(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """``when_ended``: each callback once, right after ``ended`` is set (not a turn of the loop
    later), one that fails does not keep the next from running, and a callback given after
    the end runs at once."""
    generation = Generation("st_hooks", reactivex.never(), StreamContext(), _NoSink(),
                            resumable=False)
    calls: list[tuple[str, bool]] = []

    def failing() -> None:
        calls.append(("failing", generation.ended.done()))
        raise RuntimeError("a bug")

    generation.when_ended(lambda: calls.append(("first", generation.ended.done())))
    generation.when_ended(failing)
    generation.when_ended(lambda: calls.append(("last", generation.ended.done())))
    generation.start()
    assert calls == []
    generation.stop("cancelled")
    assert calls == [("first", True), ("failing", True), ("last", True)]
    assert "a callback at its end failed" in caplog.text
    generation.stop("cancelled")
    generation.when_ended(lambda: calls.append(("after", generation.ended.done())))
    assert calls[3:] == [("after", True)]
