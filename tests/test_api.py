"""The public Python API (`corevital.record`, docs/api.md): its values equal a command-line
job's on the same model, prompts and seed; it refuses what a job refuses; it leaves the model
as it found it."""

import json

import numpy as np
import pandas as pd
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, set_seed

import corevital
from corevital.core import metrics
from corevital.core.config import SamplingConfig
from corevital.runner.app import run_job

from conftest import PROMPTS, compose

KEY = ["prompt_index", "sample_index", "step_index", "layer_index"]


def _model(path):
    tok = AutoTokenizer.from_pretrained(path)
    tok.padding_side = "left"
    return AutoModelForCausalLM.from_pretrained(path).eval(), tok


def _same(a: pd.Series, b: pd.Series) -> bool:
    """Equal value by value: NaN where the other is NaN, lists (the sketch) entry by entry, None where None."""
    if a.dtype == object:
        return all(
            (x is None and y is None) or (x is not None and y is not None and np.array_equal(x, y, equal_nan=True))
            if not isinstance(x, str)
            else x == y
            for x, y in zip(a, b)
        )
    return np.array_equal(a.to_numpy(), b.to_numpy(), equal_nan=a.dtype.kind == "f")


@pytest.mark.parametrize("sampling,samples", [("greedy", 1), ("default", 2)])
def test_record_gives_a_cli_jobs_values(tiny_model, prompt_file, tmp_path, sampling, samples):
    cfg = compose(
        [
            f"model.name_or_path={tiny_model}",
            f"prompts={prompt_file}",
            f"sampling={sampling}",
            "sampling.max_new_tokens=6",
            "batch_size=3",
            "seed=3",
            f"num_samples={samples}",
        ]
    )
    result = run_job(cfg, tmp_path / "cli", "tiny")
    cli = pd.read_parquet(result.parquet_path).sort_values(KEY).reset_index(drop=True)

    model, tok = _model(tiny_model)
    enc = tok(PROMPTS, return_tensors="pt", padding=True)
    kw = dict(max_new_tokens=6, pad_token_id=tok.pad_token_id, num_return_sequences=samples)
    kw.update(do_sample=True, temperature=0.8, top_k=50, top_p=0.95) if sampling == "default" else kw.update(
        do_sample=False
    )
    set_seed(3)
    with corevital.record(model, tok, seed=3) as rec:
        model.generate(**enc, **kw)
    assert "generate" not in vars(model), "the model is left as it was found"
    api = rec.to_pandas().sort_values(KEY).reset_index(drop=True)

    assert len(api) == len(cli) and api.trace_id.nunique() == cli.trace_id.nunique() == 3 * samples
    for col in [
        "token_id",
        "token_text",
        "is_prompt_token",
        *KEY,
        *(m.column for m in metrics.METRICS if m.reducer != "lens"),
    ]:
        assert _same(api[col], cli[col]), col

    def ids(t):
        return (
            t["run_config"]["prompt_index"],
            t["run_config"]["sample_index"],
            t["prompt"]["token_ids"] + t["generated"]["token_ids"],
        )

    cli_traces = sorted(ids(json.loads(open(p).read())) for p in result.trace_paths)
    assert sorted(ids(t) for t in rec.traces()) == cli_traces


def test_save_writes_a_job_dir_that_load_sweep_reads(tiny_gpt2, tmp_path):
    model, tok = _model(tiny_gpt2)
    with corevital.record(model, tok, name="mine") as rec:
        model.generate(
            **tok(PROMPTS[:2], return_tensors="pt", padding=True),
            max_new_tokens=4,
            do_sample=False,
            pad_token_id=tok.pad_token_id,
        )
        model.generate(
            **tok(PROMPTS[2:], return_tensors="pt"), max_new_tokens=3, do_sample=False, pad_token_id=tok.pad_token_id
        )
    job = rec.save(tmp_path / "mine")
    traces = corevital.load_sweep(job, table="traces").sort_values("prompt_index")
    assert list(traces.prompt_index) == [0, 1, 2] and set(traces.model) == {"mine"}
    assert list(traces.prompt_text) == PROMPTS
    docs = [json.loads(p.read_text()) for p in sorted((job / "traces").glob("*.json"))]
    assert [d["prompt"]["text"] for d in docs] == PROMPTS
    layers = model.config.get_text_config().num_hidden_layers
    rows = corevital.load_sweep(job, columns=["trace_id", "step_index", "layer_index"])
    assert len(rows) == sum((d["prompt"]["num_tokens"] + d["generated"]["num_tokens"]) * layers for d in docs)
    # to_pandas and traces read one write of the recording, renewed after another generate call
    assert set(rec.to_pandas(table="traces").trace_id) == {d["trace_id"] for d in rec.traces()} == set(rows.trace_id)
    with corevital.record(model, tok) as rec:
        for prompts in (PROMPTS[:1], PROMPTS[1:2]):
            model.generate(**tok(prompts, return_tensors="pt"), max_new_tokens=2, pad_token_id=tok.pad_token_id)
            assert list(rec.to_pandas(table="traces").prompt_text) == PROMPTS[: len(rec.batches)]


def test_record_refuses_what_a_job_refuses_and_leaves_the_model_alone(tmp_path_factory):
    from transformers import BloomConfig, BloomForCausalLM

    from conftest import save_tiny

    path = save_tiny(
        tmp_path_factory, "tiny-bloom-api", BloomConfig, BloomForCausalLM, hidden_size=32, n_layer=2, n_head=4
    )
    model, tok = _model(path)
    with pytest.raises(corevital.UnsupportedModel, match="BloomForCausalLM cannot be captured exactly"):
        with corevital.record(model, tok):
            pass
    assert "generate" not in vars(model)


def test_a_padded_batch_for_a_model_that_counts_positions_from_the_first_column_is_refused(tiny_gpt2):
    model, tok = _model(tiny_gpt2)
    enc = tok(PROMPTS, return_tensors="pt", padding=True)
    if "position_ids" in __import__("inspect").signature(model.forward).parameters:
        pytest.skip("this model takes position ids")
    with corevital.record(model, tok) as rec, pytest.raises(corevital.RecordError, match="one prompt per call"):
        model.generate(**enc, max_new_tokens=2, pad_token_id=tok.pad_token_id)
    assert rec.batches == []


def test_import_corevital_stays_light():
    import subprocess
    import sys

    code = "import sys, corevital; print(sorted(m for m in ('torch', 'transformers', 'pyarrow') if m in sys.modules))"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "[]"
    assert torch is not None


def test_nothing_is_left_on_the_model(tiny_llama):
    """The check, a job's capture and a recording keep their findings in objects of their own:
    the model's attributes (and each module's), and its attention implementation, are as before."""
    from corevital.capture import ModelFacts, generate_with_capture, support

    model, tok = _model(tiny_llama)
    enc = tok(PROMPTS, return_tensors="pt", padding=True)
    model.generate(**enc, max_new_tokens=2, do_sample=False, pad_token_id=tok.pad_token_id)  # transformers' own state,
    model(**enc, output_hidden_states=True)  # including the output-capturing hooks it installs on first request
    before = {name: set(vars(m)) for name, m in model.named_modules()}
    implementation = model.config._attn_implementation
    support.check(model)
    sampling = SamplingConfig(max_new_tokens=3, do_sample=False)
    generate_with_capture(model, tok, PROMPTS, sampling, 0, lens="all", facts=ModelFacts.probe(model, "all"))
    with corevital.record(model, tok) as rec:
        model.generate(**enc, max_new_tokens=2, do_sample=False, pad_token_id=tok.pad_token_id)
    assert rec.batches and {name: set(vars(m)) for name, m in model.named_modules()} == before
    assert model.config._attn_implementation == implementation


def test_two_recordings_in_two_threads_keep_their_own_values(tiny_llama, tiny_gpt2):
    """The attention capture in progress is held per thread (capture/attention.py's context), not in
    a module global: two models recorded at once in two threads, their forward passes interleaved
    step by step, give the values each gives alone."""
    import threading

    models = [_model(tiny_llama), _model(tiny_gpt2)]

    def record(model, tok, turn=None):
        enc = tok(PROMPTS, return_tensors="pt", padding=True)
        with corevital.record(model, tok) as rec:  # the load-time check runs here, before any turn
            hook = None if turn is None else model.register_forward_pre_hook(lambda *_: turn())
            try:
                model.generate(**enc, max_new_tokens=5, do_sample=False, pad_token_id=tok.pad_token_id)
            finally:
                hook is None or hook.remove()
        return rec.to_pandas().sort_values(KEY).reset_index(drop=True)

    alone = [record(*m) for m in models]
    barrier = threading.Barrier(2, timeout=60)  # each forward pass waits for the other thread's
    together: list = [None, None]

    def turn():
        try:
            barrier.wait()
        except threading.BrokenBarrierError:  # the other thread is done
            pass

    def run(i):
        try:
            together[i] = record(*models[i], turn=turn)
        finally:
            barrier.abort()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for a, b in zip(alone, together):
        assert b is not None and len(a) == len(b) > 0
        for column in ("attn_entropy_mean", "hidden_l2_norm", "token_logprob"):
            assert _same(a[column], b[column]), column
