"""Percentiles and distributions of latency samples: pure functions, no I/O."""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Sequence

from streamsvc.bench.results import Added, Latency

__all__ = ["CDF_LEVELS", "added", "cdf", "median", "per_token_us", "percentile", "ratio",
           "summarize"]

# The cumulative levels at which a distribution is kept for the plot: evenly
# spread, then denser in the tail, where a relay's cost shows.
CDF_LEVELS: tuple[float, ...] = tuple(
    sorted(
        {i / 100 for i in range(101)}
        | {0.99 + i / 1000 for i in range(10)}
        | {0.999 + i / 10_000 for i in range(10)}
    )
)


def per_token_us(cpu_s: float | None, tokens: int) -> float | None:
    """CPU µs per relayed token; None without a CPU figure or with no token relayed."""
    return cpu_s / tokens * 1e6 if cpu_s is not None and tokens > 0 else None


def ratio(cpu: float | None, baseline: float | None) -> float | None:
    """``cpu`` ÷ ``baseline``; None when either is missing (or the baseline is 0)."""
    return cpu / baseline if cpu is not None and baseline else None


def percentile(ordered: Sequence[float], q: float) -> float:
    """The ``q`` quantile (0..1) of sorted samples, linear between neighbours.

    Example:
        >>> percentile([1.0, 2.0, 3.0, 4.0], 0.5)
        2.5
    """
    if not ordered:
        raise ValueError("percentile of no samples")
    position = q * (len(ordered) - 1)
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def median(values: Iterable[float | None]) -> float | None:
    """The median of the values measured (None: not measured); None when none was."""
    known = [value for value in values if value is not None]
    return statistics.median(known) if known else None


def summarize(samples_s: Sequence[float]) -> Latency:
    """The summary of samples given in seconds, in milliseconds; zeros when empty."""
    if not samples_s:
        return Latency(count=0, mean=0.0, p50=0.0, p90=0.0, p99=0.0, p999=0.0, max=0.0)
    ordered = sorted(samples_s)
    ms = 1000.0
    return Latency(
        count=len(ordered),
        mean=math.fsum(ordered) / len(ordered) * ms,
        p50=percentile(ordered, 0.50) * ms,
        p90=percentile(ordered, 0.90) * ms,
        p99=percentile(ordered, 0.99) * ms,
        p999=percentile(ordered, 0.999) * ms,
        max=ordered[-1] * ms,
    )


def cdf(samples_s: Sequence[float]) -> list[tuple[float, float]]:
    """``(milliseconds, level)`` points of the distribution at :data:`CDF_LEVELS`."""
    if not samples_s:
        return []
    ordered = sorted(samples_s)
    return [(percentile(ordered, level) * 1000.0, level) for level in CDF_LEVELS]


def added(relay: Latency, direct: Latency) -> Added:
    """What a relay adds: its percentiles minus those of the direct run (may be < 0: noise)."""
    return Added(p50=relay.p50 - direct.p50, p99=relay.p99 - direct.p99, max=relay.max - direct.max)
