"""The architecture matrix: a tiny random model for every causal LM in the installed transformers.

`MODEL_FOR_CAUSAL_LM_MAPPING_NAMES` is enumerated, not hand-picked. Each entry gets its
config class's defaults shrunk by `SMALL` (only the keys the config has), so a new
architecture in a later transformers joins the matrix by itself; `SKIPPED` lists the
entries that are not a decoder-only language model one can build small here, with why.
"""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM
from transformers.models.auto.configuration_auto import CONFIG_MAPPING
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

# Config keys set when the architecture's config has them: 2 blocks, width 32, 4 query heads
# over 2 key/value heads, 4 experts (2 per token) for mixtures of experts.
SMALL = dict(
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
    intermediate_size=64,
    max_position_embeddings=256,
    num_experts=4,
    num_local_experts=4,
    n_routed_experts=4,
    num_experts_per_tok=2,
    moe_intermediate_size=16,
    n_shared_experts=1,
    shared_expert_intermediate_size=16,
    ffn_hidden_size=64,
    n_group=1,
    topk_group=1,
    kv_lora_rank=16,
    q_lora_rank=16,
    qk_rope_head_dim=4,
    qk_nope_head_dim=4,
    v_head_dim=8,
    sliding_window=4,
    rotary_dim=4,
    d_model=32,
    decoder_layers=2,
    decoder_attention_heads=4,
    decoder_ffn_dim=64,
    encoder_layers=1,
    encoder_attention_heads=4,
    encoder_ffn_dim=64,
)
# Per-architecture keys on top of SMALL, where the generic ones fail the config's own validation
# or would leave out the part of the architecture capture must be exact on.
OVERRIDES: dict[str, dict] = {
    # NVFP4-rounded keys need head_dim % 16 == 0; one indexed (top-k sparse) layer whose top 2 of
    # a pool of 8 are fewer keys than the test's prompts have, so the selection mask is exercised.
    "kolibri1_1": dict(
        head_dim=16,
        index_num_heads=2,
        index_topk=2,
        index_pool_size=8,
        index_compression=2,
        index_num_local_tokens=1,
        index_num_sink_tokens=1,
        layer_types=["indexed_attention", "sliding_attention"],
        index_layers=[0],
        kv_source_layers=[0, 1],
    ),
    # embedding widths of their own, which the generic width must reach too
    "electra": dict(embedding_size=32),
    "rembert": dict(input_embedding_size=32, output_embedding_size=32),
}
# Matrix entries beyond the mapping: (architecture, extra config keys) for settings whose
# attention differs from the default's (Falcon's ALiBi bias rides on the attention mask).
VARIANTS: dict[str, tuple[str, dict]] = {"falcon+alibi": ("falcon", dict(alibi=True))}
MULTIMODAL = "a multimodal model (images, audio or speech around a language model), not a text-only causal LM"
TOO_BIG = (
    "its default config (vision or byte-patch towers, or a nested language model) does not shrink to a tiny model "
    "with the generic keys"
)
BAD_CONFIG = "the generic tiny config fails this architecture's own config validation"
BAD_BUILD = "the generic tiny config passes validation, but the model cannot be built from it"
SKIPPED: dict[str, str] = {
    **{
        n: MULTIMODAL
        for n in (
            "emu3",
            "fuyu",
            "gemma3",
            "gemma3n",
            "gemma4",
            "gemma4_unified",
            "got_ocr2",
            "llama4",
            "mllama",
            "moss_transcribe_diarize",
            "phi4_multimodal",
            "qwen3_5",
            "qwen3_5_moe",
            "qwen4_exp",
            "musicgen",
            "musicgen_melody",
            "dots3_note",
        )
    },
    **{n: TOO_BIG for n in ("blt", "gemma4_unified_assistant")},
    **{
        n: BAD_CONFIG
        for n in (
            "bamba",
            "gemma4_assistant",
            "gpt_neo",
            "granitemoehybrid",
            "mamba2",
            "xlnet",
            "zamba",
            "zamba2",
            "zaya",
        )
    },
    **{n: BAD_BUILD for n in ("cohere_compass_text", "dbrx", "gemma3n_text", "lfm2_moe")},
    "reformer": "its LM head model needs is_decoder=True plus LSH/local attention settings the generic config lacks",
    "xmod": "it needs a language adapter chosen before any forward pass (set_default_language)",
}
MODALITY_INPUTS = ("pixel", "image", "audio", "input_features", "video", "speech")
TINY = 10_000_000  # parameters: the matrix's models have well under a million


# Encoders that are causal LMs only as decoders: built with is_decoder=True (a checkpoint
# without it is refused as not causal).
DECODER_FLAG = {
    "bert",
    "bert-generation",
    "camembert",
    "data2vec-text",
    "ernie",
    "roberta",
    "roberta-prelayernorm",
    "roc_bert",
    "xlm-roberta",
    "xlm-roberta-xl",
    "big_bird",
    "megatron-bert",
    "rembert",
    "electra",
    "xmod",
}
NOT_ROUTED = {
    "bailing_hybrid",
    "big_bird",
    "bloom",
    "cpmant",
    "diffllama",
    "dory",
    "falcon_mamba",
    "git",
    "gpt_neox_japanese",
    "jamba",
    "kimi_linear",
    "lara_mini",
    "lfm3",
    "mamba",
    "megatron-bert",
    "minimax",
    "mpt",
    "nemotron_h",
    "olmo_hybrid",
    "qwen3_5_moe_text",
    "qwen3_5_text",
    "qwen3_next",
    "recurrent_gemma",
    "roformer",
    "rwkv",
    "xglm",
    "xlm",
    "xlstm",
    "openai-gpt",
    "trocr",
    "prophetnet",
    "mvp",
    "qwen4_exp_text",
    "rembert",
}
# What the load-time check answers for the architectures it refuses (the rest must be exact).
REFUSED: dict[str, str] = {
    **{n: "attention interface" for n in NOT_ROUTED},
    "hrm_text": "transformer blocks",
    "longcat_flash": "transformer blocks",
    "inkling2_text": "forward pass",
    "inkling2_loop_text": "forward pass",
    "llama4_text": "forward pass",
}


def small_config(name: str, vocab_size: int, special: dict):
    """The architecture's default config shrunk to a tiny model, with the test tokenizer's vocabulary
    (a VARIANTS entry: its architecture's, with the variant's keys)."""
    name, extra = VARIANTS.get(name, (name, {}))
    cls = CONFIG_MAPPING[name]
    default = cls()
    keys = set(vars(default)) | set(getattr(default, "attribute_map", {}))
    kw = {k: v for k, v in {**SMALL, **OVERRIDES.get(name, {}), **extra}.items() if k in keys}
    if "qk_rope_head_dim" in kw and "head_dim" in kw:  # multi-head latent attention: rotary part of the head
        kw["head_dim"] = kw["qk_rope_head_dim"]
        kw["num_key_value_heads"] = kw["num_attention_heads"]
    return cls(vocab_size=vocab_size, initializer_range=0.2, **kw, **special)


def build(name: str, vocab_size: int, special: dict):
    """A random tiny model (seed 0) of architecture `name`, in eval mode."""
    cfg = small_config(name, vocab_size, {**special, **({"is_decoder": True} if name in DECODER_FLAG else {})})
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    for k in ("bos_token_id", "eos_token_id", "pad_token_id"):
        setattr(model.generation_config, k, special[k])
    return model


def architectures() -> list[str]:
    return sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES) + sorted(VARIANTS)


def skip_reason_fails(name: str, vocab_size: int, special: dict) -> str:
    """'' when SKIPPED[name]'s stated reason holds for the installed transformers, else what
    was found instead (then the entry belongs in the matrix). Nothing big is allocated: models
    are built on the meta device, except xmod's tiny one."""
    import inspect

    import transformers

    why = SKIPPED[name]
    if why == MULTIMODAL:
        config, cls = CONFIG_MAPPING[name], getattr(transformers, MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[name])
        other = [k for k in getattr(config, "sub_configs", {}) if k not in ("text_config", "decoder")]
        inputs = [p for p in inspect.signature(cls.forward).parameters if any(w in p for w in MODALITY_INPUTS)]
        return "" if other or inputs else "its config has no other modality and its forward takes none"
    if why == BAD_CONFIG:
        try:
            small_config(name, vocab_size, special)
        except Exception:
            return ""
        return "its tiny config passes validation"
    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(small_config(name, vocab_size, special))
    except Exception:
        return "" if why in (BAD_BUILD, SKIPPED["reformer"]) else "it cannot be built at all"
    if why == TOO_BIG:
        size = sum(p.numel() for p in model.parameters())
        return "" if size > TINY else f"it builds with only {size} parameters"
    if name == "xmod":
        tiny = build(name, vocab_size, special)
        try:
            tiny(input_ids=torch.tensor([[5, 6, 7]]))
        except ValueError as e:
            return "" if "set_default_language" in str(e) else f"its forward fails otherwise: {e}"
        return "its forward pass runs without a language chosen"
    return "it builds"
