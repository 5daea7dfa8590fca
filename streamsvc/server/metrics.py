"""Prometheus metrics of one app, in a registry of its own (no global state)."""

from __future__ import annotations

import bisect
from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from streamsvc.usage import Usage

__all__ = ["ANONYMOUS", "Metrics"]

ANONYMOUS = "anonymous"
"""The ``key`` label of usage with auth off (key ids are hex, so no key is named this)."""


class LocalHistogram:
    """A histogram's bucket counts and sum, updated with no lock.

    prometheus_client's ``Histogram.observe`` takes a lock per call: per
    token, on the relay's hot path. streamsvc observes and renders on the
    event loop's one thread, so plain counters are safe, and ``collect``
    reports them in the same shape.
    """

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last: above every bound (+Inf)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.sum += value

    @property
    def count(self) -> int:
        return sum(self.counts)

    def family(self, name: str, documentation: str) -> HistogramMetricFamily:
        cumulative, buckets = 0, []
        for bound, count in zip((*map(str, map(float, self.bounds)), "+Inf"), self.counts,
                                strict=True):
            cumulative += count
            buckets.append((bound, cumulative))
        return HistogramMetricFamily(name, documentation, buckets=buckets, sum_value=self.sum)


class Children:
    """The children of one labelled counter, each made once.

    prometheus_client's ``labels`` checks the values and takes a lock on
    every call, several times per stream; this looks each label set up in a
    dict. It holds no more children than the counter holds itself.
    """

    __slots__ = ("_children", "_metric")

    def __init__(self, metric: Counter) -> None:
        self._metric = metric
        self._children: dict[tuple[str, ...], Counter] = {}

    def __call__(self, *values: str) -> Counter:
        child = self._children.get(values)
        if child is None:
            child = self._children[values] = self._metric.labels(*values)
        return child


class TokenTimes(Collector):
    """Time to the first output of each stream, the gaps after it, and the outputs counted."""

    def __init__(self) -> None:
        self.first = LocalHistogram((0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60))
        self.gaps = LocalHistogram(
            (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 30))

    def collect(self) -> Iterator[Metric]:
        yield self.first.family("streamsvc_time_to_first_token_seconds",
                                "From the start of a stream to its first output")
        yield self.gaps.family("streamsvc_inter_token_gap_seconds",
                               "Between two outputs of a stream")
        yield CounterMetricFamily("streamsvc_tokens_relayed",
                                  "Outputs of streams (events, frames: about one per token)",
                                  value=self.first.count + self.gaps.count)


class Metrics:
    """The counters streamsvc keeps; ``render()`` gives the Prometheus text format."""

    def __init__(self, active_streams: Callable[[], int]) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "streamsvc_requests", "HTTP requests by endpoint and status",
            ["endpoint", "status"], registry=self.registry,
        )
        self.streams_started = Counter(
            "streamsvc_streams_started", "Streams started, by kind", ["kind"],
            registry=self.registry,
        )
        self.stream_errors = Counter(
            "streamsvc_stream_errors", "Requests refused and streams ended by an error, by code",
            ["code"], registry=self.registry,
        )
        self.response_bytes = Counter(
            "streamsvc_response_bytes",
            "Body bytes of the responses handlers finished, as handed to the connection",
            registry=self.registry,
        )
        self.client_hangups = Counter(
            "streamsvc_client_hangups", "Clients that left before their stream ended",
            registry=self.registry,
        )
        self.slow_consumers = Counter(
            "streamsvc_slow_consumers",
            "Streams ended or connections closed because the client fell behind",
            registry=self.registry,
        )
        self.token_times = TokenTimes()
        self.registry.register(self.token_times)
        # Called per token: the histogram's own method, with no call of ours around it.
        self.gap: Callable[[float], None] = self.token_times.gaps.observe
        """Another output, ``seconds`` after the one before it."""
        self.upstream_retries = Counter(
            "streamsvc_upstream_retries",
            "Upstream errors a stream's pipeline retried or fell back after, by code",
            ["code"], registry=self.registry,
        )
        self.usage_tokens = Counter(
            "streamsvc_usage_tokens",
            "Tokens used per API key id, by kind (prompt, completion): the upstream's count,"
            " or an estimate where it sent none",
            ["key", "kind"], registry=self.registry,
        )
        self.usage_estimated_tokens = Counter(
            "streamsvc_usage_estimated_tokens",
            "The part of streamsvc_usage_tokens that was estimated (~4 characters a token)",
            ["key", "kind"], registry=self.registry,
        )
        self.usage_answers = Counter(
            "streamsvc_usage_answers",
            "Answers whose usage was counted, per API key id, by source (upstream, estimated)",
            ["key", "source"], registry=self.registry,
        )
        self.journal_lag_seconds = Histogram(
            "streamsvc_journal_lag_seconds",
            "Time from an event's append to its write in the journal;"
            " with Redis, the flush round trip",
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
            registry=self.registry,
        )
        active = Gauge(
            "streamsvc_streams_active", "Generations running in this process",
            registry=self.registry,
        )
        active.set_function(lambda: float(active_streams()))
        self._requests = Children(self.requests)
        self._started = Children(self.streams_started)
        self._errors = Children(self.stream_errors)
        self._retries = Children(self.upstream_retries)
        self._usage_tokens = Children(self.usage_tokens)
        self._estimated_tokens = Children(self.usage_estimated_tokens)
        self._usage_answers = Children(self.usage_answers)

    def count_request(self, endpoint: str, status: int) -> None:
        """A request to this endpoint (its route's canonical path) ended with this status."""
        self._requests(endpoint, str(status)).inc()

    def stream_started(self, kind: str) -> None:
        self._started(kind).inc()

    def count_error(self, code: str) -> None:
        """A request or stream ended by an error with this code."""
        self._errors(code).inc()
        if code == "slow_consumer":
            self.slow_consumers.inc()

    def first_token(self, seconds: float) -> None:
        self.token_times.first.observe(seconds)

    def retried(self, codes: list[str]) -> None:
        for code in codes:
            self._retries(code).inc()

    def usage(self, key_id: str | None, usage: Usage) -> None:
        """Count one answer's tokens for its key (``anonymous`` with auth off)."""
        key = key_id or ANONYMOUS
        self._usage_tokens(key, "prompt").inc(usage.prompt_tokens)
        self._usage_tokens(key, "completion").inc(usage.completion_tokens)
        if usage.estimated:
            self._estimated_tokens(key, "prompt").inc(usage.prompt_tokens)
            self._estimated_tokens(key, "completion").inc(usage.completion_tokens)
        self._usage_answers(key, "estimated" if usage.estimated else "upstream").inc()

    def journal_lag(self, seconds: float) -> None:
        """Events were written to the journal ``seconds`` after they were appended."""
        self.journal_lag_seconds.observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)
