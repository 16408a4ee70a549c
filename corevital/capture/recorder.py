"""The recorder: hooks on one model for one `generate` call, routing each forward pass's
tensors to the part of capture that summarises them, and keeping what they make.

    top-level forward pre-hook  -> Geometry: where the pass sits, its input ids
    decoder block l output      -> hidden.py (HiddenCapture.on_block)
    attention function          -> attention.py (AttentionCapture.on_attention)
    base model output           -> logits.py (prefill positions' logits)
    top-level forward output    -> logits.py (last position), then one column of every
                                   reducer's output for this pass
    stopping criterion          -> logits.py: the drawn token's log-prob and rank

Summaries stay on the model's device until `result()`, which moves them to the host once per
`generate` call: no host sync per step. Summaries made on another device (a device_map over
several accelerators) are sent there as they are made, non-blocking.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import numpy as np
import torch
from transformers import StoppingCriteria

from corevital.capture import attention
from corevital.capture.attention import AttentionCapture
from corevital.capture.hidden import HiddenCapture
from corevital.capture.logits import LogitsCapture, lens_column
from corevital.capture.passes import Blocks, Geometry
from corevital.core import metrics
from corevital.kernels import summaries
from corevital.model import lens as logit_lens
from corevital.model.introspect import decoder_layers, execution_device, head_is_plain, probe_ids


@dataclass(frozen=True)
class ModelFacts:
    """What capture needs to know about a loaded model beyond its config, found by probes of a few
    tokens: whether its logits are its head on its last hidden state (else prompt rows come from
    its own logits), and its verified logit lens (None: off). Probed once per loaded model by
    whoever holds it (a job, `corevital.record`) and handed to every `generate` call; nothing is
    stored on the model."""

    plain_head: bool
    lens: logit_lens.Lens | None = None

    @classmethod
    def probe(cls, model, lens: str | None = None) -> "ModelFacts":
        """`lens`: metrics.logit_lens (None: off, "generated", "all")."""
        return cls(head_is_plain(model), logit_lens.resolve(model) if lens else None)


class Recorder(StoppingCriteria):
    """Summaries of one `generate` call (see the module docstring). `lens`: metrics.logit_lens
    (None: off, "generated", "all"); `extras`: the user metrics (metrics.UserMetric); `facts`:
    the model's ModelFacts (probed here when not given)."""

    def __init__(self, model, lens: str | None = None, extras=(), facts: ModelFacts | None = None):
        super().__init__()
        facts = ModelFacts.probe(model, lens) if facts is None else facts
        if lens and facts.lens is None:
            raise ValueError("metrics.logit_lens is on but the ModelFacts given were probed without it")
        self.device = execution_device(model)
        self.blocks = Blocks.for_device(self.device)
        self.geometry = Geometry()
        self.columns: list[dict[str, torch.Tensor]] = []  # one entry per forward pass
        self.lens = facts.lens if lens else None  # the model's verified final norm and head
        self.per_head = metrics.per_head(extras)  # metrics.per_head: the `heads` reducer too
        self.attention = AttentionCapture(
            self.device, self.blocks, model.config._attn_implementation, self.geometry, self.per_head
        )
        users = [e for e in extras if isinstance(e, metrics.UserMetric)]  # reducers over block outputs
        self.hidden = HiddenCapture(self.device, model.config.get_text_config().hidden_size, lens, users)
        self.logits = LogitsCapture(model, self.device, self.blocks, self.geometry, facts.plain_head)

    @property
    def own_logits(self) -> bool:
        """Whether the prompt rows come from the model's own logits, kept for every position."""
        return self.logits.own_logits

    def on_forward_start(self, module, args, kwargs):
        g = self.geometry
        g.input_ids = kwargs.get("input_ids", args[0] if args else None)  # (b, q)
        mask = kwargs.get("attention_mask")  # (b, columns so far), 0 on left padding
        if not self.columns:  # the prompt pass: where each row's tokens start, how wide the prompt is
            g.prompt_width = g.input_ids.shape[1]
            g.first_key = (
                torch.zeros(g.input_ids.shape[0], dtype=torch.long, device=self.device)
                if mask is None
                else (mask.shape[1] - mask.long().sum(-1)).to(self.device)
            )
        g.total = mask.shape[1] if mask is not None and mask.dim() == 2 else g.prompt_width + len(self.columns)
        for part in (self.attention, self.hidden, self.logits):
            part.reset()

    def on_forward_end(self, module, args, kwargs, output):
        col = self.logits.on_forward_end(output)  # logits (b, q, 3), topk_probs, topk_ids (b, q, 5)
        col["hidden"] = self.hidden.column()  # (b, q, L, 13)
        attention = self.attention.column()  # (b, q, L, 6), or (b, q, L, 6 + 5 x heads) per head
        col["attention"] = attention[..., :6]
        if self.per_head:
            col["heads"] = attention[..., 6:]  # (b, q, L, 5 x heads), field-major (summaries.per_head_columns)
        col.update(self.hidden.extra_columns())  # (b, q, L, k) per user metric
        if self.lens is not None:
            col["lens"] = lens_column(
                self.lens,
                self.hidden.lens_last,
                self.hidden.lens_rest,
                output.logits[:, -1],
                col["attention"].shape[1],
                self.device,
            )  # (b, q, L, 3)
        self.columns.append(col)
        for part in (self.attention, self.hidden, self.logits):
            part.reset()

    def __call__(self, input_ids, scores, **kwargs):
        """Stopping criterion that never stops: it only scores the token just appended."""
        self.logits.score(input_ids)
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)

    def result(self) -> dict[str, np.ndarray]:
        """Every reducer's output over the run as host arrays: (b, C, ...) with C = padded prompt
        + generated - 1."""
        out = {k: torch.cat([c[k] for c in self.columns], dim=1) for k in self.columns[0]}
        out["token_logprob"] = torch.cat(self.logits.logprobs, dim=1)
        out["token_rank"] = torch.cat(self.logits.ranks, dim=1)
        return {k: v.cpu().numpy() for k, v in out.items()}


@contextlib.contextmanager
def recording(model, lens: str | None = None, extras=(), facts: ModelFacts | None = None):
    """Attach a Recorder's hooks to `model` for the duration of the block; `lens`: metrics.logit_lens
    (None: off, "generated", "all"); `extras`: user metrics; `facts`: the model's ModelFacts."""
    rec = Recorder(model, lens, extras, facts)
    handles = [
        model.register_forward_pre_hook(rec.on_forward_start, with_kwargs=True),
        model.register_forward_hook(rec.on_forward_end, with_kwargs=True),
        model.base_model.register_forward_hook(rec.logits.on_base_output),
        *(layer.register_forward_hook(rec.hidden.on_block, with_kwargs=True) for layer in decoder_layers(model)),
    ]
    try:
        with attention.active(model, rec.attention):
            yield rec
    finally:
        for h in handles:
            h.remove()


def query_heads(model) -> int:
    """The number of query heads in each layer's attention, as capture sees them: one forward pass
    over the probe tokens with per-head values on (each head's 5 values follow the 6 statistics).
    ValueError with one sentence where the layers' head counts differ, which the per-head columns
    (one width for every layer) cannot hold."""
    try:
        with torch.inference_mode(), recording(model, extras=(metrics.PerHead(1),)) as rec:
            model(input_ids=probe_ids(model), attention_mask=torch.ones_like(probe_ids(model)))
    except RuntimeError as e:  # torch.stack of layers of different widths
        raise ValueError(f"metrics.per_head needs the same number of query heads in every layer ({e})") from None
    return int(rec.columns[0]["heads"].shape[-1]) // len(summaries.HEAD_FIELDS)
