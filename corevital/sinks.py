"""Sinks: where finished traces go. Every job keeps its traces in its own dir (LocalFileSink);
`sink=http` also POSTs each one to a URL."""

from __future__ import annotations

import abc
import urllib.request
from pathlib import Path

from corevital.files import atomic_write_text
from corevital.trace import Trace


class Sink(abc.ABC):
    """Receives each finished trace; `write` returns where it went (a path or URL)."""

    @abc.abstractmethod
    def write(self, report: Trace) -> str: ...


def trace_json(report: Trace) -> str:
    return report.model_dump_json(indent=None)


class LocalFileSink(Sink):
    """Writes `<dir>/prompt_<index>.json`, atomically (temporary name, then rename)."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)

    def write(self, report: Trace) -> str:
        path = self.directory / f"prompt_{report.prompt.index:05d}.json"
        atomic_write_text(path, trace_json(report))
        return str(path)


class HTTPSink(Sink):
    """POSTs each trace as JSON to `url`; raises on failure (the trace stays in the job dir)."""

    def __init__(self, url: str, timeout_s: float = 10.0):
        self.url, self.timeout_s = url, timeout_s

    def write(self, report: Trace) -> str:
        req = urllib.request.Request(self.url, data=trace_json(report).encode("utf-8"), method="POST",
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=self.timeout_s) as resp:
            resp.read()
        return self.url
