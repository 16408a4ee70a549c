"""Integration tier: the job's files — exact Parquet schema, row counts, and JSON == Parquet."""

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from corevital import SCHEMA_VERSION
from corevital.core.config import SamplingConfig
from corevital.output.trace import Trace
from corevital.runner.app import run_job

from conftest import compose

EXPECTED_COLUMNS = [
    ("trace_id", pa.string()),
    ("model", pa.string()),
    ("model_id", pa.string()),
    ("model_revision", pa.string()),
    ("prompt_source", pa.string()),
    ("seed", pa.int64()),
    ("prompt_index", pa.int32()),
    ("sample_index", pa.int32()),
    ("step_index", pa.int32()),
    ("layer_index", pa.int32()),
    ("temperature", pa.float64()),
    ("top_p", pa.float64()),
    ("top_k", pa.int32()),
    ("max_new_tokens", pa.int32()),
    ("do_sample", pa.bool_()),
    ("is_prompt_token", pa.bool_()),
    ("token_id", pa.int64()),
    ("token_text", pa.string()),
    ("logits_entropy", pa.float32()),
    ("logits_top1_prob", pa.float32()),
    ("logits_top1_top2_margin", pa.float32()),
    ("token_logprob", pa.float32()),
    ("hidden_mean", pa.float32()),
    ("hidden_std", pa.float32()),
    ("hidden_l2_norm", pa.float32()),
    ("hidden_max_abs", pa.float32()),
    ("attn_entropy_mean", pa.float32()),
    ("attn_entropy_min", pa.float32()),
    ("attn_concentration_max", pa.float32()),
    ("hidden_sketch", pa.list_(pa.float32())),
    ("token_rank", pa.int32()),
    ("attn_sink_mass", pa.float32()),
    ("attn_prev_mass", pa.float32()),  # docs/format.md
    ("attn_prompt_mass", pa.float32()),
    ("hidden_cos_prev", pa.float32()),
    ("lens_entropy", pa.float32()),
    ("lens_top1_match", pa.bool_()),
    ("lens_kl", pa.float32()),
    ("prompt_id", pa.string()),
]


@pytest.fixture(scope="module")
def job(tiny_llama, tmp_path_factory):
    d = tmp_path_factory.mktemp("job")
    prompts = d / "prompts.jsonl"
    prompts.write_text('{"prompt": "The quick brown fox", "id": "fox"}\n\n{"prompt": "Attention weights say"}\n')
    cfg = compose(
        [
            f"model.name_or_path={tiny_llama}",
            f"prompts={prompts}",
            "device=cpu",
            "seed=11",
            "sampling.max_new_tokens=5",
            "batch_size=2",
        ]
    )
    return run_job(cfg, d / "out", "tiny-llama"), str(prompts), tiny_llama


def test_parquet_has_exactly_the_contract_columns_and_types(job):
    result, _, _ = job
    schema = pq.read_schema(result.parquet_path)
    assert [(f.name, f.type) for f in schema] == EXPECTED_COLUMNS


def test_row_count_is_sum_of_steps_times_layers(job):
    result, _, _ = job
    df = pd.read_parquet(result.parquet_path)
    traces = [Trace.model_validate_json(Path(p).read_text()) for p in result.trace_paths]
    assert len(traces) == 2
    expected = sum((t.prompt.num_tokens + t.generated.num_tokens) * t.model.num_layers for t in traces)
    assert len(df) == expected == result.rows
    assert all(t.model.num_layers == 3 and 1 <= t.generated.num_tokens <= 5 for t in traces)


def test_metadata_holds_schema_version_and_resolved_config(job):
    result, prompts, model_dir = job
    meta = pq.read_schema(result.parquet_path).metadata
    assert meta[b"schema_version"].decode() == SCHEMA_VERSION
    config = json.loads(meta[b"corevital_config"])
    assert config["prompts"] == prompts and config["model"]["name_or_path"] == model_dir and config["seed"] == 11
    assert (result.job_dir / "resolved_config.yaml").read_text().count("seed: 11") == 1


def test_keys_and_timeline_alignment(job):
    result, prompts, model_dir = job
    df = pd.read_parquet(result.parquet_path)
    first = df[df.prompt_index == 0]
    assert set(df.model) == {"tiny-llama"} and set(df.model_id) == {str(Path(model_dir).resolve())}
    assert df.model_revision.str.fullmatch(r"sha256:[0-9a-f]{64}").all()
    assert set(df.prompt_source) == {prompts} and set(df.seed) == {11}
    assert first.prompt_id.iloc[0] == "fox" and df[df.prompt_index == 1].prompt_id.isna().all()
    assert (df.temperature == 0.8).all() and (df.top_k == 50).all() and (df.top_p == 0.95).all() and df.do_sample.all()
    trace = Trace.model_validate_json(Path(result.trace_paths[0]).read_text())
    P, G = trace.prompt.num_tokens, trace.generated.num_tokens
    steps = first.groupby("step_index").first()
    assert list(steps.index) == list(range(P + G))
    assert steps.is_prompt_token.tolist() == [True] * P + [False] * G
    assert steps.token_id.tolist() == trace.prompt.token_ids + trace.generated.token_ids


def test_json_trace_and_parquet_rows_carry_the_same_values(job):
    result, _, _ = job
    df = pd.read_parquet(result.parquet_path)
    for path in result.trace_paths:
        trace = Trace.model_validate_json(Path(path).read_text())
        rows = df[df.trace_id == trace.trace_id].sort_values(["step_index", "layer_index"])
        assert rows.prompt_index.iloc[0] == trace.prompt.index
        it = iter(rows.itertuples())
        for step in trace.timeline:
            ls = step.logits_summary
            for layer in step.layers:
                r = next(it)
                assert (r.step_index, r.layer_index, r.token_id, r.token_text, r.is_prompt_token) == (
                    step.step_index,
                    layer["layer_index"],
                    step.token.token_id,
                    step.token.token_text,
                    step.token.is_prompt_token,
                )
                if step.step_index == 0:
                    assert ls is None and layer["hidden_summary"] is None and layer["attention_summary"] is None
                    assert math.isnan(r.logits_entropy) and r.hidden_sketch is None
                    continue
                hs, at = layer["hidden_summary"], layer["attention_summary"]
                pairs = [
                    (r.logits_entropy, ls["entropy"]),
                    (r.logits_top1_prob, ls["top1_prob"]),
                    (r.logits_top1_top2_margin, ls["top1_top2_margin"]),
                    (r.token_logprob, ls["token_logprob"]),
                    (r.hidden_mean, hs["mean"]),
                    (r.hidden_std, hs["std"]),
                    (r.hidden_l2_norm, hs["l2_norm"]),
                    (r.hidden_max_abs, hs["max_abs"]),
                    (r.attn_entropy_mean, at["entropy_mean"]),
                    (r.attn_entropy_min, at["entropy_min"]),
                    (r.attn_concentration_max, at["concentration_max"]),
                ]
                for parquet_value, json_value in pairs:
                    assert np.float32(json_value) == np.float32(parquet_value)  # same float32, bit for bit
                assert list(np.float32(hs["sketch"])) == list(np.float32(r.hidden_sketch))
                assert len(ls["topk"]) == 5 and ls["topk"][0]["prob"] == pytest.approx(ls["top1_prob"])
                assert ls["topk"][0]["prob"] - ls["topk"][1]["prob"] == pytest.approx(ls["top1_top2_margin"], abs=1e-6)
        assert next(it, None) is None


def test_trace_schema_rejects_unknown_keys_and_wrong_types(job):
    result, _, _ = job
    raw = json.loads(Path(result.trace_paths[0]).read_text())
    Trace.model_validate(raw)
    bad = json.loads(json.dumps(raw))
    bad["timeline"][1]["layers"][0]["hidden_summary"]["median"] = 1.0
    with pytest.raises(ValueError, match="median"):
        Trace.model_validate(bad)
    bad = json.loads(json.dumps(raw))
    bad["timeline"][1]["logits_summary"]["topk"][0]["token_id"] = "x"
    with pytest.raises(ValueError, match="token_id"):
        Trace.model_validate(bad)


def test_trace_layout(job):
    result, _, _ = job
    raw = json.loads(Path(result.trace_paths[0]).read_text())
    assert list(raw) == [
        "schema_version",
        "trace_id",
        "created_at_utc",
        "model",
        "run_config",
        "prompt",
        "generated",
        "timeline",
        "summary",
        "health",
        "warnings",
        "extensions",
    ]
    assert raw["schema_version"] == "1.1.0" and raw["model"]["revision"].startswith("sha256:")
    assert raw["summary"]["total_steps"] == len(raw["timeline"])
    assert raw["summary"]["generated_tokens"] == raw["generated"]["num_tokens"]
    assert set(raw["health"]) == {
        "repetition_loop",
        "non_finite",
        "entropy_spike",
        "attention_collapse",
        "hidden_norm_explosion",
    }
    assert raw["generated"]["output_text"] and raw["prompt"]["text"] == "The quick brown fox"


def test_generation_stops_at_eos_and_trace_ends_there(tiny_gpt2):
    """A sequence that emits EOS ends with it: no padding rows after it, even inside a batch."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from corevital.capture import generate_with_capture

    model = AutoModelForCausalLM.from_pretrained(tiny_gpt2).eval()
    tok = AutoTokenizer.from_pretrained(tiny_gpt2)
    greedy = SamplingConfig(max_new_tokens=6, do_sample=False, temperature=1.0, top_k=0, top_p=1.0)
    free = generate_with_capture(model, tok, ["The quick brown fox"], greedy, 0)[0]
    third = int(free.token_ids[free.prompt_len + 2])
    model.generation_config.eos_token_id = third  # the 3rd greedy token now ends the sequence
    first_hit = list(free.token_ids[free.prompt_len :]).index(third) + 1
    caps = generate_with_capture(model, tok, ["The quick brown fox", "Attention weights say which"], greedy, 0)
    assert caps[0].generated_len == first_hit
    assert list(caps[0].token_ids) == list(free.token_ids[: free.prompt_len + first_hit])
    for column, values in caps[0].values.items():
        assert len(values) == len(caps[0].token_ids), column
        np.testing.assert_allclose(values, free[column][: len(caps[0].token_ids)], rtol=1e-4, atol=1e-5, err_msg=column)
