"""The simulator's live counters, read by tests at ``GET /_sim/stats`` or in process."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any

__all__ = ["RECENT_REQUESTS", "SimulatorStats"]

RECENT_REQUESTS = 50


@dataclass
class SimulatorStats:
    """Live counters of one simulator app (also at ``GET /_sim/stats``)."""

    requests: int = 0  # chat completion requests received, valid or not
    active: int = 0  # answers in progress
    completed: int = 0  # answers the simulator ended (faults included)
    disconnected: int = 0  # answers whose client left before the end
    recent: deque[dict[str, Any]] = field(default_factory=lambda: deque(maxlen=RECENT_REQUESTS))

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
