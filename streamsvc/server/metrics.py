"""Prometheus metrics of one app, in a registry of its own (no global state)."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from streamsvc.usage import Usage

__all__ = ["ANONYMOUS", "Metrics"]

ANONYMOUS = "anonymous"
"""The ``key`` label of usage with auth off (key ids are hex, so no key is named this)."""


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
        self.time_to_first_token = Histogram(
            "streamsvc_time_to_first_token_seconds",
            "From the start of a generation to its first journaled event",
            buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
            registry=self.registry,
        )
        self.inter_token_gap = Histogram(
            "streamsvc_inter_token_gap_seconds",
            "Between two journaled events of a generation",
            buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 30),
            registry=self.registry,
        )
        self.tokens = Counter(
            "streamsvc_tokens_relayed", "Events journaled by generations (about one per token)",
            registry=self.registry,
        )
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

    def stream_started(self, kind: str) -> None:
        self.streams_started.labels(kind).inc()

    def count_error(self, code: str) -> None:
        """A request or stream ended by an error with this code."""
        self.stream_errors.labels(code).inc()
        if code == "slow_consumer":
            self.slow_consumers.inc()

    def first_token(self, seconds: float) -> None:
        self.time_to_first_token.observe(seconds)
        self.tokens.inc()

    def gap(self, seconds: float) -> None:
        self.inter_token_gap.observe(seconds)
        self.tokens.inc()

    def retried(self, codes: list[str]) -> None:
        for code in codes:
            self.upstream_retries.labels(code).inc()

    def usage(self, key_id: str | None, usage: Usage) -> None:
        """Count one answer's tokens for its key (``anonymous`` with auth off)."""
        key = key_id or ANONYMOUS
        self.usage_tokens.labels(key, "prompt").inc(usage.prompt_tokens)
        self.usage_tokens.labels(key, "completion").inc(usage.completion_tokens)
        if usage.estimated:
            self.usage_estimated_tokens.labels(key, "prompt").inc(usage.prompt_tokens)
            self.usage_estimated_tokens.labels(key, "completion").inc(usage.completion_tokens)
        self.usage_answers.labels(key, "estimated" if usage.estimated else "upstream").inc()

    def journal_lag(self, seconds: float) -> None:
        """Events were written to the journal ``seconds`` after they were appended."""
        self.journal_lag_seconds.observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)
