"""Judging a run against the targets (docs/performance.md), and showing it: table, JSON,
Markdown, plot.

The terminal tables fit 80 columns (a pipe, a small terminal): no vertical rules, headers
wrap onto several lines, and the path names are never cut, so that two paths never read
the same.
"""

from __future__ import annotations

import statistics
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TypeVar

import msgspec
from rich import box
from rich.console import Console
from rich.table import Table

from streamsvc.bench.options import DEFAULT, BenchOptions
from streamsvc.bench.results import BenchReport, OpenStreamsResult, PathResult, TargetResult
from streamsvc.bench.stats import median

__all__ = [
    "ADDED_GAP_P99_LIMIT_MS",
    "ADDED_TTFT_P99_LIMIT_MS",
    "CPU_RATIO_LIMIT",
    "CPU_RATIO_LIMITS",
    "RSS_PER_STREAM_LIMIT_KIB",
    "Tables",
    "cpu_ratio_limit",
    "evaluate_targets",
    "event_loops",
    "markdown",
    "notes",
    "print_report",
    "print_tables",
    "scenario_note",
    "tables",
    "target_notes",
    "verdict",
    "write_json",
    "write_outputs",
]

CPU_RATIO_LIMIT = 1.2
"""CPU per token over the bare relay's, for every endpoint but the OpenAI one (issue 15)."""
CPU_RATIO_LIMITS = {"openai": 1.0}
"""Endpoints held to a tighter ratio: the OpenAI one relays frames nearly as they come."""
ADDED_GAP_P99_LIMIT_MS = 50.0
ADDED_TTFT_P99_LIMIT_MS = 10.0
RSS_PER_STREAM_LIMIT_KIB = 64.0
MIB = 1024 * 1024
_P = TypeVar("_P", PathResult, OpenStreamsResult)
Tables = list[tuple[str, list[str], list[list[str]]]]
"""(title, header, rows) tables: the same cells for the terminal and Markdown."""
# Other processes using more than this share of one CPU during a phase (and more
# than the floor, which short phases need) make it noisy.
BUSY_SHARE = 0.1
BUSY_FLOOR_S = 0.25
SATURATED_SHARE = 0.9
"""A phase whose busiest half second used this share of the machine's CPUs (all its
processes, the harness's too) measured latencies that include waiting for a CPU."""


def cpu_ratio_limit(endpoint: str) -> float:
    """The CPU-per-token ratio to the baseline that ``endpoint`` (``openai``, ...) is held to."""
    return CPU_RATIO_LIMITS.get(endpoint, CPU_RATIO_LIMIT)


def scenario_note(streams: int, tokens: int, rate: float) -> str:
    """A note for the main targets when K, N, R are not the target scenario's; else ``""``."""
    if (streams, tokens, rate) == (DEFAULT.streams, DEFAULT.tokens, DEFAULT.rate):
        return ""
    return (f"measured at K={streams}, N={tokens}, R={rate:g} (the target is for"
            f" K={DEFAULT.streams}, N={DEFAULT.tokens}, R={DEFAULT.rate:g})")


def _scenario_note(report: BenchReport) -> tuple[str, str]:
    """Notes for the main and the open-streams targets when the run is not the target scenario."""
    s = report.settings
    main, open_ = scenario_note(s.streams, s.tokens, s.rate), ""
    if (s.slow_streams, s.slow_rate) != (DEFAULT.slow_streams, DEFAULT.slow_rate):
        open_ = (f"measured at M={s.slow_streams} x {s.slow_rate:g} tokens/s (the target is for"
                 f" M={DEFAULT.slow_streams} x {DEFAULT.slow_rate:g})")
    return main, open_


def _target(
    name: str, description: str, limit: float, unit: str, value: float | None, note: str,
    *, added: bool = False,
) -> TargetResult:
    """``added``: ``value`` is a relay's latency minus the direct path's, which says nothing
    when the direct path was slower than the relay by more than the limit (its phase was
    disturbed): such a figure is kept but not judged."""
    if value is None:
        return TargetResult(name=name, description=description, limit=limit, unit=unit,
                            value=None, met=None, note=note or "not measured in this run")
    if added and value < -limit:
        unjudged = (f"{description}: the direct path was {-value:.0f} {unit} slower than"
                    " the relay, so the reference was disturbed and this run does not judge it")
        return TargetResult(name=name, description=description, limit=limit, unit=unit,
                            value=value, met=None, note="; ".join(filter(None, (note, unjudged))))
    return TargetResult(name=name, description=description, limit=limit, unit=unit,
                        value=value, met=value <= limit, note=note)


def verdict(target: TargetResult) -> str:
    """What the targets table says of ``target``."""
    if target.met is None:
        return "not measured" if target.value is None else "not judged"
    return "met" if target.met else "NOT met"


def evaluate_targets(report: BenchReport) -> list[TargetResult]:
    """The targets, each with the figure this run measured and whether it is met."""
    main_note, open_note = _scenario_note(report)
    targets: list[TargetResult] = []
    for path in report.paths:
        # The Redis journal is measured for what several instances cost; no target is set on it.
        if path.relay != "streamsvc" or path.journal == "redis":
            continue
        endpoint = path.name.removeprefix("streamsvc-")
        rounds = (f"the CPU ratios and the added TTFT p99 are the median of {len(path.rounds)}"
                  " rounds (each round's CPU ÷ the baseline's just before and after it)"
                  if len(path.rounds) > 1 else "")
        note = "; ".join(filter(None, (main_note, rounds)))
        targets.append(_target(
            f"cpu_ratio_{endpoint}", f"CPU vs baseline, {path.name}",
            cpu_ratio_limit(endpoint.split("@")[0]), "x",
            path.cpu_ratio_to_baseline, note,
        ))
        ttft = path.added_ttft_ms.p99 if path.added_ttft_ms else None
        measured = [r.added_ttft_p99_ms for r in path.rounds if r.added_ttft_p99_ms is not None]
        if len(measured) > 1:  # a p99 of one round moves more than the CPU does
            ttft = statistics.median(measured)
        targets.append(_target(
            f"added_ttft_p99_{endpoint}", f"added TTFT p99, {path.name}",
            ADDED_TTFT_P99_LIMIT_MS, "ms", ttft, note, added=True,
        ))
    if not any(o.relay == "streamsvc" for o in report.open_streams):
        for name, description, limit, unit in (
            ("added_gap_p99_open_streams", "added gap p99, open streams",
             ADDED_GAP_P99_LIMIT_MS, "ms"),
            ("added_ttft_p99_open_streams", "added TTFT p99, open streams",
             ADDED_TTFT_P99_LIMIT_MS, "ms"),
            ("rss_per_stream", "RSS per open stream", RSS_PER_STREAM_LIMIT_KIB, "KiB"),
        ):
            targets.append(_target(name, description, limit, unit, None,
                                   "the open-streams phase did not run (--slow-streams 0)"))
    for result in report.open_streams:
        if result.relay != "streamsvc":
            continue
        streams = result.load.streams
        # One pair of open-stream targets per endpoint and relay loop, named as the main ones;
        # the descriptions short enough that the targets table keeps to 80 columns.
        endpoint = result.name.removeprefix("streamsvc-")
        targets.append(_target(
            f"added_gap_p99_open_streams_{endpoint}",
            f"open added gap p99, {result.name}",
            ADDED_GAP_P99_LIMIT_MS, "ms",
            result.added_gap_ms.p99 if result.added_gap_ms else None, open_note, added=True,
        ))
        targets.append(_target(
            f"added_ttft_p99_open_streams_{endpoint}",
            f"open added TTFT, {result.name}",
            ADDED_TTFT_P99_LIMIT_MS, "ms",
            result.added_ttft_ms.p99 if result.added_ttft_ms else None, open_note,
            added=True,
        ))
        note = open_note
        if not result.plateau_reached and result.rss_per_stream_kib is not None:
            missed = (f"no sample saw all {streams} streams open at once: per stream of the"
                      f" {result.rss_open_streams} open at the fullest sample")
            note = "; ".join(filter(None, (note, missed)))
        targets.append(_target(
            f"rss_per_stream_{endpoint}", f"open RSS/stream, {result.name}",
            RSS_PER_STREAM_LIMIT_KIB, "KiB", result.rss_per_stream_kib, note,
        ))
    return targets


def _f(value: float | None, digits: int = 1) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def _mib(value: int | None) -> str:
    return "–" if value is None else f"{value / MIB:.1f}"


def _signed(value: float | None, digits: int = 1) -> str:
    return "–" if value is None else f"{value:+.{digits}f}"


def _by_loop(report: BenchReport, paths: Sequence[_P]) -> list[tuple[str, list[_P]]]:
    """(title suffix, paths): one group per relay loop when the run has several, each with the
    paths no loop of ours runs (direct, the reference; nginx); else all in one."""
    loops = report.settings.relay_loops
    if len(loops) < 2:
        return [("", list(paths))]
    return [(f", relays on {loop}", [p for p in paths if p.relay_loop in (None, loop)])
            for loop in loops]


def _shown(name: str) -> str:
    """A path's name in a table of one relay loop: the loop is in the title."""
    return name.partition("@")[0]


def tables(report: BenchReport) -> Tables:
    """The report as (title, header, rows) tables: the same cells for the terminal and Markdown.

    With several relay loops, each phase has one table per loop (the path names
    then fit 80 columns without their ``@LOOP``).
    """
    s = report.settings
    out: Tables = []
    for on_loop, paths in _by_loop(report, report.paths):
        rows = [
            [
                _shown(p.name), _f(p.cpu_us_per_token), _f(p.cpu_ratio_to_baseline, 2),
                _mib(p.peak_rss_bytes), _f(p.load.ttft_ms.p50), _f(p.load.ttft_ms.p99),
                _signed(p.added_ttft_ms.p99 if p.added_ttft_ms else None), str(p.load.failed),
            ]
            for p in paths
        ]
        out.append((
            (f"{s.streams} streams x {s.tokens} tokens at {s.rate:g} tokens/s{on_loop}:"
             " CPU, memory, time to first token (ms)"),
            ["path", "CPU µs per token", "÷ baseline", "peak RSS MiB", "TTFT p50", "TTFT p99",
             "added TTFT p99", "failed"],
            rows,
        ))
        rows = []
        for p in paths:
            gap, extra = p.load.gap_ms, p.added_gap_ms
            rows.append([
                _shown(p.name), _f(gap.p50), _f(gap.p99), _f(gap.max),
                _signed(extra.p50 if extra else None), _signed(extra.p99 if extra else None),
                _signed(extra.max if extra else None),
            ])
        out.append((
            f"same run{on_loop}: inter-token gap (ms)",
            ["path", "gap p50", "gap p99", "gap max", "added p50", "added p99", "added max"],
            rows,
        ))
        out += _rounds_table(paths, on_loop)
    for on_loop, open_streams in _by_loop(report, report.open_streams):
        if not open_streams:
            continue
        rows = [
            [
                # RSS before the phase is left out (in the JSON): the table keeps to 80 columns.
                _shown(o.name), str(o.load.max_open), _mib(o.rss_plateau_bytes),
                _f(o.rss_per_stream_kib), _f(o.load.gap_ms.p99),
                _signed(o.added_gap_ms.p99 if o.added_gap_ms else None),
                _signed(o.added_ttft_ms.p99 if o.added_ttft_ms else None),
                _f(o.cpu_us_per_token), str(o.load.failed),
            ]
            for o in open_streams
        ]
        out.append((
            (f"{s.slow_streams} open streams x {s.slow_tokens} tokens at {s.slow_rate:g}"
             f" tokens/s{on_loop}: memory, inter-token gap, TTFT (ms)"),
            ["path", "most open", "RSS all open MiB", "KiB per stream",
             "gap p99", "added gap p99", "added TTFT p99", "CPU µs per token", "failed"],
            rows,
        ))
    rows = [
        [
            t.description, f"≤ {t.limit:g} {t.unit}",
            "–" if t.value is None else f"{t.value:.2f} {t.unit}",
            verdict(t),
        ]
        for t in report.targets
    ]
    out.append(("targets (docs/performance.md)", ["target", "limit", "measured", "verdict"],
                rows))
    return out


def _rounds_table(paths: Sequence[PathResult], on_loop: str) -> Tables:
    """The rounds of the paths measured in several: each round's CPU per token (the
    baseline's: the median of its runs in the round), the median ratio and the range of the
    rounds' ratios; the baseline's range is that of its runs ÷ their median (the drift)."""
    measured = [p for p in paths if len({r.round for r in p.rounds}) > 1]
    if not measured:
        return []
    count = max(r.round for p in measured for r in p.rounds)
    rows = []
    for p in measured:
        if p.relay == "baseline" and p.cpu_us_per_token:
            typical = p.cpu_us_per_token
            ratios = [r.cpu_us_per_token / typical for r in p.rounds if r.cpu_us_per_token]
        else:
            ratios = [r.cpu_ratio_to_baseline for r in p.rounds if r.cpu_ratio_to_baseline]
        spread = f"{min(ratios):.2f}–{max(ratios):.2f}" if ratios else "–"
        by_round: dict[int, list[float | None]] = {}
        for r in p.rounds:
            by_round.setdefault(r.round, []).append(r.cpu_us_per_token)
        cells = [_f(median(by_round.get(n, []))) for n in range(1, count + 1)]
        rows.append([_shown(p.name), *cells, _f(p.cpu_ratio_to_baseline, 2), spread])
    return [(
        (f"same run{on_loop}, {count} rounds in alternating order: CPU µs per token by round,"
         " each ÷ the baseline runs just before and after it"),
        ["path", *(f"round {n}" for n in range(1, count + 1)), "median ÷ baseline",
         "range ÷ baseline"],
        rows,
    )]


def event_loops(report: BenchReport) -> str:
    """Every process of the run with its event loop(s), each role once: ``baseline uvloop and
    asyncio, ...``."""
    loops: dict[str, dict[str, None]] = {}
    for process in report.processes:
        loops.setdefault(process.role, {})[process.event_loop] = None
    return ", ".join(f"{role} {' and '.join(said)}" for role, said in loops.items())


def notes(report: BenchReport) -> list[str]:
    """What the tables do not say: the paths' names, loops, skipped paths, target notes."""
    lines = ["paths: " + "; ".join(dict.fromkeys(f"{_shown(p.name)} = {p.label}"
                                                 for p in report.paths))
             + ("; @LOOP: the relay's event loop" if len(report.settings.relay_loops) > 1
                else "")]
    lines.append("event loops: " + event_loops(report))
    direct = report.paths[0] if report.paths else None
    if direct is not None and direct.tokens_relayed:
        client = direct.load.cpu_s / direct.tokens_relayed * 1e6
        lines.append(f"harness CPU per token (direct run): simulator"
                     f" {direct.simulator_cpu_us_per_token:.1f} µs, load client {client:.1f} µs")
    redis = [p for p in report.paths if p.redis_cpu_us_per_token is not None]
    if redis:
        lines.append("redis-server CPU per token, on top of the relay's: " + ", ".join(
            f"{p.name} {p.redis_cpu_us_per_token:.1f} µs" for p in redis))
    phases = [(p.name, p.load, p.listen_overflows, p.other_cpu_s, p.machine_busy_peak)
              for p in report.paths]
    phases += [(o.name, o.load, o.listen_overflows, o.other_cpu_s, o.machine_busy_peak)
               for o in report.open_streams]
    for title, group in (("main phase: ", report.paths), ("open streams: ", report.open_streams)):
        peaks = [f"{p.name} {p.machine_busy_peak:.0%}" for p in group
                 if p.machine_busy_peak is not None]
        if peaks:
            lines.append(f"the machine's CPUs in use, busiest half second, {title}"
                         + ", ".join(peaks))
    for name, load, overflows, other_cpu, peak in phases:
        if peak is not None and peak >= SATURATED_SHARE:
            lines.append(f"{name} ({load.streams} streams): {peak:.0%} of the machine's CPUs"
                         " were in use in its busiest half second: its latencies include"
                         " waiting for a CPU")
        if overflows:
            # /proc/net/netstat ListenOverflows counts every listening socket of the machine.
            lines.append(f"{name} ({load.streams} streams): while it ran, {overflows}"
                         " connections were dropped on full listen queues on this machine"
                         " (any process's: the kernel counts them for all)")
        if other_cpu > max(BUSY_SHARE * load.duration_s, BUSY_FLOOR_S):
            lines.append(f"{name} ({load.streams} streams): other processes used"
                         f" {other_cpu:.1f} CPU s in {load.duration_s:.1f} s: a noisy run")
    lines += [f"skipped {skipped.name}: {skipped.reason}" for skipped in report.skipped]
    return lines + target_notes(report.targets, said=[s.reason for s in report.skipped])


def target_notes(targets: Iterable[TargetResult], *, said: Iterable[str] = ()) -> list[str]:
    """``note: ...`` lines for the targets' notes, each said once, and none that a line of
    ``said`` already says."""
    # A target's note may join several ("measured at ...; no sample saw ..."), and targets
    # share them.
    seen = set(said)
    lines = []
    for target in targets:
        for part in filter(None, target.note.split("; ")):
            if part not in seen and not any(reason in part for reason in seen):
                seen.add(part)
                lines.append(f"note: {part}")
    return lines


def print_report(report: BenchReport, console: Console) -> None:
    """The tables and the notes on ``console``."""
    failed = report.failed_streams
    print_tables(tables(report), console, notes=notes(report), failed=(
        f"{failed} streams failed; see the failed columns and load.errors in the JSON"
        if failed else ""))


def print_tables(shown: Tables, console: Console, *, notes: Iterable[str] = (),
                 failed: str = "") -> None:
    """``shown`` on ``console``, each under its title (a row with a target not met in red),
    then the ``notes``, then what ``failed`` says, in red."""
    for title, header, rows in shown:
        # The title on its own: a table's title wraps at the table's width, which may be one
        # column wider than the console (a pad the console then crops, with a title's letter).
        console.print(title, highlight=False)
        table = Table(box=box.SIMPLE_HEAD, pad_edge=False, collapse_padding=True)
        for i, name in enumerate(header):
            # The first column (a path name, a target) is never cut; headers wrap instead.
            words = [name] if i == 0 else name.split()
            table.add_column(name, justify="left" if i == 0 else "right", no_wrap=i == 0,
                             min_width=max(map(len, [*words, *(row[i] for row in rows)])))
        for row in rows:
            table.add_row(*row, style="red" if "NOT met" in row else None)
        console.print(table)
    for line in notes:
        console.print(line, highlight=False)
    if failed:
        console.print(f"[red]{failed}[/red]")


def _markdown_table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |"

    lines = [line(header), "|" + "|".join("---" for _ in header) + "|"]
    lines += [line(row) for row in rows]
    return "\n".join(lines)


def markdown(report: BenchReport) -> str:
    """The tables as Markdown, with the command, date and machine (for docs/performance.md)."""
    m = report.machine
    parts = [
        f"Command: `{report.command_line}`  ",
        (f"Date: {report.date}, streamsvc {report.streamsvc_version}, run time"
         f" {report.duration_s:.0f} s  "),
        (f"Machine: {m.get('cpus')} CPUs ({m.get('cpu_model')}), Python {m.get('python')},"
         f" aiohttp {m.get('aiohttp')}, uvloop {m.get('uvloop') or 'not installed'},"
         f" {m.get('nginx') or 'nginx not installed'},"
         f" {m.get('redis') or 'redis-server not installed'},"
         f" hiredis {m.get('hiredis') or 'not installed'}  "),
        "Event loops: " + event_loops(report),
        "",
        "Paths: " + "; ".join(dict.fromkeys(f"`{_shown(p.name)}` = {p.label}"
                                            for p in report.paths)),
    ]
    for title, header, rows in tables(report):
        parts += ["", f"**{title}**", "", _markdown_table(header, rows)]
    parts += [""] + [f"- {line}" for line in notes(report)[2:]]
    return "\n".join(parts) + "\n"


def write_outputs(report: BenchReport, options: BenchOptions, console: Console) -> None:
    """``--json``, ``--markdown`` and ``--plot``; a missing matplotlib is said, not raised."""
    if options.json_path:
        write_json(report, options.json_path, console)
    if options.markdown_path:
        Path(options.markdown_path).write_text(markdown(report), encoding="utf-8")
        console.print(f"wrote {options.markdown_path}")
    if options.plot_path:
        try:
            from streamsvc.bench.plot import write_plot
        except ImportError:
            console.print("no plot: matplotlib is not installed"
                          " (pip install 'streamsvc[plot]')")
            return
        write_plot(report, Path(options.plot_path))
        console.print(f"wrote {options.plot_path}")


def write_json(record: msgspec.Struct, path: str, console: Console) -> None:
    """``record`` as indented JSON in ``path``; said on ``console``."""
    data = msgspec.json.format(msgspec.json.encode(record), indent=2)
    Path(path).write_bytes(data + b"\n")
    console.print(f"wrote {path}")
