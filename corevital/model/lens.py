"""The logit lens (docs/format.md, "Metrics"): each block's output read through the model's own final
norm and output head, and compared with the model's own next-token distribution.

At layer l and query position q the lens distribution is softmax(head(final_norm(h_l(q)))),
soft-capped as the model's config says; for the last block this is the model's own
distribution. Per (position, layer) three numbers are kept: the lens entropy (nats), whether
its most likely token is the model's, and KL(model's distribution || lens distribution).

The final norm is found by a probe, not by name: among the base model's norm modules outside
the block stack, the one that turns the last block's output into the base model's output, on
eight tokens; and the head must be plain (capture.head_is_plain: the model's logits are its
head applied to that output). A model where either fails cannot have a lens that means what
it says, and `metrics.logit_lens` is refused for it before generation (support.check_logit_lens).

Lens logits are made in chunks of at most ELEMENTS values ((layers x positions) x vocabulary),
never (layers, positions, vocabulary) at once; nothing here syncs with the host.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from corevital.core.config import logit_lens_mode
from corevital.kernels.summaries import NEG
from corevital.model.introspect import decoder_layers, head_is_plain, hidden_states, probe_ids

mode = logit_lens_mode  # metrics.logit_lens -> None (off), "generated" or "all"; parsed where the config is checked

ELEMENTS = 1 << 21  # float32 lens logits per chunk: 8 MiB, about 5x that with the softmax's temporaries
PROBE_TOL = 1e-5  # the probe calls the same modules on the same tensors as the model: equal up to rounding
NORM_NAMES = ("norm", "ln_f", "norm_f", "final_layernorm", "final_layer_norm", "final_norm", "ln_out")


class LensUnavailable(ValueError):
    """The model's final norm and head cannot be verified to make its logits; the message says why."""


@dataclass(frozen=True)
class Lens:
    """The model's own final norm and output head, with its logit soft-capping."""

    norm: torch.nn.Module
    head: torch.nn.Module
    softcap: float | None
    vocab: int

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """Block outputs (..., H) -> lens logits (..., V), float32. Norm, head and soft-cap run in
        the model's dtype (through any accelerate hook), as the model makes its own logits."""
        z = self.head(self.norm(h))  # (..., V)
        if self.softcap:
            z = torch.tanh(z / self.softcap) * self.softcap
        return z.float()


def resolve(model) -> Lens:
    """The verified Lens of `model`, or LensUnavailable with why not. Probed on eight tokens each
    time it is asked; the caller keeps the answer (capture.ModelFacts), nothing is stored on the
    model."""
    return _probe(model)


def _probe(model) -> Lens:
    """Find the final norm (the module that makes the base model's output from the last block's)
    and check that the head makes the model's logits from it, on eight tokens."""

    if not head_is_plain(model):
        raise LensUnavailable(
            "its logits are not its output head applied to its base model's output "
            "(a logit scale or another transformation in its forward)"
        )
    try:
        blocks = decoder_layers(model)
    except ValueError as e:
        raise LensUnavailable(str(e)) from None
    seen: dict[str, torch.Tensor] = {}
    hooks = [
        blocks[-1].register_forward_hook(lambda m, a, o: seen.__setitem__("last", hidden_states(o))),
        model.base_model.register_forward_hook(lambda m, a, o: seen.__setitem__("base", hidden_states(o))),
    ]
    text = model.config.get_text_config()
    try:
        with torch.inference_mode():
            model(input_ids=probe_ids(model), use_cache=False)  # (1, 8)
            norm = _matching_norm(model, blocks, seen)
    finally:
        for h in hooks:
            h.remove()
    head = model.get_output_embeddings()
    vocab = getattr(head, "out_features", None) or text.vocab_size
    return Lens(norm, head, getattr(text, "final_logit_softcapping", None), int(vocab))


def _matching_norm(model, blocks: torch.nn.ModuleList, seen: dict) -> torch.nn.Module:
    """The norm module outside the block stack that maps the last block's output to the base
    model's output (the last such one in module order), or the identity if they are equal."""
    if "last" not in seen or "base" not in seen:
        raise LensUnavailable(
            "its forward pass does not run its transformer blocks and base model as capture hooks them"
        )
    last, base = seen["last"], seen["base"]  # (1, 8, H) each
    inside = {id(m) for m in blocks.modules()}
    candidates = [
        m
        for name, m in model.base_model.named_modules()
        if m is not model.base_model
        and id(m) not in inside
        and ("norm" in type(m).__name__.lower() or name.rsplit(".", 1)[-1] in NORM_NAMES)
    ]
    for module in [*reversed(candidates), torch.nn.Identity()]:
        try:
            out = module(last)
        except Exception:  # not a module of the hidden states (an embedding norm of another width, say)
            continue
        if isinstance(out, torch.Tensor) and _close(out.to(base.device), base):
            return module
    raise LensUnavailable(
        "no norm module outside its transformer blocks turns the last block's output into its base model's output"
    )


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal shapes and values within PROBE_TOL of the larger magnitude."""
    if a.shape != b.shape:
        return False
    a, b = a.float(), b.float()
    return bool(torch.allclose(a, b, rtol=PROBE_TOL, atol=PROBE_TOL * max(1.0, float(b.abs().amax()))))


def stats(z: torch.Tensor, own_logp: torch.Tensor, own_top: torch.Tensor) -> torch.Tensor:
    """Lens logits z (..., V) and the model's own log-probabilities (..., V) and most likely
    token (...) (broadcastable) -> (..., 3) float32: [lens entropy (nats), 1.0 where the lens's
    most likely token is the model's else 0.0, KL(own || lens) (nats, >= 0)]."""
    lz = torch.log_softmax(z, -1).clamp_min_(NEG)  # (..., V); a token ruled out gets a finite log p
    top = (z.argmax(-1) == own_top).float()  # (...)
    entropy = -(lz.exp() * lz).sum(-1)  # (...)
    kl = (own_logp.exp() * (own_logp - lz)).sum(-1).clamp_min_(0.0)  # (...)
    return torch.stack([entropy, top, kl], dim=-1)


def own(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The model's own logits (..., V) -> (log-probabilities (..., V) float32, most likely token (...))."""
    return torch.log_softmax(logits.float(), -1).clamp_min_(NEG), logits.argmax(-1)


def step_stats(lens: Lens, states: list[torch.Tensor], logits: torch.Tensor) -> torch.Tensor:
    """One query position per row: each layer's block output (b, 1, H) and the model's own
    logits there (b, V) -> (b, 1, L, 3), on the logits' device. Layers go through the head
    together, as many at a time as fit in ELEMENTS."""
    b, L = logits.shape[0], len(states)
    own_logp, own_top = own(logits)  # (b, V), (b,)
    group = max(1, ELEMENTS // max(1, b * lens.vocab))
    at = states[-1].device  # where the base model's output is made
    pieces = []
    for l0 in range(0, L, group):
        x = torch.stack([s[:, 0].to(at, non_blocking=True) for s in states[l0 : l0 + group]])  # (g, b, H)
        pieces.append(stats(lens.logits(x).to(logits.device, non_blocking=True), own_logp, own_top))  # (g, b, 3)
    return torch.cat(pieces).permute(1, 0, 2)[:, None]  # (b, 1, L, 3)


def prefill_stats(lens: Lens, states: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    """Every position of a prefill but the last: each layer's block outputs (b, n, H) -> (b, n, L, 3)
    on `device`. The model's own distribution there is the last layer's lens (exact: the probe
    verified that the norm and head make the model's logits), so the last layer's KL is 0.
    Positions are cut into chunks, and each chunk's layers into groups, of at most ELEMENTS logits."""
    b, n = states[0].shape[:2]
    L = len(states)
    at = states[-1].device
    rows = max(1, min(n, ELEMENTS // max(1, b * lens.vocab)))  # positions per chunk
    chunks = []
    for p0 in range(0, n, rows):
        p1 = min(n, p0 + rows)
        last = lens.logits(states[-1][:, p0:p1])  # (b, c, V)
        own_logp, own_top = own(last)
        group = max(1, ELEMENTS // max(1, b * (p1 - p0) * lens.vocab))
        pieces = []
        for l0 in range(0, L - 1, group):
            x = torch.stack(
                [s[:, p0:p1].to(at, non_blocking=True) for s in states[l0 : min(l0 + group, L - 1)]]
            )  # (g, b, c, H)
            pieces.append(stats(lens.logits(x), own_logp, own_top))  # (g, b, c, 3)
        pieces.append(stats(last, own_logp, own_top)[None])  # (1, b, c, 3)
        chunks.append(torch.cat(pieces).permute(1, 2, 0, 3).to(device, non_blocking=True))  # (b, c, L, 3)
    return torch.cat(chunks, dim=1)  # (b, n, L, 3)
