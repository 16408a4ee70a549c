"""Health flags: a yes/no per trace for a known failure pattern, with its evidence.

Every flag is declared once, in FLAGS: its name (the `flag_<name>` bool column of
`traces.parquet`, the key of the JSON trace's `health`), the config keys of its thresholds
(`health.*`, corevital/core/config.py's HealthConfig), its definition, why its thresholds are what
they are, and a pure numpy check over the trace's arrays that returns the evidence: the
timeline steps and layers where the pattern shows, and the extreme value seen. Flags are
ranked by `corevital evaluate` like the signals, with direction +1 (a raised flag means more
risk). Only generated rows are examined: a flag describes what the model produced.

The defaults come from runs of the embedded SmolLM2-135M-Instruct (32, then 534 short
answers, chat template, 16 sampled tokens), chosen so that they rarely fire there: a flag
should mark the unusual, not the model's everyday output. No threshold looks at the labels.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from corevital.assess.signals import TraceArrays, ngram_codes


@dataclass
class Evidence:
    """What a flag saw: `fired`, the timeline steps and layers involved, the extreme value."""

    fired: bool = False
    steps: list[int] = field(default_factory=list)
    layers: list[int] = field(default_factory=list)
    value: float | None = None
    detail: str = ""

    def dump(self) -> dict[str, Any]:
        return {
            "fired": self.fired,
            "steps": self.steps,
            "layers": self.layers,
            "value": self.value,
            "detail": self.detail,
        }


def _cells(mask: np.ndarray, first_step: int) -> tuple[list[int], list[int]]:
    """(steps, layers) of a (rows, L) mask's True cells, steps offset to timeline rows."""
    rows, layers = np.nonzero(mask)
    return sorted(set((rows + first_step).tolist())), sorted(set(layers.tolist()))


def repetition_loop(a: TraceArrays, h) -> Evidence:
    n, k = int(h.loop_ngram), int(h.loop_min_repeats)
    gen = np.asarray(a.gen(a.cap.token_ids), dtype=np.int64)
    if len(gen) < n:
        return Evidence()
    codes = ngram_codes(gen, n)
    counts = np.bincount(codes)
    top = int(counts.argmax())
    if counts[top] < k:
        return Evidence(value=float(counts[top]))
    starts = np.flatnonzero(codes == top)
    return Evidence(
        True,
        (starts + a.P).tolist(),
        [],
        float(counts[top]),
        f"the {n}-gram of token ids {gen[starts[0] : starts[0] + n].tolist()} occurs {counts[top]} times in "
        f"the generated tokens, starting at these steps",
    )


def non_finite(a: TraceArrays, h) -> Evidence:
    step_bad, layer_bad = (a.gen(bad) for bad in a.cap.non_finite)  # (G,), (G, L)
    if not step_bad.any() and not layer_bad.any():
        return Evidence()
    steps = (np.flatnonzero(step_bad | layer_bad.any(-1)) + a.P).tolist()
    layers = sorted(set(np.nonzero(layer_bad)[1].tolist()))
    return Evidence(True, steps, layers, None, "NaN or Inf in the summaries at these steps (and layers)")


def entropy_spike(a: TraceArrays, h) -> Evidence:
    e = a.gen(a.cap["logits_entropy"]).astype(np.float64)
    ok = np.isfinite(e)
    if ok.sum() < 2:
        return Evidence()
    excess = e - np.median(e[ok])
    top = float(np.nanmax(np.where(ok, excess, np.nan)))
    over = ok & (excess > h.entropy_spike_nats)
    if not over.any():
        return Evidence(value=top)
    return Evidence(
        True,
        (np.flatnonzero(over) + a.P).tolist(),
        [],
        top,
        f"next-token entropy more than {h.entropy_spike_nats} nats above the median of the generated steps",
    )


def attention_collapse(a: TraceArrays, h) -> Evidence:
    ent = a.gen(a.cap["attn_entropy_mean"])  # (G, L) mean over heads of the attention entropy
    keys = np.arange(a.P, a.T)[:, None]  # row t's query sees t keys
    low = np.isfinite(ent) & (ent < h.attn_collapse_entropy) & (keys >= h.attn_collapse_min_keys)
    value = float(np.nanmin(ent)) if np.isfinite(ent).any() else None
    if not low.any():
        return Evidence(value=value)
    steps, layers = _cells(low, a.P)
    return Evidence(
        True,
        steps,
        layers,
        value,
        f"every head of the layer puts nearly all its weight on one key (mean head entropy < "
        f"{h.attn_collapse_entropy} nats)",
    )


def hidden_norm_explosion(a: TraceArrays, h) -> Evidence:
    norms = a.cap["hidden_l2_norm"].astype(np.float64)  # (T, L)
    base = norms[2:]  # positions >= 1: position 0 is often a "massive activation" by design
    if a.G == 0 or not np.isfinite(base).any():
        return Evidence()
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a layer with no finite norm (all NaN): its median is NaN
        finite = np.isfinite(base)
        median = (
            np.median(base, axis=0) if finite.all() else np.nanmedian(np.where(finite, base, np.nan), axis=0)
        )  # (L,)
        ratio = a.gen(norms) / median
    ok = np.isfinite(ratio)
    value = float(ratio[ok].max()) if ok.any() else None
    over = ok & (ratio > h.norm_explosion_factor)
    if not over.any():
        return Evidence(value=value)
    steps, layers = _cells(over, a.P)
    return Evidence(
        True,
        steps,
        layers,
        value,
        f"hidden-state L2 norm above {h.norm_explosion_factor} x the layer's median over the trace",
    )


@dataclass(frozen=True)
class Flag:
    """One health flag: `check(arrays, thresholds)` -> Evidence. `thresholds`: its HealthConfig keys."""

    name: str
    thresholds: tuple[str, ...]
    definition: str
    why: str
    check: Callable[[TraceArrays, Any], Evidence]

    @property
    def column(self) -> str:
        return f"flag_{self.name}"


FLAGS: tuple[Flag, ...] = (
    Flag(
        "repetition_loop",
        ("loop_ngram", "loop_min_repeats"),
        "some n-gram of the generated tokens (n = `health.loop_ngram`) occurs at least `health.loop_min_repeats` "
        "times among them, overlaps counted",
        "a phrase of 4 tokens said three times in one answer is a loop, not style; two could be a quotation",
        repetition_loop,
    ),
    Flag(
        "non_finite",
        (),
        "a NaN or Inf in any summary of a generated row (e.g. float16 overflow)",
        "no threshold: any non-finite value means the model's numbers broke",
        non_finite,
    ),
    Flag(
        "entropy_spike",
        ("entropy_spike_nats",),
        "a generated step's next-token entropy exceeds the median over the trace's generated steps by more than "
        "`health.entropy_spike_nats` nats",
        "4 nats is e^4 ~ 55 times as many plausible tokens as the trace's typical step; the calibration run's "
        "largest excess was 3.8 nats (99th percentile 3.3)",
        entropy_spike,
    ),
    Flag(
        "attention_collapse",
        ("attn_collapse_entropy", "attn_collapse_min_keys"),
        "at a generated step with at least `health.attn_collapse_min_keys` keys, some layer's mean head "
        "attention entropy is below `health.attn_collapse_entropy` nats: every head reads one key",
        "on the embedded model's 534 answers to data/ (seed 1) the lowest was 0.006 nats, always in layer 26, whose "
        "heads mostly read one key anyway (0.02 fired on 4% of them); at a mean below 0.005 nearly all of every head's "
        "weight is on one key. Rows with few keys are left out: one key gives entropy 0",
        attention_collapse,
    ),
    Flag(
        "hidden_norm_explosion",
        ("norm_explosion_factor",),
        "a generated step's hidden-state L2 norm in some layer exceeds `health.norm_explosion_factor` times "
        "that layer's median over the trace's rows 2..T-1",
        "the calibration run's largest ratio was 6.7 on generated rows and 7.5 on prompt rows; position 0's "
        "massive activation (about 100x) is left out of the median and never a generated row",
        hidden_norm_explosion,
    ),
)


def check(cap, thresholds) -> dict[str, Evidence]:
    """Every flag's evidence for one capture, by flag name, in FLAGS order."""
    a = TraceArrays(cap)
    return {f.name: f.check(a, thresholds) for f in FLAGS}


def markdown_table() -> str:
    """docs/evaluate.md's flag table (tests/test_signals.py checks the page holds it verbatim)."""
    from corevital.core.config import HealthConfig

    defaults = HealthConfig()
    rows = ["| column | thresholds (default) | fires when | why these thresholds |", "|---|---|---|---|"]
    for f in FLAGS:
        keys = ", ".join(f"`health.{k}` ({getattr(defaults, k)})" for k in f.thresholds) or "none"
        rows.append(f"| `{f.column}` | {keys} | {f.definition} | {f.why} |")
    return "\n".join(rows)


@dataclass
class Assessment:
    """One trace's signals (by name) and flags' evidence (by flag name): what the writer puts in
    the JSON trace's `summary` and `health` and in its `traces.parquet` row."""

    signals: dict[str, float | int | None]
    flags: dict[str, Evidence]

    def columns(self) -> dict[str, Any]:
        """The `traces.parquet` values: each signal, then `flag_<name>` per flag."""
        return {**self.signals, **{f"flag_{name}": e.fired for name, e in self.flags.items()}}


def assess(cap, thresholds=None) -> Assessment:
    """Signals and flags of one capture; `thresholds`: a HealthConfig (or any object with its
    attributes), its defaults when None."""
    from corevital.assess import signals
    from corevital.core.config import HealthConfig

    return Assessment(signals.compute(cap), check(cap, thresholds if thresholds is not None else HealthConfig()))
