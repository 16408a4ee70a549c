"""Sinks: where finished traces go. Every job keeps its traces in its own dir (writer.py);
`sink=http` also POSTs each one to a URL, and `sink._target_=my.module.MySink` adds any
`Sink` subclass, instantiated by Hydra with `sink.params` as keyword arguments.
"""

from __future__ import annotations

import abc
import gzip
import logging
import os
import time
import urllib.error
import urllib.request

from corevital.tracedoc import TraceDoc

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


class HTTPSink(Sink):
    """POSTs each trace as gzip-encoded JSON to `url`.

    Connection errors, timeouts and 5xx answers are retried `retries` times with exponential
    backoff (backoff_s, 2 x backoff_s, ...); a 4xx answer is not (the request itself is
    wrong). With `token_env` naming a set environment variable, its value is sent as a
    bearer token; it is read when sending and never stored, logged or put in a message.
    """

    def __init__(self, url: str, timeout_s: float = 10.0, retries: int = 3, backoff_s: float = 0.5,
                 token_env: str | None = "COREVITAL_HTTP_TOKEN"):
        self.url, self.timeout_s, self.retries, self.backoff_s, self.token_env = url, timeout_s, retries, backoff_s, token_env

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
                with urllib.request.urlopen(self._request(body), timeout=self.timeout_s) as resp:
                    resp.read()
                return self.url
            except urllib.error.HTTPError as e:
                why = f"HTTP {e.code} {e.reason}"
                if e.code < 500:
                    raise DeliveryError(f"{self.url} refused the trace: {why} (not retried)") from None
            except (urllib.error.URLError, OSError) as e:  # refused, unreachable, timed out
                why = str(getattr(e, "reason", None) or e) or type(e).__name__
            if attempt < self.retries:
                delay = self.backoff_s * 2 ** attempt
                log.warning("delivery to %s failed (%s); retry %d of %d in %.1f s", self.url, why, attempt + 1, self.retries, delay)
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
                self.gave_up[i] = str(e) if isinstance(e, DeliveryError) else f"{type(sink).__name__}: {type(e).__name__}: {e}"
                problems.append(self.gave_up[i])
        self.failures += bool(problems)
        return problems
