"""A decoder layer over a long sequence in tiles of tokens, so that its activations are per tile, not per sequence.

Everything in a decoder layer but attention acts on each token alone: the norms, the projections, the
rotary embedding, the residuals and the MLP. Over L tokens their activations, kept for the backward pass,
are many (L, hidden) and (L, intermediate) arrays: measured on the CPU, about 50 hidden-sized rows per
token for one layer's forward and backward, against one row per token for the layer's input that gradient
checkpointing keeps. Here the layer runs as

1. per tile of ``tile`` tokens: norm, q/k/v projections (fused or not, biases), q/k norms, rotary
   (``Attention.heads``; only the input and q, k, v are kept);
2. attention over the whole sequence through the seam with the layer's own window and soft-cap
   (block-wise for long sequences: it keeps q, k, v, its output and one log-sum-exp per row);
3. per tile: o projection, then ``DecoderLayer.after_attention`` (residuals, the norms, sandwich norms
   included, and the MLP: SwiGLU, GeGLU or fused gate_up), checkpointed the same way;

so that one tile's activations exist at a time, in the forward pass and in the backward pass, at the
price of computing the per-token parts' forward once more. ``DecoderLayer`` takes this path without a
cache when the sequence is longer than ``settings.layer_tile`` tokens; the result is the same as the
plain layer's up to float rounding (the same operations on slices of the sequence). Phi-3's ``longrope``
is refused (the layer runs whole): it picks its RoPE factors from the length of the call, which a tile
would see as its own.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import mlx.core as mx
from mlx.utils import tree_flatten, tree_unflatten

from .. import settings
from .attention import scaled_dot_product_attention


def applies(layer, x: mx.array, cache) -> bool:
    """Whether ``layer`` over ``x`` (B, L, D) runs in tiles: no cache, L over ``settings.layer_tile``, and not
    ``longrope`` (whose factors follow the whole call's length)."""
    tile = settings.current().layer_tile
    return cache is None and tile > 0 and x.shape[1] > tile and layer.self_attn._rope_long_inv_freq is None


def layer_forward(layer, x: mx.array, mask_fn, position_ids: Optional[mx.array] = None) -> mx.array:
    """``layer`` (a ``DecoderLayer``) over x (B, L, D) -> (B, L, D), the per-token parts a tile at a time."""
    attn = layer.self_attn
    B, L, D = x.shape
    tile = settings.current().layer_tile
    H, Hkv, hd = attn.n_heads, attn.n_kv_heads, attn.head_dim

    def qkv(start: int, params, xt):
        layer.update(params)
        positions = None if position_ids is None else position_ids[:, start:start + xt.shape[1]]
        q, k, v = attn.heads(layer.input_layernorm(xt), start, positions)
        return mx.concatenate([q, k, v], axis=1)  # (B, H + 2 Hkv, Lt, hd): one output per tile

    def rest(start: int, params, xt):
        layer.update(params)
        x_in, attended = xt[..., :D], xt[..., D:]  # (B, Lt, D), (B, Lt, H*hd)
        return layer.after_attention(x_in, attn.o_proj(attended))

    # Each tile function gets the trainable arrays it reads (LoRA's, or all in full fine-tuning); their
    # gradients are summed over tiles.
    trainable = layer.trainable_parameters()
    attn_params = trainable.get("self_attn", {})
    qkv_params = {"self_attn": {name: p for name, p in attn_params.items() if name != "o_proj"},
                  "input_layernorm": trainable.get("input_layernorm", {})}
    rest_params = {name: p for name, p in trainable.items() if name not in ("self_attn", "input_layernorm")}
    rest_params["self_attn"] = {"o_proj": attn_params.get("o_proj", {})}
    heads = in_tiles(qkv, tile, output_axis=2)(qkv_params, x)  # (B, H + 2 Hkv, L, hd)
    # split: one concatenation in the backward pass, where three slices give three (B, H + 2 Hkv, L, hd) arrays
    q, k, v = mx.split(heads, [H, H + Hkv], axis=1)
    mask = mask_fn(None, attn.sliding_window)
    out = scaled_dot_product_attention(q, k, v, attn.scale, mask, None, layer.training, attn.softcap)
    out = out.transpose(0, 2, 1, 3).reshape(B, L, H * hd).astype(x.dtype)  # (B, L, H*hd)
    return in_tiles(rest, tile, output_axis=1)(rest_params, mx.concatenate([x, out], axis=-1))


def in_tiles(fn: Callable[[int, Any, mx.array], mx.array], tile: int, output_axis: int):
    """``fn(start, params, x_tile) -> y_tile`` over x (B, L, ...) a tile of ``tile`` tokens at a time, as one
    function ``(params, x) -> y`` (tiles concatenated on ``output_axis``) that keeps only ``params``, ``x``
    and ``y`` for the backward pass. There each tile is recomputed and differentiated once the previous
    tile's gradients are all done, so one tile's activations exist at a time; the parameters' gradients
    are summed over the tiles."""

    @mx.custom_function
    def run(params, x):
        outs = []
        for start in range(0, x.shape[1], tile):
            xt = x[:, start:start + tile]
            if outs:  # one tile at a time: MLX would otherwise run independent tiles side by side
                xt = mx.depends(xt, [outs[-1]])
            outs.append(fn(start, params, xt))
        return mx.concatenate(outs, axis=output_axis)

    @run.vjp
    def run_vjp(primals, cotangent, output):
        params, x = primals
        flat = tree_flatten(params)
        keys = [k for k, _ in flat]
        param_grads, x_grads, after = None, [], [cotangent]
        for start in range(0, x.shape[1], tile):
            stop = min(start + tile, x.shape[1])
            # The tile's recomputation waits for the previous tile's gradients (or for the cotangent).
            arrays = mx.depends([a for _, a in flat] + [x[:, start:stop]], after)
            index = [slice(None)] * cotangent.ndim
            index[output_axis] = slice(start, stop)

            def tile_fn(*arrays, start=start):
                return fn(start, tree_unflatten(list(zip(keys, arrays[:-1]))), arrays[-1])

            _, grads = mx.vjp(tile_fn, arrays, [cotangent[tuple(index)]])
            param_grads = grads[:-1] if param_grads is None else [a + b for a, b in zip(param_grads, grads[:-1])]
            x_grads.append(grads[-1])
            after = list(grads)
        return tree_unflatten(list(zip(keys, param_grads))), mx.concatenate(x_grads, axis=1)

    return run

