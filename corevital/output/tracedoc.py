"""The canonical JSON trace, rendered straight from a capture's arrays.

`trace.py` declares the layout (pydantic models: the JSON Schema, `corevital validate`) and
`tracedict.py` writes it plainly, one dict per step and layer: the specification this module
must equal byte for byte (tests/test_pipeline.py). This module writes the same bytes without
building the objects: the header is one
orjson call on small dicts, and the timeline's (step, layer) objects come from
`jsonrows.records`, which copies orjson-formatted numbers between the keys. Which keys, in
which object, in which order, comes from the metric declarations (metrics.py). A 1,000-token
trace of a 30-layer model is about 0.5 s as pydantic objects and ~20 ms here.

Numbers are float32 written as their shortest round-trip text (as in the Parquet table);
NaN and Inf are written as null.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import orjson

from corevital.assess import health
from corevital.core import metrics
from corevital.core.prompts import Prompt
from corevital.core.sequence import SequenceCapture
from corevital.output import jsonrows, tracedict
from corevital.output.jsonrows import Column, Numbers
from corevital.output.trace import RunConfigInfo, TraceWarning, non_finite_warning
from corevital.output.vocab import Vocabulary


@dataclass
class TraceHeader:
    """What a trace says about where it came from, besides its capture."""

    trace_id: str
    created_at_utc: str
    model: dict[str, Any]  # trace.ModelInfo, dumped (once per job: every trace shares it)
    run_config: RunConfigInfo
    prompt: Prompt
    warnings: list[TraceWarning] = field(default_factory=list)


@dataclass
class TraceDoc:
    """One rendered trace: what sinks receive. `json` is the document's UTF-8 bytes."""

    trace_id: str
    prompt_index: int
    json: bytes
    sample_index: int = 0  # which of the prompt's continuations (num_samples)

    def text(self) -> str:
        return self.json.decode("utf-8")

    def model(self):
        """The document as the pydantic `trace.Trace` (for sinks that want objects)."""
        from corevital.output.trace import Trace

        return Trace.model_validate_json(self.json)


def add_non_finite_warning(cap: SequenceCapture, header: TraceHeader) -> None:
    """Note in the header's warnings where the capture holds NaN or Inf, if anywhere."""
    warning = non_finite_warning(cap)
    if warning is not None and all(w.code != warning.code for w in header.warnings):
        header.warnings.append(warning)


def render(
    cap: SequenceCapture,
    header: TraceHeader,
    vocab: Vocabulary,
    output_text: str,
    assessment: health.Assessment | None = None,
) -> TraceDoc:
    """The JSON trace of one capture; `output_text` is its generated tokens decoded. `assessment`:
    its signals (in `summary`) and health flags (`health`), computed here with the default
    thresholds when None."""
    assessment = assessment or health.assess(cap)
    head, tail = tracedict.head(cap, header, output_text), tracedict.tail(cap, header, assessment)
    body = timeline(
        cap,
        vocab,
        prefix=orjson.dumps(head, option=jsonrows.NUMPY)[:-1] + b',"timeline":[',
        suffix=b"]," + orjson.dumps(tail)[1:],
    )
    return TraceDoc(header.trace_id, header.prompt.index, body, header.run_config.sample_index)


def timeline(cap: SequenceCapture, vocab: Vocabulary, prefix: bytes = b"", suffix: bytes = b"") -> bytes:
    """prefix, the timeline's steps comma-separated (the list's brackets are the caller's), suffix:
    one `jsonrows.records` pass over the (step >= 1, layer) objects, each step's opening (token,
    logits summary) before its first layer and its closing after its last."""
    T, L = len(cap.token_ids), cap.num_layers
    first = _first_step(cap, vocab, L)
    if T == 1:
        return prefix + first + suffix
    t = _step_template(cap, vocab)
    steps = jsonrows.record_column(t.lits, t.cols)  # each step up to its '"layers":['
    n = (T - 1) * L
    starts, stops = np.zeros(n, np.int64), np.zeros(n, np.int64)  # (n,) empty but on each step's layer 0
    starts[::L], stops[::L] = steps.starts, steps.ends
    close = np.zeros(n, np.int64)  # "," between layers; the step's end after its last layer
    close[L - 1 :: L], close[-1] = 1, 2
    t = _layer_template(
        cap,
        L,
        Column(steps.buf, starts, stops),
        jsonrows.pieces([b",", b'],"extensions":{}},', b'],"extensions":{}}'], close),
    )
    return jsonrows.records(t.lits, t.cols, prefix=prefix + first + b",", suffix=suffix)


def _first_step(cap: SequenceCapture, vocab: Vocabulary, L: int) -> bytes:
    """Row 0: no forward pass behind it, so no summaries."""
    token = int(cap.token_ids[0])
    nulls = "".join(f',"{g}":null' for g, _ in tracedict.layer_groups(cap))
    layers = ",".join(f'{{"layer_index":{l}{nulls}}}' for l in range(L))
    text = vocab.json.buf[vocab.json.starts[token] : vocab.json.ends[token]].decode()
    return (
        f'{{"step_index":0,"token":{{"token_id":{token},"token_text":{text},"is_prompt_token":true}},'
        f'"logits_summary":null,"layers":[{layers}],"extensions":{{}}}}'
    ).encode()


class _Template:
    """Literal text and value columns, in record order, for `jsonrows.records`."""

    def __init__(self):
        self.lits, self.cols = [b""], []

    def text(self, s: str) -> "_Template":
        self.lits[-1] += s.encode()
        return self

    def value(self, column: Column | jsonrows.Take) -> "_Template":
        self.cols.append(column)
        self.lits.append(b"")
        return self


def _layer_template(cap: SequenceCapture, L: int, opening: Column, closing: Column) -> _Template:
    """The (step >= 1, layer) objects, step-major, each between its `opening` and `closing` entries."""
    n = (len(cap.token_ids) - 1) * L
    layer = jsonrows.pieces([str(l).encode() for l in range(L)], np.tile(np.arange(L), n // L))
    t = _Template().value(opening).text('{"layer_index":').value(layer)
    for group, declared in tracedict.layer_groups(cap):
        present = [m for m in declared if m.column in cap.values]
        if group in metrics.OPTIONAL_GROUPS or group == metrics.EXTENSIONS:  # an object, or null where it is off
            t.text(f',"{group}":').value(_objects(cap, present, n))
        else:
            t.text(f',"{group}":{{')
            _fields(t, _Rows(cap, slice(None), n), present, n)
            heads = tracedict.head_metrics(cap, group)
            if heads:  # metrics.per_head: the object of each head's values, null where none has one
                t.text(f',"{metrics.HEADS}":').value(_objects(cap, heads, n))
            t.text("}")
    return t.text("}").value(closing)


def _fields(t: _Template, rows: "_Rows", declared: list[metrics.Metric], n: int) -> None:
    """`"key":value` for each metric of `declared`, comma-separated, over the n records of `rows`.
    The float values of all of them are formatted by one orjson call."""
    floats = [m for m in declared if m.type not in (metrics.I32, metrics.BOOL)]
    numbers = (
        Numbers(np.concatenate([rows[m.column].reshape(n, -1) for m in floats], axis=1, dtype=np.float32))
        if floats
        else None
    )  # (n, columns of all floats), taken below in the same order
    for i, m in enumerate(declared):
        t.text(f'{"," if i else ""}"{m.key}":')
        if m.type == metrics.BOOL:
            v = rows[m.column].reshape(n)
            t.value(jsonrows.pieces([b"false", b"true", b"null"], np.where(np.isnan(v), 2, v > 0.5).astype(np.int64)))
        elif m.type == metrics.I32:
            t.value(Numbers(rows[m.column].reshape(n, 1).astype(np.int64)).take())
        elif m.width is not None:  # a vector: "[x,y,...]"
            t.text("[").value(numbers.take(m.width)).text("]")
        else:
            t.value(numbers.take())


class _Rows:
    """Rows 1..T-1 of a capture's values as n records (step-major (step, layer) pairs for per-layer
    values), restricted to the records `on`; read lazily, one column at a time."""

    def __init__(self, cap: SequenceCapture, on, n: int):
        self.cap, self.on, self.n = cap, on, n

    def __getitem__(self, column: str) -> np.ndarray:
        v = self.cap.values[column][1:]
        return v.reshape(self.n, *v.shape[2:])[self.on] if v.ndim > 1 else v[self.on]


def _objects(cap: SequenceCapture, declared: list[metrics.Metric], n: int) -> Column:
    """Each (step >= 1, layer)'s object of `declared` metrics, step-major: {"key": value, ...}
    where any of them has a value (e.g. the lens where it was computed), null elsewhere."""
    nulls = jsonrows.pieces([b"null"], np.zeros(n, np.int64))
    if not declared:
        return nulls
    present = np.zeros(n, bool)
    for m in declared:
        present |= ~np.isnan(cap.values[m.column][1:].reshape(n, -1).astype(np.float32)).all(-1)
    on = np.flatnonzero(present)  # (k,) records with a value
    if not len(on):
        return nulls
    t = _Template().text("{")
    _fields(t, _Rows(cap, on, n), declared, len(on))
    t.text("}")
    objects = jsonrows.record_column(t.lits, t.cols)  # (k,) entries
    starts = np.full(n, len(objects.buf), np.int64)  # "null", appended after the objects
    stops = starts + 4
    starts[on], stops[on] = objects.starts, objects.ends
    return Column(objects.buf + b"null", starts, stops)


def _step_template(cap: SequenceCapture, vocab: Vocabulary) -> _Template:
    """Steps 1..T-1, each up to its '"layers":[' (the layer objects and the step's end follow)."""
    T, P, k = len(cap.token_ids), cap.prompt_len, cap.topk_ids.shape[1]
    ids = cap.token_ids[1:]
    ints = Numbers(np.column_stack([np.arange(1, T), ids, cap.topk_ids[1:]]).astype(np.int64))  # (T-1, 2 + k)
    probs = Numbers(cap.topk_probs[1:].astype(np.float32))  # (T-1, k)
    t = (
        _Template()
        .text('{"step_index":')
        .value(ints.take())
        .text(',"token":{"token_id":')
        .value(ints.take())
        .text(',"token_text":')
        .value(vocab.json.take(ids))
        .text(',"is_prompt_token":')
        .value(jsonrows.pieces([b"false", b"true"], (np.arange(1, T) < P).astype(np.int64)))
        .text(f'}},"{metrics.STEP_GROUP}":{{')
    )
    declared = [m for m in metrics.all_metrics(cap.extras) if m.group == metrics.STEP_GROUP and m.column in cap.values]
    _fields(t, _Rows(cap, slice(None), T - 1), declared, T - 1)
    t.text(',"topk":[')
    for j in range(k):
        t.text(("," if j else "") + '{"token_id":').value(ints.take())
        t.text(',"token_text":').value(vocab.json.take(cap.topk_ids[1:, j]))
        t.text(',"prob":').value(probs.take()).text("}")
    return t.text(']},"layers":[')
