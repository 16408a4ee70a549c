"""Attention: every layer's attention function runs through capture, which summarises its
weights (entropies, concentration, sink / previous / prompt masses: the `attention` reducer
of metrics.py) beside the model's own implementation, which computes the output unchanged:
capture reads the query, the keys and the mask, and never makes or alters the output, so the
model's tokens and logits are bit-identical with and without it.

    prefill (q > 1)  blocks of query rows against only the keys each can see (no heads x P x P
                     matrix exists), summarised at once by the fused kernel
    decode  (q = 1)  each layer's query and keys are stashed and, when the pass ends, all
                     layers are summarised together (`column`): by one kernel call that reads
                     them in place (fused.attention_decode) or by one stacked product
"""

from __future__ import annotations

import sys
from contextlib import contextmanager
from contextvars import ContextVar

import torch
from transformers import AttentionInterface
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from corevital.capture.passes import Blocks, Geometry, chunks
from corevital.kernels import fused, summaries

ATTN_IMPLEMENTATION = "corevital"
STACK_KEYS_BELOW = 1 << 16  # decode: keys this small are stacked over layers on the CPU too (one product per step)
# The attention capture of the `generate` call running in this thread or task, set only by `active`
# (recorder.recording): transformers calls a registered attention function with the module and its
# tensors only, so the capture it feeds is found here, in one explicit context, not on the model.
_ACTIVE: ContextVar["AttentionCapture | None"] = ContextVar("corevital_attention_capture", default=None)


def _attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """The model's own attention function for the output; the active capture summarises the
    weights beside it.

    The output comes from the attention implementation the model was loaded with (SDPA, or
    its modeling file's eager attention), called with exactly the arguments the model gave,
    so capture never changes what the model computes.
    """
    cap = _ACTIVE.get()
    cap.on_attention(query, key, attention_mask, scaling, kwargs.get("softcap"), kwargs.get("s_aux"))
    return cap.attention_function(module)(
        module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
    )


def _mask(*args, **kwargs):
    """The attention mask of the implementation the model was loaded with (boolean for SDPA,
    additive for eager)."""
    cap = _ACTIVE.get()
    return ALL_MASK_ATTENTION_FUNCTIONS[cap.implementation if cap else "sdpa"](*args, **kwargs)


@contextmanager
def active(model, capture: "AttentionCapture"):
    """Route `model`'s attention through `capture` for the duration of the block: registers
    CoreVital's attention and mask functions with transformers (under ATTN_IMPLEMENTATION; only
    a model inside this block is pointed at them), points the model's config at them,
    and puts back the model's own implementation and the previous capture on the way out."""
    AttentionInterface.register(ATTN_IMPLEMENTATION, _attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(ATTN_IMPLEMENTATION, _mask)
    previous = model.config._attn_implementation  # what capture.implementation already holds
    model.config._attn_implementation = ATTN_IMPLEMENTATION
    token = _ACTIVE.set(capture)
    try:
        yield capture
    finally:
        _ACTIVE.reset(token)
        model.config._attn_implementation = previous


class AttentionCapture:
    """One forward pass's attention summaries, layer by layer: (b, q, w) summaries made as a
    prefill's layers run, or a decode step's stashed scores (or scaled query and keys) summarised
    for all layers by `column` when the pass ends. w = 6, or 6 + 5 x heads with `per_head`: the
    recorder splits them into the `attention` and `heads` reducers' outputs."""

    def __init__(
        self, device: torch.device, blocks: Blocks, implementation: str, geometry: Geometry, per_head: bool = False
    ):
        self.device, self.blocks, self.geometry = device, blocks, geometry
        self.per_head = per_head  # metrics.per_head: each head's values after the 6 statistics (summaries.HEAD_FIELDS)
        self.implementation = implementation  # the model's own attention, read before recording swaps it
        self._scores: torch.Tensor | None = None  # one reused CPU block of scores (_scores_buffer)
        self.reset()

    def reset(self) -> None:
        # per layer: (b, q, 6) summary, or stashed (scores (b, h, 1, k) | (query, key, scaling), mask)
        self.layers: list = []
        self._biases: dict[tuple, torch.Tensor] = {}  # causal_bias per block shape
        self._in_place = True  # decode: every layer stashed as fused.attention_decode reads it

    def on_attention(self, query, key, mask, scaling, softcap, sinks=None) -> None:
        """Summarise one layer's attention weights (query (b, h, q, d), key (b, kv, k, d)).
        `sinks` (heads,): per-head sink logits (gpt-oss) that take part in the softmax."""
        scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
        q = query.shape[2]
        if sinks is not None:  # rare: summarised at once, by torch ops, whatever the pass
            stats = summaries.sink_attention_summary(
                summaries.attention_scores(query, key, scaling, softcap),
                mask,
                key.shape[2] - q,
                sinks,
                self.geometry.masses(key.shape[2]),
                self.per_head,
            )
            self.layers.append(stats.to(self.device, non_blocking=True))  # (b, q, w)
        elif q == 1:
            self._stash(query, key, mask, scaling, softcap)
        else:
            self._prefill(query, key, mask, scaling, softcap)

    def _stash(self, query, key, mask, scaling, softcap) -> None:
        """Decode: keep this layer's scores (b, h, 1, k), or its query, key and scaling; stats at the end."""
        in_place = (
            self.blocks.decode_in_place
            and query.dtype == key.dtype == torch.float32
            and query.is_contiguous()
            and key.is_contiguous()
        )  # as fused.attention_decode reads them
        self._in_place = self._in_place and in_place
        if (
            softcap is None
            and key.device == self.device
            and (in_place or self.blocks.stack_keys or key.numel() <= STACK_KEYS_BELOW)
        ):
            self.layers.append(((query, key, scaling), mask))
        else:  # scored where the layer runs: only the scores travel to self.device
            scores = summaries.attention_scores(query, key, scaling, softcap).to(self.device, non_blocking=True)
            self.layers.append((scores, mask if mask is None else mask.to(self.device, non_blocking=True)))

    def _prefill(self, query, key, mask, scaling, softcap) -> None:
        """Blocks of query rows, each against only the keys it can see (attention in a causal LM
        never looks ahead), so no (heads x P x P) matrix exists, not even for one layer."""
        b, heads, q, _ = query.shape
        offset = key.shape[2] - q
        causal = mask is None and softcap is None  # the causal mask rides on the score product or the stats kernel
        biased = causal and not summaries.fused_kernels(query.device)
        parts = []  # (b, c, 6) per block of query rows
        first, prompt_keys = self.geometry.masses(key.shape[2])
        masses = (first.to(query.device), prompt_keys)
        for q0, q1 in chunks(q, b * heads * key.shape[2], self.blocks.elements, self.blocks.rows):
            m = mask if mask is None or mask.shape[-2] == 1 else mask[..., q0:q1, : offset + q1]
            bias = (
                self._causal_bias(heads // key.shape[1], q1 - q0, offset + q1, offset + q0, query.device)
                if biased
                else None
            )
            # CPU: one reused buffer (fresh multi-MB blocks cost page faults); a GPU's allocator caches blocks itself
            reuse = query.device.type == "cpu" and bias is None
            buf = self._scores_buffer(b * heads * (q1 - q0) * (offset + q1)) if reuse else None
            scores = summaries.attention_scores(
                query[:, :, q0:q1], key[:, :, : offset + q1], scaling, softcap, bias, out=buf
            )
            parts.append(
                summaries.attention_stats(scores, m, offset + q0, masked=biased, masses=masses, per_head=self.per_head)
            )  # (b, c, w)
        self.layers.append(torch.cat(parts, dim=1).to(self.device, non_blocking=True))

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

    # --- the pass's column ---------------------------------------------------------------
    def column(self) -> torch.Tensor:
        """Every layer's summaries of this pass: (b, q, L, w)."""
        done = [isinstance(a, torch.Tensor) for a in self.layers]  # summaries (b, q, 6) made as the layer ran
        if all(done):
            return torch.stack(self.layers, dim=2)  # (b, q, L, w)
        if any(done):  # decode, some layers summarised already (attention sinks): the rest one at a time
            return torch.stack(
                [a if isinstance(a, torch.Tensor) else self._one_decode_layer(*a) for a in self.layers], dim=2
            )
        stashed, masks = zip(*self.layers)
        same_mask = all(m is masks[0] for m in masks)
        if all(isinstance(x, tuple) for x in stashed):  # (query, key, scaling) per layer
            queries, keys, scales = zip(*stashed)
            if same_mask and len({k.shape for k in keys}) == 1:
                if (
                    self._in_place
                    and len({q.shape for q in queries}) == 1
                    and fused.decode_mask(masks[0], *keys[0].shape[::2])
                ):
                    # read in place by one kernel call: (b, 1, L, w)
                    return fused.attention_decode(
                        queries, keys, scales, masks[0], *self.geometry.masses(keys[0].shape[2]), self.per_head
                    )
                scaled = torch.stack(queries).float() * torch.tensor(scales).view(-1, 1, 1, 1, 1)  # (L, b, h, 1, d)
                return self._decode_stats(summaries.attention_scores(scaled, torch.stack(keys), 1.0), masks[0])
        # scores per layer (layers whose keys were small enough to stash as (query, key) scored now)
        stashed = [summaries.attention_scores(*x) if isinstance(x, tuple) else x for x in stashed]
        if same_mask and len({s.shape for s in stashed}) == 1:
            return self._decode_stats(torch.stack(stashed), masks[0])
        # layers differ (e.g. sliding-window and full-attention layers): one layer at a time
        return torch.stack([self._one_decode_layer(s, m) for s, m in zip(stashed, masks)], dim=2)

    def _one_decode_layer(self, stashed, mask) -> torch.Tensor:
        """One layer's stashed decode scores, or (query, key, scaling) -> (b, 1, w)."""
        scores = summaries.attention_scores(*stashed) if isinstance(stashed, tuple) else stashed
        return summaries.attention_stats(
            scores, mask, scores.shape[-1] - 1, masses=self.geometry.masses(scores.shape[-1]), per_head=self.per_head
        )

    def _decode_stats(self, scores: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """All layers' decode scores (L, b, h, 1, k) -> (b, 1, L, w)."""
        masses = self.geometry.masses(scores.shape[-1], lead=1)
        stats = summaries.attention_stats(scores, mask, scores.shape[-1] - 1, masses=masses, per_head=self.per_head)
        return stats.permute(1, 2, 0, 3)
