"""CPU time and memory of a running process, read from Linux's ``/proc``.

CPU time: the first field of ``/proc/PID/task/TID/schedstat`` is the time the
thread has run, in nanoseconds; summed over the threads it is the process's
user + system time, to the nanosecond. ``/proc/PID/stat`` fields 14 and 15
(``utime``, ``stime``) say the same in clock ticks (10 ms), too coarse for a
run of a few seconds, so they are the fallback for kernels without
schedstat. ``/proc/PID/status`` gives ``VmRSS`` (resident now) and ``VmHWM``
(the resident peak, "high water mark") in kB.
"""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "BusiestStretch", "ProcSample", "busy_cpu_seconds", "cpu_seconds", "listen_overflows",
    "machine_cpu_seconds", "sample",
]

_TICKS = os.sysconf("SC_CLK_TCK")
_HAS_SCHEDSTAT = Path("/proc/self/schedstat").exists()


@dataclass(frozen=True, slots=True)
class ProcSample:
    """One reading of a process: CPU seconds so far, RSS now, RSS peak (bytes)."""

    cpu_s: float
    rss_bytes: int
    hwm_bytes: int


def cpu_seconds(pid: int) -> float:
    """User plus system CPU seconds the process's live threads have used so far.

    Raises:
        OSError: the process is gone.
    """
    if not _HAS_SCHEDSTAT:
        return _cpu_seconds_from_ticks(pid)
    total_ns = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(FileNotFoundError):  # a thread that has just ended
            total_ns += int((task / "schedstat").read_text(encoding="ascii").split()[0])
    return total_ns / 1e9


def _cpu_seconds_from_ticks(pid: int) -> float:
    stat = Path(f"/proc/{pid}/stat").read_text(encoding="utf-8", errors="replace")
    # The command name (field 2) is in parentheses and may hold spaces: split after it.
    fields = stat[stat.rindex(")") + 2 :].split()
    utime, stime = int(fields[11]), int(fields[12])  # fields 14 and 15 of the whole line
    return (utime + stime) / _TICKS


def sample(pid: int) -> ProcSample:
    """CPU seconds, ``VmRSS`` and ``VmHWM`` of ``pid``.

    Raises:
        OSError: the process is gone.
    """
    memory: dict[str, int] = {}
    status = Path(f"/proc/{pid}/status").read_text(encoding="utf-8", errors="replace")
    for line in status.splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            memory[key] = int(value.split()[0]) * 1024
    return ProcSample(
        cpu_s=cpu_seconds(pid),
        rss_bytes=memory.get("VmRSS", 0),
        hwm_bytes=memory.get("VmHWM", 0),
    )


def listen_overflows() -> int:
    """Connections the kernel dropped because a listen queue was full (system-wide, so far).

    ``TcpExt: ListenOverflows`` in ``/proc/net/netstat``; 0 where it cannot be read.
    A dropped SYN is retried by the client after a second or more, which shows
    as a slow first token that no process spent CPU on.
    """
    try:
        lines = Path("/proc/net/netstat").read_text(encoding="ascii").splitlines()
    except OSError:
        return 0
    for names, values in zip(lines[::2], lines[1::2], strict=False):
        if names.startswith("TcpExt:"):
            table = dict(zip(names.split()[1:], values.split()[1:], strict=False))
            return int(table.get("ListenOverflows", 0))
    return 0


def _stat_ticks() -> list[int]:
    fields = Path("/proc/stat").read_text(encoding="ascii").split("\n", 1)[0].split()[1:]
    return [int(value) for value in fields]


def busy_cpu_seconds() -> float:
    """CPU seconds every process on the machine has used so far (``/proc/stat``, not idle).

    Its growth over a phase, minus what the run's own processes used, is what
    other work on the machine took: the noise in the figures.
    """
    ticks = _stat_ticks()
    # user nice system idle iowait irq softirq steal [guest guest_nice, inside user].
    # irq and softirq are left out: loopback traffic is processed there, on behalf
    # of the run's own processes. steal stays: a hypervisor's other guests are noise.
    user, nice, system, steal = ticks[0], ticks[1], ticks[2], ticks[7]
    busy = user + nice + system + steal
    return busy / _TICKS


def machine_cpu_seconds() -> float:
    """CPU seconds the machine's CPUs have been in use so far, summed over them (``/proc/stat``).

    Everything but idle and iowait, interrupts included: what a process waiting
    for a CPU waits behind, whoever it is spent for.
    """
    ticks = _stat_ticks()
    return (sum(ticks[:8]) - ticks[3] - ticks[4]) / _TICKS  # guest time is inside user's


class BusiestStretch:
    """How busy the machine's CPUs were in the busiest stretch of a phase (0 to 1).

    A latency tail measured while every CPU was in use is partly waiting for
    a CPU: the harness's processes and the relay share the machine. Fed a
    reading at the phase's start, at each progress line (every 0.25 s) and
    at its end; a stretch is the shortest run of readings at least
    ``window_s`` long, so one late reading does not make a peak.
    """

    __slots__ = ("_cpus", "_readings", "_window_s", "peak")

    def __init__(self, *, window_s: float = 0.5, cpus: int | None = None) -> None:
        self._window_s = window_s
        self._cpus = cpus or os.cpu_count() or 1  # /proc/stat's first line sums them all
        self._readings: list[tuple[float, float]] = []  # (monotonic s, machine CPU s)
        self.peak: float | None = None
        """The busiest stretch's share of all the CPUs; None until one is ``window_s`` long."""

    def read(self, at: float | None = None, cpu_s: float | None = None) -> None:
        """Take a reading (now, or the one given: for tests)."""
        now = time.monotonic() if at is None else at
        used = machine_cpu_seconds() if cpu_s is None else cpu_s
        readings = self._readings
        readings.append((now, used))
        # Each earlier reading starts one stretch: the first reading a window after it ends it.
        while len(readings) > 1 and now - readings[0][0] >= self._window_s:
            start, start_used = readings.pop(0)
            self._stretch(now - start, used - start_used)

    def _stretch(self, seconds: float, used: float) -> None:
        share = min(used / (seconds * self._cpus), 1.0)
        if self.peak is None or share > self.peak:
            self.peak = share
