"""The canonical JSON trace, rendered straight from a capture's arrays.

`trace.py` declares the layout (pydantic models: the JSON Schema, `corevital validate`);
this module writes documents in that layout without building them: the header is one
orjson call on small dicts, and the timeline's (step, layer) objects come from
`jsonrows.records`, which copies orjson-formatted numbers between the keys. A 1,000-token
trace of a 30-layer model is about 0.5 s as pydantic objects and ~20 ms here.

Numbers are float32 written as their shortest round-trip text (as in the Parquet table);
NaN and Inf are written as null.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import orjson

from corevital import SCHEMA_VERSION, health, jsonrows
from corevital.capture import SequenceCapture
from corevital.jsonrows import Column, Matrix
from corevital.prompts import Prompt
from corevital.trace import RunConfigInfo, TraceWarning, non_finite_warning
from corevital.vocab import Vocabulary

# The JSON objects of one layer at one step: group -> [(key, capture field, index in its last
# axis or None for the whole (sketch) vector)]. Parquet's columns are declared in table.py.
LAYER_GROUPS = (
    ("hidden_summary", (("mean", "hidden", 0), ("std", "hidden", 1), ("l2_norm", "hidden", 2), ("max_abs", "hidden", 3),
                        ("sketch", "sketch", None), ("cos_prev", "hidden_cos_prev", 0))),
    ("attention_summary", (("entropy_mean", "attn", 0), ("entropy_min", "attn", 1), ("concentration_max", "attn", 2),
                           ("sink_mass", "attn_sink_mass", 0), ("prev_mass", "attn_prev_mass", 0),
                           ("prompt_mass", "attn_prompt_mass", 0))),
)
LOGIT_KEYS = (("entropy", 0), ("top1_prob", 1), ("top1_top2_margin", 2))


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
        from corevital.trace import Trace

        return Trace.model_validate_json(self.json)


def add_non_finite_warning(cap: SequenceCapture, header: TraceHeader) -> None:
    """Note in the header's warnings where the capture holds NaN or Inf, if anywhere."""
    warning = non_finite_warning(cap)
    if warning is not None and all(w.code != warning.code for w in header.warnings):
        header.warnings.append(warning)


def render(cap: SequenceCapture, header: TraceHeader, vocab: Vocabulary, output_text: str,
           assessment: health.Assessment | None = None) -> TraceDoc:
    """The JSON trace of one capture; `output_text` is its generated tokens decoded. `assessment`:
    its signals (in `summary`) and health flags (`health`), computed here with the default
    thresholds when None."""
    assessment = assessment or health.assess(cap)
    P, T = cap.prompt_len, len(cap.token_ids)
    ids = cap.token_ids
    head = {
        "schema_version": SCHEMA_VERSION, "trace_id": header.trace_id, "created_at_utc": header.created_at_utc,
        "model": header.model, "run_config": header.run_config.model_dump(),
        "prompt": {"text": header.prompt.text, "token_ids": ids[:P], "num_tokens": P, "index": header.prompt.index,
                   "id": header.prompt.id, "source": header.prompt.source,
                   "answer": None if header.prompt.answer is None else list(header.prompt.answer),
                   "grader": header.prompt.grader},
        "generated": {"output_text": output_text, "token_ids": ids[P:], "num_tokens": T - P},
    }
    tail = {
        "summary": {"prompt_tokens": P, "total_steps": T, "num_layers": cap.hidden.shape[1], "elapsed_ms": cap.elapsed_ms,
                    **_finite(assessment.signals)},  # the signals, generated_tokens among them
        "health": {name: e.dump() for name, e in assessment.flags.items()},
        "warnings": [w.model_dump() for w in header.warnings], "extensions": {},
    }
    body = b"".join([orjson.dumps(head, option=jsonrows.NUMPY)[:-1], b',"timeline":[', timeline(cap, vocab), b"],",
                     orjson.dumps(tail)[1:]])
    return TraceDoc(header.trace_id, header.prompt.index, body, header.run_config.sample_index)


def _finite(values: dict) -> dict:
    """NaN and Inf as None (null), as everywhere in the trace."""
    return {k: v if v is None or np.isfinite(v) else None for k, v in values.items()}


def timeline(cap: SequenceCapture, vocab: Vocabulary) -> bytes:
    """The timeline's steps, comma-separated (the list's brackets are the caller's)."""
    T, L = cap.hidden.shape[:2]
    first = _first_step(cap, vocab, L)
    if T == 1:
        return first
    t = _layer_template(cap, L)
    layers = jsonrows.records(t.lits, t.cols)  # every (step >= 1, layer) object, each followed by ","
    ends = np.cumsum(jsonrows.record_lengths(t.lits, t.cols))  # (n,)
    block = Column(layers, np.concatenate([[0], ends[L - 1:-1:L]]), ends[L - 1::L] - 1)  # one step's layers, no final ","
    t = _step_template(cap, vocab, block)
    return first + b"," + jsonrows.records(t.lits, t.cols)[:-1]


def _first_step(cap: SequenceCapture, vocab: Vocabulary, L: int) -> bytes:
    """Row 0: no forward pass behind it, so no summaries."""
    token = int(cap.token_ids[0])
    layers = ",".join(f'{{"layer_index":{l},"hidden_summary":null,"attention_summary":null,"lens_summary":null}}'
                      for l in range(L))
    text = vocab.json.buf[vocab.json.starts[token]:vocab.json.ends[token]].decode()
    return (f'{{"step_index":0,"token":{{"token_id":{token},"token_text":{text},"is_prompt_token":true}},'
            f'"logits_summary":null,"layers":[{layers}],"extensions":{{}}}}').encode()


class _Template:
    """Literal text and value columns, in record order, for `jsonrows.records`."""

    def __init__(self):
        self.lits, self.cols = [b""], []

    def text(self, s: str) -> "_Template":
        self.lits[-1] += s.encode()
        return self

    def value(self, column: Column) -> "_Template":
        self.cols.append(column)
        self.lits.append(b"")
        return self


def _layer_template(cap: SequenceCapture, L: int) -> _Template:
    """The (step >= 1, layer) objects, step-major, each followed by ","."""
    n = (cap.hidden.shape[0] - 1) * L
    fields, values = {}, []  # (capture field, index) -> columns in `values`; one orjson call for all
    for _, keys in LAYER_GROUPS:
        for _, name, index in keys:
            if (name, index) not in fields:
                v = getattr(cap, name)[1:]  # (T-1, L, k), or (T-1, L) for one value per layer
                v = v[..., None] if v.ndim == 2 else v
                v = v.reshape(n, -1) if index is None else v[..., index].reshape(n, 1)
                fields[name, index] = (sum(x.shape[1] for x in values), v.shape[1])
                values.append(v)
    m = Matrix(np.concatenate(values, axis=1, dtype=np.float32))
    layer = jsonrows.pieces([str(l).encode() for l in range(L)], np.tile(np.arange(L), n // L))
    t = _Template().text('{"layer_index":').value(layer)
    for group, keys in LAYER_GROUPS:
        t.text(f',"{group}":{{')
        for i, (key, name, index) in enumerate(keys):
            a, width = fields[name, index]
            t.text(f'{"," if i else ""}"{key}":')
            if index is None:  # a vector: "[x,y,...]"
                t.text("[").value(m.span(a, a + width)).text("]")
            else:
                t.value(m.column(a))
        t.text("}")
    return t.text(',"lens_summary":').value(_lens_objects(cap, n)).text("},")


def _lens_objects(cap: SequenceCapture, n: int) -> Column:
    """Each (step >= 1, layer)'s `lens_summary`, step-major: {"entropy":..,"top1_match":..,"kl":..}
    where the lens was computed (its top-1 match is not NaN), null elsewhere."""
    nulls = jsonrows.pieces([b"null"], np.zeros(n, np.int64))
    if cap.lens is None:
        return nulls
    v = cap.lens[1:].reshape(n, 3)
    on = np.flatnonzero(~np.isnan(v[:, 1]))  # (k,) records with a lens
    if not len(on):
        return nulls
    m = Matrix(v[on][:, [0, 2]].astype(np.float32))  # (k, 2) entropy, KL
    match = jsonrows.pieces([b"false", b"true"], (v[on, 1] > 0.5).astype(np.int64))
    t = _Template().text('{"entropy":').value(m.column(0)).text(',"top1_match":').value(match)
    t.text(',"kl":').value(m.column(1)).text("}")
    objects = jsonrows.records(t.lits, t.cols)
    ends = np.cumsum(jsonrows.record_lengths(t.lits, t.cols))  # (k,)
    starts = np.full(n, len(objects), np.int64)  # "null", appended after the objects
    stops = starts + 4
    starts[on], stops[on] = ends - jsonrows.record_lengths(t.lits, t.cols), ends
    return Column(objects + b"null", starts, stops)


def _step_template(cap: SequenceCapture, vocab: Vocabulary, block: Column) -> _Template:
    """Steps 1..T-1, each followed by ","; `block` holds each step's layer objects."""
    T, P, k = len(cap.token_ids), cap.prompt_len, cap.topk_ids.shape[1]
    ids = cap.token_ids[1:]
    floats = Matrix(np.column_stack([cap.logit_stats[1:], cap.token_logprob[1:], cap.topk_probs[1:]]).astype(np.float32))
    ints = Matrix(np.column_stack([np.arange(1, T), ids, cap.topk_ids[1:], cap.token_rank[1:]]).astype(np.int64))
    t = (_Template().text('{"step_index":').value(ints.column(0))
         .text(',"token":{"token_id":').value(ints.column(1)).text(',"token_text":').value(vocab.json.take(ids))
         .text(',"is_prompt_token":').value(jsonrows.pieces([b"false", b"true"], (np.arange(1, T) < P).astype(np.int64)))
         .text('},"logits_summary":{'))
    for i, (key, index) in enumerate(LOGIT_KEYS):
        t.text(f'{"," if i else ""}"{key}":').value(floats.column(index))
    t.text(',"token_logprob":').value(floats.column(3)).text(',"token_rank":').value(ints.column(2 + k)).text(',"topk":[')
    for j in range(k):
        t.text(("," if j else "") + '{"token_id":').value(ints.column(2 + j))
        t.text(',"token_text":').value(vocab.json.take(cap.topk_ids[1:, j]))
        t.text(',"prob":').value(floats.column(4 + j)).text("}")
    return t.text(']},"layers":[').value(block).text('],"extensions":{}},')
