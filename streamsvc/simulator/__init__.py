"""The built-in upstream: a real OpenAI-compatible streaming server (aiohttp).

Used by the tests, by ``streamsvc bench`` and, in process, as the relay's
default upstream when no key is configured. Endpoints::

    GET  /v1/models             "echo", "sim-small", "sim-large" in OpenAI's list shape
    POST /v1/chat/completions   OpenAI chat completions, streamed or not
    GET  /_sim/stats            {"requests", "active", "completed", "disconnected"}
    GET  /_sim/requests         the last 50 chat requests: {"path", "headers", "body"}
    GET  /_sim/keys             per simulate.key: requests, and those after content was sent
    POST /_sim/reset            zero the counters, forget the requests and fail counters

Model ``echo`` streams the last user message back in tokens that carry
their leading white space (see :mod:`streamsvc.simulator.text`); every
other model streams deterministic prose. The stream is byte-for-byte
OpenAI's wire format: ``data: <chat.completion.chunk>`` events, a role
chunk first, one chunk per token, a finish chunk, an optional usage chunk,
then ``data: [DONE]``.

Everything else is chosen per request by an extra body field, so tests and
benchmarks drive the simulator from the client side::

    "simulate": {"rate": 20, "first_token_delay": 0.5, "tokens": 200,
                 "fault": "drop", "fault_at": 5, "retry_after": 1,
                 "fail_times": 2, "key": "retry-test-1"}

Where this departs from a plain reading of that contract, on purpose:

- ``malformed`` inserts the broken event before token ``fault_at`` and
  loses no token, so a relay that skips the bad event can still be checked
  for lossless text; ``split_surrogates`` likewise loses nothing: the text,
  its UTF-16 halves joined, is the answer's.
- ``fail_times`` limits every fault, not only ``429``/``500``: "drop twice,
  then succeed" is as useful to a retry test as "429 twice".
- ``drop`` counts as ``completed``: the simulator ended the stream as
  asked; ``disconnected`` counts only clients that left on their own.
- ``/_sim/reset`` leaves ``active`` alone: it is a gauge of the streams
  running now, and zeroing it would drive it negative when they end.

The modules, one job each::

    text.py       the models, and the tokens each answers (echo, generated prose)
    request.py    the request as the simulator reads it: OpenAI's fields through
                  streamsvc.validation (as the relay checks them), plus ``simulate``
                  and the simulator's own bounds on ``n`` and token counts
    faults.py     the Fault set and what each fault sends
    encoding.py   chat.completion.chunk events and chat.completion bodies
    stats.py      the live counters
    app.py        the aiohttp app: the handlers and the coroutine of one answer
    server.py     SimulatorServer (a real socket) and ``streamsvc simulate``
"""

from streamsvc.simulator.app import SIMULATOR_STATS_KEY, create_simulator_app
from streamsvc.simulator.encoding import ChunkEncoder
from streamsvc.simulator.faults import Fault
from streamsvc.simulator.request import SimulateOptions, parse_chat_request
from streamsvc.simulator.server import DEFAULT_HOST, SimulatorServer, serve_simulator
from streamsvc.simulator.stats import SimulatorStats
from streamsvc.simulator.text import (
    DEFAULT_TOKENS,
    ECHO_MODEL,
    MAX_TOKEN_CHARS,
    MODELS,
    echo_tokens,
    generated_tokens,
)

__all__ = [
    "DEFAULT_HOST",
    "DEFAULT_TOKENS",
    "ECHO_MODEL",
    "MAX_TOKEN_CHARS",
    "MODELS",
    "SIMULATOR_STATS_KEY",
    "ChunkEncoder",
    "Fault",
    "SimulateOptions",
    "SimulatorServer",
    "SimulatorStats",
    "create_simulator_app",
    "echo_tokens",
    "generated_tokens",
    "parse_chat_request",
    "serve_simulator",
]
