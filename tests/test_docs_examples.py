"""The docs' examples run as shown and print what the docs say they print.

The Python examples of docs/operators.md run as scripts; the shell examples of docs/api.md
and docs/operators.md run against a real ``streamsvc serve`` (see below).
"""

from __future__ import annotations

import ast
import base64
import contextlib
import itertools
import os
import re
import subprocess
import sys
import textwrap
import time
import urllib.request
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import pytest

from streamsvc.cli import main
from streamsvc.config import load_config
from streamsvc.sse import ServerSentEvent, SSEDecoder
from streamsvc.upstream.routing import Router
from tests.conftest import free_port
from tests.test_readme import FENCE

ROOT = Path(__file__).resolve().parent.parent
OPERATORS_MD = (ROOT / "docs" / "operators.md").read_text(encoding="utf-8")


def _examples() -> list[tuple[str, str]]:
    """(python block, the plain block right after it: its printed output)."""
    found = list(FENCE.finditer(OPERATORS_MD))
    pairs = []
    for block, after in itertools.pairwise(found):
        if block["lang"] == "python" and after["lang"] == "":
            pairs.append((textwrap.dedent(block["body"]), textwrap.dedent(after["body"])))
    return pairs


def _run(example: str, tmp_path: Path) -> str:
    script = tmp_path / "example.py"
    script.write_text(example, encoding="utf-8")
    env = {k: v for k, v in os.environ.items() if not k.startswith("STREAMSVC")}
    env["PYTHONPATH"] = str(ROOT)
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                            timeout=60, env=env, cwd=tmp_path, check=False)
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_operators_md_has_its_three_examples() -> None:
    assert len(_examples()) == 3


def test_composing_example_prints_the_whole_text_in_merged_pieces(tmp_path: Path) -> None:
    example, _ = _examples()[0]
    pieces = [ast.literal_eval(line) for line in _run(example, tmp_path).splitlines()]
    assert "".join(pieces) == "One two three four five six seven eight nine ten"
    assert 1 < len(pieces) < 10  # merged by throttle, not one per token


@pytest.mark.parametrize("index", [1, 2], ids=["idle-timeout", "virtual-time"])
def test_example_prints_what_the_doc_shows(index: int, tmp_path: Path) -> None:
    example, shown = _examples()[index]
    assert _run(example, tmp_path).split() == shown.split()


# -- the shell examples: run against a real `streamsvc serve`, compared with what they show ------
#
# An example is a `sh` block that talks to http://127.0.0.1:8080 and shows what a command
# prints: as "# " lines right after that command, or (for the block's last command) as the
# plain or `json` block that follows it, with at most a one-line caption ending in ":" between.
# A comment before a block's first command describes it; one that names settings (`# with
# STREAMSVC__PIPELINE__CONTINUE_ON_FAILURE=true`) runs the example against a server started
# with them. Blocks that start servers (`streamsvc serve`, `streamsvc simulate`) are not run. "…" in what a doc shows stands for anything; ids
# and times that differ at every run (stream ids, `created`, `expires_at`) are made alike.
# Event streams are compared event by event (the `retry:` value, then each event's type, id
# and data), not byte by byte, so where the `retry:` line sits does not matter.

DOCS = ROOT / "docs"
EXAMPLE_DOCS = ("api.md", "operators.md")
ELLIPSIS = "…"
KEY = "sk-docs-example-key"
_SSE_FIELD = re.compile(r"^(retry|id|data|event):", re.MULTILINE)
_VARYING = [
    (re.compile(r"st_[0-9a-f]{24}"), "st_" + ELLIPSIS),
    (re.compile(r"chatcmpl-sim-\d+"), "chatcmpl-sim-" + ELLIPSIS),
    (re.compile(r'("(?:created|created_at|expires_at)":) ?\d+'), r"\1" + ELLIPSIS),
    (re.compile(r"resp_[0-9a-f]{24}"), "resp_" + ELLIPSIS),
    (re.compile(r"(msg|rs|fc)_[0-9a-f]{24}_(\d+)"), r"\1_" + ELLIPSIS + r"_\2"),
]
_MARK = "<<<streamsvc-docs-example-step>>>"
# A ticket as a command prints it: in a URL's query, or as the JSON value of "ticket" (as
# streamsvc writes it, or spaced as a doc shows it).
_TICKET = re.compile(
    r'(?:(?<=ticket=)|(?<="ticket":")|(?<="ticket": "))(\.?)(e[yJ][\w-]+)\.([\w-]+)')


def _other_form(ticket: re.Match[str]) -> str:
    """The ticket with its payload in itsdangerous's other form: zlib-compressed
    (``.eJ…``, nearly every ticket) or not (``eyJ…``, when compressing would not
    shorten it). The signature no longer fits; only what a doc shows is compared."""
    compressed, payload, signature = ticket[1] == ".", ticket[2], ticket[3]
    raw = base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4))
    other = zlib.decompress(raw) if compressed else zlib.compress(raw)
    encoded = base64.urlsafe_b64encode(other).rstrip(b"=").decode()
    return f"{encoded}.{signature}" if compressed else f".{encoded}.{signature}"


@dataclass
class Step:
    """Commands of one example, and what the doc says they print ("" when it says nothing)."""

    commands: list[str] = field(default_factory=list)
    shown: list[str] = field(default_factory=list)


@dataclass
class Example:
    doc: str
    line: int
    steps: list[Step]
    env: dict[str, str] = field(default_factory=dict)

    @property
    def id(self) -> str:
        return f"{self.doc}:{self.line}"


def _steps(body: str) -> list[Step]:
    steps = [Step()]
    for line in body.splitlines():
        if line.startswith("#") and not steps[-1].commands:
            continue  # a comment before the commands says what they do
        if line.startswith("#"):
            steps[-1].shown.append(line.removeprefix("#").removeprefix(" "))
        elif line.strip():
            if steps[-1].shown:
                steps.append(Step())
            steps[-1].commands.append(line)
    return steps


def shell_examples(doc: str) -> list[Example]:
    text = (DOCS / doc).read_text(encoding="utf-8")
    blocks = list(FENCE.finditer(text))
    found = []
    for block, after in itertools.zip_longest(blocks, blocks[1:]):
        body = textwrap.dedent(block["body"])
        if (block["lang"] != "sh" or "127.0.0.1:8080" not in body
                or re.search(r"^streamsvc (serve|simulate)", body, re.MULTILINE)):
            continue
        steps = _steps(body)
        between = text[block.end():after.start()].strip() if after is not None else "x"
        if after is not None and after["lang"] in ("", "json") and (
                not between or ("\n" not in between and between.endswith(":"))):
            steps[-1].shown = textwrap.dedent(after["body"]).splitlines()
        first = next((i for i, line in enumerate(body.splitlines())
                      if line.strip() and not line.startswith("#")), 0)
        described = "\n".join(body.splitlines()[:first])
        env = dict(re.findall(r"(STREAMSVC__\w+)=(\S+)", described))
        if any(step.shown for step in steps):
            found.append(Example(doc, text[:block.start()].count("\n") + 1, steps, env))
    return found


def _alike(text: str) -> str:
    """``text`` with the run-to-run differences evened out and white space made canonical."""
    text = re.sub(r"\s+", " ", text).strip()
    text = re.sub(r" ?([{}\[\],:]) ?", r"\1", text)
    for pattern, replacement in _VARYING:
        text = pattern.sub(replacement, text)
    return text


def _matches(shown: str, real: str) -> bool:
    pattern = ".*?".join(re.escape(part) for part in _alike(shown).split(ELLIPSIS))
    return re.fullmatch(pattern, _alike(real), re.DOTALL) is not None


def _events(text: str) -> tuple[int | None, list[ServerSentEvent]]:
    decoder = SSEDecoder()
    events = decoder.feed(text.encode())
    return decoder.retry, events


def assert_prints(shown: str, real: str) -> None:
    """What the doc shows matches what the command printed (see the comment above)."""
    if not _SSE_FIELD.match(shown.lstrip()):
        assert _matches(shown, real), f"the doc shows:\n{shown}\nthe command printed:\n{real}"
        return
    # What a doc shows ends with its last event, blank line or not.
    (retry, events), (real_retry, real_events) = _events(shown + "\n\n"), _events(real)
    printed = "\n".join(f"{e.event} {e.id} {e.data}" for e in real_events)
    assert (retry, len(events)) == (real_retry, len(real_events)), printed
    for event, real_event in zip(events, real_events, strict=True):
        assert event.event == real_event.event, printed
        assert _matches(event.id or "", real_event.id or ""), printed
        assert _matches(event.data, real_event.data), printed


def _serve(env: dict[str, str]) -> Iterator[str]:
    port = free_port()
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("STREAMSVC")}
    process = subprocess.Popen(
        [sys.executable, "-m", "streamsvc", "serve", "--port", str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**full_env, **env},
    )
    url = f"127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            assert process.poll() is None and time.monotonic() < deadline, "serve did not start"
            with contextlib.suppress(OSError):
                with urllib.request.urlopen(f"http://{url}/readyz", timeout=2):
                    break
            time.sleep(0.05)
        yield url
    finally:
        process.kill()
        process.wait(timeout=30)


@pytest.fixture(scope="module")
def open_server() -> Iterator[str]:
    """``streamsvc serve`` as the docs assume it: the defaults, auth off."""
    yield from _serve({})


@pytest.fixture(scope="module")
def keyed_server() -> Iterator[str]:
    """``streamsvc serve`` with auth on, for the examples that send ``$KEY``."""
    yield from _serve({"STREAMSVC_API_KEYS": KEY})


def run_steps(example: Example, address: str) -> list[str]:
    """Run the example's commands in one shell (variables carry over); each step's output."""
    script = "\n".join(
        "\n".join(step.commands) + f"\nprintf '\\n%s\\n' '{_MARK}'" for step in example.steps
    ).replace("127.0.0.1:8080", address)
    result = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=60,
                            env={**os.environ, "KEY": KEY}, check=False)
    assert result.returncode == 0, result.stderr
    outputs = result.stdout.split(f"\n{_MARK}\n")
    assert len(outputs) == len(example.steps) + 1 and outputs[-1] == "", result.stdout
    return outputs[:-1]


def test_the_docs_have_their_shell_examples() -> None:
    # Every example the docs show output for is found (a reworded one must still be).
    assert [len(shell_examples(doc)) for doc in EXAMPLE_DOCS] == [11, 2]


@pytest.mark.parametrize(
    "example", [e for doc in EXAMPLE_DOCS for e in shell_examples(doc)], ids=lambda e: e.id)
def test_a_shell_example_prints_what_its_doc_shows(
    example: Example, request: pytest.FixtureRequest,
) -> None:
    keyed = any("$KEY" in line for step in example.steps for line in step.commands)
    if example.env:
        with contextlib.closing(_serve(example.env)) as started:
            address = next(started)
            for step, printed in zip(example.steps, run_steps(example, address), strict=True):
                if step.shown:
                    assert_prints("\n".join(step.shown), printed)
        return
    address = request.getfixturevalue("keyed_server" if keyed else "open_server")
    for step, printed in zip(example.steps, run_steps(example, address), strict=True):
        if step.shown:
            assert_prints("\n".join(step.shown), printed)
            # A ticket's form varies from run to run: what the doc shows holds for both.
            assert_prints("\n".join(step.shown), _TICKET.sub(_other_form, printed))


def test_a_doc_example_holds_for_both_forms_of_a_ticket() -> None:
    """About one ticket in a hundred is not compressed (``eyJ…``, not ``.eJ…``): a doc
    that showed the usual form failed that one run in a hundred. The shell examples
    compare what a doc shows with the printed tickets in both forms (``_other_form``)."""
    from streamsvc.config import AuthConfig
    from streamsvc.server.auth import Auth

    auth = Auth(AuthConfig(), retention_s=300, env={"STREAMSVC_API_KEYS": KEY})
    seen: dict[bool, str] = {}
    while len(seen) < 2:  # one of each form, minted as the server mints them
        ticket, _ = auth.mint("chat", auth.key_id(KEY))
        seen[ticket.startswith(".")] = ticket
    for ticket in seen.values():
        printed = f'{{"ticket": "{ticket}", "url": "/v1/chat/stream?ticket={ticket}"}}'
        other = _TICKET.sub(_other_form, printed)
        assert ticket not in other
        forms = re.findall(r"[=\"](eyJ|\.eJ)", other)
        assert len(forms) == 2 and ticket[:3] not in forms
        assert _TICKET.sub(_other_form, other) == printed  # each form is the other's other
        shown = '{"ticket": "…", "url": "/v1/chat/stream?ticket=…"}'
        assert_prints(shown, printed)
        assert_prints(shown, other)
        with pytest.raises(AssertionError):
            assert_prints('{"ticket": ".eJw…", "url": "/v1/chat/stream?ticket=.eJw…"}',
                          printed if not ticket.startswith(".") else other)


# -- docs/configuration.md: the messages it shows are the ones streamsvc prints ------------------

CONFIGURATION_MD = (DOCS / "configuration.md").read_text(encoding="utf-8")


def _block_after(marker: str, *, lang: str = "") -> str:
    """The first fenced block of ``lang`` after the text ``marker`` in configuration.md."""
    start = CONFIGURATION_MD.index(marker)
    block = next(m for m in FENCE.finditer(CONFIGURATION_MD, start) if m["lang"] == lang)
    return textwrap.dedent(block["body"])


@pytest.fixture
def check(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
          ) -> Callable[..., tuple[int, str]]:
    """``check(*args, **env)``: the ``streamsvc`` command in this process, in ``tmp_path``;
    (exit status, stderr). The messages are those of the command run by hand."""
    monkeypatch.chdir(tmp_path)

    def run(*args: str, **env: str) -> tuple[int, str]:
        with monkeypatch.context() as patch:
            for name in [n for n in os.environ if n.startswith("STREAMSVC")]:
                patch.delenv(name)
            for name, value in env.items():
                patch.setenv(name, value)
            status = main(list(args))
        return status, capsys.readouterr().err

    return run


def test_the_bad_file_of_configuration_md_gets_the_errors_it_shows(
    tmp_path: Path, check: Callable[..., tuple[int, str]],
) -> None:
    toml = _block_after("## Bad values", lang="toml")
    assert toml.startswith("# my.toml\n")
    (tmp_path / "my.toml").write_text(toml, encoding="utf-8")
    shown = _block_after("`streamsvc config check my.toml` prints")
    for command in (["config", "check", "my.toml"], ["serve", "--config", "my.toml"]):
        assert check(*command) == (2, shown), command


def test_the_other_config_messages_of_configuration_md_are_real(
    tmp_path: Path, check: Callable[..., tuple[int, str]],
) -> None:
    (tmp_path / "my.toml").write_text("[server\nport = 1\n", encoding="utf-8")
    (tmp_path / "upstreams.toml").write_text('[upstreams.openai]\nbase_url = "https://x/v1"\n',
                                             encoding="utf-8")
    assert not Path("/etc/streamsvc.toml").exists()
    default = str(ROOT / "config" / "streamsvc.toml")
    runs = [
        check("config", "check", "my.toml"),
        check("config", "check", "/etc/streamsvc.toml"),
        check("config", "check", "upstreams.toml"),
        check("config", "check", default, STREAMSVC__SERVER__PORT="abc"),
        check("config", "check", default, STREAMSVC__PORT="1"),
        check("serve", "--port", "70000"),
        check("serve", "--upstream-key-env", "OPENAI_API_KEY"),
    ]
    assert all(status == 2 for status, _ in runs)
    printed = "".join(err.replace("upstreams.toml", "my.toml") for _, err in runs)
    assert printed == _block_after("Other messages name their source")


def test_the_warning_of_configuration_md_is_real(check: Callable[..., tuple[int, str]]) -> None:
    status, err = check("config", "check", str(ROOT / "config" / "streamsvc.toml"),
                        STREAMSVC_SERVER_PORT="9000")
    assert status == 0
    assert err == _block_after("warn that it is ignored")


async def test_the_routes_line_of_configuration_md_is_the_start_up_line() -> None:
    async with aiohttp.ClientSession() as session:
        line = Router(load_config(env={}), session).describe()
    assert line + "\n" == _block_after("says\nthe same in one line")
