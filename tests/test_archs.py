"""Architecture matrix: every causal LM in the installed transformers is exact or refused.

For each entry of transformers' causal-LM mapping (tests/archs.py builds a tiny random
model of it), either the load-time check (corevital.support) refuses it with one sentence,
as archs.REFUSED expects, or capture is exact: every value of a greedy and a sampled run
(batch 2, left padding) matches the independent recomputation at 1e-4, and capture leaves
the generated tokens and every step's logits as they are without it.
"""

from __future__ import annotations

import types

import numpy as np
import pytest
import torch

import archs
from conftest import PROMPTS, _tokenizer
from corevital import support
from corevital.capture import generate_with_capture, generation_kwargs, recording
from reference import METRICS, reference_frame

TOK = _tokenizer()
SPECIAL = dict(bos_token_id=TOK.bos_token_id, eos_token_id=TOK.eos_token_id, pad_token_id=TOK.pad_token_id)
BATCH = PROMPTS[:2]  # different lengths: the shorter one is left-padded


def _sampling(do_sample: bool):
    return types.SimpleNamespace(max_new_tokens=3, do_sample=do_sample, temperature=1.0, top_k=0, top_p=1.0)


def _captured(cap) -> dict[str, np.ndarray]:
    """A SequenceCapture's rows t >= 1 as the reference's columns, (step, layer) order."""
    layers = cap.num_layers
    out = {k: np.repeat(cap[k][1:], layers) if cap[k].ndim == 1 else cap[k][1:].reshape(-1)
           for k in METRICS if k in cap.values and k != "hidden_sketch"}
    return out


def _assert_exact(model, cap, tol=1e-4):
    previous = model.config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        ref = reference_frame(model, cap.token_ids.tolist(), prompt_len=cap.prompt_len)
    finally:
        model.set_attn_implementation(previous)
    got = _captured(cap)
    assert len(ref) == len(got["hidden_mean"])
    for k in METRICS:
        np.testing.assert_allclose(got[k], ref[k].to_numpy(np.float64), rtol=tol, atol=tol, err_msg=k)


def _assert_unchanged(model):
    """Same seed, with and without capture: equal tokens, and logits equal up to float32 rounding."""
    TOK.padding_side = "left"
    enc = TOK(BATCH, return_tensors="pt", padding=True)
    runs = []
    for capture in (False, True):
        torch.manual_seed(1)
        with torch.inference_mode(), recording(model) if capture else torch.inference_mode():
            runs.append(model.generate(**enc, return_dict_in_generate=True, output_logits=True,
                                       **generation_kwargs(_sampling(True), TOK)))
    plain, captured = runs
    assert torch.equal(plain.sequences, captured.sequences)
    for a, b in zip(plain.logits, captured.logits):
        assert support.same_logits(a.float(), b.float())


@pytest.mark.parametrize("name", archs.architectures())
def test_architecture_is_exact_or_refused(name):
    if name in archs.SKIPPED:
        pytest.skip(archs.SKIPPED[name])
    model = archs.build(name, len(TOK), SPECIAL)
    arch = type(model).__name__
    with pytest.raises(support.UnsupportedModel) if name in archs.REFUSED or model.config.model_type in support.NOT_EXACT \
            else _no_error() as refused:
        support.check(model)
    if refused is not None:
        message = str(refused.value)
        assert message.startswith(arch) and message.count(". ") == 0 and "\n" not in message
        expected = archs.REFUSED.get(name) or support.NOT_EXACT[model.config.model_type]
        assert expected in message
        return
    for do_sample in (False, True):
        for cap in generate_with_capture(model, TOK, BATCH, _sampling(do_sample), seed=3):
            _assert_exact(model, cap)
    _assert_unchanged(model)


class _no_error:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def test_a_refused_model_exits_2_with_one_sentence_and_writes_nothing(tmp_path_factory, tmp_path):
    """Through the app: a model the check refuses (Bloom: ALiBi attention of its own) stops the
    job before generation, exit 2, one sentence on stderr, no trace and no table."""
    from transformers import BloomConfig, BloomForCausalLM

    from conftest import run_cli, save_tiny

    model_dir = save_tiny(tmp_path_factory, "tiny-bloom", BloomConfig, BloomForCausalLM, hidden_size=32, n_layer=2, n_head=4)
    proc = run_cli([f"model.name_or_path={model_dir}", "prompt=hello", "device=cpu", f"hydra.run.dir={tmp_path / 'job'}"],
                   cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if "cannot be captured exactly" in line]
    assert len(lines) == 1 and "BloomForCausalLM" in lines[0] and "attention interface" in lines[0]
    assert "Traceback" not in proc.stderr
    job = tmp_path / "job"
    assert not (job / "traces").exists() or not any((job / "traces").iterdir())
    assert not (job / "summaries.parquet").exists() and not (job / "traces.parquet").exists()


def test_readme_lists_what_the_matrix_checks():
    """The README's exact / refused / not-built lists (scripts/arch_table.py --write) name the
    installed transformers' architectures as this matrix sorts them: rerun the script when
    the pin in scripts/constraints.txt moves."""
    import re
    from pathlib import Path

    import transformers

    readme = (Path(__file__).parents[1] / "README.md").read_text()
    block = readme[readme.index("<!-- archs -->"):readme.index("<!-- /archs -->")]
    assert f"transformers {transformers.__version__}:" in block

    def listed(heading):
        part = block.split(f"{heading} (")[1].split("\n\n")[0]
        return set(re.findall(r"`([^`]+)`", part))

    names = set(archs.architectures())
    refused = {n for n in names - set(archs.SKIPPED)
               if n in archs.REFUSED or archs.VARIANTS.get(n, (n,))[0] in support.NOT_EXACT}
    assert listed("Not built") == set(archs.SKIPPED) & names
    assert listed("Refused") == refused
    assert listed("Exact") == names - set(archs.SKIPPED) - refused
