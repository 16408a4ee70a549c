"""Exact or refused: whether capture can summarise a loaded model's values exactly.

Checked at every load, before anything is generated, for the model as loaded (architecture,
dtype, placement, installed transformers), by what capture relies on:

- its transformer blocks can be found (its text decoder's list of blocks);
- the attention implementation is one capture reproduces (SDPA or eager);
- every block's attention goes through transformers' attention interface, where capture
  reads the query and key (ALiBi biases, state-space and linear-attention layers do not);
- capture leaves the model's logits unchanged;
- the model is causal: a later token changes no earlier position's logits (an encoder
  loaded as a causal LM without is_decoder=True is not);
- every value a job records equals an independent recomputation from the model's own eager
  attention weights and block outputs, on a short left-padded batch of two
  (crosscheck.first_difference).

The model's own failures during these probes are refused in one sentence too. KNOWN_CAUSES
documents why the architecture matrix (tests/test_archs.py) finds some architectures
refused; it is never consulted to refuse one: the matrix checks that each is refused by the
check itself, and fails when one of them has become exact.
"""

from __future__ import annotations

import torch

from corevital.capture import all_logits, crosscheck, decoder_layers, probe_ids, recording
from corevital.core.config import ConfigError
from corevital.model import lens
from corevital.model.loader import ModelUnavailableError

NOT_ROUTED = (
    "not every block's attention goes through transformers' attention interface, where capture reads "
    "query and key (as with ALiBi biases, state-space or linear-attention layers)"
)
LOGITS_RTOL = 1e-5  # capture's CPU float32 prefill attention: SDPA's product, summed in another order
CAUSAL_RTOL = 1e-4  # mixtures of experts group tokens for their products: other tokens move the rounding
_ROBERTA = "its position ids are derived from the padding token, so a left-padded batch computes other positions"
# model_type -> the cause the architecture matrix found for its refusal (documentation only: the check decides)
KNOWN_CAUSES: dict[str, str] = {
    **{
        t: _ROBERTA
        for t in (
            "roberta",
            "roberta-prelayernorm",
            "camembert",
            "xlm-roberta",
            "xlm-roberta-xl",
            "data2vec-text",
            "xmod",
        )
    },
    **{
        t: "the attention weights capture sees differ from its eager attention's (cause not yet traced)"
        for t in ("granite_swa", "granitemoe_swa", "inkling_text", "moshi")
    },
    **{
        t: "its compressed attention reshapes the batch in a way capture's attention hook cannot follow"
        for t in ("deepseek_v4", "hy_v4")
    },
}


class UnsupportedModel(ModelUnavailableError):
    """A model whose values capture cannot summarise exactly: refused before generation."""


def check(model) -> None:
    """Raise UnsupportedModel, with one sentence naming the architecture and why, unless
    capture can summarise `model` exactly as it is loaded. Runs the probes every time: the
    verdict belongs to this load (its dtype, placement and transformers), not to a name."""
    verdict = verdict_of(model)
    if verdict:
        raise UnsupportedModel(
            f"{type(model).__name__} cannot be captured exactly: {verdict}; CoreVital refuses it "
            f"rather than record wrong values"
        )


def check_logit_lens(model, mode: str | None) -> None:
    """Raise ConfigError, with one sentence naming the architecture and why, if `mode`
    (metrics.logit_lens: None, "generated", "all") asks for a lens that `model`'s final norm and
    head cannot be verified to give (lens.resolve's probe)."""
    if mode is None:
        return
    try:
        lens.resolve(model)
    except lens.LensUnavailable as e:
        raise ConfigError(
            f"metrics.logit_lens={mode} cannot be computed for {type(model).__name__}: {e}; "
            f"use metrics.logit_lens=false"
        ) from None


def verdict_of(model) -> str:
    """'' if capture is exact on `model`, else why not (one phrase, with KNOWN_CAUSES' entry for
    its architecture where there is one). The model's own errors during the probes are part
    of the phrase, never a traceback."""
    try:
        reason = _verdict(model)
    except Exception as e:  # the model's own forward pass (or capture following it) failed on the probe
        reason = f"its forward pass fails on CoreVital's short probe ({_error(e)})"
    text = model.config.get_text_config()
    known = KNOWN_CAUSES.get(getattr(text, "model_type", "")) or KNOWN_CAUSES.get(model.config.model_type)
    return reason + (f" (a known cause: {known})" if reason and known else "")


def _error(e: Exception) -> str:
    """`Type: first line of its message` (at most 200 characters of it): an error inside one sentence."""
    first = str(e).splitlines()[0] if str(e) else ""
    return f"{type(e).__name__}: {first[:200]}"


def _verdict(model) -> str:
    text = model.config.get_text_config()
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
        return f"its forward pass is not one capture can follow ({_error(e)})"
    col = rec.columns[0] if len(rec.columns) == 1 else None
    if col is None or col["attention"].shape[2] != layers or col["hidden"].shape[2] != layers:
        return NOT_ROUTED
    if not same_logits(plain[:, -1], captured[:, -1]):
        return "capture would change the logits it computes"
    other = ids.clone()
    other[0, -1] = (other[0, -1] + 1) % text.vocab_size
    if plain.shape[1] > 1 and not same_logits(plain[:, :-1], all_logits(model, other)[:, :-1], CAUSAL_RTOL):
        return "it is not causal (a later token changes earlier positions' logits; an encoder needs is_decoder=True)"
    return crosscheck.first_difference(model)


def same_logits(a: torch.Tensor, b: torch.Tensor, rtol: float = LOGITS_RTOL) -> bool:
    """Logits equal up to float32 rounding: within rtol of their largest finite magnitude (NaN
    where the other is NaN, an infinity where the other is the same one: an overflowing model)."""
    if a.shape != b.shape:
        return False
    finite = a[torch.isfinite(a)]
    scale = finite.abs().amax().clamp_min(1.0) if finite.numel() else torch.tensor(1.0)
    same = (a == b) | (a.isnan() & b.isnan()) | ((a - b).abs() <= rtol * scale)
    return bool(same.all())
