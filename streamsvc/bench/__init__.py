"""``streamsvc bench``: what the relay costs, measured against a bare aiohttp relay.

Every part runs as its own process, so that each one's CPU and memory can be
read from ``/proc`` and none slows another down through a shared event loop::

    orchestrator (streamsvc bench) ── starts, samples /proc, reports
      ├── simulator        streamsvc simulate            (the upstream of every path)
      ├── relay under test streamsvc serve | baseline | nginx (relays once per --loop)
      ├── redis-server     the Redis journal path's own (when redis-server is installed)
      └── load client      python -m streamsvc.bench.load (K streams, one JSON result)

Modules, one job each:

- ``options``: the flags and their presets (``--quick``).
- ``load``: the load client process.
- ``baseline``: the byte-for-byte aiohttp relay (the control).
- ``nginx``: the nginx ``proxy_pass`` config (the floor, when nginx is installed).
- ``redis_server``: the ``redis-server`` command of the Redis journal path.
- ``procfs``: CPU seconds and RSS of a process, from ``/proc``.
- ``services``: starting, watching and stopping the processes.
- ``relays``: the simulator, baseline and streamsvc processes, and their warm-up.
- ``stats``: percentiles and distributions (pure).
- ``results``: the typed result records (load client, paths, targets, report).
- ``orchestrator``: the phases of one run, with a progress bar.
- ``paired``: ``--paired``, each streamsvc path at the same time as a baseline of its own.
- ``report``: targets, the table, the JSON file.
- ``plot``: the PNG (needs the ``plot`` extra).
- ``machine``: what machine the numbers come from.

Linux only: CPU time and memory come from ``/proc``.
"""
