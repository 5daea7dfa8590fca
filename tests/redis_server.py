"""A real ``redis-server`` (the Debian package) on a free loopback port, for the tests.

No persistence; it can be stopped and started again on the same port, so
tests can take Redis away mid-stream and bring it back.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import time

REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class RedisServer:
    """One redis-server process; ``url`` stays the same across stop/start."""

    def __init__(self) -> None:
        self.port = _free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self._dir = tempfile.TemporaryDirectory(prefix="streamsvc-redis-")
        self._process: subprocess.Popen[bytes] | None = None

    def start(self) -> RedisServer:
        """Start it and wait until it answers PING (fails the test when it cannot start)."""
        self._process = subprocess.Popen(
            [REDIS_SERVER, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", self._dir.name, "--loglevel", "warning"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while True:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1) as sock:
                    sock.sendall(b"PING\r\n")
                    if sock.recv(16).startswith(b"+PONG"):
                        return self
            except OSError:
                pass
            if time.monotonic() > deadline or self._process.poll() is not None:
                self.stop()
                raise AssertionError(f"{REDIS_SERVER} did not start on port {self.port}")
            time.sleep(0.02)

    def stop(self, *, save: bool = False) -> None:
        """Kill it (SIGKILL: Redis lost), or with ``save`` shut it down keeping its data.

        A saved server loads its data again on :meth:`start`, as a production
        Redis with persistence would after a restart.
        """
        if self._process is not None and self._process.poll() is None:
            if save:
                try:
                    self.command("SHUTDOWN", "SAVE")
                except OSError:
                    pass
                try:
                    self._process.wait(10)
                except subprocess.TimeoutExpired:
                    pass
            if self._process.poll() is None:
                self._process.kill()
            self._process.wait()
        self._process = None

    def close(self) -> None:
        self.stop()
        self._dir.cleanup()

    def command(self, *args: str) -> bytes:
        """One command over a raw socket (RESP), for checks that must not use the code under test."""
        parts = [f"*{len(args)}\r\n".encode()]
        for arg in args:
            data = arg.encode()
            parts.append(b"$%d\r\n%s\r\n" % (len(data), data))
        with socket.create_connection(("127.0.0.1", self.port), timeout=5) as sock:
            sock.sendall(b"".join(parts))
            return sock.recv(1 << 20)
