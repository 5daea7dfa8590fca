"""Redis journal: each stream is a Redis Stream, so any instance can replay and tail it.

Layout (``prefix`` is ``journal.redis_prefix``):

* ``{prefix}s:{stream id}``: the Redis Stream. Entry ``0-1`` opens it and
  holds the meta (``instance``: who writes it, ``owner``, ...). Event
  ``seq`` is entry ``{seq}-0`` with fields ``k`` (kind), ``d`` (data) and
  ``e`` (byte offset of its end). Explicit ids make ``XADD`` refuse a
  second writer of the same seq, so a history is never forked: a retried
  write and a reader that ends a dead writer's stream cannot both win.
* ``{prefix}i:{instance}``: the writer lease, refreshed every third of
  ``writer_lease_s`` while the process lives. A reader whose stream stays
  quiet for a whole lease while its writer's lease is gone ends the stream
  with ``instance_lost``: a SIGKILL'd generator never leaves readers hanging.

A stream's key expires ``retention_s`` after its final event; while it runs
the writer keeps pushing its expiry out, so the keys of a process that died
expire too.

The writer assigns seqs itself (one process writes a stream) and queues
events: one flusher task writes everything pending, for all streams, in one
script call per round trip. Readers in the same process are woken after the
write, so nobody ever sees an event that Redis does not hold. Readers of
streams written elsewhere wait in one shared ``XREAD BLOCK``
(:mod:`streamsvc.journal.redis_tail`): no polling loop, and no Redis
connection, per subscriber.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import Callable, Mapping
from typing import Any

import msgspec
from redis.asyncio import Redis
from redis.exceptions import RedisError, ResponseError

from streamsvc.errors import ClientError, ErrorCode, StreamError, StreamsvcError
from streamsvc.journal.base import (
    Event,
    Framer,
    Listener,
    check_bounds,
    encode_frame,
    is_final,
)
from streamsvc.journal.followers import Followers
from streamsvc.journal.redis_client import journal_unavailable
from streamsvc.journal.redis_tail import Tailer
from streamsvc.tasks import stop_tasks

__all__ = ["RedisJournal"]

log = logging.getLogger("streamsvc.journal")

_OPEN_ID = "0-1"
_KIND, _DATA, _END = b"k", b"d", b"e"
_READ_COUNT = 512  # entries per XRANGE/XREAD; the byte bound cuts further
# One flush, every stream's pending events, as one script call: one command to pack and
# one reply to parse instead of an XADD and its reply per event (redis-py's per-command
# cost was about half the relay's CPU on this journal). KEYS: the streams; ARGV: the
# retention (ms), the kind, data and end field names, then per stream its event count
# and, per event, id, kind, data, end and whether it is final (its key then expires
# after the retention). Each XADD is pcall'd:
# one refused (its id taken by a reader that ended the stream) puts its stream's index
# (from 1) in the reply, nearly always empty, and does not stop the others.
_APPEND_LUA = """
local refused, at = {}, 5
for k = 1, #KEYS do
  local ok = true
  for _ = 1, tonumber(ARGV[at]) do
    local added = redis.pcall('XADD', KEYS[k], ARGV[at + 1], ARGV[2], ARGV[at + 2],
                              ARGV[3], ARGV[at + 3], ARGV[4], ARGV[at + 4])
    if type(added) == 'table' and added.err then ok = false end
    if ARGV[at + 5] == '1' then redis.call('PEXPIRE', KEYS[k], ARGV[1]) end
    at = at + 5
  end
  at = at + 1
  if not ok then refused[#refused + 1] = k end
end
return refused
"""
_RETRY_S = (0.05, 0.1, 0.2, 0.5, 1.0)


class _Writer(Followers):
    """What this process knows of a stream it writes."""

    __slots__ = ("ended", "expiry", "flushed", "framer", "id", "key", "lost", "seq", "size")

    def __init__(self, stream_id: str, key: str) -> None:
        super().__init__()
        self.id = stream_id
        self.framer = Framer(stream_id)
        self.key = key
        self.seq = 0  # last seq handed out
        self.flushed = 0  # last seq Redis holds
        self.size = 0
        self.ended = False
        self.lost = False  # another process ended the stream, or the journal closed
        self.expiry: asyncio.TimerHandle | None = None


class RedisJournal:
    """The journal shared by several instances, on Redis Streams (``redis.asyncio``).

    Args:
        redis: the process's client (its pool is shared; the caller closes it).
        url: ``journal.redis_url``, for error messages (the password is hidden);
            default: the client's host, port and db.
        retention_s: how long an ended stream stays readable.
        max_events: message events one stream may hold (``journal_full`` past it).
        max_bytes: bytes of frames one stream may hold (``journal_full`` past it).
        prefix: prepended to every key.
        lease_s: the writer lease (``journal.writer_lease_s``).
        instance: this process's id (default: random).
    """

    def __init__(
        self,
        redis: Redis,
        *,
        url: str | None = None,
        retention_s: float = 300.0,
        max_events: int = 100_000,
        max_bytes: int = 33_554_432,
        prefix: str = "streamsvc:",
        lease_s: float = 5.0,
        instance: str | None = None,
    ) -> None:
        self._redis = redis
        self._append = redis.register_script(_APPEND_LUA)  # EVALSHA, loaded on first NOSCRIPT
        if url is None:
            kw = redis.connection_pool.connection_kwargs
            url = f"redis://{kw.get('host', 'localhost')}:{kw.get('port', 6379)}/{kw.get('db', 0)}"
        self._url = url
        self._retention_ms = max(1, int(retention_s * 1000))
        self._retention_s = retention_s
        self._max_events = max_events
        self._max_bytes = max_bytes
        self._prefix = prefix
        self._lease_ms = max(1, int(lease_s * 1000))
        self._lease_s = lease_s
        self.instance = instance or secrets.token_hex(6)
        self._lease_key = f"{prefix}i:{self.instance}"
        self._writers: dict[str, _Writer] = {}
        self._tailer = Tailer(redis, block_s=lease_s,
                              final=lambda fields: is_final(fields[_KIND].decode()))
        self._queue: list[tuple[_Writer, list[Event], float]] = []
        self._queued = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._tasks: list[asyncio.Task[None]] = []
        self._closed = False
        self._healthy = True
        self.on_unavailable: Callable[[StreamsvcError], None] | None = None
        """Told once per outage when Redis cannot be written: the registry stops its streams."""
        self.on_lag: Callable[[float], None] | None = None
        """Told, per flush, how long its oldest event waited to be written (seconds)."""
        self.on_lost: Callable[[str], None] | None = None
        """Told the id of a running stream that another process ended (its writer lease lapsed)."""

    # -- lifecycle ----------------------------------------------------------------------------

    @property
    def healthy(self) -> bool:
        return self._healthy and not self._closed

    async def start(self) -> None:
        """Take the writer lease and start the flusher and the lease refresher."""
        if self._tasks:
            return
        try:
            await self._redis.set(self._lease_key, b"1", px=self._lease_ms)
        except (RedisError, OSError) as exc:
            raise self._unavailable(exc) from exc
        self._tasks = [asyncio.ensure_future(self._flush_loop()),
                       asyncio.ensure_future(self._lease_loop())]

    async def close(self) -> None:
        """Write what is queued (for at most a lease), give up the lease, wake every reader."""
        if self._closed:
            return
        if self._queue and self._tasks:
            try:
                await asyncio.wait_for(self._idle.wait(), self._lease_s)
            except TimeoutError:
                log.warning("journal: %d stream batches were not written to Redis at shutdown",
                            len(self._queue))
        self._closed = True
        await stop_tasks(self._tasks)
        self._tasks = []
        await self._tailer.close()
        try:
            await self._redis.delete(self._lease_key)
        except (RedisError, OSError):
            pass
        for writer in self._writers.values():
            if writer.expiry is not None:
                writer.expiry.cancel()
            writer.lost = True
            writer.let_go()
        self._writers.clear()

    def _unavailable(self, exc: BaseException) -> StreamError:
        return journal_unavailable(self._url, exc)

    def _key(self, stream_id: str) -> str:
        return f"{self._prefix}s:{stream_id}"

    def _running_ttl_ms(self) -> int:
        # A running stream outlives a dead writer by its retention plus a few
        # leases: long enough for a reader to notice and end it.
        return self._retention_ms + 3 * self._lease_ms

    # -- writing ------------------------------------------------------------------------------

    async def create(self, stream_id: str, meta: Mapping[str, str] | None = None) -> None:
        if not self._tasks:
            await self.start()
        key = self._key(stream_id)
        fields: dict[str, str] = {"k": "open", "instance": self.instance, **(meta or {})}
        pipe = self._redis.pipeline(transaction=False)
        pipe.xadd(key, fields, id=_OPEN_ID)  # type: ignore[arg-type]
        pipe.pexpire(key, self._running_ttl_ms())
        try:
            await pipe.execute()
        except ResponseError as exc:
            raise ValueError(f"stream {stream_id!r} already exists") from exc
        except (RedisError, OSError) as exc:
            self._mark_unhealthy(exc)
            raise self._unavailable(exc) from exc
        self._writers[stream_id] = _Writer(stream_id, key)

    async def append(self, stream_id: str, events: list[tuple[str, bytes]]) -> int:
        try:
            seq = self.append_nowait(stream_id, events)
        except StreamError:
            writer = self._writers.get(stream_id)
            if writer is not None:
                await self._flushed(writer, writer.seq)
            raise
        await self._flushed(self._writers[stream_id], seq)
        return seq

    def append_nowait(self, stream_id: str, events: list[tuple[str, bytes]]) -> int:
        writer = self._writers.get(stream_id)
        if writer is None:
            raise ClientError(
                f"no stream {stream_id!r} written by this instance (unknown, or expired)",
                code=ErrorCode.NOT_FOUND,
            )
        if writer.ended:
            raise ValueError(f"stream {stream_id!r} has already ended")
        batch: list[Event] = []
        try:
            for kind, data in events:
                final = is_final(kind)
                frame = writer.framer.frame(writer.seq + 1, kind, data)
                if not final:
                    check_bounds(stream_id, writer.seq, writer.size + len(frame),
                                 self._max_events, self._max_bytes)
                writer.seq += 1
                writer.size += len(frame)
                batch.append(Event(writer.seq, kind, frame, writer.size))
                if final:
                    writer.ended = True
                    break
        finally:
            if batch:
                self._queue.append((writer, batch, time.monotonic()))
                self._idle.clear()
                self._queued.set()
        return writer.seq

    def append_one_nowait(self, stream_id: str, kind: str, data: bytes) -> int:
        return self.append_nowait(stream_id, [(kind, data)])  # a network write: no shorter path

    async def _flushed(self, writer: _Writer, seq: int) -> None:
        """Wait until Redis holds ``seq`` (or the stream was lost, or the journal closed)."""
        while writer.flushed < seq and not writer.lost and not self._closed:
            await writer.wait()

    async def _flush_loop(self) -> None:
        while True:
            await self._queued.wait()
            self._queued.clear()
            while self._queue:
                batch, self._queue = self._queue, []
                await self._write(batch)
                if self.on_lag is not None:
                    self.on_lag(time.monotonic() - batch[0][2])
                for writer, events, _ in batch:
                    self._delivered(writer, events)
            self._idle.set()

    async def _write(self, batch: list[tuple[_Writer, list[Event], float]]) -> None:
        """One script call for the whole batch; retried until Redis takes it (or we close)."""
        writers: list[_Writer] = []
        keys: list[str] = []
        args: list[bytes | str | int] = [self._retention_ms, _KIND, _DATA, _END]
        for writer, events, _ in batch:
            writers.append(writer)
            keys.append(writer.key)
            args.append(len(events))
            for event in events:
                args += (f"{event.seq}-0", event.kind, event.data, event.end,
                         1 if event.final else 0)
        attempt = 0
        while True:
            try:
                refused = await self._append(keys=keys, args=args)
            except (RedisError, OSError) as exc:
                self._mark_unhealthy(exc)
                await asyncio.sleep(_RETRY_S[min(attempt, len(_RETRY_S) - 1)])
                attempt += 1
                continue
            self._mark_healthy()
            if attempt == 0:
                for index in refused:
                    # The id was taken by someone else: a reader ended this stream
                    # because our lease had lapsed. (On a retry it is our own
                    # earlier write, which got through before the error.)
                    self._lose(writers[int(index) - 1])
            return

    def _delivered(self, writer: _Writer, events: list[Event]) -> None:
        if writer.lost:
            return
        writer.flushed = events[-1].seq
        writer.notify(events)
        writer.wake()
        if events[-1].final:
            writer.drop_listeners()
            writer.expiry = asyncio.get_running_loop().call_later(
                self._retention_s, self._forget, writer
            )

    def _forget(self, writer: _Writer) -> None:
        if self._writers.get(writer.id) is writer:
            del self._writers[writer.id]

    def _lose(self, writer: _Writer) -> None:
        if writer.lost:
            return
        writer.lost = True
        writer.let_go()
        log.warning("journal: stream %s was ended by another instance", writer.id)
        if self.on_lost is not None and not writer.ended:
            self.on_lost(writer.id)

    # -- health -------------------------------------------------------------------------------

    def _mark_unhealthy(self, exc: BaseException) -> None:
        if not self._healthy:
            return
        self._healthy = False
        error = self._unavailable(exc)
        log.error("%s: readiness fails and running streams end until it is back", error.message)
        if self.on_unavailable is not None:
            self.on_unavailable(error)
        for writer in self._writers.values():
            writer.let_go()  # local readers go back to read(), which reports it

    def _mark_healthy(self) -> None:
        if not self._healthy:
            self._healthy = True
            log.warning("journal: Redis is back")

    async def _lease_loop(self) -> None:
        """Refresh the writer lease and the expiry of the streams this process writes."""
        while True:
            await asyncio.sleep(self._lease_s / 3)
            pipe = self._redis.pipeline(transaction=False)
            pipe.set(self._lease_key, b"1", px=self._lease_ms)
            ttl = self._running_ttl_ms()
            for writer in self._writers.values():
                if not writer.ended:
                    pipe.pexpire(writer.key, ttl)
            try:
                await pipe.execute()
            except (RedisError, OSError) as exc:
                self._mark_unhealthy(exc)
            else:
                self._mark_healthy()

    # -- reading ------------------------------------------------------------------------------

    async def read(self, stream_id: str, after: int, max_bytes: int | None = None) -> list[Event]:
        key = self._key(stream_id)
        # A stream written elsewhere whose shared XREAD last found it at ``after`` (the
        # reader that took its entries, coming back): wait on the next call at once.
        tailing = self._tailer.follows(key, after) and self._own(stream_id) is None
        known = tailing
        while not self._closed:
            if not tailing:
                pipe = self._redis.pipeline(transaction=False)
                pipe.xrange(key, f"{after + 1}-0", "+", count=_READ_COUNT)
                pipe.xrevrange(key, "+", "-", count=1)
                try:
                    entries, head = await pipe.execute()
                except (RedisError, OSError) as exc:
                    raise self._unavailable(exc) from exc
                if entries:
                    events = self._events(stream_id, entries, max_bytes)
                    if not events[-1].final and self._own(stream_id) is None:
                        self._tailer.saw(key, events[-1].seq)
                    return events
                if not head:
                    if known:
                        return []  # expired while we waited
                    raise ClientError(
                        f"no stream {stream_id!r} (unknown, or expired after its retention time)",
                        code=ErrorCode.NOT_FOUND,
                    )
                known = True
                _, ended = _head(head[0])
                if ended:
                    return []
                writer = self._own(stream_id)
                if writer is not None:
                    # Ours: the flusher wakes us once Redis holds more.
                    if writer.flushed <= after:
                        await writer.wait()
                    continue
            tailing = False
            got = await self._tailer.wait(key, after, self._lease_s)
            if got is False:
                await self._end_if_orphaned(stream_id, key)
            elif got is not True:
                return self._events(stream_id, got, max_bytes)
        return []

    def _own(self, stream_id: str) -> _Writer | None:
        """The writer of a stream this process writes (and still holds)."""
        writer = self._writers.get(stream_id)
        return writer if writer is not None and not writer.lost else None

    async def _end_if_orphaned(self, stream_id: str, key: str) -> None:
        """A stream quiet for a whole lease: if its writer's lease is gone, end it for everyone."""
        try:
            pipe = self._redis.pipeline(transaction=False)
            pipe.xrange(key, _OPEN_ID, _OPEN_ID)
            pipe.xrevrange(key, "+", "-", count=1)
            opened, heads = await pipe.execute()
            if not opened or not heads:
                return
            instance = opened[0][1].get(b"instance", b"").decode()
            if await self._redis.exists(f"{self._prefix}i:{instance}"):
                return
            head = heads[0]
            last, ended = _head(head)
            if ended:
                return
            error = StreamError(
                f"the instance generating this stream ({instance}) stopped without ending it;"
                f" the {last} events journaled before that are kept",
                code=ErrorCode.INSTANCE_LOST, retryable=True,
            )
            data = msgspec.json.encode(error.to_event())
            end = (int(head[1][_END]) if last else 0) + len(
                encode_frame(stream_id, last + 1, "error", data))
            pipe = self._redis.pipeline(transaction=False)
            pipe.xadd(key, {_KIND: "error", _DATA: data, _END: end},
                      id=f"{last + 1}-0")
            pipe.pexpire(key, self._retention_ms)
            await pipe.execute()
            log.warning("journal: stream %s ended with instance_lost (writer %s is gone)",
                        stream_id, instance)
        except ResponseError:
            pass  # the writer (or another reader) wrote that seq first: read on
        except (RedisError, OSError) as exc:
            raise self._unavailable(exc) from exc

    def _events(self, stream_id: str, entries: list[Any], max_bytes: int | None) -> list[Event]:
        events: list[Event] = []
        first_start: int | None = None
        framer = Framer(stream_id)
        for entry_id, fields in entries:
            seq = int(entry_id.split(b"-", 1)[0])
            if seq == 0:
                continue  # the opening entry
            kind = fields[_KIND].decode()
            data = fields[_DATA]
            frame = framer.frame(seq, kind, data)
            end = int(fields[_END])
            if first_start is None:
                first_start = end - len(frame)
            elif max_bytes is not None and end - first_start > max_bytes:
                break
            events.append(Event(seq, kind, frame, end))
            if is_final(kind):
                break
        return events

    async def last_seq(self, stream_id: str) -> tuple[int, bool] | None:
        try:
            head: Any = await self._redis.xrevrange(self._key(stream_id), "+", "-", count=1)
        except (RedisError, OSError) as exc:
            raise self._unavailable(exc) from exc
        return _head(head[0]) if head else None

    async def meta(self, stream_id: str) -> dict[str, str] | None:
        try:
            opened: Any = await self._redis.xrange(self._key(stream_id), _OPEN_ID, _OPEN_ID)
        except (RedisError, OSError) as exc:
            raise self._unavailable(exc) from exc
        if not opened:
            return None
        return {k.decode(): v.decode() for k, v in opened[0][1].items() if k != _KIND}

    def listen(self, stream_id: str, listener: Listener) -> Callable[[], None] | None:
        writer = self._writers.get(stream_id)
        if writer is None or writer.ended or writer.lost or not self._healthy:
            return None  # another instance writes it: readers tail with XREAD BLOCK
        return writer.listen(listener)

    def size(self, stream_id: str) -> int | None:
        writer = self._writers.get(stream_id)
        return None if writer is None else writer.size


def _head(entry: Any) -> tuple[int, bool]:
    """(last seq, ended) from a stream's newest entry."""
    entry_id, fields = entry
    seq = int(entry_id.split(b"-", 1)[0])
    if seq == 0:
        return 0, False
    return seq, is_final(fields[_KIND].decode())
