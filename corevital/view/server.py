"""`corevital view`'s local web server: the app's own files and a JSON API over view/data.py.

Routes (nothing else exists; any other path, `..` and absolute paths included, is 404):

    /                          the app (index.html); pages are its #/ routes (docs/view.md)
    /static/<name>             one of the app's files, by name from STATIC (never a path)
    /api/meta                  counts and the filters' choices
    /api/traces?...            a window of the sweep list under filters and a sort
    /api/trace/<id>            one trace: header, per-row and per-(row, layer) values, top-k
    /api/siblings/<id>         traces of the same prompt (for side by side)
    /api/evaluation            evaluate's signal table and ROC curves

Every response carries a Content-Security-Policy that allows only the server's own scripts and
styles (no inline script, no other origin). With a non-loopback host a secret token guards
every request: the printed URL carries it, the first request with it sets a cookie, and a
request with neither gets 403.
"""

from __future__ import annotations

import http.server
import ipaddress
import re
import secrets
import socket
import threading
import urllib.parse
from importlib import resources
from pathlib import Path

import orjson

from corevital.view.data import NotFound, Sweep

CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
    "font-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
STATIC = {"app.js": "text/javascript", "app.css": "text/css", "index.html": "text/html"}
TRACE_ID = re.compile(r"^[0-9A-Za-z_.:-]{1,200}$")
COOKIE = "corevital_token"


def static_bytes(name: str) -> bytes:
    """One of the app's files, shipped in the package (corevital/view/static/)."""
    return resources.files("corevital.view").joinpath("static", name).read_bytes()


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(socket.gethostbyname(host)).is_loopback
    except (OSError, ValueError):
        return False


class Handler(http.server.BaseHTTPRequestHandler):
    """One request; `server` is a ViewServer (its sweep and token)."""

    server: "ViewServer"
    protocol_version = "HTTP/1.1"

    def log_message(self, format, *args):  # requests are not logged: URLs carry trace ids and tokens
        pass

    def do_GET(self):  # noqa: N802 (http.server's name)
        url = urllib.parse.urlsplit(self.path)
        params = dict(urllib.parse.parse_qsl(url.query))
        cookie = self._authorised(params)
        if cookie is False:
            return self._send(403, b"403: this server needs the token of the URL it printed\n", "text/plain")
        try:
            status, body, kind = self._route(url.path, params)
        except NotFound:
            status, body, kind = 404, b"404: no such trace\n", "text/plain"
        except Exception as e:  # a bad query or an unreadable file: one line, the server goes on
            status, body, kind = 500, f"500: {type(e).__name__}\n".encode(), "text/plain"
        self._send(status, body, kind, cookie if isinstance(cookie, str) else None)

    def _authorised(self, params: dict) -> bool | str | None:
        """True (no token needed, or the cookie holds it), the cookie to set (the query holds
        it), or False."""
        token = self.server.token
        if token is None:
            return True
        if secrets.compare_digest(params.get("token", ""), token):
            return f"{COOKIE}={token}; HttpOnly; SameSite=Strict; Path=/"
        for part in (self.headers.get("Cookie") or "").split(";"):
            name, _, value = part.strip().partition("=")
            if name == COOKIE and secrets.compare_digest(value, token):
                return True
        return False

    def _route(self, path: str, params: dict) -> tuple[int, bytes, str]:
        sweep = self.server.sweep
        parts = path.split("/")[1:]  # "/api/trace/x" -> ["api", "trace", "x"]
        if path in ("/", "/index.html"):
            return 200, static_bytes("index.html"), STATIC["index.html"]
        if len(parts) == 2 and parts[0] == "static" and parts[1] in STATIC:
            return 200, static_bytes(parts[1]), STATIC[parts[1]]
        if parts[:1] == ["api"]:
            if parts == ["api", "meta"]:
                return self._json(sweep.meta())
            if parts == ["api", "traces"]:
                return self._json(sweep.list(params))
            if parts == ["api", "evaluation"]:
                return self._json(sweep.evaluation())
            if len(parts) == 3 and parts[1] in ("trace", "siblings"):
                trace_id = urllib.parse.unquote(parts[2])
                if TRACE_ID.match(trace_id):
                    return self._json(sweep.trace(trace_id) if parts[1] == "trace" else sweep.siblings(trace_id))
        return 404, b"404: not found\n", "text/plain"

    @staticmethod
    def _json(value) -> tuple[int, bytes, str]:
        return 200, orjson.dumps(value, option=orjson.OPT_SERIALIZE_NUMPY), "application/json"

    def _send(self, status: int, body: bytes, kind: str, cookie: str | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", f"{kind}; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Content-Security-Policy", CSP)
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("Referrer-Policy", "no-referrer")
        self.send_header("Cache-Control", "no-store")
        if cookie:
            self.send_header("Set-Cookie", cookie)
        self.end_headers()
        self.wfile.write(body)


class ViewServer(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, sweep: Sweep, host: str = "127.0.0.1", port: int = 0, token: str | None = None):
        self.sweep, self.token = sweep, token
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.address_family = family
        super().__init__((host, port), Handler)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        shown = f"[{host}]" if ":" in host else host
        return f"http://{shown}:{port}/" + (f"?token={self.token}" if self.token else "")


def start(paths: list[Path], host: str = "127.0.0.1", port: int = 0) -> ViewServer:
    """A server over the traces under `paths`, listening (not yet serving: call serve_forever,
    or `serve_in_thread`); a non-loopback host gets a fresh token."""
    token = None if is_loopback(host) else secrets.token_urlsafe(24)
    return ViewServer(Sweep(paths), host, port, token)


def serve_in_thread(server: ViewServer) -> threading.Thread:
    thread = threading.Thread(target=server.serve_forever, name="corevital-view", daemon=True)
    thread.start()
    return thread
