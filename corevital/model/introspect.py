"""What capture needs to know about a loaded model: where it runs, its stack of blocks, how a
block's or base model's output holds its hidden states, and whether its logits are its head
applied to the base model's output (probed once on eight tokens)."""

from __future__ import annotations

import torch

PROBE_TOKENS = 8  # the load-time probes (head_is_plain, lens.resolve, support.check) run on this many tokens


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


def probe_ids(model) -> torch.Tensor:
    """The probes' input: token ids 0..7 (1, 8), where the model takes its inputs."""
    return torch.arange(min(PROBE_TOKENS, model.config.get_text_config().vocab_size), device=execution_device(model))[
        None
    ]


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


BLOCK_LISTS = ("layers", "h", "blocks", "block", "layer")  # what modeling files name their stack of blocks


def text_decoders(model) -> list[torch.nn.Module]:
    """Where the text decoder may be, most specific first: transformers' own lookup
    (`get_decoder`: a multimodal model's language model), then the base model. A name can
    mislead (ModernBERT's LM head is called `decoder`), so the first with a stack of blocks wins."""
    try:
        decoder = model.get_decoder()
    except (AttributeError, NotImplementedError, ValueError):
        decoder = None
    return [d for d in (decoder, model.base_model) if isinstance(d, torch.nn.Module)]


def text_decoder(model) -> torch.nn.Module:
    """The module that holds the text stack of blocks (decoder_layers)."""
    return _stack(model)[0]


def decoder_layers(model) -> torch.nn.ModuleList:
    """The text decoder's stack of transformer blocks: its list attribute by one of the names
    modeling files use (BLOCK_LISTS), else the list of num_hidden_layers modules nearest to
    the decoder (a decoder that wraps an inner one). A vision or audio tower is never searched,
    even where it has as many layers as the text stack."""
    return _stack(model)[1]


def _stack(model) -> tuple[torch.nn.Module, torch.nn.ModuleList]:
    n = model.config.get_text_config().num_hidden_layers
    for decoder in text_decoders(model):
        for name in BLOCK_LISTS:
            found = getattr(decoder, name, None)
            if isinstance(found, torch.nn.ModuleList) and len(found) == n:
                return decoder, found
        lists = [
            (path.count("."), m)
            for path, m in decoder.named_modules()
            if isinstance(m, torch.nn.ModuleList) and len(m) == n
        ]
        if lists:
            return decoder, min(lists, key=lambda x: x[0])[1]
    raise ValueError(f"cannot find the {n} transformer blocks of {type(model).__name__}'s text decoder")


def head_is_plain(model) -> bool:
    """Whether the model's logits are its output head applied to the base model's output, soft-
    capped as its config says: then prefill rows are made from the base output in chunks (the
    model keeps only the last position's logits). Otherwise (a logit scale, as Cohere's, or any
    transformation in the model's forward) they come from the model's own logits, kept for every
    position. Probed on eight tokens, comparing the two; the caller keeps the answer
    (capture.ModelFacts), nothing is stored on the model."""
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
        return False
    cap = getattr(model.config.get_text_config(), "final_logit_softcapping", None)
    if cap:
        head = torch.tanh(head / cap) * cap
    return own.shape == head.shape and bool(torch.allclose(own, head, rtol=1e-5, atol=1e-5))
