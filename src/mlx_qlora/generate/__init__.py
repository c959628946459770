"""Generation, chat, adapter loading, merging/export and evaluation."""

from .generator import (
    GenerationResult, GenerationStats, StreamStep, generate, generate_batch, generate_stream, left_pad,
)
from .loading import AdapterInfo, attach_adapters, load_for_inference, resolve_template
from .metrics import exact_match, normalize_answer, rouge_scores, text_scores
from .sampling import SamplerConfig, process_logits, sample

__all__ = [
    "GenerationResult", "GenerationStats", "StreamStep", "generate", "generate_batch", "generate_stream",
    "left_pad", "AdapterInfo", "attach_adapters", "load_for_inference", "resolve_template", "exact_match",
    "normalize_answer", "rouge_scores", "text_scores", "SamplerConfig", "process_logits", "sample",
]
