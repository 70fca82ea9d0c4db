"""Int8 inference: weight-only quantization and the int8 KV cache.

Weights (`ModelConfig.weight_quant = "int8"`): symmetric, one float32 scale
per output channel, `scale = max |w| over the input axes / 127`,
`w_int8 = round(w / scale)` in [-127, 127]. A quantized linear leaf is

    {"kernel": int8 [*in, *out], "kernel_scale": float32 [*out] (, "bias": float)}

and `layers.linear` computes `(x @ kernel.astype(dtype)) * kernel_scale`: the
scale is applied after the dot, so the matmul reads the int8 buffer and the
dequantized matrix need not be materialised. Whether it is depends on the
backend's fusion: XLA:CPU (jax 0.10) converts the int8 kernel into a float
buffer before its dot (checked in the optimized HLO), so on CPU int8 weights
save memory at rest but not bandwidth per step; XLA:GPU can fuse the convert
into the Triton GEMM (not measured here). Quantized: every attention and MLP
kernel (fused or not), `lm_head/kernel`, and the embedding table per row
(`embed/embedding_scale [V]`): a row is both an input embedding
(`table[token] * scale[token]`) and, with tied embeddings, one output channel
of the head, the biggest matrix of small models such as SmolLM2. Left in
float: norms, biases, learned positions and the adaptive-norm (`ada`) terms.

KV cache (`ModelConfig.kv_cache_dtype = "int8"`): each new key / value vector
of one token and one kv head is stored as int8 with its own float32 scale
(`quantize_kv`); attention multiplies the scores by the key scales and the
probabilities by the value scales chunk by chunk, so it reads int8 buffers.

Both are inference switches; `quantize_params` is applied once, outside jit,
by `transformer.decode_params` (hence by `generate`, `beam_search` and
`speculative_generate`), and `forward` applies it itself to float params.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxar.config import ModelConfig

INT8_MAX = 127.0

# Linear layers under each decode-layout layer, with the number of input axes of their kernels.
_LAYER_LINEARS = {
    ("attn", "qkv_proj"): 1, ("attn", "q_proj"): 1, ("attn", "k_proj"): 1, ("attn", "v_proj"): 1,
    ("attn", "o_proj"): 2,
    ("mlp", "gate_up_proj"): 1, ("mlp", "gate_proj"): 1, ("mlp", "up_proj"): 1, ("mlp", "down_proj"): 1,
}


def quantize_weight(w, in_axes: int = 1):
    """`(w_int8 [*in, *out], scale float32 [*out])`: symmetric per output channel over the first `in_axes` axes."""
    w32 = w.astype(jnp.float32)
    amax = jnp.max(jnp.abs(w32), axis=tuple(range(in_axes)))
    scale = jnp.where(amax > 0, amax / INT8_MAX, 1.0)
    q = jnp.clip(jnp.round(w32 / scale), -INT8_MAX, INT8_MAX).astype(jnp.int8)
    return q, scale


def dequantize_weight(q, scale):
    """float32 `q * scale`, the scale broadcast over the leading (input) axes."""
    return q.astype(jnp.float32) * scale.astype(jnp.float32)


def quantize_kv(x):
    """`(x_int8, scale float32 x.shape[:-1])`: one symmetric scale per vector of the last axis (head_dim)."""
    x32 = x.astype(jnp.float32)
    amax = jnp.max(jnp.abs(x32), axis=-1)
    scale = jnp.where(amax > 0, amax / INT8_MAX, 1.0)
    q = jnp.clip(jnp.round(x32 / scale[..., None]), -INT8_MAX, INT8_MAX).astype(jnp.int8)
    return q, scale


def dequantize_kv(q, scale):
    return q.astype(jnp.float32) * scale[..., None]


def is_quantized(params) -> bool:
    """Whether `params` already hold int8 weights (`quantize_params` output)."""
    return "embedding_scale" in params.get("embed", {})


def _quantize_linear(p: dict, in_axes: int) -> dict:
    q, scale = quantize_weight(p["kernel"], in_axes)
    return {**p, "kernel": q, "kernel_scale": scale}


def quantize_decode_layout(params: dict) -> dict:
    """Int8 weights for params already in the decode layout (`layers` a tuple of per-layer dicts)."""
    if is_quantized(params):
        return params
    return _quantize_decode_layout(params)


@jax.jit
def _quantize_decode_layout(params: dict) -> dict:
    layers = []
    for p in params["layers"]:
        p = {k: dict(v) if isinstance(v, dict) else v for k, v in p.items()}
        for (group, name), in_axes in _LAYER_LINEARS.items():
            if name in p.get(group, {}):
                p[group][name] = _quantize_linear(p[group][name], in_axes)
        layers.append(p)
    return {**_quantize_head(params), "layers": tuple(layers)}


def quantize_params(params: dict, config: ModelConfig, layout: str = "decode") -> dict:
    """Params with int8 weights (see the module docstring); done once, outside jit.

    layout="decode" (default): the decode layout (`transformer.decode_params`), what generate and
    speculative decoding run; from the stacked or the decode layout. layout="stacked": the stacked
    (training) tree kept, each layer's kernels with their own scales ([L, *out]), for scoring without a
    cache with `scan_layers=True`; decode_params later fuses it as it is. Quantized params are returned
    as they are. Use them with `config.replace(weight_quant="int8")`.
    """
    from jaxar.models.transformer import decode_params, is_decode_layout

    if layout == "decode":
        return decode_params(params, config.replace(weight_quant="int8"))
    if layout != "stacked":
        raise ValueError(f"layout must be 'decode' or 'stacked', got {layout!r}")
    if is_decode_layout(params):
        raise ValueError("layout='stacked' needs stacked params (the training layout), got the decode layout")
    return params if is_quantized(params) else _quantize_stacked(params)


@jax.jit
def _quantize_stacked(params: dict) -> dict:
    layers = {k: dict(v) if isinstance(v, dict) else v for k, v in params["layers"].items()}
    for (group, name), in_axes in _LAYER_LINEARS.items():
        if name in layers.get(group, {}):
            # [L, *in, *out]: the leading layer axis is a batch of kernels, each with its own scales
            layers[group][name] = jax.vmap(lambda p, n=in_axes: _quantize_linear(p, n))(layers[group][name])
    return {**_quantize_head(params), "layers": layers}


def _quantize_head(params: dict) -> dict:
    out = dict(params)
    table, scale = quantize_weight(params["embed"]["embedding"].T, in_axes=1)  # per row of [V, D]
    out["embed"] = {**params["embed"], "embedding": table.T, "embedding_scale": scale}
    if "lm_head" in params:
        out["lm_head"] = _quantize_linear(params["lm_head"], 1)
    return out


__all__ = ["dequantize_kv", "dequantize_weight", "is_quantized", "quantize_decode_layout", "quantize_kv",
           "quantize_params", "quantize_weight"]
