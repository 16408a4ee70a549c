"""Trace schema: the canonical JSON document written per prompt (schema_version 1.1.0).

These pydantic models declare the layout (`corevital schema`, `corevital validate`);
tracedoc.py writes documents in it straight from the capture arrays.

Layout follows the seed project's trace: schema_version, trace_id, created_at_utc, model,
run_config, prompt, generated, timeline, summary, warnings, extensions. Timeline row t
(0 <= t < P + G) carries the forward pass at query position t - 1 (docs/format.md, "Timeline alignment").
Row 0 has no such pass: its `logits_summary` is null, and so are its layers' summaries.
Float values that are NaN or infinite are written as null.
"""

from __future__ import annotations

from typing import Annotated, Any, Optional

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, create_model, with_config
from typing_extensions import NotRequired, TypedDict

from corevital import SCHEMA_VERSION
from corevital.assess import health, signals
from corevital.core import metrics
from corevital.core.sequence import SequenceCapture


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())


# The per-token and per-layer leaves are TypedDicts: a long trace holds ~3 of them per
# (step, layer), and plain dicts build and serialise several times faster than models.
_FORBID = with_config(ConfigDict(extra="forbid"))
F = Optional[float]


@_FORBID
class TopKItem(TypedDict):
    token_id: int
    token_text: str
    prob: F


def _leaf(m: metrics.Metric):
    """A metric's JSON key: its value type (null allowed), its definition; v2 keys may be absent
    (traces written before them)."""
    kind = {metrics.I32: int, metrics.BOOL: bool}.get(m.type, list[F] if m.width else F)
    kind = Annotated[
        kind if m.type == metrics.I32 else Optional[kind], Field(description=f"{m.definition} (null: {m.null})")
    ]
    return NotRequired[kind] if m.v2 else kind


def _summary(name: str, group: str, doc: str, **more):
    """The TypedDict of one JSON summary object, from the metrics declared in it (metrics.py)."""
    fields = {m.key: _leaf(m) for m in metrics.METRICS if m.group == group}
    cls = TypedDict(name, {**fields, **more})
    cls.__doc__ = doc
    return _FORBID(cls)


LogitsSummary = _summary(
    "LogitsSummary",
    metrics.STEP_GROUP,
    "The raw next-token distribution at position t - 1 (before temperature, top-k, top-p).",
    topk=Annotated[list[TopKItem], Field(description="the 5 most likely tokens")],
)
HiddenSummary = _summary(
    "HiddenSummary", "hidden_summary", "Output of transformer block l (before the final norm) at position t - 1."
)
HeadSummary = TypedDict(
    "HeadSummary", {m.key: Optional[list[F]] for m in metrics.PerHead(1).metrics}
)  # one value per query head, in the model's head order
HeadSummary.__doc__ = "metrics.per_head: each head's values (docs/format.md, 'Per-head attention')."
HeadSummary = _FORBID(HeadSummary)
AttentionSummary = _summary(
    "AttentionSummary",
    "attention_summary",
    "Layer l's attention weights of query t - 1 over keys 0..t-1 (padding excluded).",
    heads=NotRequired[
        Annotated[
            Optional[HeadSummary],
            Field(description="each head's values (metrics.per_head); absent when it is off, null on row 0"),
        ]
    ],
)
LensSummary = _summary(
    "LensSummary",
    "lens_summary",
    "Logit lens (v2): block l's output at position t - 1 through the model's own final norm and head.",
)


@_FORBID
class LayerSummary(TypedDict):
    layer_index: int
    hidden_summary: Optional[HiddenSummary]
    attention_summary: Optional[AttentionSummary]
    lens_summary: NotRequired[
        Annotated[
            Optional[LensSummary],
            Field(description="logit lens (v2); null on row 0 and where metrics.logit_lens leaves it off"),
        ]
    ]
    extensions: NotRequired[
        Annotated[
            Optional[dict[str, Any]],
            Field(description="the user metrics of metrics.extra on this layer, by column; null where none reads it"),
        ]
    ]


class TokenInfo(_Model):
    token_id: int
    token_text: str
    is_prompt_token: bool


class TimelineStep(_Model):
    step_index: int
    token: TokenInfo
    logits_summary: Optional[LogitsSummary]
    layers: list[LayerSummary]
    extensions: dict[str, Any] = Field(default_factory=dict)


class ModelInfo(_Model):
    name: str = Field(description="the config choice, e.g. smollm2")
    hf_id: str = Field(description="what was loaded: hub id, path, or embedded:<dist>/<file>")
    revision: Optional[str] = Field(description="hub commit, else sha256 of the weights")
    architecture: str
    num_layers: int
    hidden_size: int
    num_attention_heads: int
    tokenizer_hf_id: str
    dtype: str
    device: str


class GenerationInfo(_Model):
    do_sample: bool
    temperature: float
    top_k: int
    top_p: float


class RunConfigInfo(_Model):
    seed: int
    device_requested: str
    max_new_tokens: int
    batch_size: int
    generation: GenerationInfo
    prompt_source: str
    prompt_index: int
    # v2 keys, with defaults so that traces written before them still validate
    sample_index: int = Field(
        default=0, description="which of the prompt's num_samples continuations, 0..num_samples-1"
    )
    num_samples: int = Field(default=1, description="continuations generated per prompt")
    chat_template: bool = Field(default=False, description="the prompt was wrapped in the tokenizer's chat template")
    system_prompt: Optional[str] = Field(default=None, description="the system message of the chat template, if any")
    sketch: dict[str, Any]
    sink: dict[str, Any]


class PromptInfo(_Model):
    text: str
    token_ids: list[int]
    num_tokens: int
    index: int
    id: Optional[str]
    source: str
    answer: Optional[list[str]] = Field(default=None, description="the .jsonl line's accepted answers, if any")
    grader: Optional[str] = Field(default=None, description="exact | contains | number | regex, with an answer")


class GeneratedInfo(_Model):
    output_text: str
    token_ids: list[int]
    num_tokens: int


class _SummaryBase(_Model):
    prompt_tokens: int
    total_steps: int
    num_layers: int
    elapsed_ms: int = Field(description="wall time of the generate call that produced this trace (its whole batch)")


def _signal_field(s: signals.Signal):
    """A signal's summary key: required for generated_tokens (always written), else optional
    (absent in traces written before signals; null where the signal is undefined)."""
    kind = int if str(s.type).startswith("int") else float
    description = f"{s.definition}; direction {s.direction:+d}"
    if s.name == "generated_tokens":
        return kind, Field(description=description)
    return Optional[kind], Field(default=None, description=description)


# The per-trace signals of signals.SIGNALS, one key each.
Summary = create_model("Summary", __base__=_SummaryBase, **{s.name: _signal_field(s) for s in signals.SIGNALS})


class FlagEvidence(_Model):
    fired: bool
    steps: list[int] = Field(description="timeline steps where the pattern shows")
    layers: list[int] = Field(description="layers where it shows (empty for per-token flags)")
    value: Optional[float] = Field(description="the extreme value seen (count, nats, ratio), null when none")
    detail: str


# One key per flag of health.FLAGS.
Health = create_model(
    "Health", __base__=_Model, **{f.name: (FlagEvidence, Field(description=f.definition)) for f in health.FLAGS}
)


class TraceWarning(_Model):
    code: str
    message: str


class Trace(_Model):
    schema_version: str = SCHEMA_VERSION
    trace_id: str
    created_at_utc: str
    model: ModelInfo
    run_config: RunConfigInfo
    prompt: PromptInfo
    generated: GeneratedInfo
    timeline: list[TimelineStep]
    summary: Summary
    health: Optional[Health] = Field(
        default=None, description="health flags with their evidence (absent in older traces)"
    )
    warnings: list[TraceWarning] = Field(default_factory=list)
    extensions: dict[str, Any] = Field(default_factory=dict)


def _ranges(values) -> str:
    """[1, 2, 3, 7] -> "1-3, 7"."""
    out, run = [], []
    for v in sorted(set(int(x) for x in values)):
        if run and v != run[-1] + 1:
            out.append(f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0]))
            run = []
        run.append(v)
    if run:
        out.append(f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0]))
    return ", ".join(out)


def non_finite_warning(cap: SequenceCapture) -> TraceWarning | None:
    """Which steps and layers carried NaN or Inf (e.g. float16 overflow), if any.

    Summary values computed from non-finite tensors are NaN in the capture (Inf made NaN);
    this names where they are, so that a reader knows the gaps are the model's, not ours.
    """
    steps, layers = (bad[1:] for bad in cap.non_finite)  # (T-1,), (T-1, L)
    if not steps.any() and not layers.any():
        return None
    parts = []
    if steps.any():
        parts.append(f"the next-token distribution at steps {_ranges(np.flatnonzero(steps) + 1)}")
    if layers.any():
        t, l = np.nonzero(layers)
        parts.append(f"layers {_ranges(l)} at steps {_ranges(t + 1)}")
    return TraceWarning(
        code="non_finite",
        message=f"NaN or Inf (e.g. float16 overflow) in {' and in '.join(parts)}; "
        f"those values are written as NaN (null in JSON)",
    )
