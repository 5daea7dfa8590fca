"""The streamsvc exception tree; every error carries a code from one closed set.

::

    StreamsvcError                     (code, message, retryable, status)
    ├── ConfigError                    config_invalid: names the file and the key (every
    │                                  problem of a config at once: problems)
    ├── ClientError                    the request was wrong: bad_request, not_found,
    │                                  request_timeout (its body was too slow), ...
    │   └── LimitError                 rate_limited by one of our own limits (retry_after)
    ├── UpstreamError                  the upstream failed: upstream_unavailable,
    │                                  upstream_error, upstream_timeout, idle_timeout,
    │                                  rate_limited (carries retry_after)
    └── StreamError                    the stream ended abnormally: slow_consumer,
                                       cancelled, shutting_down, journal_full,
                                       journal_unavailable, instance_lost

Foreign exceptions (aiohttp, msgspec, OSError) are mapped to these at the
boundary with ``raise ... from exc``; nothing else crosses a module edge.
"""

from __future__ import annotations

from collections.abc import Sequence
from enum import StrEnum
from typing import Any, NamedTuple

__all__ = [
    "ClientError",
    "ConfigError",
    "ConfigProblem",
    "ErrorCode",
    "LimitError",
    "StreamError",
    "StreamsvcError",
    "UpstreamError",
]


class ErrorCode(StrEnum):
    """The closed set of error codes; documented in docs/api.md."""

    BAD_REQUEST = "bad_request"
    UNAUTHORIZED = "unauthorized"
    FORBIDDEN = "forbidden"
    NOT_FOUND = "not_found"
    PAYLOAD_TOO_LARGE = "payload_too_large"
    REQUEST_TIMEOUT = "request_timeout"
    MODEL_NOT_FOUND = "model_not_found"
    RATE_LIMITED = "rate_limited"
    UPSTREAM_UNAVAILABLE = "upstream_unavailable"
    UPSTREAM_ERROR = "upstream_error"
    UPSTREAM_TIMEOUT = "upstream_timeout"
    IDLE_TIMEOUT = "idle_timeout"
    SLOW_CONSUMER = "slow_consumer"
    JOURNAL_FULL = "journal_full"
    SHUTTING_DOWN = "shutting_down"
    JOURNAL_UNAVAILABLE = "journal_unavailable"
    INSTANCE_LOST = "instance_lost"
    CANCELLED = "cancelled"
    CONFIG_INVALID = "config_invalid"
    INTERNAL_ERROR = "internal_error"


# HTTP status used when the error is answered before a stream starts.
_STATUS: dict[ErrorCode, int] = {
    ErrorCode.BAD_REQUEST: 400,
    ErrorCode.UNAUTHORIZED: 401,
    ErrorCode.FORBIDDEN: 403,
    ErrorCode.NOT_FOUND: 404,
    ErrorCode.MODEL_NOT_FOUND: 404,
    ErrorCode.PAYLOAD_TOO_LARGE: 413,
    ErrorCode.REQUEST_TIMEOUT: 408,
    ErrorCode.RATE_LIMITED: 429,
    ErrorCode.UPSTREAM_UNAVAILABLE: 502,
    ErrorCode.UPSTREAM_ERROR: 502,
    ErrorCode.UPSTREAM_TIMEOUT: 504,
    ErrorCode.IDLE_TIMEOUT: 504,
    ErrorCode.SLOW_CONSUMER: 503,
    ErrorCode.JOURNAL_FULL: 507,
    ErrorCode.SHUTTING_DOWN: 503,
    ErrorCode.JOURNAL_UNAVAILABLE: 503,
    ErrorCode.INSTANCE_LOST: 502,
    ErrorCode.CANCELLED: 499,
    ErrorCode.CONFIG_INVALID: 500,
    ErrorCode.INTERNAL_ERROR: 500,
}

# OpenAI's error "type" for each code, so SDK clients raise the right class.
_OPENAI_TYPE: dict[ErrorCode, str] = {
    ErrorCode.BAD_REQUEST: "invalid_request_error",
    ErrorCode.NOT_FOUND: "invalid_request_error",
    ErrorCode.MODEL_NOT_FOUND: "invalid_request_error",
    ErrorCode.PAYLOAD_TOO_LARGE: "invalid_request_error",
    ErrorCode.REQUEST_TIMEOUT: "invalid_request_error",
    ErrorCode.UNAUTHORIZED: "authentication_error",
    ErrorCode.FORBIDDEN: "permission_error",
    ErrorCode.RATE_LIMITED: "rate_limit_error",
}


class StreamsvcError(Exception):
    """Root of every error streamsvc raises on purpose.

    Args:
        code: one of :class:`ErrorCode`.
        message: what was expected and what came, for a human.
        retryable: whether the same request may succeed later.
        param: the request field at fault, when there is one.
        status: overrides the HTTP status implied by ``code``.
    """

    default_code: ErrorCode = ErrorCode.INTERNAL_ERROR

    def __init__(
        self,
        message: str,
        *,
        code: ErrorCode | None = None,
        retryable: bool = False,
        param: str | None = None,
        status: int | None = None,
    ) -> None:
        super().__init__(message)
        self.code: ErrorCode = code or self.default_code
        self.message = message
        self.retryable = retryable
        self.param = param
        self.status: int = status or _STATUS[self.code]

    def to_event(self) -> dict[str, Any]:
        """The data of a streamsvc ``error`` event."""
        return {"code": str(self.code), "message": self.message, "retryable": self.retryable}

    def to_openai(self) -> dict[str, Any]:
        """The body OpenAI sends for an error: ``{"error": {message, type, param, code}}``."""
        return {
            "error": {
                "message": self.message,
                "type": _OPENAI_TYPE.get(self.code, "api_error"),
                "param": self.param,
                "code": str(self.code),
            }
        }

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.code!s}: {self.message!r})"


class ConfigProblem(NamedTuple):
    """One mistake in the config: where it came from, the dotted key, what is wrong."""

    source: str  # the file, "environment VAR" or "command line"
    key: str
    message: str

    def __str__(self) -> str:
        return f"{self.source}: {self.key}: {self.message}"


class ConfigError(StreamsvcError):
    """A config file, environment override or flag is wrong; names the source and key.

    One error carries every problem found (``problems``, the first one's
    ``source`` and ``key`` on the error itself); its message is one line each.
    """

    default_code = ErrorCode.CONFIG_INVALID

    def __init__(self, message: str, *, source: str, key: str,
                 more: Sequence[ConfigProblem] = ()) -> None:
        self.problems: tuple[ConfigProblem, ...] = (ConfigProblem(source, key, message), *more)
        super().__init__("\n".join(map(str, self.problems)))
        self.source = source
        self.key = key


class ClientError(StreamsvcError):
    """The client's request is wrong; answered with a 4xx naming the field."""

    default_code = ErrorCode.BAD_REQUEST


class LimitError(ClientError):
    """A client went over one of streamsvc's own limits: ``429 rate_limited`` with Retry-After."""

    default_code = ErrorCode.RATE_LIMITED

    def __init__(self, message: str, *, retry_after: float, param: str | None = None) -> None:
        super().__init__(message, retryable=True, param=param)
        self.retry_after = retry_after


class UpstreamError(StreamsvcError):
    """The upstream failed; ``retryable``, ``retry_after`` and ``fallback_only`` drive retry.

    ``fallback_only`` marks a failure not worth repeating on the same upstream
    (it was too slow to answer): the next upstream of the route is tried instead.
    """

    default_code = ErrorCode.UPSTREAM_ERROR

    def __init__(
        self,
        message: str,
        *,
        code: ErrorCode | None = None,
        retryable: bool = False,
        retry_after: float | None = None,
        upstream_status: int | None = None,
        fallback_only: bool = False,
    ) -> None:
        super().__init__(message, code=code, retryable=retryable)
        self.retry_after = retry_after
        self.upstream_status = upstream_status
        self.fallback_only = fallback_only

    def to_event(self) -> dict[str, Any]:
        """The ``error`` event data; ``retry_after`` (seconds) when the upstream gave one."""
        event = super().to_event()
        if self.retry_after is not None:
            event["retry_after"] = self.retry_after
        return event


class StreamError(StreamsvcError):
    """A stream ended abnormally for a reason of streamsvc's own (client, journal, shutdown)."""

    default_code = ErrorCode.CANCELLED
