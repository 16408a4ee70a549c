"""Logits: the next-token distribution at every position (the `logits` reducer of metrics.py:
entropy, top-1 p, margin, and the top 5), and the drawn token's log-prob and rank
(`token_logprob`, `token_rank`), scored by a stopping criterion that never stops.

    base model output   prefill: every position but the last, made from the base model's
                        output in chunks (CPU: 512 vocabulary ids at a time, summarised by a
                        fused kernel); or from the model's own logits when its head is not
                        plain (model.head_is_plain: they are kept for every position)
    top-level output    the model's own raw logits for the last position
    stopping criterion  sees the token just drawn: its log-prob and rank under those logits
    logit lens          (metrics.logit_lens) block outputs kept by hidden.py, read through the
                        final norm and head against the model's own logits (corevital/model/lens.py)
"""

from __future__ import annotations

import torch

from corevital.capture.passes import Blocks, Geometry, chunks
from corevital.kernels import summaries
from corevital.model import lens as logit_lens
from corevital.model.introspect import hidden_states


class LogitsCapture:
    """The logit summaries of a `generate` call: one column per forward pass, and the drawn
    tokens' log-probs and ranks, on `device`."""

    def __init__(self, model, device: torch.device, blocks: Blocks, geometry: Geometry, plain_head: bool):
        self.model, self.device, self.blocks, self.geometry = model, device, blocks, geometry
        self.softcap = getattr(model.config.get_text_config(), "final_logit_softcapping", None)
        self.own_logits = not plain_head  # prefill rows from the model's own logits (all positions kept)
        self.logprobs: list[torch.Tensor] = []  # (b, n) pieces, in column order
        self.ranks: list[torch.Tensor] = []  # (b, n) token_rank pieces, as logprobs
        self._pending: tuple[torch.Tensor, torch.Tensor] | None = None  # the last logits (b, V) and their log-norm (b,)
        self._prefill: dict[str, torch.Tensor] | None = None

    def reset(self) -> None:
        self._prefill = None

    def on_base_output(self, module, args, output) -> None:
        """Prefill: summarise the logits of every position but the last (the model keeps only that one)."""
        hidden = hidden_states(output)  # (b, q, hidden)
        if hidden.shape[1] < 2 or self.own_logits:
            return
        b = hidden.shape[0]
        rows = max(1, self.blocks.logit_rows // b)
        lm_head = self.model.get_output_embeddings()
        # an offloaded head (device_map) keeps its weight on the meta device: only calling it works
        plain = (
            type(lm_head) is torch.nn.Linear
            and lm_head.weight.dtype == torch.float32
            and lm_head.weight.device == hidden.device
        )
        sliced = plain and self.blocks.vocab_slice is not None  # set only where the fused kernels run
        # Whole-vocabulary rows: one block reused for every chunk (fresh multi-MB blocks per
        # chunk fragment the CPU heap).
        v = lm_head.out_features
        buffer = None if sliced else torch.empty(b * min(rows, hidden.shape[1] - 1) * v, device=hidden.device)
        pieces = []
        ids = self.geometry.input_ids.to(hidden.device, non_blocking=True)  # (b, q)
        for q0, q1 in chunks(hidden.shape[1] - 1, 1, rows, rows):
            h = hidden[:, q0:q1].reshape(-1, hidden.shape[-1])  # (b * c, H)
            nxt = ids[:, q0 + 1 : q1 + 1].reshape(-1, 1)  # (b * c, 1): the prompt token each position scores
            if sliced:
                piece = summaries.linear_logits_summary(
                    h, lm_head.weight, lm_head.bias, nxt, self.softcap, self.blocks.vocab_slice
                )
            else:
                logits = self._logits(lm_head, h, buffer[: h.shape[0] * v].view(h.shape[0], v), plain)  # (b * c, V)
                piece = summaries.logits_summary(logits, nxt)
            pieces.append(summaries.LogitsSummary(*(t.reshape(b, q1 - q0, *t.shape[1:]) for t in piece)))  # (b, c, ...)
        self._keep_prefill(pieces)

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

    def _own_prefill_logits(self, logits: torch.Tensor) -> None:
        """Prefill rows from the model's own logits (b, q - 1, V) (own_logits: kept for every
        position), summarised in chunks of positions."""
        b, n, _ = logits.shape
        rows = max(1, self.blocks.logit_rows // b)
        ids = self.geometry.input_ids.to(logits.device, non_blocking=True)  # (b, q)
        self._keep_prefill(
            [
                summaries.logits_summary(logits[:, q0:q1], ids[:, q0 + 1 : q1 + 1, None])
                for q0, q1 in chunks(n, 1, rows, rows)
            ]
        )

    def _keep_prefill(self, pieces: list[summaries.LogitsSummary]) -> None:
        """A prompt pass's rows, from its chunks' logit summaries (b, c, ...): the columns, and
        the prompt tokens' log-probs and ranks, on self.device."""
        self._prefill = {
            k: torch.cat([getattr(p, f) for p in pieces], dim=1).to(self.device, non_blocking=True)
            for k, f in (("logits", "stats"), ("topk_probs", "top_p"), ("topk_ids", "top_ids"))
        }
        self.logprobs.append(torch.cat([p.picked[..., 0] for p in pieces], dim=1).to(self.device, non_blocking=True))
        self.ranks.append(torch.cat([p.rank for p in pieces], dim=1).to(self.device, non_blocking=True))

    def on_forward_end(self, output) -> dict[str, torch.Tensor]:
        """This pass's logit columns: logits (b, q, 3), topk_probs and topk_ids (b, q, 5)."""
        # (b, V); generate copies it before processing, so it stays raw
        logits = output.logits[:, -1].to(self.device, non_blocking=True)
        last = summaries.logits_summary(logits)  # (b, ...)
        self._pending = (logits, last.log_norm)  # (b, V), (b,): scores the next token once it is drawn
        col = {"logits": last.stats[:, None], "topk_probs": last.top_p[:, None], "topk_ids": last.top_ids[:, None]}
        if self.own_logits and output.logits.shape[1] > 1:
            self._own_prefill_logits(output.logits[:, :-1])
        if self._prefill is not None:
            col = {k: torch.cat([self._prefill[k], v], dim=1) for k, v in col.items()}
        return col

    def score(self, input_ids: torch.Tensor) -> None:
        """The token just appended (input_ids[:, -1]): its log-prob and rank under the last logits."""
        logits, log_norm = self._pending
        raw = logits.gather(-1, input_ids[:, -1:])  # (b, 1)
        self.ranks.append((logits > raw).sum(-1, keepdim=True) + 1)  # (b, 1)
        picked = raw.float().clamp_min_(summaries.NEG)  # (b, 1); -inf -> finite
        self.logprobs.append(picked - log_norm[:, None])


def lens_column(
    lens, last: list[torch.Tensor], rest: list[torch.Tensor], logits: torch.Tensor, q: int, device: torch.device
) -> torch.Tensor:
    """The logit lens of a pass (b, q, L, 3) from the block outputs hidden.py kept: the last
    position against the model's own logits (b, V); with "all", a prefill's other positions
    against the last layer's lens (lens.prefill_stats); NaN where the lens is off (a prefill's
    other positions, "generated")."""
    out = logit_lens.step_stats(lens, last, logits.to(device, non_blocking=True))  # (b, 1, L, 3)
    if q == 1:
        return out
    other = (
        logit_lens.prefill_stats(lens, rest, device)
        if rest
        else out.new_full((out.shape[0], q - 1, *out.shape[2:]), float("nan"))
    )  # (b, q - 1, L, 3)
    return torch.cat([other, out], dim=1)
