"""The faults a request can ask the simulator for, and what each one sends: pure, no I/O.

The answer's coroutine (:mod:`streamsvc.simulator.app`) decides *when* a
fault plays; this module says *what* goes on the wire: the status and body
of the faults before the first byte, the broken and error events of the
faults inside a stream.
"""

from __future__ import annotations

import json
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
    "SSE_ERROR_EVENT",
    "Fault",
    "FaultReply",
    "fault_reply",
    "json_string",
    "split_astral",
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
    SSE_ERROR = "sse_error"  # event: error + data: {"error": ...} after fault_at tokens, [DONE]
    NO_FINISH = "no_finish"  # every token, then [DONE] without a finish chunk
    SLOW_HEADERS = "slow_headers"  # the headers wait first_token_delay s (not the first chunk)
    SPLIT_SURROGATES = "split_surrogates"  # a non-BMP character: two chunks, "\ud83d" "\ude42"


BEFORE_FIRST_BYTE = frozenset({Fault.RATE_LIMITED, Fault.SERVER_ERROR})
AT_TOKEN = frozenset({Fault.DROP, Fault.HANG, Fault.MALFORMED, Fault.ERROR_EVENT,
                      Fault.SSE_ERROR})

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
# What some servers send for a failure mid-stream: a typed SSE event, then [DONE].
SSE_ERROR_EVENT = b"event: error\ndata: " + ERROR_BODY + b"\n\ndata: [DONE]\n\n"


def split_astral(tokens: list[str]) -> list[str]:
    """The tokens cut inside each character outside the BMP, between its UTF-16 halves.

    A piece then ends with a lone high surrogate and the next starts with the
    low one; :func:`json_string` writes them as ``\\ud83d`` and ``\\ude42``,
    as upstreams that cut by UTF-16 code unit do. Joined, the pieces are the text.

    Example:
        >>> split_astral(["a\U0001f642b", "c"])
        ['a\ud83d', '\ude42b', 'c']
    """
    pieces: list[str] = []
    for token in tokens:
        piece = ""
        for char in token:
            if ord(char) <= 0xFFFF:
                piece += char
                continue
            units = ord(char) - 0x10000
            pieces.append(piece + chr(0xD800 + (units >> 10)))
            piece = chr(0xDC00 + (units & 0x3FF))
        pieces.append(piece)
    return pieces


def json_string(text: str) -> bytes:
    """``text`` as a JSON string in ASCII, lone surrogates as ``\\uXXXX`` escapes."""
    return json.dumps(text).encode()


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
