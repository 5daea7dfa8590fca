"""The ``streamsvc`` command: config check, exit status 2 on bad config, serve and stop."""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

import streamsvc as streamsvc_package
from streamsvc.cli import EXIT_CONFIG, EXIT_UNAVAILABLE, _parser, main
from streamsvc.sse import SSEDecoder
from tests.conftest import free_port

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_TOML = ROOT / "config" / "streamsvc.toml"


def clean_env(**extra: str) -> dict[str, str]:
    """The test's environment without streamsvc settings, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("STREAMSVC")}
    env["PYTHONPATH"] = str(ROOT)
    env.update(extra)
    return env


def streamsvc(*args: str, env: dict[str, str] | None = None, cwd: Path | None = None,
              timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "streamsvc", *args],
        capture_output=True, text=True, timeout=timeout, env=env or clean_env(), cwd=cwd, check=False,
    )


@pytest.fixture
def bad_toml(tmp_path: Path) -> Path:
    path = tmp_path / "bad.toml"
    path.write_text("[server]\nportt = 8080\n", encoding="utf-8")
    return path


# -- config check ------------------------------------------------------------------------------


NO_OVERRIDES = "  no environment overrides (STREAMSVC__SECTION__KEY variables)\n"


def test_config_check_ok(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
                         ) -> None:
    for name in os.environ:
        if name.startswith("STREAMSVC"):
            monkeypatch.delenv(name)
    assert main(["config", "check", str(DEFAULT_TOML)]) == 0
    out, err = capsys.readouterr()
    assert out == f"{DEFAULT_TOML}: OK\n{NO_OVERRIDES}" and err == ""


def test_config_check_reports_every_mistake_at_once(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "my.toml"
    path.write_text('[server]\nprot = 8080\n[log]\nlevel = "loud"\n[journal]\nmax_events = 0\n',
                    encoding="utf-8")
    assert main(["config", "check", str(path)]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.splitlines() == [
        f"streamsvc: config error: {path}: server.prot: unknown key; did you mean 'port'?",
        f"streamsvc: config error: {path}: log.level: expected one of 'debug', 'info',"
        " 'warning', 'error', got 'loud'",
        f"streamsvc: config error: {path}: journal.max_events: Expected `int` >= 1, got 0",
    ]


def test_config_check_says_which_overrides_it_applied_and_warns_of_strays(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in os.environ:
        if name.startswith("STREAMSVC"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("STREAMSVC__SERVER__PORT", "9000")
    monkeypatch.setenv("STREAMSVC__UPSTREAMS__SIMULATOR__HEADERS", '{a = "secret"}')
    monkeypatch.setenv("STREAMSVC_SERVER_HOST", "0.0.0.0")
    assert main(["config", "check", str(DEFAULT_TOML)]) == 0
    out, err = capsys.readouterr()
    assert out == (
        f"{DEFAULT_TOML}: OK\n"
        "  server.port: set by the environment variable STREAMSVC__SERVER__PORT\n"
        "  upstreams.simulator.headers: set by the environment variable"
        " STREAMSVC__UPSTREAMS__SIMULATOR__HEADERS\n"
    )
    assert "secret" not in out + err  # values are never shown
    assert err == (
        "streamsvc: warning: environment STREAMSVC_SERVER_HOST: ignored: overrides are"
        " STREAMSVC__SECTION__KEY (double underscores), and the config names no variable"
        " STREAMSVC_SERVER_HOST; did you mean STREAMSVC__SERVER__HOST (sets server.host)?\n"
    )


def test_config_check_bad_key_exits_2_naming_file_and_key(
    bad_toml: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["config", "check", str(bad_toml)]) == EXIT_CONFIG == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert str(bad_toml) in err and "server.portt" in err and "unknown key" in err


def test_config_check_missing_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "nope.toml"
    assert main(["config", "check", str(missing)]) == 2
    assert str(missing) in capsys.readouterr().err


def test_config_check_as_a_command(bad_toml: Path) -> None:
    good = streamsvc("config", "check", str(DEFAULT_TOML))
    assert (good.returncode, good.stdout) == (0, f"{DEFAULT_TOML}: OK\n{NO_OVERRIDES}")
    bad = streamsvc("config", "check", str(bad_toml))
    assert bad.returncode == 2
    assert str(bad_toml) in bad.stderr and "server.portt" in bad.stderr
    assert "Traceback" not in bad.stderr


def test_usage_errors_exit_2_from_argparse(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as caught:
        main(["frobnicate"])
    assert caught.value.code == 2


def test_version_prints_the_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as caught:
        main(["--version"])
    assert caught.value.code == 0
    assert capsys.readouterr().out == f"streamsvc {streamsvc_package.__version__}\n"


def _subcommands(parser: argparse.ArgumentParser) -> Iterator[argparse.ArgumentParser]:
    yield parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in action.choices.values():
                yield from _subcommands(child)


def test_every_option_and_argument_of_every_command_has_help() -> None:
    for parser in _subcommands(_parser()):
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):  # each command has its own help
                helps = {choice.dest: choice.help for choice in action._choices_actions}
                assert set(helps) == set(action.choices) and all(helps.values()), helps
            else:
                assert action.help, f"{parser.prog}: {action.option_strings or action.dest}"


# -- serve: refuses a bad config before listening ----------------------------------------------


def test_serve_with_a_bad_config_exits_2_naming_the_key(bad_toml: Path) -> None:
    result = streamsvc("serve", "--config", str(bad_toml))
    assert result.returncode == 2
    assert str(bad_toml) in result.stderr and "server.portt" in result.stderr
    assert "Traceback" not in result.stderr


Refuses = Callable[..., str]


@pytest.fixture
def serve_refuses(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> Refuses:
    """``serve_refuses(*args, **env)``: ``streamsvc serve`` in this process, in an environment
    of no STREAMSVC settings but ``env``, must refuse to start (exit status 2); its stderr."""
    for name in [n for n in os.environ if n.startswith("STREAMSVC")]:
        monkeypatch.delenv(name)

    def run(*args: str, **env: str) -> str:
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        assert main(["serve", *args]) == EXIT_CONFIG
        err = capsys.readouterr().err
        assert err.startswith("streamsvc: config error: ") and "Traceback" not in err
        return err

    return run


def test_serve_reads_the_config_from_streamsvc_config(
    bad_toml: Path, serve_refuses: Refuses
) -> None:
    assert "server.portt" in serve_refuses(STREAMSVC_CONFIG=str(bad_toml))


def test_serve_upstream_key_env_without_upstream_exits_2(serve_refuses: Refuses) -> None:
    err = serve_refuses("--upstream-key-env", "OPENAI_API_KEY")
    assert "--upstream-key-env" in err and "--upstream" in err


def test_serve_bad_upstream_url_exits_2(serve_refuses: Refuses) -> None:
    err = serve_refuses("--upstream", "ftp://example.com")
    assert "command line" in err and "base_url" in err


def test_serve_bad_env_override_exits_2_naming_the_variable(serve_refuses: Refuses) -> None:
    err = serve_refuses(STREAMSVC__SERVER__PORT="abc")
    assert "STREAMSVC__SERVER__PORT" in err and "server.port" in err


def test_serve_bad_port_flag_exits_2(serve_refuses: Refuses) -> None:
    err = serve_refuses("--port", "70000")
    assert "command line" in err and "server.port" in err


@pytest.mark.parametrize("command", ["serve", "simulate"])
def test_a_taken_port_is_one_line_naming_the_address_and_the_flag(command: str) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = streamsvc(command, "--port", str(port))
    assert result.returncode == EXIT_UNAVAILABLE
    (line,) = [line for line in result.stderr.splitlines() if line.startswith("streamsvc:")]
    assert line.startswith(f"streamsvc: cannot listen on 127.0.0.1:{port}: the address is already"
                           " in use")
    assert "--port" in line
    assert "Traceback" not in result.stderr + result.stdout


# -- serve: starts, answers, stops -------------------------------------------------------------


@pytest.fixture
def server(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[str], int]]:
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "streamsvc", "serve", "--port", str(port)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env=clean_env(STREAMSVC__SERVER__HEARTBEAT_S="15", STREAMSVC_SERVER_PORT="1"),
        cwd=tmp_path,
    )
    try:
        yield process, port
    finally:
        if process.poll() is None:
            process.kill()
        process.communicate(timeout=10)


def wait_healthy(process: subprocess.Popen[str], port: int, timeout: float = 30) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, "streamsvc serve exited before answering"
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as r:
                assert r.status == 200
                body: str = r.read().decode()
                return body
        except (urllib.error.URLError, ConnectionError):
            time.sleep(0.1)
    raise AssertionError(f"no answer on port {port} within {timeout} s")


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_serve_answers_healthz_and_stops_on_signal(
    server: tuple[subprocess.Popen[str], int], signum: signal.Signals
) -> None:
    process, port = server
    wait_healthy(process, port)
    process.send_signal(signum)
    output, _ = process.communicate(timeout=30)
    assert process.returncode == 0, output
    assert f"streamsvc listening on http://127.0.0.1:{port}" in output
    # No file was loaded, and the line does not name one as if it had been; it names the
    # overrides applied, and a variable that looks like one but is not is warned about.
    assert ("config: no file, the built-in defaults (--config FILE to load one);"
            " server.heartbeat_s from STREAMSVC__SERVER__HEARTBEAT_S") in output
    assert ("WARNING streamsvc: config: environment STREAMSVC_SERVER_PORT: ignored:"
            in output)
    assert ("routes: echo, sim-small, sim-large -> simulator; any other model:"
            " 404 model_not_found") in output
    assert "streamsvc.toml" not in output
    assert "Traceback" not in output
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2)


def _wait_listening(process: subprocess.Popen[str], url: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, "the process exited before answering"
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except (urllib.error.URLError, ConnectionError):
            time.sleep(0.1)
    raise AssertionError(f"no answer at {url} within {timeout} s")


def test_simulate_and_serve_upstream_as_a_user_runs_them(tmp_path: Path) -> None:
    """`streamsvc simulate` in one process, `streamsvc serve --upstream` in front of it."""
    sim_port, relay_port = free_port(), free_port()
    processes = [
        subprocess.Popen(
            [sys.executable, "-m", "streamsvc", "simulate", "--port", str(sim_port)],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            env=clean_env(), cwd=tmp_path,
        ),
        subprocess.Popen(
            [sys.executable, "-m", "streamsvc", "serve", "--port", str(relay_port),
             "--upstream", f"http://127.0.0.1:{sim_port}/v1",
             "--upstream-key-env", "SIM_KEY"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            env=clean_env(SIM_KEY="sim-secret-key"), cwd=tmp_path,
        ),
    ]
    try:
        _wait_listening(processes[0], f"http://127.0.0.1:{sim_port}/v1/models")
        _wait_listening(processes[1], f"http://127.0.0.1:{relay_port}/healthz")
        url = f"http://127.0.0.1:{relay_port}/v1/chat/stream?model=echo&q=%20Hi%20there%0A"
        with urllib.request.urlopen(url, timeout=10) as response:
            body = response.read().decode()
        with urllib.request.urlopen(f"http://127.0.0.1:{sim_port}/_sim/requests",
                                    timeout=5) as response:
            recent = json.loads(response.read())
    finally:
        for process in processes:
            process.send_signal(signal.SIGTERM)
        outputs = [process.communicate(timeout=30)[0] for process in processes]
    events = list(SSEDecoder().feed(body.encode()))
    text = "".join(json.loads(e.data).get("content", "") for e in events if e.event == "message")
    assert text == " Hi there\n" and events[-1].event == "done"
    assert recent[-1]["headers"]["Authorization"] == "Bearer sim-secret-key"
    assert f"streamsvc simulator listening on http://127.0.0.1:{sim_port}/v1" in outputs[0]
    assert "sim-secret-key" not in outputs[1]  # the relay's log never shows the key
    assert all(process.returncode == 0 for process in processes), outputs


# -- issue 12, item 10: --upstream and the environment's overrides of its upstream --------------


def test_upstream_flag_keeps_the_env_read_timeout_of_its_upstream(tmp_path: Path) -> None:
    """STREAMSVC__UPSTREAMS__UPSTREAM__READ_TIMEOUT_S bounds a hung upstream behind --upstream
    (it was dropped: only the 120 s first-token timeout ended the stream)."""
    sim_port, relay_port = free_port(), free_port()
    env = clean_env(STREAMSVC__UPSTREAMS__UPSTREAM__READ_TIMEOUT_S="0.5")
    processes = [
        subprocess.Popen([sys.executable, "-m", "streamsvc", "simulate", "--port", str(sim_port)],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=clean_env(),
                         text=True, cwd=tmp_path),
        subprocess.Popen([sys.executable, "-m", "streamsvc", "serve", "--port", str(relay_port),
                          "--upstream", f"http://127.0.0.1:{sim_port}/v1"],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env,
                         text=True, cwd=tmp_path),
    ]
    try:
        _wait_listening(processes[0], f"http://127.0.0.1:{sim_port}/v1/models")
        _wait_listening(processes[1], f"http://127.0.0.1:{relay_port}/healthz")
        body = json.dumps({"model": "echo", "messages": [{"role": "user", "content": "a b"}],
                           "simulate": {"fault": "hang", "fault_at": 1},
                           "streamsvc": {"retries": False}}).encode()
        request = urllib.request.Request(f"http://127.0.0.1:{relay_port}/v1/chat/stream",
                                         data=body, headers={"Content-Type": "application/json"})
        started = time.monotonic()
        with urllib.request.urlopen(request, timeout=20) as response:
            events = SSEDecoder().feed(response.read())
        took = time.monotonic() - started
    finally:
        for process in processes:
            process.send_signal(signal.SIGTERM)
        for process in processes:
            process.communicate(timeout=30)
    final = json.loads(events[-1].data)
    assert events[-1].event == "error" and final["code"] == "idle_timeout", final
    assert "0.5 s" in final["message"] and took < 10


def test_upstream_flag_with_a_bad_env_override_of_its_upstream_exits_2_naming_it() -> None:
    env = clean_env(STREAMSVC__UPSTREAMS__UPSTREAM__READ_TIMEOUT_S="soon")
    result = streamsvc("serve", "--upstream", "http://127.0.0.1:9/v1", env=env, timeout=30)
    assert result.returncode == EXIT_CONFIG, result.stderr
    assert "STREAMSVC__UPSTREAMS__UPSTREAM__READ_TIMEOUT_S" in result.stderr
    assert "upstreams.upstream.read_timeout_s" in result.stderr


def test_upstream_flag_wins_over_the_env_base_url_of_its_upstream() -> None:
    from streamsvc.cli import _flag_overrides, _flag_sections, _parser
    from streamsvc.config import load_config

    args = _parser().parse_args(["serve", "--upstream", "http://127.0.0.1:9/v1",
                                 "--upstream-key-env", "MY_KEY"])
    config = load_config(None, env={"STREAMSVC__UPSTREAMS__UPSTREAM__BASE_URL": "http://x:1",
                                    "STREAMSVC__UPSTREAMS__UPSTREAM__CONNECT_TIMEOUT_S": "2"},
                         overrides=_flag_overrides(args), sections=_flag_sections(args))
    assert list(config.upstreams) == ["upstream"]
    upstream = config.upstreams["upstream"]
    assert upstream.base_url == "http://127.0.0.1:9/v1" and upstream.api_key_env == "MY_KEY"
    assert upstream.connect_timeout_s == 2.0
    assert [route.upstreams for route in config.routes] == [["upstream"]]
