"""The flags of ``streamsvc bench`` and the scenario they make.

The defaults are the target scenario (docs/performance.md): 200 concurrent
streams of 200 tokens at 50 tokens/s, then 1,000 open streams at 20 tokens/s
for the memory figures, the relays on asyncio and on uvloop, the main phase in
two rounds (a machine's speed drifts: each round holds every streamsvc path to
the baseline runs just before and after it, and the run reports the median). ``--quick`` is a smoke
run of every path (what CI runs); explicit flags still win over it.

``--paired`` runs each streamsvc path at the same time as a baseline of its own
(docs/performance.md#paired-runs): the two sides carry half of ``-k`` each, and
the flags of what a paired run does not measure (the open-streams phase, nginx
and Redis, the plot, ``--faults``) are refused rather than ignored.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, replace
from typing import Literal, TypeGuard

from streamsvc.eventloop import uvloop_available

__all__ = [
    "DEFAULT",
    "ENDPOINTS",
    "LOOP_CHOICES",
    "OPEN_ENDPOINTS",
    "PAIRED_REFUSES",
    "QUICK",
    "BenchOptions",
    "RelayLoop",
    "add_arguments",
    "options_from_args",
]

Endpoint = Literal["openai", "events", "streams", "responses"]
ENDPOINTS: dict[str, str] = {
    "openai": "/v1/chat/completions",  # the OpenAI wire format, byte-comparable to the baseline
    "events": "/v1/chat/stream",  # the streamsvc event format
    # POST creates the stream, then its events_url (GET /v1/streams/{id}/events) is read:
    # the journal endpoint.
    "streams": "/v1/streams",
    "responses": "/v1/responses",  # the OpenAI Responses API's events (journaled)
}
OPEN_ENDPOINTS: tuple[Endpoint, ...] = ("openai", "events")
"""The endpoints the 1,000-open-streams targets are set on (issue 15)."""
RelayLoop = Literal["auto", "asyncio", "uvloop"]
LoopChoice = Literal["auto", "asyncio", "uvloop", "both"]
LOOP_CHOICES: tuple[LoopChoice, ...] = ("both", "auto", "asyncio", "uvloop")


@dataclass(frozen=True, kw_only=True, slots=True)
class BenchOptions:
    """One benchmark run; see ``streamsvc bench --help``."""

    streams: int = 200  # K
    tokens: int = 200  # N
    rate: float = 50.0  # R, tokens/s per stream
    ramp_s: float = 1.0  # stream starts are spread over this long (random, seeded)
    slow_streams: int = 1000  # M; 0 skips the open-streams phase
    slow_rate: float = 20.0
    slow_tokens: int = 240  # 12 s at 20 tokens/s: a plateau of 8 s after the ramp
    slow_ramp_s: float = 4.0  # 250 connections/s: a burst of 1,000 would measure accept queues
    endpoints: tuple[Endpoint, ...] = ("openai", "events", "streams")
    loop: LoopChoice = "both"  # of the relays under test; "both": every relay path once per loop
    rounds: int = 2  # of the main phase's relay paths per loop, in alternating order
    model: str = "sim-small"
    nginx: bool = True  # include nginx when the binary is installed
    redis: bool = True  # include the Redis journal when redis-server is installed
    quick: bool = False
    paired: bool = False  # each streamsvc path beside a baseline of its own, at the same time
    json_path: str | None = None
    plot_path: str | None = None
    markdown_path: str | None = None
    keep_logs: str | None = None  # a folder to keep the processes' logs in

    def __post_init__(self) -> None:
        for name in ("streams", "tokens", "slow_tokens", "rounds"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be at least 1")
        if self.slow_streams < 0:
            raise ValueError("--slow-streams must be 0 or more")
        if self.rate <= 0 or self.slow_rate <= 0:
            raise ValueError("--rate and --slow-rate must be more than 0")
        if self.ramp_s < 0 or self.slow_ramp_s < 0:
            raise ValueError("--ramp and --slow-ramp must be 0 or more")
        if self.loop == "uvloop" and not uvloop_available():
            raise ValueError("--loop uvloop: uvloop is not installed"
                             " (pip install 'streamsvc[fast]')")
        if not self.endpoints:
            raise ValueError("--endpoints must name at least one of: " + ", ".join(ENDPOINTS))
        if self.paired and self.streams < 2:
            raise ValueError("--paired: --streams must be at least 2 (each side carries half)")

    @property
    def side_streams(self) -> int:
        """The streams of each side of a paired run: half of K (rounded down)."""
        return self.streams // 2

    @property
    def relay_loops(self) -> tuple[RelayLoop, ...]:
        """The loops the relay paths run on, in order; ``both`` without uvloop: asyncio only."""
        if self.loop != "both":
            return (self.loop,)
        return ("uvloop", "asyncio") if uvloop_available() else ("asyncio",)

    @property
    def open_endpoints(self) -> tuple[Endpoint, ...]:
        """streamsvc's endpoints in the open-streams phase: those of ``OPEN_ENDPOINTS`` that
        ``--endpoints`` names, in its order; its first when it names neither."""
        return tuple(e for e in self.endpoints if e in OPEN_ENDPOINTS) or self.endpoints[:1]


DEFAULT = BenchOptions()
QUICK = BenchOptions(
    streams=10, tokens=20, rate=100.0, ramp_s=0.2, slow_streams=50, slow_rate=20.0,
    slow_tokens=20, slow_ramp_s=0.2, rounds=1, quick=True,
)
PAIRED_REFUSES: dict[str, str] = {
    "quick": "--quick",
    "slow_streams": "--slow-streams",
    "slow_rate": "--slow-rate",
    "slow_tokens": "--slow-tokens",
    "slow_ramp_s": "--slow-ramp",
    "plot_path": "--plot",
    "markdown_path": "--markdown",
    "faults": "--faults",
    "upstream_stats": "--upstream-stats",
}
"""The flags ``--paired`` refuses (by their ``argparse`` dest): it measures none of what
they are for. ``--no-nginx`` and ``--no-redis`` it takes: it leaves both out anyway."""


def _is_endpoint(name: str) -> TypeGuard[Endpoint]:
    return name in ENDPOINTS


def _endpoints(text: str) -> tuple[Endpoint, ...]:
    chosen: list[Endpoint] = []
    for name in (part.strip() for part in text.split(",") if part.strip()):
        if not _is_endpoint(name):
            raise argparse.ArgumentTypeError(
                f"unknown endpoint {name!r}; choose from {', '.join(ENDPOINTS)}"
            )
        chosen.append(name)
    return tuple(chosen)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``bench`` flags to ``parser`` (defaults None: the preset decides)."""
    d = DEFAULT
    parser.add_argument("--quick", action="store_true",
                        help=f"a smoke run of every path: K={QUICK.streams},"
                             f" N={QUICK.tokens}, R={QUICK.rate:g}, M={QUICK.slow_streams}")
    parser.add_argument("-k", "--streams", type=int, metavar="K",
                        help=f"concurrent streams per path (default {d.streams}; with"
                             " --paired: in all, half on each side)")
    parser.add_argument("-n", "--tokens", type=int, metavar="N",
                        help=f"tokens per stream (default {d.tokens})")
    parser.add_argument("-r", "--rate", type=float, metavar="R",
                        help=f"tokens per second per stream (default {d.rate:g})")
    parser.add_argument("--ramp", type=float, metavar="S", dest="ramp_s",
                        help=f"spread stream starts over S seconds (default {d.ramp_s:g})")
    parser.add_argument("-m", "--slow-streams", type=int, metavar="M",
                        help=f"open streams for the memory phase; 0 skips it"
                             f" (default {d.slow_streams})")
    parser.add_argument("--slow-rate", type=float, metavar="R",
                        help=f"tokens per second in the memory phase (default {d.slow_rate:g})")
    parser.add_argument("--slow-tokens", type=int, metavar="N",
                        help=f"tokens per stream in the memory phase (default {d.slow_tokens})")
    parser.add_argument("--slow-ramp", type=float, metavar="S", dest="slow_ramp_s",
                        help=f"spread the memory phase's starts over S seconds"
                             f" (default {d.slow_ramp_s:g})")
    parser.add_argument("--endpoints", type=_endpoints, metavar="LIST",
                        help="streamsvc endpoints to measure, comma-separated: openai"
                             " (POST /v1/chat/completions), events (POST /v1/chat/stream),"
                             " streams (POST /v1/streams, then GET its events_url),"
                             " responses (POST /v1/responses)"
                             f" (default {','.join(d.endpoints)})")
    parser.add_argument("--loop", choices=LOOP_CHOICES,
                        help="event loop of the relays under test (streamsvc and the"
                             " baseline): both (default: every relay path on uvloop, then on"
                             " asyncio; asyncio alone without uvloop), auto (uvloop when"
                             " installed), asyncio, uvloop")
    parser.add_argument("--rounds", type=int, metavar="N",
                        help="rounds of the main phase per relay loop: each measures"
                             " every streamsvc path once, in the reverse order of the round"
                             " before, with the baseline before, between and after them, and"
                             " holds each path to the mean of the baseline runs just before"
                             " and after it; the ratio reported is the median of the rounds'"
                             f" (default {d.rounds}; --quick {QUICK.rounds}); with --paired:"
                             " the reps of each path")
    parser.add_argument("--paired", action="store_true", default=None,
                        help="CPU only: run each streamsvc path at the same time as a"
                             " baseline of its own (each side with its own simulator and"
                             " load client), so that the machine's drift hits both alike;"
                             f" each side carries half of -k (by default {d.side_streams} +"
                             f" {d.side_streams} streams x {d.tokens} tokens at {d.rate:g}"
                             " tokens/s), --rounds reps per"
                             " path and loop, each rep in the other start order; with"
                             " --endpoints, --loop, --rounds, -k/-n/-r, --ramp, --model, --json,"
                             " --keep-logs (docs/performance.md#paired-runs)")
    parser.add_argument("--model", help=f"simulator model (default {d.model})")
    parser.add_argument("--no-nginx", action="store_false", dest="nginx", default=None,
                        help="leave nginx out even when it is installed")
    parser.add_argument("--no-redis", action="store_false", dest="redis", default=None,
                        help="leave the Redis journal paths (streamsvc-redis, streamsvc-remote) out"
                             " even when redis-server is installed")
    parser.add_argument("--json", metavar="FILE", dest="json_path",
                        help="write every figure, the machine and the command to FILE")
    parser.add_argument("--plot", metavar="FILE.png", dest="plot_path",
                        help="write the latency distributions and CPU per token"
                             " (needs the plot extra: pip install 'streamsvc[plot]')")
    parser.add_argument("--markdown", metavar="FILE", dest="markdown_path",
                        help="write the tables as Markdown (for docs/performance.md)")
    parser.add_argument("--keep-logs", metavar="DIR",
                        help="keep the processes' logs in DIR (default: a temporary folder)")
    faults = parser.add_argument_group(
        "fault campaign", "streamsvc bench --faults URL: seeded faulted streams through the"
        " relay at URL (its model must go to a streamsvc simulator), each outcome classified"
        " (docs/performance.md#the-fault-campaign); exit status 1 on a bad outcome")
    faults.add_argument("--faults", metavar="URL",
                        help="run the fault campaign against the relay at URL instead of the"
                             " benchmark; --streams is the number of streams (default 300)")
    faults.add_argument("--upstream-stats", metavar="URL",
                        help="the simulator the relay sends the model to, to count each"
                             " stream's upstream requests (default: not counted)")
    faults.add_argument("--seed", type=int, default=1, help="the campaign's seed (default 1)")
    faults.add_argument("--concurrency", type=int, default=32,
                        help="streams at once (default 32)")
    faults.add_argument("--deadline", type=float, default=120.0, metavar="S",
                        help="a stream not ended within S seconds is a hang (default 120;"
                             " above the relay's idle and first-token timeouts)")
    faults.add_argument("--any-error-code", action="store_true",
                        help="take any OpenAI-shaped error as typed, not only streamsvc's"
                             " closed set of codes (for another gateway)")
    faults.add_argument("--fault-endpoints", metavar="LIST", default="openai,direct,resumable,"
                        "oneshot", help="openai (POST /v1/chat/completions), direct (POST"
                        " /v1/chat/stream), resumable (POST /v1/streams), oneshot (GET"
                        " /v1/chat/stream); openai alone for another gateway (default all)")


def options_from_args(args: argparse.Namespace) -> BenchOptions:
    """The preset (``--quick`` or the defaults) with the flags given on top.

    Raises:
        ValueError: a flag out of range, or one ``--paired`` cannot be combined with;
            naming the flag.
    """
    if args.paired:
        # Given: not None (the preset decides) nor False (--quick's default); 0 is given.
        refused = [flag for dest, flag in PAIRED_REFUSES.items()
                   if getattr(args, dest, None) is not None
                   and getattr(args, dest) is not False]
        if refused:
            raise ValueError(f"--paired cannot be combined with {', '.join(refused)}: a paired"
                             " run measures each streamsvc path's CPU per token beside its own"
                             " baseline, nothing else")
    preset = QUICK if args.quick else DEFAULT
    fields = ("streams", "tokens", "rate", "ramp_s", "slow_streams", "slow_rate",
              "slow_tokens", "slow_ramp_s", "endpoints", "loop", "rounds", "model", "nginx",
              "redis", "paired", "json_path", "plot_path", "markdown_path", "keep_logs")
    given = {name: getattr(args, name) for name in fields if getattr(args, name) is not None}
    return replace(preset, **given)
