"""The write batch: frames kept during a turn go out once per target, back to back, at its end."""

from __future__ import annotations

import asyncio

import pytest

from streamsvc.reactive.write_batch import loop_batch


class Target:
    def __init__(self, log: list[tuple[str, bytes]], name: str) -> None:
        self.kept: list[bytes] = []
        self.log = log
        self.name = name

    def write(self, data: bytes) -> None:
        if not self.kept:
            loop_batch().add(self)
        self.kept.append(data)

    def flush_batch(self) -> None:
        self.log.append((self.name, b"".join(self.kept)))
        self.kept = []


async def test_each_target_flushes_once_per_turn_in_order() -> None:
    log: list[tuple[str, bytes]] = []
    a, b = Target(log, "a"), Target(log, "b")
    a.write(b"1")
    b.write(b"x")
    a.write(b"2")
    assert log == []  # nothing before the turn ends
    await asyncio.sleep(0)
    assert log == [("a", b"12"), ("b", b"x")]
    a.write(b"3")  # a later turn: its own flush
    await asyncio.sleep(0)
    assert log == [("a", b"12"), ("b", b"x"), ("a", b"3")]


async def test_a_target_that_fails_to_flush_does_not_keep_the_others_frames(
    caplog: pytest.LogCaptureFixture,
) -> None:
    log: list[tuple[str, bytes]] = []

    class Broken(Target):
        def flush_batch(self) -> None:
            raise RuntimeError("broken")

    Broken(log, "broken").write(b"lost")
    good = Target(log, "good")
    good.write(b"kept")
    await asyncio.sleep(0)
    assert log == [("good", b"kept")]
    assert "failed to flush" in caplog.text


def test_each_loop_has_its_own_batch() -> None:
    async def batch() -> object:
        return loop_batch()

    first, second = asyncio.run(batch()), asyncio.run(batch())
    assert first is not second
