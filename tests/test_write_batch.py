"""The write batch: writes kept inside a block go out once per target, at the outermost end."""

from __future__ import annotations

import pytest

from streamsvc.reactive.write_batch import current_batch


class Target:
    def __init__(self) -> None:
        self.kept: list[bytes] = []
        self.writes: list[bytes] = []

    def write(self, data: bytes) -> None:
        batch = current_batch()
        if batch.open:
            if not self.kept:
                batch.add(self)
            self.kept.append(data)
        else:
            self.writes.append(data)

    def flush_batch(self) -> None:
        self.writes.append(b"".join(self.kept))
        self.kept = []


def test_each_target_flushes_once_at_the_outermost_end_in_order() -> None:
    a, b = Target(), Target()
    with current_batch():
        a.write(b"1")
        with current_batch():
            b.write(b"x")
            a.write(b"2")
        assert a.writes == b.writes == []  # the inner block's end flushes nothing
        a.write(b"3")
    assert a.writes == [b"123"] and b.writes == [b"x"]
    a.write(b"4")  # outside a block: at once
    assert a.writes == [b"123", b"4"]


def test_a_block_left_by_an_error_still_flushes() -> None:
    a = Target()
    with pytest.raises(ValueError), current_batch():
        a.write(b"kept")
        raise ValueError
    assert a.writes == [b"kept"] and not current_batch().open
