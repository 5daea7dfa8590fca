"""Paired runs (``streamsvc bench --paired``): each streamsvc path at the same time as a
baseline of its own, for CPU ratios that hold on a drifting machine.

The sequential bench holds a path to baseline runs some seconds before and after it, and a
machine whose speed drifts by ±30 % between runs moves that ratio by more than the margins
the targets judge. Here the two relays run side by side, each with a simulator and a load
client of its own, so whatever the machine does during a rep it does to both::

    simulator 1 ── relay started first   ◄── load client (K/2 streams)  ┐ at the same time
    simulator 2 ── relay started second  ◄── load client (K/2 streams)  ┘

Every rep starts both relays fresh and warms them up; reps alternate which side starts first
and relays the first simulator, so neither order nor simulator favours a side. The rep's
figure is the streamsvc relay's CPU per token over the baseline's (each relay's CPU read from
``/proc`` just before its load client starts and just after it ends). No latency is reported:
the two sides share the machine's cores with each other, which a paired run does not separate.
"""

from __future__ import annotations

import asyncio
import contextlib
import shlex
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import msgspec
from rich.console import Console
from rich.progress import Progress as ProgressBar

from streamsvc.bench.load import LoadSpec
from streamsvc.bench.machine import machine_info
from streamsvc.bench.options import BenchOptions, RelayLoop
from streamsvc.bench.relays import PythonRelay, relay_service, simulator_service, warm_up
from streamsvc.bench.report import (
    Tables,
    cpu_ratio_limit,
    print_tables,
    scenario_note,
    target_notes,
    verdict,
    write_json,
)
from streamsvc.bench.results import (
    LoadResult,
    PairedLoop,
    PairedPath,
    PairedRep,
    PairedReport,
    PairedResult,
    PairedScenario,
    PairedSide,
    Progress,
    TargetResult,
)
from streamsvc.bench.services import Service, raise_file_limit, run_client, run_with_progress
from streamsvc.bench.stats import per_token_us, ratio

__all__ = ["paired_tables", "paired_targets", "print_paired", "run_paired"]

SETTLE_S = 0.2  # between reps, for the previous relays' exit to settle
FLAG = "!"  # beside a ratio whose rep had failed streams
SIDES: tuple[PythonRelay, PythonRelay] = ("baseline", "streamsvc")  # rep 1 starts the first
_BASELINE_ENDPOINT = "openai"  # the only one the baseline relays


@dataclass(frozen=True, slots=True)
class _Measured:
    load: LoadResult
    cpu_s: float


class _PairedRun:
    """A paired run's state: options, working folder, progress bar, the two simulators."""

    def __init__(self, options: BenchOptions, workdir: Path, bar: ProgressBar,
                 simulators: Sequence[Service]) -> None:
        self.options = options
        self.workdir = workdir
        self.bar = bar
        self.simulators = simulators

    async def measure(self, relay: Service, spec: LoadSpec, name: str, shown: str) -> _Measured:
        """``relay``'s CPU over one load client's run of ``spec``."""
        task = self.bar.add_task(shown, total=None, status="starting")

        def on_progress(progress: Progress) -> None:
            failed = f" · failed {progress.failed}" if progress.failed else ""
            self.bar.update(task, completed=progress.chars, total=progress.chars_total,
                            status=f"open {progress.open} · done {progress.done}{failed}")

        before = relay.sample().cpu_s
        load = await run_client(spec, workdir=self.workdir, name=name, on_progress=on_progress)
        cpu_s = relay.sample().cpu_s - before
        self.bar.update(task, status=f"done {load.completed}"
                        + (f" · failed {load.failed}" if load.failed else ""))
        return _Measured(load, cpu_s)

    async def rep(self, loop: RelayLoop, endpoint: str, number: int) -> PairedRep:
        """Rep ``number`` of ``endpoint`` on ``loop``: both sides in fresh relays, at once."""
        await asyncio.sleep(SETTLE_S)
        first = SIDES[(number - 1) % len(SIDES)]
        order = [first, *(side for side in SIDES if side != first)]
        endpoints = {"baseline": _BASELINE_ENDPOINT, "streamsvc": endpoint}
        options = self.options
        async with contextlib.AsyncExitStack() as stack:
            relays: dict[PythonRelay, Service] = {}
            for side, simulator in zip(order, self.simulators, strict=True):
                relays[side] = await stack.enter_async_context(relay_service(
                    side, upstream=f"{simulator.url}/v1", loop=loop, workdir=self.workdir))
            await asyncio.gather(*(warm_up(relays[side].url, endpoints[side],
                                           model=options.model) for side in order))
            name = f"paired-{endpoint}@{loop}-{number}"
            measured = await asyncio.gather(*(
                self.measure(
                    relays[side],
                    LoadSpec(url=relays[side].url, endpoint=endpoints[side],
                             streams=options.side_streams, tokens=options.tokens,
                             rate=options.rate, ramp_s=options.ramp_s, model=options.model),
                    f"{name}-{side}", f"{endpoint}@{loop} {number}/{options.rounds} {side}")
                for side in order))
            sides = {side: _side(side, relays[side], simulator, one, options.tokens)
                     for side, simulator, one in zip(order, self.simulators, measured,
                                                     strict=True)}
        baseline, path = sides["baseline"], sides["streamsvc"]
        return PairedRep(rep=number, first=first, baseline=baseline, path=path,
                         ratio=ratio(path.cpu_us_per_token, baseline.cpu_us_per_token),
                         failed=baseline.failed + path.failed)


def _side(relay: PythonRelay, service: Service, simulator: Service, measured: _Measured,
          tokens: int) -> PairedSide:
    load = measured.load
    relayed = load.completed * tokens
    return PairedSide(
        relay=relay, event_loop=service.event_loop(), simulator_port=simulator.port,
        cpu_s=measured.cpu_s,
        cpu_us_per_token=per_token_us(measured.cpu_s, relayed),
        completed=load.completed, failed=load.failed, errors=load.errors,
    )


def _path(endpoint: str, reps: list[PairedRep]) -> PairedPath:
    ratios = [rep.ratio for rep in reps if rep.ratio is not None]
    return PairedPath(
        name=f"streamsvc-{endpoint}", endpoint=endpoint, reps=reps,
        median_ratio=statistics.median(ratios) if ratios else None,
        min_ratio=min(ratios, default=None), max_ratio=max(ratios, default=None),
    )


async def _run(options: BenchOptions, workdir: Path, bar: ProgressBar) -> list[PairedLoop]:
    async with contextlib.AsyncExitStack() as stack:
        simulators = [await stack.enter_async_context(simulator_service(workdir))
                      for _ in SIDES]
        await asyncio.gather(*(warm_up(simulator.url, _BASELINE_ENDPOINT, model=options.model)
                               for simulator in simulators))
        run = _PairedRun(options, workdir, bar, simulators)
        loops = []
        for loop in options.relay_loops:
            paths = []
            for endpoint in options.endpoints:
                reps = [await run.rep(loop, endpoint, number)
                        for number in range(1, options.rounds + 1)]
                paths.append(_path(endpoint, reps))
            loops.append(PairedLoop(loop=loop, paths=paths))
        return loops


def paired_targets(result: PairedResult) -> list[TargetResult]:
    """The CPU ratio targets (docs/performance.md#targets), judged on each path's median
    ratio over its reps; named and described as paired."""
    s = result.scenario
    tagged = len(result.loops) > 1
    notes = [scenario_note(s.streams, s.tokens, s.rate),
             (f"paired: the median of {s.reps} reps, each streamsvc path at the same time as"
              " a baseline of its own")]
    targets = []
    for loop in result.loops:
        for path in loop.paths:
            at = f"@{loop.loop}" if tagged else ""
            failed = [str(rep.rep) for rep in path.reps if rep.failed]
            note = notes + ([f"{path.name}{at}: streams failed in rep {', '.join(failed)}"]
                            if failed else [])
            limit, value = cpu_ratio_limit(path.endpoint), path.median_ratio
            targets.append(TargetResult(
                name=f"paired_cpu_ratio_{path.endpoint}{at}",
                description=f"paired CPU vs baseline, {path.name}{at}", limit=limit, unit="x",
                value=value, met=None if value is None else value <= limit,
                note="; ".join(filter(None, note)),
            ))
    return targets


def _f(value: float | None, digits: int) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def paired_tables(result: PairedResult) -> Tables:
    """One table per relay loop (a row per rep; the path's median ratio and range on its last
    rep's row), then the targets; 80 columns wide (the endpoint names the path: every path
    of a paired run is streamsvc's)."""
    s = result.scenario
    out: Tables = []
    for loop in result.loops:
        rows = []
        for path in loop.paths:
            spread = (f"{path.min_ratio:.3f}–{path.max_ratio:.3f}"
                      if path.min_ratio is not None and path.max_ratio is not None else "–")
            for rep in path.reps:
                last = rep is path.reps[-1]
                rows.append([
                    path.endpoint, str(rep.rep), rep.first, _f(rep.baseline.cpu_us_per_token, 1),
                    _f(rep.path.cpu_us_per_token, 1),
                    _f(rep.ratio, 3) + (FLAG if rep.failed else ""),
                    _f(path.median_ratio, 3) if last else "", spread if last else "",
                ])
        out.append((
            (f"paired, relays on {loop.loop}: {s.streams_per_side} + {s.streams_per_side}"
             f" streams x {s.tokens} tokens at {s.rate:g} tokens/s, each streamsvc path at"
             " the same time as a baseline of its own: CPU µs per token"),
            ["endpoint", "rep", "first", "baseline µs per token", "streamsvc µs per token",
             "ratio", "median ratio", "range"],
            rows,
        ))
    out.append(("targets, paired (docs/performance.md)",
                ["target", "limit", "measured", "verdict"],
                [[t.description, f"≤ {t.limit:g} {t.unit}",
                  "–" if t.value is None else f"{t.value:.3f} {t.unit}", verdict(t)]
                 for t in result.targets]))
    return out


def _notes(result: PairedResult) -> list[str]:
    s = result.scenario
    lines = [(f"each side carried half of -k {s.streams}: {s.streams_per_side} streams"
              f" through the baseline and {s.streams_per_side} through the streamsvc path, at"
              " the same time, each relay with a simulator and a load client of its own"),
             "first: the side started first (on the first simulator), alternating rep by rep"]
    if s.loop == "both" and len(s.relay_loops) < 2:
        lines.append("uvloop is not installed (pip install 'streamsvc[fast]'): the relays ran"
                     " on asyncio only")
    for loop in result.loops:
        for path in loop.paths:
            for rep in path.reps:
                for side in (rep.baseline, rep.path):
                    if side.failed:
                        errors = ", ".join(f"{why}: {n}" for why, n in side.errors.items())
                        lines.append(f"{FLAG} {path.name} on {loop.loop}, rep {rep.rep}:"
                                     f" {side.failed} streams failed on the {side.relay}"
                                     f" side ({errors}); its CPU per token counts the"
                                     " completed streams only")
    return lines + target_notes(result.targets)


def print_paired(result: PairedResult, console: Console) -> None:
    """The tables and the notes on ``console``; a rep with failed streams is flagged."""
    failed = result.failed_streams
    print_tables(paired_tables(result), console, notes=_notes(result), failed=(
        f"{failed} streams failed; see the {FLAG} lines and the errors in the JSON"
        if failed else ""))


def run_paired(options: BenchOptions, *, command: list[str]) -> int:
    """Run the paired comparison, print its tables, write ``--json``.

    Returns:
        0; 1 when a stream failed on some side or a process would not start.
    """
    console = Console(stderr=True)
    raise_file_limit(options.streams)
    finished = run_with_progress(lambda workdir, bar: _run(options, workdir, bar),
                                 keep_logs=options.keep_logs, console=console)
    if finished is None:
        return 1
    loops = finished.value
    result = PairedResult(
        scenario=PairedScenario(
            streams=options.streams, streams_per_side=options.side_streams,
            tokens=options.tokens, rate=options.rate, ramp_s=options.ramp_s,
            model=options.model, reps=options.rounds, endpoints=list(options.endpoints),
            loop=options.loop, relay_loops=list(options.relay_loops),
        ),
        loops=loops, targets=[],
        failed_streams=sum(rep.failed for loop in loops for path in loop.paths
                           for rep in path.reps),
    )
    result = msgspec.structs.replace(result, targets=paired_targets(result))
    print_paired(result, Console())
    if options.json_path:
        write_json(PairedReport(
            streamsvc_version=str(machine_info()["streamsvc"]), date=finished.date,
            command=command, command_line=shlex.join(command),
            duration_s=finished.duration_s, machine=machine_info(), paired=result,
        ), options.json_path, console)
    return 1 if result.failed_streams else 0
