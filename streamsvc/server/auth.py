"""Client API keys, EventSource tickets, stream ownership, and the step that checks them.

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
reconnects by re-sending the same URL, so once used, a ticket is bound to
*its* stream and stays good for resuming it while the binding lives:
``journal.retention_s + auth.ticket_ttl_s`` from its last use (a chat
ticket: also that long after the stream it started ended, since the process
that ran the stream binds it again then). Each stream is owned by the key that
created it; another key, or a ticket minted for another stream, gets ``403``.

The owner is the ``"owner"`` of the stream's journal meta, so it is known
wherever the journal is. Ticket bindings live in a
:class:`~streamsvc.server.tickets.TicketStore`: this process's memory, or
Redis with ``journal.backend = "redis"`` (then a reconnect works on any
instance, and a chat ticket starts one stream across all of them). Several
instances must sign with one secret: tickets and key ids (which name owners
and limit counters) derive from it. It is ``auth.ticket_secret_env``'s, or,
when that is unset and the journal is Redis, one the first instance made and
left in Redis for the others (:meth:`Auth.use_secret`).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import secrets
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from itsdangerous import BadSignature, URLSafeSerializer

from streamsvc.config import AuthConfig
from streamsvc.errors import ClientError, ErrorCode, StreamsvcError
from streamsvc.server.state import AUTH, JOURNAL, KEY_ID, LIMITER, TICKET
from streamsvc.server.tickets import IN_USE, MemoryTicketStore, TicketStore

__all__ = ["Auth", "Ticket", "authorize", "needs_key"]

log = logging.getLogger("streamsvc")

# The endpoints that take ``?ticket=`` instead of the Authorization header.
TICKET_ROUTES = {"/v1/chat/stream", "/v1/streams/{stream_id}/events"}


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
    """The keys, the ticket signer, and the ticket bindings.

    ``tickets`` is a :class:`MemoryTicketStore` until the app replaces it
    (with the Redis store, for several instances) before serving.

    Args:
        config: the ``[auth]`` section.
        retention_s: how long an ended stream stays readable (``journal.retention_s``);
            a ticket binding lives that long plus ``ticket_ttl_s`` (``binding_ttl_s``).
        env: where the keys and the secret are read (default ``os.environ``).
    """

    def __init__(self, config: AuthConfig, *, retention_s: float,
                 env: Mapping[str, str] | None = None) -> None:
        self.config = config
        secret = config.ticket_secret(env)
        self.shared_secret = secret is not None
        self._secret_from = (f"the shared secret from {config.ticket_secret_env}"
                             if secret is not None else
                             f"a random per-process secret (set {config.ticket_secret_env}"
                             " when several instances serve the same streams)")
        self._keys: dict[str, bytes] = {}
        self._sign_with(secret.encode() if secret is not None else secrets.token_bytes(32),
                        [key.encode() for key in config.api_keys(env)])
        self.binding_ttl_s = retention_s + config.ticket_ttl_s
        self.tickets: TicketStore = MemoryTicketStore(ttl_s=self.binding_ttl_s)
        self._tasks: set[asyncio.Task[None]] = set()  # bindings renewed as streams end

    def _sign_with(self, secret: bytes, keys: list[bytes]) -> None:
        self._secret = secret
        self._keys = {self.key_id(key.decode()): key for key in keys}
        self._serializer = URLSafeSerializer(
            self._secret, salt="streamsvc-ticket",
            signer_kwargs={"digest_method": hashlib.sha256},
        )

    def use_secret(self, secret: str, source: str) -> None:
        """Sign tickets and name keys with ``secret`` (shared by the instances) from now on.

        For the app's start-up, before any request: tickets minted and key ids
        handed out before would no longer match. ``source`` is said by
        :meth:`describe`.
        """
        self._sign_with(secret.encode(), list(self._keys.values()))
        self.shared_secret = True
        self._secret_from = source

    @property
    def enabled(self) -> bool:
        return bool(self._keys)

    def describe(self) -> str:
        """The start-up log line: on or off, how many keys; never a key."""
        if not self.enabled:
            return (f"auth: off ({self.config.api_keys_env} is unset or empty): /v1/* is open"
                    " to every client")
        return (f"auth: on, {len(self._keys)} API keys from {self.config.api_keys_env};"
                f" tickets signed with {self._secret_from}")

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

    async def admit(self, ticket: Ticket, stream_id: str | None) -> str | None:
        """Check a ticket against the stream asked for; returns the stream it is bound to.

        ``stream_id`` is the stream the request reads (None: a one-shot GET
        that starts one). A ticket not used yet must be within its TTL; a
        chat ticket is then claimed (atomically, across instances with Redis),
        and None means the caller starts its stream and calls
        :meth:`bind_started` (or :meth:`release_unstarted` when it fails).
        """
        bound = await self.tickets.get(ticket.nonce)
        if bound is None:
            if ticket.expired:
                raise _unauthorized("ticket expired")
            if ticket.scope == "stream":
                if ticket.stream_id is None or stream_id != ticket.stream_id:
                    raise _forbidden("ticket: it was issued for another stream")
                await self.tickets.bind(ticket.nonce, ticket.stream_id)
                return ticket.stream_id
            if stream_id is not None:
                raise _forbidden("ticket: it did not start this stream")
            bound = await self.tickets.claim(ticket.nonce)
            if bound is None:
                return None
            # Another request (maybe on another instance) used it first: judged by what it holds.
        if bound == IN_USE:
            raise _forbidden("ticket: already used to start a stream")
        if stream_id is not None and stream_id != bound:
            raise _forbidden("ticket: it was issued for another stream")
        return bound

    async def release_unstarted(self, ticket: Ticket) -> None:
        """A chat ticket's stream did not start: it may be used again (within its TTL).

        Never raises for the store (the caller is already answering an error);
        a claim that could not be freed expires with its binding.
        """
        if ticket.scope != "chat":
            return
        try:
            await self.tickets.release(ticket.nonce)
        except StreamsvcError as exc:
            log.warning("auth: could not free an unused chat ticket (%s)", exc.code)

    async def bind_started(self, stream_id: str, ended: asyncio.Future[None],
                           ticket: Ticket | None) -> None:
        """Bind the chat ticket that started ``stream_id`` to it, and again when it ends.

        The second binding keeps the ticket good for ``binding_ttl_s`` after
        the end, however long the stream ran. Never raises for the store: the
        stream has started, and freeing the claim would let the ticket start
        another (a binding that failed leaves the claim: reconnects get 403).
        """
        if ticket is None or ticket.scope != "chat":
            return
        nonce = ticket.nonce
        ended.add_done_callback(lambda _: self._bind_soon(nonce, stream_id))
        # Shielded: a client that hangs up now must not leave its stream unbound.
        await asyncio.shield(self._bind_soon(nonce, stream_id))

    def _bind_soon(self, nonce: str, stream_id: str) -> asyncio.Task[None]:
        task = asyncio.get_running_loop().create_task(self._bind(nonce, stream_id))
        self._tasks.add(task)  # held until done, and awaited by close()
        task.add_done_callback(self._tasks.discard)
        return task

    async def _bind(self, nonce: str, stream_id: str) -> None:
        try:
            await self.tickets.bind(nonce, stream_id)
        except StreamsvcError as exc:
            log.warning("auth: could not bind a chat ticket to stream %s (%s)", stream_id,
                        exc.code)

    async def close(self) -> None:
        """Finish the pending bindings, then close the ticket store (app shutdown)."""
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=5.0)
        await self.tickets.close()

    # -- ownership ---------------------------------------------------------------------------

    async def check_owner(self, request: web.Request, stream_id: str) -> None:
        """403 when the request's key did not create the stream; nothing when auth is off.

        The owner is the ``"owner"`` in the stream's journal meta (any
        instance's, with Redis); an unknown stream, or one created with auth
        off, has none and passes here (the caller answers 404 for unknown).
        """
        key_id = request.get(KEY_ID)
        if key_id is None:
            return
        meta = await request.app[JOURNAL].meta(stream_id)
        owner = None if meta is None else meta.get("owner")
        if owner is not None and owner != key_id:
            raise _forbidden(f"stream {stream_id} belongs to another API key")


def needs_key(request: web.Request) -> bool:
    """Whether :func:`authorize` has anything to check: ``/v1/*`` with auth on.

    CORS preflights (``OPTIONS``) pass: browsers send them without credentials.
    """
    return (request.app[AUTH].enabled and request.method != "OPTIONS"
            and request.path.startswith("/v1/"))


async def authorize(request: web.Request) -> None:
    """``/v1/*`` needs a key (or a ticket where EventSource reads); then the rate is counted.

    A step of ``request_middleware``, where a 401/403/429 gets the usual error body;
    only for a request that :func:`needs_key`.
    """
    auth = request.app[AUTH]
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
