"""Every per-row metric, declared once.

A `Metric` names its Parquet column, its place in the JSON trace (object and key), its Arrow
type, whether it is one value per row (token) or per row and layer, where it is null, its
one-line definition, and which capture output holds it (`reducer`, `slot`). From METRICS
come `summaries.parquet`'s metric columns (table.py), the JSON trace's summary objects
(tracedoc.py), their JSON Schema (trace.py), docs/format.md's metric tables (`markdown_table`,
checked verbatim by tests/test_metrics.py) and the arrays of a `SequenceCapture`
(`capture.sequence`), which signals and health flags read by column name.

The reducers are the functions capture calls on each tensor as the model runs; one call
yields several metrics at once (the fused CPU kernels compute an attention block's
entropies, maximum and masses in one pass over the weights):

    reducer        reads (where capture.recorder routes it)        computes (summaries.py)    output
    logits         the raw next-token logits at q                  logits_summary             (.., 3)
    token_logprob  those logits, once token t is drawn             Recorder.__call__           (..)
    token_rank     the same                                        Recorder.__call__           (..)
    hidden         block l's output and input (capture.hidden)      hidden_summary             (.., L, 13)
    attention      layer l's attention weights (capture.attention)  attention_stats            (.., L, 6)
    lens           block l's output, final norm and head           lens.step_stats            (.., L, 3)

User metrics (`metrics.extra`, `UserMetric`) are reducers of their own over block outputs,
declared the same way; the worked example is `corevital.assess.probes.LinearProbe`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa

if TYPE_CHECKING:  # only for annotations: reading traces back never loads torch
    import torch

F32, I32, BOOL = pa.float32(), pa.int32(), pa.bool_()
STEP_GROUP = "logits_summary"  # the JSON object of a row's per-token metrics
LAYER_GROUPS = ("hidden_summary", "attention_summary", "lens_summary")  # a layer's objects, in order
OPTIONAL_GROUPS = ("lens_summary",)  # the whole object is null where its metrics are (the lens off)
EXTENSIONS = "extensions"  # a layer's user metrics: {"<column>": value}
HEADS = "heads"  # metrics.per_head: each head's values, the object attention_summary.heads of the JSON trace


@dataclass(frozen=True)
class Metric:
    column: str  # summaries.parquet column, and its name in SequenceCapture.values
    group: str  # JSON object holding it: STEP_GROUP, one of LAYER_GROUPS, or EXTENSIONS
    key: str  # its key in that object
    reducer: str  # the capture output it is read from
    slot: int | slice | None  # its place on that output's last axis (None: the whole output)
    definition: str
    type: pa.DataType = F32
    null: str = "row 0"  # where it is null (docs/format.md)
    first_rows: int = 1  # leading rows without a value (NaN; -1 for integers): 1, or 2 for the previous key
    nan_is_null: bool = False  # a NaN (undefined here) is null in Parquet; v1 columns keep NaN as the value
    v2: bool = False  # added in schema 1.1.0: optional in the JSON Schema (absent in older traces)

    @property
    def per_layer(self) -> bool:
        return self.group != STEP_GROUP

    @property
    def width(self) -> int | None:
        """Values per entry: None for a scalar, k for a list column (the sketch)."""
        return None if not isinstance(self.slot, slice) else self.slot.stop - self.slot.start


def _v2(column: str, group: str, key: str, reducer: str, slot, definition: str, **kw) -> Metric:
    return Metric(column, group, key, reducer, slot, definition, nan_is_null=True, v2=True, **kw)


H, A, LENS = "hidden_summary", "attention_summary", "lens_summary"
LENS_NULL = "row 0, and wherever the lens is off (metrics.logit_lens)"
# In summaries.parquet's column order. A group's JSON keys follow this order too.
METRICS: tuple[Metric, ...] = (
    Metric(
        "logits_entropy",
        STEP_GROUP,
        "entropy",
        "logits",
        0,
        "-sum p log p, p = softmax of the RAW logits at q = t-1 (before temperature, top-k, top-p or any other "
        "logits processor), nats",
    ),
    Metric("logits_top1_prob", STEP_GROUP, "top1_prob", "logits", 1, "the largest p"),
    Metric("logits_top1_top2_margin", STEP_GROUP, "top1_top2_margin", "logits", 2, "largest p minus second largest p"),
    Metric("token_logprob", STEP_GROUP, "token_logprob", "token_logprob", None, "log p of token t"),
    Metric(
        "hidden_mean",
        H,
        "mean",
        "hidden",
        0,
        "mean of the components of block l's output at q (before the model's final norm)",
    ),
    Metric("hidden_std", H, "std", "hidden", 1, "population std (ddof 0) of those components"),
    Metric("hidden_l2_norm", H, "l2_norm", "hidden", 2, "L2 norm of that vector"),
    Metric("hidden_max_abs", H, "max_abs", "hidden", 3, "its largest absolute component (massive activations)"),
    Metric(
        "attn_entropy_mean",
        A,
        "entropy_mean",
        "attention",
        0,
        "mean over layer l's heads of the entropy of query q's attention weights over keys 0..q (padding "
        "excluded), nats",
    ),
    Metric("attn_entropy_min", A, "entropy_min", "attention", 1, "min over heads of that entropy"),
    Metric(
        "attn_concentration_max",
        A,
        "concentration_max",
        "attention",
        2,
        "the largest single attention weight over all heads and keys",
    ),
    Metric(
        "hidden_sketch",
        H,
        "sketch",
        "hidden",
        slice(4, 12),
        "block l's output projected onto 8 fixed random unit directions (summaries.sketch_directions: "
        "`torch.randn(hidden_size, 8)` from a CPU generator seeded with 0, columns normalised), the same on every "
        "machine",
        type=pa.list_(F32),
    ),
    _v2(
        "token_rank",
        STEP_GROUP,
        "token_rank",
        "token_rank",
        None,
        "1 + the number of vocabulary entries whose raw logit at q is strictly greater than token t's (1: the argmax)",
        type=I32,
    ),
    _v2(
        "attn_sink_mass",
        A,
        "sink_mass",
        "attention",
        3,
        "mean over heads of the weight on key 0, the first real token (the attention sink, Xiao et al. 2024)",
    ),
    _v2(
        "attn_prev_mass",
        A,
        "prev_mass",
        "attention",
        4,
        "mean over heads of the weight on key q-1, the token just before the query's own",
        null="rows 0 and 1",
        first_rows=2,
    ),
    _v2(
        "attn_prompt_mass",
        A,
        "prompt_mass",
        "attention",
        5,
        "mean over heads of the summed weight on prompt keys k < P: 1 on prompt rows, on generated rows the share "
        "of attention still on the prompt (the Lookback Lens ratio, Chuang et al. 2024)",
    ),
    _v2(
        "hidden_cos_prev",
        H,
        "cos_prev",
        "hidden",
        12,
        "cosine of block l's output with its input at q (the embedding output for l = 0): how much the block "
        "turned the residual stream",
    ),
    _v2(
        "lens_entropy",
        LENS,
        "entropy",
        "lens",
        0,
        "logit lens: entropy of softmax(head(final_norm(block l's output at q))), with the model's own final norm "
        "and head and every transformation it applies to its logits; at the last layer the model's own",
        null=LENS_NULL,
    ),
    _v2(
        "lens_top1_match",
        LENS,
        "top1_match",
        "lens",
        1,
        "the lens distribution's most likely token is that of the model's own distribution",
        type=BOOL,
        null=LENS_NULL,
    ),
    _v2(
        "lens_kl", LENS, "kl", "lens", 2, "KL(model's own distribution at q || lens distribution), nats", null=LENS_NULL
    ),
)
BY_COLUMN = {m.column: m for m in METRICS}
# The names of the capture's outputs (SequenceCapture is cut from them): a user metric takes another.
OUTPUTS = frozenset({m.reducer for m in METRICS} | {"topk_ids", "topk_probs", "heads"})
# The v1 float metrics: a NaN or Inf among them is the model's (non_finite warning and health flag).
V1_STEP_FLOATS = tuple(m.column for m in METRICS if not m.v2 and not m.per_layer)
V1_LAYER_FLOATS = tuple(m.column for m in METRICS if not m.v2 and m.per_layer)


def non_finite(cap) -> tuple[np.ndarray, np.ndarray]:
    """Where a capture's v1 float metrics hold NaN or Inf (e.g. float16 overflow): rows (T,) for
    the per-row ones, (row, layer) pairs (T, L) for the per-layer ones. Row 0 (no pass) is NaN:
    callers look at rows >= 1."""
    arrays = [cap[c] for c in V1_STEP_FLOATS + V1_LAYER_FLOATS]
    T, L = cap[V1_LAYER_FLOATS[0]].shape[:2]
    # The usual case, in one read of each array: a float64 sum of float32 values is finite
    # exactly when they all are (NaN stays NaN, Inf stays Inf or makes NaN, and no finite
    # float32 values sum past float64's range); then only row 0 is left to look at.
    rows = slice(0, 1) if all(np.isfinite(a[1:].sum(dtype=np.float64)) for a in arrays) else slice(None)
    steps, layers = np.zeros(T, bool), np.zeros((T, L), bool)
    steps[rows] = ~np.isfinite(np.column_stack([cap[c][rows] for c in V1_STEP_FLOATS])).all(-1)
    layers[rows] = ~np.isfinite(
        np.concatenate([cap[c][rows].reshape(-1, L, int(np.prod(cap[c].shape[2:]))) for c in V1_LAYER_FLOATS], axis=-1)
    ).all(-1)
    return steps, layers


def reducer_widths() -> dict[str, int]:
    """The last-axis width of each built-in reducer's output, from its metrics' slots."""
    widths: dict[str, int] = {}
    for m in METRICS:
        if m.slot is not None:
            end = m.slot.stop if isinstance(m.slot, slice) else m.slot + 1
            widths[m.reducer] = max(widths.get(m.reducer, 0), end)
    return widths


class UserMetric:
    """A metric of the user's (`metrics.extra`, instantiated by Hydra from `_target_` and its
    parameters): a reducer over block outputs that declares its own columns.

    Subclasses set `metrics` (Metric declarations with group EXTENSIONS, reducer `self.name`,
    slot j for the j-th value of `reduce`'s last axis) and `layers` (the blocks it reads; None:
    every block), and implement `reduce`. Before generation the runner checks that `layers` are
    the model's, then calls `bind(model)`: check shapes there and raise ValueError with one
    sentence when the metric cannot apply. Values on the blocks it does not read are null.
    """

    name: str = "extra"
    metrics: tuple[Metric, ...] = ()
    layers: tuple[int, ...] | None = None

    def bind(self, model) -> None:
        """Check the metric against the loaded model; move tensors to its device."""

    def reduce(self, hidden: torch.Tensor, layer: int) -> torch.Tensor:
        """Block `layer`'s output (b, q, H) in the model's dtype -> (b, q, k) float32, k = len(metrics)."""
        raise NotImplementedError

    def reads(self, layer: int) -> bool:
        return self.layers is None or layer in self.layers


# metrics.per_head: (column, JSON key in attention_summary.heads, definition, null, first_rows), in the
# order of the kernels' per-head fields (summaries.HEAD_FIELDS)
_HEAD_VALUES = (
    (
        "head_attn_entropy",
        "entropy",
        "each head's entropy of query q's attention weights over keys 0..q, nats",
        "row 0",
        1,
    ),
    ("head_sink_mass", "sink_mass", "each head's weight on key 0, the first real token", "row 0", 1),
    (
        "head_prev_mass",
        "prev_mass",
        "each head's weight on key q-1, the token just before the query's own",
        "rows 0 and 1",
        2,
    ),
    ("head_prompt_mass", "prompt_mass", "each head's summed weight on prompt keys k < P (Lookback Lens)", "row 0", 1),
    (
        "head_self_mass",
        "self_mass",
        "each head's weight on key q, the query's own token: the token just before the one being predicted "
        "(RAUQ's previous-token attention, Vazhentsev et al. 2025)",
        "row 0",
        1,
    ),
)


class PerHead:
    """`metrics.per_head`: the declarations of one list column per value in _HEAD_VALUES, each
    with one float32 per query head of the layer, in the model's head order (the `heads`
    reducer: the attention capture's per-head values, field-major, `heads` x 5 wide). It rides
    with the user metrics (`extras`) because its columns, like theirs, depend on the model."""

    name = "heads"
    layers = None

    def __init__(self, heads: int):
        self.heads = heads
        self.metrics = tuple(
            Metric(
                column,
                HEADS,
                key,
                self.name,
                slice(f * heads, (f + 1) * heads),
                definition,
                type=pa.list_(F32),
                null=null,
                first_rows=first,
                nan_is_null=True,
                v2=True,
            )
            for f, (column, key, definition, null, first) in enumerate(_HEAD_VALUES)
        )

    def reads(self, layer: int) -> bool:
        return True


def per_head(extras) -> bool:
    """Whether `extras` ask for the per-head values (metrics.per_head)."""
    return any(isinstance(e, PerHead) for e in extras)


def head_table() -> str:
    """docs/format.md's table of the per-head columns."""
    rows = ["| column | JSON key | type | definition | null |", "|---|---|---|---|---|"]
    for column, key, definition, null, _ in _HEAD_VALUES:
        rows.append(f"| `{column}` | `attention_summary.heads.{key}` | list of float32 | {definition} | {null} |")
    return "\n".join(rows)


def user_metric(column: str, name: str, slot: int, definition: str) -> Metric:
    """The declaration of a user metric's value: per row and layer, float32, null where not read."""
    return Metric(
        column,
        EXTENSIONS,
        column,
        name,
        slot,
        definition,
        null="row 0, and on the layers it does not read",
        nan_is_null=True,
        v2=True,
    )


def all_metrics(extras=()) -> tuple[Metric, ...]:
    """The built-in metrics, then each user metric's declarations."""
    return METRICS + tuple(m for e in extras for m in e.metrics)


def arrow_fields(extras=()) -> list[tuple[str, pa.DataType]]:
    return [(m.column, m.type) for m in all_metrics(extras)]


def _type_name(t: pa.DataType) -> str:
    return {F32: "float32", I32: "int32", BOOL: "bool"}.get(t, "list of float32")


def markdown_table(per_layer: bool) -> str:
    """docs/format.md's metric table, per row (per_layer=False) or per row and layer."""
    rows = ["| column | JSON key | type | definition | null |", "|---|---|---|---|---|"]
    for m in METRICS:
        if m.per_layer == per_layer:
            rows.append(f"| `{m.column}` | `{m.group}.{m.key}` | {_type_name(m.type)} | {m.definition} | {m.null} |")
    return "\n".join(rows)
