"""nginx ``proxy_pass`` with buffering off: the floor, when an ``nginx`` binary is installed.

One process (``master_process off``, one worker's work in the foreground)
so that its CPU time is one ``/proc`` reading, with every path it writes
under a temporary prefix: nothing of the system's nginx is used or touched.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

__all__ = ["nginx_binary", "nginx_command", "nginx_version", "write_config"]

_CONFIG = """\
daemon off;
master_process off;
worker_processes 1;
worker_rlimit_nofile 16384;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;

events {{
    worker_connections 8192;
}}

http {{
    access_log off;
    client_body_temp_path {prefix}/client_body;
    proxy_temp_path {prefix}/proxy;
    fastcgi_temp_path {prefix}/fastcgi;
    uwsgi_temp_path {prefix}/uwsgi;
    scgi_temp_path {prefix}/scgi;

    upstream simulator {{
        server {upstream_host}:{upstream_port};
        keepalive 1024;
    }}

    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://simulator;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;
            proxy_read_timeout 300s;
        }}
    }}
}}
"""


def nginx_binary() -> str | None:
    """The ``nginx`` on PATH (also ``/usr/sbin``, where Debian puts it), or None."""
    return shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin:/usr/local/sbin")


def nginx_version(binary: str) -> str:
    """``nginx/1.22.1`` or the like (nginx prints it on stderr)."""
    result = subprocess.run([binary, "-v"], capture_output=True, text=True, timeout=10,
                            check=False)
    return (result.stderr or result.stdout).strip().removeprefix("nginx version: ")


def write_config(prefix: Path, *, port: int, upstream_host: str, upstream_port: int) -> Path:
    """Write ``prefix/nginx.conf`` relaying ``127.0.0.1:port`` to the upstream; returns it."""
    prefix.mkdir(parents=True, exist_ok=True)
    path = prefix / "nginx.conf"
    path.write_text(
        _CONFIG.format(prefix=prefix, port=port, upstream_host=upstream_host,
                       upstream_port=upstream_port),
        encoding="utf-8",
    )
    return path


def nginx_command(binary: str, prefix: Path, config: Path) -> list[str]:
    """The foreground command; ``-e`` keeps even start-up errors out of /var/log."""
    return [binary, "-p", str(prefix), "-c", str(config), "-e", str(prefix / "error.log")]
