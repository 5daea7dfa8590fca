"""What machine and software the figures come from (for ``--json`` and the docs)."""

from __future__ import annotations

import os
import platform
from importlib import metadata
from pathlib import Path

__all__ = ["machine_info"]


def _cpu_model() -> str | None:
    try:
        for line in Path("/proc/cpuinfo").read_text(errors="replace").splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    except OSError:
        pass
    return platform.processor() or None


def _memory_bytes() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text(errors="replace").splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def machine_info(
    *, nginx: str | None = None, redis: str | None = None
) -> dict[str, str | int | float | None]:
    """CPU, memory, OS, Python and the versions of the packages that carry the relays."""
    return {
        "cpu_model": _cpu_model(),
        "cpus": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)),
        "memory_bytes": _memory_bytes(),
        "os": platform.platform(),
        "python": platform.python_version(),
        "python_implementation": platform.python_implementation(),
        "streamsvc": _version("streamsvc"),
        "aiohttp": _version("aiohttp"),
        "reactivex": _version("reactivex"),
        "msgspec": _version("msgspec"),
        "uvloop": _version("uvloop"),
        "hiredis": _version("hiredis"),  # redis-py's reply parser on the Redis paths
        "nginx": nginx,
        "redis": redis,
    }
