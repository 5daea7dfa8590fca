"""How streamsvc's own servers listen: one accept-queue depth for all of them.

``streamsvc serve``, the simulator and the benchmark's baseline relay use it,
so that a benchmark compares relays that queue connections alike.
"""

from __future__ import annotations

__all__ = ["LISTEN_BACKLOG"]

# The listen queue: aiohttp's default of 128 overflows when a thousand
# EventSources reconnect at once (after a deploy), and each dropped SYN costs
# its client a second or more. nginx uses 511, uvicorn and gunicorn 2048.
LISTEN_BACKLOG = 1024
