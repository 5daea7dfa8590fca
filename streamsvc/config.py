"""Typed configuration: TOML file, then environment overrides, then CLI flags.

Parsed once at the edge into frozen structs (``msgspec`` does the type and
range checks and rejects unknown keys); handlers never read raw dicts. Every
error names where the bad value came from (file, environment variable or
flag) and the dotted key, and the CLI exits with status 2 on it.

Environment overrides: ``STREAMSVC__<SECTION>__<KEY>=<value>``, for example
``STREAMSVC__SERVER__PORT=9000``; the value is read as a TOML value when it
parses as one (``9000``, ``true``, ``"x"``), else as a plain string.
"""

from __future__ import annotations

import copy
import difflib
import fnmatch
import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, get_args, get_origin

import msgspec
import msgspec.structs

from streamsvc.errors import ConfigError, ConfigProblem
from streamsvc.eventloop import UVLOOP_MISSING, EventLoopSetting, uvloop_available

__all__ = [
    "BUILTIN_SIMULATOR",
    "AuthConfig",
    "Config",
    "JournalConfig",
    "LimitsConfig",
    "LoadedConfig",
    "LogConfig",
    "PipelineConfig",
    "RouteConfig",
    "ServerConfig",
    "UpstreamConfig",
    "load_config",
    "read_config",
    "redact_url",
]

ENV_PREFIX = "STREAMSVC__"
BUILTIN_SIMULATOR = "builtin:simulator"

NonNegFloat = Annotated[float, msgspec.Meta(ge=0)]
PosFloat = Annotated[float, msgspec.Meta(gt=0)]
PosInt = Annotated[int, msgspec.Meta(ge=1)]
NonNegInt = Annotated[int, msgspec.Meta(ge=0)]
Port = Annotated[int, msgspec.Meta(ge=0, le=65535)]


class _Section(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    pass


class ServerConfig(_Section, frozen=True):
    """``[server]``: where to listen and how streams are written to clients."""

    host: str = "127.0.0.1"
    port: Port = 8080
    default_model: str = ""
    max_body_bytes: PosInt = 1_048_576
    body_timeout_s: PosFloat = 30.0
    keepalive_timeout_s: PosFloat = 75.0
    heartbeat_s: PosFloat = 15.0
    sse_retry_ms: Annotated[int, msgspec.Meta(ge=0)] = 1000
    max_pending_bytes: PosInt = 1_048_576
    write_timeout_s: PosFloat = 30.0
    send_buffer_bytes: Annotated[int, msgspec.Meta(ge=0)] = 0
    shutdown_timeout_s: NonNegFloat = 10.0
    drain_timeout_s: NonNegFloat = 30.0
    event_loop: EventLoopSetting = "auto"

    def __post_init__(self) -> None:
        if self.event_loop == "uvloop" and not uvloop_available():
            raise ValueError(f"@event_loop: {UVLOOP_MISSING}")


class JournalConfig(_Section, frozen=True):
    """``[journal]``: where numbered stream events are kept for replay."""

    backend: Literal["memory", "redis"] = "memory"
    retention_s: NonNegFloat = 300.0
    resume_grace_s: NonNegFloat = 10.0
    max_events: PosInt = 100_000
    max_bytes: PosInt = 33_554_432
    redis_url: str = "redis://127.0.0.1:6379/0"
    redis_prefix: str = "streamsvc:"
    writer_lease_s: PosFloat = 5.0
    redis_max_connections: Annotated[int, msgspec.Meta(ge=4)] = 32

    def __post_init__(self) -> None:
        if not re.match(r"(rediss?|unix)://", self.redis_url):
            raise ValueError(
                "@redis_url: expected redis://host:port/db, rediss://... or unix://path,"
                f" got {redact_url(self.redis_url)!r}"
            )


def redact_url(url: str) -> str:
    """``url`` without its password, for messages and logs."""
    return re.sub(r"(://[^:/@]*):[^@/]*@", r"\1:***@", url)


class PipelineConfig(_Section, frozen=True):
    """``[pipeline]``: the operators between the upstream and the journal."""

    coalesce: bool = True
    coalesce_max_delay_ms: NonNegFloat = 0.0
    coalesce_max_chars: PosInt = 4096
    throttle_ms: NonNegFloat = 0.0
    pace_chars_per_s: NonNegFloat = 0.0
    pace_max_lag_ms: NonNegFloat = 1000.0
    retry_max_attempts: PosInt = 3
    retry_backoff_base_ms: NonNegFloat = 200.0
    retry_backoff_max_ms: NonNegFloat = 5000.0
    first_token_timeout_s: NonNegFloat = 120.0
    idle_timeout_s: NonNegFloat = 60.0
    total_timeout_s: NonNegFloat = 0.0
    continue_on_failure: bool = False


class LogConfig(_Section, frozen=True):
    """``[log]``: log level and format."""

    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["text", "json"] = "text"


class AuthConfig(_Section, frozen=True):
    """``[auth]``: client API keys, EventSource tickets and CORS origins."""

    api_keys_env: str = "STREAMSVC_API_KEYS"
    ticket_ttl_s: PosFloat = 60.0
    ticket_secret_env: str = "STREAMSVC_TICKET_SECRET"
    cors_origins: list[str] = []

    def api_keys(self, env: Mapping[str, str] | None = None) -> list[str]:
        """The client keys from ``api_keys_env`` (comma-separated); empty means auth is off."""
        raw = (os.environ if env is None else env).get(self.api_keys_env, "")
        return [key.strip() for key in raw.split(",") if key.strip()]

    def ticket_secret(self, env: Mapping[str, str] | None = None) -> str | None:
        """The shared ticket signing secret from ``ticket_secret_env``; None when unset."""
        return (os.environ if env is None else env).get(self.ticket_secret_env) or None


class LimitsConfig(_Section, frozen=True):
    """``[limits]``: concurrent streams and request rates (0 turns a limit off)."""

    max_streams: NonNegInt = 1000
    max_streams_per_key: NonNegInt = 20
    requests_per_minute_per_key: NonNegInt = 600


class UpstreamConfig(_Section, frozen=True):
    """``[upstreams.NAME]``: one OpenAI-compatible server (or the built-in simulator)."""

    base_url: str
    api: Literal["chat", "responses"] = "chat"
    api_key_env: str | None = None
    headers: dict[str, str] = {}
    query: dict[str, str] = {}
    connect_timeout_s: PosFloat = 10.0
    read_timeout_s: PosFloat = 300.0
    continuation_body: dict[str, Any] = {}

    def __post_init__(self) -> None:
        if self.base_url != BUILTIN_SIMULATOR and not re.match(r"https?://[^/]", self.base_url):
            raise ValueError(
                f"@base_url: expected an http(s):// URL or {BUILTIN_SIMULATOR!r},"
                f" got {self.base_url!r}"
            )

    def api_key(self) -> str | None:
        """The key from the named environment variable; None when unset or unnamed."""
        return os.environ.get(self.api_key_env) if self.api_key_env else None


class RouteConfig(_Section, frozen=True):
    """``[[routes]]``: a model-name glob and the upstreams that serve it, in fallback order."""

    model: str
    upstreams: Annotated[list[str], msgspec.Meta(min_length=1)]
    continue_on_failure: bool | None = None
    """Overrides ``pipeline.continue_on_failure`` for this route."""

    def matches(self, model: str) -> bool:
        """Whether this route serves ``model`` (glob, case-sensitive)."""
        return fnmatch.fnmatchcase(model, self.model)


def _unknown_upstreams(routes: list[list[str]], upstreams: Mapping[str, Any]
                       ) -> list[tuple[str, str]]:
    """(key, message) for every upstream a route names that ``[upstreams]`` does not define.

    ``routes``: each route's list of upstream names.
    """
    return [
        (f"routes[{i}].upstreams[{j}]",
         f"names upstream {name!r}, which is not defined under [upstreams]")
        for i, names in enumerate(routes)
        for j, name in enumerate(names)
        if name not in upstreams
    ]


def _default_upstreams() -> dict[str, UpstreamConfig]:
    return {"simulator": UpstreamConfig(base_url=BUILTIN_SIMULATOR)}


def _default_routes() -> list[RouteConfig]:
    # The simulator's own models (streamsvc.simulator.MODELS), by name: any other model
    # gets 404 model_not_found, as from a real upstream, not the simulator's prose.
    return [RouteConfig(model=model, upstreams=["simulator"])
            for model in ("echo", "sim-small", "sim-large")]


class Config(_Section, frozen=True):
    """The whole configuration; the defaults are ``config/streamsvc.toml``."""

    server: ServerConfig = msgspec.field(default_factory=ServerConfig)
    journal: JournalConfig = msgspec.field(default_factory=JournalConfig)
    pipeline: PipelineConfig = msgspec.field(default_factory=PipelineConfig)
    log: LogConfig = msgspec.field(default_factory=LogConfig)
    auth: AuthConfig = msgspec.field(default_factory=AuthConfig)
    limits: LimitsConfig = msgspec.field(default_factory=LimitsConfig)
    upstreams: dict[str, UpstreamConfig] = msgspec.field(default_factory=_default_upstreams)
    routes: list[RouteConfig] = msgspec.field(default_factory=_default_routes)

    def __post_init__(self) -> None:
        for key, message in _unknown_upstreams([r.upstreams for r in self.routes],
                                               self.upstreams):
            raise ValueError(f"@{key}: {message}")

    def route(self, model: str) -> RouteConfig | None:
        """The first route whose glob matches ``model``."""
        for route in self.routes:
            if route.matches(model):
                return route
        return None

    def models(self) -> list[str]:
        """Model names the routes serve: the globs without wildcard characters."""
        return [r.model for r in self.routes if not any(c in r.model for c in "*?[")]


_PATH = re.compile(r" - at `\$\.?([^`]*)`$")
# A __post_init__ check names its field as "@field: message".
_OWN_FIELD = re.compile(r"^@([^:]+): ")
# Variables that look like overrides but are not: the config names them (keys, secret), or
# they choose the file.
_FILE_VARIABLE = "STREAMSVC_CONFIG"


def _join(prefix: str, key: str) -> str:
    if not prefix:
        return key
    return f"{prefix}{key}" if key.startswith("[") else f"{prefix}.{key}"


def _key_of(message: str, prefix: str = "") -> tuple[str, str]:
    """Split a msgspec error into (dotted key, message without the location)."""
    key = prefix
    found = _PATH.search(message)
    if found:
        key = _join(prefix, found.group(1))
        message = message[: found.start()]
    own = _OWN_FIELD.match(message)
    if own:
        key = _join(key, own.group(1))
        message = message[own.end() :]
    return key or "(top level)", message


def _unknown_key(key: str, known: list[str]) -> str:
    """The message for a key that is not one: with the nearest known key, when one is near."""
    near = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
    return f"unknown key; did you mean {near[0]!r}?" if near else "unknown key"


def _allowed(tp: Any) -> tuple[Any, ...]:
    """The values a ``Literal`` type allows (also under ``| None`` or ``Annotated``); else ()."""
    if get_origin(tp) is Literal:
        return get_args(tp)
    return next((v for arg in get_args(tp) if (v := _allowed(arg))), ())


def _check_value(value: Any, tp: Any, key: str, problems: list[tuple[str, str]]) -> None:
    """Every problem of ``value`` as a ``tp`` into ``problems``, each with its dotted key.

    msgspec stops at the first error, so structs, tables and lists of structs
    are walked here, field by field and item by item.
    """
    if isinstance(tp, type) and issubclass(tp, msgspec.Struct):
        _check_struct(value, tp, key, problems)
        return
    args = get_args(tp)
    if get_origin(tp) is dict and isinstance(value, dict):
        for name, item in value.items():
            _check_value(item, args[1], _join(key, str(name)), problems)
        return
    if (get_origin(tp) is list and isinstance(value, list) and isinstance(args[0], type)
            and issubclass(args[0], msgspec.Struct)):
        for i, item in enumerate(value):
            _check_value(item, args[0], f"{key}[{i}]", problems)
        return
    try:
        msgspec.convert(value, tp)
    except msgspec.ValidationError as exc:
        allowed = _allowed(tp)
        if allowed and value not in allowed:
            problems.append((key, "expected one of " + ", ".join(map(repr, allowed))
                             + f", got {value!r}"))
        else:
            problems.append(_key_of(str(exc), key))


def _check_struct(value: Any, cls: type[msgspec.Struct], key: str,
                  problems: list[tuple[str, str]]) -> None:
    if not isinstance(value, dict):
        problems.append((key or "(top level)",
                         f"Expected `object`, got `{type(value).__name__}`"))
        return
    fields = {f.encode_name: f for f in msgspec.structs.fields(cls)}
    before = len(problems)
    for name, item in value.items():
        if name not in fields:
            problems.append((_join(key, name), _unknown_key(name, list(fields))))
        else:
            _check_value(item, fields[name].type, _join(key, name), problems)
    problems.extend((_join(key, name), "missing: this key is required")
                    for name, field in fields.items() if field.required and name not in value)
    if len(problems) == before and cls is not Config:
        # The fields are right one by one: now the checks across them (__post_init__).
        try:
            msgspec.convert(value, cls)
        except msgspec.ValidationError as exc:
            problems.append(_key_of(str(exc), key))


def _override_keys() -> list[str]:
    """Every ``section.key`` of the sections that environment variables can reach."""
    return [f"{section.encode_name}.{f.encode_name}"
            for section in msgspec.structs.fields(Config)
            if isinstance(section.type, type) and issubclass(section.type, msgspec.Struct)
            for f in msgspec.structs.fields(section.type)]


def _stray_variables(env: Mapping[str, str], config: Config) -> list[str]:
    """Warnings for ``STREAMSVC_*`` variables that are no override and that the config names not.

    ``STREAMSVC_SERVER_PORT`` (single underscores) is the usual slip: it is
    ignored, so it is said, with the override it was probably meant to be.
    """
    named = {_FILE_VARIABLE, config.auth.api_keys_env, config.auth.ticket_secret_env}
    named |= {u.api_key_env for u in config.upstreams.values() if u.api_key_env}
    spelled = {key.replace(".", "_").upper(): key for key in _override_keys()}
    warnings = []
    for name in sorted(env):
        if not name.startswith("STREAMSVC_") or name.startswith(ENV_PREFIX) or name in named:
            continue
        meant = spelled.get(name.removeprefix("STREAMSVC_"))
        hint = (f"; did you mean {ENV_PREFIX}{meant.replace('.', '__').upper()} (sets {meant})?"
                if meant else "")
        warnings.append(
            f"environment {name}: ignored: overrides are {ENV_PREFIX}SECTION__KEY (double"
            f" underscores), and the config names no variable {name}{hint}"
        )
    return warnings


def _lookup(raw: Any, key: str) -> tuple[bool, Any]:
    node = raw
    for part in re.findall(r"[^.\[\]]+|\[\d+\]", key):
        if part.startswith("[") and isinstance(node, list) and int(part[1:-1]) < len(node):
            node = node[int(part[1:-1])]
        elif isinstance(node, dict) and part in node:
            node = node[part]
        else:
            return False, None
    return True, node


def _parse_env_value(text: str) -> Any:
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def _set_path(raw: dict[str, Any], path: list[str], value: Any) -> None:
    node = raw
    for part in path[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            child = node[part] = {}
        node = child
    node[path[-1]] = value


@dataclass(frozen=True, kw_only=True, slots=True)
class LoadedConfig:
    """A config and how it was made: for the start-up log and ``streamsvc config check``.

    Attributes:
        config: the result.
        source: the file, or ``"built-in defaults"``.
        overrides: ``(variable, dotted key)`` of each environment override applied.
        warnings: what was set but had no effect (a mistyped ``STREAMSVC_*`` variable).
    """

    config: Config
    source: str
    overrides: tuple[tuple[str, str], ...]
    warnings: tuple[str, ...]


def load_config(
    path: str | os.PathLike[str] | None = None,
    *,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
    sections: Mapping[str, Any] | None = None,
) -> Config:
    """Load the config: ``path`` (or the built-in defaults), then env, then ``overrides``.

    Args:
        path: a TOML file; None means the defaults (``config/streamsvc.toml``).
        env: the environment to read ``STREAMSVC__SECTION__KEY`` overrides from
            (default ``os.environ``).
        overrides: dotted keys from CLI flags, e.g. ``{"server.port": 9000}``.
        sections: whole sections a flag puts in place of the file's (``--upstream``
            sets ``upstreams`` and ``routes``), before the environment: so
            ``STREAMSVC__UPSTREAMS__UPSTREAM__READ_TIMEOUT_S`` applies to them.

    Raises:
        ConfigError: with every problem found, each naming the file, variable or
            flag and the key.
    """
    return read_config(path, env=env, overrides=overrides, sections=sections).config


def read_config(
    path: str | os.PathLike[str] | None = None,
    *,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
    sections: Mapping[str, Any] | None = None,
) -> LoadedConfig:
    """:func:`load_config`, with the overrides it applied and its warnings."""
    env = os.environ if env is None else env
    source = str(path) if path is not None else "built-in defaults"
    raw: dict[str, Any] = {}
    if path is not None:
        try:
            raw = tomllib.loads(Path(path).read_text(encoding="utf-8"))
        except FileNotFoundError as exc:
            raise ConfigError("file not found", source=source, key="(file)") from exc
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"cannot read: {exc}", source=source, key="(file)") from exc
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"not valid TOML: {exc}", source=source, key="(file)") from exc

    for name, value in (sections or {}).items():
        raw[name] = copy.deepcopy(value)
    routes_missing = "upstreams" in raw and "routes" not in raw
    if routes_missing:
        raw["routes"] = []  # reported below, once the upstreams themselves are known good
    if "upstreams" not in raw:
        # The default upstreams (and their routes) take overrides like any other key.
        defaults = msgspec.to_builtins(Config())
        raw["upstreams"] = defaults["upstreams"]
        raw.setdefault("routes", defaults["routes"])

    # Remember who set each key, so an error names the variable or flag, not the file.
    before_overrides = copy.deepcopy(raw)  # the file, or the defaults it leaves out
    origin: dict[str, str] = {}
    applied: list[tuple[str, str]] = []
    for name, value in sorted(env.items()):
        if not name.startswith(ENV_PREFIX):
            continue
        parts = [p.lower() for p in name[len(ENV_PREFIX) :].split("__")]
        if len(parts) < 2 or not all(parts):
            raise ConfigError(
                "expected STREAMSVC__SECTION__KEY", source=f"environment {name}", key=name
            )
        _set_path(raw, parts, _parse_env_value(value))
        origin[".".join(parts)] = f"environment {name}"
        applied.append((name, ".".join(parts)))
    for key, value in (overrides or {}).items():
        _set_path(raw, key.split("."), value)
        origin[key] = "command line"
    for name in sections or {}:  # last: a variable's own key is blamed before its section
        origin.setdefault(name, "command line")

    def blame(key: str) -> str:
        blamed = next(
            (who for k, who in origin.items() if key == k or key.startswith(k + ".")), None
        )
        if blamed is None and not _lookup(before_overrides, key)[0]:
            # An unknown section or upstream that only a variable or flag brought in.
            blamed = next((who for k, who in origin.items() if k.startswith(key + ".")), None)
        return blamed or source

    problems: list[tuple[str, str]] = []
    _check_struct(raw, Config, "", problems)
    if isinstance(raw.get("upstreams"), dict) and not any(
            key.startswith(("routes", "(top level)")) for key, _ in problems):
        # The routes are well formed: do they name upstreams that exist?
        problems += _unknown_upstreams([r["upstreams"] for r in raw["routes"]], raw["upstreams"])
    if routes_missing:
        problems.append(("routes", "missing: a file that defines [upstreams] must also define"
                                   " [[routes]] naming them"))
    if problems:
        found = []
        for key, message in problems:
            present, value = _lookup(raw, key)
            if (present and not message.startswith(("unknown key", "missing"))
                    and "got" not in message and repr(value) not in message):
                message = f"{message}, got {value!r}"
            found.append(ConfigProblem(blame(key), key, message))
        first, *more = found
        raise ConfigError(first.message, source=first.source, key=first.key, more=more)
    config = msgspec.convert(raw, Config)
    return LoadedConfig(config=config, source=source, overrides=tuple(applied),
                        warnings=tuple(_stray_variables(env, config)))
