"""Hidden states: each transformer block's output, summarised as the block returns it (the
`hidden` reducer of metrics.py: mean, std, norm, max |x|, sketch, cosine with the block's
input), plus the user metrics of `metrics.extra` over it and, with the logit lens on, the block
outputs the lens reads when the pass ends.

    prefill (q > 1)  summarised at once, layer by layer: (b, q, 13) per layer
    decode  (q = 1)  each block's output is stashed (b, 1, hidden), and all layers are
                     summarised in one call when the pass ends (`column`): on the CPU one
                     kernel call that reads them in place (fused.hidden_summary)
"""

from __future__ import annotations

import torch

from corevital.kernels import fused, summaries
from corevital.model.introspect import hidden_states


class HiddenCapture:
    """One forward pass's block outputs, layer by layer (see the module docstring).

    `lens`: metrics.logit_lens (None, "generated" or "all"): which block outputs to keep for the
    lens. `extras`: the user metrics (metrics.UserMetric), each called on every block it reads.
    """

    def __init__(self, device: torch.device, hidden_size: int, lens: str | None = None, extras=()):
        self.device, self.lens, self.extras = device, lens, tuple(extras)
        self.directions = summaries.sketch_directions(hidden_size).to(device)  # (hidden, 8)
        self.reset()

    def reset(self) -> None:
        self.layers: list[torch.Tensor] = []  # per layer: (b, q, 13) summary, or (b, 1, hidden) stashed
        self._block_out: torch.Tensor | None = None  # the last block's output: the next block's cos_prev reference
        self._block0_in: torch.Tensor | None = None  # decode: block 0's input (b, 1, hidden)
        self._in_place = True  # decode: every block's output as fused.hidden_summary reads it
        self.lens_last: list[
            torch.Tensor
        ] = []  # lens on: per layer, the block output at the pass's last position (b, 1, H)
        self.lens_rest: list[
            torch.Tensor
        ] = []  # lens "all", prefill: per layer, the other positions' outputs (b, q - 1, H)
        self._extra: list[list[torch.Tensor | None]] = [
            [] for _ in self.extras
        ]  # per user metric, per layer: (b, q, k)

    def on_block(self, module, args, kwargs, output) -> None:
        h = hidden_states(output)  # (b, q, hidden)
        layer = len(self.layers)
        before = self._block_out if layer else (args[0] if args else kwargs.get("hidden_states"))
        if before is None or before.shape != h.shape:  # the block's input is not where blocks keep it
            before = torch.full_like(h, float("nan"))
        self._block_out = h
        if h.shape[1] == 1:  # decode: stashed; block l > 0's reference is block l-1's stashed output
            self._block0_in = before if not layer else self._block0_in
            self._in_place = (
                self._in_place and fused.usable(h) and (layer > 0 or fused.usable(before))
            )  # one shape: before's
            x = h
        else:
            x = summaries.hidden_summary(h, self.directions.to(h.device, non_blocking=True), before)  # (b, q, 13)
        self.layers.append(x.to(self.device, non_blocking=True))
        for e, kept in zip(self.extras, self._extra):
            kept.append(e.reduce(h, layer).float().to(self.device, non_blocking=True) if e.reads(layer) else None)
        if self.lens is not None:  # kept until the pass ends, when the model's own logits are known
            self.lens_last.append(h[:, -1:].clone() if h.shape[1] > 1 else h)  # a prefill's slice: not its whole output
            if self.lens == "all" and h.shape[1] > 1:
                self.lens_rest.append(h[:, :-1])

    def column(self) -> torch.Tensor:
        """Every layer's summaries of this pass: (b, q, L, 13)."""
        if self.layers[0].shape[1] > 1:
            return torch.stack(self.layers, dim=2)  # (b, q, L, 13) summaries
        if self._in_place and self.directions.device.type == "cpu":  # read in place: block 0's input, then each output
            states = [self._block0_in, *self.layers]  # (b, 1, hidden) each
            return fused.hidden_summary(states, self.directions).view(self._block0_in.shape[0], 1, len(self.layers), 13)
        stacked = torch.stack(self.layers, dim=2)  # (b, 1, L, hidden) stashed
        before = torch.cat(
            [self._block0_in.to(stacked.device)[:, :, None], stacked[:, :, :-1]], dim=2
        )  # (b, 1, L, hidden)
        return summaries.hidden_summary(stacked, self.directions, before)

    def extra_columns(self) -> dict[str, torch.Tensor]:
        """Each user metric's values of this pass: name -> (b, q, L, k), NaN on the layers it does not read."""
        out = {}
        for e, kept in zip(self.extras, self._extra):
            some = next(v for v in kept if v is not None)  # (b, q, k)
            out[e.name] = torch.stack(
                [v if v is not None else torch.full_like(some, float("nan")) for v in kept], dim=2
            )
        return out
