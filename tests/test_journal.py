"""The journal contract (streamsvc.journal.base.Journal), run against every backend.

Each backend gets the same suite through the ``make`` fixture: only the memory
backend exists now; a Redis backend joins ``BACKENDS`` and must pass it unchanged.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from streamsvc.errors import ClientError, ErrorCode, StreamError
from streamsvc.journal.base import Journal, encode_frame
from streamsvc.journal.memory import MemoryJournal

JournalFactory = Callable[..., Journal]

BACKENDS: dict[str, JournalFactory] = {
    "memory": lambda **options: MemoryJournal(**options),
}


def msg(text: str) -> tuple[str, bytes]:
    return ("message", b'{"content":"%s"}' % text.encode())


DONE = ("done", b'{"finish_reason":"stop","usage":null}')
ERROR = ("error", b'{"code":"upstream_error","message":"x","retryable":false}')


def test_encode_frame_message() -> None:
    assert encode_frame("s1", 3, "message", b'{"content":" Hi"}') == (
        b'id: s1:3\ndata: {"content":" Hi"}\n\n')


@pytest.mark.parametrize("kind", ["done", "error"])
def test_encode_frame_final(kind: str) -> None:
    assert encode_frame("s1", 9, kind, b"{}") == (
        b"id: s1:9\nevent: " + kind.encode() + b"\ndata: {}\n\n")


@pytest.mark.parametrize("backend", BACKENDS.values(), ids=BACKENDS.keys())
class TestJournal:
    @pytest.fixture
    async def make(self, backend: JournalFactory) -> AsyncIterator[JournalFactory]:
        made: list[Journal] = []

        def make(**options: Any) -> Journal:
            journal = backend(**options)
            made.append(journal)
            return journal

        yield make
        for journal in made:
            await journal.close()

    @pytest.fixture
    async def journal(self, make: JournalFactory) -> Journal:
        return make()

    async def test_seq_counts_from_one(self, journal: Journal) -> None:
        await journal.create("s")
        assert await journal.last_seq("s") == (0, False)
        assert await journal.append("s", [msg("a")]) == 1
        assert await journal.append("s", [msg("b"), msg("c")]) == 3
        events = await journal.read("s", 0)
        assert [e.seq for e in events] == [1, 2, 3]
        assert [e.kind for e in events] == ["message"] * 3
        assert events[1].data == b'{"content":"b"}'
        assert await journal.last_seq("s") == (3, False)

    async def test_streams_are_numbered_independently(self, journal: Journal) -> None:
        await journal.create("a")
        await journal.create("b")
        await journal.append("a", [msg("1"), msg("2")])
        assert await journal.append("b", [msg("1")]) == 1

    async def test_frames(self, journal: Journal) -> None:
        await journal.create("s")
        await journal.append("s", [msg(" Hi"), DONE])
        first, last = await journal.read("s", 0)
        assert first.frame == b'id: s:1\ndata: {"content":" Hi"}\n\n'
        assert last.frame == b"id: s:2\nevent: done\ndata: " + DONE[1] + b"\n\n"
        assert last.final and not first.final

    async def test_error_frame(self, journal: Journal) -> None:
        await journal.create("s")
        await journal.append("s", [ERROR])
        (event,) = await journal.read("s", 0)
        assert event.frame.startswith(b"id: s:1\nevent: error\ndata: ")
        assert event.final

    @pytest.mark.parametrize("after", [0, 1, 2, 3, 4])
    async def test_replay_from_any_seq(self, journal: Journal, after: int) -> None:
        await journal.create("s")
        await journal.append("s", [msg("a"), msg("b"), msg("c"), DONE])
        events = await journal.read("s", after)
        assert [e.seq for e in events] == list(range(after + 1, 5))

    async def test_read_returns_empty_after_the_end(self, journal: Journal) -> None:
        await journal.create("s")
        await journal.append("s", [msg("a"), DONE])
        assert await asyncio.wait_for(journal.read("s", 2), 1) == []
        assert await asyncio.wait_for(journal.read("s", 5), 1) == []
        assert await journal.last_seq("s") == (2, True)

    async def test_live_tail_wakes_a_waiting_reader(self, journal: Journal) -> None:
        await journal.create("s")
        await journal.append("s", [msg("a")])
        reader = asyncio.ensure_future(journal.read("s", 1))
        await asyncio.sleep(0.01)
        assert not reader.done()
        await journal.append("s", [msg("b"), msg("c")])
        events = await asyncio.wait_for(reader, 1)
        assert [e.seq for e in events] == [2, 3]

    async def test_several_readers_are_all_woken(self, journal: Journal) -> None:
        await journal.create("s")
        readers = [asyncio.ensure_future(journal.read("s", 0)) for _ in range(3)]
        await asyncio.sleep(0.01)
        await journal.append("s", [msg("a")])
        for events in await asyncio.wait_for(asyncio.gather(*readers), 1):
            assert [e.seq for e in events] == [1]

    async def test_final_event_wakes_a_waiting_reader(self, journal: Journal) -> None:
        await journal.create("s")
        await journal.append("s", [msg("a")])
        reader = asyncio.ensure_future(journal.read("s", 1))
        await asyncio.sleep(0.01)
        await journal.append("s", [DONE])
        (event,) = await asyncio.wait_for(reader, 1)
        assert event.kind == "done" and event.seq == 2

    async def test_a_cancelled_reader_leaves_nothing_behind(self, journal: Journal) -> None:
        await journal.create("s")
        reader = asyncio.ensure_future(journal.read("s", 0))
        await asyncio.sleep(0.01)
        reader.cancel()
        with pytest.raises(asyncio.CancelledError):
            await reader
        await journal.append("s", [msg("a")])
        assert [e.seq for e in await journal.read("s", 0)] == [1]

    async def test_final_event_ends_the_stream_and_drops_what_follows_it(
        self, journal: Journal
    ) -> None:
        await journal.create("s")
        assert await journal.append("s", [msg("a"), DONE, msg("after")]) == 2
        assert await journal.last_seq("s") == (2, True)

    async def test_appending_after_the_end_raises(self, journal: Journal) -> None:
        await journal.create("s")
        await journal.append("s", [DONE])
        with pytest.raises(ValueError, match="ended"):
            await journal.append("s", [msg("late")])
        with pytest.raises(ValueError):
            await journal.append("s", [ERROR])

    async def test_create_twice_raises(self, journal: Journal) -> None:
        await journal.create("s")
        with pytest.raises(ValueError, match="exists"):
            await journal.create("s")

    async def test_unknown_stream_is_not_found(self, journal: Journal) -> None:
        assert await journal.last_seq("nope") is None
        with pytest.raises(ClientError) as read_error:
            await journal.read("nope", 0)
        assert read_error.value.code == ErrorCode.NOT_FOUND and read_error.value.status == 404
        with pytest.raises(ClientError) as append_error:
            await journal.append("nope", [msg("a")])
        assert append_error.value.code == ErrorCode.NOT_FOUND

    async def test_retention_expiry_then_not_found(self, make: JournalFactory) -> None:
        journal = make(retention_s=0.05)
        await journal.create("s")
        await journal.append("s", [msg("a"), DONE])
        assert [e.seq for e in await journal.read("s", 0)] == [1, 2]  # inside the window
        await asyncio.sleep(0.15)
        assert await journal.last_seq("s") is None
        with pytest.raises(ClientError) as caught:
            await journal.read("s", 0)
        assert caught.value.code == ErrorCode.NOT_FOUND

    async def test_a_running_stream_does_not_expire(self, make: JournalFactory) -> None:
        journal = make(retention_s=0.01)
        await journal.create("s")
        await journal.append("s", [msg("a")])
        await asyncio.sleep(0.05)
        assert await journal.last_seq("s") == (1, False)

    async def test_max_events_journal_full_then_final_still_accepted(
        self, make: JournalFactory
    ) -> None:
        journal = make(max_events=3)
        await journal.create("s")
        await journal.append("s", [msg("a"), msg("b")])
        with pytest.raises(StreamError) as caught:
            await journal.append("s", [msg("c"), msg("d")])
        assert caught.value.code == ErrorCode.JOURNAL_FULL
        assert await journal.last_seq("s") == (3, False)  # "c" went in, "d" did not
        with pytest.raises(StreamError):
            await journal.append("s", [msg("e")])
        assert await journal.append("s", [ERROR]) == 4
        events = await journal.read("s", 0)
        assert [e.kind for e in events] == ["message"] * 3 + ["error"]
        assert await journal.last_seq("s") == (4, True)

    async def test_close_wakes_waiting_readers(self, journal: Journal) -> None:
        await journal.create("s")
        reader = asyncio.ensure_future(journal.read("s", 0))
        await asyncio.sleep(0.01)
        await journal.close()
        assert await asyncio.wait_for(reader, 1) == []
