"""How a forward pass is laid out: `Blocks`, how its work is cut up on each kind of device, and
`Geometry`, where the pass sits in the (left-padded) sequence. Column c of every forward's
output is query position c of the padded sequence."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from corevital.kernels import summaries


@dataclass(frozen=True)
class Blocks:
    """How prefill work is cut up, and how decode attention is batched, per kind of device.

    On the CPU, small attention blocks keep the heap compact and skip more of the causal
    triangle; on a GPU, kernel launches cost more than arithmetic, so attention blocks are
    large (64 MiB) and decode steps stack all layers' keys for one batched score product
    instead of one product per layer (on the CPU too while a layer's keys are small,
    attention.STACK_KEYS_BELOW elements: then the per-layer ops cost more than the copy).
    Prefill logits: with the fused CPU kernels, 2,048 positions at a time, made and
    summarised 512 vocabulary ids at a time (4 MiB per slice, summarised while in cache:
    summaries.linear_logits_summary); otherwise whole-vocabulary rows, 512 positions per
    block on the CPU (96 MiB for a 49k vocabulary), 128 on a GPU, where larger blocks would
    add to peak memory and save next to nothing.
    """

    elements: int  # float32 elements per block of attention scores
    rows: int  # query rows per attention block
    logit_rows: int  # batch x positions per block of prefill logits
    stack_keys: bool  # decode: stack layers' query/key (True) or score each layer as it runs
    vocab_slice: int | None  # prefill logits made this many vocabulary ids at a time (fused kernel), None: whole rows
    decode_in_place: bool = (
        False  # decode: float32 layers summarised in place by one kernel call (fused.attention_decode)
    )

    @staticmethod
    def for_device(device: torch.device) -> "Blocks":
        if device.type == "cuda":
            return Blocks(elements=1 << 24, rows=2048, logit_rows=128, stack_keys=True, vocab_slice=None)
        if summaries.fused_kernels(device):
            return Blocks(
                elements=1 << 20, rows=128, logit_rows=2048, stack_keys=False, vocab_slice=512, decode_in_place=True
            )
        return Blocks(elements=1 << 20, rows=128, logit_rows=512, stack_keys=False, vocab_slice=None)


def chunks(rows: int, row_elements: int, max_elements: int, max_rows: int):
    """Row ranges of at most max_elements elements and max_rows rows (at least one row each)."""
    step = max(1, min(max_elements // max(1, row_elements), max_rows))
    for r0 in range(0, rows, step):
        yield r0, min(r0 + step, rows)


@dataclass
class Geometry:
    """Where the current forward pass sits in the sequence (set by the recorder as each pass starts)."""

    first_key: torch.Tensor | None = None  # (b,) column of each row's first real token
    prompt_width: int = 0  # the padded prompt's columns
    total: int = 0  # columns of the sequence in this pass (keys of a full cache)
    input_ids: torch.Tensor | None = None  # (b, q) this pass's tokens

    def masses(self, keys: int, lead: int = 0) -> tuple[torch.Tensor, int]:
        """summaries.attention_stats' masses for a layer whose cache holds the last `keys` columns:
        (first real key's column (b, 1, 1, 1), -1 once out of the cache; prompt key columns).
        `lead`: extra leading dims before the batch (stacked layers)."""
        dropped = self.total - keys  # columns no longer in this layer's cache (sliding window)
        first = self.first_key - dropped
        first = torch.where(first >= 0, first, -1).view(*([1] * lead), -1, 1, 1, 1)
        return first, self.prompt_width - dropped
