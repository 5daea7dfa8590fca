"""A ``redis-server`` of the run's own, for the Redis journal path (when one is installed).

It listens on 127.0.0.1 on a free port, keeps nothing on disk (no RDB
snapshot, no append-only file) and has its working folder under the run's
temporary folder: nothing of a system Redis is used or touched. It is one
process, so its CPU time is one ``/proc`` reading, which the report gives
next to the relay's: a deployment of several instances pays it too.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

__all__ = ["redis_binary", "redis_command", "redis_version"]


def redis_binary() -> str | None:
    """The ``redis-server`` on PATH (also ``/usr/bin``, where Debian puts it), or None."""
    return shutil.which("redis-server") or shutil.which("redis-server", path="/usr/bin:/usr/sbin")


def redis_version(binary: str) -> str:
    """``redis-server 7.0.15`` or the like (from ``--version``: ``Redis server v=7.0.15 ...``)."""
    result = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=10,
                            check=False)
    for word in result.stdout.split():
        if word.startswith("v="):
            return f"redis-server {word.removeprefix('v=')}"
    return result.stdout.strip() or "redis-server (version unknown)"


def redis_command(binary: str, *, port: int, workdir: Path) -> list[str]:
    """The foreground command: loopback only, no persistence, ``workdir`` as its folder."""
    workdir.mkdir(parents=True, exist_ok=True)
    return [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
            "--appendonly", "no", "--dir", str(workdir), "--daemonize", "no",
            "--loglevel", "warning"]
