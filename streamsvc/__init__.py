"""streamsvc: stream LLM answers to browsers and HTTP clients.

The public surface: the embedded API (:func:`chat_stream`, an
``Observable[Chunk]``), the bridge back to async code, the app factory, the
config loader and the error tree. Operators live in :mod:`streamsvc.operators`.
"""

from streamsvc.api import chat_stream
from streamsvc.chunks import Chunk
from streamsvc.config import Config, PipelineConfig, load_config
from streamsvc.errors import (
    ClientError,
    ConfigError,
    ErrorCode,
    StreamError,
    StreamsvcError,
    UpstreamError,
)
from streamsvc.reactive.bridge import ObservableIterator, aiter_observable, from_async_iterable
from streamsvc.server.app import create_app
from streamsvc.simulator import SimulatorServer

__version__ = "0.1.0"

__all__ = [
    "Chunk",
    "ClientError",
    "Config",
    "ConfigError",
    "ErrorCode",
    "ObservableIterator",
    "PipelineConfig",
    "SimulatorServer",
    "StreamError",
    "StreamsvcError",
    "UpstreamError",
    "__version__",
    "aiter_observable",
    "chat_stream",
    "create_app",
    "from_async_iterable",
    "load_config",
]
