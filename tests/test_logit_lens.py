"""The logit lens (docs/format.md) against an independent reference.

The reference shares no code with corevital.model.lens: for each layer l it runs the model itself
with its block stack cut after block l (a deep copy, eager attention), teacher-forced on the
trace's tokens. The model's own final norm and head then make the logits at every position,
which are layer l's lens logits; entropy, top-1 match and KL against the full model's logits
are computed in float64 numpy.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from transformers import AutoModelForCausalLM

from corevital.capture import support
from corevital.core.config import ConfigError, check_complete
from corevital.model import lens
from corevital.runner.app import run_job

import archs
from conftest import compose

LENS = ["lens_entropy", "lens_top1_match", "lens_kl"]
TOL = 1e-4


def _truncated(model, keep: int):
    """A deep copy of `model` that runs only its first `keep` transformer blocks."""
    cut = copy.deepcopy(model)
    n = cut.config.get_text_config().num_hidden_layers
    (stack,) = [m for m in cut.base_model.modules() if isinstance(m, torch.nn.ModuleList) and len(m) == n]
    del stack[keep:]
    text = cut.config.get_text_config()
    text.num_hidden_layers = keep
    for key, value in vars(text).items():  # per-layer lists (layer_types, ...): some models zip them strictly
        if isinstance(value, list) and len(value) == n:
            setattr(text, key, value[:keep])
    return cut


def _log_softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def reference_lens(model, token_ids: list[int]) -> dict[str, np.ndarray]:
    """(T, L) lens_entropy, lens_top1_match, lens_kl for rows t = 0..T-1 (row 0 NaN), plus
    `tie` (T, L): where the lens's or the model's top two logits are too close for the top-1
    match to be decided at float32 rounding."""
    ids = torch.tensor([token_ids])
    L = model.config.get_text_config().num_hidden_layers
    with torch.no_grad():
        own = model(ids, use_cache=False).logits[0].double().numpy()  # (T, V)
        lens_logits = [_truncated(model, l + 1)(ids, use_cache=False).logits[0].double().numpy() for l in range(L)]
    own_logp = _log_softmax(own)
    T = len(token_ids)
    out = {k: np.full((T, L), np.nan) for k in [*LENS, "tie"]}
    for t in range(1, T):
        q = t - 1
        for l, z in enumerate(lens_logits):
            logp = _log_softmax(z[q])
            p = np.exp(logp)
            out["lens_entropy"][t, l] = -(p * logp).sum()
            out["lens_top1_match"][t, l] = float(z[q].argmax() == own[q].argmax())
            out["lens_kl"][t, l] = (np.exp(own_logp[q]) * (own_logp[q] - logp)).sum()
            gaps = [np.diff(np.sort(x)[-2:])[0] for x in (z[q], own[q])]
            out["tie"][t, l] = float(min(gaps) < TOL)
    return out


def _eager(model_dir: str):
    return AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="eager", dtype=torch.float32).eval()


def _grid(rows: pd.DataFrame, col: str) -> np.ndarray:
    """One trace's column as (T, L), NaN where null."""
    T, L = rows.step_index.max() + 1, rows.layer_index.max() + 1
    return rows.sort_values(["step_index", "layer_index"])[col].to_numpy(np.float64, na_value=np.nan).reshape(T, L)


def assert_lens_matches(rows: pd.DataFrame, model, mode: str) -> None:
    """One trace's lens columns equal the reference where the lens is on, and are null elsewhere."""
    rows = rows.sort_values(["step_index", "layer_index"])
    token_ids = rows.groupby("step_index")["token_id"].first().tolist()
    P = int(rows.groupby("step_index")["is_prompt_token"].first().sum())
    ref = reference_lens(model, token_ids)
    on = np.zeros(len(token_ids), bool)
    on[1 if mode == "all" else P :] = True
    for col in LENS:
        got = _grid(rows, col)
        assert np.isnan(got[~on]).all(), f"{col}: values where the lens is off"
        assert not np.isnan(got[on]).any(), f"{col}: nulls where the lens is on"
        if col == "lens_top1_match":
            decided = on[:, None] & (ref["tie"] == 0)
            np.testing.assert_array_equal(got[decided], ref[col][decided], err_msg=col)
        else:
            np.testing.assert_allclose(got[on], ref[col][on], rtol=TOL, atol=TOL, err_msg=col)
    last = _grid(rows, "lens_kl")[on, -1]  # the last layer's lens is the model's own distribution
    assert (np.abs(last) < 1e-5).all() and (_grid(rows, "lens_top1_match")[on, -1] == 1).all()


def _run(model_dir, prompt_file, tmp_path, *overrides):
    cfg = compose(
        [
            f"model.name_or_path={model_dir}",
            f"prompts={prompt_file}",
            "device=cpu",
            "sampling.max_new_tokens=6",
            *overrides,
        ]
    )
    return run_job(cfg, tmp_path / "job", "tiny")


@pytest.mark.parametrize(
    "overrides",
    [
        ["sampling=greedy", "batch_size=1", "metrics.logit_lens=generated"],
        ["sampling=default", "batch_size=1", "seed=3", "metrics.logit_lens=all"],
        ["sampling=greedy", "batch_size=2", "metrics.logit_lens=all"],  # left padding
        ["sampling=default", "batch_size=2", "seed=5", "metrics.logit_lens=generated"],
    ],
    ids=["greedy-generated", "sampled-all", "batched-greedy-all", "batched-sampled-generated"],
)
def test_lens_matches_truncated_model_reference(tiny_model, prompt_file, tmp_path, overrides):
    result = _run(tiny_model, prompt_file, tmp_path, *overrides)
    df = pd.read_parquet(result.parquet_path)
    model = _eager(tiny_model)
    mode = overrides[-1].split("=")[1]
    assert df.trace_id.nunique() == 3
    for _, rows in df.groupby("trace_id"):
        assert_lens_matches(rows, model, mode)


def test_lens_in_small_chunks_is_the_same(tiny_llama, prompt_file, tmp_path, monkeypatch):
    """One position and one layer per chunk (ELEMENTS below one row of logits) gives the same values."""
    monkeypatch.setattr(lens, "ELEMENTS", 1)
    df = pd.read_parquet(
        _run(
            tiny_llama, prompt_file, tmp_path, "sampling=greedy", "batch_size=2", "metrics.logit_lens=all"
        ).parquet_path
    )
    model = _eager(tiny_llama)
    for _, rows in df.groupby("trace_id"):
        assert_lens_matches(rows, model, "all")


def test_json_lens_summary_equals_parquet_and_validates(tiny_gpt2, prompt_file, tmp_path):
    from jsonschema import Draft202012Validator

    from corevital.cli import trace_schema, validate_file

    result = _run(tiny_gpt2, prompt_file, tmp_path, "batch_size=2", "metrics.logit_lens=generated")
    df = pd.read_parquet(result.parquet_path)
    validator = Draft202012Validator(trace_schema())
    for path in result.trace_paths:
        assert validate_file(Path(path), validator) is None
        trace = json.loads(Path(path).read_text())
        rows = df[df.trace_id == trace["trace_id"]].sort_values(["step_index", "layer_index"])
        it = rows.itertuples()
        for step in trace["timeline"]:
            for layer in step["layers"]:
                r = next(it)
                s = layer["lens_summary"]
                if s is None:
                    assert pd.isna(r.lens_entropy) and pd.isna(r.lens_top1_match) and pd.isna(r.lens_kl)
                    assert step["step_index"] < trace["prompt"]["num_tokens"]
                    continue
                assert step["step_index"] >= trace["prompt"]["num_tokens"]
                assert np.float32(s["entropy"]) == np.float32(r.lens_entropy) and np.float32(s["kl"]) == np.float32(
                    r.lens_kl
                )
                assert s["top1_match"] is bool(r.lens_top1_match)


def test_lens_is_off_by_default(tiny_gpt2, prompt_file, tmp_path):
    result = _run(tiny_gpt2, prompt_file, tmp_path)
    df = pd.read_parquet(result.parquet_path)
    assert list(df.columns[df.columns.get_loc("hidden_cos_prev") + 1 :][:3]) == LENS
    assert df[LENS].isna().all().all()
    trace = json.loads(Path(result.trace_paths[0]).read_text())
    assert all(layer["lens_summary"] is None for step in trace["timeline"] for layer in step["layers"])


@pytest.mark.parametrize("value", ["bogus", "true", "GENERATED"])
def test_other_lens_values_are_refused(tiny_gpt2, value):
    cfg = compose([f"model.name_or_path={tiny_gpt2}", f"metrics.logit_lens={value}"])
    with pytest.raises(ConfigError, match="metrics.logit_lens must be false, generated or all"):
        check_complete(cfg)


def test_false_off_and_modes_are_accepted(tiny_gpt2):
    for value, expected in (("false", False), ("'false'", False), ("generated", "generated"), ("all", "all")):
        cfg = compose([f"model.name_or_path={tiny_gpt2}", f"metrics.logit_lens={value}"])
        check_complete(cfg)
        assert cfg.metrics.logit_lens == expected and lens.mode(cfg.metrics.logit_lens) == (expected or None)


def test_a_model_whose_lens_cannot_be_verified_is_refused():
    """Cohere scales its logits in its forward: its head alone does not make them."""
    from test_archs import SPECIAL, TOK

    model = archs.build("cohere", len(TOK), SPECIAL)
    support.check(model)  # capture itself is exact on it
    support.check_logit_lens(model, None)
    with pytest.raises(ConfigError) as refused:
        support.check_logit_lens(model, "generated")
    message = str(refused.value)
    assert "CohereForCausalLM" in message and "metrics.logit_lens=false" in message
    assert message.count(". ") == 0 and "\n" not in message


def test_a_model_without_a_verifiable_final_norm_is_refused(tiny_llama):
    """A hand-made case: the base model's output shifted after its final norm, so that no module
    makes it from the last block's output (the head still makes the logits from it)."""
    model = _eager(tiny_llama)

    def shift(module, args, output):
        output.last_hidden_state = output.last_hidden_state + 1.0
        return output

    model.model.register_forward_hook(shift)
    with pytest.raises(ConfigError, match="no norm module"):
        support.check_logit_lens(model, "all")


def test_refused_through_the_app_exits_2(tmp_path_factory, tmp_path):
    from test_archs import SPECIAL, TOK

    from conftest import run_cli

    model_dir = tmp_path_factory.mktemp("tiny-cohere")
    archs.build("cohere", len(TOK), SPECIAL).save_pretrained(model_dir)
    TOK.save_pretrained(model_dir)
    proc = run_cli(
        [
            f"model.name_or_path={model_dir}",
            "prompt=hello",
            "device=cpu",
            "metrics.logit_lens=all",
            f"hydra.run.dir={tmp_path / 'job'}",
        ],
        cwd=tmp_path,
    )
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if "metrics.logit_lens=all cannot be computed" in line]
    assert len(lines) == 1 and "CohereForCausalLM" in lines[0] and "Traceback" not in proc.stderr


# Architectures of the matrix (tests/archs.py) whose logits are not their head applied to their
# base model's output (a logit scale, a head with a transform before its decoder, a projection
# after the final norm): the lens is refused for them.
LENS_REFUSED = {
    "bart",
    "bert",
    "bigbird_pegasus",
    "blenderbot",
    "blenderbot-small",
    "cohere",
    "cohere2",
    "cohere2_moe",
    "electra",
    "ernie",
    "marian",
    "mbart",
    "minicpm3",
    "modernbert-decoder",
    "opt",
    "pegasus",
    "plbart",
    "roc_bert",
    "whisper",
}
# Architectures whose lens is computed but which the reference cannot cut after block l.
CANNOT_CUT = {
    "gemma4_text": "its per-layer input embeddings are sized by num_hidden_layers, so a model cut short does not run"
}


@pytest.mark.parametrize("name", archs.architectures())
def test_every_architecture_has_an_exact_lens_or_refuses_it(name):
    """For each architecture the capture accepts: the lens is refused with one sentence (as
    LENS_REFUSED expects), or every lens value of a greedy batch-2 run with
    metrics.logit_lens=all matches the truncated-model reference at 1e-4."""
    from test_archs import BATCH, SPECIAL, TOK, _sampling

    from corevital.capture import generate_with_capture

    if name in archs.SKIPPED:
        pytest.skip(archs.SKIPPED[name])
    model = archs.build(name, len(TOK), SPECIAL)
    try:
        support.check(model)
    except support.UnsupportedModel:
        pytest.skip("capture itself refuses it (tests/test_archs.py)")
    if name in LENS_REFUSED:
        with pytest.raises(ConfigError, match="output head"):
            support.check_logit_lens(model, "all")
        return
    support.check_logit_lens(model, "all")
    if name in CANNOT_CUT:
        pytest.skip(CANNOT_CUT[name])
    previous = model.config._attn_implementation
    for cap in generate_with_capture(model, TOK, BATCH, _sampling(False), seed=3, lens="all"):
        model.set_attn_implementation("eager")
        try:
            ref = reference_lens(model, cap.token_ids.tolist())
        finally:
            model.set_attn_implementation(previous)
        for i, col in enumerate(LENS):
            got, want = cap[col][1:].astype(np.float64), ref[col][1:]
            if col == "lens_top1_match":
                decided = ref["tie"][1:] == 0
                np.testing.assert_array_equal(got[decided], want[decided], err_msg=col)
            else:
                np.testing.assert_allclose(got, want, rtol=TOL, atol=TOL, err_msg=col)
