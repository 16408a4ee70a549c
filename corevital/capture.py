"""Capture: instrumented `generate` that summarises every forward pass as it happens.

Hooks read each forward pass and turn it at once into the small summaries of
`summaries.py`; the tensors themselves are dropped. What grows with a run is only the
summary rows, kept on the model's device and moved to the host once per `generate` call.

    top-level forward pre-hook  -> remembers input_ids (prompt tokens score prompt rows)
    decoder block l output      -> hidden summary of every query position
    attention function          -> attention summary, from post-rotary query and key, while
                                   SDPA computes the output (no eager attention needed)
    base model output           -> prefill logits for all but the last position, in chunks
    top-level forward output    -> the model's own raw logits for the last position
    stopping criterion          -> sees the token just drawn: its log-prob under those logits

Column c of every forward's output is query position c of the (left-padded) sequence.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass

import numpy as np
import torch
from transformers import AttentionInterface, StoppingCriteria
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

from corevital import summaries

ATTN_IMPLEMENTATION = "corevital"
QUERY_CHUNK = 128  # query rows per attention-stats / logits block during prefill
_ACTIVE: "Recorder | None" = None


def _attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """SDPA for the output; the active recorder (if any) summarises the weights on the side."""
    if _ACTIVE is not None:
        _ACTIVE.on_attention(module, query, key, attention_mask, scaling, kwargs.get("softcap"))
    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)


AttentionInterface.register(ATTN_IMPLEMENTATION, _attention)
ALL_MASK_ATTENTION_FUNCTIONS.register(ATTN_IMPLEMENTATION, sdpa_mask)


def decoder_layers(model) -> torch.nn.ModuleList:
    """The model's stack of transformer blocks (the ModuleList with num_hidden_layers entries)."""
    n = model.config.get_text_config().num_hidden_layers
    for module in model.base_model.modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) == n:
            return module
    raise ValueError(f"cannot find the {n} transformer blocks of {type(model).__name__}")


class Recorder(StoppingCriteria):
    """Summaries of one `generate` call, kept on the device until `result()`."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.num_layers = len(decoder_layers(model))
        self.directions = summaries.sketch_directions(model.config.get_text_config().hidden_size).to(model.device)
        self.softcap = getattr(model.config.get_text_config(), "final_logit_softcapping", None)
        self.columns: list[dict[str, torch.Tensor]] = []  # one entry per forward pass
        self.logprobs: list[torch.Tensor] = []  # (b, n) pieces, in column order
        self._hidden: list[torch.Tensor] = []
        self._attn: list[torch.Tensor] = []
        self._prefill: dict[str, torch.Tensor] | None = None
        self._input_ids: torch.Tensor | None = None
        self._pending_logp: torch.Tensor | None = None

    # --- hooks -------------------------------------------------------------------------
    def on_forward_start(self, module, args, kwargs):
        self._input_ids = kwargs.get("input_ids", args[0] if args else None)
        self._hidden, self._attn, self._prefill = [], [], None

    def on_block(self, module, args, output):
        h = output[0] if isinstance(output, tuple) else output  # (b, q, hidden)
        self._hidden.append(summaries.hidden_summary(h, self.directions))  # (b, q, 12)

    def on_attention(self, module, query, key, mask, scaling, softcap):
        if scaling is None:
            scaling = query.shape[-1] ** -0.5
        key = key.repeat_interleave(query.shape[1] // key.shape[1], dim=1)  # GQA: (b, heads, k, d)
        offset = key.shape[2] - query.shape[2]
        parts = []
        for q0 in range(0, query.shape[2], QUERY_CHUNK):
            q1 = min(q0 + QUERY_CHUNK, query.shape[2])
            m = mask if mask is None or mask.shape[-2] == 1 else mask[..., q0:q1, :]
            probs = summaries.attention_probs(query[:, :, q0:q1], key, m, scaling, offset + q0, softcap)  # (b, h, c, k)
            parts.append(summaries.attention_summary(probs))  # (b, c, 3)
        self._attn.append(torch.cat(parts, dim=1))

    def on_base_output(self, module, args, output):
        """Prefill: summarise the logits of every position but the last (the model keeps only that one)."""
        hidden = output[0] if isinstance(output, tuple) else output.last_hidden_state  # (b, q, hidden)
        if hidden.shape[1] < 2:
            return
        lm_head = self.model.get_output_embeddings()
        pieces = []
        for q0 in range(0, hidden.shape[1] - 1, QUERY_CHUNK):
            q1 = min(q0 + QUERY_CHUNK, hidden.shape[1] - 1)
            logits = lm_head(hidden[:, q0:q1])  # (b, c, V)
            if self.softcap:
                logits = torch.tanh(logits / self.softcap) * self.softcap
            stats, top_p, top_ids, logp = summaries.logits_summary(logits)
            nxt = self._input_ids[:, q0 + 1:q1 + 1]  # (b, c): the prompt token each position scores
            pieces.append((stats, top_p, top_ids, logp.gather(-1, nxt[..., None])[..., 0]))
        self._prefill = {k: torch.cat([p[i] for p in pieces], dim=1) for i, k in enumerate(("logit_stats", "topk_probs", "topk_ids"))}
        self.logprobs.append(torch.cat([p[3] for p in pieces], dim=1))

    def on_forward_end(self, module, args, kwargs, output):
        stats, top_p, top_ids, logp = summaries.logits_summary(output.logits[:, -1:])  # (b, 1, ...)
        self._pending_logp = logp[:, 0]  # (b, V): scored once the next token is drawn
        last = {"logit_stats": stats, "topk_probs": top_p, "topk_ids": top_ids}
        if self._prefill is not None:
            last = {k: torch.cat([self._prefill[k], v], dim=1) for k, v in last.items()}
        last["hidden"] = torch.stack(self._hidden, dim=2)  # (b, q, L, 12)
        last["attn"] = torch.stack(self._attn, dim=2)  # (b, q, L, 3)
        self.columns.append(last)
        self._hidden, self._attn, self._prefill = [], [], None

    def __call__(self, input_ids, scores, **kwargs):
        """Stopping criterion that never stops: it only scores the token just appended."""
        self.logprobs.append(self._pending_logp.gather(-1, input_ids[:, -1:]))  # (b, 1)
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)

    def result(self) -> dict[str, np.ndarray]:
        """Every column of the run as host arrays: (b, C, ...) with C = padded prompt + generated - 1."""
        out = {k: torch.cat([c[k] for c in self.columns], dim=1) for k in self.columns[0]}
        out["token_logprob"] = torch.cat(self.logprobs, dim=1)
        return {k: v.cpu().numpy() for k, v in out.items()}


@contextlib.contextmanager
def recording(model):
    """Attach a Recorder's hooks to `model` for the duration of the block."""
    global _ACTIVE
    rec = Recorder(model)
    handles = [
        model.register_forward_pre_hook(rec.on_forward_start, with_kwargs=True),
        model.register_forward_hook(rec.on_forward_end, with_kwargs=True),
        model.base_model.register_forward_hook(rec.on_base_output),
        *(layer.register_forward_hook(rec.on_block) for layer in decoder_layers(model)),
    ]
    previous = model.config._attn_implementation
    model.config._attn_implementation = ATTN_IMPLEMENTATION
    _ACTIVE = rec
    try:
        yield rec
    finally:
        _ACTIVE = None
        model.config._attn_implementation = previous
        for h in handles:
            h.remove()


@dataclass
class SequenceCapture:
    """One prompt's generation and its summaries; row t of every array is timeline row t.

    Row 0 has no forward pass behind it: its float entries are NaN.
    """

    prompt_len: int  # P
    token_ids: np.ndarray  # (T,) int64, T = P + G
    logit_stats: np.ndarray  # (T, 3) entropy, top-1 p, top-1 minus top-2 p
    token_logprob: np.ndarray  # (T,)
    topk_ids: np.ndarray  # (T, 5) int64
    topk_probs: np.ndarray  # (T, 5)
    hidden: np.ndarray  # (T, L, 4) mean, std, l2 norm, max |x|
    sketch: np.ndarray  # (T, L, 8)
    attn: np.ndarray  # (T, L, 3) entropy mean, entropy min, concentration max
    elapsed_ms: int

    @property
    def generated_len(self) -> int:
        return len(self.token_ids) - self.prompt_len


def generation_kwargs(sampling, tokenizer) -> dict:
    kw = dict(max_new_tokens=int(sampling.max_new_tokens), do_sample=bool(sampling.do_sample), pad_token_id=tokenizer.pad_token_id)
    if sampling.do_sample:
        kw.update(temperature=float(sampling.temperature), top_k=int(sampling.top_k), top_p=float(sampling.top_p))
    else:
        kw.update(temperature=None, top_k=None, top_p=None)
    return kw


def generate_with_capture(model, tokenizer, prompts: list[str], sampling, seed: int) -> list[SequenceCapture]:
    """Generate for a batch of prompts (left-padded) and return each prompt's capture."""
    from transformers import set_seed

    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    enc = tokenizer(prompts, return_tensors="pt", padding=True).to(model.device)
    set_seed(seed)
    start = time.perf_counter()
    with torch.inference_mode(), recording(model) as rec:
        out = model.generate(**enc, stopping_criteria=[rec], **generation_kwargs(sampling, tokenizer))
        cols = rec.result()
    elapsed_ms = int(round((time.perf_counter() - start) * 1000))
    eos = _eos_ids(model, tokenizer)
    mask = enc["attention_mask"].cpu().numpy().astype(bool)
    sequences = out.cpu().numpy()
    return [_one_sequence(cols, i, mask[i], sequences[i], eos, elapsed_ms) for i in range(len(prompts))]


def _eos_ids(model, tokenizer) -> set[int]:
    eos = model.generation_config.eos_token_id
    eos = eos if isinstance(eos, list) else [eos]
    return {int(e) for e in eos + [tokenizer.eos_token_id] if e is not None}


def _one_sequence(cols: dict[str, np.ndarray], i: int, mask: np.ndarray, seq: np.ndarray, eos: set[int], elapsed_ms: int) -> SequenceCapture:
    pad = int((~mask).sum())  # left padding of this sequence
    width = mask.shape[0]  # padded prompt length
    generated = seq[width:]
    ends = [j for j, t in enumerate(generated) if int(t) in eos]
    g = ends[0] + 1 if ends else len(generated)
    tokens = np.concatenate([seq[pad:width], generated[:g]]).astype(np.int64)
    rows = slice(pad, pad + len(tokens) - 1)  # column of row t is pad + t - 1, for t >= 1

    def take(name: str, dtype=np.float32) -> np.ndarray:
        body = cols[name][i, rows]
        first = np.full((1, *body.shape[1:]), np.nan if dtype == np.float32 else -1, dtype=dtype)
        return np.concatenate([first, body.astype(dtype)])

    hidden = take("hidden")
    return SequenceCapture(
        prompt_len=width - pad, token_ids=tokens, logit_stats=take("logit_stats"),
        token_logprob=take("token_logprob"), topk_ids=take("topk_ids", np.int64), topk_probs=take("topk_probs"),
        hidden=hidden[..., :4], sketch=hidden[..., 4:], attn=take("attn"), elapsed_ms=elapsed_ms,
    )
