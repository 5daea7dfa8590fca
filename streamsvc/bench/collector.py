"""The harness's processes run without the cyclic garbage collector's pauses.

At 1,000 open streams a full collection in the simulator stopped every one of
its streams for 16 to 38 ms (measured 2026-12-04 with ``gc.callbacks``), and
each stream that started meanwhile waited that long for its first token: on
the direct path and through every relay alike, at moments that differ from
run to run. The relays' added TTFT p99 was then mostly the difference of two
such pauses (the direct path's TTFT p99 39 to 100 ms with the collector, 5 ms
without). A measuring instrument must not pause, as ``timeit`` turns the
collector off for the same reason: the simulator the bench starts and the
load client turn the collector off for their run (a bench's minutes); what
their streams make is freed by reference counting, and the few cycles they
leave wait for the process's end. The relays under test keep their own
collector settings.
"""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterator

__all__ = ["collector_off"]


@contextlib.contextmanager
def collector_off() -> Iterator[None]:
    """No automatic collection inside; the collector as it was afterwards."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()
