"""`generate_with_capture`: a batch of prompts through the model's own `generate`, recorded, and
cut into one SequenceCapture per continuation."""

from __future__ import annotations

import inspect
import time

import torch
from transformers import LogitsProcessor, LogitsProcessorList, StoppingCriteria

from corevital.capture.recorder import recording
from corevital.capture.sequence import cut
from corevital.core.config import SamplingConfig
from corevital.core.sequence import SequenceCapture
from corevital.model.introspect import execution_device


def generation_kwargs(sampling: SamplingConfig, tokenizer, num_samples: int = 1) -> dict:
    """`generate`'s keyword arguments for the sampling config; `num_samples` continuations per
    prompt (num_return_sequences: the batch's rows become prompt 0's samples, then prompt 1's, ...)."""
    return _generation_kwargs(sampling, tokenizer.pad_token_id, num_samples)


def _generation_kwargs(sampling: SamplingConfig, pad_token_id: int | None, num_samples: int = 1) -> dict:
    kw = dict(
        max_new_tokens=int(sampling.max_new_tokens),
        do_sample=bool(sampling.do_sample),
        pad_token_id=pad_token_id,
        num_return_sequences=int(num_samples),
        logits_processor=LogitsProcessorList([FiniteScores()]),
    )
    if sampling.do_sample:
        kw.update(temperature=float(sampling.temperature), top_k=int(sampling.top_k), top_p=float(sampling.top_p))
    else:
        kw.update(temperature=None, top_k=None, top_p=None)
    return kw


class FiniteScores(LogitsProcessor):
    """NaN -> 0 and +Inf -> the largest float in the scores sampled from (e.g. after float16
    overflow), which would otherwise crash sampling; -Inf (tokens ruled out) stays. The raw
    logits the capture summarises are untouched. One fused kernel per step, where
    transformers' remove_invalid_values launches several."""

    def __call__(self, input_ids, scores):
        return scores.nan_to_num_(nan=0.0, posinf=torch.finfo(scores.dtype).max, neginf=float("-inf"))


class _OnStep(StoppingCriteria):
    """Calls `callback()` once per generated token (for progress bars); stops every sequence
    once `stop()` is true."""

    def __init__(self, callback=None, stop=None):
        self.callback, self.stop = callback, stop

    def __call__(self, input_ids, scores, **kwargs):
        if self.callback is not None:
            self.callback()
        done = self.stop is not None and self.stop()
        return torch.full((input_ids.shape[0],), done, dtype=torch.bool, device=input_ids.device)


def prompt_token_ids(
    tokenizer, prompts: list[str], chat_template: bool = False, system_prompt: str | None = None
) -> list[list[int]]:
    """Each prompt's token ids as `generate` gets them: the tokenizer's own encoding, or with
    `chat_template` exactly the ids of `apply_chat_template(messages, add_generation_prompt=True)`
    for one user message (after a system message when `system_prompt` is set). The ids come
    from that call itself: tokenizing its rendered text again would add a second BOS."""
    if not chat_template:
        return tokenizer(prompts)["input_ids"]
    system = [] if system_prompt is None else [{"role": "system", "content": system_prompt}]
    return [
        list(
            tokenizer.apply_chat_template(
                [*system, {"role": "user", "content": p}], add_generation_prompt=True, tokenize=True, return_dict=False
            )
        )
        for p in prompts
    ]


def generate_with_capture(
    model,
    tokenizer,
    prompts: list[str],
    sampling: SamplingConfig,
    seed: int,
    on_step=None,
    stop=None,
    chat_template: bool = False,
    system_prompt: str | None = None,
    num_samples: int = 1,
    lens: str | None = None,
    extras=(),
    facts=None,
) -> list[SequenceCapture]:
    """Generate for a batch of prompts (left-padded) and return each continuation's capture, by
    prompt then sample: `num_samples` per prompt, all from this one `generate` call.
    `chat_template`, `system_prompt`: how prompts become tokens (prompt_token_ids).
    `lens`: metrics.logit_lens (None: off, "generated", "all"; lens.resolve must accept the model).
    `extras`: user metrics (metrics.UserMetric), bound to this model.
    `facts`: the model's recorder.ModelFacts, probed once by the caller (else probed for this call).
    `on_step`, if given, is called after each generated token; `stop`, if given, ends the
    generation early once it returns True (the caller discards that batch)."""
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    ids = prompt_token_ids(tokenizer, prompts, chat_template, system_prompt)
    return capture_ids(
        model, ids, tokenizer.pad_token_id, sampling, seed, on_step, stop, num_samples, lens, extras, facts
    )


def capture_ids(
    model,
    ids: list[list[int]],
    pad_token_id: int,
    sampling: SamplingConfig,
    seed: int,
    on_step=None,
    stop=None,
    num_samples: int = 1,
    lens: str | None = None,
    extras=(),
    facts=None,
) -> list[SequenceCapture]:
    """generate_with_capture for prompts given as token ids, left-padded with `pad_token_id`."""
    from transformers import set_seed

    if len(ids) > 1 and "position_ids" not in inspect.signature(model.forward).parameters:
        # Such a model counts positions from the first column, padding included: a left-padded
        # prompt would be computed at other positions than alone. One prompt per call instead.
        return [
            c
            for one in ids
            for c in capture_ids(
                model, [one], pad_token_id, sampling, seed, on_step, stop, num_samples, lens, extras, facts
            )
        ]
    width = max(len(i) for i in ids)
    input_ids = torch.tensor([[pad_token_id] * (width - len(i)) + list(i) for i in ids])  # (b, width), left-padded
    attention_mask = torch.tensor([[0] * (width - len(i)) + [1] * len(i) for i in ids])
    device = execution_device(model)
    enc = {"input_ids": input_ids.to(device), "attention_mask": attention_mask.to(device)}
    set_seed(seed)
    start = time.perf_counter()
    with torch.inference_mode(), recording(model, lens, extras, facts) as rec:
        criteria = [rec] if on_step is None and stop is None else [rec, _OnStep(on_step, stop)]
        keep = (
            {"logits_to_keep": 0} if rec.own_logits and model._supports_logits_to_keep() else {}
        )  # every position's logits
        out = model.generate(
            **enc, stopping_criteria=criteria, **_generation_kwargs(sampling, pad_token_id, num_samples), **keep
        )
        outputs = rec.result()
    elapsed_ms = int(round((time.perf_counter() - start) * 1000))
    return cut_sequences(outputs, attention_mask, out, num_samples, eos_ids(model), elapsed_ms, extras)


def cut_sequences(
    outputs: dict,
    attention_mask: torch.Tensor,
    sequences: torch.Tensor,
    num_samples: int,
    eos: set[int],
    elapsed_ms: int,
    extras=(),
) -> list[SequenceCapture]:
    """One SequenceCapture per row of `generate`'s output sequences (prompts * num_samples,
    width + new): a Recorder's `result()` cut by each row's left padding and first end token."""
    mask = attention_mask.cpu().numpy().astype(bool)  # (prompts, width)
    rows = sequences.cpu().numpy()  # row i is prompt i // num_samples
    return [
        _one_sequence(outputs, i, mask[i // num_samples], rows[i], eos, elapsed_ms, extras) for i in range(len(rows))
    ]


def eos_ids(model, eos=None) -> set[int]:
    """The tokens that end a sequence: the ones `generate` stops on (`eos`: its eos_token_id
    argument, where the call gave one)."""
    eos = model.generation_config.eos_token_id if eos is None else eos
    return {int(e) for e in (eos if isinstance(eos, list) else [eos]) if e is not None}


def _one_sequence(outputs, i: int, mask, seq, eos: set[int], elapsed_ms: int, extras) -> SequenceCapture:
    import numpy as np

    pad = int((~mask).sum())  # left padding of this sequence
    width = mask.shape[0]  # padded prompt length
    generated = seq[width:]
    ends = [j for j, t in enumerate(generated) if int(t) in eos]
    g = ends[0] + 1 if ends else len(generated)
    tokens = np.concatenate([seq[pad:width], generated[:g]]).astype(np.int64)
    rows = slice(pad, pad + len(tokens) - 1)  # column of row t is pad + t - 1, for t >= 1
    values, topk_ids, topk_probs = cut(outputs, i, rows, extras)
    return SequenceCapture(
        prompt_len=width - pad,
        token_ids=tokens,
        values=values,
        topk_ids=topk_ids,
        topk_probs=topk_probs,
        elapsed_ms=elapsed_ms,
        extras=tuple(extras),
    )
