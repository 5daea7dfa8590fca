"""The simulator's live counters, read by tests at ``GET /_sim/stats`` or in process."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any

__all__ = ["MAX_KEYS", "RECENT_REQUESTS", "SimulatorStats"]

RECENT_REQUESTS = 50
MAX_KEYS = 100_000  # the keys followed at once; the oldest is forgotten past it


@dataclass
class SimulatorStats:
    """Live counters of one simulator app (also at ``GET /_sim/stats``)."""

    requests: int = 0  # chat completion requests received, valid or not
    active: int = 0  # answers in progress
    completed: int = 0  # answers the simulator ended (faults included)
    disconnected: int = 0  # answers whose client left before the end
    recent: deque[dict[str, Any]] = field(default_factory=lambda: deque(maxlen=RECENT_REQUESTS))
    keys: dict[str, dict[str, int]] = field(default_factory=dict)
    """Per ``simulate.key`` (``GET /_sim/keys``): ``requests``, and ``after_content``: the
    requests that came once an earlier one of the key had sent content (a relay that
    asks again after text reached its client)."""

    def key_request(self, key: str) -> None:
        """A request of ``key`` arrived."""
        counts = self.keys.get(key)
        if counts is None:
            if len(self.keys) >= MAX_KEYS:
                del self.keys[next(iter(self.keys))]
            counts = self.keys[key] = {"requests": 0, "after_content": 0, "content": 0}
        counts["requests"] += 1
        if counts["content"]:
            counts["after_content"] += 1

    def key_content(self, key: str) -> None:
        """An answer of ``key`` sent its first content."""
        counts = self.keys.get(key)
        if counts is not None:
            counts["content"] += 1

    def snapshot(self) -> dict[str, int]:
        """The counters as the JSON body of ``GET /_sim/stats``."""
        return {
            "requests": self.requests,
            "active": self.active,
            "completed": self.completed,
            "disconnected": self.disconnected,
        }

    def reset(self) -> None:
        """Zero the counters and forget the recent requests (``active`` stays: it is live)."""
        self.requests = self.completed = self.disconnected = 0
        self.recent.clear()
        self.keys.clear()
