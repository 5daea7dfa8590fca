"""One benchmark run: the phases, the processes, the progress bar.

Main phase, once per path, all against the same simulator process::

    direct            load client -> simulator                (the reference)
    baseline          load client -> baseline relay -> simulator
    streamsvc-openai  load client -> streamsvc serve -> simulator   POST /v1/chat/completions
    streamsvc-events  load client -> streamsvc serve -> simulator   POST /v1/chat/stream
    streamsvc-responses  (with --endpoints ...,responses)           POST /v1/responses
    nginx             load client -> nginx -> simulator       (when nginx is installed)

Open-streams phase: M slow streams at once, direct, through the baseline and
through streamsvc, sampling the relay's RSS while they are all open.

Every relay is a fresh process, warmed up with a few streams before it is
measured, and stopped after its path; its CPU is read from ``/proc`` just
before its load client starts and just after it exits.
"""

from __future__ import annotations

import asyncio
import contextlib
import resource
import shlex
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import aiohttp
import msgspec
from rich.console import Console
from rich.progress import (
    BarColumn,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
)
from rich.progress import Progress as ProgressBar

from streamsvc.bench.load import LoadSpec, request_body
from streamsvc.bench.machine import machine_info
from streamsvc.bench.nginx import nginx_binary, nginx_command, nginx_version, write_config
from streamsvc.bench.options import ENDPOINTS, BenchOptions
from streamsvc.bench.procfs import busy_cpu_seconds, listen_overflows
from streamsvc.bench.report import evaluate_targets, print_report, write_outputs
from streamsvc.bench.results import (
    BenchReport,
    BenchSettings,
    LoadResult,
    OpenStreamsResult,
    PathResult,
    ProcessInfo,
    Progress,
    Skipped,
)
from streamsvc.bench.services import Service, ServiceError, free_port, run_client
from streamsvc.bench.stats import added

__all__ = ["run_bench"]

WARM_UP_STREAMS = 20
WARM_UP_TOKENS = 20
SETTLE_S = 0.2  # a pause between phases, for the previous processes' exit to settle
_LABELS = {
    "direct": "direct (clients → simulator)",
    "baseline": "baseline aiohttp byte relay",
    "streamsvc-openai": "streamsvc POST /v1/chat/completions",
    "streamsvc-events": "streamsvc POST /v1/chat/stream",
    "streamsvc-responses": "streamsvc POST /v1/responses",
    "nginx": "nginx proxy_pass, buffering off",
}


@dataclass(frozen=True, slots=True)
class _Path:
    name: str
    endpoint: str
    relay: Callable[[], Service] | None  # a fresh relay process; None: direct


@dataclass(frozen=True, slots=True)
class _Measured:
    load: LoadResult
    relay_cpu_s: float | None
    simulator_cpu_s: float
    peak_rss_bytes: int | None
    listen_overflows: int
    other_cpu_s: float
    rss_before_bytes: int | None = None
    rss_plateau_bytes: int | None = None
    rss_open_streams: int = 0  # streams open when rss_plateau_bytes was read
    plateau_reached: bool = False


class _Run:
    """The state of one run: options, working folder, simulator, progress bar."""

    def __init__(self, options: BenchOptions, workdir: Path, bar: ProgressBar) -> None:
        self.options = options
        self.workdir = workdir
        self.bar = bar
        self.processes: list[ProcessInfo] = []
        self.skipped: list[Skipped] = []
        self.nginx_version: str | None = None
        self.simulator: Service | None = None

    # -- processes ---------------------------------------------------------------------------

    def _python(self, role: str, args: list[str], env: dict[str, str] | None = None) -> Service:
        port = free_port()
        args = [arg.replace("{port}", str(port)) for arg in args]
        return Service(role, [sys.executable, *args], port=port,
                       log_path=self.workdir / f"{role}-{port}.log", env=env)

    @property
    def upstream(self) -> str:
        assert self.simulator is not None
        return f"{self.simulator.url}/v1"

    def simulator_service(self) -> Service:
        return self._python("simulator", ["-m", "streamsvc", "simulate", "--port", "{port}"])

    def baseline_service(self) -> Service:
        return self._python("baseline", ["-m", "streamsvc.bench.baseline", "--upstream",
                                         self.upstream, "--port", "{port}",
                                         "--loop", self.options.loop])

    def streamsvc_service(self) -> Service:
        return self._python(
            "streamsvc", ["-m", "streamsvc", "serve", "--upstream", self.upstream,
                          "--port", "{port}"],
            env={"STREAMSVC__SERVER__EVENT_LOOP": self.options.loop},
        )

    def nginx_skipped(self) -> bool:
        """Whether nginx sits this run out; records why."""
        if not self.options.nginx:
            reason = "left out by --no-nginx"
        elif nginx_binary() is None:
            reason = "no nginx binary on PATH: install nginx to measure the floor"
        else:
            return False
        self.skipped.append(Skipped(name="nginx", reason=reason))
        return True

    def nginx_service(self) -> Service:
        binary = nginx_binary()
        assert binary is not None and self.simulator is not None
        self.nginx_version = nginx_version(binary)
        port = free_port()
        prefix = self.workdir / f"nginx-{port}"
        config = write_config(prefix, port=port, upstream_host="127.0.0.1",
                              upstream_port=self.simulator.port)
        return Service("nginx", nginx_command(binary, prefix, config), port=port,
                       log_path=self.workdir / f"nginx-{port}.log")

    def note_process(self, service: Service) -> None:
        loop = service.event_loop() if service.role != "nginx" else "n/a (C, epoll)"
        if not any(p.role == service.role for p in self.processes):
            self.processes.append(ProcessInfo(role=service.role, command=service.command,
                                              event_loop=loop))

    # -- measuring ---------------------------------------------------------------------------

    async def warm_up(self, url: str, endpoint: str) -> None:
        """A few fast streams, so that the measured run pays no first-call costs."""
        body = request_body(self.options.model, WARM_UP_TOKENS, 1000.0, endpoint)

        async def one(session: aiohttp.ClientSession) -> None:
            async with session.post(url + ENDPOINTS[endpoint], json=body) as resp:
                text = await resp.read()
                if resp.status != 200:
                    raise ServiceError(f"warm-up request to {url} answered {resp.status}:"
                                       f" {text[:300]!r}")

        connector = aiohttp.TCPConnector(limit=0)
        async with aiohttp.ClientSession(connector=connector) as session:
            await asyncio.gather(*(one(session) for _ in range(WARM_UP_STREAMS)))

    async def measure(
        self, name: str, spec: LoadSpec, relay: Service | None, *, track_rss: bool = False
    ) -> _Measured:
        assert self.simulator is not None
        # The tables' path names, short enough for the bar to fit 80 columns.
        task = self.bar.add_task(name.removesuffix("-open")
                                 + (f" · {spec.streams} open streams" if track_rss else ""),
                                 total=None, status="starting")
        plateau: list[int] = []
        rss_at_max_open: list[tuple[int, int]] = []

        def on_progress(progress: Progress) -> None:
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
        simulator_before = self.simulator.sample().cpu_s
        overflows_before = listen_overflows()
        busy_before, own_before = busy_cpu_seconds(), time.process_time()
        load = await run_client(spec, workdir=self.workdir, name=name, on_progress=on_progress)
        busy, own = busy_cpu_seconds() - busy_before, time.process_time() - own_before
        overflows = listen_overflows() - overflows_before
        simulator_cpu = self.simulator.sample().cpu_s - simulator_before
        relay_after = relay.sample() if relay is not None else None
        self.bar.update(task, status=f"done {load.completed}"
                        + (f" · failed {load.failed}" if load.failed else ""))
        relay_cpu = peak = rss_before = rss_plateau = None
        rss_open = 0
        other = busy - own - simulator_cpu - load.process_cpu_s
        if relay_before is not None and relay_after is not None:
            relay_cpu = relay_after.cpu_s - relay_before.cpu_s
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
                         other_cpu_s=max(other, 0.0),
                         rss_before_bytes=rss_before,
                         rss_plateau_bytes=rss_plateau, rss_open_streams=rss_open,
                         plateau_reached=bool(plateau))

    async def run_path(
        self, path: _Path, spec: LoadSpec, *, track_rss: bool = False, suffix: str = ""
    ) -> tuple[_Measured, str, str | None] | None:
        """Measure one path; (figures, the relay's event loop, relay role), None if skipped."""
        assert self.simulator is not None
        await asyncio.sleep(SETTLE_S)
        if path.relay is None:
            measured = await self.measure(path.name + suffix, _retarget(spec, self.simulator.url,
                                                                         "openai"),
                                          None, track_rss=track_rss)
            return measured, self.simulator.event_loop(), None
        service = path.relay()
        async with service:
            self.note_process(service)
            await self.warm_up(service.url, path.endpoint)
            measured = await self.measure(path.name + suffix,
                                          _retarget(spec, service.url, path.endpoint),
                                          service, track_rss=track_rss)
            return measured, service.event_loop(), service.role


def _retarget(spec: LoadSpec, url: str, endpoint: str) -> LoadSpec:
    return LoadSpec(url=url, endpoint=endpoint, streams=spec.streams, tokens=spec.tokens,
                    rate=spec.rate, ramp_s=spec.ramp_s, model=spec.model, seed=spec.seed)


def _per_token(cpu_s: float | None, tokens: int) -> float | None:
    return cpu_s / tokens * 1e6 if cpu_s is not None and tokens > 0 else None


async def _run(options: BenchOptions, workdir: Path, bar: ProgressBar) -> tuple[
    list[PathResult], list[OpenStreamsResult], _Run
]:
    run = _Run(options, workdir, bar)
    run.simulator = run.simulator_service()
    async with run.simulator:
        run.note_process(run.simulator)
        await run.warm_up(run.simulator.url, "openai")
        paths = [_Path("direct", "openai", None), _Path("baseline", "openai", run.baseline_service)]
        paths += [_Path(f"streamsvc-{endpoint}", endpoint, run.streamsvc_service)
                  for endpoint in options.endpoints]
        if not run.nginx_skipped():
            paths.append(_Path("nginx", "openai", run.nginx_service))

        main_spec = LoadSpec(url="", streams=options.streams, tokens=options.tokens,
                             rate=options.rate, ramp_s=options.ramp_s, model=options.model)
        measured: list[tuple[_Path, _Measured, str, str | None]] = []
        for path in paths:
            result = await run.run_path(path, main_spec)
            if result is not None:
                measured.append((path, *result))

        open_results: list[tuple[_Path, _Measured, str, str | None]] = []
        if options.slow_streams > 0:
            slow_spec = LoadSpec(url="", streams=options.slow_streams, tokens=options.slow_tokens,
                                 rate=options.slow_rate, ramp_s=options.slow_ramp_s,
                                 model=options.model)
            endpoint = options.endpoints[0]
            for path in (paths[0], paths[1], _Path(f"streamsvc-{endpoint}", endpoint,
                                                   run.streamsvc_service)):
                result = await run.run_path(path, slow_spec, track_rss=True, suffix="-open")
                if result is not None:
                    open_results.append((path, *result))
        else:
            run.skipped.append(Skipped(name="open streams", reason="--slow-streams 0"))

    return _path_results(measured, options), _open_results(open_results), run


def _path_results(
    measured: list[tuple[_Path, _Measured, str, str | None]], options: BenchOptions
) -> list[PathResult]:
    direct = measured[0][1].load
    baseline_cpu: float | None = None
    results: list[PathResult] = []
    for path, m, loop, relay in measured:
        tokens = m.load.completed * options.tokens
        cpu = _per_token(m.relay_cpu_s, tokens)
        if path.name == "baseline":
            baseline_cpu = cpu
        is_relay = relay is not None
        results.append(PathResult(
            name=path.name, label=_LABELS[path.name], relay=relay, event_loop=loop, load=m.load,
            tokens_relayed=tokens, cpu_s=m.relay_cpu_s, cpu_us_per_token=cpu,
            cpu_ratio_to_baseline=None, peak_rss_bytes=m.peak_rss_bytes,
            simulator_cpu_us_per_token=_per_token(m.simulator_cpu_s, tokens) or 0.0,
            listen_overflows=m.listen_overflows, other_cpu_s=m.other_cpu_s,
            added_ttft_ms=added(m.load.ttft_ms, direct.ttft_ms) if is_relay else None,
            added_gap_ms=added(m.load.gap_ms, direct.gap_ms) if is_relay else None,
        ))
    return [
        msgspec.structs.replace(
            r, cpu_ratio_to_baseline=r.cpu_us_per_token / baseline_cpu
            if r.cpu_us_per_token is not None and baseline_cpu else None,
        )
        for r in results
    ]


def _open_results(
    measured: list[tuple[_Path, _Measured, str, str | None]],
) -> list[OpenStreamsResult]:
    if not measured:
        return []
    direct = measured[0][1].load
    results = []
    for path, m, loop, relay in measured:
        per_stream = None
        if m.rss_plateau_bytes is not None and m.rss_before_bytes is not None and m.rss_open_streams:
            per_stream = (m.rss_plateau_bytes - m.rss_before_bytes) / m.rss_open_streams / 1024
        results.append(OpenStreamsResult(
            name=path.name, label=_LABELS[path.name], relay=relay, event_loop=loop, load=m.load,
            rss_before_bytes=m.rss_before_bytes, rss_plateau_bytes=m.rss_plateau_bytes,
            rss_per_stream_kib=per_stream, rss_open_streams=m.rss_open_streams,
            plateau_reached=m.plateau_reached,
            peak_rss_bytes=m.peak_rss_bytes,
            cpu_us_per_token=_per_token(m.relay_cpu_s, m.load.completed * m.load.tokens),
            listen_overflows=m.listen_overflows, other_cpu_s=m.other_cpu_s,
            added_gap_ms=added(m.load.gap_ms, direct.gap_ms) if relay is not None else None,
        ))
    return results


def _raise_file_limit(streams: int) -> None:
    # Each open stream holds up to three sockets across the processes; children inherit this.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = min(hard, max(soft, 4 * streams + 1024)) if hard != resource.RLIM_INFINITY else max(
        soft, 4 * streams + 1024)
    if wanted > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))


def run_bench(options: BenchOptions, *, command: list[str]) -> int:
    """Run the benchmark, print the table, write ``--json`` / ``--plot``.

    Returns:
        0; 1 when a stream failed on some path or a process would not start.
    """
    console = Console(stderr=True)
    _raise_file_limit(max(options.streams, options.slow_streams))
    started = time.monotonic()
    date = datetime.now(UTC).replace(microsecond=0).isoformat()
    with contextlib.ExitStack() as stack:
        if options.keep_logs:
            workdir = Path(options.keep_logs).resolve()
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
                paths, open_streams, run = asyncio.run(_run(options, workdir, bar))
        except ServiceError as error:
            console.print(f"[red]streamsvc bench: {error}[/red]")
            if not options.keep_logs:
                console.print("rerun with --keep-logs DIR to keep every process's log")
            return 1
    report = BenchReport(
        streamsvc_version=str(machine_info()["streamsvc"]),
        date=date,
        command=command,
        command_line=shlex.join(command),
        duration_s=time.monotonic() - started,
        machine=machine_info(nginx=run.nginx_version),
        settings=BenchSettings(
            streams=options.streams, tokens=options.tokens, rate=options.rate,
            ramp_s=options.ramp_s, slow_streams=options.slow_streams,
            slow_rate=options.slow_rate, slow_tokens=options.slow_tokens,
            slow_ramp_s=options.slow_ramp_s,
            endpoints=list(options.endpoints), loop=options.loop, model=options.model,
            quick=options.quick, nginx=options.nginx,
        ),
        processes=run.processes,
        paths=paths,
        open_streams=open_streams,
        targets=[],
        skipped=run.skipped,
        failed_streams=sum(p.load.failed for p in paths)
        + sum(o.load.failed for o in open_streams),
    )
    report = msgspec.structs.replace(report, targets=evaluate_targets(report))
    print_report(report, Console())
    write_outputs(report, options, console)
    return 1 if report.failed_streams else 0
