"""Sinks: where finished traces go. Every job keeps its traces in its own dir (writer.py);
`sink=http` also POSTs each one to a URL, and `sink._target_=my.module.MySink` adds any
`Sink` subclass, instantiated by Hydra with `sink.params` as keyword arguments.
"""

from __future__ import annotations

import abc
import gzip
import ipaddress
import logging
import os
import time
import urllib.error
import urllib.parse
import urllib.request

from corevital.core.config import ConfigError
from corevital.output.tracedoc import TraceDoc

log = logging.getLogger("corevital")


class Sink(abc.ABC):
    """Receives each finished trace (a `TraceDoc`: `.json` bytes, `.text()`, `.model()` for the
    pydantic `Trace`); `write` returns where it went (a path or URL) and raises
    `DeliveryError` (or any exception) when it could not deliver it. Sinks run on the job's
    writer thread, beside generation."""

    @abc.abstractmethod
    def write(self, report: TraceDoc) -> str: ...


class DeliveryError(RuntimeError):
    """A trace could not be delivered; the message says where and why (never a credential)."""


def trace_json(report: TraceDoc) -> str:
    return report.text()


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """Never follow a redirect: urllib would re-send the request, headers and bearer token
    included, to whatever host the answer names. The 3xx answer stays an HTTPError instead."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        return None


_OPENER = urllib.request.build_opener(_NoRedirect())


def is_loopback(url: str) -> bool:
    """Whether `url`'s host is this machine (localhost, 127.0.0.0/8, ::1)."""
    host = urllib.parse.urlsplit(url).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_plain_http(url: str, token_env: str | None, allow_plain_http: bool = False) -> None:
    """ConfigError when a bearer token would travel unencrypted over plain http:// to another
    machine (anyone on the path could read it), unless the user allowed it explicitly."""
    has_token = bool(token_env and os.environ.get(token_env))
    if has_token and not allow_plain_http and urllib.parse.urlsplit(url).scheme == "http" and not is_loopback(url):
        raise ConfigError(
            f"sink.url {url} is plain http:// to another host, so the token in ${token_env} would travel "
            f"unencrypted; use https://, or set sink.allow_plain_http=true if the network is trusted"
        )


class HTTPSink(Sink):
    """POSTs each trace as gzip-encoded JSON to `url`.

    Only a 2xx answer is a delivery. Connection errors, timeouts, 5xx and 3xx answers are
    retried `retries` times with exponential backoff (backoff_s, 2 x backoff_s, ...), then the
    trace counts as undelivered; a 4xx answer is not retried (the request itself is wrong). A
    redirect is never followed, so the token never reaches another host. With `token_env`
    naming a set environment variable, its value is sent as a bearer token; it is read when
    sending and never stored, logged or put in a message. A token over plain http:// to a
    host other than this machine is refused at construction (`check_plain_http`).
    """

    def __init__(
        self,
        url: str,
        timeout_s: float = 10.0,
        retries: int = 3,
        backoff_s: float = 0.5,
        token_env: str | None = "COREVITAL_HTTP_TOKEN",
        allow_plain_http: bool = False,
    ):
        check_plain_http(url, token_env, allow_plain_http)
        self.url, self.timeout_s, self.retries, self.backoff_s, self.token_env = (
            url,
            timeout_s,
            retries,
            backoff_s,
            token_env,
        )

    def _request(self, body: bytes) -> urllib.request.Request:
        headers = {"Content-Type": "application/json", "Content-Encoding": "gzip"}
        token = os.environ.get(self.token_env) if self.token_env else None
        if token:
            headers["Authorization"] = f"Bearer {token}"
        return urllib.request.Request(self.url, data=body, method="POST", headers=headers)

    def write(self, report: TraceDoc) -> str:
        body = gzip.compress(report.json)
        for attempt in range(self.retries + 1):
            try:
                with _OPENER.open(self._request(body), timeout=self.timeout_s) as resp:
                    resp.read()
                    if 200 <= resp.status < 300:
                        return self.url
                    why = f"HTTP {resp.status} {resp.reason}"  # 1xx: not a delivery
            except urllib.error.HTTPError as e:
                why = f"HTTP {e.code} {e.reason}"
                if 300 <= e.code < 400:
                    why += " (a redirect, not followed)"
                elif e.code < 500:
                    raise DeliveryError(f"{self.url} refused the trace: {why} (not retried)") from None
            except (urllib.error.URLError, OSError) as e:  # refused, unreachable, timed out
                why = str(getattr(e, "reason", None) or e) or type(e).__name__
            if attempt < self.retries:
                delay = self.backoff_s * 2**attempt
                log.warning(
                    "delivery to %s failed (%s); retry %d of %d in %.1f s",
                    self.url,
                    why,
                    attempt + 1,
                    self.retries,
                    delay,
                )
                time.sleep(delay)
        raise DeliveryError(f"could not deliver the trace to {self.url} after {self.retries + 1} attempt(s): {why}")


class Delivery:
    """Sends each trace to the sinks besides the job dir, and remembers what failed.

    After a sink's final failure (all retries spent) the job stops trying that sink: a
    server that is down costs one trace's retries, not every trace's.
    """

    def __init__(self, sinks: list[Sink]):
        self.sinks = sinks
        self.gave_up: dict[int, str] = {}  # index of a sink -> its final error
        self.failures = 0  # traces not delivered to some sink

    def send(self, report: TraceDoc) -> list[str]:
        """Deliver `report`; returns one message per sink that did not get it."""
        problems = []
        for i, sink in enumerate(self.sinks):
            if i in self.gave_up:
                problems.append(f"not delivered: gave up after an earlier trace's delivery failed ({self.gave_up[i]})")
                continue
            try:
                sink.write(report)
            except Exception as e:  # a custom sink may raise anything
                self.gave_up[i] = (
                    str(e) if isinstance(e, DeliveryError) else f"{type(sink).__name__}: {type(e).__name__}: {e}"
                )
                problems.append(self.gave_up[i])
        self.failures += bool(problems)
        return problems
