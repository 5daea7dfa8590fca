"""The faults a request can ask the simulator for, and what each one sends: pure, no I/O.

The answer's coroutine (:mod:`streamsvc.simulator.app`) decides *when* a
fault plays; this module says *what* goes on the wire: the status and body
of the faults before the first byte, the broken and error events of the
faults inside a stream.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any, NamedTuple

import msgspec

__all__ = [
    "AT_TOKEN",
    "BEFORE_FIRST_BYTE",
    "ERROR_BODY",
    "ERROR_EVENT",
    "MALFORMED_BODY",
    "MALFORMED_EVENT",
    "Fault",
    "FaultReply",
    "fault_reply",
]


class Fault(StrEnum):
    """The faults ``simulate.fault`` can ask for."""

    RATE_LIMITED = "429"  # status 429 + Retry-After before the first byte
    SERVER_ERROR = "500"  # status 500 before the first byte
    DROP = "drop"  # abort the connection after fault_at tokens
    HANG = "hang"  # stop sending after fault_at tokens, until the client leaves
    MALFORMED = "malformed"  # a broken JSON event before token fault_at
    ERROR_EVENT = "error_event"  # data: {"error": ...} after fault_at tokens, no [DONE]
    NO_DONE = "no_done"  # every token, then end without finish chunk or [DONE]
    OPEN_AFTER_DONE = "open_after_done"  # [DONE], then keep the body open


BEFORE_FIRST_BYTE = frozenset({Fault.RATE_LIMITED, Fault.SERVER_ERROR})
AT_TOKEN = frozenset({Fault.DROP, Fault.HANG, Fault.MALFORMED, Fault.ERROR_EVENT})

MALFORMED_EVENT = b'data: {"choices": [\n\n'
MALFORMED_BODY = b'{"choices": ['
ERROR_BODY = msgspec.json.encode(
    {
        "error": {
            "message": "simulated upstream error",
            "type": "server_error",
            "code": "simulated",
        }
    }
)
ERROR_EVENT = b"data: " + ERROR_BODY + b"\n\n"


class FaultReply(NamedTuple):
    """The answer to a request whose fault plays before the first byte."""

    status: int
    body: dict[str, Any]
    headers: dict[str, str]


def fault_reply(fault: Fault, *, retry_after: float) -> FaultReply:
    """The status, error body and headers of a fault in :data:`BEFORE_FIRST_BYTE`.

    Example:
        >>> fault_reply(Fault.RATE_LIMITED, retry_after=1.0).headers
        {'Retry-After': '1'}
    """
    if fault is Fault.RATE_LIMITED:
        error = {
            "message": "simulated rate limit, retry later",
            "type": "rate_limit_error",
            "param": None,
            "code": "rate_limit_exceeded",
        }
        return FaultReply(429, {"error": error}, {"Retry-After": _retry_after(retry_after)})
    error = {
        "message": "simulated server error",
        "type": "server_error",
        "param": None,
        "code": "simulated",
    }
    return FaultReply(500, {"error": error}, {})


def _retry_after(seconds: float) -> str:
    return str(int(seconds)) if seconds.is_integer() else str(seconds)
