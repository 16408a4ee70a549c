"""The job's writer: everything after `generate`, off the generating process.

    generating process (run.py)               worker process (JobWriter via background.py;
                                                              inline where fork is not available)
    generate batch k ──▶ bounded queue ──▶ render each trace (tracedoc) and its rows (table);
    generate batch k+1     (QUEUE)           write traces/, deliver to the sinks;
                                             commit batch k: parts/batch-<k>.rows.arrow
                                               and .traces.parquet;
                                             append its rows to the job's tables (row groups)

A batch is *committed* when its part files are renamed into place: a job killed at any
moment keeps every committed batch with its traces, and its rerun (`Store.prepare` with the
same config) generates only the batches without a part. The job's `summaries.parquet` and
`traces.parquet` are written under temporary names as batches commit and renamed when the
job ends; then `parts/` goes. A resumed run (earlier runs' parts kept) only commits parts
while it generates and builds the tables from every part, in prompt order, at its end: a
task that SLURM stops and requeues again and again then spends each run on new batches,
not on copying the kept ones into tables it may never finish. Memory holds at
most background.QUEUE batches waiting and one row group being filled (ROW_GROUP_BYTES), whatever the
number of prompts.

An error in the writer (a full disk, say) stops generation at its next step and fails the
job with one sentence (`OutputError`); committed batches stay for the rerun, and every file
is written under a temporary name first, so nothing partial is left under a final name.
"""

from __future__ import annotations

import contextlib
import gzip
import json
import logging
import os
import shutil
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.ipc  # noqa: F401  (pa.ipc)
import pyarrow.parquet as pq

from corevital import SCHEMA_VERSION
from corevital.assess import health
from corevital.core.config import HealthConfig
from corevital.core.files import atomic_write, atomic_write_bytes, temp_suffix
from corevital.core.sequence import SequenceCapture
from corevital.output import background, table, tracedoc
from corevital.output.sinks import Delivery
from corevital.output.trace import TraceWarning
from corevital.output.tracedoc import TraceHeader
from corevital.output.vocab import Vocabulary

log = logging.getLogger("corevital")
PARQUET, TRACES_PARQUET, PARTS_DIR = "summaries.parquet", "traces.parquet", "parts"
TRACE_FORMATS = {"json": ".json", "json.gz": ".json.gz", "none": None}
GZIP_LEVEL = 6  # traces.format=json.gz
# Parquet writer options. Strings (trace ids, paths, token texts) repeat over a trace's rows:
# dictionary-encoded; numbers are not (their dictionaries would rarely pay). A batch's traces
# part is read back only by a resumed run: no column statistics there.
TABLE_OPTIONS = {
    "use_dictionary": [f.name for f in table.SCHEMA if f.type == pa.string()] + ["prompt_text", "output_text"]
}
PART_OPTIONS = {**TABLE_OPTIONS, "write_statistics": False}
ROW_GROUP = 1 << 17  # rows per row group of the job's tables, at most
ROW_GROUP_BYTES = 4 << 20  # and at most this much Arrow memory waiting to be written
# The writer's seconds per (token x layer) row, per-trace work included, as whole jobs of the
# benchmark's case (b) measure it (docs/performance.md): the share writer_mode estimates. An
# estimate well below the measured cost leaves jobs inline that the process would speed up.
COST_PER_ROW = 5e-6
TRACES_DIR = "traces"  # the job dir's folder of JSON traces
KEEP_WARNINGS = 20  # warnings kept for status.json (the count is always whole)


class OutputError(RuntimeError):
    """A job's output could not be written; the message says which file and why."""


@dataclass
class Batch:
    """One `generate` call's traces: `start` is its first prompt's position in the job."""

    start: int
    captures: list[SequenceCapture]
    headers: list[TraceHeader]


@dataclass
class Totals:
    traces: int = 0
    rows: int = 0
    warnings: list[str] = field(default_factory=list)  # the first KEEP_WARNINGS, "prompt <i>: <message>"
    warning_count: int = 0

    def add_warning(self, text: str) -> None:
        self.warning_count += 1
        if len(self.warnings) < KEEP_WARNINGS:
            self.warnings.append(text)


def trace_files(directory: Path, recursive: bool = False) -> list[Path]:
    """The trace files (prompt_*.json, prompt_*.json.gz) in `directory` (or anywhere under it), sorted."""
    found = directory.rglob("prompt_*.json*") if recursive else directory.glob("prompt_*.json*")
    return sorted(p for p in found if p.name.endswith((".json", ".json.gz")))


def trace_path(traces_dir: Path, prompt_index: int, fmt: str, sample_index: int | None = None) -> Path:
    """`prompt_00012.json`; with num_samples > 1 (`sample_index` given) `prompt_00012_sample_003.json`,
    so that the names sort by prompt, then sample."""
    sample = "" if sample_index is None else f"_sample_{sample_index:03d}"
    return traces_dir / f"prompt_{prompt_index:05d}{sample}{TRACE_FORMATS[fmt]}"


def read_trace(path: str | Path) -> dict[str, Any]:
    """A trace file as written (`.json` or `.json.gz`)."""
    raw = Path(path).read_bytes()
    return json.loads(gzip.decompress(raw) if str(path).endswith(".gz") else raw)


class Store:
    """The job dir's committed batches (`parts/`), kept across runs of the same config."""

    DIGEST = "config_hash"

    def __init__(self, job_dir: Path):
        self.job_dir, self.dir = job_dir, job_dir / PARTS_DIR

    def prepare(self, digest: str, resume: bool) -> int:
        """Keep what an earlier run of this config committed (resume), else clear every output
        of earlier runs. Returns the number of committed batches kept."""
        kept = resume and _read(self.dir / self.DIGEST) == digest
        for name in (PARQUET, TRACES_PARQUET) if kept else (PARQUET, TRACES_PARQUET, TRACES_DIR, PARTS_DIR):
            path = self.job_dir / name
            shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
        if not kept:
            self.dir.mkdir(parents=True)
            (self.dir / self.DIGEST).write_text(digest)
        return len(self.committed())

    def part(self, start: int, kind: str) -> Path:
        """`rows`: the batch's rows with their own columns (table.trace_table), an Arrow IPC file
        (written as it lies in memory, ~4x faster than Parquet; only a rerun reads it); `traces`:
        its traces.parquet rows, which also hold the rows' PER_TRACE columns."""
        return self.dir / f"batch-{start:07d}.{kind}{'.arrow' if kind == 'rows' else '.parquet'}"

    def committed(self) -> list[int]:
        """Start positions of the committed batches, sorted (a batch's traces part is written last)."""
        return sorted(int(p.name.split(".")[0].split("-")[1]) for p in self.dir.glob("batch-*.traces.parquet"))

    def committed_traces(self) -> int:
        """How many traces the committed batches hold (what a rerun keeps)."""
        return sum(pq.read_metadata(self.part(start, "traces")).num_rows for start in self.committed())

    def commit(self, start: int, rows: pa.Table, traces: pa.Table, meta: dict) -> None:
        path = self.part(start, "rows")
        _writing(path, lambda: atomic_write(path, lambda tmp: _write_ipc(rows, tmp)))
        path = self.part(start, "traces")  # last: it marks the batch whole
        _writing(
            path,
            lambda: atomic_write(
                path,
                lambda tmp: pq.write_table(
                    traces.replace_schema_metadata(meta), tmp, **_options(traces.schema, PART_OPTIONS)
                ),
            ),
        )

    def read(self, start: int) -> tuple[pa.Table, pa.Table]:
        """A committed batch's (rows, traces), as `commit` was given them."""
        rows = pa.ipc.open_file(pa.memory_map(str(self.part(start, "rows")))).read_all()  # mapped, not copied
        return rows, pq.read_table(self.part(start, "traces"))

    def remove(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


def _write_ipc(t: pa.Table, path: Path) -> None:
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, t.schema) as w:
        w.write_table(t)


def _options(schema: pa.Schema, options: dict) -> dict:
    """`options` with use_dictionary narrowed to the columns `schema` has, and column
    statistics (the min and max readers use to skip row groups) only where they can skip
    something: on identity, index, token and flag columns, not on float metrics, whose every
    row group spans most of their range (their statistics cost 10-15% of the encode)."""
    keys = [f.name for f in schema if not (pa.types.is_floating(f.type) or pa.types.is_list(f.type))]
    return {
        **options,
        "use_dictionary": [c for c in options["use_dictionary"] if c in schema.names],
        "write_statistics": options.get("write_statistics", keys),
    }


def _read(path: Path) -> str | None:
    try:
        return path.read_text()
    except OSError:
        return None


def _writing(path: Path, write) -> None:
    """Run `write()`; an OSError becomes one sentence naming `path`."""
    try:
        write()
    except OSError as e:
        raise OutputError(f"could not write {path}: {e.strerror or e}") from None


class TableFile:
    """One of the job's Parquet tables, written by row groups under a temporary name and
    renamed into place by `close` (a reader never finds a partial file under the final name)."""

    def __init__(self, path: Path, schema: pa.Schema, meta: dict, row_group: int):
        self.path, self.tmp = path, path.with_name(f".{path.name}.tmp-{temp_suffix()}")
        self.schema, self.row_group = schema.with_metadata(meta), row_group
        self.pending: list[pa.Table] = []
        self._writer = None

    def append(self, t: pa.Table) -> None:
        self.pending.append(t)
        if (
            sum(p.num_rows for p in self.pending) >= self.row_group
            or sum(p.nbytes for p in self.pending) >= ROW_GROUP_BYTES
        ):
            self._flush()

    def _flush(self) -> None:
        if not self.pending:
            return
        t = pa.concat_tables(self.pending).replace_schema_metadata(self.schema.metadata)
        self.pending = []

        def write():
            if self._writer is None:
                self._writer = pq.ParquetWriter(self.tmp, self.schema, **_options(self.schema, TABLE_OPTIONS))
            self._writer.write_table(t, row_group_size=max(t.num_rows, 1))

        _writing(self.path, write)

    def close(self) -> None:
        self._flush()
        _writing(self.path, self._finish)

    def _finish(self) -> None:
        if self._writer is None:
            self._writer = pq.ParquetWriter(self.tmp, self.schema, **_options(self.schema, TABLE_OPTIONS))
        self._writer.close()
        os.replace(self.tmp, self.path)

    def discard(self) -> None:
        try:
            if self._writer is not None:
                self._writer.close()
        except Exception:
            pass
        self.tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def _as_output_error():
    """The worker's error (one sentence) as the job's OutputError."""
    try:
        yield
    except background.WorkerError as e:
        raise OutputError(str(e)) from None


@contextlib.contextmanager
def _interrupts_deferred():
    """On the main thread, a Ctrl-C (SIGINT) during the block is raised after it, so that a
    batch being written is committed whole rather than left half-written."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught = []
    previous = signal.signal(signal.SIGINT, lambda *_: caught.append(True))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous if previous is not None else signal.default_int_handler)
        if caught:
            raise KeyboardInterrupt


class JobWriter:
    """The writer of one job (see the module docstring). Use as a context manager: `put` each
    batch in prompt order, then `finish()`; leaving the block early (an error, Ctrl-C) commits
    the batches already queued and discards the unfinished tables.

    mode "process": a forked worker process (background.py) does the work while the next batch
    generates, on a core of its own and without the generating loop's GIL. "inline": `put`
    does it at once, on the calling thread. `writer_mode` chooses.
    """

    def __init__(
        self,
        store: Store,
        traces_format: str,
        delivery: Delivery,
        vocab: Vocabulary,
        config: dict,
        total: int,
        mode: str = "process",
        extras=(),
    ):
        self.store, self.format, self.delivery, self.vocab, self.total = store, traces_format, delivery, vocab, total
        self.mode = mode
        self.samples = int(
            config.get("num_samples", 1)
        )  # continuations per prompt: > 1 names trace files by sample too
        self.health = HealthConfig(**config.get("health", {}))  # the health flags' thresholds
        self.traces_dir = store.job_dir / TRACES_DIR
        self.meta = {
            b"schema_version": SCHEMA_VERSION.encode(),
            table.METADATA_CONFIG_KEY.encode(): json.dumps(config).encode(),
        }
        self.schema = table.schema(extras)  # summaries.parquet's, with the user metrics' columns
        self.tables = [
            TableFile(store.job_dir / PARQUET, self.schema, self.meta, ROW_GROUP),
            TableFile(store.job_dir / TRACES_PARQUET, table.TRACES_SCHEMA, self.meta, ROW_GROUP),
        ]
        self.earlier = store.committed()  # committed by earlier runs: the tables are built at the end
        self.later: list[int] = []  # this run's batches, when resumed (in the tables at the end too)
        self.totals = Totals()
        self.busy_s = 0.0  # time spent writing (in the worker process: overlapped with generation)
        self.error: OutputError | None = None
        self._worker: background.Background | None = None

    # --- generating process --------------------------------------------------------------
    def __enter__(self) -> "JobWriter":
        if self.mode == "process":
            # the child decodes with the tokenizer: no Rust thread pool across the fork (nor its warning)
            os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
            self._worker = background.Background(
                lambda batch: self._work(self._write, batch), self._close_in_worker, self._discard
            ).start()
        return self

    def failed(self) -> bool:
        return self._worker.failed() if self._worker else self.error is not None

    def put(self, batch: Batch) -> None:
        """Write a batch, or queue it for the worker (waiting while background.QUEUE batches
        wait); raises the writer's error, if any."""
        if self._worker is None:
            with _interrupts_deferred():  # Ctrl-C here takes effect once the batch is committed
                self._guarded(self._write, batch)
            self._raise()
            return
        with _as_output_error():
            self._worker.put(batch)

    def finish(self) -> Totals:
        """Write what is queued (after a resume, build the tables from every part); close the tables."""
        if self._worker is None:
            self._guarded(self._close)
            self._raise()
            return self.totals
        with _as_output_error():
            self.totals, self.busy_s, self.delivery.failures, self.delivery.gave_up = self._worker.finish()
        return self.totals

    def __exit__(self, kind, value, tb) -> None:
        if kind is None:
            return
        if self._worker is not None:  # the worker commits what was queued, discards its tables, exits
            self._worker.abort()
        else:
            self._discard()

    def _raise(self) -> None:
        if self.error is not None:
            raise self.error

    # --- the work (worker process, or the caller's thread) -------------------------------
    def _work(self, work, *args) -> None:
        """In the worker: `work(*args)`, its failure as one sentence for the parent."""
        if not self._guarded(work, *args):
            raise background.WorkerError(str(self.error))

    def _close_in_worker(self) -> tuple:
        self._work(self._close)
        return self.totals, self.busy_s, self.delivery.failures, self.delivery.gave_up

    def _discard(self) -> None:
        for t in self.tables:
            t.discard()

    def _guarded(self, work, *args) -> bool:
        """Run `work`, timed; keep its exception (as one sentence) for the generating thread."""
        clock = time.perf_counter()
        try:
            work(*args)
            return True
        except Exception as e:
            self.error = (
                e
                if isinstance(e, OutputError)
                else OutputError(f"writing the job's outputs failed: {type(e).__name__}: {e}")
            )
            self.error.__cause__ = e
            log.debug("writer failed", exc_info=True)
            return False
        finally:
            self.busy_s += time.perf_counter() - clock

    def _close(self) -> None:
        """Build the tables from the parts a resumed run holds (none otherwise), then close them."""
        earlier = set(self.earlier)
        for start in sorted(earlier | set(self.later)):
            rows, traces = self.store.read(start)
            self._append(table.summaries(rows, traces, self.schema), traces)
            if start in earlier:  # this run's warnings were counted as its batches were written
                for row in traces.select(["prompt_index", "sample_index", "warnings"]).to_pylist():
                    for w in row["warnings"] or []:
                        self.totals.add_warning(f"{self._label(row['prompt_index'], row['sample_index'])}: {w}")
        for t in self.tables:
            t.close()

    def _append(self, rows: pa.Table, traces: pa.Table) -> None:
        self.tables[0].append(rows)
        self.tables[1].append(traces)
        self.totals.traces += traces.num_rows
        self.totals.rows += rows.num_rows

    def _write(self, batch: Batch) -> None:
        traces = []
        for cap, header in zip(batch.captures, batch.headers):
            assessment = health.assess(cap, self.health)  # signals and flags, for the JSON trace and the row
            output_text = self._keep_and_deliver(cap, header, assessment)
            traces.append(table.trace_row(cap, header, output_text, assessment))
            label = self._label(header.prompt.index, header.run_config.sample_index)
            for w in header.warnings:
                self.totals.add_warning(f"{label}: {w.message}")
                log.warning("%s: %s", label, w.message)
            log.info(
                "trace %d/%d%s: %d prompt + %d generated tokens, %d ms",
                header.prompt.index + 1,
                self.total,
                f", sample {header.run_config.sample_index}" if self.samples > 1 else "",
                cap.prompt_len,
                cap.generated_len,
                cap.elapsed_ms,
            )
        rows_t, traces_t = table.trace_table(batch.captures, self.vocab, self.schema), table.traces_table(traces)
        self.store.commit(batch.start, rows_t, traces_t, self.meta)
        if self.earlier:  # resumed: into the tables with the kept parts, in order, at the end
            self.later.append(batch.start)
        else:
            self._append(table.summaries(rows_t, traces_t, self.schema), traces_t)

    def _keep_and_deliver(self, cap: SequenceCapture, header: TraceHeader, assessment: health.Assessment) -> str:
        """Render the trace, write it to traces/ (unless traces.format=none), deliver it to the
        other sinks; what they did not get is noted in its warnings (and the file rewritten).
        Returns the generated text."""
        output_text = self.vocab.decode(cap.token_ids[cap.prompt_len :])
        tracedoc.add_non_finite_warning(cap, header)
        if self.format == "none" and not self.delivery.sinks:
            return output_text
        doc = tracedoc.render(cap, header, self.vocab, output_text, assessment)
        self._keep(doc)
        problems = self.delivery.send(doc)
        if problems:
            header.warnings.extend(TraceWarning(code="delivery_failed", message=m) for m in problems)
            self._keep(tracedoc.render(cap, header, self.vocab, output_text, assessment))
        return output_text

    def _label(self, prompt_index: int, sample_index: int | None) -> str:
        """`prompt 3`, or with num_samples > 1 `prompt 3, sample 1`: where a warning comes from."""
        return f"prompt {prompt_index}" + (f", sample {sample_index}" if self.samples > 1 else "")

    def _keep(self, doc: tracedoc.TraceDoc) -> None:
        if self.format == "none":
            return
        path = trace_path(
            self.traces_dir, doc.prompt_index, self.format, doc.sample_index if self.samples > 1 else None
        )
        body = gzip.compress(doc.json, compresslevel=GZIP_LEVEL) if self.format == "json.gz" else doc.json
        _writing(path, lambda: atomic_write_bytes(path, body))
