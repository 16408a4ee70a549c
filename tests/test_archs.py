"""Architecture matrix: every causal LM in the installed transformers is exact or refused.

For each entry of transformers' causal-LM mapping (tests/archs.py builds a tiny random
model of it), either the load-time check (corevital.capture.support) refuses it with one sentence,
as archs.REFUSED and support.KNOWN_CAUSES expect, or capture is exact: every value of a
greedy and a sampled run (batch 2, left padding) matches the independent recomputation at
1e-4, and capture leaves the generated tokens and every step's logits as they are without it.
The check decides with KNOWN_CAUSES emptied: each listed architecture is refused by the
check itself, and one that has become exact fails here. Each entry of archs.SKIPPED is
checked for its stated reason: one that no longer holds fails here too.
"""

from __future__ import annotations

import contextlib
import re

import numpy as np
import pytest
import torch

from corevital.capture import generate_with_capture, generation_kwargs, query_heads, recording, support
from corevital.core import metrics
from corevital.core.config import SamplingConfig

import archs
from conftest import PROMPTS, _tokenizer
from reference import HEAD_METRICS, METRICS, reference_frame

TOK = _tokenizer()
SPECIAL = dict(bos_token_id=TOK.bos_token_id, eos_token_id=TOK.eos_token_id, pad_token_id=TOK.pad_token_id)
BATCH = PROMPTS[:2]  # different lengths: the shorter one is left-padded


def _sampling(do_sample: bool):
    return SamplingConfig(max_new_tokens=3, do_sample=do_sample, temperature=1.0, top_k=0, top_p=1.0)


def _captured(cap) -> dict[str, np.ndarray]:
    """A SequenceCapture's rows t >= 1 as the reference's columns, (step, layer) order."""
    layers = cap.num_layers
    out = {
        k: np.repeat(cap[k][1:], layers) if cap[k].ndim == 1 else cap[k][1:].reshape(-1)
        for k in METRICS
        if k in cap.values and k != "hidden_sketch"
    }
    return out


def _assert_exact(model, cap, tol=1e-4, blocks=None):
    previous = model.config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        ref = reference_frame(model, cap.token_ids.tolist(), prompt_len=cap.prompt_len, blocks=blocks)
    finally:
        model.set_attn_implementation(previous)
    got = _captured(cap)
    assert len(ref) == len(got["hidden_mean"])
    for k in METRICS:
        np.testing.assert_allclose(got[k], ref[k].to_numpy(np.float64), rtol=tol, atol=tol, err_msg=k)
    for k in HEAD_METRICS if "head_attn_entropy" in cap.values else ():  # metrics.per_head: head by head
        heads = cap[k].shape[-1]
        np.testing.assert_allclose(
            cap[k][1:].reshape(-1, heads), np.stack(ref[k].to_numpy()), rtol=tol, atol=tol, err_msg=k
        )


UNCHANGED_STEPS = 64  # greedy steps compared with and without capture: a near-tie anywhere would flip a token


def _assert_unchanged(model):
    """Same inputs and seed, with and without capture, greedy for UNCHANGED_STEPS tokens and
    sampled for 8: equal tokens and bit-identical logits at every step. Capture only reads; the
    model's own attention makes every output. The keyword arguments are a job's own
    (generation_kwargs, and every position's logits where capture keeps them)."""
    TOK.padding_side = "left"
    enc = TOK(BATCH, return_tensors="pt", padding=True)
    for do_sample, steps in ((False, UNCHANGED_STEPS), (True, 8)):
        sampling = SamplingConfig(max_new_tokens=steps, do_sample=do_sample, temperature=1.0, top_k=0, top_p=1.0)
        kw = dict(
            generation_kwargs(sampling, TOK), min_new_tokens=steps, return_dict_in_generate=True, output_logits=True
        )
        runs = []
        for capture in (False, True):
            torch.manual_seed(1)
            with torch.inference_mode(), recording(model) if capture else contextlib.nullcontext() as rec:
                keep = (
                    {"logits_to_keep": 0}
                    if rec is not None and rec.own_logits and model._supports_logits_to_keep()
                    else {}
                )
                runs.append(model.generate(**enc, **kw, **keep, **({"stopping_criteria": [rec]} if rec else {})))
        plain, captured = runs
        assert torch.equal(plain.sequences, captured.sequences), f"tokens differ (do_sample={do_sample})"
        assert len(plain.logits) == steps
        for step, (a, b) in enumerate(zip(plain.logits, captured.logits)):
            assert torch.equal(a, b), f"logits differ at step {step} (do_sample={do_sample}): max {(a - b).abs().max()}"


def _known(model) -> str | None:
    text = model.config.get_text_config()
    return support.KNOWN_CAUSES.get(getattr(text, "model_type", "")) or support.KNOWN_CAUSES.get(
        model.config.model_type
    )


@pytest.mark.parametrize("name", archs.architectures())
def test_architecture_is_exact_or_refused(name, monkeypatch):
    if name in archs.SKIPPED:
        pytest.skip(archs.SKIPPED[name])
    model = archs.build(name, len(TOK), SPECIAL)
    arch = type(model).__name__
    known = _known(model)
    monkeypatch.setattr(support, "KNOWN_CAUSES", {})  # the check decides alone; the list is documentation
    with pytest.raises(support.UnsupportedModel) if name in archs.REFUSED or known else _no_error() as refused:
        support.check(model)
    if refused is not None:
        message = str(refused.value)
        ours = re.sub(r"\([^()]*(\([^()]*\)[^()]*)*\)", "", message)  # a quoted error may hold sentences of its own
        assert message.startswith(arch) and ours.count(". ") == 0 and "\n" not in message
        assert archs.REFUSED.get(name, "") in message
        return
    for do_sample in (False, True):  # the sampled run with metrics.per_head on: every head against the reference
        extras = (metrics.PerHead(query_heads(model)),) if do_sample else ()
        for cap in generate_with_capture(model, TOK, BATCH, _sampling(do_sample), seed=3, extras=extras):
            assert ("head_attn_entropy" in cap.values) == do_sample
            _assert_exact(model, cap)
    _assert_unchanged(model)


@pytest.mark.parametrize("name", sorted(archs.SKIPPED))
def test_each_skipped_architecture_is_skipped_for_its_stated_reason(name):
    if name not in archs.architectures():
        pytest.fail(f"{name} is no longer in the installed transformers' causal-LM mapping: drop it from archs.SKIPPED")
    found = archs.skip_reason_fails(name, len(TOK), SPECIAL)
    assert not found, f"{name}: {archs.SKIPPED[name]!r} no longer holds ({found}): move it into the matrix"


def test_a_known_cause_is_named_beside_what_the_check_found():
    model = archs.build("roberta", len(TOK), SPECIAL)
    with pytest.raises(support.UnsupportedModel) as refused:
        support.check(model)
    assert "differs" not in support.KNOWN_CAUSES["roberta"]
    message = str(refused.value)
    assert "independent recomputation" in message and f"(a known cause: {support.KNOWN_CAUSES['roberta']})" in message


def test_the_text_blocks_are_found_even_where_a_vision_tower_has_as_many():
    """Gemma 3 with two vision layers and two text layers: capture hooks the language model's
    blocks (found by structure, not by count), and its text-only values are exact."""
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration

    from corevital.capture import decoder_layers

    cfg = Gemma3Config(
        text_config=dict(
            vocab_size=len(TOK),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=1,
            head_dim=16,
            max_position_embeddings=64,
            sliding_window=4,
            **SPECIAL,
        ),
        vision_config=dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=28,
            patch_size=14,
        ),
        mm_tokens_per_image=4,
        image_token_index=len(TOK) - 1,
        boi_token_index=len(TOK) - 3,
        eoi_token_index=len(TOK) - 2,
    )
    torch.manual_seed(0)
    model = Gemma3ForConditionalGeneration(cfg).eval()
    text, vision = model.model.language_model.layers, model.model.vision_tower.encoder.layers
    assert len(text) == len(vision) == 2
    assert decoder_layers(model) is text
    support.check(model)
    for cap in generate_with_capture(model, TOK, BATCH, _sampling(False), seed=3):
        _assert_exact(model, cap, blocks=text)


def test_a_model_whose_own_forward_fails_on_the_probe_is_one_sentence():
    model = archs.build("llama", len(TOK), SPECIAL)

    def broken(module, args, kwargs):
        raise RuntimeError("shape '[2, 4]' is invalid for input of size 6\n  (a second line)")

    model.register_forward_pre_hook(broken, with_kwargs=True)
    with pytest.raises(support.UnsupportedModel) as refused:
        support.check(model)
    message = str(refused.value)
    assert message.startswith(
        "LlamaForCausalLM cannot be captured exactly: its forward pass fails on CoreVital's short "
        "probe (RuntimeError: shape '[2, 4]' is invalid for input of size 6)"
    )
    assert "\n" not in message


def test_the_check_leaves_every_random_generator_as_it_found_it():
    """A user seeds, loads, then samples: the check between must not move what they draw."""
    import random

    from transformers import set_seed

    model = archs.build("llama", len(TOK), SPECIAL)
    draws = []
    for check in (False, True):
        set_seed(5)
        if check:
            support.check(model)
        draws.append((random.random(), np.random.rand(), torch.rand(3).tolist()))
    assert draws[0] == draws[1]


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

    model_dir = save_tiny(
        tmp_path_factory, "tiny-bloom", BloomConfig, BloomForCausalLM, hidden_size=32, n_layer=2, n_head=4
    )
    proc = run_cli(
        [f"model.name_or_path={model_dir}", "prompt=hello", "device=cpu", f"hydra.run.dir={tmp_path / 'job'}"],
        cwd=tmp_path,
    )
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if "cannot be captured exactly" in line]
    assert len(lines) == 1 and "BloomForCausalLM" in lines[0] and "attention interface" in lines[0]
    assert "Traceback" not in proc.stderr
    job = tmp_path / "job"
    assert not (job / "traces").exists() or not any((job / "traces").iterdir())
    assert not (job / "summaries.parquet").exists() and not (job / "traces.parquet").exists()


def test_models_page_lists_what_the_matrix_checks():
    """docs/models.md's exact / refused / not-built lists (scripts/arch_table.py --write) name the
    installed transformers' architectures as this matrix sorts them: rerun the script when
    the pin in scripts/constraints.txt moves."""
    import re
    from pathlib import Path

    import transformers

    readme = (Path(__file__).parents[1] / "docs" / "models.md").read_text()
    block = readme[readme.index("<!-- archs -->") : readme.index("<!-- /archs -->")]
    assert f"transformers {transformers.__version__}:" in block

    def listed(heading):
        part = block.split(f"{heading} (")[1].split("\n\n")[0]
        return set(re.findall(r"`([^`]+)`", part))

    names = set(archs.architectures())
    refused = {
        n
        for n in names - set(archs.SKIPPED)
        if n in archs.REFUSED or archs.VARIANTS.get(n, (n,))[0] in support.KNOWN_CAUSES
    }
    assert listed("Not built") == set(archs.SKIPPED) & names
    assert listed("Refused") == refused
    assert listed("Exact") == names - set(archs.SKIPPED) - refused
