"""Exact or refused: whether capture can summarise a loaded model's values exactly.

Checked once per loaded model, before anything is generated, with one short probe (eight
tokens) that exercises what capture relies on:

- its transformer blocks can be found (the list of num_hidden_layers modules);
- every block's attention goes through transformers' attention interface, where capture
  reads the query and key (ALiBi biases, state-space and linear-attention layers do not);
- capture leaves the model's logits unchanged;
- the model is causal: a later token changes no earlier position's logits (an encoder
  loaded as a causal LM without is_decoder=True is not);
- the attention implementation is one capture reproduces (SDPA or eager).

Architectures that pass the probe but are known not to match the independent reference
are listed in NOT_EXACT with the reason; the architecture matrix (tests/test_archs.py)
keeps that list honest.
"""

from __future__ import annotations

import torch

from corevital import lens
from corevital.capture import all_logits, decoder_layers, probe_ids, recording
from corevital.config import ConfigError
from corevital.model_loader import ModelUnavailableError

NOT_ROUTED = ("not every block's attention goes through transformers' attention interface, where capture reads "
              "query and key (as with ALiBi biases, state-space or linear-attention layers)")
LOGITS_RTOL = 1e-5  # capture's CPU float32 prefill attention: SDPA's product, summed in another order
CAUSAL_RTOL = 1e-4  # mixtures of experts group tokens for their products: other tokens move the rounding
# model_type -> why its values cannot be captured exactly (found by the architecture matrix)
_ROBERTA = ("its values in batched generation differ from an independent forward pass in CoreVital's architecture "
            "matrix (its position ids are derived from the padding token)")
_UNEXPLAINED = ("its attention summaries differ from an independent eager recomputation in CoreVital's "
                "architecture matrix")
NOT_EXACT: dict[str, str] = {
    **{t: _ROBERTA for t in ("roberta", "roberta-prelayernorm", "camembert", "xlm-roberta", "xlm-roberta-xl",
                             "data2vec-text", "xmod")},
    **{t: _UNEXPLAINED for t in ("granite_swa", "granitemoe_swa", "inkling_text", "moshi")},
    **{t: "its rows do not line up with an independent recomputation's blocks in CoreVital's architecture matrix"
       for t in ("deepseek_v4", "hy_v4")},
}


class UnsupportedModel(ModelUnavailableError):
    """A model whose values capture cannot summarise exactly: refused before generation."""


def check(model) -> None:
    """Raise UnsupportedModel, with one sentence naming the architecture and why, unless
    capture can summarise `model` exactly. The verdict is kept on the model."""
    verdict = getattr(model, "_corevital_support", None)
    if verdict is None:
        verdict = _verdict(model)
        model._corevital_support = verdict
    if verdict:
        raise UnsupportedModel(f"{type(model).__name__} cannot be captured exactly: {verdict}; CoreVital refuses it "
                               f"rather than record wrong values")


def check_logit_lens(model, mode: str | None) -> None:
    """Raise ConfigError, with one sentence naming the architecture and why, if `mode`
    (metrics.logit_lens: None, "generated", "all") asks for a lens that `model`'s final norm and
    head cannot be verified to give (lens.resolve's probe)."""
    if mode is None:
        return
    try:
        lens.resolve(model)
    except lens.LensUnavailable as e:
        raise ConfigError(f"metrics.logit_lens={mode} cannot be computed for {type(model).__name__}: {e}; "
                          f"use metrics.logit_lens=false") from None


def _verdict(model) -> str:
    """'' if capture is exact on `model`, else why not."""
    text = model.config.get_text_config()
    reason = NOT_EXACT.get(getattr(text, "model_type", ""), "") or NOT_EXACT.get(model.config.model_type, "")
    if reason:
        return reason
    impl = model.config._attn_implementation
    if impl not in ("sdpa", "eager"):
        return f"its attention implementation {impl!r} is not one capture reproduces (use sdpa or eager)"
    try:
        layers = len(decoder_layers(model))
    except ValueError:
        return f"its {text.num_hidden_layers} transformer blocks are not one list of modules capture can hook"
    ids = probe_ids(model)  # (1, 8)
    plain = all_logits(model, ids)
    rec = None
    try:
        with recording(model) as rec:
            captured = all_logits(model, ids)
    except Exception as e:  # capture could not follow this model's forward pass
        if rec is not None and len(rec.attention.layers) < layers:
            return NOT_ROUTED
        return f"its forward pass is not one capture can follow ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
    col = rec.columns[0] if len(rec.columns) == 1 else None
    if col is None or col["attention"].shape[2] != layers or col["hidden"].shape[2] != layers:
        return NOT_ROUTED
    if not same_logits(plain[:, -1], captured[:, -1]):
        return "capture would change the logits it computes"
    other = ids.clone()
    other[0, -1] = (other[0, -1] + 1) % text.vocab_size
    if plain.shape[1] > 1 and not same_logits(plain[:, :-1], all_logits(model, other)[:, :-1], CAUSAL_RTOL):
        return "it is not causal (a later token changes earlier positions' logits; an encoder needs is_decoder=True)"
    return ""


def same_logits(a: torch.Tensor, b: torch.Tensor, rtol: float = LOGITS_RTOL) -> bool:
    """Logits equal up to float32 rounding: within rtol of their largest finite magnitude (NaN
    where the other is NaN, an infinity where the other is the same one: an overflowing model)."""
    if a.shape != b.shape:
        return False
    finite = a[torch.isfinite(a)]
    scale = finite.abs().amax().clamp_min(1.0) if finite.numel() else torch.tensor(1.0)
    same = (a == b) | (a.isnan() & b.isnan()) | ((a - b).abs() <= rtol * scale)
    return bool(same.all())

