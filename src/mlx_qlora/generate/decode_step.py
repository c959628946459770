"""One decoding step as a compiled graph: the per-token Python work done once instead of every token.

Batch-1 decoding of a 7B model issues a few thousand small operations per token; building them in
Python took longer than the GPU took to run them (``gpu_generate.py`` compares the ``ours`` and
``ours-eager`` stacks). ``CompiledDecoder`` traces the model once per cache capacity with ``mx.compile``
over a ``StaticKVCache`` (fixed-size buffers, the offset an array), so every later token replays the
traced graph.

The weights are constants of the traced graph: the decoder belongs to one set of weight arrays, and
``decoder_for`` builds a new one when any parameter array of the model was replaced (new adapters,
``load_weights``), or when ``mlx_qlora.settings`` changed, since the graph keeps the paths and kernels
chosen while it was traced.
"""

from __future__ import annotations

from typing import Optional, Sequence

import mlx.core as mx
from mlx.utils import tree_flatten

from .. import settings
from ..model import fused_decode
from ..model.cache import KVCache
from ..model.static_cache import StaticKVCache, static_capacity


class DecodeState:
    """The static caches of every layer and the number of positions stored."""

    def __init__(self, keys: list[mx.array], values: list[mx.array], offset: mx.array):
        self.keys, self.values, self.offset = keys, values, offset

    @classmethod
    def from_caches(cls, caches: list[KVCache], positions_needed: int,
                    capacity: Optional[int] = None) -> "DecodeState":
        """Copy the prompt's caches into static buffers with room for ``positions_needed`` positions
        (``capacity`` slots when given, else ``static_capacity``'s), never more than a layer's own window:
        layers with and without a window (Qwen2's ``max_window_layers``) get their own capacity."""
        static = [StaticKVCache.from_cache(c, _layer_capacity(c, positions_needed, capacity)) for c in caches]
        return cls([c.keys for c in static], [c.values for c in static], static[0].offset)

    @property
    def capacity(self) -> int:
        """The largest layer's slot count (a windowed layer may hold fewer)."""
        return max(keys.shape[2] for keys in self.keys)

    def to_caches(self, windows: Sequence[Optional[int]]) -> list[KVCache]:
        """Per-layer ``KVCache``s holding the same positions (the slots keep their convention, position p
        in slot p % capacity, which is the window's when positions wrapped around). ``windows``: each
        layer's window (``[c.max_size for c in caches]``)."""
        offset = int(self.offset.item())
        caches = []
        for keys, values, window in zip(self.keys, self.values, windows):
            cache = KVCache(window)
            cache.keys, cache.values, cache.offset = keys, values, offset
            caches.append(cache)
        return caches

    @property
    def arrays(self) -> list[mx.array]:
        return self.keys + self.values + [self.offset]


def _layer_capacity(cache: KVCache, positions_needed: int, capacity: Optional[int]) -> int:
    """A layer's static slots: ``capacity`` (or ``static_capacity``'s), at most the layer's window."""
    if capacity is None:
        return static_capacity(positions_needed, cache.max_size)
    return capacity if cache.max_size is None else min(capacity, cache.max_size)


class CompiledDecoder:
    """``step(state, tokens)``: tokens (B, 1) -> logits (B, vocab) of the next position; advances ``state``."""

    def __init__(self, model):
        self.model = model
        self.fingerprint = _fingerprint(model)
        _prepare_decoding(model)
        self._compiled = mx.compile(self._forward)
        self._compiled_rows = mx.compile(self._forward_rows)

    def _forward(self, tokens, offset, keys, values):
        caches = [StaticKVCache(k, v, offset) for k, v in zip(keys, values)]
        logits = self.model(tokens, cache=caches)[:, -1, :]  # (B, vocab)
        return logits, [c.keys for c in caches], [c.values for c in caches]

    def _forward_rows(self, tokens, offset, keys, values, position_ids, attention_mask):
        caches = [StaticKVCache(k, v, offset) for k, v in zip(keys, values)]
        logits = self.model(tokens, cache=caches, position_ids=position_ids, attention_mask=attention_mask)[:, -1, :]
        return logits, [c.keys for c in caches], [c.values for c in caches]

    def step(self, state: DecodeState, tokens: mx.array, position_ids: Optional[mx.array] = None,
             attention_mask: Optional[mx.array] = None) -> mx.array:
        """``position_ids`` (B, 1) and ``attention_mask`` (B, capacity) over the slots' positions (0 for a
        row's left padding): rows of different prompt lengths (``generate_batch``), a graph of their own."""
        if position_ids is None and attention_mask is None:
            logits, state.keys, state.values = self._compiled(tokens, state.offset, state.keys, state.values)
        else:
            logits, state.keys, state.values = self._compiled_rows(tokens, state.offset, state.keys, state.values,
                                                                   position_ids, attention_mask)
        state.offset = state.offset + 1
        return logits


def decoder_for(model) -> CompiledDecoder:
    """The model's compiled decoder, built again when its weights, its mode (train/eval) or the settings
    changed."""
    decoder: Optional[CompiledDecoder] = model.__dict__.get("_compiled_decoder")
    if decoder is None or decoder.fingerprint != _fingerprint(model):
        decoder = CompiledDecoder(model)
        model.__dict__["_compiled_decoder"] = decoder
    return decoder


def _fingerprint(model) -> tuple:
    # Identity of every parameter array: the traced graph keeps them alive, so an id is never reused
    # while the decoder that recorded it exists.
    return (model.training, settings.current()) + tuple(id(v) for _, v in tree_flatten(model.parameters()))


def _prepare_decoding(model) -> None:
    """Build now what compiled decoding would otherwise rebuild on every token, inside ``mx.compile``
    where nothing can be cached: the group layouts of the layers that decode through
    ``mx.quantized_matmul``, the adapters cast to the compute dtype and laid out for the fused layer's
    kernels (``prepare_decoding`` of ``QuantizedLinear``, ``LoRALinear`` and ``DecoderLayer``), and the
    layers' scratches (``fused_decode.link``)."""
    dtype = model.model.embed_tokens.weight.dtype
    for _, module in model.named_modules():
        prepare = getattr(module, "prepare_decoding", None)
        if callable(prepare):
            prepare(dtype)
    layers = getattr(model, "layers", None)
    if layers is not None:
        fused_decode.link(layers, dtype)  # each layer's last launch writes the next one's A-products
