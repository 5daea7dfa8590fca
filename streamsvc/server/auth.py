"""Client API keys, EventSource tickets, stream ownership, and the middleware that checks them.

Auth is on when the variable named by ``auth.api_keys_env`` holds keys
(comma-separated); then every ``/v1/*`` request needs ``Authorization:
Bearer <key>`` (compared with :func:`hmac.compare_digest`). ``/healthz``,
``/readyz``, ``/metrics``, ``GET /`` and ``/static/*`` stay open.

EventSource cannot send headers, so the two GET endpoints it reads also take
``?ticket=``: a short-lived token signed with HMAC-SHA256 (``itsdangerous``,
a well-kept library for exactly this, with the digest set to SHA-256) over
the scope, the stream id, the expiry, the key *id* (an HMAC of the key, never
the key) and a nonce. Scopes:

* ``stream``: in the ``events_url`` of ``POST /v1/streams``, good for
  ``GET /v1/streams/{that id}/events`` only.
* ``chat``: from ``POST /v1/tickets``, good for one ``GET /v1/chat/stream``;
  it starts one stream, and the ticket is then bound to that stream.

A ticket must be first used within ``auth.ticket_ttl_s``. EventSource
reconnects by re-sending the same URL, so once used, a ticket stays good for
resuming *its* stream for as long as the stream is kept (until
``journal.retention_s`` after it ended). Each stream is owned by the key that
created it; another key, or a ticket minted for another stream, gets ``403``.

Ownership and ticket bindings live in this process (memory), like the
journal; several instances need them in Redis and a shared
``auth.ticket_secret_env``.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import secrets
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from itsdangerous import BadSignature, URLSafeSerializer

from streamsvc.config import AuthConfig
from streamsvc.errors import ClientError, ErrorCode
from streamsvc.server.limits import LIMITER

__all__ = ["AUTH", "KEY_ID", "TICKET", "Auth", "Ticket", "auth_middleware"]

log = logging.getLogger("streamsvc")

# The endpoints that take ``?ticket=`` instead of the Authorization header.
TICKET_ROUTES = {"/v1/chat/stream", "/v1/streams/{stream_id}/events"}
_IN_USE = ""  # a chat ticket whose stream is being started


def _unauthorized(message: str) -> ClientError:
    return ClientError(message, code=ErrorCode.UNAUTHORIZED)


def _forbidden(message: str) -> ClientError:
    return ClientError(message, code=ErrorCode.FORBIDDEN)


@dataclass(frozen=True)
class Ticket:
    """A verified ticket: its signature is good; expiry is checked where it is used."""

    scope: str  # "stream" | "chat"
    key_id: str
    stream_id: str | None
    expires: float  # time.time() seconds
    nonce: str

    @property
    def expired(self) -> bool:
        return time.time() > self.expires


class Auth:
    """The keys, the ticket signer, and which key owns which stream (this process).

    Args:
        config: the ``[auth]`` section.
        retention_s: how long an ended stream stays readable (``journal.retention_s``);
            its owner and ticket bindings are kept that long too.
        env: where the keys and the secret are read (default ``os.environ``).
    """

    def __init__(self, config: AuthConfig, *, retention_s: float,
                 env: Mapping[str, str] | None = None) -> None:
        self.config = config
        secret = config.ticket_secret(env)
        self.shared_secret = secret is not None
        self._secret = secret.encode() if secret is not None else secrets.token_bytes(32)
        self._keys = {self.key_id(key): key.encode() for key in config.api_keys(env)}
        self._serializer = URLSafeSerializer(
            self._secret, salt="streamsvc-ticket",
            signer_kwargs={"digest_method": hashlib.sha256},
        )
        self._retention_s = retention_s
        self._owners: dict[str, str] = {}  # stream id -> key id
        self._bound: dict[str, str] = {}  # ticket nonce -> stream id (or _IN_USE)
        self._nonces: dict[str, list[str]] = {}  # stream id -> nonces bound to it

    @property
    def enabled(self) -> bool:
        return bool(self._keys)

    def describe(self) -> str:
        """The start-up log line: on or off, how many keys; never a key."""
        if not self.enabled:
            return (f"auth: off ({self.config.api_keys_env} is unset or empty): /v1/* is open"
                    " to every client")
        secret = (f"the shared secret from {self.config.ticket_secret_env}" if self.shared_secret
                  else f"a random per-process secret (set {self.config.ticket_secret_env}"
                  " when several instances serve the same streams)")
        return (f"auth: on, {len(self._keys)} API keys from {self.config.api_keys_env};"
                f" tickets signed with {secret}")

    def key_id(self, key: str) -> str:
        """A stable, non-reversible name for a key (logs, limits, tickets)."""
        return hmac.new(self._secret, key.encode(), hashlib.sha256).hexdigest()[:16]

    def authenticate(self, header: str) -> str:
        """The key id for an ``Authorization`` header value; 401 when it is not a key."""
        scheme, _, key = header.partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            raise _unauthorized("Authorization: expected 'Bearer <API key>'")
        given = key.strip().encode()
        found = None
        for key_id, known in self._keys.items():  # every key compared: no early exit
            if hmac.compare_digest(given, known):
                found = key_id
        if found is None:
            raise _unauthorized("Authorization: the API key is not valid")
        return found

    # -- tickets -----------------------------------------------------------------------------

    def mint(self, scope: str, key_id: str, stream_id: str | None = None) -> tuple[str, float]:
        """A new ticket and its expiry (``time.time()`` seconds)."""
        expires = time.time() + self.config.ticket_ttl_s
        token = self._serializer.dumps({
            "scope": scope, "sid": stream_id, "kid": key_id, "exp": round(expires, 3),
            "n": secrets.token_hex(8),
        })
        return str(token), expires

    def verify(self, token: str) -> Ticket:
        """Check a ticket's signature and key; 401 naming the problem."""
        try:
            data: Any = self._serializer.loads(token)
            ticket = Ticket(scope=str(data["scope"]), key_id=str(data["kid"]),
                            stream_id=data["sid"], expires=float(data["exp"]),
                            nonce=str(data["n"]))
        except BadSignature as exc:
            raise _unauthorized("ticket signature invalid") from exc
        except (KeyError, TypeError, ValueError) as exc:
            raise _unauthorized("ticket signature invalid") from exc
        if ticket.key_id not in self._keys:
            raise _unauthorized("ticket: its API key is no longer valid")
        return ticket

    def admit(self, ticket: Ticket, stream_id: str | None) -> str | None:
        """Check a ticket against the stream asked for; returns the stream it is bound to.

        ``stream_id`` is the stream the request reads (None: a one-shot GET
        that starts one). A ticket not used yet must be within its TTL.
        """
        bound = self._bound.get(ticket.nonce)
        if bound == _IN_USE:
            raise _forbidden("ticket: already used to start a stream")
        if bound is None:
            if ticket.expired:
                raise _unauthorized("ticket expired")
            if ticket.scope == "stream" and stream_id != ticket.stream_id:
                raise _forbidden("ticket: it was issued for another stream")
            if ticket.scope == "chat" and stream_id is not None:
                raise _forbidden("ticket: it did not start this stream")
            if ticket.scope == "stream" and ticket.stream_id in self._owners:
                self._bind(ticket.nonce, ticket.stream_id)
            elif ticket.scope == "chat":
                self._bound[ticket.nonce] = _IN_USE  # bound once its stream exists
            return ticket.stream_id
        if stream_id is not None and stream_id != bound:
            raise _forbidden("ticket: it was issued for another stream")
        return bound

    def _bind(self, nonce: str, stream_id: str) -> None:
        self._bound[nonce] = stream_id
        self._nonces.setdefault(stream_id, []).append(nonce)

    def release_unstarted(self, ticket: Ticket) -> None:
        """A chat ticket's stream did not start: it may be used again (within its TTL)."""
        if self._bound.get(ticket.nonce) == _IN_USE:
            del self._bound[ticket.nonce]

    # -- ownership ---------------------------------------------------------------------------

    def own(self, stream_id: str, key_id: str | None, ended: asyncio.Future[None],
            ticket: Ticket | None = None) -> None:
        """Record who created a stream (and the chat ticket that did); forgotten after retention."""
        if key_id is None:
            return
        self._owners[stream_id] = key_id
        if ticket is not None and ticket.scope == "chat":
            self._bind(ticket.nonce, stream_id)
        loop = asyncio.get_running_loop()
        ended.add_done_callback(
            lambda _: loop.call_later(self._retention_s + 1.0, self._forget, stream_id)
        )

    def _forget(self, stream_id: str) -> None:
        self._owners.pop(stream_id, None)
        for nonce in self._nonces.pop(stream_id, []):
            self._bound.pop(nonce, None)

    def check_owner(self, request: web.Request, stream_id: str) -> None:
        """403 when the request's key did not create the stream; nothing when auth is off."""
        key_id = request.get(KEY_ID)
        if key_id is None:
            return
        owner = self._owners.get(stream_id)
        if owner is not None and owner != key_id:
            raise _forbidden(f"stream {stream_id} belongs to another API key")

    def tracked(self) -> int:
        """Streams whose owner is remembered (tests: nothing leaks)."""
        return len(self._owners)


AUTH = web.AppKey("auth", Auth)
KEY_ID = web.RequestKey("key_id", str)
TICKET = web.RequestKey("ticket", Ticket)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def auth_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """``/v1/*`` needs a key (or a ticket where EventSource reads); then the rate is counted.

    Runs inside ``error_middleware``, so a 401/403/429 gets the usual error body.
    CORS preflights (``OPTIONS``) pass: browsers send them without credentials.
    """
    auth = request.app[AUTH]
    if not auth.enabled or request.method == "OPTIONS" or not request.path.startswith("/v1/"):
        return await handler(request)
    header = request.headers.get("Authorization")
    resource = request.match_info.route.resource
    canonical = resource.canonical if resource is not None else ""
    if header is not None:
        key_id = auth.authenticate(header)
    elif "ticket" in request.query and request.method == "GET" and canonical in TICKET_ROUTES:
        ticket = auth.verify(request.query["ticket"])
        request[TICKET] = ticket
        key_id = ticket.key_id
    else:
        raise _unauthorized(
            "Authorization: missing; send 'Authorization: Bearer <API key>'"
            + (" or a ?ticket= from POST /v1/tickets" if canonical in TICKET_ROUTES else "")
        )
    request[KEY_ID] = key_id
    await request.app[LIMITER].check_rate(key_id)
    return await handler(request)
