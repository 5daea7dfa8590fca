"""One benchmark run: the phases, the processes, the progress bar.

Main phase, once per path, all against the same simulator process::

    direct            load client -> simulator                (the reference)
    baseline          load client -> baseline relay -> simulator
    streamsvc-openai  load client -> streamsvc serve -> simulator   POST /v1/chat/completions
    streamsvc-events  load client -> streamsvc serve -> simulator   POST /v1/chat/stream
    streamsvc-streams load client -> streamsvc serve -> simulator   POST /v1/streams, then
                                                                    GET /v1/streams/{id}/events
    streamsvc-responses  (with --endpoints ...,responses)           POST /v1/responses
    streamsvc-redis   as streamsvc-streams, journal.backend = "redis" against a redis-server
                      of the run's own                        (when redis-server is installed)
    streamsvc-remote  as streamsvc-redis, with the GET on a second instance on the same
                      Redis: a reader of a stream another instance generates; its CPU is
                      both instances'
    nginx             load client -> nginx -> simulator       (when nginx is installed)

The relay paths (baseline, streamsvc-*) run once per relay loop (``--loop
both``: uvloop, then asyncio), each named ``PATH@LOOP`` when there are two;
the simulator and the load clients keep one loop for the whole run, so the
direct path is the reference of both. On each loop they run in ``--rounds``
rounds, each round in the reverse order of the one before (openai, ..., redis,
then redis, ..., openai), with the baseline measured before the first path of
a round, between every two and after the last (baseline, openai, baseline,
events, ..., redis, baseline). Each path's CPU is held to the mean of the two
baseline runs just before and after it: a machine whose speed drifts over a
run (or within a round) then favours no path.

Open-streams phase: M slow streams at once, direct, then per relay loop through
the baseline and through streamsvc on each of its ``open_endpoints`` (the OpenAI and
the event-format endpoints of ``--endpoints``; its first when it names neither),
sampling the relay's RSS while they are all open.

Every relay is a fresh process (and so is the Redis path's redis-server),
warmed up with a few streams before it is measured, and stopped after its
path; its CPU is read from ``/proc`` just before its load client starts and
just after it exits.
"""

from __future__ import annotations

import asyncio
import contextlib
import shlex
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import msgspec
from rich.console import Console
from rich.progress import Progress as ProgressBar

from streamsvc.bench.load import LoadSpec
from streamsvc.bench.machine import machine_info
from streamsvc.bench.nginx import nginx_binary, nginx_command, nginx_version, write_config
from streamsvc.bench.options import BenchOptions, RelayLoop
from streamsvc.bench.procfs import BusiestStretch, busy_cpu_seconds, listen_overflows
from streamsvc.bench.redis_server import redis_binary, redis_command, redis_version
from streamsvc.bench.relays import relay_service, simulator_service, warm_up
from streamsvc.bench.report import evaluate_targets, print_report, write_outputs
from streamsvc.bench.results import (
    BenchReport,
    BenchSettings,
    LoadResult,
    OpenStreamsResult,
    PathResult,
    ProcessInfo,
    Progress,
    RoundResult,
    Skipped,
)
from streamsvc.bench.services import (
    Service,
    client_command,
    free_port,
    raise_file_limit,
    run_client,
    run_with_progress,
)
from streamsvc.bench.stats import added, median, per_token_us, ratio

__all__ = ["run_bench"]

SETTLE_S = 0.2  # a pause between phases, for the previous processes' exit to settle
_LABELS = {
    "direct": "direct (clients → simulator)",
    "baseline": "baseline aiohttp byte relay",
    "streamsvc-openai": "streamsvc POST /v1/chat/completions",
    "streamsvc-events": "streamsvc POST /v1/chat/stream",
    "streamsvc-streams": "streamsvc POST /v1/streams, GET /v1/streams/{id}/events",
    "streamsvc-responses": "streamsvc POST /v1/responses",
    "streamsvc-redis": "streamsvc-streams on the Redis journal (a redis-server of the run's)",
    "streamsvc-remote": "streamsvc-redis with each GET on a second instance (CPU: both)",
    "nginx": "nginx proxy_pass, buffering off",
}
_REDIS_LOG_LINE = "journal: Redis at "  # what streamsvc serve logs when it journals in Redis
_REDIS_LOOP = "n/a (C, its own ae loop)"
_NGINX_LOOP = "n/a (C, epoll)"
Relay = Literal["baseline", "streamsvc", "nginx"]


@dataclass(frozen=True, slots=True)
class _Path:
    base: str  # a key of _LABELS
    endpoint: str
    relay: Relay | None = None  # a fresh process of it per path; None: direct
    loop: RelayLoop | None = None  # None: not the relays' loop to choose (direct, nginx)
    redis: bool = False  # the relay journals in a redis-server of the path's own
    remote: bool = False  # the streams are read on a second relay process on that Redis
    tagged: bool = False  # the run has several relay loops: the name says which

    @property
    def name(self) -> str:
        return f"{self.base}@{self.loop}" if self.tagged and self.loop else self.base


@dataclass(frozen=True, slots=True)
class _Measured:
    load: LoadResult
    relay_cpu_s: float | None
    simulator_cpu_s: float
    peak_rss_bytes: int | None
    listen_overflows: int
    other_cpu_s: float
    redis_cpu_s: float | None = None
    rss_before_bytes: int | None = None
    rss_plateau_bytes: int | None = None
    rss_open_streams: int = 0  # streams open when rss_plateau_bytes was read
    plateau_reached: bool = False
    machine_busy_peak: float | None = None


@dataclass(frozen=True, slots=True)
class _Ran:
    """One path measured, with what its processes said of themselves."""

    path: _Path
    measured: _Measured
    event_loop: str  # the relay's (the simulator's for direct)
    relay: str | None  # the relay's role; None for direct
    journal: str | None  # streamsvc's journal as its log says: memory | redis
    round: int = 0  # 1, 2, ... for a relay path measured in rounds; 0: direct, nginx, open


class _Run:
    """The state of one run: options, working folder, simulator, progress bar."""

    def __init__(self, options: BenchOptions, workdir: Path, bar: ProgressBar) -> None:
        self.options = options
        self.workdir = workdir
        self.bar = bar
        self.processes: list[ProcessInfo] = []
        self.skipped: list[Skipped] = []
        self.nginx_version: str | None = None
        self.redis_version: str | None = None
        self.simulator: Service | None = None
        self._runs: dict[str, int] = {}  # the runs of each path name so far

    # -- processes ---------------------------------------------------------------------------

    @property
    def upstream(self) -> str:
        assert self.simulator is not None
        return f"{self.simulator.url}/v1"

    def relay_service(self, path: _Path, redis: Service | None) -> Service:
        """A fresh process of ``path``'s relay (not started)."""
        if path.relay == "nginx":
            return self.nginx_service()
        assert path.relay is not None and path.loop is not None
        env = None
        if redis is not None:
            env = {"STREAMSVC__JOURNAL__BACKEND": "redis",
                   "STREAMSVC__JOURNAL__REDIS_URL": f"redis://127.0.0.1:{redis.port}/0"}
        return relay_service(path.relay, upstream=self.upstream, loop=path.loop,
                             workdir=self.workdir, env=env)

    def _left_out(self, name: str, flag: bool, flag_name: str, binary: str | None,
                  missing: str) -> bool:
        """Whether a path of an optional program sits this run out; records why."""
        if not flag:
            reason = f"left out by {flag_name}"
        elif binary is None:
            reason = missing
        else:
            return False
        self.skipped.append(Skipped(name=name, reason=reason))
        return True

    def nginx_skipped(self) -> bool:
        """Whether nginx sits this run out; records why."""
        return self._left_out("nginx", self.options.nginx, "--no-nginx", nginx_binary(),
                              "no nginx binary on PATH: install nginx to measure the floor")

    def redis_skipped(self) -> bool:
        """Whether the Redis journal sits this run out; records why."""
        return self._left_out(
            "streamsvc-redis", self.options.redis, "--no-redis", redis_binary(),
            "no redis-server on PATH: install redis-server to measure the Redis journal")

    def redis_service(self) -> Service:
        binary = redis_binary()
        assert binary is not None
        self.redis_version = redis_version(binary)
        port = free_port()
        return Service("redis-server",
                       redis_command(binary, port=port, workdir=self.workdir / f"redis-{port}"),
                       port=port, log_path=self.workdir / f"redis-{port}.log",
                       native_loop=_REDIS_LOOP)

    def nginx_service(self) -> Service:
        binary = nginx_binary()
        assert binary is not None and self.simulator is not None
        self.nginx_version = nginx_version(binary)
        port = free_port()
        prefix = self.workdir / f"nginx-{port}"
        config = write_config(prefix, port=port, upstream_host="127.0.0.1",
                              upstream_port=self.simulator.port)
        return Service("nginx", nginx_command(binary, prefix, config), port=port,
                       log_path=self.workdir / f"nginx-{port}.log", native_loop=_NGINX_LOOP)

    def note_process(self, role: str, command: list[str], event_loop: str,
                     settings: dict[str, str] | None = None) -> None:
        """Record a process of the run, once per role, loop and settings."""
        info = ProcessInfo(role=role, command=command, event_loop=event_loop,
                           settings=settings or {})
        if not any((p.role, p.event_loop, p.settings) == (role, event_loop, info.settings)
                   for p in self.processes):
            self.processes.append(info)

    def note_service(self, service: Service) -> None:
        self.note_process(service.role, service.command, service.event_loop(),
                          service.settings)

    # -- measuring ---------------------------------------------------------------------------

    async def measure(
        self, name: str, spec: LoadSpec, relay: Service | None, *, redis: Service | None = None,
        reader: Service | None = None, track_rss: bool = False, shown: str | None = None,
    ) -> _Measured:
        """``relay``'s CPU (and ``reader``'s, a second relay that reads the streams), its
        memory, the harness's CPU, over one load client's run of ``spec``."""
        assert self.simulator is not None
        # The tables' path names, short enough for the bar to fit 80 columns.
        task = self.bar.add_task(shown or name.removesuffix("-open")
                                 + (f" · {spec.streams} open streams" if track_rss else ""),
                                 total=None, status="starting")
        plateau: list[int] = []
        rss_at_max_open: list[tuple[int, int]] = []
        machine = BusiestStretch()

        def on_progress(progress: Progress) -> None:
            machine.read()
            failed = f" · failed {progress.failed}" if progress.failed else ""
            self.bar.update(task, completed=progress.chars, total=progress.chars_total,
                            status=f"open {progress.open} · done {progress.done}{failed}")
            if track_rss and relay is not None:
                with contextlib.suppress(OSError):
                    rss = relay.sample().rss_bytes
                    rss_at_max_open.append((progress.open, rss))
                    if progress.open == spec.streams:
                        plateau.append(rss)

        relay_before = relay.sample() if relay is not None else None
        reader_before = reader.sample().cpu_s if reader is not None else 0.0
        redis_before = redis.sample().cpu_s if redis is not None else 0.0
        simulator_before = self.simulator.sample().cpu_s
        overflows_before = listen_overflows()
        busy_before, own_before = busy_cpu_seconds(), time.process_time()
        machine.read()
        load = await run_client(spec, workdir=self.workdir, name=name, on_progress=on_progress)
        machine.read()
        busy, own = busy_cpu_seconds() - busy_before, time.process_time() - own_before
        overflows = listen_overflows() - overflows_before
        simulator_cpu = self.simulator.sample().cpu_s - simulator_before
        relay_after = relay.sample() if relay is not None else None
        reader_cpu = reader.sample().cpu_s - reader_before if reader is not None else 0.0
        redis_cpu = redis.sample().cpu_s - redis_before if redis is not None else None
        self.note_process("load client", client_command(spec, workdir=self.workdir, name=name),
                          load.event_loop)
        self.bar.update(task, status=f"done {load.completed}"
                        + (f" · failed {load.failed}" if load.failed else ""))
        relay_cpu = peak = rss_before = rss_plateau = None
        rss_open = 0
        other = busy - own - simulator_cpu - load.process_cpu_s - (redis_cpu or 0.0)
        if relay_before is not None and relay_after is not None:
            relay_cpu = relay_after.cpu_s - relay_before.cpu_s + reader_cpu
            other -= relay_cpu
            peak = relay_after.hwm_bytes
            rss_before = relay_before.rss_bytes
            if plateau:
                rss_plateau, rss_open = max(plateau), spec.streams
            elif rss_at_max_open:
                # No sample saw every stream open (a short phase, or a relay so slow that
                # the first streams end before the last begin): take the fullest one.
                rss_open, rss_plateau = max(rss_at_max_open)
        return _Measured(load=load, relay_cpu_s=relay_cpu, simulator_cpu_s=simulator_cpu,
                         peak_rss_bytes=peak, listen_overflows=overflows,
                         other_cpu_s=max(other, 0.0), redis_cpu_s=redis_cpu,
                         rss_before_bytes=rss_before,
                         rss_plateau_bytes=rss_plateau, rss_open_streams=rss_open,
                         plateau_reached=bool(plateau), machine_busy_peak=machine.peak)

    async def run_path(self, path: _Path, spec: LoadSpec, *, track_rss: bool = False,
                       round: int = 0) -> _Ran:
        """Measure one path (in round ``round`` of its loop's, when not 0), in fresh processes
        of its own (but the simulator)."""
        assert self.simulator is not None
        await asyncio.sleep(SETTLE_S)
        name = path.name + ("-open" if track_rss else "")
        shown = None
        if round and self.options.rounds > 1:
            shown = f"{name} · {round}/{self.options.rounds}"
            name += f"-r{round}"  # each round's load client writes files of its own
        runs = self._runs[name] = self._runs.get(name, 0) + 1
        if runs > 1:  # the baseline, measured several times a round
            name += f"-{runs}"
        if path.relay is None:
            measured = await self.measure(name, _retarget(spec, self.simulator.url, "openai"),
                                          None, track_rss=track_rss)
            return _Ran(path, measured, self.simulator.event_loop(), None, None)
        async with contextlib.AsyncExitStack() as stack:
            redis = None
            if path.redis:
                redis = await stack.enter_async_context(self.redis_service())
                self.note_service(redis)
            service = await stack.enter_async_context(self.relay_service(path, redis))
            self.note_service(service)
            reader = None
            if path.remote:
                reader = await stack.enter_async_context(self.relay_service(path, redis))
            read_url = reader.url if reader is not None else None
            await warm_up(service.url, path.endpoint, model=self.options.model,
                          read_url=read_url)
            measured = await self.measure(
                name, _retarget(spec, service.url, path.endpoint, read_url), service,
                redis=redis, reader=reader, track_rss=track_rss, shown=shown)
            journal = None
            if path.relay == "streamsvc":
                journal = "redis" if _REDIS_LOG_LINE in service.log() else "memory"
            return _Ran(path, measured, service.event_loop(), service.role, journal, round)


def _retarget(spec: LoadSpec, url: str, endpoint: str, read_url: str | None = None) -> LoadSpec:
    return LoadSpec(url=url, endpoint=endpoint, streams=spec.streams, tokens=spec.tokens,
                    rate=spec.rate, ramp_s=spec.ramp_s, model=spec.model, seed=spec.seed,
                    read_url=read_url)


def _main_paths(run: _Run) -> list[_Path]:
    """direct, then per relay loop the baseline and streamsvc's paths, then nginx."""
    options = run.options
    loops = options.relay_loops
    tagged = len(loops) > 1
    if not tagged and options.loop == "both":
        run.skipped.append(Skipped(name="uvloop", reason="uvloop is not installed (pip install"
                                   " 'streamsvc[fast]'): the relays ran on asyncio only"))
    redis = not run.redis_skipped()
    paths = [_Path("direct", "openai")]
    for loop in loops:
        paths.append(_Path("baseline", "openai", "baseline", loop, tagged=tagged))
        paths += [_Path(f"streamsvc-{endpoint}", endpoint, "streamsvc", loop, tagged=tagged)
                  for endpoint in options.endpoints]
        if redis:
            paths += [_Path("streamsvc-redis", "streams", "streamsvc", loop, redis=True,
                            tagged=tagged),
                      _Path("streamsvc-remote", "streams", "streamsvc", loop, redis=True,
                            remote=True, tagged=tagged)]
    if not run.nginx_skipped():
        paths.append(_Path("nginx", "openai", "nginx"))
    return paths


def _rounds(paths: list[_Path], rounds: int) -> list[tuple[_Path, int]]:
    """The main phase's order: each (path, round), the streamsvc paths of each loop
    ``rounds`` times, every other round reversed, with the loop's baseline before, between
    and after them; direct first and nginx last, once (round 0)."""
    order: list[tuple[_Path, int]] = []
    baselines: dict[RelayLoop, _Path] = {}
    loops: dict[RelayLoop, list[_Path]] = {}
    for path in paths:
        if path.relay == "baseline" and path.loop is not None:
            baselines[path.loop] = path
            loops.setdefault(path.loop, [])
        elif path.relay == "streamsvc" and path.loop is not None:
            loops.setdefault(path.loop, []).append(path)
    order += [(path, 0) for path in paths if path.relay is None]
    for loop, group in loops.items():
        baseline = baselines[loop]
        for number in range(1, rounds + 1):
            order.append((baseline, number))
            for path in (group if number % 2 else reversed(group)):
                order += [(path, number), (baseline, number)]
    order += [(path, 0) for path in paths if path.relay == "nginx"]
    return order


def _open_paths(options: BenchOptions) -> list[_Path]:
    """direct, then per relay loop the baseline and streamsvc's open-streams endpoints."""
    loops = options.relay_loops
    tagged = len(loops) > 1
    paths = [_Path("direct", "openai")]
    for loop in loops:
        paths.append(_Path("baseline", "openai", "baseline", loop, tagged=tagged))
        paths += [_Path(f"streamsvc-{endpoint}", endpoint, "streamsvc", loop, tagged=tagged)
                  for endpoint in options.open_endpoints]
    return paths


async def _run(options: BenchOptions, workdir: Path, bar: ProgressBar) -> tuple[
    list[PathResult], list[OpenStreamsResult], _Run
]:
    run = _Run(options, workdir, bar)
    run.simulator = simulator_service(workdir)
    async with run.simulator:
        run.note_service(run.simulator)
        await warm_up(run.simulator.url, "openai", model=options.model)
        main_spec = LoadSpec(url="", streams=options.streams, tokens=options.tokens,
                             rate=options.rate, ramp_s=options.ramp_s, model=options.model)
        measured = [await run.run_path(path, main_spec, round=number)
                    for path, number in _rounds(_main_paths(run), options.rounds)]
        open_results: list[_Ran] = []
        if options.slow_streams > 0:
            slow_spec = LoadSpec(url="", streams=options.slow_streams, tokens=options.slow_tokens,
                                 rate=options.slow_rate, ramp_s=options.slow_ramp_s,
                                 model=options.model)
            open_results = [await run.run_path(path, slow_spec, track_rss=True)
                            for path in _open_paths(options)]
        else:
            run.skipped.append(Skipped(name="open streams", reason="--slow-streams 0"))

    return _path_results(measured, options), _open_results(open_results), run


def _path_results(measured: list[_Ran], options: BenchOptions) -> list[PathResult]:
    """One result per path: a path measured in rounds reports the median of its rounds, each
    round held to the mean of the baseline runs just before and after it (nginx, of no loop of
    ours: to the median of the first loop's baseline runs)."""
    direct = measured[0].measured.load
    baseline_runs: dict[RelayLoop | None, list[float | None]] = {}
    by_name: dict[str, list[_Ran]] = {}
    for ran in measured:
        by_name.setdefault(ran.path.name, []).append(ran)
        if ran.path.relay == "baseline":
            baseline_runs.setdefault(ran.path.loop, []).append(_cpu_per_token(ran, options))
    baseline_median: dict[RelayLoop | None, float | None] = {}
    for loop, runs in baseline_runs.items():
        baseline_median[loop] = median(runs)
        baseline_median.setdefault(None, baseline_median[loop])
    held_to = _bracketing_baselines(measured, options)
    results: list[PathResult] = []
    for group in by_name.values():
        measured_rounds = [
            (ran, _round_result(ran, options, direct, held_to.get(id(ran))))
            for ran in group if ran.round
        ]
        rounds = [result for _, result in measured_rounds]
        if measured_rounds:
            to_baseline = median([r.cpu_ratio_to_baseline for r in rounds])
            cpu = median([r.cpu_us_per_token for r in rounds])
            ran, _ = min(measured_rounds, key=lambda pair: _distance(
                (pair[1].cpu_ratio_to_baseline, to_baseline), (pair[1].cpu_us_per_token, cpu)))
        else:
            ran = group[0]
            cpu = _cpu_per_token(ran, options)
            to_baseline = ratio(cpu, baseline_median.get(ran.path.loop))
        m, path = ran.measured, ran.path
        is_relay = ran.relay is not None
        tokens = m.load.completed * options.tokens
        results.append(PathResult(
            name=path.name, label=_LABELS[path.base], relay=ran.relay, relay_loop=path.loop,
            event_loop=ran.event_loop, journal=ran.journal, load=m.load, tokens_relayed=tokens,
            cpu_s=m.relay_cpu_s, cpu_us_per_token=cpu, cpu_ratio_to_baseline=to_baseline,
            redis_cpu_us_per_token=per_token_us(m.redis_cpu_s, tokens),
            peak_rss_bytes=m.peak_rss_bytes,
            simulator_cpu_us_per_token=per_token_us(m.simulator_cpu_s, tokens) or 0.0,
            listen_overflows=m.listen_overflows, other_cpu_s=m.other_cpu_s,
            machine_busy_peak=m.machine_busy_peak,
            added_ttft_ms=added(m.load.ttft_ms, direct.ttft_ms) if is_relay else None,
            added_gap_ms=added(m.load.gap_ms, direct.gap_ms) if is_relay else None,
            rounds=rounds,
        ))
    return results


def _bracketing_baselines(measured: list[_Ran], options: BenchOptions) -> dict[int, float]:
    """What each run of a round is held to (by ``id`` of its ``_Ran``): for a streamsvc path,
    the mean of the baseline runs of its loop and round just before and after it (those
    measured); for a baseline run, its own CPU per token."""
    held: dict[int, float] = {}
    for at, ran in enumerate(measured):
        if not ran.round:
            continue
        if ran.path.relay == "baseline":
            own = _cpu_per_token(ran, options)
            if own is not None:
                held[id(ran)] = own
            continue
        same = [(index, other) for index, other in enumerate(measured)
                if other.path.relay == "baseline" and other.path.loop == ran.path.loop
                and other.round == ran.round]
        before = [other for index, other in same if index < at][-1:]
        after = [other for index, other in same if index > at][:1]
        cpus = [cpu for other in before + after
                if (cpu := _cpu_per_token(other, options)) is not None]
        if cpus:
            held[id(ran)] = statistics.fmean(cpus)
    return held


def _cpu_per_token(ran: _Ran, options: BenchOptions) -> float | None:
    return per_token_us(ran.measured.relay_cpu_s, ran.measured.load.completed * options.tokens)


def _round_result(ran: _Ran, options: BenchOptions, direct: LoadResult,
                  baseline: float | None) -> RoundResult:
    load = ran.measured.load
    cpu = _cpu_per_token(ran, options)
    return RoundResult(
        round=ran.round, cpu_s=ran.measured.relay_cpu_s, cpu_us_per_token=cpu,
        cpu_ratio_to_baseline=ratio(cpu, baseline), baseline_us_per_token=baseline,
        completed=load.completed,
        failed=load.failed, added_ttft_p99_ms=added(load.ttft_ms, direct.ttft_ms).p99,
        added_gap_p99_ms=added(load.gap_ms, direct.gap_ms).p99,
    )


def _distance(*pairs: tuple[float | None, float | None]) -> float:
    """How far a round is from the median: by the first pair both of whose figures exist."""
    for value, middle in pairs:
        if value is not None and middle is not None:
            return abs(value - middle)
    return 0.0


def _open_results(measured: list[_Ran]) -> list[OpenStreamsResult]:
    if not measured:
        return []
    direct = measured[0].measured.load
    results = []
    for ran in measured:
        m, path = ran.measured, ran.path
        per_stream = None
        if m.rss_plateau_bytes is not None and m.rss_before_bytes is not None and m.rss_open_streams:
            per_stream = (m.rss_plateau_bytes - m.rss_before_bytes) / m.rss_open_streams / 1024
        results.append(OpenStreamsResult(
            name=path.name, label=_LABELS[path.base], relay=ran.relay, relay_loop=path.loop,
            event_loop=ran.event_loop, load=m.load, rss_before_bytes=m.rss_before_bytes,
            rss_plateau_bytes=m.rss_plateau_bytes,
            rss_per_stream_kib=per_stream, rss_open_streams=m.rss_open_streams,
            plateau_reached=m.plateau_reached,
            peak_rss_bytes=m.peak_rss_bytes,
            cpu_us_per_token=per_token_us(m.relay_cpu_s, m.load.completed * m.load.tokens),
            listen_overflows=m.listen_overflows, other_cpu_s=m.other_cpu_s,
            machine_busy_peak=m.machine_busy_peak,
            added_gap_ms=added(m.load.gap_ms, direct.gap_ms) if ran.relay is not None else None,
            added_ttft_ms=(added(m.load.ttft_ms, direct.ttft_ms) if ran.relay is not None
                           else None),
        ))
    return results


def run_bench(options: BenchOptions, *, command: list[str]) -> int:
    """Run the benchmark, print the table, write ``--json`` / ``--plot``.

    Returns:
        0; 1 when a stream failed on some path or a process would not start.
    """
    console = Console(stderr=True)
    raise_file_limit(max(options.streams, options.slow_streams))
    finished = run_with_progress(lambda workdir, bar: _run(options, workdir, bar),
                                 keep_logs=options.keep_logs, console=console)
    if finished is None:
        return 1
    paths, open_streams, run = finished.value
    report = BenchReport(
        streamsvc_version=str(machine_info()["streamsvc"]),
        date=finished.date,
        command=command,
        command_line=shlex.join(command),
        duration_s=finished.duration_s,
        machine=machine_info(nginx=run.nginx_version, redis=run.redis_version),
        settings=BenchSettings(
            streams=options.streams, tokens=options.tokens, rate=options.rate,
            ramp_s=options.ramp_s, slow_streams=options.slow_streams,
            slow_rate=options.slow_rate, slow_tokens=options.slow_tokens,
            slow_ramp_s=options.slow_ramp_s,
            endpoints=list(options.endpoints), loop=options.loop,
            relay_loops=list(options.relay_loops), model=options.model,
            quick=options.quick, nginx=options.nginx, redis=options.redis,
            rounds=options.rounds,
        ),
        processes=run.processes,
        paths=paths,
        open_streams=open_streams,
        targets=[],
        skipped=run.skipped,
        failed_streams=sum(p.failed_streams for p in paths)
        + sum(o.load.failed for o in open_streams),
    )
    report = msgspec.structs.replace(report, targets=evaluate_targets(report))
    print_report(report, Console())
    write_outputs(report, options, console)
    return 1 if report.failed_streams else 0
