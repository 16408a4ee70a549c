"""Per-trace signals and health flags (docs/evaluate.md): the math against plain numpy
written here, each flag raised by a constructed case and silent on clean output, the JSON
trace's summary and health equal to the traces.parquet row, and docs/evaluate.md's tables."""

import json
import math
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from corevital.assess import health, signals
from corevital.core.config import HealthConfig
from corevital.output import table, tracedoc
from corevital.output.trace import Trace
from corevital.output.vocab import Vocabulary

from synthetic import FakeTokenizer, clean_capture, header

REPO = Path(__file__).resolve().parent.parent


def brute_repeat_share(ids, P, n=4):
    """Each n-gram ending at a generated token: did the same ids start at an earlier position?"""
    ids, hits, total = list(ids), 0, 0
    for end in range(max(P, n - 1), len(ids)):
        start = end - n + 1
        total += 1
        hits += any(ids[s : s + n] == ids[start : end + 1] for s in range(start))
    return hits / total if total else None


def test_signals_equal_plain_numpy():
    cap = clean_capture(P=20, G=12, L=8)
    cap["token_logprob"][23] = np.nan  # a non-finite value is left out of means and extremes
    got = signals.compute(cap)
    P = 20
    lp = cap["token_logprob"][P:].astype(np.float64)
    lp = lp[~np.isnan(lp)]
    ent, top1, margin = (
        cap[("logits_entropy", "logits_top1_prob", "logits_top1_top2_margin")[i]][P:].astype(np.float64)
        for i in range(3)
    )
    mid = slice(2, 6)  # the middle half of 8 layers
    expected = {
        "generated_tokens": 12,
        "mean_token_logprob": lp.mean(),
        "min_token_logprob": lp.min(),
        "first_token_logprob": cap["token_logprob"][P],
        "mean_logits_entropy": ent.mean(),
        "max_logits_entropy": ent.max(),
        "mean_logits_top1_prob": top1.mean(),
        "mean_top1_top2_margin": margin.mean(),
        "repeat_4gram_share": brute_repeat_share(cap.token_ids, P),
        "mid_attn_entropy": cap["attn_entropy_mean"][P:, mid].astype(np.float64).mean(),
        "mid_attn_concentration": cap["attn_concentration_max"][P:, mid].astype(np.float64).mean(),
        "mid_prompt_attention": cap["attn_prompt_mass"][P:, mid].astype(np.float64).mean(),
        "mid_prev_attention": cap["attn_prev_mass"][P:, mid].astype(np.float64).mean(),
        "rauq": None,  # no per-head columns (metrics.per_head off)
        "rauq_head_mean": None,  # a generated token without a probability: no recurrence
        "last_norm_ratio": cap["hidden_l2_norm"][P:, -1].astype(np.float64).mean()
        / cap["hidden_l2_norm"][2:P, -1].astype(np.float64).mean(),
    }
    assert list(got) == [s.name for s in signals.SIGNALS] == list(expected)
    for name, value in expected.items():
        assert got[name] is None if value is None else got[name] == pytest.approx(value, rel=1e-6), name


def brute_rauq(cap, P: int, layers, alpha: float = 0.2) -> float:
    """RAUQ's recurrence written out per layer and token: c_1 = p_1, c_i = a p_i + (1 - a) prev_i c_(i-1);
    the layer's score -mean log c; the largest over `layers`."""
    scores = []
    for layer in layers:
        c, logs = None, []
        for t in range(P, len(cap.token_ids)):
            p = math.exp(float(cap["token_logprob"][t]))
            c = p if c is None else alpha * p + (1 - alpha) * float(cap["attn_prev_mass"][t, layer]) * c
            logs.append(math.log(c))
        scores.append(-sum(logs) / len(logs))
    return max(scores)


def test_rauq_head_mean_equals_its_recurrence_written_out():
    cap = clean_capture(P=10, G=15, L=8, seed=3)
    assert signals.compute(cap)["rauq_head_mean"] == pytest.approx(brute_rauq(cap, 10, range(2, 6)), rel=1e-9)


def with_heads(cap, heads: int, seed: int = 0):
    """`cap` with per-head self masses (metrics.per_head): (T, L, heads), row 0 NaN."""
    rng = np.random.default_rng(seed)
    own = rng.uniform(0.0, 1.0, (len(cap.token_ids), cap.num_layers, heads)).astype(np.float32)
    own[0] = np.nan
    cap.values["head_self_mass"] = own
    return cap


def paper_rauq(logprobs, attention, alpha=0.2) -> float:
    """RAUQ from the paper's equations, one layer and token at a time. logprobs: log P(y_i) of
    the N generated tokens; attention[l][h][i]: head h of layer l's weight from token y_i on
    y_(i-1), i = 1..N-1 (index 0 unused). Layers: LM-Polygraph's middle third, L // 3 to
    ceil(2L / 3). Per layer the head h_l = argmax_h (1 / (N - 1)) sum_i a[l][h][i]; confidence
    c_1 = P(y_1), c_i = alpha P(y_i) + (1 - alpha) a[l][h_l][i] c_(i-1); the layer's uncertainty
    u_l = 1 - (1 / N) sum_i log c_i; RAUQ = max_l u_l."""
    L, N = len(attention), len(logprobs)
    scores = []
    for layer in range(L // 3, math.ceil(2 * L / 3) + 1):
        means = [sum(attention[layer][h][1:N]) / max(1, N - 1) for h in range(len(attention[layer]))]
        best = max(range(len(means)), key=lambda h: (means[h], -h))  # the first head of a tie
        c = [math.exp(logprobs[0])]
        for i in range(1, N):
            c.append(alpha * math.exp(logprobs[i]) + (1 - alpha) * attention[layer][best][i] * c[-1])
        scores.append(1 - sum(math.log(x) for x in c) / N)
    return max(scores)


@pytest.mark.parametrize("L,G", [(8, 15), (30, 7), (3, 1), (5, 2)])
def test_rauq_as_published_equals_the_papers_equations(L, G):
    P, heads = 6, 4
    cap = with_heads(clean_capture(P=P, G=G, L=L, seed=L), heads, seed=G)
    own = cap["head_self_mass"].astype(np.float64)
    # the step generating token i (row P + i) reads token i - 1 at its own query position
    attention = [[[float(own[P + i, layer, h]) for i in range(G)] for h in range(heads)] for layer in range(L)]
    expected = paper_rauq([float(x) for x in cap["token_logprob"][P:]], attention)
    assert signals.compute(cap)["rauq"] == pytest.approx(expected, rel=1e-9)


def test_rauq_layers_are_lm_polygraphs_middle_third():
    assert list(signals.rauq_layers(30)) == list(range(10, 21))
    assert list(signals.rauq_layers(32)) == list(range(10, 23))
    assert list(signals.rauq_layers(2)) == [0, 1]


@pytest.mark.parametrize(
    "P,ids,expected",
    [
        (4, [1, 2, 3, 4, 1, 2, 3, 4], 0.25),  # of the 4-grams ending at steps 4..7, the last repeats the prompt's
        (4, [1, 2, 3, 4, 5, 6, 7, 8], 0.0),
        (2, [9, 9, 9, 9, 9, 9], 2 / 3),  # 4-grams starting at 0, 1, 2: the first is new, the others repeat it
        (1, [1, 2], None),  # no 4-gram at all
    ],
)
def test_repeat_share_against_brute_force(P, ids, expected):
    got = signals.repeat_share(np.array(ids), P)
    assert got == brute_repeat_share(ids, P)
    assert got == pytest.approx(expected) if expected is not None else got is None


def test_random_repeat_share_against_brute_force():
    rng = np.random.default_rng(3)
    for _ in range(50):
        T = int(rng.integers(1, 40))
        ids = rng.integers(0, 3, T)
        P = int(rng.integers(1, T + 1))
        assert signals.repeat_share(ids, P) == pytest.approx(brute_repeat_share(ids, P))


def test_signals_over_no_generated_rows_are_null():
    cap = clean_capture(P=10, G=0)
    got = signals.compute(cap)
    assert got["generated_tokens"] == 0
    assert all(v is None for k, v in got.items() if k != "generated_tokens")
    assert not any(e.fired for e in health.check(cap, HealthConfig()).values())


def test_flags_are_silent_on_clean_output():
    for seed in range(5):
        flags = health.check(clean_capture(seed=seed), HealthConfig())
        assert list(flags) == [f.name for f in health.FLAGS]
        assert not any(e.fired for e in flags.values()), {k: e for k, e in flags.items() if e.fired}


def _fires(cap, name, h=HealthConfig()):
    e = health.check(cap, h)[name]
    others = [k for k, v in health.check(cap, h).items() if v.fired and k != name]
    assert not others, f"{name}'s case also raised {others}"
    return e


def test_repetition_loop():
    cap = clean_capture(P=20, G=12)
    cap.token_ids[20:32] = [5, 6, 7, 8] * 3
    e = _fires(cap, "repetition_loop")
    assert e.fired and e.steps == [20, 24, 28] and e.value == 3
    assert not _fires(cap, "repetition_loop", replace(HealthConfig(), loop_min_repeats=4)).fired
    cap.token_ids[28:32] = [1, 2, 3, 4]  # only twice now
    assert not _fires(cap, "repetition_loop").fired


def test_non_finite():
    cap = clean_capture(P=20, G=12, L=6)
    cap["hidden_std"][23, 2] = np.inf
    e = _fires(cap, "non_finite")
    assert e.fired and e.steps == [23] and e.layers == [2]
    cap = clean_capture(P=20, G=12, L=6)
    cap["hidden_std"][5, 2] = np.nan  # a prompt row: not the generated output's
    assert not _fires(cap, "non_finite").fired


def test_entropy_spike():
    cap = clean_capture(P=20, G=12)
    cap["logits_entropy"][26] = 7.5  # median of the rest is about 1.5
    e = _fires(cap, "entropy_spike")
    assert (
        e.fired and e.steps == [26] and e.value == pytest.approx(7.5 - np.median(cap["logits_entropy"][20:]), rel=1e-6)
    )
    assert not _fires(cap, "entropy_spike", replace(HealthConfig(), entropy_spike_nats=8.0)).fired


def test_attention_collapse():
    cap = clean_capture(P=20, G=12, L=6)
    cap["attn_entropy_mean"][25, 3] = 0.001
    e = _fires(cap, "attention_collapse")
    assert e.fired and e.steps == [25] and e.layers == [3] and e.value == pytest.approx(0.001)
    short = clean_capture(P=5, G=8, L=6)
    short["attn_entropy_mean"][7, 3] = 0.0  # row 7 has 7 keys: too few to call it a collapse
    assert not _fires(short, "attention_collapse").fired


def test_hidden_norm_explosion():
    cap = clean_capture(P=20, G=12, L=6)
    cap["hidden_l2_norm"][30, 4] *= 40
    e = _fires(cap, "hidden_norm_explosion")
    assert e.fired and e.steps == [30] and e.layers == [4] and e.value > 30
    cap = clean_capture(P=20, G=12, L=6)
    cap["hidden_l2_norm"][1, :] *= 100  # position 0's massive activation is expected, and not generated
    assert not _fires(cap, "hidden_norm_explosion").fired


def test_json_summary_and_health_equal_the_traces_row():
    cap = with_heads(clean_capture(P=20, G=12), 3)  # every signal has a value (rauq reads the per-head columns)
    cap.token_ids[20:32] = [5, 6, 7, 8] * 3
    h = header(answer=["42"], grader="number")
    vocab = Vocabulary(FakeTokenizer(), 300)
    assessment = health.assess(cap, HealthConfig())
    doc = json.loads(tracedoc.render(cap, h, vocab, "out", assessment).json)
    Trace.model_validate(doc)  # `corevital validate`'s schema holds
    row = table.traces_table([table.trace_row(cap, h, "out", assessment)]).to_pylist()[0]
    for s in signals.SIGNALS:
        assert row[s.name] is not None and np.float32(doc["summary"][s.name]) == np.float32(row[s.name]), s.name
    for f in health.FLAGS:
        assert doc["health"][f.name]["fired"] == row[f.column]
    assert doc["health"]["repetition_loop"]["steps"] == [20, 24, 28] and row["flag_repetition_loop"]
    assert row["answer"] == ["42"] and row["grader"] == "number" and doc["prompt"]["answer"] == ["42"]


def test_traces_schema_has_the_contract_columns():
    schema = table.TRACES_SCHEMA
    for name in (
        "mean_token_logprob",
        "min_token_logprob",
        "mean_logits_entropy",
        "max_logits_entropy",
        "mean_top1_top2_margin",
        "repeat_4gram_share",
    ):
        assert schema.field(name).type == pa.float32(), name
    assert schema.field("generated_tokens").type == pa.int32()
    for f in health.FLAGS:
        assert schema.field(f.column).type == pa.bool_()
    assert all(s.direction in (-1, 1) for s in signals.SIGNALS)


def test_readme_tables_match_the_declarations():
    page = (REPO / "docs" / "evaluate.md").read_text()
    assert signals.markdown_table() in page, "docs/evaluate.md's signal table: paste signals.markdown_table()"
    assert health.markdown_table() in page, "docs/evaluate.md's flag table: paste health.markdown_table()"


def test_cost_per_trace_is_small():
    """Signals and flags of a 1,000-token trace of a 30-layer model: a few milliseconds at most."""
    cap = clean_capture(P=500, G=500, L=30, vocab=5000)
    health.assess(cap)
    start = time.perf_counter()
    for _ in range(20):
        health.assess(cap)
    per = (time.perf_counter() - start) / 20
    print(f"assess: {per * 1e3:.2f} ms per 1,000-token, 30-layer trace")
    assert per < 0.02


def test_all_nan_layers_raise_non_finite_without_warnings():
    import warnings

    cap = clean_capture(P=10, G=6, L=4)
    cap["hidden_mean"][:, 2] = np.nan
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        flags = health.check(cap, HealthConfig())
    assert flags["non_finite"].fired and flags["non_finite"].layers == [2] and not flags["hidden_norm_explosion"].fired


def test_rauq_of_a_real_generation_equals_the_papers_equations_on_the_reference(tiny_llama):
    """A tiny Llama's sampled, batched generation with metrics.per_head: `rauq` equals the paper's
    equations fed by the independent reference's attention weights and log-probs (eager attention,
    one teacher-forced pass, tests/reference.py)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from corevital.capture import generate_with_capture, query_heads
    from corevital.core import metrics
    from corevital.core.config import SamplingConfig

    from conftest import PROMPTS
    from reference import reference_frame

    tok = AutoTokenizer.from_pretrained(tiny_llama)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, attn_implementation="eager").eval()
    sampling = SamplingConfig(max_new_tokens=8, do_sample=True, temperature=1.0, top_k=0, top_p=1.0)
    heads = query_heads(model)
    caps = generate_with_capture(model, tok, PROMPTS[:2], sampling, seed=5, extras=(metrics.PerHead(heads),))
    for cap in caps:
        P, G = cap.prompt_len, cap.generated_len
        with torch.no_grad():
            ref = reference_frame(model, cap.token_ids.tolist(), prompt_len=P)
        own = {(r.step_index, r.layer_index): r.head_self_mass for r in ref.itertuples()}
        logprobs = ref[ref.layer_index == 0].set_index("step_index").token_logprob
        attention = [
            [[float(own[(P + i, layer)][h]) for i in range(G)] for h in range(heads)] for layer in range(cap.num_layers)
        ]
        expected = paper_rauq([float(logprobs[P + i]) for i in range(G)], attention)
        assert G > 1 and signals.compute(cap)["rauq"] == pytest.approx(expected, rel=1e-4)
