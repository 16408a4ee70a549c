"""Low-precision models on the CPU: the model runs in bfloat16 or float16, the capture computes
every metric in float32 from the model's own tensors, and never changes what the model computes.

The reference (tests/reference.py) is an independent eager run in the same dtype, so the two
differ by low-precision rounding, not by capture error: each run rounds every tensor to the
dtype's unit roundoff u (2^-8 bfloat16, 2^-11 float16), differently (SDPA and a KV cache one
token at a time, against eager attention over the whole sequence), and eager attention also
rounds each score s to the dtype before its softmax, an error of |s| u in a weight's log
(scores reach ~10-20 in these random models). Largest differences seen, over greedy and five
sampling seeds, both models: 3.1e-2 bfloat16 (8u), 7.1e-3 float16 (15u), both in
attn_entropy_min; TOLERANCE is twice that, rounded up to a power of two.
"""

import pandas as pd
import pytest
import torch

from corevital import capture
from corevital.kernels import summaries
from corevital.runner.app import run_job

from conftest import PROMPTS, compose
from reference import assert_matches_reference

TOLERANCE = {"bfloat16": 2**-4, "float16": 2**-6}
CUDA = pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"))


@pytest.mark.parametrize("device", ["cpu", CUDA])
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("sampling", ["greedy", "default"], ids=["greedy", "sampled"])
def test_low_precision_matches_reference_in_same_dtype(tiny_model, prompt_file, tmp_path, dtype, sampling, device):
    cfg = compose(
        [
            f"model.name_or_path={tiny_model}",
            f"prompts={prompt_file}",
            f"device={device}",
            f"model.dtype={dtype}",
            f"sampling={sampling}",
            "sampling.max_new_tokens=6",
            "batch_size=2",
            "seed=3",
        ]
    )
    result = run_job(cfg, tmp_path / "job", "tiny")
    df = pd.read_parquet(result.parquet_path)
    assert df.trace_id.nunique() == 3
    for _, rows in df.groupby("trace_id"):
        assert assert_matches_reference(rows, tiny_model, TOLERANCE[dtype], getattr(torch, dtype)) > 0


def _model(path: str, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    tok.padding_side = "left"
    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval(), tok


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bfloat16", "float16"])
def test_capture_leaves_low_precision_model_unchanged(tiny_model, dtype):
    """Tokens and every step's logits with capture are bit-equal to those without it."""
    model, tok = _model(tiny_model, dtype)
    enc = tok(PROMPTS[:2], return_tensors="pt", padding=True)
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
    assert torch.equal(plain.sequences, captured.sequences)
    for a, b in zip(plain.logits, captured.logits):
        assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bfloat16", "float16"])
def test_prefill_logits_are_the_models_own(tiny_model, dtype):
    """The prompt positions' logit summaries are those of the logits the model itself makes
    (its head in its dtype, then upcast), not of a float32 recomputation."""
    model, tok = _model(tiny_model, dtype)
    enc = tok(PROMPTS[:2], return_tensors="pt", padding=True)
    with torch.inference_mode():
        own = model(**enc).logits  # (b, q, V) in `dtype`: every position's logits, as the model makes them
        with capture.recording(model) as rec:
            model(**enc)
        got = rec.result()
    expected = summaries.logits_summary(own)  # (b, q, ...)
    keep = enc["attention_mask"].bool().numpy()  # (b, q): left padding is no timeline row
    assert own.dtype == dtype
    torch.testing.assert_close(torch.from_numpy(got["logits"])[keep], expected.stats[keep], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(torch.from_numpy(got["topk_probs"])[keep], expected.top_p[keep], rtol=1e-6, atol=1e-6)
    assert torch.equal(torch.from_numpy(got["topk_ids"])[keep], expected.top_ids[keep])
    logp = torch.log_softmax(own.double(), -1)[:, :-1].gather(-1, enc["input_ids"][:, 1:, None])[..., 0]  # (b, q - 1)
    torch.testing.assert_close(
        torch.from_numpy(got["token_logprob"]).double()[keep[:, 1:]], logp[keep[:, 1:]], rtol=1e-5, atol=1e-5
    )
