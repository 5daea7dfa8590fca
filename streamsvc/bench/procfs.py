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
from dataclasses import dataclass
from pathlib import Path

__all__ = ["ProcSample", "busy_cpu_seconds", "cpu_seconds", "listen_overflows", "sample"]

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


def busy_cpu_seconds() -> float:
    """CPU seconds every process on the machine has used so far (``/proc/stat``, not idle).

    Its growth over a phase, minus what the run's own processes used, is what
    other work on the machine took: the noise in the figures.
    """
    fields = Path("/proc/stat").read_text(encoding="ascii").split("\n", 1)[0].split()[1:]
    ticks = [int(value) for value in fields]
    # user nice system idle iowait irq softirq steal [guest guest_nice, inside user].
    # irq and softirq are left out: loopback traffic is processed there, on behalf
    # of the run's own processes. steal stays: a hypervisor's other guests are noise.
    user, nice, system, steal = ticks[0], ticks[1], ticks[2], ticks[7]
    busy = user + nice + system + steal
    return busy / _TICKS
