"""``streamsvc bench``: the quick run completes and reports every figure.

Speed is never asserted: the figures must be there, finite, and positive
where a measurement cannot be zero (CPU per token, RSS, latencies). The
quick run measures every path of the default run: both relay loops, the
journal endpoint, the Redis journal (with a redis-server on PATH) and nginx.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import statistics
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest
from pytest_aiohttp import AiohttpClient

from streamsvc.bench.baseline import create_baseline_app
from streamsvc.bench.load import LoadSpec, run_load
from streamsvc.bench.nginx import nginx_binary
from streamsvc.bench.options import BenchOptions, add_arguments, options_from_args
from streamsvc.bench.orchestrator import (
    _main_paths,
    _Measured,
    _open_paths,
    _path_results,
    _Ran,
    _rounds,
    _Run,
)
from streamsvc.bench.paired import print_paired
from streamsvc.bench.procfs import BusiestStretch, machine_cpu_seconds
from streamsvc.bench.redis_server import redis_binary
from streamsvc.bench.report import (
    evaluate_targets,
    notes,
    print_report,
    tables,
    verdict,
    write_outputs,
)
from streamsvc.bench.results import (
    Added,
    BenchReport,
    LoadResult,
    PairedReport,
    PathResult,
    Skipped,
)
from streamsvc.bench.services import child_env
from streamsvc.bench.stats import percentile, summarize
from streamsvc.eventloop import uvloop_available
from streamsvc.simulator import SimulatorServer
from tests.conftest import RunningServer, free_port

ROOT = Path(__file__).resolve().parent.parent
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
LOOPS = {"asyncio", "uvloop"}
# The relay loops of the default --loop both, in their order; one loop: names carry none.
RELAY_LOOPS = ("uvloop", "asyncio") if uvloop_available() else ("asyncio",)
ENDPOINTS = ("openai", "events", "streams")  # the default --endpoints
OPEN_ENDPOINTS = ("openai", "events")  # those the open-streams phase measures
OPEN_PATHS = tuple(f"streamsvc-{e}" for e in OPEN_ENDPOINTS)
URLS = {"openai": "/v1/chat/completions", "events": "/v1/chat/stream"}


def on(name: str, loop: str) -> str:
    """A relay path's name on ``loop``, as the run names it."""
    return f"{name}@{loop}" if len(RELAY_LOOPS) > 1 else name


def finite(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def positive(value: Any) -> bool:
    return finite(value) and value > 0


def cli_env(*, own_width: bool = False) -> dict[str, str]:
    """A ``streamsvc`` child's environment: no streamsvc settings, this checkout's package;
    ``own_width``: no ``COLUMNS``, so that rich keeps to its own 80 columns when piped."""
    env = child_env({"PYTHONPATH": str(ROOT)})
    if own_width:
        env.pop("COLUMNS", None)
    return env


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[
    subprocess.CompletedProcess[str], dict[str, Any], Path
]]:
    """One ``streamsvc bench --quick --json --plot`` run, shared by the checks below."""
    tmp = tmp_path_factory.mktemp("bench")
    env = cli_env(own_width=True)
    result = subprocess.run(
        [sys.executable, "-m", "streamsvc", "bench", "--quick", "--json", "out.json",
         "--plot", "out.png", "--keep-logs", "logs"],
        capture_output=True, text=True, timeout=150, cwd=tmp, env=env, check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    yield result, json.loads((tmp / "out.json").read_text(encoding="utf-8")), tmp


def test_quick_bench_measures_every_path(quick_run: Any) -> None:
    _, report, _ = quick_run
    names = [path["name"] for path in report["paths"]]
    relays = ["baseline", *(f"streamsvc-{e}" for e in ENDPOINTS)]
    if redis_binary() is not None:
        relays += ["streamsvc-redis", "streamsvc-remote"]
    expected = ["direct", *(on(name, loop) for loop in RELAY_LOOPS for name in relays)]
    if nginx_binary() is not None:
        expected.append("nginx")
    skipped = {s["name"] for s in report["skipped"]}
    assert ("nginx" in skipped) == (nginx_binary() is None)
    assert ("streamsvc-redis" in skipped) == (redis_binary() is None)
    assert names == expected
    assert report["failed_streams"] == 0
    assert report["settings"]["relay_loops"] == list(RELAY_LOOPS)
    settings = report["settings"]
    assert settings["rounds"] == 1
    for path in report["paths"]:
        load = path["load"]
        assert load["completed"] == load["streams"] == settings["streams"] and load["failed"] == 0
        for figure in ("ttft_ms", "gap_ms"):
            assert load[figure]["count"] > 0
            for key in ("mean", "p50", "p90", "p99", "p999", "max"):
                assert positive(load[figure][key]), (path["name"], figure, key)
        assert load["ttft_cdf"] and load["gap_cdf"]
        assert path["tokens_relayed"] == settings["streams"] * settings["tokens"]
        assert positive(path["simulator_cpu_us_per_token"])
        if path["name"] == "direct":
            assert path["relay"] is None and path["cpu_us_per_token"] is None
            continue
        for key in ("cpu_s", "cpu_us_per_token", "cpu_ratio_to_baseline", "peak_rss_bytes"):
            assert positive(path[key]), (path["name"], key)
        for figure in ("added_ttft_ms", "added_gap_ms"):
            assert all(finite(path[figure][key]) for key in ("p50", "p99", "max"))
        if path["relay"] == "nginx":  # measured once, outside the rounds
            assert path["rounds"] == []
        elif path["relay"] == "baseline":  # before, between and after streamsvc's paths
            streamsvc_paths = [p for p in report["paths"] if p["relay"] == "streamsvc"
                               and p["relay_loop"] == path["relay_loop"]]
            runs = path["rounds"]
            assert len(runs) == len(streamsvc_paths) + 1 and {r["round"] for r in runs} == {1}
            assert path["cpu_us_per_token"] == pytest.approx(
                statistics.median(r["cpu_us_per_token"] for r in runs))
            assert all(r["cpu_ratio_to_baseline"] == 1.0 for r in runs)
        else:  # --quick: one round, whose figures are the path's
            (only,) = path["rounds"]
            assert only["round"] == 1 and only["cpu_us_per_token"] == path["cpu_us_per_token"]
            assert only["cpu_ratio_to_baseline"] == path["cpu_ratio_to_baseline"]
            assert only["completed"] == load["completed"] and only["failed"] == 0
            assert positive(only["baseline_us_per_token"])
        if path["relay_loop"] is not None:  # each relay ran on the loop its name says
            assert path["event_loop"] == path["relay_loop"] and path["event_loop"] in LOOPS
            assert path["name"] == on(path["name"].partition("@")[0], path["relay_loop"])


def test_quick_bench_measures_the_journal_endpoint_and_the_redis_journal(
    quick_run: Any,
) -> None:
    _, report, tmp = quick_run
    paths = {path["name"]: path for path in report["paths"]}
    for loop in RELAY_LOOPS:
        streams = paths[on("streamsvc-streams", loop)]
        assert streams["load"]["endpoint"] == "streams" and streams["journal"] == "memory"
        assert streams["load"]["url"].endswith("/v1/streams")
        assert streams["redis_cpu_us_per_token"] is None
    if redis_binary() is None:
        (skip,) = [s for s in report["skipped"] if s["name"] == "streamsvc-redis"]
        assert "no redis-server on PATH" in skip["reason"]
        return
    for loop in RELAY_LOOPS:
        redis, remote = paths[on("streamsvc-redis", loop)], paths[on("streamsvc-remote", loop)]
        # The relay's own log said it journals in Redis, and Redis did work for it.
        for path in (redis, remote):
            assert path["journal"] == "redis" and path["load"]["endpoint"] == "streams"
            assert positive(path["redis_cpu_us_per_token"]) and positive(path["cpu_us_per_token"])
        # The remote path's streams were created on one instance and read on another.
        assert redis["load"]["read_url"] is None
        read_url = remote["load"]["read_url"]
        assert read_url.startswith("http://127.0.0.1:") and read_url != remote["load"]["url"]
    logs = [log.read_text() for log in (tmp / "logs").glob("streamsvc-*.log")]
    # One process on the Redis path, two on the remote one, per loop.
    assert sum("journal: Redis at redis://127.0.0.1:" in log for log in logs) == 3 * len(RELAY_LOOPS)
    assert report["machine"]["redis"].startswith("redis-server ")
    assert "redis-server CPU per token" in "\n".join(notes(_typed(report)))


def test_quick_bench_measures_open_streams(quick_run: Any) -> None:
    _, report, _ = quick_run
    rows = {row["name"]: row for row in report["open_streams"]}
    assert list(rows) == ["direct", *(on(name, loop) for loop in RELAY_LOOPS
                                      for name in ("baseline", *OPEN_PATHS))]
    for loop in RELAY_LOOPS:  # each streamsvc path read the endpoint its name says
        for endpoint in OPEN_ENDPOINTS:
            load = rows[on(f"streamsvc-{endpoint}", loop)]["load"]
            assert load["endpoint"] == endpoint and load["url"].endswith(URLS[endpoint])
    for name, row in rows.items():
        assert row["load"]["streams"] == report["settings"]["slow_streams"]
        assert row["load"]["failed"] == 0 and row["load"]["max_open"] > 0
        assert positive(row["load"]["gap_ms"]["p99"])
        if name == "direct":
            continue
        for key in ("rss_before_bytes", "rss_plateau_bytes", "peak_rss_bytes",
                    "cpu_us_per_token"):
            assert positive(row[key]), (name, key)
        assert finite(row["rss_per_stream_kib"]) and finite(row["added_gap_ms"]["p99"])
        assert finite(row["added_ttft_ms"]["p99"])


def test_quick_bench_judges_every_target(quick_run: Any) -> None:
    _, report, _ = quick_run
    targets = {t["name"]: t for t in report["targets"]}
    at = {loop: f"@{loop}" if len(RELAY_LOOPS) > 1 else "" for loop in RELAY_LOOPS}
    assert set(targets) == {  # none on the Redis journal: it has no target of its own
        *(f"{figure}_{e}{at[loop]}" for figure in ("cpu_ratio", "added_ttft_p99")
          for e in ENDPOINTS for loop in RELAY_LOOPS),
        *(f"{figure}_{e}{at[loop]}" for figure in ("added_gap_p99_open_streams",
                                                    "added_ttft_p99_open_streams", "rss_per_stream")
          for e in OPEN_ENDPOINTS for loop in RELAY_LOOPS),
    }
    for target in targets.values():
        assert finite(target["value"]) and isinstance(target["met"], bool)
        assert "K=200" in target["note"] or "M=1000" in target["note"]  # not the target scenario


def test_quick_bench_says_what_ran_where(quick_run: Any) -> None:
    result, report, _ = quick_run
    assert report["command"][:3] == ["streamsvc", "bench", "--quick"]
    assert "streamsvc bench --quick" in report["command_line"]
    assert report["date"] and positive(report["duration_s"])
    machine = report["machine"]
    assert positive(machine["cpus"]) and machine["python"] and machine["aiohttp"]
    # redis-py's reply parser moves the Redis paths' figures: the report says which ran.
    assert machine["hiredis"] == _installed("hiredis")
    loops: dict[str, set[str]] = {}
    for process in report["processes"]:
        loops.setdefault(process["role"], set()).add(process["event_loop"])
    assert {"simulator", "load client", "baseline", "streamsvc"} <= set(loops)
    assert len(loops["simulator"]) == len(loops["load client"]) == 1  # one for the whole run
    assert loops["simulator"] | loops["load client"] <= LOOPS
    assert loops["baseline"] == loops["streamsvc"] == set(RELAY_LOOPS)
    if redis_binary() is not None:
        assert loops["redis-server"] == {"n/a (C, its own ae loop)"}
    assert all(path["load"]["event_loop"] in LOOPS for path in report["paths"])
    (said,) = [line for line in result.stdout.splitlines() if line.startswith("event loops: ")]
    assert "load client" in result.stdout and "simulator" in said
    # The table went to stdout; the report parses back into its typed form.
    assert "targets (docs/performance.md)" in result.stdout and "issue" not in result.stdout
    msgspec.json.decode(json.dumps(report), type=BenchReport)


def test_quick_bench_tables_are_whole_at_80_columns_when_piped(quick_run: Any) -> None:
    result, report, _ = quick_run
    tables = result.stdout[:result.stdout.index("\npaths: ")]
    assert "…" not in tables
    assert max(len(line.rstrip()) for line in tables.splitlines()) <= 80
    rows = [line.split()[0] for line in tables.splitlines() if line.startswith(" ") and line.strip()]
    for path in report["paths"]:
        # never cut, so two paths never read the same; the loop is in the table's title
        assert path["name"].partition("@")[0] in rows
    if len(RELAY_LOOPS) > 1:
        titles = " ".join(tables.split())
        assert all(f"relays on {loop}:" in titles for loop in RELAY_LOOPS)
    for target in report["targets"]:
        assert target["description"] in tables and target["name"] not in tables


def _typed(report: dict[str, Any]) -> BenchReport:
    return msgspec.json.decode(json.dumps(report), type=BenchReport)


def test_the_targets_table_keeps_its_verdicts_at_80_columns_with_a_figure_missing(
    quick_run: Any,
) -> None:
    from rich.console import Console

    _, report, _ = quick_run
    typed = _typed(report)
    # The longest descriptions (an open-streams target on the events endpoint) beside the
    # widest verdict ("not measured").
    last = msgspec.structs.replace(typed.open_streams[-1], rss_per_stream_kib=None)
    typed = msgspec.structs.replace(typed, open_streams=[*typed.open_streams[:-1], last])
    typed = msgspec.structs.replace(typed, targets=evaluate_targets(typed))
    console = Console(width=80, record=True, file=io.StringIO())
    print_report(typed, console)
    text = console.export_text()
    table = text[text.index("targets (docs/performance.md)"):text.index("\npaths: ")]
    for target in typed.targets:
        (row,) = [line for line in table.splitlines() if target.description in line]
        said = verdict(target)
        assert row.rstrip().endswith(f" {said}") and len(row.rstrip()) <= 80, row
    assert [t.value for t in typed.targets].count(None) == 1


def test_an_added_latency_below_minus_its_limit_is_not_judged(quick_run: Any) -> None:
    """The 1,000-stream run of 2026-12-03 07:51: the direct path's TTFT p99 was 876 ms, the
    relays' 47 to 236 ms; "added TTFT -719 ms: met" said nothing about the relay."""
    _, report, _ = quick_run
    typed = _typed(report)
    slow = [msgspec.structs.replace(o, added_ttft_ms=Added(p50=-1.0, p99=-718.6, max=-700.0),
                                    added_gap_ms=Added(p50=0.0, p99=-9.0, max=1.0))
            for o in typed.open_streams]
    typed = msgspec.structs.replace(typed, open_streams=slow)
    targets = {t.name: t for t in evaluate_targets(typed)}
    ttft = [t for name, t in targets.items() if name.startswith("added_ttft_p99_open_streams_")]
    gap = [t for name, t in targets.items() if name.startswith("added_gap_p99_open_streams_")]
    assert ttft and len(gap) == len(ttft)
    for target in ttft:
        assert target.met is None and target.value == pytest.approx(-718.6)
        assert verdict(target) == "not judged" and "the reference was disturbed" in target.note
    for target in gap:  # -9 ms beside a 50 ms limit: noise, judged
        assert target.met is True and verdict(target) == "met"
    typed = msgspec.structs.replace(typed, targets=list(targets.values()))
    assert any("719 ms slower than the relay" in line for line in notes(typed))


def test_each_note_is_said_once_and_the_kernel_count_is_not_blamed_on_a_phase(
    quick_run: Any,
) -> None:
    _, report, _ = quick_run
    typed = _typed(report)
    first = msgspec.structs.replace(typed.paths[0], listen_overflows=35)
    typed = msgspec.structs.replace(typed, paths=[first, *typed.paths[1:]])
    lines = notes(typed)
    assert len(lines) == len(set(lines))
    said = [line.removeprefix("note: ") for line in lines if line.startswith("note: ")]
    assert not any(a != b and a in b for a in said for b in said)
    assert sum("(the target is for K=200" in line for line in lines) == 1
    (kernel,) = [line for line in lines if "listen queue" in line]
    assert kernel == (f"direct ({first.load.streams} streams): while it ran, 35 connections were"
                      " dropped on full listen queues on this machine (any process's: the"
                      " kernel counts them for all)")


def test_every_phase_says_how_busy_the_machine_was(quick_run: Any) -> None:
    """The 1,000-stream TTFT of 2026-12-05 07:10: relay, simulator and load client used 1.9
    of the 2 CPUs as the last streams opened; a tail that is partly waiting for a CPU."""
    _, report, _ = quick_run
    typed = _typed(report)
    phases = [*typed.paths, *typed.open_streams]
    for phase in phases:
        assert phase.machine_busy_peak is not None and 0.0 < phase.machine_busy_peak <= 1.0
    main, open_ = [line for line in notes(typed) if line.startswith("the machine's CPUs in use")]
    assert main.startswith("the machine's CPUs in use, busiest half second, main phase: ")
    assert all(f"{p.name} {p.machine_busy_peak:.0%}" in main for p in typed.paths)
    assert open_.startswith("the machine's CPUs in use, busiest half second, open streams: ")
    assert all(f"{o.name} {o.machine_busy_peak:.0%}" in open_ for o in typed.open_streams)
    calm = [msgspec.structs.replace(o, machine_busy_peak=0.5) for o in typed.open_streams]
    busy = [msgspec.structs.replace(calm[0], machine_busy_peak=0.94), *calm[1:]]
    said = [line for line in notes(msgspec.structs.replace(typed, open_streams=calm))
            if "waiting for a CPU" in line]
    assert not any(busy[0].name in line for line in said)
    lines = notes(msgspec.structs.replace(typed, open_streams=busy))
    assert (f"{busy[0].name} ({busy[0].load.streams} streams): 94% of the machine's CPUs were"
            " in use in its busiest half second: its latencies include waiting for a CPU"
            in lines)


def test_the_busiest_stretch_is_the_busiest_half_second_of_readings() -> None:
    machine = BusiestStretch(window_s=0.5, cpus=2)
    machine.read(at=0.0, cpu_s=10.0)
    machine.read(at=0.25, cpu_s=10.2)
    assert machine.peak is None  # no stretch a window long yet
    machine.read(at=0.5, cpu_s=10.5)  # 0.0 to 0.5: 0.5 CPU s of 1.0
    assert machine.peak == pytest.approx(0.5)
    machine.read(at=0.75, cpu_s=11.4)  # 0.25 to 0.75: 1.2 of 1.0, capped
    assert machine.peak == 1.0
    machine.read(at=1.75, cpu_s=11.5)  # a late reading lowers nothing already seen
    assert machine.peak == 1.0
    calm = BusiestStretch(window_s=0.5, cpus=2)
    for at in range(40):  # readings every 0.25 s, 0.1 CPU s each: 20 %
        calm.read(at=at * 0.25, cpu_s=at * 0.1)
    assert calm.peak == pytest.approx(0.2)
    assert len(calm._readings) <= 3  # bounded, however long the phase


def test_the_machine_cpu_count_includes_this_process() -> None:
    own, machine = time.process_time(), machine_cpu_seconds()
    deadline = time.monotonic() + 0.3
    while time.monotonic() < deadline:
        pass
    spent = time.process_time() - own
    assert machine_cpu_seconds() - machine >= spent - 0.05  # /proc/stat counts in 10 ms ticks


def test_a_skipped_phase_is_said_once(quick_run: Any) -> None:
    _, report, _ = quick_run
    typed = _typed(report)
    typed = msgspec.structs.replace(
        typed, open_streams=[], skipped=[Skipped(name="open streams", reason="--slow-streams 0")])
    typed = msgspec.structs.replace(typed, targets=evaluate_targets(typed))
    lines = notes(typed)
    assert sum("--slow-streams 0" in line for line in lines) == 1, lines
    unmeasured = {t.name for t in typed.targets if t.value is None}
    assert {"added_gap_p99_open_streams", "added_ttft_p99_open_streams",
            "rss_per_stream"} <= unmeasured  # every open-streams target: "not measured"


def test_quick_bench_writes_the_plot(quick_run: Any) -> None:
    _, _, tmp = quick_run
    png = (tmp / "out.png").read_bytes()
    assert png.startswith(PNG_SIGNATURE) and len(png) > 10_000


def test_the_plot_draws_every_open_streams_path(quick_run: Any) -> None:
    import matplotlib.pyplot as plt

    from streamsvc.bench.plot import figure

    _, report, _ = quick_run
    fig = figure(_typed(report))
    try:
        (legend,) = fig.legends  # one for both latency panels
        drawn = [text.get_text() for text in legend.get_texts()]
    finally:
        plt.close(fig)
    opened = [label for label in drawn if " open at " in label]
    assert len(opened) == len(report["open_streams"])
    for endpoint in OPEN_ENDPOINTS:  # one dashed curve per loop on each endpoint
        assert sum(f"streamsvc POST {URLS[endpoint]}," in label
                   for label in opened) == len(RELAY_LOOPS), opened


def test_no_matplotlib_means_no_plot_and_no_crash(
    quick_run: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from rich.console import Console

    _, report, _ = quick_run
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    monkeypatch.delitem(sys.modules, "streamsvc.bench.plot", raising=False)
    typed = msgspec.json.decode(json.dumps(report), type=BenchReport)
    options = BenchOptions(plot_path=str(tmp_path / "out.png"), json_path=str(tmp_path / "o.json"))
    write_outputs(typed, options, Console(stderr=True))
    assert "matplotlib is not installed" in capsys.readouterr().err
    assert not (tmp_path / "out.png").exists() and (tmp_path / "o.json").exists()


# -- the parts, in process ---------------------------------------------------------------------


def test_percentile_interpolates_between_neighbours() -> None:
    assert percentile([1.0, 2.0, 3.0, 4.0], 0.5) == 2.5
    assert percentile([5.0], 0.99) == 5.0
    summary = summarize([0.001 * i for i in range(1, 101)])
    assert summary.count == 100 and summary.max == pytest.approx(100.0)
    assert summary.p50 == pytest.approx(50.5)


async def test_baseline_relays_the_simulator_stream_unchanged(
    aiohttp_client: AiohttpClient, simulator: SimulatorServer,
) -> None:
    client = await aiohttp_client(create_baseline_app(simulator.url))
    url = str(client.make_url(""))
    result = await run_load(LoadSpec(url=url, streams=3, tokens=15, rate=200.0, ramp_s=0.0),
                            progress_interval=10.0)
    body = {"model": "echo", "stream": True, "messages": [{"role": "user", "content": "a b"}]}
    async with client.post("/v1/chat/completions", json=body) as resp:
        assert resp.status == 200 and resp.content_type == "text/event-stream"
        assert (await resp.read()).endswith(b"data: [DONE]\n\n")
    assert result.completed == 3 and result.failed == 0 and result.gap_ms.count > 0


async def test_load_client_creates_a_stream_then_reads_its_events_url(
    relay: RunningServer,
) -> None:
    result = await run_load(LoadSpec(url=relay.url, endpoint="streams", streams=3, tokens=15,
                                     rate=200.0, ramp_s=0.0), progress_interval=10.0)
    assert result.completed == 3 and result.failed == 0, result.errors
    assert result.ttft_ms.count == 3 and result.gap_ms.count > 0
    assert result.url == relay.url + "/v1/streams"


def _bench_options(*argv: str) -> BenchOptions:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return options_from_args(parser.parse_args(argv))


def test_loop_both_is_the_default_and_runs_the_relays_on_each_loop() -> None:
    assert _bench_options().loop == "both"
    assert _bench_options().relay_loops == RELAY_LOOPS
    assert _bench_options("--loop", "asyncio").relay_loops == ("asyncio",)
    assert _bench_options("--endpoints", "streams,openai").endpoints == ("streams", "openai")
    assert _bench_options("--quick", "--no-redis").redis is False


def test_without_redis_server_the_redis_path_is_left_out_and_said(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    from rich.progress import Progress

    from streamsvc.bench import orchestrator

    monkeypatch.setattr(orchestrator, "redis_binary", lambda: None)
    run = _Run(BenchOptions(loop="asyncio", nginx=False), tmp_path, Progress())
    names = [path.name for path in _main_paths(run)]
    assert names == ["direct", "baseline", "streamsvc-openai", "streamsvc-events",
                     "streamsvc-streams"]
    assert [(s.name, s.reason) for s in run.skipped] == [
        ("streamsvc-redis", ("no redis-server on PATH: install redis-server to measure the"
                             " Redis journal")),
        ("nginx", "left out by --no-nginx"),
    ]


@pytest.mark.parametrize(("endpoints", "measured"), [
    ("openai,events,streams", ["streamsvc-openai", "streamsvc-events"]),
    ("streams,events,openai", ["streamsvc-events", "streamsvc-openai"]),
    ("events,responses", ["streamsvc-events"]),
    ("streams,responses", ["streamsvc-streams"]),
], ids=("default", "their-order", "events-only", "neither"))
def test_open_streams_phase_measures_the_openai_and_events_endpoints_else_the_first(
    endpoints: str, measured: list[str],
) -> None:
    options = _bench_options("--endpoints", endpoints, "--loop", "asyncio")
    names = [path.name for path in _open_paths(options)]
    assert names == ["direct", "baseline", *measured]
    tagged = [path.name for path in _open_paths(_bench_options("--endpoints", endpoints))]
    assert tagged == ["direct", *(on(name, loop) for loop in RELAY_LOOPS
                                  for name in ("baseline", *measured))]


def test_bench_flag_out_of_range_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    from streamsvc.cli import main

    assert main(["bench", "--streams", "0"]) == 2
    assert main(["bench", "--rounds", "0"]) == 2
    assert "--rounds must be at least 1" in capsys.readouterr().err


# -- --rounds: the relay paths in alternating order, each round held to its own baseline -----


def test_rounds_default_to_two_and_quick_to_one() -> None:
    assert _bench_options().rounds == 2 and _bench_options("--quick").rounds == 1
    assert _bench_options("--quick", "--rounds", "3").rounds == 3


def test_each_round_runs_the_relay_paths_in_the_reverse_order_of_the_one_before(
    tmp_path: Path,
) -> None:
    from rich.progress import Progress

    run = _Run(BenchOptions(loop="asyncio", nginx=False, redis=False,
                            endpoints=("openai", "streams")), tmp_path, Progress())
    order = [(path.name, number) for path, number in _rounds(_main_paths(run), 3)]
    base, openai, streams = "baseline", "streamsvc-openai", "streamsvc-streams"
    assert order == [("direct", 0),
                     *((name, 1) for name in (base, openai, base, streams, base)),
                     *((name, 2) for name in (base, streams, base, openai, base)),
                     *((name, 3) for name in (base, openai, base, streams, base))]
    both = _Run(BenchOptions(loop="both", nginx=True, redis=False, endpoints=("openai",)),
                tmp_path, Progress())
    if nginx_binary() is None or len(RELAY_LOOPS) < 2:
        return
    order = [(path.name, number) for path, number in _rounds(_main_paths(both), 2)]
    assert order == [("direct", 0),
                     *((name, number) for number in (1, 2) for name in (
                         "baseline@uvloop", "streamsvc-openai@uvloop", "baseline@uvloop")),
                     *((name, number) for number in (1, 2) for name in (
                         "baseline@asyncio", "streamsvc-openai@asyncio", "baseline@asyncio")),
                     ("nginx", 0)]


def _ran(path: Any, load: LoadResult, number: int, cpu_s: float | None, failed: int = 0
         ) -> _Ran:
    load = msgspec.structs.replace(load, completed=load.streams - failed, failed=failed)
    measured = _Measured(load=load, relay_cpu_s=cpu_s, simulator_cpu_s=1.0,
                         peak_rss_bytes=1 << 20, listen_overflows=0, other_cpu_s=0.0)
    return _Ran(path, measured, "asyncio", path.relay, None, number)


def test_each_round_is_held_to_its_own_baseline_and_the_median_is_reported(
    quick_run: Any, tmp_path: Path,
) -> None:
    from rich.progress import Progress

    _, report, _ = quick_run
    load = _typed(report).paths[0].load
    options = BenchOptions(loop="asyncio", nginx=False, redis=False,
                           endpoints=("openai", "events"), rounds=3, streams=load.streams,
                           tokens=load.tokens)
    direct, baseline, openai, events = _main_paths(_Run(options, tmp_path, Progress()))
    tokens = load.streams * load.tokens

    def us(path: Any, number: int, cpu: float, failed: int = 0) -> _Ran:
        # CPU per token counts the tokens of the streams completed
        return _ran(path, load, number, cpu * (tokens - failed * load.tokens) / 1e6, failed)

    # The machine slows down over the run, within rounds too: the baseline's CPU goes from
    # 1 to 8 µs, streamsvc's with it; a path is held to the baseline runs either side of it.
    measured = [
        _ran(direct, load, 0, None),
        us(baseline, 1, 1.0), us(openai, 1, 1.65), us(baseline, 1, 2.0), us(events, 1, 2.2),
        us(baseline, 1, 2.0),
        us(baseline, 2, 2.0), us(events, 2, 2.5), us(baseline, 2, 3.0),
        us(openai, 2, 2.7, failed=1), us(baseline, 2, 3.0),
        us(baseline, 3, 4.0), us(openai, 3, 5.4), us(baseline, 3, 8.0), us(events, 3, 8.8),
        us(baseline, 3, 8.0),
    ]
    results = {result.name: result for result in _path_results(measured, options)}
    assert list(results) == ["direct", "baseline", "streamsvc-openai", "streamsvc-events"]
    relayed = results["streamsvc-openai"]
    assert [r.round for r in relayed.rounds] == [1, 2, 3]
    assert [r.baseline_us_per_token for r in relayed.rounds] == pytest.approx([1.5, 3.0, 6.0])
    ratios = [r.cpu_ratio_to_baseline for r in relayed.rounds]
    assert ratios == pytest.approx([1.1, 0.9, 0.9])  # not ÷ the round's first baseline
    assert relayed.cpu_ratio_to_baseline == pytest.approx(0.9)  # the median of the rounds'
    events_ratios = [r.cpu_ratio_to_baseline for r in results["streamsvc-events"].rounds]
    assert events_ratios == pytest.approx([1.1, 2.5 / 2.5, 1.1])
    # The load, latencies and memory shown are those of the median round; the failures of all.
    assert relayed.failed_streams == 1 and relayed.load.failed in (0, 1)
    base = results["baseline"]
    assert len(base.rounds) == 9 and {r.round for r in base.rounds} == {1, 2, 3}
    assert all(r.cpu_ratio_to_baseline == pytest.approx(1.0) for r in base.rounds)
    assert base.cpu_us_per_token == pytest.approx(3.0)  # the median of its nine runs
    assert results["direct"].rounds == [] and results["direct"].cpu_ratio_to_baseline is None


def test_a_run_missing_one_of_its_baselines_is_held_to_the_other(
    quick_run: Any, tmp_path: Path,
) -> None:
    from rich.progress import Progress

    _, report, _ = quick_run
    load = _typed(report).paths[0].load
    options = BenchOptions(loop="asyncio", nginx=False, redis=False, endpoints=("openai",),
                           rounds=1, streams=load.streams, tokens=load.tokens)
    direct, baseline, openai = _main_paths(_Run(options, tmp_path, Progress()))
    tokens = load.streams * load.tokens
    measured = [_ran(direct, load, 0, None), _ran(baseline, load, 1, None),  # no CPU read
                _ran(openai, load, 1, 3.0 * tokens / 1e6), _ran(baseline, load, 1, 2.0 * tokens / 1e6)]
    (one,) = {r.name: r for r in _path_results(measured, options)}["streamsvc-openai"].rounds
    assert one.baseline_us_per_token == pytest.approx(2.0)
    assert one.cpu_ratio_to_baseline == pytest.approx(1.5)


def test_several_rounds_are_tabled_with_their_range_at_80_columns(quick_run: Any) -> None:
    from rich.console import Console

    _, report, _ = quick_run
    typed = _typed(report)
    paths: list[PathResult] = []
    for path in typed.paths:
        runs = []
        for one in path.rounds:  # the baseline's: one per streamsvc path, and one
            ttft = one.added_ttft_p99_ms or 0.0
            two = msgspec.structs.replace(one, round=2, cpu_ratio_to_baseline=(
                one.cpu_ratio_to_baseline or 1.0) * 1.25, added_ttft_p99_ms=ttft + 100)
            three = msgspec.structs.replace(one, round=3, added_ttft_p99_ms=ttft + 1)
            runs += [one, two, three]
        paths.append(msgspec.structs.replace(path, rounds=runs))
    typed = msgspec.structs.replace(typed, paths=paths)
    typed = msgspec.structs.replace(typed, targets=evaluate_targets(typed))
    titles = [title for title, _, _ in tables(typed) if "3 rounds" in title]
    assert len(titles) == len(RELAY_LOOPS)
    _, header, rows = next(t for t in tables(typed) if "3 rounds" in t[0])
    assert header[1:4] == ["round 1", "round 2", "round 3"]
    assert rows[0][0] == "baseline" and all(len(row) == len(header) for row in rows)
    console = Console(width=80, record=True, file=io.StringIO())
    print_report(typed, console)
    text = console.export_text()
    assert max(len(line.rstrip()) for line in text[:text.index("\npaths: ")].splitlines()) <= 80
    assert "median of 3" in "\n".join(notes(typed))
    # The added TTFT p99 judged is the median round's, not one outlier's (+100 ms here).
    targets = {t.name: t for t in typed.targets}
    for path in typed.paths:
        if path.relay == "streamsvc" and path.journal == "memory":
            target = targets[f"added_ttft_p99_{path.name.removeprefix('streamsvc-')}"]
            assert target.value == pytest.approx((path.rounds[0].added_ttft_p99_ms or 0) + 1)


def test_a_report_from_before_rounds_loads(quick_run: Any) -> None:
    _, report, _ = quick_run
    old = json.loads(json.dumps(report))
    del old["settings"]["rounds"]
    for path in old["paths"]:
        del path["rounds"]
    typed = _typed(old)
    assert typed.settings.rounds == 1 and all(p.rounds == [] for p in typed.paths)
    assert sum(p.failed_streams for p in typed.paths) == 0
    assert tables(typed)  # no rounds table, and no crash for want of one


def test_bench_in_rounds_measures_each_round_in_processes_of_its_own(tmp_path: Path) -> None:
    env = cli_env()
    result = subprocess.run(
        [sys.executable, "-m", "streamsvc", "bench", "--quick", "--rounds", "2", "--loop",
         "asyncio", "--endpoints", "openai", "--no-nginx", "--no-redis", "--slow-streams", "0",
         "--json", "out.json", "--keep-logs", "logs"],
        capture_output=True, text=True, timeout=100, cwd=tmp_path, env=env, check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads((tmp_path / "out.json").read_text(encoding="utf-8"))
    assert report["settings"]["rounds"] == 2
    paths = {path["name"]: path for path in report["paths"]}
    assert list(paths) == ["direct", "baseline", "streamsvc-openai"]
    # Each round: the baseline, streamsvc, the baseline again.
    assert [r["round"] for r in paths["baseline"]["rounds"]] == [1, 1, 2, 2]
    assert [r["round"] for r in paths["streamsvc-openai"]["rounds"]] == [1, 2]
    for name in ("baseline", "streamsvc-openai"):
        rounds = paths[name]["rounds"]
        assert all(positive(r["cpu_us_per_token"]) and r["completed"] == 10 for r in rounds)
    for one in paths["streamsvc-openai"]["rounds"]:
        number = one["round"]
        either_side = [r["cpu_us_per_token"] for r in paths["baseline"]["rounds"]
                       if r["round"] == number]
        assert one["baseline_us_per_token"] == pytest.approx(sum(either_side) / 2)
    # Six relay processes (three per round) and a load client's results for each run.
    logs = tmp_path / "logs"
    for relay, count in (("baseline", 4), ("streamsvc", 2)):  # a relay's log is ROLE-PORT.log
        assert len([p for p in logs.glob(f"{relay}-*.log") if p.stem[len(relay) + 1:].isdigit()
                    ]) == count, relay
    assert {p.name for p in logs.glob("*.load.json")} == {
        "direct.load.json", "baseline-r1.load.json", "baseline-r1-2.load.json",
        "baseline-r2.load.json", "baseline-r2-2.load.json",
        "streamsvc-openai-r1.load.json", "streamsvc-openai-r2.load.json"}
    assert "2 rounds in alternating order" in " ".join(result.stdout.split())


# -- streamsvc bench --paired: each streamsvc path at the same time as a baseline of its own -----


@pytest.fixture(scope="module")
def paired_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[
    subprocess.CompletedProcess[str], dict[str, Any]
]:
    """One small paired run: two endpoints on one loop, two reps each."""
    tmp = tmp_path_factory.mktemp("paired")
    env = cli_env(own_width=True)
    result = subprocess.run(
        [sys.executable, "-m", "streamsvc", "bench", "--paired", "-k", "10", "-n", "20", "-r",
         "100", "--ramp", "0.2", "--endpoints", "openai,streams", "--loop", "asyncio",
         "--rounds", "2", "--json", "out.json"],
        capture_output=True, text=True, timeout=100, cwd=tmp, env=env, check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result, json.loads((tmp / "out.json").read_text(encoding="utf-8"))


def test_bench_paired_runs_each_path_beside_its_own_baseline(paired_run: Any) -> None:
    _, report = paired_run
    paired = report["paired"]
    scenario = paired["scenario"]
    assert (scenario["streams"], scenario["streams_per_side"], scenario["reps"]) == (10, 5, 2)
    assert report["command"][:3] == ["streamsvc", "bench", "--paired"]
    (loop,) = paired["loops"]
    assert loop["loop"] == "asyncio"
    assert [path["name"] for path in loop["paths"]] == ["streamsvc-openai", "streamsvc-streams"]
    for path in loop["paths"]:
        reps = path["reps"]
        assert [rep["rep"] for rep in reps] == [1, 2]
        # The start order alternates, and so does which simulator each side relays.
        assert [rep["first"] for rep in reps] == ["baseline", "streamsvc"]
        one, two = reps
        assert one["baseline"]["simulator_port"] == two["path"]["simulator_port"]
        assert one["path"]["simulator_port"] == two["baseline"]["simulator_port"]
        assert one["baseline"]["simulator_port"] != one["path"]["simulator_port"]
        for rep in reps:
            assert rep["failed"] == 0
            for side, relay in ((rep["baseline"], "baseline"), (rep["path"], "streamsvc")):
                assert side["relay"] == relay and side["event_loop"] == "asyncio"
                assert side["completed"] == 5 and side["failed"] == 0 and side["errors"] == {}
                assert positive(side["cpu_s"]) and positive(side["cpu_us_per_token"])
                assert side["cpu_us_per_token"] == pytest.approx(side["cpu_s"] / (5 * 20) * 1e6)
            assert rep["ratio"] == pytest.approx(
                rep["path"]["cpu_us_per_token"] / rep["baseline"]["cpu_us_per_token"])
        ratios = [rep["ratio"] for rep in reps]
        assert path["median_ratio"] == pytest.approx(statistics.median(ratios))
        assert (path["min_ratio"], path["max_ratio"]) == (min(ratios), max(ratios))
    assert paired["failed_streams"] == 0
    targets = {t["name"]: t for t in paired["targets"]}
    assert {name: t["limit"] for name, t in targets.items()} == {
        "paired_cpu_ratio_openai": 1.0, "paired_cpu_ratio_streams": 1.2}
    for target, path in zip(targets.values(), loop["paths"], strict=True):
        assert target["value"] == path["median_ratio"]
        assert target["met"] == (target["value"] <= target["limit"])
    msgspec.json.decode(json.dumps(report), type=PairedReport)


def test_bench_paired_says_its_scenario_in_tables_of_80_columns(paired_run: Any) -> None:
    result, report = paired_run
    out = result.stdout
    assert max(len(line.rstrip()) for line in out.splitlines()) <= 80
    assert "…" not in out
    said = " ".join(out.split())
    assert "relays on asyncio: 5 + 5 streams x 20 tokens at 100 tokens/s" in said
    assert "each side carried half of -k 10" in said
    assert "targets, paired" in said
    for target in report["paired"]["targets"]:
        assert target["description"] in out and target["description"].startswith("paired ")
    rows = [line.split() for line in out.splitlines() if line.startswith((" openai", " streams"))]
    assert [(row[0], row[1], row[2]) for row in rows] == [
        ("openai", "1", "baseline"), ("openai", "2", "streamsvc"),
        ("streams", "1", "baseline"), ("streams", "2", "streamsvc")]


def test_bench_paired_flags_a_rep_with_failed_streams(paired_run: Any) -> None:
    from rich.console import Console

    _, report = paired_run
    failing = json.loads(json.dumps(report))
    rep = failing["paired"]["loops"][0]["paths"][1]["reps"][0]
    rep["path"].update(completed=3, failed=2, errors={"truncated": 2})
    rep["failed"] = 2
    failing["paired"]["failed_streams"] = 2
    typed = msgspec.json.decode(json.dumps(failing), type=PairedReport).paired
    console = Console(width=80, record=True, file=io.StringIO())
    print_paired(typed, console)
    text = console.export_text()
    (row,) = [line for line in text.splitlines() if line.startswith(" streams     1 ")]
    assert row.split()[5].endswith("!")
    said = " ".join(text.split())
    assert ("! streamsvc-streams on asyncio, rep 1: 2 streams failed on the streamsvc side"
            " (truncated: 2)") in said
    assert "2 streams failed" in said


@pytest.mark.parametrize("flags", [
    ("--faults", "http://127.0.0.1:9"), ("--quick",), ("--plot", "x.png"),
    ("--markdown", "x.md"), ("--slow-streams", "0"),
], ids=("faults", "quick", "plot", "markdown", "slow-streams"))
def test_bench_paired_refuses_what_it_cannot_combine_with(
    flags: tuple[str, ...], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
) -> None:
    from streamsvc.bench import paired
    from streamsvc.cli import main

    def ran(*_: Any, **__: Any) -> int:
        raise AssertionError("a refused combination ran")

    monkeypatch.setattr(paired, "run_paired", ran)
    assert main(["bench", "--paired", *flags]) == 2
    err = capsys.readouterr().err
    assert f"--paired cannot be combined with {flags[0]}:" in err


def test_bench_paired_halves_k_and_takes_what_it_measures(
    capsys: pytest.CaptureFixture[str],
) -> None:
    from streamsvc.cli import main

    options = _bench_options("--paired")
    assert options.paired and options.streams == 200 and options.side_streams == 100
    assert options.rounds == 2 and options.endpoints == ENDPOINTS
    # nginx and Redis it leaves out anyway: saying so is not an error.
    options = _bench_options("--paired", "--no-nginx", "--no-redis", "-k", "11", "--loop",
                             "asyncio", "--rounds", "3", "--endpoints", "responses")
    assert (options.side_streams, options.rounds, options.endpoints) == (5, 3, ("responses",))
    assert main(["bench", "--paired", "-k", "1"]) == 2
    assert "--paired: --streams must be at least 2" in capsys.readouterr().err


# -- streamsvc bench --faults: the campaign against any relay URL ---------------------------------


def _start(args: list[str], env: dict[str, str]) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "streamsvc", *args], env=env, text=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _wait_answers(url: str, process: subprocess.Popen[str]) -> None:
    deadline = time.monotonic() + 30
    while True:
        assert process.poll() is None, "exited before answering"
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            assert time.monotonic() < deadline, f"no answer at {url}"
            time.sleep(0.1)


def test_bench_faults_holds_a_relay_to_the_campaign_and_fails_one_that_is_not_a_relay() -> None:
    env = cli_env()
    relay_env = {**env, "STREAMSVC__PIPELINE__IDLE_TIMEOUT_S": "0.5",
                 "STREAMSVC__PIPELINE__FIRST_TOKEN_TIMEOUT_S": "3",
                 "STREAMSVC__PIPELINE__RETRY_BACKOFF_MAX_MS": "20"}
    sim_port, relay_port = free_port(), free_port()
    sim = f"http://127.0.0.1:{sim_port}"
    relay = f"http://127.0.0.1:{relay_port}"
    processes = [_start(["simulate", "--port", str(sim_port)], env),
                 _start(["serve", "--port", str(relay_port), "--upstream", sim + "/v1"],
                        relay_env)]
    try:
        _wait_answers(sim + "/v1/models", processes[0])
        _wait_answers(relay + "/healthz", processes[1])
        good = subprocess.run(
            [sys.executable, "-m", "streamsvc", "bench", "--faults", relay, "--upstream-stats",
             sim, "--streams", "80", "--seed", "5", "--deadline", "30"],
            capture_output=True, text=True, timeout=120, env=env, check=False)
        # The simulator itself, as if it were a gateway: faults reach the client as they are.
        raw = subprocess.run(
            [sys.executable, "-m", "streamsvc", "bench", "--faults", sim, "--fault-endpoints",
             "openai", "--streams", "60", "--seed", "5", "--deadline", "2"],
            capture_output=True, text=True, timeout=120, env=env, check=False)
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            process.wait(timeout=30)
    assert good.returncode == 0, good.stdout + good.stderr
    assert "fault campaign: 80 streams, seed 5" in good.stdout
    assert "bad outcomes: 0" in good.stdout and "not checked" not in good.stdout
    assert raw.returncode == 1, raw.stdout + raw.stderr
    assert "(upstream requests not checked)" in raw.stdout
    bad = {line.split()[0]: int(line.split()[-2]) for line in raw.stdout.splitlines()
           if line.endswith(" bad")}
    assert bad["bad_error"] > 0 and bad["lost"] + bad["silent_cut"] + bad["hang"] > 0, raw.stdout


def _installed(package: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


# -- the harness runs without the garbage collector's pauses -------------------------------------


def test_the_harness_processes_run_without_the_garbage_collector(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A collection in the simulator or the load client stops every stream of that process,
    and shows as latency on the direct path and on every relay alike (bench/collector.py):
    the bench's simulator and the load client run with the collector off, then put it back."""
    import gc

    from streamsvc.bench import load, simulator
    from streamsvc.bench.collector import collector_off
    from streamsvc.bench.relays import simulator_service

    with collector_off():
        assert not gc.isenabled()
    assert gc.isenabled()
    gc.disable()
    try:
        with collector_off():  # a collector that was off stays off
            assert not gc.isenabled()
        assert not gc.isenabled()
    finally:
        gc.enable()

    seen: dict[str, bool] = {}

    def fake_cli(argv: list[str]) -> int:
        seen["simulator"] = gc.isenabled()
        assert argv == ["simulate", "--port", "9"]
        return 0

    class Seen(Exception):
        pass

    async def fake_load(spec: LoadSpec) -> None:
        seen["load"] = gc.isenabled()
        raise Seen

    monkeypatch.setattr(simulator, "cli_main", fake_cli)
    monkeypatch.setattr(load, "run_load", fake_load)
    assert simulator.main(["--port", "9"]) == 0
    with pytest.raises(Seen):
        load.main(["--url", "http://127.0.0.1:9", "--out", "unused.json"])
    assert seen == {"simulator": False, "load": False}
    assert gc.isenabled()
    service = simulator_service(Path("."))
    assert service.command[1:3] == ["-m", "streamsvc.bench.simulator"]
