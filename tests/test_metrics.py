"""Metrics as declarations (metrics.py), and user metrics (`metrics.extra`).

The declarations are the one place a metric is written down: the Parquet schema, the JSON
keys, the JSON Schema and docs/format.md's tables must all follow from them. The worked user
metric, a linear probe read from a safetensors file, is checked against the probe applied by
hand to the block output of an independent teacher-forced run (its own hook, float64).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

from corevital.core import metrics
from corevital.core.config import ConfigError
from corevital.output import table, trace
from corevital.output.writer import read_trace
from corevital.runner.app import run_job

from conftest import compose

ROOT = Path(__file__).resolve().parents[1]
LAYER = 1


# --- the declarations give everything else --------------------------------------------------
def test_parquet_schema_is_the_declarations_in_order():
    names = table.SCHEMA.names
    assert names == [n for n, _ in table.IDENTITY] + [m.column for m in metrics.METRICS] + ["prompt_id"]
    for m in metrics.METRICS:
        assert table.SCHEMA.field(m.column).type == m.type, m.column


def test_json_schema_keys_are_the_declarations():
    defs = trace.Trace.model_json_schema()["$defs"]
    for group, model in (
        ("logits_summary", "LogitsSummary"),
        ("hidden_summary", "HiddenSummary"),
        ("attention_summary", "AttentionSummary"),
        ("lens_summary", "LensSummary"),
    ):
        declared = [m for m in metrics.METRICS if m.group == group]
        props = defs[model]["properties"]
        assert [k for k in props if k not in ("topk", "heads")] == [m.key for m in declared], group
        required = set(defs[model].get("required", []))
        assert {m.key for m in declared if not m.v2} <= required and not {m.key for m in declared if m.v2} & required


def test_per_head_json_keys_are_the_declarations():
    defs = trace.Trace.model_json_schema()["$defs"]
    assert list(defs["HeadSummary"]["properties"]) == [m.key for m in metrics.PerHead(3).metrics]
    assert "heads" in defs["AttentionSummary"]["properties"]
    assert "heads" not in defs["AttentionSummary"].get("required", [])


def test_per_head_declarations_cut_a_field_major_output():
    heads = metrics.PerHead(3)
    out = np.arange(4 * 2 * 15, dtype=np.float32).reshape(4, 2, 15)  # (rows, layers, 5 fields x 3 heads)
    for f, m in enumerate(heads.metrics):
        assert m.width == 3 and m.group == metrics.HEADS
        np.testing.assert_array_equal(out[..., m.slot], out[..., f * 3 : f * 3 + 3])


def test_format_page_metric_tables_are_the_declarations():
    page = (ROOT / "docs" / "format.md").read_text()
    assert metrics.markdown_table(per_layer=False) in page
    assert metrics.markdown_table(per_layer=True) in page
    assert metrics.head_table() in page


def test_reducer_outputs_have_the_declared_widths(tiny_llama):
    """What capture's reducers return is what the declarations cut: one last-axis entry per slot."""
    from transformers import AutoTokenizer

    from corevital.capture import recording

    model = AutoModelForCausalLM.from_pretrained(tiny_llama).eval()
    tok = AutoTokenizer.from_pretrained(tiny_llama)
    with torch.inference_mode(), recording(model, lens="all") as rec:
        model.generate(
            **tok(["The quick brown fox"], return_tensors="pt"),
            stopping_criteria=[rec],
            max_new_tokens=2,
            do_sample=False,
        )
    out = rec.result()
    for reducer, width in metrics.reducer_widths().items():
        assert out[reducer].shape[-1] == width, reducer


def test_json_keys_of_a_rendered_trace_are_the_declarations(tiny_gpt2, tmp_path):
    (tmp_path / "p.txt").write_text("The quick brown fox\n")
    cfg = compose(
        [
            f"model.name_or_path={tiny_gpt2}",
            f"prompts={tmp_path / 'p.txt'}",
            "sampling.max_new_tokens=3",
            "metrics.logit_lens=all",
        ]
    )
    result = run_job(cfg, tmp_path / "job", "tiny")
    doc = read_trace(next((result.job_dir / "traces").glob("*.json")))
    step = doc["timeline"][1]
    assert list(step["logits_summary"]) == [m.key for m in metrics.METRICS if m.group == "logits_summary"] + ["topk"]
    for group in metrics.LAYER_GROUPS:
        assert list(step["layers"][0][group]) == [m.key for m in metrics.METRICS if m.group == group], group


# --- a user metric from config alone: the linear probe --------------------------------------
@pytest.fixture()
def probe(tiny_llama, tmp_path):
    """A 2-output probe with a bias on the tiny Llama's hidden size (32)."""
    g = torch.Generator().manual_seed(5)
    weight, bias = torch.randn(2, 32, generator=g), torch.randn(2, generator=g)
    path = tmp_path / "truth.safetensors"
    save_file({"weight": weight, "bias": bias}, str(path))
    return path, weight.double().numpy(), bias.double().numpy()


def _extra(path, layer=LAYER, name="truth", **more) -> str:
    params = "".join(f",{k}:{v}" for k, v in more.items())
    target = "corevital.assess.probes.LinearProbe"
    return f"+metrics.extra=[{{_target_:{target},path:'{path}',layer:{layer},name:{name}{params}}}]"


def _block_output(model_dir, token_ids, layer) -> np.ndarray:
    """Block `layer`'s output (T, H) for the sequence, teacher-forced, from a hook written here."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="eager").eval()
    seen = {}
    blocks = [m for m in model.base_model.modules() if isinstance(m, torch.nn.ModuleList)][0]
    hook = blocks[layer].register_forward_hook(
        lambda m, a, o: seen.__setitem__("h", o[0] if isinstance(o, tuple) else o)
    )
    with torch.no_grad():
        model(torch.tensor([token_ids]))
    hook.remove()
    return seen["h"][0].double().numpy()


@pytest.mark.parametrize("sigmoid", [False, True])
def test_linear_probe_matches_the_probe_applied_by_hand(tiny_llama, probe, tmp_path, sigmoid):
    path, weight, bias = probe
    (tmp_path / "p.txt").write_text("The quick brown fox\nA language model predicts the next\n")
    cfg = compose(
        [
            f"model.name_or_path={tiny_llama}",
            f"prompts={tmp_path / 'p.txt'}",
            "sampling.max_new_tokens=5",
            "batch_size=2",
            _extra(path, sigmoid=str(sigmoid).lower()),
        ]
    )
    result = run_job(cfg, tmp_path / "job", "tiny")
    df = pd.read_parquet(result.parquet_path)
    assert df.columns[-2:].tolist() == ["truth_0", "truth_1"]
    for trace_id, rows in df.groupby("trace_id"):
        tokens = rows[rows.layer_index == 0].sort_values("step_index").token_id.tolist()
        want = _block_output(tiny_llama, tokens, LAYER) @ weight.T + bias  # (T, 2), for query positions 0..T-1
        want = 1 / (1 + np.exp(-want)) if sigmoid else want
        mine = rows[rows.layer_index == LAYER].sort_values("step_index")
        for j in range(2):
            got = mine[f"truth_{j}"].to_numpy()
            assert np.isnan(got[0])  # row 0: no pass behind it
            np.testing.assert_allclose(got[1:], want[:-1, j], rtol=1e-4, atol=1e-5)  # row t reads position t - 1
        assert rows[rows.layer_index != LAYER][["truth_0", "truth_1"]].isna().all().all()
        doc = read_trace(next(p for p in (result.job_dir / "traces").glob("*.json") if trace_id in p.read_text()))
        json_values = [[s["layers"][LAYER]["extensions"][f"truth_{j}"] for j in range(2)] for s in doc["timeline"][1:]]
        np.testing.assert_allclose(np.array(json_values), mine[["truth_0", "truth_1"]].to_numpy()[1:], rtol=1e-6)
        assert all(s["layers"][0]["extensions"] is None for s in doc["timeline"])
        trace.Trace.model_validate(doc)


def test_one_output_probe_is_one_column_and_leaves_the_defaults_alone(tiny_llama, tmp_path):
    save_file({"weight": torch.ones(32)}, str(tmp_path / "norm.safetensors"))
    (tmp_path / "p.txt").write_text("The quick brown fox\n")
    base = [f"model.name_or_path={tiny_llama}", f"prompts={tmp_path / 'p.txt'}", "sampling.max_new_tokens=3"]
    plain = pd.read_parquet(run_job(compose(base), tmp_path / "plain", "tiny").parquet_path)
    probed = pd.read_parquet(
        run_job(
            compose([*base, _extra(tmp_path / "norm.safetensors", layer=0, name="sum")]), tmp_path / "probed", "tiny"
        ).parquet_path
    )
    assert probed.columns.tolist() == plain.columns.tolist() + ["sum"]
    pd.testing.assert_frame_equal(probed[plain.columns].drop(columns="trace_id"), plain.drop(columns="trace_id"))
    first = probed[(probed.layer_index == 0) & (probed.step_index > 0)]
    # sum of the components = mean x hidden size, from the capture's own hidden_mean
    np.testing.assert_allclose(first["sum"], first.hidden_mean * 32, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    "override,message",
    [
        ("layer=7", "layer 7 is not one of the model's 3 blocks"),
        ("wrong", "has 16 inputs, the model's hidden size is 32"),
        ("missing", "does not exist"),
    ],
)
def test_bad_probe_is_one_sentence_before_generation(tiny_llama, tmp_path, override, message):
    save_file({"weight": torch.ones(16 if override == "wrong" else 32)}, str(tmp_path / "p.safetensors"))
    path = tmp_path / ("nope.safetensors" if override == "missing" else "p.safetensors")
    layer = 7 if override == "layer=7" else 0
    (tmp_path / "p.txt").write_text("The quick brown fox\n")
    cfg = compose([f"model.name_or_path={tiny_llama}", f"prompts={tmp_path / 'p.txt'}", _extra(path, layer=layer)])
    with pytest.raises(ConfigError, match=message):
        run_job(cfg, tmp_path / "job", "tiny")
    assert not (tmp_path / "job" / "summaries.parquet").exists() and not list((tmp_path / "job").glob("traces/*.json"))


def test_probe_from_the_command_line_exits_2_on_a_name_clash(tiny_llama, tmp_path):
    save_file({"weight": torch.ones(32)}, str(tmp_path / "p.safetensors"))
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "corevital.runner.app",
            f"model.name_or_path={tiny_llama}",
            "prompt=Hello",
            "sampling.max_new_tokens=2",
            f"hydra.run.dir={tmp_path / 'job'}",
            _extra(tmp_path / "p.safetensors", layer=0, name="hidden_mean"),
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
    )
    assert proc.returncode == 2, proc.stderr
    assert "clash with another metric's" in proc.stderr


def test_load_sweep_keeps_a_user_metric_and_nulls_it_where_a_job_has_none(tiny_llama, tmp_path):
    from corevital.analysis import load_sweep

    save_file({"weight": torch.ones(32)}, str(tmp_path / "sum.safetensors"))
    (tmp_path / "p.txt").write_text("The quick brown fox\n")
    base = [f"model.name_or_path={tiny_llama}", f"prompts={tmp_path / 'p.txt'}", "sampling.max_new_tokens=3"]
    run_job(compose(base), tmp_path / "sweep" / "plain", "tiny")
    run_job(
        compose([*base, _extra(tmp_path / "sum.safetensors", layer=0, name="sum")]),
        tmp_path / "sweep" / "probed",
        "tiny",
    )
    df = load_sweep(tmp_path / "sweep")
    assert "sum" in df.columns and df.trace_id.nunique() == 2
    probed = df[df["sum"].notna()]
    assert probed.trace_id.nunique() == 1 and set(probed.layer_index) == {0} and (probed.step_index > 0).all()
