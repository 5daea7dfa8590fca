"""``python -m streamsvc.bench.simulator --port N``: the bench's upstream.

``streamsvc simulate`` with its arguments, without the garbage collector's
pauses (:mod:`streamsvc.bench.collector` says why).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from streamsvc.bench.collector import collector_off
from streamsvc.cli import main as cli_main

__all__ = ["main"]


def main(argv: Sequence[str] | None = None) -> int:
    """Serve the simulator until SIGINT or SIGTERM, the collector off."""
    with collector_off():
        return cli_main(["simulate", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
