"""Capture: instrumented `generate` that summarises every forward pass as it happens.

Hooks read each forward pass and turn it at once into the small summaries that metrics.py
declares; the tensors themselves are dropped. What grows with a run is only the summary
rows, kept on the model's device and moved to the host once per `generate` call.

    recorder.py   the hooks of one generate call; routes each tensor to:
    hidden.py       block outputs     -> hidden summary (and user metrics, lens inputs)
    attention.py    attention weights -> attention summary (the model's own output beside it)
    logits.py       logits            -> logits summary, the drawn token's log-prob and rank
    passes.py     how a pass is cut into blocks, where it sits in the sequence
    model.py      what capture needs to know about the model (blocks, device, head)
    sequence.py   one continuation's arrays, cut by the metric declarations
    generate.py   generate_with_capture: prompts in, SequenceCaptures out
"""

from corevital.capture.attention import ATTN_IMPLEMENTATION, AttentionCapture
from corevital.capture.generate import (
    FiniteScores,
    capture_ids,
    cut_sequences,
    eos_ids,
    generate_with_capture,
    generation_kwargs,
    prompt_token_ids,
)
from corevital.capture.passes import Blocks, Geometry
from corevital.capture.recorder import ModelFacts, Recorder, query_heads, recording
from corevital.core.sequence import SequenceCapture
from corevital.model.introspect import (
    PROBE_TOKENS,
    all_logits,
    decoder_layers,
    execution_device,
    head_is_plain,
    hidden_states,
    probe_ids,
    text_decoder,
)

__all__ = [
    "query_heads",
    "ATTN_IMPLEMENTATION",
    "AttentionCapture",
    "Blocks",
    "FiniteScores",
    "capture_ids",
    "cut_sequences",
    "eos_ids",
    "Geometry",
    "PROBE_TOKENS",
    "ModelFacts",
    "Recorder",
    "SequenceCapture",
    "all_logits",
    "decoder_layers",
    "execution_device",
    "generate_with_capture",
    "generation_kwargs",
    "head_is_plain",
    "hidden_states",
    "probe_ids",
    "text_decoder",
    "prompt_token_ids",
    "recording",
]
