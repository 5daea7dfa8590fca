"""``GET /`` (the demo chat page) and ``GET /static/{name}`` (its files and the browser client).

The files ship inside the package (``streamsvc/static/``, package data), so a
plain ``pip install`` serves them: there is no build step and nothing comes
from a CDN. They are read once, on first use, and kept in memory; the set is
fixed, so a request can only ever name one of them (no path is joined from
user input, hence no traversal).

Every answer carries ``X-Content-Type-Options: nosniff`` and a
Content-Security-Policy that allows scripts, styles and connections from this
origin only and no inline script at all: model text is inserted as text, and
even if a bug ever inserted it as HTML, the browser would not run it.
Nothing here is templated, so no upstream key or prompt can reach the page.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import cache
from importlib import resources

from aiohttp import web

from streamsvc.errors import ClientError, ErrorCode

__all__ = ["CONTENT_SECURITY_POLICY", "CONTENT_TYPES", "routes", "static_files"]

routes = web.RouteTableDef()

# By extension, so that a module script is never refused for its type (module
# scripts must be served as JavaScript; `.mjs` is missing from some mimetypes tables).
CONTENT_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".mjs": "text/javascript; charset=utf-8",
    ".png": "image/png",
    ".svg": "image/svg+xml",
}

CONTENT_SECURITY_POLICY = (
    "default-src 'none'; "
    "script-src 'self'; "
    "style-src 'self'; "
    "connect-src 'self'; "
    "img-src 'self'; "
    "base-uri 'none'; "
    "form-action 'none'; "
    "frame-ancestors 'none'"
)

_PAGE = "index.html"
_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    # Revalidate every time (cheap: an ETag match is a 304), so an upgraded
    # package never runs next to a cached older client.
    "Cache-Control": "no-cache",
}


@dataclass(frozen=True, slots=True)
class StaticFile:
    """One shipped file, ready to answer."""

    body: bytes
    content_type: str
    etag: str  # strong: a hash of the body


@cache
def static_files() -> dict[str, StaticFile]:
    """The files of ``streamsvc/static/`` with a known type, by name (read once)."""
    files: dict[str, StaticFile] = {}
    for entry in resources.files("streamsvc").joinpath("static").iterdir():
        suffix = "." + entry.name.rpartition(".")[2]
        if not entry.is_file() or suffix not in CONTENT_TYPES:
            continue
        body = entry.read_bytes()
        etag = '"' + hashlib.sha256(body).hexdigest()[:32] + '"'
        files[entry.name] = StaticFile(body, CONTENT_TYPES[suffix], etag)
    return files


def _answer(request: web.Request, name: str) -> web.Response:
    file = static_files().get(name)
    if file is None:
        raise ClientError(f"{request.path[:200]}: no such file", code=ErrorCode.NOT_FOUND,
                          param="path")
    headers = {**_HEADERS, "ETag": file.etag}
    if file.etag in request.headers.get("If-None-Match", ""):
        return web.Response(status=304, headers=headers)
    return web.Response(body=file.body, headers={**headers, "Content-Type": file.content_type})


@routes.get("/")
async def demo_page(request: web.Request) -> web.Response:
    """The demo chat page (``static/index.html``)."""
    return _answer(request, _PAGE)


@routes.get("/static/{name}")
async def static_file(request: web.Request) -> web.Response:
    """A file of the page, or the browser client ``streamsvc.js`` / ``streamsvc.mjs``."""
    return _answer(request, request.match_info["name"])
