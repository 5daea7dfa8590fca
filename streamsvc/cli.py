"""Command line: ``streamsvc serve | simulate | bench | config check``.

Exit status 2 for a bad config, flag or environment override, with a message
that names the file (or variable, or flag) and the key.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import errno
import logging
import os
import signal
import sys
from collections.abc import Sequence
from typing import Any

from pythonjsonlogger.json import JsonFormatter

from streamsvc import __version__
from streamsvc.bench.options import add_arguments as add_bench_arguments
from streamsvc.config import Config, LoadedConfig, LogConfig, load_config, read_config
from streamsvc.errors import ConfigError, ErrorCode, StreamsvcError
from streamsvc.eventloop import loop_factory, loop_name
from streamsvc.listen import LISTEN_BACKLOG

__all__ = ["main"]

EXIT_CONFIG = 2
EXIT_UNAVAILABLE = 69  # EX_UNAVAILABLE: a service it needs (Redis, its port) is not available

# Why a listening socket could not be had, in words (the rest: the OS's own text).
_LISTEN_ERRORS = {
    errno.EADDRINUSE: "the address is already in use (another process listens there)",
    errno.EADDRNOTAVAIL: "no network interface of this machine has that address",
    errno.EACCES: "permission denied (ports below 1024 need privileges)",
}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="streamsvc", description="Stream LLM answers to browsers and HTTP clients."
    )
    parser.add_argument("--version", action="version", version=f"streamsvc {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = commands.add_parser("serve", help="run the relay")
    serve.add_argument("--config", metavar="FILE",
                       help="TOML config (default: $STREAMSVC_CONFIG, else built-in defaults)")
    serve.add_argument("--host", help="listen address (server.host)")
    serve.add_argument("--port", type=int, help="listen port (server.port)")
    serve.add_argument("--upstream", metavar="URL",
                       help="relay every model to this OpenAI-compatible base URL")
    serve.add_argument("--upstream-key-env", metavar="VAR",
                       help="environment variable holding the --upstream key")

    simulate = commands.add_parser("simulate", help="run the OpenAI-compatible simulator")
    simulate.add_argument("--host", default="127.0.0.1",
                          help="listen address (default: %(default)s)")
    simulate.add_argument("--port", type=int, default=8081,
                          help="listen port (default: %(default)s)")
    simulate.add_argument("--config", metavar="FILE",
                          help="TOML config, for [server] event_loop only"
                               " (default: $STREAMSVC_CONFIG, else built-in defaults)")

    bench = commands.add_parser(
        "bench", help="measure the relay's cost against a bare aiohttp relay",
        description="Run the simulator, the relays and the load clients as separate processes"
                    " and report CPU per relayed token, added latency and memory per stream"
                    " (docs/performance.md).",
    )
    add_bench_arguments(bench)

    config = commands.add_parser("config", help="configuration tools")
    config_commands = config.add_subparsers(dest="config_command", required=True,
                                            metavar="ACTION")
    check = config_commands.add_parser(
        "check", help="validate a config file",
        description="Load FILE as `streamsvc serve --config FILE` would, with the STREAMSVC__*"
                    " environment overrides, and report every error in it.",
    )
    check.add_argument("file", metavar="FILE", help="the TOML config file to check")
    return parser


def _flag_overrides(args: argparse.Namespace) -> dict[str, Any]:
    overrides: dict[str, Any] = {}
    if args.host is not None:
        overrides["server.host"] = args.host
    if args.port is not None:
        overrides["server.port"] = args.port
    if args.upstream_key_env and not args.upstream:
        raise ConfigError("needs --upstream", source="command line", key="--upstream-key-env")
    if args.upstream:  # the flags win over STREAMSVC__UPSTREAMS__UPSTREAM__*
        overrides["upstreams.upstream.base_url"] = args.upstream
        if args.upstream_key_env:
            overrides["upstreams.upstream.api_key_env"] = args.upstream_key_env
    return overrides


def _flag_sections(args: argparse.Namespace) -> dict[str, Any]:
    """``--upstream``: one upstream, named "upstream", for every model, in place of the file's.

    The environment's overrides then apply to it like to any upstream of a file.
    """
    if not args.upstream:
        return {}
    return {"upstreams": {"upstream": {"base_url": args.upstream}},
            "routes": [{"model": "*", "upstreams": ["upstream"]}]}


def _serve(args: argparse.Namespace) -> int:
    from streamsvc.server.access_log import AccessLogger
    from streamsvc.server.app import create_app
    from streamsvc.server.runner import run_app

    config_path = args.config or os.environ.get("STREAMSVC_CONFIG") or None
    loaded = read_config(config_path, overrides=_flag_overrides(args),
                         sections=_flag_sections(args))
    config: Config = loaded.config
    configure_logging(config.log)
    log = logging.getLogger("streamsvc")
    log.info("config: %s%s",
             config_path or "no file, the built-in defaults (--config FILE to load one)",
             "".join(f"; {key} from {name}" for name, key in loaded.overrides))
    for warning in loaded.warnings:
        log.warning("config: %s", warning)
    loop = loop_factory(config.server.event_loop)()
    host, port = config.server.host, config.server.port
    try:
        run_app(
            create_app(config),
            loop=loop,
            host=host,
            port=port,
            handler_cancellation=True,
            backlog=LISTEN_BACKLOG,
            access_log_class=AccessLogger,
            shutdown_timeout=config.server.shutdown_timeout_s,
            print=lambda _: print(
                f"streamsvc listening on http://{host}:{port} (event loop: {loop_name(loop)})",
                flush=True,
            ),
        )
    except OSError as error:
        return _cannot_listen(error, host, port, "--port (or server.port)")
    return 0


def _cannot_listen(error: OSError, host: str, port: int, flag: str) -> int:
    """One line for a port that cannot be had (taken, no such address, privileged), no traceback.

    Any other OSError is not about listening: it is raised as it came.
    """
    reason = _LISTEN_ERRORS.get(error.errno or 0)
    if reason is None:
        raise error
    print(f"streamsvc: cannot listen on {host}:{port}: {reason}; choose another with {flag}",
          file=sys.stderr)
    return EXIT_UNAVAILABLE


def configure_logging(log: LogConfig) -> None:
    """``[log]``: the level, and text lines or one JSON object per line.

    JSON lines carry the message's fields (``request_id``, ``status``, ...)
    as keys; python-json-logger does the formatting.
    """
    handler = logging.StreamHandler()
    if log.format == "json":
        handler.setFormatter(JsonFormatter(
            "{asctime}{levelname}{name}{message}", style="{",
            rename_fields={"asctime": "time", "levelname": "level", "name": "logger"},
        ))
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=log.level.upper(), handlers=[handler], force=True)
    # Neither format shows where a line was logged from, nor the thread or process:
    # not gathering them saves a stack walk per record (the logging HOWTO's
    # "Optimization"), and an access line is written for every request.
    logging._srcfile = None  # the documented switch
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False


def _simulate(args: argparse.Namespace) -> int:
    from streamsvc.simulator import serve_simulator

    config = load_config(args.config or os.environ.get("STREAMSVC_CONFIG") or None)

    async def run() -> None:
        loop = asyncio.get_running_loop()
        print(f"event loop: {loop_name(loop)}", flush=True)
        task = asyncio.ensure_future(serve_simulator(args.host, args.port))
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, task.cancel)
        with contextlib.suppress(asyncio.CancelledError):
            await task

    with asyncio.Runner(loop_factory=loop_factory(config.server.event_loop)) as runner:
        try:
            runner.run(run())
        except OSError as error:
            return _cannot_listen(error, args.host, args.port, "--port")
    return 0


def _check(loaded: LoadedConfig) -> int:
    """``config check``: OK, the environment overrides it applied (never their values)."""
    print(f"{loaded.source}: OK")
    for name, key in loaded.overrides:
        print(f"  {key}: set by the environment variable {name}")
    if not loaded.overrides:
        print("  no environment overrides (STREAMSVC__SECTION__KEY variables)")
    for warning in loaded.warnings:
        print(f"streamsvc: warning: {warning}", file=sys.stderr)
    return 0


def _bench(args: argparse.Namespace, command: list[str]) -> int:
    from streamsvc.bench.options import options_from_args
    from streamsvc.bench.orchestrator import run_bench

    if args.faults and not args.paired:  # --paired refuses --faults, in options_from_args
        from streamsvc.bench.faults import run_from_args

        return run_from_args(args)
    try:
        options = options_from_args(args)
    except ValueError as error:
        print(f"streamsvc bench: {error}", file=sys.stderr)
        return EXIT_CONFIG
    if options.paired:
        from streamsvc.bench.paired import run_paired

        return run_paired(options, command=command)
    return run_bench(options, command=command)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``streamsvc`` command; returns the exit status."""
    args = _parser().parse_args(argv)
    try:
        if args.command == "serve":
            return _serve(args)
        if args.command == "simulate":
            return _simulate(args)
        if args.command == "bench":
            return _bench(args, ["streamsvc", *(sys.argv[1:] if argv is None else argv)])
        return _check(read_config(args.file))
    except ConfigError as error:
        for problem in error.problems:
            print(f"streamsvc: config error: {problem}", file=sys.stderr)
        return EXIT_CONFIG
    except StreamsvcError as error:
        if error.code is not ErrorCode.JOURNAL_UNAVAILABLE:
            raise
        print(f"streamsvc: cannot start: {error.message}", file=sys.stderr)
        return EXIT_UNAVAILABLE


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
