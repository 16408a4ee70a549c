"""The Python API for notebooks: capture around any `generate` call of a model you already hold.

    import corevital

    with corevital.record(model, tokenizer) as rec:
        out = model.generate(**inputs, max_new_tokens=20)
    rec.to_pandas()          # summaries.parquet's rows
    rec.traces()             # the JSON traces, as dicts
    rec.save("outputs/mine") # a job dir that load_sweep and `corevital evaluate` read

`record` runs the same load-time check as a job (support.check: exact or refused, one
sentence) and, for the duration of the block, routes the model's `generate` through capture:
the model computes exactly what it would without it. Rows, traces and tables are made by the
job's own writer, so their values equal a command-line job's on the same model, prompts and
seed (docs/api.md).
"""

from __future__ import annotations

import contextlib
import inspect
import json
import tempfile
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path

import torch

from corevital import SCHEMA_VERSION
from corevital.capture import ModelFacts, SequenceCapture, cut_sequences, eos_ids, execution_device, recording, support
from corevital.core.config import logit_lens_mode
from corevital.core.prompts import INLINE_SOURCE, Prompt
from corevital.kernels import summaries
from corevital.output.sinks import Delivery
from corevital.output.trace import GenerationInfo, ModelInfo, RunConfigInfo
from corevital.output.tracedoc import TraceHeader


class RecordError(ValueError):
    """A generate call the recording cannot capture exactly as given; the message says why."""


class Recording:
    """What `record` captured: one entry per `generate` call, each continuation a trace."""

    def __init__(self, model, tokenizer, lens_mode: str | None, seed: int, name: str):
        self.model, self.tokenizer, self.lens, self.seed, self.name = model, tokenizer, lens_mode, seed, name
        self.batches: list[tuple[list[SequenceCapture], list[TraceHeader]]] = []  # per generate call
        self.facts = ModelFacts.probe(model, lens_mode)  # once, for every call of the block
        self._prompts = 0  # prompts seen so far: the next call's first prompt_index
        self._saved: tuple | None = None  # (batches saved, TemporaryDirectory, job dir): _written

    # --- the wrapped generate --------------------------------------------------------------
    def generate(self, original, *args, **kwargs):
        """`original` (the model's own generate) under capture; returns what it returns."""
        input_ids = kwargs.pop("input_ids", args[0] if args else None)
        if input_ids is None:
            raise RecordError("corevital.record captures generate calls given input_ids (tokenizer(...) output)")
        mask = kwargs.pop("attention_mask", None)
        mask = torch.ones_like(input_ids) if mask is None else mask
        padded = bool((mask == 0).any())
        if padded and input_ids.shape[0] > 1 and "position_ids" not in inspect.signature(self.model.forward).parameters:
            raise RecordError(
                f"{type(self.model).__name__} counts positions from the first column, padding included, "
                f"so a left-padded batch computes other positions; generate one prompt per call"
            )
        samples = int(kwargs.get("num_return_sequences") or 1)
        criteria = list(kwargs.pop("stopping_criteria", None) or [])
        start = time.perf_counter()
        with recording(self.model, self.lens, facts=self.facts) as rec:
            keep = {"logits_to_keep": 0} if rec.own_logits and self.model._supports_logits_to_keep() else {}
            out = original(
                input_ids=input_ids, attention_mask=mask, stopping_criteria=[*criteria, rec], **kwargs, **keep
            )
            outputs = rec.result()
        ms = int(round((time.perf_counter() - start) * 1000))
        sequences = out.sequences if hasattr(out, "sequences") else out
        caps = cut_sequences(outputs, mask, sequences, samples, eos_ids(self.model, kwargs.get("eos_token_id")), ms)
        self.batches.append((caps, self._headers(caps, samples, kwargs, input_ids.shape[0])))
        self._prompts += input_ids.shape[0]
        return out

    def _headers(self, caps: list[SequenceCapture], samples: int, kwargs: dict, prompts: int) -> list[TraceHeader]:
        g = self.model.generation_config
        setting = lambda key: kwargs.get(key, getattr(g, key, None))  # noqa: E731  (the call's, else the model's)
        sample = bool(setting("do_sample"))
        info = GenerationInfo(
            do_sample=sample,
            temperature=float(setting("temperature") or 1.0) if sample else 1.0,
            top_k=int(setting("top_k") or 0) if sample else 0,
            top_p=float(setting("top_p") or 1.0) if sample else 1.0,
        )
        model = self._model_info()
        now = datetime.now(timezone.utc).isoformat(timespec="milliseconds")
        headers = []
        for i, cap in enumerate(caps):
            index = self._prompts + i // samples
            text = self.tokenizer.decode(cap.token_ids[: cap.prompt_len].tolist(), skip_special_tokens=True)
            rc = RunConfigInfo(
                seed=self.seed,
                device_requested=str(execution_device(self.model).type),
                max_new_tokens=int(setting("max_new_tokens") or cap.generated_len),
                batch_size=prompts,
                generation=info,
                prompt_source=INLINE_SOURCE,
                prompt_index=index,
                sample_index=i % samples,
                num_samples=samples,
                sketch=dict(summaries.SKETCH_RECIPE),
                sink={"type": "api", "target": "memory"},
            )
            headers.append(TraceHeader(uuid.uuid4().hex, now, model, rc, Prompt(index, text, None, INLINE_SOURCE)))
        return headers

    def _model_info(self) -> dict:
        c = self.model.config.get_text_config()
        path = getattr(self.model.config, "_name_or_path", "") or type(self.model).__name__
        return ModelInfo(
            name=self.name,
            hf_id=path,
            revision=None,
            architecture=type(self.model).__name__,
            num_layers=c.num_hidden_layers,
            hidden_size=c.hidden_size,
            num_attention_heads=c.num_attention_heads,
            tokenizer_hf_id=getattr(self.tokenizer, "name_or_path", "") or path,
            dtype=str(self.model.dtype).removeprefix("torch."),
            device=str(execution_device(self.model)),
        ).model_dump()

    # --- what the user reads ---------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        """Write a job dir (traces/, summaries.parquet, traces.parquet) with the job's own writer."""
        from corevital.output.vocab import Vocabulary
        from corevital.output.writer import Batch, JobWriter, Store

        job_dir = Path(path)
        if not self.batches:
            raise RecordError("nothing was generated inside the `with corevital.record(...)` block")
        store = Store(job_dir)
        store.prepare(uuid.uuid4().hex, resume=False)
        vocab = Vocabulary(self.tokenizer, self.model.config.get_text_config().vocab_size)
        samples = max(h.run_config.num_samples for _, headers in self.batches for h in headers)
        config = {"api": True, "seed": self.seed, "num_samples": samples, "schema_version": SCHEMA_VERSION}
        with JobWriter(store, "json", Delivery([]), vocab, config, self._prompts, "inline") as writer:
            for caps, headers in self.batches:
                writer.put(Batch(headers[0].prompt.index, caps, headers))
            writer.finish()
        store.remove()
        (job_dir / "status.json").write_text(json.dumps({"status": "done", "source": "corevital.record"}, indent=2))
        return job_dir

    def to_pandas(self, table: str = "summaries"):
        """The rows of summaries.parquet (table="traces": traces.parquet) as a DataFrame."""
        import pandas as pd

        return pd.read_parquet(self._written() / f"{table}.parquet")

    def traces(self) -> list[dict]:
        """Every continuation's JSON trace, in prompt then sample order."""
        return [json.loads(p.read_text()) for p in sorted((self._written() / "traces").glob("*.json"))]

    def _written(self) -> Path:
        """The recording saved once as a job dir in a private temp dir, removed with this object;
        saved again only after further generate calls, so to_pandas and traces read one write."""
        if self._saved is None or self._saved[0] != len(self.batches):
            tmp = tempfile.TemporaryDirectory(prefix="corevital-record-")
            self._saved = (len(self.batches), tmp, self.save(Path(tmp.name) / "job"))
        return self._saved[2]


@contextlib.contextmanager
def record(model, tokenizer, logit_lens: str | bool = False, seed: int = 0, name: str = "custom"):
    """Capture every `model.generate` call inside the block (see the module docstring).

    Raises support.UnsupportedModel (one sentence) before anything runs when capture cannot
    reproduce the model's values exactly, and a ConfigError when the logit lens is asked for
    a model whose head cannot be verified. `logit_lens`: False, "generated" or "all".
    `seed`: recorded in the traces (set it yourself with transformers.set_seed). `name`: the
    traces' `model` column. For the block, `model.generate` is an attribute of the instance
    that routes through capture; it is removed again on the way out."""
    support.check(model)
    lens_mode = logit_lens_mode(logit_lens)
    support.check_logit_lens(model, lens_mode)
    rec = Recording(model, tokenizer, lens_mode, seed, name)
    original = model.generate
    shadowed = "generate" in vars(model)
    model.generate = lambda *args, **kwargs: rec.generate(original, *args, **kwargs)
    try:
        yield rec
    finally:
        if shadowed:
            model.generate = original
        else:
            del model.generate
