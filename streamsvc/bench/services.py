"""Starting, watching and stopping the processes of a run.

A :class:`Service` is a long-running server (simulator, relay): started,
waited for until its port accepts, read from ``/proc``, stopped with SIGTERM
(then SIGKILL). :func:`run_client` runs one load client to its end and hands
each progress line to a callback. :func:`run_with_progress` runs a whole run's
processes in a working folder, under a progress bar, and says when it started and how
long it took.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import resource
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import Any, Generic, Self, TypeVar

import msgspec
from rich.console import Console
from rich.progress import BarColumn, TaskProgressColumn, TextColumn, TimeElapsedColumn
from rich.progress import Progress as ProgressBar

from streamsvc.bench.load import LoadSpec
from streamsvc.bench.procfs import ProcSample, sample
from streamsvc.bench.results import LoadResult, Progress

__all__ = [
    "Finished",
    "Service",
    "ServiceError",
    "child_env",
    "client_command",
    "free_port",
    "raise_file_limit",
    "run_client",
    "run_with_progress",
]

READY_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 10.0
_LOOP_LINE = re.compile(r"event loop: (\w+)")
_T = TypeVar("_T")


class ServiceError(RuntimeError):
    """A process of the run did not start, or a load client failed; says which and why."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def child_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """This environment without streamsvc settings (the run measures the defaults), + ``extra``."""
    env = {
        name: value for name, value in os.environ.items()
        if not name.startswith("STREAMSVC__") and name != "STREAMSVC_CONFIG"
    }
    env.update(extra or {})
    return env


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


class Service:
    """A server process of the run, with its output in ``log_path``.

    Example::

        async with Service("simulator", [sys.executable, "-m", "streamsvc", "simulate",
                                         "--port", str(port)], port=port, log_path=log) as sim:
            before = sim.sample()
    """

    def __init__(
        self,
        role: str,
        command: Sequence[str],
        *,
        port: int,
        log_path: Path,
        env: Mapping[str, str] | None = None,
        native_loop: str | None = None,
    ) -> None:
        self.role = role
        self.command = list(command)
        self.port = port
        self.log_path = log_path
        self.settings = dict(env or {})  # what the run sets for it, beyond the defaults
        self.native_loop = native_loop  # a program in C says its loop here, not in its log
        self._env = child_env(env)
        self._process: asyncio.subprocess.Process | None = None

    @property
    def pid(self) -> int:
        """The process id; only once started."""
        if self._process is None:
            raise RuntimeError(f"{self.role} is not started")
        return self._process.pid

    @property
    def url(self) -> str:
        """``http://127.0.0.1:PORT``."""
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> None:
        """Start the process and wait until its port accepts connections.

        Raises:
            ServiceError: it exited, or did not listen within 30 s; with its last log lines.
        """
        with self.log_path.open("wb") as log:  # the child keeps its own descriptor
            self._process = await asyncio.create_subprocess_exec(
                *self.command, stdout=log, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, env=self._env,
            )
        deadline = time.monotonic() + READY_TIMEOUT_S
        while True:
            if self._process.returncode is not None:
                raise ServiceError(
                    f"{self.role} exited with status {self._process.returncode} before"
                    f" listening:\n{_tail(self.log_path)}"
                )
            with contextlib.suppress(OSError):
                _, writer = await asyncio.open_connection("127.0.0.1", self.port)
                writer.close()
                with contextlib.suppress(OSError):
                    await writer.wait_closed()
                return
            if time.monotonic() > deadline:
                raise ServiceError(f"{self.role} did not listen on port {self.port} within"
                                   f" {READY_TIMEOUT_S:g} s:\n{_tail(self.log_path)}")
            await asyncio.sleep(0.05)

    def sample(self) -> ProcSample:
        """CPU seconds, RSS and peak RSS now."""
        return sample(self.pid)

    def log(self) -> str:
        """What the process has written to stdout and stderr so far."""
        return self.log_path.read_text(errors="replace")

    def event_loop(self) -> str:
        """The loop the process reported on start-up (``event loop: NAME``), else ``"n/a"``."""
        if self.native_loop is not None:
            return self.native_loop
        found = _LOOP_LINE.search(self.log())
        return found.group(1) if found else "n/a"

    async def stop(self) -> None:
        """SIGTERM, then SIGKILL after 10 s; stopping twice is a no-op."""
        process, self._process = self._process, None
        if process is None or process.returncode is not None:
            return
        process.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(process.wait(), STOP_TIMEOUT_S)
        except TimeoutError:
            process.kill()
            await process.wait()

    async def __aenter__(self) -> Self:
        try:
            await self.start()
        except BaseException:
            await self.stop()
            raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()


def client_command(spec: LoadSpec, *, workdir: Path, name: str) -> list[str]:
    """The load client's command for ``spec``; its result goes to ``workdir/NAME.load.json``."""
    return [
        sys.executable, "-m", "streamsvc.bench.load", "--url", spec.url,
        "--endpoint", spec.endpoint, "--streams", str(spec.streams),
        "--tokens", str(spec.tokens), "--rate", str(spec.rate), "--ramp", str(spec.ramp_s),
        "--model", spec.model, "--seed", str(spec.seed),
        *(("--read-url", spec.read_url) if spec.read_url else ()),
        "--out", str(workdir / f"{name}.load.json"),
    ]


async def run_client(
    spec: LoadSpec,
    *,
    workdir: Path,
    name: str,
    on_progress: Callable[[Progress], None],
) -> LoadResult:
    """Run ``python -m streamsvc.bench.load`` for ``spec`` to its end and return its result.

    Raises:
        ServiceError: the client exited with an error; with its last log lines.
    """
    out = workdir / f"{name}.load.json"
    log = workdir / f"{name}.load.log"
    command = client_command(spec, workdir=workdir, name=name)
    decode = msgspec.json.Decoder(Progress).decode
    with log.open("wb") as errors:
        process = await asyncio.create_subprocess_exec(
            *command, stdout=asyncio.subprocess.PIPE, stderr=errors,
            stdin=asyncio.subprocess.DEVNULL, env=child_env(),
        )
        try:
            assert process.stdout is not None
            async for line in process.stdout:
                with contextlib.suppress(msgspec.DecodeError, msgspec.ValidationError):
                    on_progress(decode(line))
            status = await process.wait()
        finally:
            if process.returncode is None:
                process.kill()
                await process.wait()
    if status != 0 or not out.exists():
        raise ServiceError(f"load client {name} exited with status {status}:\n{_tail(log)}")
    return msgspec.json.decode(out.read_bytes(), type=LoadResult)


def raise_file_limit(streams: int) -> None:
    """Raise this process's open-file limit (children inherit it) for ``streams`` at once."""
    # Each open stream holds up to three sockets across the processes.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = max(soft, 4 * streams + 1024)
    if hard != resource.RLIM_INFINITY:
        wanted = min(hard, wanted)
    if wanted > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))


@dataclass(frozen=True, slots=True)
class Finished(Generic[_T]):
    """What a run returned, when it started and how long it took."""

    value: _T
    date: str  # UTC, ISO 8601, to the second
    duration_s: float


def run_with_progress(
    main: Callable[[Path, ProgressBar], Coroutine[Any, Any, _T]],
    *,
    keep_logs: str | None,
    console: Console,
) -> Finished[_T] | None:
    """``main(workdir, bar)`` in a new event loop, under a progress bar on ``console``.

    ``workdir`` is ``keep_logs`` (made if missing) or a temporary folder removed afterwards.

    Returns:
        What ``main`` returned, with its start and duration; None when a process of the run
        failed, which is said on ``console`` with its last log lines.
    """
    started = time.monotonic()
    date = datetime.now(UTC).replace(microsecond=0).isoformat()
    with contextlib.ExitStack() as stack:
        if keep_logs:
            workdir = Path(keep_logs).resolve()
            workdir.mkdir(parents=True, exist_ok=True)
        else:
            workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(
                prefix="streamsvc-bench-")))
        bar = ProgressBar(
            TextColumn("{task.description}"), BarColumn(bar_width=12), TaskProgressColumn(),
            TextColumn("{task.fields[status]}"), TimeElapsedColumn(),
            console=console, refresh_per_second=4,
        )
        try:
            with bar:
                value = asyncio.run(main(workdir, bar))
            return Finished(value, date, time.monotonic() - started)
        except ServiceError as error:
            console.print(f"[red]streamsvc bench: {error}[/red]")
            if not keep_logs:
                console.print("rerun with --keep-logs DIR to keep every process's log")
            return None
