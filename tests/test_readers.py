"""A journaled stream's reader (streamsvc.streams.readers.read_journal), on every backend.

The reader replays with ``read`` and ``send``, then, once caught up, takes the
live tail from the journal's own append call (``listen``, ``write_now``). What
the client gets must be the journal's frames, each once and in order, however
the two paths take turns.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable

import pytest

from streamsvc.chunks import Chunk
from streamsvc.errors import ErrorCode, StreamError
from streamsvc.journal.base import Event, Journal
from streamsvc.journal.memory import MemoryJournal
from streamsvc.streams.readers import read_journal
from streamsvc.streams.sinks import JournalSink
from streamsvc.wire import Ending
from tests.conftest import JOURNAL_BACKENDS, JournalFactory, journal_factory, wait_until

BACKENDS = JOURNAL_BACKENDS


def msg(text: str) -> tuple[str, bytes]:
    return ("message", b'{"content":"%s"}' % text.encode())


DONE = ("done", b'{"finish_reason":"stop","usage":null}')


def text(content: str) -> Chunk:
    data = {"id": "c1", "object": "chat.completion.chunk",
            "choices": [{"index": 0, "delta": {"content": content}, "finish_reason": None}]}
    return Chunk(data, json.dumps(data, separators=(",", ":")).encode())


class FakeConnection:
    """Records what the reader writes; ``room`` says whether ``write_now`` may write."""

    def __init__(self, room: Callable[[], bool] = lambda: True, send_s: float = 0.0) -> None:
        self.room = room
        self.send_s = send_s  # how long a send waits for the client
        self.data = bytearray()
        self.sends = 0
        self.direct = 0

    def write_now(self, data: bytes) -> bool:
        if not self.room():
            return False
        self.data += data
        self.direct += 1
        return True

    async def send(self, data: bytes) -> None:
        self.data += data
        self.sends += 1
        if self.send_s:
            await asyncio.sleep(self.send_s)


@pytest.fixture(params=BACKENDS)
async def make(request: pytest.FixtureRequest) -> AsyncIterator[JournalFactory]:
    async with journal_factory(request.param, request) as factory:
        yield factory


async def all_frames(journal: Journal, stream_id: str) -> bytes:
    return b"".join(event.frame for event in await journal.read(stream_id, 0))


async def caught_up(journal: Journal, stream_id: str, connection: FakeConnection,
                    seq: int, first: bytes = b"") -> None:
    """Until the reader has written through ``seq`` and listens (its next write is direct)."""
    frames = first + await all_frames(journal, stream_id)
    assert await wait_until(lambda: bytes(connection.data) == frames, 2)
    assert await journal.last_seq(stream_id) == (seq, False)
    await asyncio.sleep(0)  # the reader's task goes from read() on to listen()


async def test_a_listening_reader_gets_every_event_once_in_order(make: JournalFactory) -> None:
    journal = make()
    await journal.create("s")
    journal.append_nowait("s", [msg("a")])
    connection = FakeConnection()
    reader = asyncio.ensure_future(
        read_journal(connection, journal, "s", 0, first=b"retry: 1\n"))
    await caught_up(journal, "s", connection, 1, b"retry: 1\n")
    for i in range(50):  # one event per append, the one-event path, from plain callbacks
        journal.append_nowait("s", [msg(str(i))])
    journal.append_nowait("s", [msg("x"), msg("y"), msg("z")])  # and a batch between them
    journal.append_nowait("s", [msg("last")])
    journal.append_nowait("s", [DONE])
    assert await asyncio.wait_for(reader, 2) == 56
    assert bytes(connection.data) == b"retry: 1\n" + await all_frames(journal, "s")
    assert connection.sends == 1  # the replay; all the rest came from the append calls
    assert connection.direct > 0


async def test_a_reader_with_no_room_goes_back_to_read_and_loses_nothing(
    make: JournalFactory,
) -> None:
    journal = make()
    await journal.create("s")
    journal.append_nowait("s", [msg("a")])
    calls = [0]

    def room() -> bool:  # every third direct write finds the connection full
        calls[0] += 1
        return calls[0] % 3 != 0

    connection = FakeConnection(room)
    reader = asyncio.ensure_future(read_journal(connection, journal, "s", 0))
    for i in range(40):
        journal.append_nowait("s", [msg(str(i))])
        await asyncio.sleep(0)  # let the reader come back to listen between some of them
        if i % 7 == 0:
            await asyncio.sleep(0.01)
    journal.append_nowait("s", [DONE])
    assert await asyncio.wait_for(reader, 2) == 42
    assert bytes(connection.data) == await all_frames(journal, "s")
    assert connection.sends > 1 and connection.direct > 0  # both paths took turns


async def test_a_reader_whose_writes_are_slower_than_the_tokens_catches_up_in_one_read(
    make: JournalFactory,
) -> None:
    """Found on the Redis journal at 200 streams: a reader that read, wrote, then asked
    whether it had caught up found the writer a few events ahead every time (they came
    during its write, or Redis held them before the flusher heard back), so it read the
    journal once per batch and never took the live tail; at 200 tokens/s the reads drained
    the Redis connection pool and streams ended with journal_unavailable."""
    journal = make()
    await journal.create("s")
    for i in range(5):
        journal.append_nowait("s", [msg(f"early {i}")])
    connection = FakeConnection(send_s=0.02)  # each write to the client takes 20 ms
    reader = asyncio.ensure_future(read_journal(connection, journal, "s", 0))
    for i in range(60):  # a token every 2 ms, ten per write
        journal.append_nowait("s", [msg(str(i))])
        await asyncio.sleep(0.002)
    journal.append_nowait("s", [DONE])
    assert await asyncio.wait_for(reader, 5) == 66
    assert bytes(connection.data) == await all_frames(journal, "s")
    assert connection.sends <= 2, connection.sends  # the replay (and one more at most)
    assert connection.direct > 0


async def test_a_tail_that_keeps_more_than_a_write_slice_gives_way_to_reads(
    make: JournalFactory,
) -> None:
    journal = make()
    await journal.create("s")
    journal.append_nowait("s", [msg("a")])
    connection = FakeConnection(send_s=0.05)
    reader = asyncio.ensure_future(read_journal(connection, journal, "s", 0))
    await asyncio.sleep(0.01)  # the replay's write is under way
    big = "x" * 20_000
    for _ in range(8):  # about 160 KB while the write waits: more than a tail keeps
        journal.append_nowait("s", [msg(big)])
        await asyncio.sleep(0)
    journal.append_nowait("s", [DONE])
    assert await asyncio.wait_for(reader, 5) == 10
    assert bytes(connection.data) == await all_frames(journal, "s")
    assert connection.sends >= 2  # what the tail could not keep came by read


@pytest.mark.parametrize("after", [0, 1, 5, 9, 10])
async def test_a_reader_resumes_after_any_event(make: JournalFactory, after: int) -> None:
    journal = make()
    await journal.create("s")
    for i in range(10):
        await journal.append("s", [msg(str(i))])
    connection = FakeConnection()
    reader = asyncio.ensure_future(read_journal(connection, journal, "s", after))
    await asyncio.sleep(0.01)
    journal.append_nowait("s", [msg("live")])
    journal.append_nowait("s", [DONE])
    assert await asyncio.wait_for(reader, 2) == 12
    events = await journal.read("s", after)
    assert bytes(connection.data) == b"".join(event.frame for event in events)
    assert [event.seq for event in events] == list(range(after + 1, 13))


@pytest.mark.parametrize("bound", ["max_events", "max_bytes"])
async def test_a_bound_ends_a_listening_reader_with_journal_full(
    make: JournalFactory, bound: str,
) -> None:
    probe = MemoryJournal()  # the frames' sizes, to set max_bytes at exactly three events
    await probe.create("s")
    await probe.append("s", [msg("a"), msg("b"), msg("c")])
    size = probe.size("s")
    assert size is not None
    journal = make(**({"max_events": 3} if bound == "max_events" else {"max_bytes": size}))
    await journal.create("s")
    sink = JournalSink(journal, "s")
    assert sink.put(text("a"))
    connection = FakeConnection()
    reader = asyncio.ensure_future(read_journal(connection, journal, "s", 0))
    await caught_up(journal, "s", connection, 1)
    assert sink.put(text("b")) and sink.put(text("c"))  # the third fills the bound exactly
    with pytest.raises(StreamError) as caught:
        sink.put(text("d"))
    assert caught.value.code == ErrorCode.JOURNAL_FULL
    sink.fail(caught.value)  # what the generation does with it: the final event always gets in
    assert await asyncio.wait_for(reader, 2) == 4
    events = await journal.read("s", 0)
    assert [(event.seq, event.kind) for event in events] == [
        (1, "message"), (2, "message"), (3, "message"), (4, "error")]
    assert json.loads(events[-1].data)["code"] == "journal_full"
    assert bytes(connection.data) == b"".join(event.frame for event in events)


async def test_journal_ends_the_live_tail_with_the_stream(make: JournalFactory) -> None:
    journal = make()
    await journal.create("s")
    sink = JournalSink(journal, "s")
    sink.put(text("a"))
    connection = FakeConnection()
    reader = asyncio.ensure_future(read_journal(connection, journal, "s", 0))
    await caught_up(journal, "s", connection, 1)
    sink.put(text(" b"))
    sink.end(Ending(finish_reason="stop"))
    assert await asyncio.wait_for(reader, 2) == 3
    events = await journal.read("s", 0)
    assert [event.kind for event in events] == ["message", "message", "done"]
    assert bytes(connection.data) == b"".join(event.frame for event in events)


def test_an_event_is_handed_to_a_listener_as_it_was_journaled() -> None:
    async def run() -> list[list[Event]]:
        journal = MemoryJournal()
        await journal.create("s")
        got: list[list[Event]] = []
        assert journal.listen("s", lambda events: got.append(events) is None) is not None
        journal.append_nowait("s", [msg("a")])
        journal.append_nowait("s", [msg("b"), DONE])
        assert [event.seq for batch in got for event in batch] == [1, 2, 3]
        assert got[0][0] is (await journal.read("s", 0))[0]
        return got

    assert [len(batch) for batch in asyncio.run(run())] == [1, 2]
