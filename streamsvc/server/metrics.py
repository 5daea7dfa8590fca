"""Prometheus metrics of one app, in a registry of its own (no global state)."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest

__all__ = ["Metrics"]


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
        self.client_hangups = Counter(
            "streamsvc_client_hangups", "Clients that left before their stream ended",
            registry=self.registry,
        )
        self.slow_consumers = Counter(
            "streamsvc_slow_consumers",
            "Streams ended or connections closed because the client fell behind",
            registry=self.registry,
        )
        active = Gauge(
            "streamsvc_streams_active", "Generations running in this process",
            registry=self.registry,
        )
        active.set_function(lambda: float(active_streams()))

    def count_error(self, code: str) -> None:
        """A request or stream ended by an error with this code."""
        self.stream_errors.labels(code).inc()
        if code == "slow_consumer":
            self.slow_consumers.inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
