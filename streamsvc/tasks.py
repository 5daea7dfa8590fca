"""Stopping background tasks for sure: cancel, and cancel again until they end.

One ``task.cancel()`` is not always enough on Python 3.11: ``asyncio.wait_for``
returns the inner result instead of raising when the cancel lands as the
inner call completes (CPython gh-86296, fixed in 3.12), and redis-py sends
every command through it. A loop whose cancel was lost that way goes on to
its next wait, and a ``close()`` awaiting it hangs: a SIGTERMed instance never
exits. Each cancel after the first lands on the task's next await.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable
from typing import Any

__all__ = ["stop_tasks"]

log = logging.getLogger("streamsvc")

RECANCEL_S = 0.25
"""How long a cancelled task gets to end before it is cancelled again."""


async def stop_tasks(tasks: Iterable[asyncio.Future[Any]], *, within_s: float = 10.0) -> None:
    """Cancel ``tasks`` and wait until each has ended, cancelling again every
    :data:`RECANCEL_S`; after ``within_s`` the ones still running are logged and
    left. Their results and errors are retrieved (a stopped task has nothing to tell)."""
    tasks = list(tasks)  # iterated twice: to stop them, then to retrieve what they raised
    pending = {task for task in tasks if not task.done()}
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within_s
    while pending:
        for task in pending:
            task.cancel()
        left = deadline - loop.time()
        if left <= 0:
            log.warning("%d background tasks did not stop: %s", len(pending),
                        ", ".join(sorted(repr(task.get_coro()) if isinstance(task, asyncio.Task)
                                         else repr(task) for task in pending)))
            break
        _, pending = await asyncio.wait(pending, timeout=min(RECANCEL_S, left))
    for task in tasks:
        if task.done() and not task.cancelled():
            task.exception()  # retrieved: not "never retrieved" at exit
