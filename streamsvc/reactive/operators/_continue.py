"""Body of the continuation operator: an answer whose upstream failed after content goes on.

``retry_with_backoff`` replaces an attempt only while no content has gone
out. After content, a retryable failure ends the answer, unless this
operator runs: it asks ``continuation(source, delivered)`` for a new source
(the original request plus an assistant message holding exactly the text
delivered so far), and appends only what that source adds:

- its framing (role-only deltas) is dropped: the answer already began;
- the overlap rule: if the continuation begins by repeating the end of the
  delivered text, the longest such repeat of at least ``MIN_OVERLAP``
  characters (looked for in the last ``OVERLAP_WINDOW`` delivered
  characters) is removed. The continuation's first text is held only until
  it can no longer be the start of such a repeat (usually its first token);
- a :class:`~streamsvc.chunks.Seam` chunk goes out before its first content,
  so a wire format can mark where one upstream's text ends and the next's begins.

It does not apply (the error goes on as it is) to an answer with tool
calls, or to choices other than 0 (``n > 1`` is not continued either: the
pipeline leaves the operator out). Attempts follow ``next_attempt``: the same
source again after a backoff while ``max_attempts`` allow, then the next one.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from reactivex import Observable, abc
from reactivex.disposable import SerialDisposable

from streamsvc.chunks import Chunk, Seam, split_text
from streamsvc.reactive.operators._common import scheduler_of
from streamsvc.reactive.operators._retry import next_attempt

__all__ = ["MIN_OVERLAP", "OVERLAP_WINDOW", "continue_on_failure_", "overlap"]

MIN_OVERLAP = 8
"""The shortest repeat of the delivered text's end that is taken for a repeat."""
OVERLAP_WINDOW = 512
"""How far back in the delivered text a repeat may start."""

Operator = Callable[[Observable[Chunk]], Observable[Chunk]]


def overlap(delivered: str, text: str) -> tuple[bool, int]:
    """(decided, characters to drop) for a continuation that so far begins with ``text``.

    Undecided while ``text`` could still grow into a repeat of the end of
    ``delivered``; then the longest repeat of at least :data:`MIN_OVERLAP`
    characters, or 0.

    >>> overlap("The sky is blue today.", " blue today. And")
    (True, 12)
    >>> overlap("The sky is blue today.", " And")
    (True, 0)
    >>> overlap("The sky is blue today.", " blue")
    (False, 0)
    """
    tail = delivered[-OVERLAP_WINDOW:]
    best = 0
    pending = False
    for start in range(len(tail)):
        rest = tail[start:]
        if text.startswith(rest):
            if len(rest) >= MIN_OVERLAP:
                best = max(best, len(rest))
        elif rest.startswith(text):
            pending = True
    return not pending, best


def _content(chunk: Chunk) -> str | None:
    """Choice 0's text of a chunk that carries only that (None for anything else)."""
    choices = chunk.choices
    if len(choices) != 1 or choices[0].get("index", 0) != 0:
        return None
    delta = choices[0].get("delta") or {}
    if set(delta) - {"content", "role"} or choices[0].get("finish_reason") is not None:
        return None
    content = delta.get("content")
    return content if isinstance(content, str) else None


def _framing(chunk: Chunk) -> bool:
    """A role-only (or empty-text) delta: what begins an answer, and nothing else."""
    if chunk.usage is not None or not chunk.choices:
        return False
    for choice in chunk.choices:
        delta = choice.get("delta") or {}
        if choice.get("finish_reason") is not None or set(delta) - {"role", "content"}:
            return False
        if delta.get("content"):
            return False
    return True


def _drop(chunks: list[Chunk], count: int) -> list[Chunk]:
    """``chunks`` without their first ``count`` characters of content."""
    out: list[Chunk] = []
    for chunk in chunks:
        text = _content(chunk) or ""
        if count <= 0:
            out.append(chunk)
        elif len(text) <= count:
            count -= len(text)
        else:
            parts = split_text(chunk, count)
            assert parts is not None  # a content-only chunk longer than count always splits
            out.append(parts[1])
            count = 0
    return out


def continue_on_failure_(
    continuation: Callable[[int, str], Observable[Chunk]],
    *,
    sources: int,
    answering: Callable[[], int],
    names: list[str],
    max_attempts: int,
    backoff_base: float,
    backoff_max: float,
    scheduler: abc.SchedulerBase | None,
    on_continue: Callable[[Exception], None] | None = None,
) -> Operator:
    """See the module docstring; ``answering()`` is the index of the source that answered."""

    def operator(source: Observable[Chunk]) -> Observable[Chunk]:
        def subscribe(
            observer: abc.ObserverBase[Chunk], scheduler_: abc.SchedulerBase | None = None
        ) -> abc.DisposableBase:
            timer_scheduler = scheduler_of(scheduler, scheduler_, "continue_on_failure")
            current = SerialDisposable()
            delivered: list[str] = []
            state: dict[str, Any] = {
                "content": False,  # content has gone out: a failure now is a continuation
                "calls": False,  # tool calls went out: not continued
                "continued": False,  # a continuation was asked for: attempts count on
                "index": 0, "attempt": 1,
                "seam": None,  # the Seam to send before the continuation's first content
                "held": None,  # the continuation's first chunks, held for the overlap rule
            }

            def forward(chunk: Chunk) -> None:
                for choice in chunk.choices:
                    delta = choice.get("delta") or {}
                    if delta.get("tool_calls") or delta.get("function_call"):
                        state["calls"] = True
                    if choice.get("index", 0) == 0 and isinstance(delta.get("content"), str):
                        delivered.append(delta["content"])
                if chunk.has_content:
                    state["content"] = True
                observer.on_next(chunk)

            def release(chunks: list[Chunk], drop: int) -> None:
                state["held"] = None
                seam = state["seam"]
                state["seam"] = None
                if seam is not None:
                    seam.info["overlap_removed"] = drop
                    observer.on_next(seam)
                for chunk in _drop(chunks, drop):
                    forward(chunk)

            def on_next(chunk: Chunk) -> None:
                held: list[Chunk] | None = state["held"]
                if held is None:
                    forward(chunk)
                    return
                if _framing(chunk):
                    return  # the continuation's framing: the answer already began
                text = _content(chunk)
                if text is None:  # not plain text (a finish, usage, a call): settle first
                    settle()
                    forward(chunk)
                    return
                held.append(chunk)
                decided, drop = overlap("".join(delivered),
                                        "".join(_content(c) or "" for c in held))
                if decided:
                    release(held, drop)

            def settle() -> None:
                held = state["held"]
                if held is not None:
                    _, drop = overlap("".join(delivered),
                                      "".join(_content(c) or "" for c in held))
                    release(held, drop)

            def on_error(error: Exception) -> None:
                if state["held"]:  # text of a continuation that failed: it stays, in order
                    settle()
                plan = None
                if state["content"] and not state["calls"]:
                    if not state["continued"]:  # the first failure after content
                        state["continued"] = True
                        state["index"], state["attempt"] = answering(), 1
                    plan = next_attempt(error, state["index"], state["attempt"], sources,
                                        max_attempts, backoff_base, backoff_max)
                if plan is None:
                    observer.on_error(error)
                    return
                pending: Seam | None = state["seam"]  # a continuation failed before its text
                failed = pending.info["from"] if pending is not None else names[state["index"]]
                state["index"], state["attempt"], delay = plan
                if on_continue is not None:
                    on_continue(error)
                text = "".join(delivered)
                state["seam"] = Seam({
                    "from": failed, "to": names[state["index"]],
                    "code": str(getattr(error, "code", "internal_error")),
                    "delivered_chars": len(text),
                })
                state["held"] = []

                def start(*_: Any) -> None:
                    current.disposable = continuation(state["index"], text).subscribe(
                        on_next, on_error, on_completed, scheduler=scheduler_)

                current.disposable = timer_scheduler.schedule_relative(delay, start)

            def on_completed() -> None:
                settle()
                observer.on_completed()

            current.disposable = source.subscribe(on_next, on_error, on_completed,
                                                  scheduler=scheduler_)
            return current

        return Observable(subscribe)

    return operator
