"""``MistralModel`` and ``MistralForCausalLM``: parameter paths equal Hugging Face checkpoint keys."""

from __future__ import annotations

from typing import Any, Optional

import mlx.core as mx
import mlx.nn as nn

from .. import settings
from .args import ModelArgs
from .cache import KVCache
from .layers import DecoderLayer, RMSNorm, softcap
from .mask import MaskRule, make_mask
from .recompute import checkpoint


class MistralModel(nn.Module):
    """Embeddings, decoder layers and the final norm (``model.*`` keys)."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = [DecoderLayer(args, i) for i in range(args.num_hidden_layers)]
        self.norm = RMSNorm(args.hidden_size, eps=args.rms_norm_eps, offset=args.norm_weight_offset)
        self.grad_checkpoint = False

    def __call__(
        self,
        input_ids: mx.array,
        cache: Optional[list[KVCache]] = None,
        position_ids: Optional[mx.array] = None,
        segment_ids: Optional[mx.array] = None,
        attention_mask: Optional[mx.array] = None,
        eval_every: int = 0,
    ) -> mx.array:
        """input_ids (B, L) -> hidden states (B, L, D) after the final norm.

        ``eval_every`` (inference outside ``mx.compile`` only): queue the work of every that many layers
        and wait for the group before, so that at most two groups' temporaries (a GPU keeps every buffer
        until the queued work that read it has run: the dequantized weights of a prompt pass) are held."""
        h = self.embed_tokens(input_ids)  # (B, L, D)
        if self.args.scale_embeddings:  # Gemma: the factor rounded to the embeddings' dtype first, as transformers
            h = h * mx.array(self.args.hidden_size**0.5, dtype=mx.float32).astype(h.dtype)
        pending = None
        L = input_ids.shape[1]
        offset = cache[0].offset if cache else 0
        built: dict[str, Any] = {}

        def mask_fn(key_positions, window):
            # Layers with the same window and cache length see the same positions: one mask for each. Without a
            # cache the mask stays a rule: the attention seam picks the array or the block-wise path.
            key = (window, None if key_positions is None else key_positions.shape[0])
            if key not in built:
                if key_positions is None:
                    built[key] = MaskRule(L, window, segment_ids, attention_mask)
                else:
                    built[key] = make_mask(L, offset, key_positions, window, segment_ids, attention_mask)
            return built[key]

        if self.grad_checkpoint and cache is None:
            span = checkpoint_span(len(self.layers), h.nbytes, mx.get_memory_limit())
            for start in range(0, len(self.layers), span):
                h = _checkpointed(self.layers[start:start + span], h, mask_fn, position_ids)
            return self.norm(h)
        for i, layer in enumerate(self.layers):
            layer_cache = cache[i] if cache else None
            h = layer(h, mask_fn, layer_cache, position_ids)
            if eval_every and (i + 1) % eval_every == 0 and i + 1 < len(self.layers):
                mx.async_eval(h)
                if pending is not None:
                    mx.eval(pending)
                pending = h
        return self.norm(h)


# With ``settings.checkpoint_span`` 0, segments start where every layer's input would take more than this share of
# MLX's memory limit.
SPAN_SHARE = 0.1


def checkpoint_span(layers: int, input_bytes: int, memory_limit: int) -> int:
    """Decoder layers per checkpointed segment: ``settings.checkpoint_span``, or where that is 0, 1 while the
    ``layers`` inputs of ``input_bytes`` each take at most ``SPAN_SHARE`` of ``memory_limit``, else the whole
    number nearest sqrt(layers), which about minimizes the inputs held (layers / span kept, span recomputed),
    where that holds fewer than ``layers``."""
    span = settings.current().checkpoint_span
    if span:
        return span
    span = max(1, round(layers ** 0.5))
    if layers * input_bytes <= SPAN_SHARE * memory_limit or -(-layers // span) + span >= layers:
        return 1  # the inputs fit, or segments would hold no fewer (five layers or fewer)
    return span


def _checkpointed(layers: list[DecoderLayer], h: mx.array, mask_fn, position_ids) -> mx.array:
    """Run ``layers`` so that their activations are recomputed in the backward pass instead of stored: one layer
    alone, or several as a segment whose own input alone is kept, each of its layers checkpointed inside it
    when the segment is recomputed."""

    def run(params, x):
        for layer, p in zip(layers, params):
            layer.update(p)
        if len(layers) == 1:
            return layers[0](x, mask_fn, None, position_ids)
        for layer in layers:
            x = _checkpointed([layer], x, mask_fn, position_ids)
        return x

    return checkpoint(run)([layer.trainable_parameters() for layer in layers], h)


class MistralForCausalLM(nn.Module):
    """The decoder plus the language-model head (tied to the embeddings when the config says so)."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.model = MistralModel(args)
        if not args.tie_word_embeddings:
            self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=False)

    def hidden_states(
        self,
        input_ids: mx.array,
        cache: Optional[list[KVCache]] = None,
        position_ids: Optional[mx.array] = None,
        segment_ids: Optional[mx.array] = None,
        attention_mask: Optional[mx.array] = None,
        eval_every: int = 0,
    ) -> mx.array:
        """input_ids (B, L) -> final hidden states (B, L, D); ``eval_every``: see ``MistralModel``."""
        return self.model(input_ids, cache, position_ids, segment_ids, attention_mask, eval_every)

    def logits_from_hidden(self, h: mx.array) -> mx.array:
        """Hidden states (..., D) -> logits (..., vocab), soft-capped where the config says (Gemma 2)."""
        if self.args.tie_word_embeddings:
            logits = self.model.embed_tokens.as_linear(h)
        else:
            logits = self.lm_head(h)
        if self.args.final_logit_softcapping is not None:
            logits = softcap(logits, self.args.final_logit_softcapping)
        return logits

    def __call__(
        self,
        input_ids: mx.array,
        cache: Optional[list[KVCache]] = None,
        position_ids: Optional[mx.array] = None,
        segment_ids: Optional[mx.array] = None,
        attention_mask: Optional[mx.array] = None,
    ) -> mx.array:
        """input_ids (B, L) -> logits (B, L, vocab). See docs/ARCHITECTURE.md for the optional inputs."""
        return self.logits_from_hidden(self.hidden_states(input_ids, cache, position_ids, segment_ids, attention_mask))

    def make_cache(self) -> list[KVCache]:
        """One cache per layer; each keeps only its layer's sliding window when it has one."""
        return [KVCache(layer.self_attn.sliding_window) for layer in self.model.layers]

    @property
    def layers(self) -> list[DecoderLayer]:
        return self.model.layers
