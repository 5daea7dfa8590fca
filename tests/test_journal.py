"""The journal contract (streamsvc.journal.base.Journal), run against every backend.

Each backend gets the same suite through the ``make`` fixture: the memory
journal, and the Redis journal on a real redis-server started for the test.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable

import pytest
from redis.asyncio import Redis

from streamsvc.errors import ClientError, ErrorCode, StreamError, StreamsvcError
from streamsvc.journal.base import Event, Framer, Journal, encode_frame
from streamsvc.journal.followers import Followers
from streamsvc.journal.redis import RedisJournal
from streamsvc.journal.redis_tail import KEPT, LINGER_S
from tests.conftest import JOURNAL_BACKENDS, JournalFactory, journal_factory, wait_until
from tests.redis_server import RedisServer

BACKENDS = JOURNAL_BACKENDS


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


def test_encode_frame_responses_event() -> None:
    # OpenAI's framing: the type as the event name, no id (the data has sequence_number).
    assert encode_frame("s1", 4, "response.output_text.delta", b"{}") == (
        b"event: response.output_text.delta\ndata: {}\n\n")


@pytest.mark.parametrize("stream_id", ["st_0a1b", "a%db%s", "\u00e9t\u00e9"],
                         ids=("hex", "percent", "non-ASCII"))
@pytest.mark.parametrize("kind", ["message", "done", "error", "failover",
                                  "response.created", "response.output_text.delta"])
def test_a_streams_framer_makes_the_frames_of_the_rule(stream_id: str, kind: str) -> None:
    # The rule, written out as it was before frames were made by bytes formatting.
    def rule(seq: int, data: bytes) -> bytes:
        if kind.startswith("response."):
            return b"event: " + kind.encode() + b"\ndata: " + data + b"\n\n"
        head = f"id: {stream_id}:{seq}\n" + ("" if kind == "message" else f"event: {kind}\n")
        return head.encode() + b"data: " + data + b"\n\n"

    framer = Framer(stream_id)
    for seq in (1, 2, 10, 123_456_789):
        data = b'{"content":"%d%%s"}' % seq
        assert framer.frame(seq, kind, data) == rule(seq, data)
        assert encode_frame(stream_id, seq, kind, data) == rule(seq, data)


def test_followers_drop_a_listener_that_stops_and_keep_the_others() -> None:
    followers = Followers()
    got: dict[str, list[int]] = {"a": [], "b": [], "c": []}

    def listener(name: str, until: int) -> Callable[[list[Event]], bool]:
        def take(events: list[Event]) -> bool:
            got[name] += [event.seq for event in events]
            return events[-1].seq < until

        return take

    def event(seq: int) -> list[Event]:
        return [Event(seq, "message", b"", seq)]

    followers.listen(listener("a", 1))
    followers.notify(event(1))  # the only one, and it stops: dropped
    assert followers.listeners == []
    followers.listen(listener("b", 2))
    stop_c = followers.listen(listener("c", 99))
    followers.notify(event(2))
    followers.notify(event(3))
    stop_c()
    followers.notify(event(4))
    assert got == {"a": [1], "b": [2], "c": [2, 3]}
    assert followers.listeners == []
    followers.wake()  # no waiter: nothing to do


@pytest.mark.parametrize("backend", BACKENDS)
class TestJournal:
    @pytest.fixture
    async def make(self, backend: str, request: pytest.FixtureRequest
                   ) -> AsyncIterator[JournalFactory]:
        async with journal_factory(backend, request) as factory:
            yield factory

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

    async def test_max_events_one_event_at_a_time(self, make: JournalFactory) -> None:
        journal = make(max_events=2)
        await journal.create("s")
        assert journal.append_nowait("s", [msg("a")]) == 1
        assert journal.append_nowait("s", [msg("b")]) == 2  # up to the bound: in
        with pytest.raises(StreamError) as caught:
            journal.append_nowait("s", [msg("c")])
        assert caught.value.code == ErrorCode.JOURNAL_FULL
        assert "max_events (2)" in caught.value.message
        assert journal.append_nowait("s", [DONE]) == 3  # the end always gets in
        events = await asyncio.wait_for(journal.read("s", 0), 2)
        assert [e.kind for e in events] == ["message", "message", "done"]

    async def test_max_bytes_one_event_at_a_time(self, make: JournalFactory) -> None:
        frame = encode_frame("s", 1, *msg("a"))
        journal = make(max_bytes=2 * len(frame))  # exactly two such frames
        await journal.create("s")
        assert journal.append_nowait("s", [msg("a")]) == 1
        assert journal.append_nowait("s", [msg("b")]) == 2
        assert journal.size("s") == 2 * len(frame)
        with pytest.raises(StreamError) as caught:
            journal.append_nowait("s", [msg("c")])
        assert caught.value.code == ErrorCode.JOURNAL_FULL
        assert "max_bytes" in caught.value.message
        assert journal.size("s") == 2 * len(frame)  # nothing of the refused event counted
        assert journal.append_nowait("s", [ERROR]) == 3
        events = await asyncio.wait_for(journal.read("s", 0), 2)
        assert [e.seq for e in events] == [1, 2, 3] and events[-1].end == journal.size("s")

    async def test_append_one_nowait_keeps_the_contract_of_append_nowait(
        self, make: JournalFactory
    ) -> None:
        # The per-token call: numbered, bounded, tailed and refused as append_nowait is.
        journal = make(max_events=2)
        with pytest.raises(ClientError) as unknown:
            journal.append_one_nowait("nope", *msg("a"))
        assert unknown.value.code == ErrorCode.NOT_FOUND
        await journal.create("s")
        told: list[int] = []
        stop = journal.listen("s", lambda events: told.extend(e.seq for e in events) or True)
        assert journal.append_one_nowait("s", *msg("a")) == 1
        assert journal.append_nowait("s", [msg("b")]) == 2
        with pytest.raises(StreamError) as full:
            journal.append_one_nowait("s", *msg("c"))
        assert full.value.code == ErrorCode.JOURNAL_FULL
        assert journal.append_one_nowait("s", *DONE) == 3  # the end always gets in
        with pytest.raises(ValueError, match="already ended"):
            journal.append_one_nowait("s", *msg("d"))
        events = await asyncio.wait_for(journal.read("s", 0), 2)
        assert [(e.seq, e.kind, e.data) for e in events] == [
            (1, *msg("a")), (2, *msg("b")), (3, *DONE)]
        assert events[-1].end == journal.size("s") == sum(len(e.frame) for e in events)
        if stop is not None:  # a backend that calls back told each event once, in order
            assert await wait_until(lambda: told == [1, 2, 3])
            stop()

    async def test_close_wakes_waiting_readers(self, journal: Journal) -> None:
        await journal.create("s")
        reader = asyncio.ensure_future(journal.read("s", 0))
        await asyncio.sleep(0.01)
        await journal.close()
        assert await asyncio.wait_for(reader, 1) == []


class TestRedisAcrossInstances:
    """Two RedisJournal objects on one redis-server behave as two instances of the service."""

    @pytest.fixture
    async def pair(self, redis_server: RedisServer
                   ) -> AsyncIterator[tuple[RedisJournal, RedisJournal]]:
        clients = [Redis.from_url(redis_server.url) for _ in range(2)]
        journals = [RedisJournal(client, lease_s=0.3, retention_s=30) for client in clients]
        yield journals[0], journals[1]
        for journal in journals:
            await journal.close()
        for client in clients:
            await client.aclose()

    async def test_a_stream_written_on_one_is_replayed_and_tailed_on_the_other(
        self, pair: tuple[RedisJournal, RedisJournal]
    ) -> None:
        writer, reader = pair
        await writer.create("s", {"owner": "k1"})
        await writer.append("s", [msg("a"), msg("b")])
        assert await reader.meta("s") == {"owner": "k1", "instance": writer.instance}
        assert reader.listen("s", lambda events: True) is None  # not its stream: it tails
        assert [e.seq for e in await reader.read("s", 0)] == [1, 2]
        tail = asyncio.ensure_future(reader.read("s", 2))
        await asyncio.sleep(0.05)
        assert not tail.done()
        await writer.append("s", [msg("c"), DONE])
        events = await asyncio.wait_for(tail, 2)  # woken by the first write: 3, or 3 and 4
        if len(events) == 1:
            events += await asyncio.wait_for(reader.read("s", 3), 2)
        assert [e.seq for e in events] == [3, 4]
        assert events[0].frame == b'id: s:3\ndata: {"content":"c"}\n\n'
        assert events[-1].end == writer.size("s")
        assert await reader.last_seq("s") == (4, True)
        assert await asyncio.wait_for(reader.read("s", 4), 1) == []

    async def test_the_local_live_tail_gets_each_batch_once_redis_holds_it(
        self, pair: tuple[RedisJournal, RedisJournal]
    ) -> None:
        writer, other = pair
        await writer.create("s")
        got: list[list[int]] = []
        seen_by_other: list[int | None] = []

        def listener(events: list[Event]) -> bool:
            got.append([e.seq for e in events])
            seen_by_other.append(None)
            return True

        assert writer.listen("s", listener) is not None
        writer.append_nowait("s", [msg("a")])
        writer.append_nowait("s", [msg("b")])
        assert got == []  # not written yet: nobody sees it before Redis holds it
        assert await wait_until(lambda: sum(map(len, got)) == 2, 2)
        assert [seq for batch in got for seq in batch] == [1, 2]
        assert await other.last_seq("s") == (2, False)

    async def test_a_dead_writer_leaves_its_events_and_then_an_instance_lost_error(
        self, pair: tuple[RedisJournal, RedisJournal], redis_server: RedisServer
    ) -> None:
        writer, reader = pair
        await writer.create("s")
        await writer.append("s", [msg("a"), msg("b")])
        # SIGKILL, as Redis sees it: the process stops refreshing its lease.
        for task in writer._tasks:
            task.cancel()
        redis_server.command("DEL", f"streamsvc:i:{writer.instance}")
        assert [e.seq for e in await reader.read("s", 0)] == [1, 2]
        started = asyncio.get_running_loop().time()
        (event,) = await asyncio.wait_for(reader.read("s", 2), 5)
        assert asyncio.get_running_loop().time() - started < 2  # about one lease
        assert event.seq == 3 and event.kind == "error"
        assert json.loads(event.data)["code"] == "instance_lost"
        assert event.start == (await reader.read("s", 1))[0].end
        assert await reader.last_seq("s") == (3, True)

    async def test_a_write_refused_because_a_reader_ended_the_stream_loses_only_that_stream(
        self, pair: tuple[RedisJournal, RedisJournal], redis_server: RedisServer
    ) -> None:
        # A flush writes every stream's events in one script call; the one stream whose
        # next id a reader took (ending it for a lapsed lease) is lost, the others go on.
        writer, reader = pair
        lost: list[str] = []
        writer.on_lost = lost.append
        await writer.create("s")
        await writer.create("t")
        await writer.append("s", [msg("a")])
        redis_server.command("XADD", "streamsvc:s:s", "2-0", "k", "error", "d", "{}", "e", "1")
        writer.append_nowait("s", [msg("b")])
        writer.append_nowait("t", [msg("c"), msg("d")])
        assert await wait_until(lambda: lost == ["s"], 3)
        assert [(e.seq, e.kind) for e in await reader.read("t", 0)] == [(1, "message"),
                                                                          (2, "message")]
        await writer.append("t", [DONE])  # a final event: its key now expires
        assert await reader.last_seq("t") == (3, True)
        assert 0 < int(redis_server.command("PTTL", "streamsvc:s:t")[1:]) <= 30_000
        assert [e.kind for e in await reader.read("s", 0)] == ["message", "error"]

    async def test_a_live_writer_is_not_declared_dead_by_a_quiet_stream(
        self, pair: tuple[RedisJournal, RedisJournal]
    ) -> None:
        writer, reader = pair
        await writer.create("s")
        await writer.append("s", [msg("a")])
        tail = asyncio.ensure_future(reader.read("s", 1))
        await asyncio.sleep(1.0)  # more than three leases
        assert not tail.done()
        await writer.append("s", [DONE])
        assert [e.kind for e in await asyncio.wait_for(tail, 2)] == ["done"]

    async def test_redis_lost_then_back_nothing_journaled_is_lost(
        self, pair: tuple[RedisJournal, RedisJournal], redis_server: RedisServer
    ) -> None:
        writer, reader = pair
        lost: list[StreamsvcError] = []
        writer.on_unavailable = lost.append
        await writer.create("s")
        await writer.append("s", [msg("a")])
        redis_server.stop(save=True)
        writer.append_nowait("s", [msg("b")])
        assert await wait_until(lambda: bool(lost), 3)
        assert lost[0].code == ErrorCode.JOURNAL_UNAVAILABLE
        assert not writer.healthy
        with pytest.raises(StreamError) as caught:
            await reader.read("s", 0)
        assert caught.value.code == ErrorCode.JOURNAL_UNAVAILABLE
        assert "Redis at redis://127.0.0.1" in caught.value.message
        writer.append_nowait("s", [ERROR])  # what the registry does on_unavailable
        redis_server.start()  # with its data, as a Redis with persistence restarts
        assert await wait_until(lambda: writer.healthy, 5)
        events = await asyncio.wait_for(reader.read("s", 0), 5)
        assert [(e.seq, e.kind) for e in events] == [(1, "message"), (2, "message"), (3, "error")]
        assert await reader.last_seq("s") == (3, True)

    async def test_a_remote_reader_that_keeps_up_costs_no_redis_command_of_its_own(
        self, pair: tuple[RedisJournal, RedisJournal], redis_server: RedisServer
    ) -> None:
        # The shared XREAD brings the entries: a reader waiting where they start takes
        # them. Before, each wake cost the reader an XRANGE and an XREVRANGE of its own.
        writer, reader = pair
        await _read_one(writer, reader, "s")
        before = _calls(redis_server, "xrange")
        got = await _read_while_writing(writer, reader, "s", after=1, count=30, every_s=0.005)
        assert got == list(range(2, 33))  # 30 messages and the done, in order
        assert _calls(redis_server, "xrange") - before <= 2  # before: about one per event

    async def test_a_remote_reader_slower_than_the_tokens_catches_up_from_the_shared_tail(
        self, pair: tuple[RedisJournal, RedisJournal], redis_server: RedisServer
    ) -> None:
        # A reader whose every read finds more (its writes slower than the tokens) never
        # waited, so it was never tailed and read the journal once per batch for good.
        writer, reader = pair
        await writer.create("s")
        before = _calls(redis_server, "xrange")
        got = await _read_while_writing(writer, reader, "s", after=0, count=80, every_s=0.002,
                                        pause_s=0.02)
        assert got == list(range(1, 82))
        assert _calls(redis_server, "xrange") - before <= 3  # before: one per read, 8 to 12

    async def test_a_remote_reader_further_back_than_the_tail_keeps_reads_the_journal(
        self, pair: tuple[RedisJournal, RedisJournal]
    ) -> None:
        writer, reader = pair
        await _read_one(writer, reader, "s")
        tail = asyncio.ensure_future(reader.read("s", 1))
        await writer.append("s", [msg(str(i)) for i in range(1, 300)])  # past what is kept
        assert (await asyncio.wait_for(tail, 2))[0].seq == 2
        await writer.append("s", [DONE])
        events = await _read_all(reader, "s", after=1)
        assert [e.seq for e in events] == list(range(2, 302))
        assert [e.data for e in events[:299]] == [msg(str(i))[1] for i in range(1, 300)]
        assert all(len(tail.kept) <= KEPT for tail in reader._tailer._tails.values())

    async def test_a_remote_stream_nobody_reads_is_no_longer_tailed(
        self, pair: tuple[RedisJournal, RedisJournal]
    ) -> None:
        writer, reader = pair
        await _read_one(writer, reader, "s")
        assert reader._tailer.follows("streamsvc:s:s", 1)  # tailed from where it read
        await writer.append("s", [msg("b")])  # the client left: nobody reads on
        assert await wait_until(lambda: not reader._tailer._tails, LINGER_S + 2)

    async def test_a_remote_reader_back_at_the_final_event_ends_at_once(
        self, redis_server: RedisServer
    ) -> None:
        # The shared tail knows the stream ended: a reader there is not left waiting
        # for a lease on a stream that cannot move (and the tail is forgotten after).
        clients = [Redis.from_url(redis_server.url) for _ in range(2)]
        writer, reader = (RedisJournal(client, lease_s=5.0) for client in clients)
        try:
            await writer.create("s")
            await writer.append("s", [msg("a")])
            assert [e.seq for e in await reader.read("s", 0)] == [1]
            tail = asyncio.ensure_future(reader.read("s", 1))
            await asyncio.sleep(0.05)
            await writer.append("s", [DONE])
            assert [e.kind for e in await asyncio.wait_for(tail, 2)] == ["done"]
            assert await asyncio.wait_for(reader.read("s", 2), 1) == []
            # Kept for a reader coming back, then forgotten: with nothing else tailed, the
            # tailer waited for a new reader before it forgot an ended stream.
            assert await wait_until(lambda: not reader._tailer._tails, LINGER_S + 2)
        finally:
            for journal in (writer, reader):
                await journal.close()
            for client in clients:
                await client.aclose()

    async def test_start_fails_with_a_typed_error_naming_the_journal(self) -> None:
        client = Redis.from_url(f"redis://127.0.0.1:{_closed_port()}/0")
        journal = RedisJournal(client, url="redis://:secret@127.0.0.1:1/0")
        with pytest.raises(StreamError) as caught:
            await journal.start()
        assert caught.value.code == ErrorCode.JOURNAL_UNAVAILABLE
        assert "secret" not in caught.value.message
        await client.aclose()


async def _read_one(writer: RedisJournal, reader: RedisJournal, stream_id: str) -> None:
    """A stream with one message on ``writer``, read on ``reader`` (which then tails it)."""
    await writer.create(stream_id)
    await writer.append(stream_id, [msg("0")])
    assert [e.seq for e in await reader.read(stream_id, 0)] == [1]


def _calls(redis_server: RedisServer, command: str) -> int:
    """How many times Redis ran ``command`` (``INFO commandstats``), over a raw socket."""
    for line in redis_server.command("INFO", "commandstats").decode().splitlines():
        if line.startswith(f"cmdstat_{command}:"):
            return int(line.split("calls=", 1)[1].split(",", 1)[0])
    return 0


async def _read_all(journal: Journal, stream_id: str, *, after: int,
                    pause_s: float = 0.0) -> list[Event]:
    """Read until the final event, ``pause_s`` after each read (a client's write)."""
    events: list[Event] = []
    while not events or not events[-1].final:
        got = await asyncio.wait_for(journal.read(stream_id, after), 5)
        assert got, "the stream ended without its final event"
        events += got
        after = got[-1].seq
        await asyncio.sleep(pause_s)
    return events


async def _read_while_writing(
    writer: RedisJournal, reader: RedisJournal, stream_id: str, *, after: int, count: int,
    every_s: float, pause_s: float = 0.0,
) -> list[int]:
    """``count`` messages and a done written ``every_s`` apart while ``reader`` reads them
    all; returns the seqs read."""
    async def write() -> None:
        for i in range(count):
            writer.append_nowait(stream_id, [msg(str(i))])
            await asyncio.sleep(every_s)
        await writer.append(stream_id, [DONE])

    writing = asyncio.ensure_future(write())
    events = await _read_all(reader, stream_id, after=after, pause_s=pause_s)
    await writing
    return [e.seq for e in events]


def _closed_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_a_journal_event_is_not_tracked_by_the_garbage_collector() -> None:
    # A journal holds every event of every stream for its retention time: a tracked
    # event would be walked by every full collection (docs/performance.md).
    import gc

    event = Event(1, "message", encode_frame("s", 1, "message", b"{\"content\":\"a\"}"), 9)
    assert not gc.is_tracked(event)
    assert event.start == 9 - len(event.frame) and not event.final


@pytest.mark.parametrize("kind", ["message", "done", "response.output_text.delta"])
def test_a_journal_event_keeps_its_data_only_in_its_frame(kind: str) -> None:
    # A journal keeps its events for their retention time: the data a second time
    # beside the frame was up to four tenths of what each token cost to keep.
    data = b'{"content":"data: \\n\\ndata: x","id":"id: 1"}'
    event = Event(7, kind, Framer("s-1").frame(7, kind, data), 99)
    assert Event.__struct_fields__ == ("seq", "kind", "frame", "end")
    assert event.data == data
    assert event.frame.endswith(b"data: " + data + b"\n\n")
