"""Per-trace signals: one number per trace that `corevital evaluate` ranks as a predictor of a
wrong answer (docs/evaluate.md, "Signals").

Every signal is declared once, in SIGNALS: its name, Arrow type, direction (+1: a higher value
means more risk; -1: a lower value does; fixed here, never fitted to labels), a one-line
definition and a small pure numpy function of the trace's arrays. From the declarations come
`traces.parquet`'s signal columns (table.py), the JSON trace's `summary` keys (tracedoc.py)
and their JSON Schema (trace.py), docs/evaluate.md's signal table (`markdown_table`), and the rows
`corevital evaluate` ranks. The health flags (health.py) are declared the same way and are
ranked too.

A signal reads a `TraceArrays`: the capture's arrays (`a.cap`, a SequenceCapture: row t of
each array is timeline row t, row 0 is NaN) with the generated rows, the middle layers and
the prompt rows sliced once. Adding one is one declaration, e.g. (declared below):

    Signal("mid_prompt_attention", -1, "mean share of attention on the prompt over the generated "
           "rows in the middle layers (Lookback Lens, Chuang et al. 2024)",
           lambda a: mean(a.gen(a.cap["attn_prompt_mass"][:, a.mid]))),

A signal over the generated rows is None (null) when there are none.

Cost: each signal is one or two numpy reductions over arrays of at most (G, L) values, so
all of them take about 0.1-0.3 ms per trace (measured in tests/test_signals.py), against the
milliseconds the trace's JSON and rows take to render.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
import pyarrow as pa

F32, I32 = pa.float32(), pa.int32()


class TraceArrays:
    """One capture's arrays as signals read them (slices are views, nothing is copied)."""

    def __init__(self, cap):
        self.cap = cap
        self.P = int(cap.prompt_len)
        self.T = len(cap.token_ids)
        self.G = self.T - self.P
        self.L = cap.num_layers
        quarter = self.L // 4
        self.mid = slice(quarter, self.L - quarter)  # the middle half of the layers (all of them when L < 4)

    def gen(self, values: np.ndarray) -> np.ndarray:
        """The generated rows of a per-row array (T, ...)."""
        return values[self.P :]


def mean(values: np.ndarray) -> float | None:
    """Mean of the finite values (summed in float64), None when there are none."""
    finite = np.isfinite(values)
    n = int(np.count_nonzero(finite))
    if not n:
        return None
    total = np.add.reduce(values if n == values.size else values[finite], axis=None, dtype=np.float64)
    return float(total / n)


def minimum(values: np.ndarray) -> float | None:
    v = values[np.isfinite(values)]
    return float(v.min()) if v.size else None


def maximum(values: np.ndarray) -> float | None:
    v = values[np.isfinite(values)]
    return float(v.max()) if v.size else None


def ngram_codes(token_ids: np.ndarray, n: int) -> np.ndarray:
    """One int64 code per n-gram (tokens i..i+n-1), equal codes for equal n-grams: (T-n+1,).

    Built a token at a time from dense codes (np.unique of 1-D int64 keys, which is far
    faster than np.unique over rows), so no key ever overflows int64.
    """
    _, tokens = np.unique(np.asarray(token_ids, dtype=np.int64), return_inverse=True)
    tokens = tokens.reshape(-1).astype(np.int64)
    codes, width = tokens, int(tokens.max(initial=0)) + 1
    for k in range(1, n):
        keys = codes[:-1] * width + tokens[k:]
        _, codes = np.unique(keys, return_inverse=True)
        codes = codes.reshape(-1).astype(np.int64)
    return codes


def repeat_share(token_ids: np.ndarray, prompt_len: int, n: int = 4) -> float | None:
    """Share of the n-grams ending at a generated token (tokens t-n+1..t, t >= P) whose ids
    occur as an n-gram starting earlier in the sequence, prompt included; None when there is
    no such n-gram (no generated token, or fewer than n tokens). One pass with a set of the
    n-grams seen so far (tuples of ids): linear in T."""
    T = len(token_ids)
    first = max(prompt_len, n - 1) - (n - 1)  # start of the first n-gram ending at a generated token
    if T < n or first >= T - n + 1:
        return None
    ids = token_ids.tolist()
    grams = list(zip(*(ids[k : T - n + 1 + k] for k in range(n))))  # the n-gram starting at each index
    seen, repeats = set(grams[:first]), 0
    for gram in grams[first:]:
        repeats += gram in seen
        seen.add(gram)
    return repeats / (len(grams) - first)


def _first(values: np.ndarray) -> float | None:
    return float(values[0]) if values.size and np.isfinite(values[0]) else None


def _norm_ratio(a: TraceArrays) -> float | None:
    """Last layer's mean hidden L2 norm over the generated rows / over prompt rows 2..P-1
    (row 1, position 0, is left out: many models make it a "massive activation")."""
    prompt, gen = mean(a.cap["hidden_l2_norm"][2 : a.P, -1]), mean(a.gen(a.cap["hidden_l2_norm"][:, -1]))
    return gen / prompt if prompt and gen is not None else None


RAUQ_ALPHA = 0.2  # RAUQ's weight of a token's own probability (LM-Polygraph's RAUQ default; docs/evaluate.md)


def rauq_layers(L: int) -> range:
    """RAUQ's layers, as LM-Polygraph's RAUQ estimator takes them: L // 3 to ceil(2L / 3), both
    included (the middle third), within 0..L-1."""
    return range(L // 3, min(L, math.ceil(L / 3 * 2) + 1))


def _rauq_scores(p: np.ndarray, attn: np.ndarray) -> np.ndarray:
    """RAUQ's per-layer uncertainty: token probabilities p (G,) and, per layer, the attention
    a_j (G - 1, layers) of the step that generates token j on token j - 1, for j = 1..G-1 ->
    (layers,): 1 - mean_j log c_j with c_0 = p_0, c_j = alpha p_j + (1 - alpha) a_j c_(j-1).
    One step per generated token, vectorised over layers."""
    c = np.empty((len(p), attn.shape[1]))  # (G, layers)
    c[0] = p[0]
    carried, own = (1 - RAUQ_ALPHA) * attn, RAUQ_ALPHA * p  # (G - 1, layers), (G,)
    for j in range(1, len(p)):
        c[j] = own[j] + carried[j - 1] * c[j - 1]
    return 1 - np.log(np.maximum(c, 1e-300)).mean(0)


def rauq(a: TraceArrays) -> float | None:
    """RAUQ (Vazhentsev et al. 2025), as LM-Polygraph's RAUQ estimator computes it, from the
    per-head columns (metrics.per_head; None without them). The step that generates token j
    reads token j - 1 at its own query position: head_self_mass at row P + j. Per layer of
    rauq_layers, the head with the largest mean of that weight over j = 1..G-1 is selected, its
    weights carry the confidence along the tokens (_rauq_scores), and the signal is the largest
    layer score."""
    if "head_self_mass" not in a.cap.values:
        return None
    p = np.exp(a.gen(a.cap["token_logprob"]).astype(np.float64))  # (G,)
    if not len(p) or not np.isfinite(p).all():
        return None
    layers = rauq_layers(a.L)
    own = a.gen(a.cap["head_self_mass"])[1:, layers.start : layers.stop].astype(np.float64)  # (G - 1, layers, heads)
    head = own.mean(0).argmax(-1) if len(own) else np.zeros(len(layers), int)  # (layers,): first of ties
    picked = own[:, np.arange(len(layers)), head]  # (G - 1, layers)
    return float(_rauq_scores(p, np.where(np.isnan(picked), 0.0, picked)).max())


def rauq_head_mean(a: TraceArrays) -> float | None:
    """A RAUQ-like score that needs no per-head columns: the same recurrence with, in place of
    the selected head's weight on the previous token, the mean over heads of the weight on key
    q - 1 (attn_prev_mass, the key before the query's own) at the same row, over the middle half
    of the layers, scored -mean log c, largest over those layers."""
    p = np.exp(a.gen(a.cap["token_logprob"]).astype(np.float64))  # (G,)
    prev = np.nan_to_num(a.gen(a.cap["attn_prev_mass"][:, a.mid]).astype(np.float64))  # (G, layers)
    if not len(p) or not np.isfinite(p).all():
        return None
    return float((_rauq_scores(p, prev[1:]) - 1).max()) if prev.shape[1] else None


@dataclass(frozen=True)
class Signal:
    """One per-trace signal. `direction`: +1 when a higher value means more risk of a wrong
    answer, -1 when a lower value does. `compute` returns a float (int for int32 signals) or None."""

    name: str
    direction: int
    definition: str
    compute: Callable[[TraceArrays], float | int | None]
    type: pa.DataType = F32
    baseline: bool = False  # a baseline every ranked table shows (length, mean log-prob)


SIGNALS: tuple[Signal, ...] = (
    Signal(
        "generated_tokens", +1, "G, the number of generated tokens (length baseline)", lambda a: a.G, I32, baseline=True
    ),
    Signal(
        "mean_token_logprob",
        -1,
        "mean log p of the generated tokens (mean-log-prob baseline)",
        lambda a: mean(a.gen(a.cap["token_logprob"])),
        baseline=True,
    ),
    Signal(
        "min_token_logprob", -1, "smallest log p of a generated token", lambda a: minimum(a.gen(a.cap["token_logprob"]))
    ),
    Signal(
        "first_token_logprob",
        -1,
        "log p of the first generated token (where a short answer is decided)",
        lambda a: _first(a.gen(a.cap["token_logprob"])),
    ),
    Signal(
        "mean_logits_entropy",
        +1,
        "mean next-token entropy (nats) over the generated tokens",
        lambda a: mean(a.gen(a.cap["logits_entropy"])),
    ),
    Signal(
        "max_logits_entropy",
        +1,
        "largest next-token entropy (nats) over the generated tokens",
        lambda a: maximum(a.gen(a.cap["logits_entropy"])),
    ),
    Signal(
        "mean_logits_top1_prob",
        -1,
        "mean top-1 probability over the generated tokens",
        lambda a: mean(a.gen(a.cap["logits_top1_prob"])),
    ),
    Signal(
        "mean_top1_top2_margin",
        -1,
        "mean top-1 minus top-2 probability over the generated tokens",
        lambda a: mean(a.gen(a.cap["logits_top1_top2_margin"])),
    ),
    Signal(
        "repeat_4gram_share",
        +1,
        "share of the 4-grams ending at generated tokens that occurred earlier in the sequence, prompt included",
        lambda a: repeat_share(a.cap.token_ids, a.P),
    ),
    Signal(
        "mid_attn_entropy",
        +1,
        "mean attention entropy (mean over heads, nats) over the generated rows "
        "in the middle half of the layers: diffuse reading of the context",
        lambda a: mean(a.gen(a.cap["attn_entropy_mean"][:, a.mid])),
    ),
    Signal(
        "mid_attn_concentration",
        -1,
        "mean largest single attention weight over the generated rows "
        "in the middle half of the layers: how sharply some head reads one key",
        lambda a: mean(a.gen(a.cap["attn_concentration_max"][:, a.mid])),
    ),
    Signal(
        "mid_prompt_attention",
        -1,
        "mean share of attention still on the prompt (attn_prompt_mass) over the "
        "generated rows in the middle half of the layers (the Lookback Lens ratio, Chuang et al. 2024)",
        lambda a: mean(a.gen(a.cap["attn_prompt_mass"][:, a.mid])),
    ),
    Signal(
        "mid_prev_attention",
        +1,
        "mean attention on the previous token (attn_prev_mass) over the generated rows "
        "in the middle half of the layers: generation leaning on its own last token",
        lambda a: mean(a.gen(a.cap["attn_prev_mass"][:, a.mid])),
    ),
    Signal(
        "rauq",
        +1,
        "RAUQ as published (Vazhentsev et al. 2025; LM-Polygraph's estimator): per layer of the middle third, the "
        "head attending most to the previous token carries the token probabilities along the answer; largest "
        "layer score. Needs metrics.per_head (null without it)",
        rauq,
    ),
    Signal(
        "rauq_head_mean",
        +1,
        "RAUQ's recurrence with the mean over heads of the attention on key q-1 (attn_prev_mass) in place of the "
        "selected head's, over the middle half of the layers; needs no per-head columns",
        rauq_head_mean,
    ),
    Signal(
        "last_norm_ratio",
        +1,
        "last layer's mean hidden L2 norm over the generated rows over its mean "
        "over prompt rows 2..P-1: the residual stream leaving the prompt's scale",
        _norm_ratio,
    ),
)
BY_NAME = {s.name: s for s in SIGNALS}


def compute(cap) -> dict[str, float | int | None]:
    """Every signal of one capture, by name, in SIGNALS order."""
    a = TraceArrays(cap)
    return {s.name: s.compute(a) for s in SIGNALS}


def markdown_table() -> str:
    """docs/evaluate.md's signal table (tests/test_signals.py checks the page holds it verbatim)."""
    rows = ["| signal | type | direction | definition |", "|---|---|---|---|"]
    for s in SIGNALS:
        arrow = "higher = more risk" if s.direction > 0 else "lower = more risk"
        kind = "float32" if s.type == F32 else str(s.type)
        rows.append(f"| `{s.name}` | {kind} | {s.direction:+d} ({arrow}) | {s.definition} |")
    return "\n".join(rows)
