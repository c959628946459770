"""The pieces of our decoder layer: RMSNorm, rotary embeddings, attention, SwiGLU/GeGLU MLP.

The layers read as the plain math; each operation that has a fast path calls its seam once, which picks
the kernel where it applies: ``quant/matmul.py`` for the projections (``project``, ``swiglu``, and every
4-bit layer's own call), ``attention.py`` for attention, ``fused_decode.py`` for a whole decoder layer of
compiled CUDA decoding.
"""

from __future__ import annotations

import math
from typing import Optional, Union

import mlx.core as mx
import mlx.nn as nn

from ..quant.matmul import project, swiglu
from . import fused_decode, tiled
from .args import ModelArgs
from .attention import scaled_dot_product_attention
from .cache import KVCache


class RMSNorm(nn.Module):
    """``weight * x / sqrt(mean(x^2) + eps)`` over the last axis.

    ``offset`` (Gemma: 1) makes the factor ``offset + weight``, computed in float32 and rounded once to
    x's dtype, as transformers' Gemma norms do; the stored weight stays the checkpoint's."""

    def __init__(self, dims: int, eps: float = 1e-5, offset: float = 0.0):
        super().__init__()
        self.weight = mx.ones((dims,)) if offset == 0 else mx.zeros((dims,))
        self.eps = eps
        self.offset = offset

    def __call__(self, x: mx.array) -> mx.array:
        if self.offset == 0:
            return mx.fast.rms_norm(x, self.weight, self.eps)
        factor = self.offset + self.weight.astype(mx.float32)
        return mx.fast.rms_norm(x.astype(mx.float32), factor, self.eps).astype(x.dtype)


def softcap(x: mx.array, cap: float) -> mx.array:
    """``cap * tanh(x / cap)``: values squashed smoothly into (-cap, cap) (Gemma 2's logits and scores)."""
    return mx.tanh(x / cap) * cap


def llama3_inv_freq(args: ModelArgs) -> mx.array:
    """Llama 3.1's RoPE inverse frequencies (D/2,), as transformers' ``_compute_llama3_parameters``.

    Wavelengths shorter than ``original_max_position_embeddings / high_freq_factor`` keep their frequency,
    those longer than ``original / low_freq_factor`` are divided by ``factor``, and those between move
    smoothly from one to the other."""
    dims = args.head_dim
    inv_freq = 1.0 / (args.rope_theta ** (mx.arange(0, dims, 2, dtype=mx.float32) / dims))  # (D/2,)
    factor, low, high = args.rope_scaling_factor, args.rope_low_freq_factor, args.rope_high_freq_factor
    original = args.rope_original_max_position_embeddings
    wavelen = 2 * math.pi / inv_freq
    scaled = mx.where(wavelen > original / low, inv_freq / factor, inv_freq)
    smooth = (original / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= original / high) & (wavelen <= original / low)
    return mx.where(medium, smoothed, scaled)


def longrope_inv_freq(args: ModelArgs, factors) -> mx.array:
    """Phi-3's ``longrope`` inverse frequencies (R/2,) over the R rotated dimensions: theta's, each divided by
    its factor (``rope_short_factor`` or ``rope_long_factor``), as transformers' ``_compute_longrope_parameters``."""
    dims = args.rotary_dims
    return 1.0 / (mx.array(factors, dtype=mx.float32) * args.rope_theta ** (mx.arange(0, dims, 2, dtype=mx.float32) / dims))


def rope(x: mx.array, theta: float, scale: float, offset: Union[int, mx.array] = 0,
         position_ids: Optional[mx.array] = None, inv_freq: Optional[mx.array] = None,
         dims: Optional[int] = None) -> mx.array:
    """Rotate halves of the first ``dims`` (default: all) dimensions of x (B, H, L, D) by position, as Hugging
    Face's ``rotate_half`` (on its ``q_rot`` part when rotary embeddings are partial); the rest pass unchanged.

    Positions are ``offset + arange(L)`` (offset an int or an int32 scalar array) or ``position_ids`` (B, L).
    ``scale`` multiplies positions. ``inv_freq`` (dims/2,), when given, replaces ``theta``'s frequencies
    (``llama3_inv_freq``, ``longrope_inv_freq``).
    """
    dims = dims or x.shape[-1]
    if position_ids is None:
        if inv_freq is not None:  # mx.fast.rope's freqs are the angle's divisors
            return mx.fast.rope(x, dims, traditional=False, base=None, scale=scale, offset=offset,
                                freqs=1.0 / inv_freq)
        return mx.fast.rope(x, dims, traditional=False, base=theta, scale=scale, offset=offset)
    if inv_freq is None:
        inv_freq = 1.0 / (theta ** (mx.arange(0, dims, 2, dtype=mx.float32) / dims))  # (dims/2,)
    angles = (position_ids.astype(mx.float32) * scale)[:, None, :, None] * inv_freq  # (B, 1, L, dims/2)
    cos, sin = mx.cos(angles).astype(x.dtype), mx.sin(angles).astype(x.dtype)
    x1, x2, rest = x[..., : dims // 2], x[..., dims // 2 : dims], x[..., dims:]
    return mx.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin, rest], axis=-1)


class Attention(nn.Module):
    """Grouped-query self-attention with rotary embeddings; biases on the projections (``qkv_bias``,
    ``attention_bias``), RMSNorm over each query and key head before RoPE (``qk_norm``, with the model's
    norm offset), the layer's own sliding window (``ModelArgs.layer_window``) and RoPE base
    (``ModelArgs.layer_rope_theta``), and Gemma's attention scale and score soft-cap where the config asks
    for them."""

    def __init__(self, args: ModelArgs, layer_index: int = 0):
        super().__init__()
        self.n_heads = args.num_attention_heads
        self.n_kv_heads = args.num_key_value_heads
        self.head_dim = args.head_dim
        self.scale = (args.query_pre_attn_scalar or self.head_dim) ** -0.5
        self.args, self.layer_index = args, layer_index
        self.softcap = args.attn_logit_softcapping
        self.rope_theta, scaled = args.layer_rope_theta(layer_index)
        self.rope_scale = 1.0 if args.rope_type == "llama3" or not scaled else 1.0 / args.rope_scaling_factor
        # Scaled frequencies (the leading underscore keeps them out of the parameters); None: plain RoPE.
        self._rope_inv_freq = llama3_inv_freq(args) if args.rope_type == "llama3" and scaled else None
        self.rotary_dims = args.rotary_dims
        self.rope_attention_factor = args.rope_attention_factor if args.rope_type == "longrope" else 1.0
        self._rope_long_inv_freq = None
        if args.rope_type == "longrope":  # short factors up to the original length, long ones past it
            self._rope_inv_freq = longrope_inv_freq(args, args.rope_short_factor)
            self._rope_long_inv_freq = longrope_inv_freq(args, args.rope_long_factor)
            self._rope_original = args.rope_original_max_position_embeddings
        qkv_bias = args.qkv_bias or args.attention_bias
        if args.fused_projections:  # Phi-3: the rows of q, then k, then v
            self.qkv_proj = nn.Linear(args.hidden_size, (self.n_heads + 2 * self.n_kv_heads) * self.head_dim,
                                      bias=qkv_bias)
        else:
            self.q_proj = nn.Linear(args.hidden_size, self.n_heads * self.head_dim, bias=qkv_bias)
            self.k_proj = nn.Linear(args.hidden_size, self.n_kv_heads * self.head_dim, bias=qkv_bias)
            self.v_proj = nn.Linear(args.hidden_size, self.n_kv_heads * self.head_dim, bias=qkv_bias)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, args.hidden_size, bias=args.attention_bias)
        if args.qk_norm:  # Gemma 3's are the 1 + weight kind
            self.q_norm = RMSNorm(self.head_dim, args.rms_norm_eps, args.norm_weight_offset)
            self.k_norm = RMSNorm(self.head_dim, args.rms_norm_eps, args.norm_weight_offset)

    def __call__(
        self,
        x: mx.array,
        mask_fn,
        cache: Optional[KVCache] = None,
        position_ids: Optional[mx.array] = None,
    ) -> mx.array:
        """x (B, L, D) -> (B, L, D). ``mask_fn(key_positions or None, window) -> mask`` builds the attention
        mask for this layer's window."""
        B, L, _ = x.shape
        offset = cache.offset if cache is not None else 0
        q, k, v = self.heads(x, offset, position_ids)
        key_positions = None
        if cache is not None:
            k, v, key_positions = cache.update(k, v)  # (B, Hkv, S, hd)
        mask = mask_fn(key_positions, self.sliding_window)
        out = scaled_dot_product_attention(q, k, v, self.scale, mask, cache, self.training, self.softcap)
        out = out.transpose(0, 2, 1, 3).reshape(B, L, self.n_heads * self.head_dim)  # (B, L, H*hd)
        return self.o_proj(out)

    def heads(self, x: mx.array, offset, position_ids: Optional[mx.array] = None):
        """x (B, L, D) -> q (B, H, L, hd), k and v (B, Hkv, L, hd): the projections, the q/k norms and RoPE at
        positions ``offset + arange(L)`` (or ``position_ids``), before the cache and attention."""
        B, L, _ = x.shape
        heads = (self.n_heads, self.n_kv_heads, self.n_kv_heads)
        if "qkv_proj" in self:
            q_end, k_end = self.n_heads * self.head_dim, (self.n_heads + self.n_kv_heads) * self.head_dim
            qkv = mx.split(self.qkv_proj(x), [q_end, k_end], axis=-1)  # (B, L, H*hd), (B, L, Hkv*hd) x 2
            q, k, v = (y.reshape(B, L, n, -1).transpose(0, 2, 1, 3) for y, n in zip(qkv, heads))
        else:
            q, k, v = project([self.q_proj, self.k_proj, self.v_proj], x, heads)  # (B, H, L, hd), (B, Hkv, L, hd) x 2
        if "q_norm" in self:  # per head, over hd
            q, k = self.q_norm(q), self.k_norm(k)
        return self._rotate(q, offset, position_ids), self._rotate(k, offset, position_ids), v

    @property
    def sliding_window(self) -> Optional[int]:
        """This layer's window (None: full attention), read from ``args`` when asked (``layer_window``)."""
        return self.args.layer_window(self.layer_index)

    def _rotate(self, x: mx.array, offset, position_ids: Optional[mx.array]) -> mx.array:
        """RoPE on x (B, H, L, hd) with this layer's frequencies: ``longrope`` takes its long factors for the
        whole call once the sequence (the largest position + 1) passes the original length, as transformers'
        ``longrope_frequency_update``, and multiplies the rotated dimensions by its attention factor."""
        inv_freq = self._rope_inv_freq
        if self._rope_long_inv_freq is not None:
            length = position_ids.max() + 1 if position_ids is not None else offset + x.shape[2]
            if isinstance(length, int):
                inv_freq = self._rope_long_inv_freq if length > self._rope_original else inv_freq
            else:
                inv_freq = mx.where(length > self._rope_original, self._rope_long_inv_freq, inv_freq)
        x = rope(x, self.rope_theta, self.rope_scale, offset, position_ids, inv_freq, self.rotary_dims)
        if self.rope_attention_factor != 1.0:
            d = self.rotary_dims
            x = mx.concatenate([x[..., :d] * self.rope_attention_factor, x[..., d:]], axis=-1)
        return x


class MLP(nn.Module):
    """SwiGLU: ``down(silu(gate(x)) * up(x))``; GeGLU (Gemma) with ``gelu_pytorch_tanh`` for silu; gate and
    up one ``gate_up_proj`` (its first and second half of rows) with ``fused_projections`` (Phi-3)."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.geglu = args.hidden_act == "gelu_pytorch_tanh"
        if args.fused_projections:
            self.gate_up_proj = nn.Linear(args.hidden_size, 2 * args.intermediate_size, bias=False)
        else:
            self.gate_proj = nn.Linear(args.hidden_size, args.intermediate_size, bias=False)
            self.up_proj = nn.Linear(args.hidden_size, args.intermediate_size, bias=False)
        self.down_proj = nn.Linear(args.intermediate_size, args.hidden_size, bias=False)

    def __call__(self, x: mx.array) -> mx.array:
        """x (..., D) -> (..., D)."""
        act = nn.gelu_approx if self.geglu else nn.silu
        if "gate_up_proj" in self:
            gate, up = mx.split(self.gate_up_proj(x), 2, axis=-1)  # (..., F) each
            return self.down_proj(act(gate) * up)
        if self.geglu:  # the fused gate/up launch computes silu: GeGLU runs layer by layer
            return self.down_proj(act(self.gate_proj(x)) * self.up_proj(x))
        return self.down_proj(swiglu(self.gate_proj, self.up_proj, x))


class DecoderLayer(nn.Module):
    """Pre-norm residual block: attention then MLP; ``layer_index`` picks the layer's window. With
    ``sandwich_norms`` (Gemma 2/3) the attention's output is normed by ``post_attention_layernorm`` before
    the residual sum, and the MLP sits between ``pre_feedforward_layernorm`` and
    ``post_feedforward_layernorm``."""

    def __init__(self, args: ModelArgs, layer_index: int = 0):
        super().__init__()
        self.self_attn = Attention(args, layer_index)
        self.mlp = MLP(args)
        norm = lambda: RMSNorm(args.hidden_size, eps=args.rms_norm_eps, offset=args.norm_weight_offset)  # noqa: E731
        self.input_layernorm = norm()
        self.post_attention_layernorm = norm()
        self.sandwich_norms = args.sandwich_norms
        if args.sandwich_norms:
            self.pre_feedforward_layernorm = norm()
            self.post_feedforward_layernorm = norm()

    def prepare_decoding(self, dtype: mx.Dtype) -> None:
        """Before compiled decoding in ``dtype``: the fused layer's low-rank terms (``fused_decode.prepare``)."""
        fused_decode.prepare(self, dtype)

    def __call__(self, x: mx.array, mask_fn, cache: Optional[KVCache] = None, position_ids=None) -> mx.array:
        """x (B, L, D) -> (B, L, D)."""
        if fused_decode.applies(self, x, cache, position_ids):
            return fused_decode.layer_step(self, x, cache)  # compiled CUDA decoding: six launches
        if tiled.applies(self, x, cache):
            return tiled.layer_forward(self, x, mask_fn, position_ids)  # long sequences: a tile of tokens at a time
        return self.after_attention(x, self.self_attn(self.input_layernorm(x), mask_fn, cache, position_ids))

    def after_attention(self, x: mx.array, attn: mx.array) -> mx.array:
        """The layer's input x (B, L, D) and its attention's output (B, L, D) -> the layer's output: the
        residual sums and the MLP between their norms (each token on its own; ``tiled.py`` runs it in tiles)."""
        if self.sandwich_norms:
            h = x + self.post_attention_layernorm(attn)
            return h + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(h)))
        h = x + attn
        return h + self.mlp(self.post_attention_layernorm(h))
