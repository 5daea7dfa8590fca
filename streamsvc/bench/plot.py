"""The PNG of a run: latency distributions per path and CPU per token, side by side.

Needs the ``plot`` extra (matplotlib); importing this module without it
raises ImportError, which ``streamsvc bench --plot`` reports and skips.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display

import matplotlib.pyplot as plt
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, LogFormatter

from streamsvc.bench.results import BenchReport, OpenStreamsResult, PathResult

__all__ = ["figure", "write_plot"]

TAIL_FLOOR = 1e-4  # the complementary CDF is drawn down to the 99.99th percentile


def _ccdf(points: list[tuple[float, float]]) -> tuple[list[float], list[float]]:
    xs = [max(ms, 1e-3) for ms, _ in points]
    ys = [max(1.0 - level, TAIL_FLOOR) for _, level in points]
    return xs, ys


def write_plot(report: BenchReport, path: Path) -> None:
    """Write :func:`figure` of ``report`` to ``path`` (a PNG)."""
    fig = figure(report)
    try:
        fig.savefig(path, dpi=110, bbox_inches="tight")
    finally:
        plt.close(fig)


def figure(report: BenchReport) -> Figure:
    """Inter-token gap tail (the open-streams paths dashed) and time to first token side by
    side, one legend for both on their right, CPU µs per token per relay under them as
    labelled bars. The caller closes it (``plt.close``)."""
    s = report.settings
    relays = [p for p in report.paths if p.cpu_us_per_token is not None]
    fig = plt.figure(figsize=(17, 8 + 0.3 * len(relays)), layout="constrained")
    grid = fig.add_gridspec(2, 2, height_ratios=[1.0, 0.25 + 0.05 * len(relays)])
    gaps, ttft, cpu = (fig.add_subplot(grid[0, 0]), fig.add_subplot(grid[0, 1]),
                       fig.add_subplot(grid[1, :]))
    fig.suptitle(
        f"streamsvc bench: {s.streams} streams x {s.tokens} tokens at {s.rate:g} tokens/s"
        f" ({report.machine.get('cpus')} CPUs, {report.date[:10]})"
    )
    tagged = len(s.relay_loops) > 1
    for axes in (gaps, ttft):  # 20 colours: a path per colour up to 20 paths
        axes.set_prop_cycle(color=[plt.get_cmap("tab20")(i) for i in range(20)])

    def label(path: PathResult | OpenStreamsResult) -> str:
        return f"{path.label}, {path.relay_loop}" if tagged and path.relay_loop else path.label

    for p in report.paths:
        xs, ys = _ccdf(p.load.gap_cdf)
        gaps.step(xs, ys, where="post", label=label(p))
        ttft.step([max(ms, 1e-3) for ms, _ in p.load.ttft_cdf],
                  [level for _, level in p.load.ttft_cdf], where="post", label=label(p))
    for o in report.open_streams:
        xs, ys = _ccdf(o.load.gap_cdf)
        gaps.step(xs, ys, where="post", linestyle="--",
                  label=f"{label(o)}, {o.load.streams} open at {o.load.rate:g}/s")
    plain = FuncFormatter(lambda value, _: f"{value:g}")
    for axes in (gaps, ttft):
        axes.set_xscale("log")
        axes.xaxis.set_major_formatter(plain)
        # Labels minor ticks only when the axis spans few decades, as plain numbers.
        axes.xaxis.set_minor_formatter(LogFormatter(labelOnlyBase=False))
        axes.tick_params(axis="x", which="minor", labelsize=7)
    gaps.set_xlim(left=1.0)  # shorter gaps (a burst after a stall) are never the tail
    gaps.set(yscale="log", xlabel="inter-token gap (ms)",
             ylabel="fraction of gaps longer", title="inter-token gap, tail")
    gaps.grid(True, which="both", alpha=0.3)
    ttft.set(xlabel="time to first token (ms)", ylabel="fraction of streams",
             title="time to first token")
    ttft.grid(True, which="both", alpha=0.3)
    # The gap panel draws every path the other does, and the open-streams ones too.
    fig.legend(*gaps.get_legend_handles_labels(), loc="outside right upper", fontsize=8)

    names = [p.name for p in relays]
    values = [p.cpu_us_per_token or 0.0 for p in relays]
    redis = [p.redis_cpu_us_per_token or 0.0 for p in relays]
    rows = range(len(values))
    cpu.barh(rows, values, color="tab:blue", label="relay process")
    if any(redis):
        cpu.barh(rows, redis, left=values, color="tab:orange",
                 label="redis-server (Redis journal)")
        cpu.legend(fontsize=8, loc="lower right")
    for y, p in enumerate(relays):
        ratio = f", {p.cpu_ratio_to_baseline:.2f}x" if p.cpu_ratio_to_baseline else ""
        cpu.annotate(f" {p.cpu_us_per_token:.1f} µs{ratio}", (values[y] + redis[y], y),
                     ha="left", va="center", fontsize=8)
    cpu.set_yticks(rows, names, fontsize=8)
    cpu.invert_yaxis()  # in the order the tables list them
    cpu.set(xlabel="CPU µs per relayed token (x: ÷ the baseline)",
            title="relay CPU per token (lower is better)")
    cpu.margins(x=0.12)
    cpu.grid(True, axis="x", alpha=0.3)
    return fig
