"""The event loop a process runs on: ``[server] event_loop``.

``"auto"`` takes uvloop when it is installed (``pip install 'streamsvc[fast]'``)
and asyncio's own loop otherwise; ``"asyncio"`` and ``"uvloop"`` ask for one.
uvloop runs the same code with a faster loop and socket layer, so nothing
else in streamsvc depends on the choice.
"""

from __future__ import annotations

import asyncio
import importlib.util
from collections.abc import Callable
from typing import Literal

from streamsvc.errors import ConfigError

__all__ = [
    "EVENT_LOOPS",
    "EventLoopSetting",
    "loop_factory",
    "loop_name",
    "uvloop_available",
]

EventLoopSetting = Literal["auto", "asyncio", "uvloop"]
EVENT_LOOPS: tuple[EventLoopSetting, ...] = ("auto", "asyncio", "uvloop")
UVLOOP_MISSING = "'uvloop' needs the uvloop package: pip install 'streamsvc[fast]' (or use 'auto')"


def uvloop_available() -> bool:
    """Whether uvloop can be imported (checked without importing it)."""
    return importlib.util.find_spec("uvloop") is not None


def loop_factory(
    setting: EventLoopSetting, *, source: str = "command line"
) -> Callable[[], asyncio.AbstractEventLoop]:
    """The function that makes a new loop of the chosen kind.

    Args:
        setting: ``"auto"``, ``"asyncio"`` or ``"uvloop"``.
        source: who chose it, for the error message.

    Raises:
        ConfigError: ``"uvloop"`` while uvloop is not installed (key ``server.event_loop``).

    Example:
        >>> loop = loop_factory("asyncio")()
        >>> loop_name(loop)
        'asyncio'
        >>> loop.close()
    """
    if setting == "asyncio" or (setting == "auto" and not uvloop_available()):
        return asyncio.new_event_loop
    try:
        import uvloop
    except ImportError as exc:
        raise ConfigError(UVLOOP_MISSING, source=source, key="server.event_loop") from exc
    factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
    return factory


def loop_name(loop: asyncio.AbstractEventLoop) -> str:
    """``"uvloop"`` or ``"asyncio"``: the kind of ``loop``."""
    return "uvloop" if type(loop).__module__.partition(".")[0] == "uvloop" else "asyncio"
