"""Streaming, chunked and batched capture give the reference values, and keep only summaries."""

from dataclasses import replace

import numpy as np
import pandas as pd
import pytest
import torch

from corevital import capture
from corevital.runner.app import run_job

from conftest import CORPUS, compose, save_tiny
from reference import assert_matches_reference

METRIC_COLUMNS = [
    "logits_entropy",
    "logits_top1_prob",
    "logits_top1_top2_margin",
    "token_logprob",
    "hidden_mean",
    "hidden_std",
    "hidden_l2_norm",
    "hidden_max_abs",
    "attn_entropy_mean",
    "attn_entropy_min",
    "attn_concentration_max",
]


def _run(model_dir, prompt_file, tmp_path, name, *overrides):
    cfg = compose(
        [
            f"model.name_or_path={model_dir}",
            f"prompts={prompt_file}",
            "device=cpu",
            "sampling=greedy",
            "sampling.max_new_tokens=5",
            *overrides,
        ]
    )
    return pd.read_parquet(run_job(cfg, tmp_path / name, "tiny").parquet_path)


@pytest.fixture
def long_prompts(tmp_path):
    path = tmp_path / "long.txt"
    path.write_text(" ".join(CORPUS[:3]) + "\n" + CORPUS[3] + "\n" + " ".join(CORPUS) + "\n")
    return str(path)


@pytest.mark.parametrize("stack_keys", [False, True], ids=["cpu-way", "gpu-way"])
def test_chunked_prefill_matches_reference(tiny_model, long_prompts, tmp_path, monkeypatch, kernels, stack_keys):
    """Tiny blocks: many query-row blocks per layer, many logits blocks, several per batch row.
    The CPU way: logits made and summarised 7 vocabulary ids at a time (fused kernels; whole
    rows with the torch ops), and decode steps scored layer by layer (as for large keys; small
    ones are stacked, as in the GPU way and in every other test). The GPU way: decode steps
    stacked across layers. The reference's hidden states pin the attention output too: every
    layer's input depends on the layers before it."""
    tiny = capture.Blocks(
        elements=64,
        rows=3,
        logit_rows=2,
        stack_keys=stack_keys,
        vocab_slice=7 if not stack_keys and kernels == "fused" else None,
    )
    monkeypatch.setattr(capture.Blocks, "for_device", staticmethod(lambda device: tiny))
    monkeypatch.setattr(capture.attention, "STACK_KEYS_BELOW", 0)  # the CPU way scores decode steps layer by layer here
    df = _run(tiny_model, long_prompts, tmp_path, "chunked", "batch_size=2")
    assert df.groupby("trace_id").step_index.max().min() > 20
    for _, rows in df.groupby("trace_id"):
        assert_matches_reference(rows, tiny_model)


def test_batched_rows_equal_unbatched_rows(tiny_model, long_prompts, tmp_path):
    one = _run(tiny_model, long_prompts, tmp_path, "b1", "batch_size=1")
    three = _run(tiny_model, long_prompts, tmp_path, "b3", "batch_size=3")
    key = ["prompt_index", "step_index", "layer_index"]
    one, three = one.sort_values(key).reset_index(drop=True), three.sort_values(key).reset_index(drop=True)
    assert len(one) == len(three)
    assert (
        (
            one[key + ["token_id", "token_text", "is_prompt_token"]]
            == three[key + ["token_id", "token_text", "is_prompt_token"]]
        )
        .all()
        .all()
    )
    for col in METRIC_COLUMNS:
        np.testing.assert_allclose(three[col], one[col], rtol=1e-4, atol=1e-4, err_msg=col)
    sketch_one, sketch_three = np.stack(one.hidden_sketch.dropna()), np.stack(three.hidden_sketch.dropna())
    np.testing.assert_allclose(sketch_three, sketch_one, rtol=1e-4, atol=1e-4)


@pytest.fixture(scope="module")
def tiny_mistral(tmp_path_factory):
    """Sliding-window attention (window 4): decode and prefill must see only the window."""
    from transformers import MistralConfig, MistralForCausalLM

    return save_tiny(
        tmp_path_factory,
        "tiny-mistral",
        MistralConfig,
        MistralForCausalLM,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        sliding_window=4,
    )


def test_sliding_window_attention_matches_reference(tiny_mistral, long_prompts, tmp_path):
    df = _run(tiny_mistral, long_prompts, tmp_path, "mistral", "batch_size=2", "sampling.max_new_tokens=8")
    for _, rows in df.groupby("trace_id"):
        assert_matches_reference(rows, tiny_mistral)


@pytest.fixture(scope="module")
def tiny_qwen2_mixed(tmp_path_factory):
    """Qwen2 with sliding-window (4) and full-attention layers alternating, no soft-capping."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    return save_tiny(
        tmp_path_factory,
        "tiny-qwen2-mixed",
        Qwen2Config,
        Qwen2ForCausalLM,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        use_sliding_window=True,
        sliding_window=4,
        max_window_layers=0,
        layer_types=["sliding_attention", "full_attention"] * 2,
    )


@pytest.mark.parametrize("stack_below", [1 << 16, 2 * 2 * 4 * 8], ids=["all-stacked", "mixed"])
def test_decode_steps_with_layers_of_different_key_lengths(
    tiny_qwen2_mixed, long_prompts, tmp_path, monkeypatch, stack_below
):
    """Decode keys of 4 (window) and of the whole sequence in one step, where layers are
    stashed (not made by one kernel call each: the eager implementation, a bf16 model):
    all stashed as (query, key), or (mixed: as where the kernel that reads float32 layers in
    place is not used) the window layers stashed and the full layers scored at once."""
    monkeypatch.setattr(
        capture.attention, "STACK_KEYS_BELOW", stack_below
    )  # mixed: batch 2 x 2 heads x 4 keys x 8 dims
    blocks = replace(capture.Blocks.for_device(torch.device("cpu")), decode_in_place=stack_below == 1 << 16)
    monkeypatch.setattr(capture.Blocks, "for_device", staticmethod(lambda device: blocks))
    seen, real = set(), capture.AttentionCapture.column

    def spy(self):
        if not isinstance(self.layers[0], torch.Tensor):  # a decode step: what each layer stashed
            seen.add(tuple(isinstance(x, tuple) for x, _ in self.layers))
        return real(self)

    monkeypatch.setattr(capture.AttentionCapture, "column", spy)
    df = _run(tiny_qwen2_mixed, long_prompts, tmp_path, "qwen2", "batch_size=2", "sampling.max_new_tokens=6")
    assert seen == ({(True, True, True, True)} if stack_below == 1 << 16 else {(True, False, True, False)}), seen
    for _, rows in df.groupby("trace_id"):
        assert_matches_reference(rows, tiny_qwen2_mixed)


@pytest.fixture(scope="module")
def tiny_gemma2(tmp_path_factory):
    """Gemma 2: attention and final-logit soft-capping, sliding-window and full layers alternating."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    return save_tiny(
        tmp_path_factory,
        "tiny-gemma2",
        Gemma2Config,
        Gemma2ForCausalLM,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=512,
        sliding_window=4,
        attn_logit_softcapping=5.0,
        final_logit_softcapping=3.0,
    )


@pytest.mark.parametrize("batch_size", [1, 2])
def test_softcapped_mixed_window_model_matches_reference(tiny_gemma2, long_prompts, tmp_path, batch_size):
    df = _run(tiny_gemma2, long_prompts, tmp_path, "gemma2", f"batch_size={batch_size}", "sampling.max_new_tokens=6")
    for _, rows in df.groupby("trace_id"):
        assert_matches_reference(rows, tiny_gemma2)


def test_recorder_keeps_only_summaries(tiny_llama):
    """What a run retains is a fixed number of values per (sequence, position, layer): nothing
    proportional to the hidden size, the vocabulary or the sequence length squared."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_llama).eval()
    tok = AutoTokenizer.from_pretrained(tiny_llama)
    tok.padding_side = "left"
    enc = tok(["The quick brown fox", "A language model predicts"], return_tensors="pt", padding=True)
    model.generation_config.eos_token_id = None
    with torch.inference_mode(), capture.recording(model) as rec:
        model.generate(**enc, stopping_criteria=[rec], max_new_tokens=7, do_sample=False)
    b, width, L = 2, enc["input_ids"].shape[1], 3
    columns = width + 7 - 1
    # hidden + sketch + cos_prev and attention + masses per layer; logit stats, top-5 p and ids, log-prob, rank
    per_position = L * (13 + 6) + 3 + 5 + 5 + 1 + 1
    retained = sum(t.numel() for c in rec.columns for t in c.values()) + sum(
        t.numel() for t in rec.logits.logprobs + rec.logits.ranks
    )
    assert retained == b * columns * per_position
    assert rec.hidden.layers == [] and rec.attention.layers == []  # nothing stashed survives a forward pass
