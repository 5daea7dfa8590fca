"""The typed records of a benchmark run, as they appear in ``--json FILE``.

Times are milliseconds, memory bytes (``*_kib`` fields: KiB), CPU seconds and
microseconds per token. The load client writes a :class:`LoadResult`; the
orchestrator wraps each in a :class:`PathResult` or :class:`OpenStreamsResult`
and ends with one :class:`BenchReport`; a paired run (``--paired``) ends with one
:class:`PairedReport` instead.
"""

from __future__ import annotations

import msgspec

__all__ = [
    "Added",
    "BenchReport",
    "BenchSettings",
    "Latency",
    "LoadResult",
    "OpenStreamsResult",
    "PairedLoop",
    "PairedPath",
    "PairedRep",
    "PairedReport",
    "PairedResult",
    "PairedScenario",
    "PairedSide",
    "PathResult",
    "ProcessInfo",
    "Progress",
    "RoundResult",
    "RunRecord",
    "Skipped",
    "TargetResult",
]


class _Record(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    pass


class Latency(_Record):
    """A latency distribution, in milliseconds."""

    count: int
    mean: float
    p50: float
    p90: float
    p99: float
    p999: float
    max: float


class Added(_Record):
    """What a relay adds over the direct run: relay percentile minus direct percentile (ms)."""

    p50: float
    p99: float
    max: float


class Progress(_Record):
    """One progress line of a load client on its stdout (JSON lines)."""

    open: int  # streams with response headers in and no end yet
    done: int
    failed: int
    chars: int  # content characters received
    chars_total: int  # content characters expected over all streams


class LoadResult(_Record):
    """What one load-client process measured (``python -m streamsvc.bench.load --out``)."""

    url: str
    endpoint: str
    streams: int
    tokens: int
    rate: float
    ramp_s: float
    event_loop: str
    duration_s: float
    cpu_s: float  # the load client's own CPU over the run: the harness's share of the machine
    process_cpu_s: float  # the same since the client started, imports included
    completed: int  # streams that ended normally with exactly the expected text
    failed: int
    errors: dict[str, int]  # failure reason -> count
    ttft_ms: Latency  # request sent -> first content token read
    gap_ms: Latency  # between successive reads that brought content
    ttft_cdf: list[tuple[float, float]]  # (ms, cumulative level)
    gap_cdf: list[tuple[float, float]]
    max_open: int  # the most streams open at once
    read_url: str | None = None  # streams read from another instance than ``url``


class RoundResult(_Record):
    """One run of a relay path in a round (``--rounds``): its own processes, held to the
    baseline runs of the same round and loop just before and after it. The baseline runs
    several times a round (before, between and after the streamsvc paths): one each."""

    round: int  # 1, 2, ...
    cpu_s: float | None
    cpu_us_per_token: float | None
    cpu_ratio_to_baseline: float | None
    completed: int
    failed: int
    added_ttft_p99_ms: float | None
    added_gap_p99_ms: float | None
    # What cpu_ratio_to_baseline divides by: the mean of the baseline runs just before and
    # after (the baseline's own figure for a baseline run); None in JSON from before.
    baseline_us_per_token: float | None = None


class PathResult(_Record):
    """One path of the main phase: clients -> (relay) -> simulator.

    A relay path measured in several rounds reports the median of its rounds'
    CPU per token and of their ratios to the baseline; its load, latencies and
    memory are those of its median round (the one whose ratio is nearest the
    median), and ``rounds`` holds every round.
    """

    # direct | baseline | streamsvc-ENDPOINT | streamsvc-redis | nginx; with several relay
    # loops the relay paths end in @LOOP (baseline@asyncio)
    name: str
    label: str  # what the path is, whatever its loop
    relay: str | None  # the relay process; None for the direct run
    relay_loop: str | None  # the --loop it ran for (auto | asyncio | uvloop); None: direct, nginx
    event_loop: str  # the relay's (the simulator's for the direct run)
    journal: str | None  # memory | redis: streamsvc's, as its log says; None for other relays
    load: LoadResult
    tokens_relayed: int
    cpu_s: float | None
    cpu_us_per_token: float | None
    cpu_ratio_to_baseline: float | None  # ÷ the baseline on the same loop
    redis_cpu_us_per_token: float | None  # redis-server's own CPU, on top of the relay's
    peak_rss_bytes: int | None  # the relay's VmHWM over its whole life (warm-up included)
    simulator_cpu_us_per_token: float
    listen_overflows: int  # SYNs the kernel dropped during the run (a full accept queue)
    other_cpu_s: float  # CPU other processes on the machine used during the run (noise)
    added_ttft_ms: Added | None
    added_gap_ms: Added | None
    # The baseline's and streamsvc's paths, one per round; none for direct and nginx (and in
    # JSON from before --rounds).
    rounds: list[RoundResult] = msgspec.field(default_factory=list)
    # The share of all the machine's CPUs in use in the run's busiest half second
    # (procfs.BusiestStretch); None in JSON from before it was measured.
    machine_busy_peak: float | None = None

    @property
    def failed_streams(self) -> int:
        """Streams that failed over every round (the median round's load holds one)."""
        return sum(r.failed for r in self.rounds) if self.rounds else self.load.failed


class OpenStreamsResult(_Record):
    """The open-streams phase: M slow streams at once through one relay."""

    name: str
    label: str
    relay: str | None
    relay_loop: str | None
    event_loop: str
    load: LoadResult
    rss_before_bytes: int | None
    rss_plateau_bytes: int | None  # the highest RSS while all M streams were open
    rss_open_streams: int  # streams open at that reading (M, unless the plateau was missed)
    rss_per_stream_kib: float | None  # (rss_plateau - rss_before) / rss_open_streams
    plateau_reached: bool  # whether a sample saw all M streams open at once
    peak_rss_bytes: int | None
    cpu_us_per_token: float | None
    listen_overflows: int
    other_cpu_s: float
    added_gap_ms: Added | None
    added_ttft_ms: Added | None = None  # optional: JSON from before it was measured loads
    machine_busy_peak: float | None = None  # as PathResult's


class TargetResult(_Record):
    """One target (docs/performance.md), with the figure measured."""

    name: str
    description: str
    limit: float
    unit: str
    value: float | None  # None when the run could not measure it (reason in ``note``)
    met: bool | None
    note: str = ""


class Skipped(_Record):
    """A path left out of the run, and why."""

    name: str
    reason: str


class ProcessInfo(_Record):
    """One process of the run and the event loop it ran on."""

    role: str
    command: list[str]
    event_loop: str
    settings: dict[str, str] = msgspec.field(default_factory=dict)  # its environment overrides


class BenchSettings(_Record):
    """The scenario of the run."""

    streams: int
    tokens: int
    rate: float
    ramp_s: float
    slow_streams: int
    slow_rate: float
    slow_tokens: int
    slow_ramp_s: float
    endpoints: list[str]
    loop: str
    relay_loops: list[str]  # the loops the relay paths ran on, in order
    model: str
    quick: bool
    nginx: bool
    redis: bool
    rounds: int = 1  # of the main phase's relay paths per loop (JSON from before: one)


class RunRecord(_Record):
    """What every report of ``streamsvc bench`` opens with: what ran, when, and where."""

    streamsvc_version: str
    date: str  # UTC, ISO 8601
    command: list[str]
    command_line: str
    duration_s: float
    machine: dict[str, str | int | float | None]


class BenchReport(RunRecord):
    """Everything ``streamsvc bench --json FILE`` writes."""

    settings: BenchSettings
    processes: list[ProcessInfo]
    paths: list[PathResult]
    open_streams: list[OpenStreamsResult]
    targets: list[TargetResult]
    skipped: list[Skipped]
    failed_streams: int


class PairedSide(_Record):
    """One side of a paired rep: a fresh relay with a simulator and a load client of its own."""

    relay: str  # baseline | streamsvc
    event_loop: str  # the relay's, as its log says
    simulator_port: int  # which of the run's two simulators it relayed
    cpu_s: float  # the relay's, from just before its load client started to just after it ended
    cpu_us_per_token: float | None  # over the tokens of its completed streams
    completed: int
    failed: int
    errors: dict[str, int]  # failure reason -> count, as the load client says


class PairedRep(_Record):
    """One rep of a paired path: the baseline and the streamsvc path measured at once."""

    rep: int  # 1, 2, ...
    first: str  # the side started first, on the first simulator: alternates rep by rep
    baseline: PairedSide
    path: PairedSide
    ratio: float | None  # path.cpu_us_per_token / baseline.cpu_us_per_token
    failed: int  # streams failed on either side: the rep's figures are then flagged


class PairedPath(_Record):
    """One streamsvc path of a paired run on one relay loop, over its reps."""

    name: str  # streamsvc-ENDPOINT
    endpoint: str
    reps: list[PairedRep]
    median_ratio: float | None
    min_ratio: float | None
    max_ratio: float | None


class PairedLoop(_Record):
    """The paired paths of one relay loop (``--loop``)."""

    loop: str
    paths: list[PairedPath]


class PairedScenario(_Record):
    """What each side of every rep carried, and what was measured."""

    streams: int  # -k: in all, over both sides
    streams_per_side: int  # half of it
    tokens: int
    rate: float
    ramp_s: float
    model: str
    reps: int  # --rounds: per path and loop
    endpoints: list[str]
    loop: str
    relay_loops: list[str]


class PairedResult(_Record):
    """The ``paired`` object of ``streamsvc bench --paired --json FILE``."""

    scenario: PairedScenario
    loops: list[PairedLoop]
    targets: list[TargetResult]  # the CPU ratio targets, judged on the paired medians
    failed_streams: int


class PairedReport(RunRecord):
    """Everything ``streamsvc bench --paired --json FILE`` writes."""

    paired: PairedResult
