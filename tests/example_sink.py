"""A user's own sink, as docs/sweeps.md shows it: selected with sink._target_=example_sink.JsonLinesSink."""

from pathlib import Path

from corevital.output.sinks import Sink, trace_json


class JsonLinesSink(Sink):
    """Appends every trace as one line of a JSON Lines file."""

    def __init__(self, path: str):
        self.path = Path(path)

    def write(self, report) -> str:
        with self.path.open("a", encoding="utf-8") as f:
            f.write(trace_json(report) + "\n")
        return str(self.path)


class NotASink:
    def write(self, report) -> str:
        return "nowhere"
