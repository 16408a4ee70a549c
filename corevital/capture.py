"""Capture: instrumented `generate` that summarises every forward pass as it happens.

Hooks read each forward pass and turn it at once into the small summaries of
`summaries.py`; the tensors themselves are dropped. What grows with a run is only the
summary rows, kept on the model's device and moved to the host once per `generate` call.

    top-level forward pre-hook  -> remembers input_ids (prompt tokens score prompt rows)
    decoder block l output      -> hidden summary of every query position
    attention function          -> attention summary, from post-rotary query and key; SDPA
                                   computes the output (CPU float32 prefill: p @ V from the
                                   very weights of the summary, so attention runs once)
    base model output           -> prefill logits for all but the last position, in chunks
                                   (CPU: in vocabulary slices, summarised by a fused kernel)
    top-level forward output    -> the model's own raw logits for the last position; decode
                                   passes summarise all layers' stashed inputs in one go
    stopping criterion          -> sees the token just drawn: its log-prob under those logits
    logit lens (metrics.logit_lens, off by default): block outputs kept until the pass ends,
                                   then read through the final norm and head in chunks (lens.py)

Column c of every forward's output is query position c of the (left-padded) sequence.
"""

from __future__ import annotations

import contextlib
import inspect
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch
from transformers import AttentionInterface, LogitsProcessor, LogitsProcessorList, StoppingCriteria
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from corevital import lens as logit_lens
from corevital import summaries

ATTN_IMPLEMENTATION = "corevital"
STACK_KEYS_BELOW = 1 << 16  # decode: keys this small are stacked over layers on the CPU too (one product per step)
_ACTIVE: "Recorder | None" = None


@dataclass(frozen=True)
class Blocks:
    """How prefill work is cut up, and how decode attention is batched, per kind of device.

    On the CPU, small attention blocks keep the heap compact and skip more of the causal
    triangle; on a GPU, kernel launches cost more than arithmetic, so attention blocks are
    large (64 MiB) and decode steps stack all layers' keys for one batched score product
    instead of one product per layer (on the CPU too while a layer's keys are small,
    STACK_KEYS_BELOW elements: then the per-layer ops cost more than the copy). Prefill logits: with the fused CPU kernels, 2,048
    positions at a time, made and summarised 512 vocabulary ids at a time (4 MiB per slice,
    summarised while in cache: summaries.linear_logits_summary); otherwise whole-vocabulary
    rows, 512 positions per block on the CPU (96 MiB for a 49k vocabulary), 128 on a GPU,
    where larger blocks would add to peak memory and save next to nothing.
    """

    elements: int  # float32 elements per block of attention scores
    rows: int  # query rows per attention block
    logit_rows: int  # batch x positions per block of prefill logits
    stack_keys: bool  # decode: stack layers' query/key (True) or score each layer as it runs
    prefill_output: bool  # prefill attention output from the statistics' own weights (True) or from SDPA
    vocab_slice: int | None  # prefill logits made this many vocabulary ids at a time (fused kernel), None: whole rows

    @staticmethod
    def for_device(device: torch.device) -> "Blocks":
        if device.type == "cuda":
            return Blocks(elements=1 << 24, rows=2048, logit_rows=128, stack_keys=True, prefill_output=False, vocab_slice=None)
        if summaries.fused_kernels(device):
            return Blocks(elements=1 << 20, rows=128, logit_rows=2048, stack_keys=False, prefill_output=True, vocab_slice=512)
        return Blocks(elements=1 << 20, rows=128, logit_rows=512, stack_keys=False, prefill_output=True, vocab_slice=None)


# Keyword arguments of the attention function that leave a plain softmax(q k^T) v: with only
# these, a CPU float32 prefill may take its output from the weights the summary computes.
PLAIN_KWARGS = frozenset({"sliding_window", "position_ids", "cache_position", "use_cache", "layer_idx", "output_attentions"})


def _attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """The model's own attention function for the output; the active recorder summarises the
    weights on the side.

    The output comes from the attention implementation the model was loaded with (SDPA, or
    its modeling file's eager attention), so capture never changes what the model computes.
    Only a plain float32 SDPA prefill on the CPU takes its output instead from the very
    weights the recorder computes for its statistics (one attention instead of two; the same
    product SDPA's math path makes).
    """
    rec = _ACTIVE
    plain = dropout == 0.0 and set(kwargs) <= PLAIN_KWARGS and rec.implementation == "sdpa"
    out = rec.on_attention(module, query, key, value if plain else None, attention_mask, scaling, kwargs.get("softcap"),
                           kwargs.get("s_aux"))
    if out is not None:
        return out, None
    return rec.attention_function(module)(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                          **kwargs)


def _mask(*args, **kwargs):
    """The attention mask of the implementation the model was loaded with (boolean for SDPA,
    additive for eager)."""
    return ALL_MASK_ATTENTION_FUNCTIONS[_ACTIVE.implementation if _ACTIVE else "sdpa"](*args, **kwargs)


AttentionInterface.register(ATTN_IMPLEMENTATION, _attention)
ALL_MASK_ATTENTION_FUNCTIONS.register(ATTN_IMPLEMENTATION, _mask)


def execution_device(model) -> torch.device:
    """Where the model takes its inputs and the capture keeps its summaries: model.device, except
    for a model that accelerate dispatched over a device_map, whose offloaded ("cpu", "disk")
    parameters sit on the meta device: it runs on the map's first accelerator, else the CPU
    (accelerate's dispatch_model's rule)."""
    placement = getattr(model, "hf_device_map", None)
    if not placement or len(set(placement.values())) == 1 and "disk" not in placement.values():
        return model.device
    on = [d for d in placement.values() if d not in ("cpu", "disk")]
    return torch.device(on[0]) if on else torch.device("cpu")


PROBE_TOKENS = 8  # the load-time probes (head_is_plain, lens.resolve, support.check) run on this many tokens


def probe_ids(model) -> torch.Tensor:
    """The probes' input: token ids 0..7 (1, 8), where the model takes its inputs."""
    return torch.arange(min(PROBE_TOKENS, model.config.get_text_config().vocab_size), device=execution_device(model))[None]


def all_logits(model, ids: torch.Tensor) -> torch.Tensor:
    """The model's own float32 logits for every position of `ids` (1, n), when it can keep them all."""
    kw = {"logits_to_keep": 0} if model._supports_logits_to_keep() else {}
    with torch.inference_mode():
        return model(input_ids=ids, use_cache=False, **kw).logits.float()


def hidden_states(output) -> torch.Tensor:
    """A block's or base model's hidden states from its output (tensor, tuple or ModelOutput)."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, tuple):
        return output[0]
    hidden = getattr(output, "last_hidden_state", None)
    return hidden if hidden is not None else output[0]


def head_is_plain(model) -> bool:
    """Whether the model's logits are its output head applied to the base model's output, soft-
    capped as its config says: then prefill rows are made from the base output in chunks (the
    model keeps only the last position's logits). Otherwise (a logit scale, as Cohere's, or any
    transformation in the model's forward) they come from the model's own logits, kept for every
    position. Probed once per model on eight tokens, comparing the two."""
    cached = getattr(model, "_corevital_plain_head", None)
    if cached is not None:
        return cached
    seen = {}

    def keep(module, args, output):  # returns None: the output is left as it is
        seen["h"] = hidden_states(output)

    hook = model.base_model.register_forward_hook(keep)
    try:
        own = all_logits(model, probe_ids(model))  # (1, 8, V)
        with torch.inference_mode():
            head = model.get_output_embeddings()(seen["h"]).float() if "h" in seen else None
    finally:
        hook.remove()
    if "h" not in seen:  # the base model's forward is not what runs (e.g. a decoder wrapper's inner decoder)
        model._corevital_plain_head = False
        return False
    cap = getattr(model.config.get_text_config(), "final_logit_softcapping", None)
    if cap:
        head = torch.tanh(head / cap) * cap
    plain = own.shape == head.shape and bool(torch.allclose(own, head, rtol=1e-5, atol=1e-5))
    model._corevital_plain_head = plain
    return plain


def decoder_layers(model) -> torch.nn.ModuleList:
    """The model's stack of transformer blocks (the ModuleList with num_hidden_layers entries)."""
    n = model.config.get_text_config().num_hidden_layers
    for module in model.base_model.modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) == n:
            return module
    raise ValueError(f"cannot find the {n} transformer blocks of {type(model).__name__}")


def _chunks(rows: int, row_elements: int, max_elements: int, max_rows: int):
    """Row ranges of at most max_elements elements and max_rows rows (at least one row each)."""
    step = max(1, min(max_elements // max(1, row_elements), max_rows))
    for r0 in range(0, rows, step):
        yield r0, min(r0 + step, rows)


class Recorder(StoppingCriteria):
    """Summaries of one `generate` call, kept on the device until `result()`.

    Prefill passes (many query rows) are summarised layer by layer, in row chunks, as the
    layers run. Decode passes (one query row) stash each layer's hidden state and attention
    scores (small), and are summarised for all layers at once when the pass ends.
    Summaries made on another device than `device` (a device_map over several accelerators)
    are sent there as they are made: non-blocking copies, no host sync.
    """

    def __init__(self, model, lens: str | None = None):
        super().__init__()
        self.model = model
        self.device = execution_device(model)
        self.blocks = Blocks.for_device(self.device)
        text = model.config.get_text_config()
        self.directions = summaries.sketch_directions(text.hidden_size).to(self.device)
        self.softcap = getattr(text, "final_logit_softcapping", None)
        self.columns: list[dict[str, torch.Tensor]] = []  # one entry per forward pass
        self.logprobs: list[torch.Tensor] = []  # (b, n) pieces, in column order
        self.ranks: list[torch.Tensor] = []  # (b, n) token_rank pieces, as logprobs
        self._first_key: torch.Tensor | None = None  # (b,) column of each row's first real token
        self._prompt_width = 0  # the padded prompt's columns
        self._total = 0  # columns of the sequence in this forward pass (keys of a full cache)
        self._input_ids: torch.Tensor | None = None
        self._pending: tuple[torch.Tensor, torch.Tensor] | None = None
        self._scores: torch.Tensor | None = None  # see _scores_buffer
        self.implementation = model.config._attn_implementation  # the model's own attention, read before recording swaps it
        self.own_logits = not head_is_plain(model)  # prefill rows from the model's own logits (all positions kept)
        self.lens_mode = lens  # metrics.logit_lens: None (off), "generated" or "all"
        self.lens = logit_lens.resolve(model) if lens else None  # the model's verified final norm and head
        self._reset()

    def _reset(self):
        self._hidden: list[torch.Tensor] = []  # per layer: (b, q, 13) summary, or (b, 1, hidden) stashed
        self._block_out: torch.Tensor | None = None  # the last block's output: the next block's cos_prev reference
        self._block0_in: torch.Tensor | None = None  # decode: block 0's input (b, 1, hidden)
        self._attn: list = []  # per layer: (b, q, 3) summary, or stashed (scores (b, h, 1, k) | (query, key), mask)
        self._prefill: dict[str, torch.Tensor] | None = None
        self._biases: dict[tuple, torch.Tensor] = {}  # causal_bias per block shape
        self._lens_last: list[torch.Tensor] = []  # lens on: per layer, the block output at the pass's last position (b, 1, H)
        self._lens_rest: list[torch.Tensor] = []  # lens "all", prefill: per layer, the other positions' outputs (b, q - 1, H)

    # --- hooks -------------------------------------------------------------------------
    def on_forward_start(self, module, args, kwargs):
        self._input_ids = kwargs.get("input_ids", args[0] if args else None)  # (b, q)
        mask = kwargs.get("attention_mask")  # (b, columns so far), 0 on left padding
        q = self._input_ids.shape[1]
        if not self.columns:  # the prompt pass: where each row's tokens start, how wide the prompt is
            self._prompt_width = q
            self._first_key = (torch.zeros(self._input_ids.shape[0], dtype=torch.long, device=self.device) if mask is None
                               else (mask.shape[1] - mask.long().sum(-1)).to(self.device))
        self._total = mask.shape[1] if mask is not None and mask.dim() == 2 else self._prompt_width + len(self.columns)
        self._reset()

    def on_block(self, module, args, kwargs, output):
        h = hidden_states(output)  # (b, q, hidden)
        first = not self._hidden
        before = self._block_out if not first else (args[0] if args else kwargs.get("hidden_states"))
        if before is None or before.shape != h.shape:  # the block's input is not where blocks keep it
            before = torch.full_like(h, float("nan"))
        self._block_out = h
        if h.shape[1] == 1:  # decode: stashed; block l > 0's reference is block l-1's stashed output
            self._block0_in = before if first else self._block0_in
            x = h
        else:
            x = summaries.hidden_summary(h, self.directions.to(h.device, non_blocking=True), before)  # (b, q, 13)
        self._hidden.append(x.to(self.device, non_blocking=True))
        if self.lens is not None:  # kept until the pass ends, when the model's own logits are known
            self._lens_last.append(h[:, -1:].clone() if h.shape[1] > 1 else h)  # a prefill's slice: not its whole output
            if self.lens_mode == "all" and h.shape[1] > 1:
                self._lens_rest.append(h[:, :-1])

    def _masses(self, keys: int, lead: int = 0) -> tuple[torch.Tensor, int]:
        """attention_stats' masses for a layer whose cache holds the last `keys` columns:
        (first real key's column (b, 1, 1, 1), -1 once out of the cache; prompt key columns).
        `lead`: extra leading dims before the batch (stacked layers)."""
        dropped = self._total - keys  # columns no longer in this layer's cache (sliding window)
        first = self._first_key - dropped
        first = torch.where(first >= 0, first, -1).view(*([1] * lead), -1, 1, 1, 1)
        return first, self._prompt_width - dropped

    def on_attention(self, module, query, key, value, mask, scaling, softcap, sinks=None) -> torch.Tensor | None:
        """Summarise one layer's attention weights. Returns the attention output (b, q, h, dv)
        when it was computed here as well (a prefill pass on the CPU, given `value`), else None.
        `sinks` (heads,): per-head sink logits (gpt-oss) that take part in the softmax."""
        scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
        b, heads, q, _ = query.shape
        if sinks is not None:  # rare: summarised at once, by torch ops, whatever the pass
            stats = summaries.sink_attention_summary(summaries.attention_scores(query, key, scaling, softcap), mask,
                                                     key.shape[2] - q, sinks, self._masses(key.shape[2]))
            self._attn.append(stats.to(self.device, non_blocking=True))  # (b, q, 6)
            return None
        if q == 1:  # decode: stash this layer's scores (b, h, 1, k), or its query and key; stats at the end
            if (self.blocks.stack_keys or key.numel() <= STACK_KEYS_BELOW) and softcap is None and key.device == self.device:
                self._attn.append(((query.float() * scaling, key), mask))  # scaled in float32, not rounded to bf16/fp16
            else:  # scored where the layer runs: only the scores travel to self.device
                scores = summaries.attention_scores(query, key, scaling, softcap).to(self.device, non_blocking=True)
                self._attn.append((scores, mask if mask is None else mask.to(self.device, non_blocking=True)))
            return None
        # Prefill: blocks of query rows, each against only the keys it can see (attention in a
        # causal LM never looks ahead), so no (heads x P x P) matrix exists, not even for one layer.
        offset = key.shape[2] - q
        # float32 only: in bf16/fp16, SDPA's output and a float32 p @ V rounded differ visibly, and
        # capture must not change what the model computes
        own = value is not None and self.blocks.prefill_output and value.dtype == torch.float32
        out = query.new_empty(b, q, heads, value.shape[-1]) if own else None  # (b, q, h, dv)
        causal = mask is None and softcap is None  # the causal mask rides on the score product or the stats kernel
        biased = causal and not summaries.fused_kernels(query.device)
        parts = []  # (b, c, 6) per block of query rows
        first, prompt_keys = self._masses(key.shape[2])
        masses = (first.to(query.device), prompt_keys)
        for q0, q1 in _chunks(q, b * heads * key.shape[2], self.blocks.elements, self.blocks.rows):
            m = mask if mask is None or mask.shape[-2] == 1 else mask[..., q0:q1, :offset + q1]
            bias = self._causal_bias(heads // key.shape[1], q1 - q0, offset + q1, offset + q0, query.device) if biased else None
            # CPU: one reused buffer (fresh multi-MB blocks cost page faults); a GPU's allocator caches blocks itself
            reuse = query.device.type == "cpu" and bias is None
            buf = self._scores_buffer(b * heads * (q1 - q0) * (offset + q1)) if reuse else None
            scores = summaries.attention_scores(query[:, :, q0:q1], key[:, :, :offset + q1], scaling, softcap, bias, out=buf)
            stats, block_out = summaries.attention_stats(scores, m, offset + q0, value[:, :, :offset + q1] if own else None,
                                                         masked=biased, masses=masses)
            parts.append(stats)  # (b, c, 6)
            if own:
                out[:, q0:q1] = block_out.transpose(1, 2)  # (b, c, h, dv)
        self._attn.append(torch.cat(parts, dim=1).to(self.device, non_blocking=True))
        return out

    def attention_function(self, module):
        """The attention function the model would call without capture: its modeling file's
        eager attention, or the registered implementation (SDPA)."""
        if self.implementation != "eager":
            return ALL_ATTENTION_FUNCTIONS[self.implementation]
        eager = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
        if eager is None:
            raise NotImplementedError(f"{type(module).__name__} has no eager_attention_forward in its modeling file")
        return eager

    def _scores_buffer(self, elements: int) -> torch.Tensor:
        """One CPU block of attention scores (flat, >= elements), reused by every block and layer of the run."""
        if self._scores is None or self._scores.numel() < elements:
            self._scores = torch.empty(max(elements, self.blocks.elements))
        return self._scores

    def _causal_bias(self, groups: int, q: int, k: int, q_offset: int, device) -> torch.Tensor:
        """summaries.causal_bias, made once per block shape and forward pass (every layer has the same blocks)."""
        shape = (groups, q, k, q_offset, device)
        if shape not in self._biases:
            self._biases[shape] = summaries.causal_bias(*shape[:4], device=device)
        return self._biases[shape]

    def on_base_output(self, module, args, output):
        """Prefill: summarise the logits of every position but the last (the model keeps only that one)."""
        hidden = hidden_states(output)  # (b, q, hidden)
        if hidden.shape[1] < 2 or self.own_logits:
            return
        b = hidden.shape[0]
        rows = max(1, self.blocks.logit_rows // b)
        lm_head = self.model.get_output_embeddings()
        # an offloaded head (device_map) keeps its weight on the meta device: only calling it works
        plain = (type(lm_head) is torch.nn.Linear and lm_head.weight.dtype == torch.float32
                 and lm_head.weight.device == hidden.device)
        sliced = plain and self.blocks.vocab_slice is not None  # set only where the fused kernels run
        # Whole-vocabulary rows: one block reused for every chunk (fresh multi-MB blocks per
        # chunk fragment the CPU heap).
        v = lm_head.out_features
        buffer = None if sliced else torch.empty(b * min(rows, hidden.shape[1] - 1) * v, device=hidden.device)
        pieces = []
        ids = self._input_ids.to(hidden.device, non_blocking=True)  # (b, q)
        for q0, q1 in _chunks(hidden.shape[1] - 1, 1, rows, rows):
            h = hidden[:, q0:q1].reshape(-1, hidden.shape[-1])  # (b * c, H)
            nxt = ids[:, q0 + 1:q1 + 1].reshape(-1, 1)  # (b * c, 1): the prompt token each position scores
            if sliced:
                piece = summaries.linear_logits_summary(h, lm_head.weight, lm_head.bias, nxt, self.softcap,
                                                        self.blocks.vocab_slice)
            else:
                logits = self._logits(lm_head, h, buffer[:h.shape[0] * v].view(h.shape[0], v), plain)  # (b * c, V)
                piece = summaries.logits_summary(logits, nxt)
            pieces.append(summaries.LogitsSummary(*(t.reshape(b, q1 - q0, *t.shape[1:]) for t in piece)))  # (b, c, ...)
        self._keep_prefill(pieces)

    def _keep_prefill(self, pieces: list[summaries.LogitsSummary]) -> None:
        """A prompt pass's rows, from its chunks' logit summaries (b, c, ...): the columns, and
        the prompt tokens' log-probs and ranks, on self.device."""
        self._prefill = {k: torch.cat([getattr(p, f) for p in pieces], dim=1).to(self.device, non_blocking=True)
                         for k, f in (("logit_stats", "stats"), ("topk_probs", "top_p"), ("topk_ids", "top_ids"))}
        self.logprobs.append(torch.cat([p.picked[..., 0] for p in pieces], dim=1).to(self.device, non_blocking=True))
        self.ranks.append(torch.cat([p.rank for p in pieces], dim=1).to(self.device, non_blocking=True))

    def _logits(self, lm_head, hidden: torch.Tensor, out: torch.Tensor, plain: bool) -> torch.Tensor:
        """The model's raw logits (n, V) for `hidden` (n, H) (final-norm output), soft-capped if
        the model does, written to `out`."""
        if plain:
            torch.mm(hidden.float(), lm_head.weight.T, out=out)  # (n, V)
            if lm_head.bias is not None:
                out.add_(lm_head.bias)
        else:  # as the model makes them: in its dtype (through any accelerate hook), soft-capped there, then upcast
            logits = lm_head(hidden)
            return out.copy_(logits if not self.softcap else torch.tanh(logits / self.softcap) * self.softcap)
        if self.softcap:
            out.div_(self.softcap).tanh_().mul_(self.softcap)
        return out

    def on_forward_end(self, module, args, kwargs, output):
        # (b, V); generate copies it before processing, so it stays raw
        logits = output.logits[:, -1].to(self.device, non_blocking=True)
        last = summaries.logits_summary(logits)  # (b, ...)
        self._pending = (logits, last.log_norm)  # (b, V), (b,): scores the next token once it is drawn
        stats, top_p, top_ids = last.stats[:, None], last.top_p[:, None], last.top_ids[:, None]  # (b, 1, ...)
        col = {"logit_stats": stats, "topk_probs": top_p, "topk_ids": top_ids}
        if self.own_logits and output.logits.shape[1] > 1:
            self._own_prefill_logits(output.logits[:, :-1])
        if self._prefill is not None:
            col = {k: torch.cat([self._prefill[k], v], dim=1) for k, v in col.items()}
        col["hidden"] = self._hidden_column()  # (b, q, L, 12)
        col["attn"] = self._attn_column()  # (b, q, L, 3)
        if self.lens is not None:
            col["lens"] = self._lens_column(output.logits[:, -1], col["attn"].shape[1])  # (b, q, L, 3)
        self.columns.append(col)
        self._reset()

    def _own_prefill_logits(self, logits: torch.Tensor) -> None:
        """Prefill rows from the model's own logits (b, q - 1, V) (own_logits: kept for every
        position), summarised in chunks of positions."""
        b, n, _ = logits.shape
        rows = max(1, self.blocks.logit_rows // b)
        ids = self._input_ids.to(logits.device, non_blocking=True)  # (b, q)
        self._keep_prefill([summaries.logits_summary(logits[:, q0:q1], ids[:, q0 + 1:q1 + 1, None])
                            for q0, q1 in _chunks(n, 1, rows, rows)])

    def _lens_column(self, logits: torch.Tensor, q: int) -> torch.Tensor:
        """The logit lens of this pass (b, q, L, 3): the last position against the model's own
        logits (b, V); with "all", a prefill's other positions against the last layer's lens
        (lens.prefill_stats); NaN where the lens is off (a prefill's other positions, "generated")."""
        last = logit_lens.step_stats(self.lens, self._lens_last, logits.to(self.device, non_blocking=True))  # (b, 1, L, 3)
        if q == 1:
            return last
        rest = (logit_lens.prefill_stats(self.lens, self._lens_rest, self.device) if self._lens_rest
                else last.new_full((last.shape[0], q - 1, *last.shape[2:]), float("nan")))  # (b, q - 1, L, 3)
        return torch.cat([rest, last], dim=1)

    def _hidden_column(self) -> torch.Tensor:
        stacked = torch.stack(self._hidden, dim=2)  # (b, q, L, 13) summaries or (b, 1, L, hidden) stashed
        if self._hidden[0].shape[1] > 1:
            return stacked
        before = torch.cat([self._block0_in.to(stacked.device)[:, :, None], stacked[:, :, :-1]], dim=2)  # (b, 1, L, hidden)
        return summaries.hidden_summary(stacked, self.directions, before)

    def _attn_column(self) -> torch.Tensor:
        done = [isinstance(a, torch.Tensor) for a in self._attn]  # summaries (b, q, 6) made as the layer ran
        if all(done):
            return torch.stack(self._attn, dim=2)  # (b, q, L, 6)
        if any(done):  # decode, some layers summarised already (attention sinks): the rest one at a time
            return torch.stack([a if isinstance(a, torch.Tensor) else self._one_decode_layer(*a) for a in self._attn], dim=2)
        stashed, masks = zip(*self._attn)
        same_mask = all(m is masks[0] for m in masks)
        if all(isinstance(x, tuple) for x in stashed):  # (scaled query, key) per layer
            queries, keys = zip(*stashed)
            if same_mask and len({k.shape for k in keys}) == 1:
                return self._decode_stats(summaries.attention_scores(torch.stack(queries), torch.stack(keys), 1.0), masks[0])
        # scores per layer (layers whose keys were small enough to stash as (query, key) scored now)
        stashed = [summaries.attention_scores(*x, 1.0) if isinstance(x, tuple) else x for x in stashed]
        if same_mask and len({s.shape for s in stashed}) == 1:
            return self._decode_stats(torch.stack(stashed), masks[0])
        # layers differ (e.g. sliding-window and full-attention layers): one layer at a time
        return torch.stack([self._one_decode_layer(s, m) for s, m in zip(stashed, masks)], dim=2)

    def _one_decode_layer(self, stashed, mask) -> torch.Tensor:
        """One layer's stashed decode scores, or (scaled query, key) -> (b, 1, 6)."""
        scores = summaries.attention_scores(*stashed, 1.0) if isinstance(stashed, tuple) else stashed
        return summaries.attention_stats(scores, mask, scores.shape[-1] - 1, masses=self._masses(scores.shape[-1]))[0]

    def _decode_stats(self, scores: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """All layers' decode scores (L, b, h, 1, k) -> (b, 1, L, 6)."""
        masses = self._masses(scores.shape[-1], lead=1)
        return summaries.attention_stats(scores, mask, scores.shape[-1] - 1, masses=masses)[0].permute(1, 2, 0, 3)

    def __call__(self, input_ids, scores, **kwargs):
        """Stopping criterion that never stops: it only scores the token just appended."""
        logits, log_norm = self._pending
        raw = logits.gather(-1, input_ids[:, -1:])  # (b, 1)
        self.ranks.append((logits > raw).sum(-1, keepdim=True) + 1)  # (b, 1)
        picked = raw.float().clamp_min_(summaries.NEG)  # (b, 1); -inf -> finite
        self.logprobs.append(picked - log_norm[:, None])
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)

    def result(self) -> dict[str, np.ndarray]:
        """Every column of the run as host arrays: (b, C, ...) with C = padded prompt + generated - 1."""
        out = {k: torch.cat([c[k] for c in self.columns], dim=1) for k in self.columns[0]}
        out["token_logprob"] = torch.cat(self.logprobs, dim=1)
        out["token_rank"] = torch.cat(self.ranks, dim=1)
        return {k: v.cpu().numpy() for k, v in out.items()}


@contextlib.contextmanager
def recording(model, lens: str | None = None):
    """Attach a Recorder's hooks to `model` for the duration of the block; `lens`: metrics.logit_lens
    (None: off, "generated", "all")."""
    global _ACTIVE
    rec = Recorder(model, lens)
    handles = [
        model.register_forward_pre_hook(rec.on_forward_start, with_kwargs=True),
        model.register_forward_hook(rec.on_forward_end, with_kwargs=True),
        model.base_model.register_forward_hook(rec.on_base_output),
        *(layer.register_forward_hook(rec.on_block, with_kwargs=True) for layer in decoder_layers(model)),
    ]
    previous = model.config._attn_implementation  # what rec.implementation already holds
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
    token_rank: np.ndarray  # (T,) int64, -1 on row 0
    attn_sink_mass: np.ndarray  # (T, L) mean over heads of the weight on key 0
    attn_prev_mass: np.ndarray  # (T, L) ... on key q - 1 (NaN on rows 0 and 1)
    attn_prompt_mass: np.ndarray  # (T, L) ... summed over prompt keys
    hidden_cos_prev: np.ndarray  # (T, L) cosine of block l's output with block l's input
    elapsed_ms: int
    # (T, L, 3) logit lens: entropy, top-1 match (1.0 / 0.0), KL; NaN where the lens is off; None: off for the whole trace
    lens: np.ndarray | None = None

    @property
    def generated_len(self) -> int:
        return len(self.token_ids) - self.prompt_len


def generation_kwargs(sampling, tokenizer, num_samples: int = 1) -> dict:
    """`generate`'s keyword arguments for the sampling config; `num_samples` continuations per
    prompt (num_return_sequences: the batch's rows become prompt 0's samples, then prompt 1's, ...)."""
    kw = dict(max_new_tokens=int(sampling.max_new_tokens), do_sample=bool(sampling.do_sample), pad_token_id=tokenizer.pad_token_id,
              num_return_sequences=int(num_samples), logits_processor=LogitsProcessorList([FiniteScores()]))
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


def prompt_token_ids(tokenizer, prompts: list[str], chat_template: bool = False,
                     system_prompt: str | None = None) -> list[list[int]]:
    """Each prompt's token ids as `generate` gets them: the tokenizer's own encoding, or with
    `chat_template` exactly the ids of `apply_chat_template(messages, add_generation_prompt=True)`
    for one user message (after a system message when `system_prompt` is set). The ids come
    from that call itself: tokenizing its rendered text again would add a second BOS."""
    if not chat_template:
        return tokenizer(prompts)["input_ids"]
    system = [] if system_prompt is None else [{"role": "system", "content": system_prompt}]
    return [list(tokenizer.apply_chat_template([*system, {"role": "user", "content": p}], add_generation_prompt=True,
                                               tokenize=True, return_dict=False)) for p in prompts]


def generate_with_capture(model, tokenizer, prompts: list[str], sampling, seed: int, on_step=None,
                          stop=None, chat_template: bool = False, system_prompt: str | None = None,
                          num_samples: int = 1, lens: str | None = None) -> list[SequenceCapture]:
    """Generate for a batch of prompts (left-padded) and return each continuation's capture, by
    prompt then sample: `num_samples` per prompt, all from this one `generate` call.
    `chat_template`, `system_prompt`: how prompts become tokens (prompt_token_ids).
    `lens`: metrics.logit_lens (None: off, "generated", "all"; lens.resolve must accept the model).
    `on_step`, if given, is called after each generated token; `stop`, if given, ends the
    generation early once it returns True (the caller discards that batch)."""
    from transformers import set_seed

    if len(prompts) > 1 and "position_ids" not in inspect.signature(model.forward).parameters:
        # Such a model counts positions from the first column, padding included: a left-padded
        # prompt would be computed at other positions than alone. One prompt per call instead.
        return [c for p in prompts for c in generate_with_capture(model, tokenizer, [p], sampling, seed, on_step, stop,
                                                                chat_template, system_prompt, num_samples, lens)]
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    ids = prompt_token_ids(tokenizer, prompts, chat_template, system_prompt)
    enc = tokenizer.pad({"input_ids": ids}, padding=True, return_tensors="pt").to(execution_device(model))
    set_seed(seed)
    start = time.perf_counter()
    with torch.inference_mode(), recording(model, lens) as rec:
        criteria = [rec] if on_step is None and stop is None else [rec, _OnStep(on_step, stop)]
        keep = {"logits_to_keep": 0} if rec.own_logits and model._supports_logits_to_keep() else {}  # every position's logits
        out = model.generate(**enc, stopping_criteria=criteria, **generation_kwargs(sampling, tokenizer, num_samples), **keep)
        cols = rec.result()
    elapsed_ms = int(round((time.perf_counter() - start) * 1000))
    eos = _eos_ids(model, tokenizer)
    mask = enc["attention_mask"].cpu().numpy().astype(bool)
    sequences = out.cpu().numpy()  # (prompts * num_samples, ...): row i is prompt i // num_samples
    return [_one_sequence(cols, i, mask[i // num_samples], sequences[i], eos, elapsed_ms) for i in range(len(sequences))]


def _eos_ids(model, tokenizer) -> set[int]:
    """The tokens that end a sequence: the ones `generate` stops on."""
    eos = model.generation_config.eos_token_id
    return {int(e) for e in (eos if isinstance(eos, list) else [eos]) if e is not None}


def _one_sequence(cols: dict[str, np.ndarray], i: int, mask: np.ndarray, seq: np.ndarray, eos: set[int], elapsed_ms: int) -> SequenceCapture:
    pad = int((~mask).sum())  # left padding of this sequence
    width = mask.shape[0]  # padded prompt length
    generated = seq[width:]
    ends = [j for j, t in enumerate(generated) if int(t) in eos]
    g = ends[0] + 1 if ends else len(generated)
    tokens = np.concatenate([seq[pad:width], generated[:g]]).astype(np.int64)
    rows = slice(pad, pad + len(tokens) - 1)  # column of row t is pad + t - 1, for t >= 1

    def take(name: str, dtype=np.float32) -> np.ndarray:
        body = cols[name][i, rows].astype(dtype)
        if dtype == np.float32:  # a summary of an overflowed (Inf) tensor is NaN like the rest of it
            body[np.isinf(body)] = np.nan
        first = np.full((1, *body.shape[1:]), np.nan if dtype == np.float32 else -1, dtype=dtype)
        return np.concatenate([first, body])

    hidden, attn = take("hidden"), take("attn")
    prev = attn[..., 4]
    prev[:2] = np.nan  # row 1's query is the first token: no key before it
    return SequenceCapture(
        prompt_len=width - pad, token_ids=tokens, logit_stats=take("logit_stats"),
        token_logprob=take("token_logprob"), topk_ids=take("topk_ids", np.int64), topk_probs=take("topk_probs"),
        hidden=hidden[..., :4], sketch=hidden[..., 4:12], attn=attn[..., :3], elapsed_ms=elapsed_ms,
        token_rank=take("token_rank", np.int64), attn_sink_mass=attn[..., 3], attn_prev_mass=prev,
        attn_prompt_mass=attn[..., 5], hidden_cos_prev=hidden[..., 12], lens=take("lens") if "lens" in cols else None,
    )
