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
    hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
    intermediate_size=64, max_position_embeddings=256, num_experts=4, num_local_experts=4, n_routed_experts=4,
    num_experts_per_tok=2, moe_intermediate_size=16, n_shared_experts=1, shared_expert_intermediate_size=16,
    ffn_hidden_size=64, n_group=1, topk_group=1, kv_lora_rank=16, q_lora_rank=16, qk_rope_head_dim=4,
    qk_nope_head_dim=4, v_head_dim=8, sliding_window=4, rotary_dim=4,
    d_model=32, decoder_layers=2, decoder_attention_heads=4, decoder_ffn_dim=64, encoder_layers=1,
    encoder_attention_heads=4, encoder_ffn_dim=64,
)
# Per-architecture keys on top of SMALL, where the generic ones fail the config's own validation
# or would leave out the part of the architecture capture must be exact on.
OVERRIDES: dict[str, dict] = {
    # NVFP4-rounded keys need head_dim % 16 == 0; one indexed (top-k sparse) layer whose top 2 of
    # a pool of 8 are fewer keys than the test's prompts have, so the selection mask is exercised.
    "kolibri1_1": dict(head_dim=16, index_num_heads=2, index_topk=2, index_pool_size=8, index_compression=2,
                       index_num_local_tokens=1, index_num_sink_tokens=1,
                       layer_types=["indexed_attention", "sliding_attention"], index_layers=[0], kv_source_layers=[0, 1]),
}
# Matrix entries beyond the mapping: (architecture, extra config keys) for settings whose
# attention differs from the default's (Falcon's ALiBi bias rides on the attention mask).
VARIANTS: dict[str, tuple[str, dict]] = {"falcon+alibi": ("falcon", dict(alibi=True))}
MULTIMODAL = "a multimodal model (images, audio or speech around a language model), not a text-only causal LM"
TOO_BIG = "its default config (vision or byte-patch towers) does not shrink to a tiny model with the generic keys"
BAD_CONFIG = "the generic tiny config fails this architecture's own config validation"
SKIPPED: dict[str, str] = {
    **{n: MULTIMODAL for n in ("emu3", "fuyu", "gemma3", "gemma3n", "gemma4", "gemma4_unified", "gemma4_unified_assistant",
                               "got_ocr2", "llama4", "mllama", "moss_transcribe_diarize", "phi4_multimodal", "qwen3_5",
                               "qwen3_5_moe", "qwen4_exp", "musicgen", "musicgen_melody", "dots3_note")},
    "blt": TOO_BIG,
    **{n: BAD_CONFIG for n in ("bamba", "dots3_note_text", "gemma4_assistant", "gpt_neo", "granitemoehybrid", "mamba2",
                               "xlnet", "zamba", "zamba2", "zaya", "cohere_compass_text", "dbrx", "gemma3n_text",
                               "lfm2_moe", "electra", "rembert")},
    "reformer": "its LM head model needs is_decoder=True plus LSH/local attention settings the generic config lacks",
    "xmod": "it needs a language adapter chosen before any forward pass (set_default_language)",
}
# Encoders that are causal LMs only as decoders: built with is_decoder=True (a checkpoint
# without it is refused as not causal).
DECODER_FLAG = {"bert", "bert-generation", "camembert", "data2vec-text", "ernie", "roberta", "roberta-prelayernorm",
                "roc_bert", "xlm-roberta", "xlm-roberta-xl", "big_bird", "megatron-bert", "rembert", "electra", "xmod"}
NOT_ROUTED = {"bailing_hybrid", "big_bird", "bloom", "cpmant", "diffllama", "dory", "falcon_mamba", "git",
              "gpt_neox_japanese", "jamba", "kimi_linear", "lara_mini", "lfm3", "mamba", "megatron-bert", "minimax", "mpt",
              "nemotron_h", "olmo_hybrid", "qwen3_5_moe_text", "qwen3_5_text", "qwen3_next", "recurrent_gemma", "roformer",
              "rwkv", "xglm", "xlm", "xlstm", "openai-gpt", "trocr", "prophetnet", "mvp", "qwen4_exp_text"}
# What the load-time check answers for the architectures it refuses (the rest must be exact).
REFUSED: dict[str, str] = {
    **{n: "attention interface" for n in NOT_ROUTED},
    "hrm_text": "transformer blocks", "longcat_flash": "transformer blocks",
    "inkling2_text": "forward pass", "inkling2_loop_text": "forward pass", "llama4_text": "forward pass",
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
