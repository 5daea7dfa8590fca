"""``[server] event_loop``: auto, asyncio or uvloop; a missing uvloop names the key."""

from __future__ import annotations

import asyncio

import pytest

import streamsvc.config
import streamsvc.eventloop
from streamsvc.config import load_config
from streamsvc.errors import ConfigError
from streamsvc.eventloop import loop_factory, loop_name, uvloop_available


def test_default_is_auto() -> None:
    assert load_config(None, env={}).server.event_loop == "auto"


def test_asyncio_gives_asyncios_loop() -> None:
    loop = loop_factory("asyncio")()
    try:
        assert loop_name(loop) == "asyncio" and isinstance(loop, asyncio.BaseEventLoop)
    finally:
        loop.close()


def test_auto_takes_uvloop_when_installed() -> None:
    loop = loop_factory("auto")()
    try:
        assert loop_name(loop) == ("uvloop" if uvloop_available() else "asyncio")
    finally:
        loop.close()


def test_auto_without_uvloop_takes_asyncio(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(streamsvc.eventloop, "uvloop_available", lambda: False)
    assert loop_factory("auto") is asyncio.new_event_loop


def test_uvloop_without_uvloop_names_the_variable_and_the_key(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(streamsvc.config, "uvloop_available", lambda: False)
    with pytest.raises(ConfigError) as caught:
        load_config(None, env={"STREAMSVC__SERVER__EVENT_LOOP": "uvloop"})
    error = caught.value
    assert error.key == "server.event_loop"
    assert error.source == "environment STREAMSVC__SERVER__EVENT_LOOP"
    assert "streamsvc[fast]" in str(error)


def test_an_unknown_loop_names_the_key() -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(None, env={"STREAMSVC__SERVER__EVENT_LOOP": "trio"})
    assert caught.value.key == "server.event_loop" and "trio" in str(caught.value)


def test_uvloop_when_installed() -> None:
    # The test extra installs uvloop, so this runs in CI.
    assert uvloop_available()
    assert load_config(None, env={"STREAMSVC__SERVER__EVENT_LOOP": "uvloop"}).server.event_loop \
        == "uvloop"
    loop = loop_factory("uvloop")()
    try:
        assert loop_name(loop) == "uvloop"
    finally:
        loop.close()
