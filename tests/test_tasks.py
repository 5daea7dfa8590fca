"""Background tasks stop at close even when a cancel is lost (Python 3.11's wait_for).

The lost cancel itself is a race inside CPython's ``asyncio.wait_for`` (gh-86296)
that no test can make happen on demand, so it is reproduced here by a
coroutine that catches its first ``CancelledError`` and carries on, as a
``wait_for`` that lost the cancel does.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import time
from typing import Any

import pytest
from redis.asyncio import Redis

from streamsvc.journal.redis_tail import Tailer
from streamsvc.tasks import stop_tasks
from tests.redis_server import RedisServer


async def _loses_first_cancel(log: list[str]) -> None:
    try:
        await asyncio.sleep(30)
    except asyncio.CancelledError:
        log.append("cancel lost")  # what a wait_for that lost the cancel looks like
    await asyncio.Event().wait()  # the loop's next wait


async def test_a_task_that_swallows_its_cancel_is_still_stopped() -> None:
    seen: list[str] = []
    task = asyncio.ensure_future(_loses_first_cancel(seen))
    await asyncio.sleep(0)
    started = time.monotonic()
    await stop_tasks([task], within_s=5)
    assert task.cancelled() and seen == ["cancel lost"]
    assert time.monotonic() - started < 2


async def test_a_task_that_never_stops_is_logged_and_left(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def stubborn() -> None:
        while True:
            try:
                await asyncio.sleep(30)
            except asyncio.CancelledError:
                pass

    task = asyncio.ensure_future(stubborn())
    await asyncio.sleep(0)
    with caplog.at_level(logging.WARNING, logger="streamsvc"):
        await stop_tasks([task], within_s=0.6)
    assert not task.done()
    assert "1 background tasks did not stop" in caplog.text and "stubborn" in caplog.text
    task.get_coro().close()  # type: ignore[union-attr]  # it would never end by itself


async def test_redis_tailer_closes_when_its_blocking_read_swallowed_the_cancel(
    redis_server: RedisServer,
) -> None:
    redis = Redis.from_url(redis_server.url)
    tailer = Tailer(redis, block_s=5.0)
    real_xread = tailer._client.xread
    lost = []

    async def xread(*args: Any, **kwargs: Any) -> Any:
        if lost:
            return await real_xread(*args, **kwargs)
        lost.append(True)
        try:
            return await real_xread(*args, **kwargs)
        except asyncio.CancelledError:
            return []  # as redis-py's wait_for on 3.11 may: the call "completed"

    tailer._client.xread = xread  # type: ignore[method-assign]
    try:
        waiting = asyncio.ensure_future(tailer.wait("streamsvc:s:x", 0, timeout=10))
        await asyncio.sleep(0.3)  # the blocking XREAD is in flight
        started = time.monotonic()
        await asyncio.wait_for(tailer.close(), 5)
        assert time.monotonic() - started < 2 and lost
        assert (await waiting) is False  # its reader was woken, not left waiting
    finally:
        await redis.aclose()


async def test_what_a_stopped_task_raised_is_retrieved_when_tasks_come_as_a_generator() -> None:
    async def fails_when_cancelled() -> None:
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            raise ValueError("raised while stopping") from None

    loop = asyncio.get_running_loop()
    reported: list[dict[str, Any]] = []
    previous = loop.get_exception_handler()
    loop.set_exception_handler(lambda _, context: reported.append(context))
    try:
        task = asyncio.ensure_future(fails_when_cancelled())
        await asyncio.sleep(0)
        await stop_tasks(t for t in [task])
        assert task.done() and not task.cancelled()  # it raised (asking would retrieve it)
        del task
        gc.collect()
        assert not reported  # no "Task exception was never retrieved"
    finally:
        loop.set_exception_handler(previous)
