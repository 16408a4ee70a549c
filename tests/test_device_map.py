"""Models placed by accelerate (model.device_map): blocks offloaded to disk are still captured,
every value equals the independent reference (which loads the model whole) and a run
without a device_map; placements that cannot work are refused in one sentence."""

import numpy as np
import pandas as pd
import pytest
import torch
from omegaconf import OmegaConf

from corevital.model import loader as model_loader
from corevital.model.loader import ModelUnavailableError
from corevital.runner.app import run_job

from conftest import compose, save_tiny
from reference import METRICS, assert_matches_reference

# The embeddings, two of the four blocks and the head on disk: their weights sit on the meta
# device between forward passes, and the model runs on the CPU.
SPLIT = {
    "model.embed_tokens": "disk",
    "model.layers.0": "cpu",
    "model.layers.1": "disk",
    "model.layers.2": "disk",
    "model.layers.3": "cpu",
    "model.norm": "cpu",
    "model.rotary_emb": "cpu",
    "lm_head": "disk",
}


@pytest.fixture(scope="session")
def tiny_llama4(tmp_path_factory) -> str:
    """A 4-block Llama with grouped-query attention."""
    from transformers import LlamaConfig, LlamaForCausalLM

    return save_tiny(
        tmp_path_factory,
        "tiny-llama4",
        LlamaConfig,
        LlamaForCausalLM,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
    )


def _split_overrides(tmp_path, split: dict = SPLIT) -> list[str]:
    entries = ", ".join(f"{k}: '{v}'" for k, v in split.items())
    return [f"model.device_map={{{entries}}}", f"model.offload_folder={tmp_path / 'offload'}"]


def _run(model: str, prompt_file: str, out, sampling: str, extra: list[str], device: str = "cpu"):
    """(the run's summaries, the model it ran: still cached by model_loader)"""
    cfg = compose(
        [
            f"model.name_or_path={model}",
            f"prompts={prompt_file}",
            f"device={device}",
            f"sampling={sampling}",
            "sampling.max_new_tokens=6",
            "batch_size=2",
            "seed=3",
            "model.dtype=float32",
            *extra,
        ]
    )
    return pd.read_parquet(run_job(cfg, out, "tiny").parquet_path), model_loader.load(cfg.model, device)


@pytest.mark.parametrize("sampling", ["greedy", "default"], ids=["greedy", "sampled"])
def test_offloaded_model_matches_reference_and_plain_run(tiny_llama4, prompt_file, tmp_path, sampling):
    split, loaded = _run(tiny_llama4, prompt_file, tmp_path / "split", sampling, _split_overrides(tmp_path))
    assert loaded.model.model.layers[1].mlp.up_proj.weight.device.type == "meta"  # on disk between passes
    assert loaded.device.type == "cpu"  # where it runs
    assert split.trace_id.nunique() == 3
    for _, rows in split.groupby("trace_id"):
        assert assert_matches_reference(rows, tiny_llama4) > 0
    whole, _ = _run(tiny_llama4, prompt_file, tmp_path / "whole", sampling, [])
    key = ["prompt_index", "step_index", "layer_index"]
    split, whole = split.sort_values(key).reset_index(drop=True), whole.sort_values(key).reset_index(drop=True)
    assert split[key + ["token_id"]].equals(whole[key + ["token_id"]])
    # hidden and attention are bit-equal; prompt logits differ by float32 rounding (the offloaded
    # head is called, the resident one multiplied directly)
    np.testing.assert_allclose(
        split[METRICS].to_numpy(np.float64), whole[METRICS].to_numpy(np.float64), rtol=1e-5, atol=1e-6
    )
    rows = split.step_index > 0  # row 0 has no sketch
    np.testing.assert_array_equal(np.stack(split.hidden_sketch[rows]), np.stack(whole.hidden_sketch[rows]))


@pytest.mark.parametrize(
    "model_cfg, message",
    [
        ({"device_map": {"model": "disk"}}, "needs model.offload_folder"),
        ({"device_map": {"model": "gpu7"}}, "names the device 'gpu7'"),
        ({"device_map": {"model": "cuda:64"}}, "names cuda:64, but this machine has"),
        ({"device_map": "everywhere"}, "is neither auto"),
        ({"max_memory": {"cpu": "1GB"}}, "only apply with a model.device_map"),
        ({"device_map": "auto", "max_memory": {"tpu": "1GB"}}, "names the device 'tpu'"),
    ],
)
def test_unusable_placement_is_refused(model_cfg, message):
    with pytest.raises(ModelUnavailableError, match=message):
        model_loader.placement(OmegaConf.create(model_cfg))


def test_placement_arguments():
    cfg = OmegaConf.create(
        {
            "device_map": {"a": "cpu", "b": "disk"},
            "offload_folder": "off",
            "max_memory": {"cpu": "2GB", "cuda:1": "1GB", 0: 1000},
        }
    )
    assert model_loader.placement(cfg) == {
        "device_map": {"a": "cpu", "b": "disk"},
        "offload_folder": "off",
        "max_memory": {"cpu": "2GB", 1: "1GB", 0: 1000},
    }
    assert model_loader.placement(OmegaConf.create({"device_map": None})) == {}


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@needs_cuda
def test_split_across_gpu_and_cpu_matches_reference(tiny_llama4, prompt_file, tmp_path):
    """Blocks mapped to the CPU run on the GPU: accelerate brings their weights in for each pass."""
    split = {**{k: "cuda:0" for k in SPLIT}, "model.layers.1": "cpu", "model.layers.2": "cpu", "lm_head": "cpu"}
    df, loaded = _run(
        tiny_llama4, prompt_file, tmp_path / "split", "default", _split_overrides(tmp_path, split), "cuda"
    )
    assert loaded.device == torch.device("cuda:0") and loaded.model.lm_head.weight.device.type == "meta"
    for _, rows in df.groupby("trace_id"):
        assert assert_matches_reference(rows, tiny_llama4) > 0


@needs_cuda
@pytest.mark.parametrize("bits", [8, 4])
def test_bitsandbytes_model_is_captured_unchanged(tiny_llama4, bits):
    """A bitsandbytes 8-bit or 4-bit model: capture leaves its tokens and logits as they are, and
    every summary is finite."""
    pytest.importorskip("bitsandbytes")
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    from corevital import capture

    from conftest import PROMPTS

    quant = (
        BitsAndBytesConfig(load_in_8bit=True)
        if bits == 8
        else BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.float16)
    )
    model = AutoModelForCausalLM.from_pretrained(
        tiny_llama4, quantization_config=quant, device_map={"": 0}, dtype=torch.float16
    ).eval()
    tok = AutoTokenizer.from_pretrained(tiny_llama4)
    tok.padding_side = "left"
    enc = tok(PROMPTS[:2], return_tensors="pt", padding=True).to("cuda")
    kw = dict(
        max_new_tokens=6,
        do_sample=False,
        pad_token_id=tok.pad_token_id,
        output_logits=True,
        return_dict_in_generate=True,
    )
    with torch.inference_mode():
        plain = model.generate(**enc, **kw)
        with capture.recording(model) as rec:
            captured = model.generate(**enc, stopping_criteria=[rec], **kw)
            cols = rec.result()
    assert torch.equal(plain.sequences, captured.sequences)
    assert all(torch.equal(a, b) for a, b in zip(plain.logits, captured.logits))
    keep = enc["attention_mask"].bool().cpu().numpy()  # (b, P): column c is position c; left padding is no row
    for name in ("logits", "hidden", "attention"):
        assert np.isfinite(cols[name][:, : keep.shape[1]][keep]).all(), name
