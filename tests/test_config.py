"""streamsvc.config: TOML, then environment, then flags; every error names source and key."""

from __future__ import annotations

from pathlib import Path

import pytest

from streamsvc.config import (
    BUILTIN_SIMULATOR,
    Config,
    RouteConfig,
    UpstreamConfig,
    load_config,
    read_config,
)
from streamsvc.errors import ConfigError, ErrorCode
from streamsvc.simulator import MODELS

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_TOML = ROOT / "config" / "streamsvc.toml"


def write(tmp_path: Path, text: str, name: str = "streamsvc.toml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def config_error(path: Path | None = None, **kwargs: object) -> ConfigError:
    with pytest.raises(ConfigError) as caught:
        load_config(path, **kwargs)  # type: ignore[arg-type]
    error = caught.value
    assert error.code == ErrorCode.CONFIG_INVALID
    return error


# -- defaults ----------------------------------------------------------------------------------


def test_config_file_in_the_repository_equals_the_built_in_defaults() -> None:
    assert load_config(DEFAULT_TOML, env={}) == Config()


def test_no_file_means_the_defaults() -> None:
    config = load_config(None, env={})
    assert config == Config()
    assert config.upstreams == {"simulator": UpstreamConfig(base_url=BUILTIN_SIMULATOR)}
    # The simulator's models, by name; a misspelled or foreign one is no route's (404).
    assert config.routes == [RouteConfig(model=m, upstreams=["simulator"]) for m in MODELS]
    assert config.models() == list(MODELS)
    assert config.route("echo") is not None and config.route("ehco") is None


def test_an_empty_file_means_the_defaults(tmp_path: Path) -> None:
    assert load_config(write(tmp_path, ""), env={}) == Config()


def test_a_file_sets_what_it_names_and_keeps_the_other_defaults(tmp_path: Path) -> None:
    path = write(tmp_path, """
        [server]
        port = 9000
        [upstreams.openai]
        base_url = "https://api.openai.com/v1"
        api_key_env = "OPENAI_API_KEY"
        headers = { "OpenAI-Organization" = "org" }
        [[routes]]
        model = "gpt-*"
        upstreams = ["openai"]
    """)
    config = load_config(path, env={})
    assert config.server.port == 9000 and config.server.host == "127.0.0.1"
    assert config.journal == Config().journal
    assert config.upstreams["openai"].headers == {"OpenAI-Organization": "org"}
    assert config.route("gpt-4o") == RouteConfig(model="gpt-*", upstreams=["openai"])


def test_config_is_frozen() -> None:
    config = Config()
    with pytest.raises(AttributeError):
        config.server.port = 1  # type: ignore[misc]


# -- errors in a file name the file and the key ------------------------------------------------


BAD_FILES = {
    "unknown key at top level": ("bogus = 1\n", "bogus", "unknown key"),
    "unknown key in [server]": ("[server]\nportt = 1\n", "server.portt", "unknown key"),
    "unknown section": ("[serverr]\nport = 1\n", "serverr", "unknown key"),
    "unknown key in an upstream": (
        '[upstreams.openai]\nbase_url = "https://x"\ntimeout = 3\n',
        "upstreams.openai.timeout", "unknown key",
    ),
    "unknown key in a route": (
        '[[routes]]\nmodel = "*"\nupstreams = ["simulator"]\nextra = 1\n',
        "routes[0].extra", "unknown key",
    ),
    "wrong type (string for int)": ('[server]\nport = "8080"\n', "server.port", "int"),
    "wrong type (string for bool)": ('[pipeline]\ncoalesce = "yes"\n', "pipeline.coalesce",
                                     "bool"),
    "wrong type (table for section)": ("server = 5\n", "server", "object"),
    "port out of range": ("[server]\nport = 70000\n", "server.port", "65535"),
    "negative port": ("[server]\nport = -1\n", "server.port", ">= 0"),
    "negative duration": ("[journal]\nretention_s = -1\n", "journal.retention_s", ">= 0"),
    "zero max_events": ("[journal]\nmax_events = 0\n", "journal.max_events", ">= 1"),
    "unknown log level": ('[log]\nlevel = "loud"\n', "log.level", "loud"),
    "unknown journal backend": ('[journal]\nbackend = "redis2"\n', "journal.backend", "redis2"),
    "bad base_url": ('[upstreams.openai]\nbase_url = "ftp://x"\n', "upstreams.openai.base_url",
                     "ftp://x"),
    "base_url without a host": ('[upstreams.local]\nbase_url = "http://"\n',
                                "upstreams.local.base_url", "http(s)://"),
    "upstream without base_url": ('[upstreams.a]\napi_key_env = "X"\n', "upstreams.a.base_url",
                                  "missing"),
    "route naming an unknown upstream": (
        ('[upstreams.a]\nbase_url = "https://x"\n'
         '[[routes]]\nmodel = "*"\nupstreams = ["a", "b"]\n'),
        "routes[0].upstreams[1]", "'b'",
    ),
    "route with no upstream": ('[[routes]]\nmodel = "*"\nupstreams = []\n',
                               "routes[0].upstreams", "length"),
    "invalid TOML": ("[server\nport = 1\n", "(file)", "not valid TOML"),
    "duplicate key": ("[server]\nport = 1\nport = 2\n", "(file)", "not valid TOML"),
}


@pytest.mark.parametrize(("text", "key", "detail"), BAD_FILES.values(), ids=BAD_FILES.keys())
def test_a_bad_file_names_the_file_and_the_key(
    tmp_path: Path, text: str, key: str, detail: str
) -> None:
    path = write(tmp_path, text, "my.toml")
    error = config_error(path, env={})
    assert error.source == str(path)
    assert error.key == key
    assert detail in str(error)
    assert str(error).startswith(f"{path}: {key}: ")


def test_every_problem_of_a_file_is_reported_at_once_each_naming_its_key(tmp_path: Path) -> None:
    path = write(tmp_path, """
        [server]
        prot = 8080
        [log]
        level = "loud"
        [journal]
        max_events = 0
        [upstreams.a]
        base_url = "https://a.example/v1"
        [[routes]]
        model = "*"
        upstreams = ["a", "b", "c"]
    """, "my.toml")
    error = config_error(path, env={})
    assert [str(problem) for problem in error.problems] == [
        f"{path}: server.prot: unknown key; did you mean 'port'?",
        f"{path}: log.level: expected one of 'debug', 'info', 'warning', 'error', got 'loud'",
        f"{path}: journal.max_events: Expected `int` >= 1, got 0",
        f"{path}: routes[0].upstreams[1]: names upstream 'b', which is not defined under"
        " [upstreams]",
        f"{path}: routes[0].upstreams[2]: names upstream 'c', which is not defined under"
        " [upstreams]",
    ]
    assert str(error) == "\n".join(map(str, error.problems))
    assert (error.source, error.key) == (str(path), "server.prot")


def test_every_route_naming_an_unknown_upstream_is_reported(tmp_path: Path) -> None:
    path = write(tmp_path, '[upstreams.a]\nbase_url = "https://a.example/v1"\n'
                           '[[routes]]\nmodel = "*"\nupstreams = ["a", "b", "c"]\n')
    error = config_error(path, env={})
    assert [problem.key for problem in error.problems] == ["routes[0].upstreams[1]",
                                                           "routes[0].upstreams[2]"]


@pytest.mark.parametrize(("text", "message"), [
    ("[serverr]\nport = 1\n", "serverr: unknown key; did you mean 'server'?"),
    ("[pipeline]\nretry_max_attempt = 1\n",
     "pipeline.retry_max_attempt: unknown key; did you mean 'retry_max_attempts'?"),
    ("[server]\nxyzzy = 1\n", "server.xyzzy: unknown key"),
    ('[server]\nevent_loop = "trio"\n',
     "server.event_loop: expected one of 'auto', 'asyncio', 'uvloop', got 'trio'"),
    ('[journal]\nbackend = "postgres"\n',
     "journal.backend: expected one of 'memory', 'redis', got 'postgres'"),
    ('[upstreams.a]\nbase_url = "https://x"\nheaders = { a = 1 }\n'
     '[[routes]]\nmodel = "*"\nupstreams = ["a"]\n',
     "upstreams.a.headers.a: Expected `str`, got `int`"),
], ids=["section", "key", "nothing near", "event loop", "backend", "a table's value"])
def test_a_bad_key_or_value_says_what_was_meant(tmp_path: Path, text: str, message: str) -> None:
    path = write(tmp_path, text, "my.toml")
    assert str(config_error(path, env={})) == f"{path}: {message}"


def test_problems_of_the_file_and_the_environment_come_together(tmp_path: Path) -> None:
    path = write(tmp_path, "[server]\nport = -1\n", "my.toml")
    error = config_error(path, env={"STREAMSVC__PIPELINE__COALESCE": "maybe"})
    assert [(p.source, p.key) for p in error.problems] == [
        (str(path), "server.port"),
        ("environment STREAMSVC__PIPELINE__COALESCE", "pipeline.coalesce"),
    ]


def test_the_overrides_applied_are_told_and_stray_variables_warned_about() -> None:
    loaded = read_config(None, env={
        "STREAMSVC__SERVER__PORT": "9000", "STREAMSVC_SERVER_PORT": "9001",
        "STREAMSVC_API_KEYS": "k", "STREAMSVC_TICKET_SECRET": "s", "STREAMSVC_CONFIG": "x.toml",
        "STREAMSVC_VERBOSE": "1", "OTHER": "1",
    })
    assert loaded.config.server.port == 9000
    assert loaded.overrides == (("STREAMSVC__SERVER__PORT", "server.port"),)
    assert loaded.warnings == (
        "environment STREAMSVC_SERVER_PORT: ignored: overrides are STREAMSVC__SECTION__KEY"
        " (double underscores), and the config names no variable STREAMSVC_SERVER_PORT; did you"
        " mean STREAMSVC__SERVER__PORT (sets server.port)?",
        "environment STREAMSVC_VERBOSE: ignored: overrides are STREAMSVC__SECTION__KEY"
        " (double underscores), and the config names no variable STREAMSVC_VERBOSE",
    )


def test_a_variable_the_config_names_is_no_stray() -> None:
    loaded = read_config(None, env={"STREAMSVC_OPENAI_KEY": "sk",
                                    "STREAMSVC__UPSTREAMS__SIMULATOR__API_KEY_ENV":
                                    "STREAMSVC_OPENAI_KEY"})
    assert loaded.warnings == ()


def test_a_missing_file_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "absent.toml"
    error = config_error(path, env={})
    assert error.source == str(path) and "not found" in str(error)


def test_a_file_that_is_not_utf8_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "latin1.toml"
    path.write_bytes(b'[server]\nhost = "\xe9"\n')
    error = config_error(path, env={})
    assert error.source == str(path) and error.key == "(file)"


# -- environment overrides ---------------------------------------------------------------------


def test_env_override_sets_a_key() -> None:
    config = load_config(None, env={"STREAMSVC__SERVER__PORT": "9000",
                                    "STREAMSVC__PIPELINE__COALESCE": "false",
                                    "STREAMSVC__SERVER__HOST": "0.0.0.0",
                                    "UNRELATED": "x"})
    assert config.server.port == 9000
    assert config.pipeline.coalesce is False
    assert config.server.host == "0.0.0.0"  # not TOML: read as a plain string


def test_env_override_wins_over_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, "[server]\nport = 1234\nhost = \"::1\"\n")
    config = load_config(path, env={"STREAMSVC__SERVER__PORT": "4321"})
    assert config.server.port == 4321 and config.server.host == "::1"


def test_env_override_can_define_an_upstream_field() -> None:
    config = load_config(DEFAULT_TOML, env={
        "STREAMSVC__UPSTREAMS__SIMULATOR__API_KEY_ENV": "MY_KEY"})
    assert config.upstreams["simulator"].api_key_env == "MY_KEY"


def test_env_override_reaches_the_default_upstream_without_a_file() -> None:
    config = load_config(None, env={"STREAMSVC__UPSTREAMS__SIMULATOR__READ_TIMEOUT_S": "60"})
    assert config.upstreams["simulator"].read_timeout_s == 60
    assert config.upstreams["simulator"].base_url == "builtin:simulator"
    assert config.routes == Config().routes


def test_a_file_with_upstreams_but_no_routes_names_routes(tmp_path: Path) -> None:
    path = write(tmp_path, '[upstreams.openai]\nbase_url = "https://api.example/v1"\n')
    error = config_error(path, env={})
    assert error.key == "routes" and str(path) in str(error)


def test_a_file_with_routes_only_keeps_the_default_upstream(tmp_path: Path) -> None:
    path = write(tmp_path, '[[routes]]\nmodel = "echo"\nupstreams = ["simulator"]\n')
    config = load_config(path, env={})
    assert list(config.upstreams) == ["simulator"] and config.route("echo") is not None
    assert config.route("other") is None


def test_env_is_os_environ_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STREAMSVC__SERVER__PORT", "9123")
    assert load_config(None).server.port == 9123


@pytest.mark.parametrize(
    ("name", "value", "key"),
    [
        ("STREAMSVC__SERVER__PORT", "abc", "server.port"),
        ("STREAMSVC__SERVER__PORT", "99999", "server.port"),
        ("STREAMSVC__SERVER__NOPE", "1", "server.nope"),
        ("STREAMSVC__NOSECTION__KEY", "1", "nosection"),
        ("STREAMSVC__UPSTREAMS__SIMULATOR__BASE_URL", "nope", "upstreams.simulator.base_url"),
        ("STREAMSVC__PORT", "1", "STREAMSVC__PORT"),
        ("STREAMSVC__SERVER__", "1", "STREAMSVC__SERVER__"),
    ],
    ids=["not an int", "out of range", "unknown key", "unknown section", "bad base_url",
         "no section", "empty key"],
)
def test_a_bad_env_override_names_the_variable(
    tmp_path: Path, name: str, value: str, key: str
) -> None:
    path = write(tmp_path, "[server]\nport = 1234\n")
    error = config_error(path, env={name: value})
    assert error.source == f"environment {name}"
    assert error.key == key
    assert name in str(error)


# -- overrides from flags ----------------------------------------------------------------------


def test_flag_overrides_win_over_env_and_file(tmp_path: Path) -> None:
    path = write(tmp_path, "[server]\nport = 1\nhost = \"::1\"\n")
    config = load_config(path, env={"STREAMSVC__SERVER__PORT": "2"},
                         overrides={"server.port": 3})
    assert config.server.port == 3 and config.server.host == "::1"


def test_flag_overrides_can_replace_upstreams_and_routes() -> None:
    config = load_config(None, env={}, overrides={
        "upstreams": {"upstream": {"base_url": "http://127.0.0.1:11434/v1"}},
        "routes": [{"model": "*", "upstreams": ["upstream"]}],
    })
    assert list(config.upstreams) == ["upstream"]
    assert config.route("llama3") == RouteConfig(model="*", upstreams=["upstream"])


def test_a_bad_flag_override_names_the_command_line() -> None:
    error = config_error(None, env={}, overrides={"server.port": 70000})
    assert error.source == "command line" and error.key == "server.port"


# -- routes ------------------------------------------------------------------------------------


def test_route_takes_the_first_matching_glob_in_order(tmp_path: Path) -> None:
    path = write(tmp_path, """
        [upstreams.a]
        base_url = "https://a.example/v1"
        [upstreams.b]
        base_url = "https://b.example/v1"
        [[routes]]
        model = "gpt-4o*"
        upstreams = ["a"]
        [[routes]]
        model = "gpt-*"
        upstreams = ["b", "a"]
        [[routes]]
        model = "echo"
        upstreams = ["simulator"]
        [[routes]]
        model = "*"
        upstreams = ["simulator"]
        [upstreams.simulator]
        base_url = "builtin:simulator"
    """)
    config = load_config(path, env={})
    route = config.route
    assert route("gpt-4o-mini").upstreams == ["a"]  # type: ignore[union-attr]
    assert route("gpt-4o").upstreams == ["a"]  # type: ignore[union-attr]
    assert route("gpt-3.5-turbo").upstreams == ["b", "a"]  # type: ignore[union-attr]
    assert route("echo").model == "echo"  # type: ignore[union-attr]
    assert route("GPT-4o").model == "*"  # type: ignore[union-attr]  # case-sensitive
    assert config.models() == ["echo"]


def test_route_is_none_when_no_glob_matches() -> None:
    config = load_config(None, env={}, overrides={
        "routes": [{"model": "gpt-?", "upstreams": ["simulator"]}]})
    assert config.route("gpt-4") is not None
    assert config.route("gpt-4o") is None


@pytest.mark.parametrize("path", sorted((ROOT / "config").glob("*.toml")), ids=lambda p: p.name)
def test_every_shipped_config_file_loads(path: Path) -> None:
    config = load_config(path, env={})
    assert config.routes and config.upstreams
