"""Building blocks: norms, rotary embeddings, MLPs, attention and the block, as pure functions.

Every function takes the `ModelConfig` and a plain dict of parameters; a
family difference is a flag (`norm`, `gated_mlp`, `qkv_bias`, ...), not a
subclass. The linen modules in `transformer.py` only declare these parameters
(stable, documented names and initializers); the math lives here once and is
used by training (a `lax.scan` over the stacked layers), scoring and the
decode path (layers unstacked once, q|k|v and gate|up fused, see
`transformer.decode_params`).

Per-layer parameter dict (`p`):

    attn_norm/{scale,bias}         [D]
    attn/q_proj/{kernel,bias}      [D, H, Dh], [H, Dh]
    attn/k_proj/{kernel,bias}      [D, K, Dh], [K, Dh]
    attn/v_proj/{kernel,bias}      [D, K, Dh], [K, Dh]
    attn/qkv_proj/{kernel,bias}    [D, (H + 2K) * Dh]      (decode layout: replaces q/k/v_proj)
    */kernel_scale                 [*out]                  (weight_quant="int8": kernel is int8, see jaxar.quant)
    attn/o_proj/{kernel,bias}      [H, Dh, D], [D]
    mlp_norm/{scale,bias}          [D]
    mlp/gate_proj/{kernel,bias}    [D, F]                  (gated_mlp)
    mlp/up_proj/{kernel,bias}      [D, F]
    mlp/gate_up_proj/{kernel,bias} [D, 2F]                 (decode layout: replaces gate/up_proj)
    mlp/down_proj/{kernel,bias}    [F, D]
    ada/{kernel,bias}              [C, 6D], [6D]           (cond_dim > 0: adaptive norms, zero-initialised)
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp

from jaxar.config import ModelConfig
from jaxar.quant import dequantize_kv, quantize_kv

NEG_INF = -1e30  # finite, so fully-masked rows give a uniform softmax instead of NaN
KV_CHUNK = 128  # cache slots per step of the online-softmax loop over the cache


def _dt(config: ModelConfig):
    return jnp.dtype(config.dtype)


def linear(p: dict, x, dtype, in_axes: int = 1):
    """`x @ kernel (+ bias)` over the last `in_axes` axes of x, in `dtype`.

    kernel [*in, *out]; the result is [..., *out]. An int8 kernel (with
    `kernel_scale [*out]`, see `jaxar.quant`) is converted inside the dot and
    its per-output-channel scale applied to the result, so the matmul reads
    the int8 buffer.
    """
    w = p["kernel"].astype(dtype)
    x = x.astype(dtype)
    contract = (tuple(range(x.ndim - in_axes, x.ndim)), tuple(range(in_axes)))
    if "kernel_scale" in p:
        y = jax.lax.dot_general(x, w, (contract, ((), ())), preferred_element_type=jnp.float32)
        y = (y * p["kernel_scale"].astype(jnp.float32)).astype(dtype)
    else:
        y = jax.lax.dot_general(x, w, (contract, ((), ())))
    if "bias" in p:
        y = y + p["bias"].astype(dtype)
    return y


def norm(config: ModelConfig, p: dict, x):
    """RMSNorm (Llama, Qwen2) or LayerNorm (GPT-2), computed in float32. p: scale [D] (+ bias [D])."""
    x32 = x.astype(jnp.float32)
    if config.norm == "rmsnorm":
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + config.norm_eps)
        y = y * p["scale"].astype(jnp.float32)
    else:
        mean = jnp.mean(x32, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
        y = (x32 - mean) * jax.lax.rsqrt(var + config.norm_eps)
        y = y * p["scale"].astype(jnp.float32) + p["bias"].astype(jnp.float32)
    return y.astype(config.dtype)


def rope_inverse_frequencies(config: ModelConfig) -> jax.Array:
    """Inverse frequencies [head_dim // 2], with 'linear' or 'llama3' scaling."""
    dim = config.dim_per_head
    inv_freq = 1.0 / (config.rope_theta ** (jnp.arange(0, dim, 2, dtype=jnp.float32) / dim))
    scaling = config.rope_scaling_dict
    if not scaling:
        return inv_freq
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "linear":
        return inv_freq / scaling["factor"]
    if kind == "llama3":
        factor = scaling["factor"]
        low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_len = scaling["original_max_position_embeddings"]
        low_wavelen, high_wavelen = old_len / low, old_len / high
        wavelen = 2 * math.pi / inv_freq
        scaled = jnp.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        return jnp.where(medium, smoothed, scaled)
    return inv_freq  # "default"


def apply_rope(x, positions, inv_freq):
    """Rotary embedding in the 'rotate half' layout Hugging Face Llama uses.

    x: [batch, T, heads, head_dim]; positions: [batch, T] int.
    """
    # [batch, T, head_dim // 2]
    angles = positions.astype(jnp.float32)[..., None] * inv_freq
    # [batch, T, 1, head_dim]
    angles = jnp.concatenate([angles, angles], axis=-1)[:, :, None, :]
    cos, sin = jnp.cos(angles), jnp.sin(angles)
    x32 = x.astype(jnp.float32)
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x32[..., half:], x32[..., :half]], axis=-1)
    return (x32 * cos + rotated * sin).astype(x.dtype)


def activation_fn(name: str):
    return {
        "silu": jax.nn.silu,
        "relu": jax.nn.relu,
        "gelu": lambda x: jax.nn.gelu(x, approximate=False),
        "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
        "gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    }[name]


def mlp(config: ModelConfig, p: dict, x):
    """Gated (SwiGLU: down(act(gate x) * up x)) or plain (GPT-2: down(act(up x)))."""
    dt, act = _dt(config), activation_fn(config.activation)
    if "gate_up_proj" in p:  # decode layout: one matmul for gate | up
        gate, up = jnp.split(linear(p["gate_up_proj"], x, dt), 2, axis=-1)
        h = act(gate) * up
    elif config.gated_mlp:
        h = act(linear(p["gate_proj"], x, dt)) * linear(p["up_proj"], x, dt)
    else:
        h = act(linear(p["up_proj"], x, dt))
    return linear(p["down_proj"], h, dt)


class AttentionInputs(NamedTuple):
    """What every layer's attention needs besides its own activations.

    - no cache (training, scoring): `order_ids [batch, T]` and `segment_ids
      [batch, T]` or None: key j is visible to query i iff order_ids[j] <=
      order_ids[i] and the segments agree (see `jaxar.models.masks`);
    - cached: `write_slots [batch, T]` (cache slot of each new token; out of
      range means dropped), `lengths [batch]` = valid entries per row after the
      write (the T new tokens included), `order_ids [batch, T]` among the new
      tokens (arange: causal; zeros: the new block sees itself fully), or an
      explicit `tree_mask [batch, T, T]`.
    """

    positions: jax.Array  # [batch, T]
    order_ids: Optional[jax.Array] = None
    segment_ids: Optional[jax.Array] = None
    write_slots: Optional[jax.Array] = None
    lengths: Optional[jax.Array] = None
    tree_mask: Optional[jax.Array] = None


def full_attention_mask(batch: int, T: int, segment_ids, order_ids=None) -> jax.Array:
    """[batch, T, T] bool: order_ids[k] <= order_ids[q] (default: causal), within a document when segments are given."""
    if order_ids is None:
        mask = jnp.broadcast_to(jnp.tril(jnp.ones((T, T), bool))[None], (batch, T, T))
    else:
        mask = order_ids[:, None, :] <= order_ids[:, :, None]
    if segment_ids is not None:
        mask = mask & (segment_ids[:, :, None] == segment_ids[:, None, :])
    return mask


def new_block_mask(T: int, order_ids=None, tree_mask=None):
    """[batch or 1, T, T] bool: which new tokens each new token sees (causal by default)."""
    if tree_mask is not None:
        return tree_mask
    if order_ids is None:
        return jnp.tril(jnp.ones((T, T), bool))[None]
    return order_ids[:, None, :] <= order_ids[:, :, None]


def _slots_mask(slots, lengths, T: int, block):
    """[batch, T, n] bool for new queries against cache slots `slots` [n].

    Query t of row b sits in slot `lengths[b] - T + t`; it sees every slot
    before the new block and, inside the block, what `block [B|1, T, T]` allows.
    """
    start = (lengths - T)[:, None, None]  # [B, 1, 1]
    rel = slots[None, None, :] - start  # [B, 1, n]: index among the new block
    in_block = (rel >= 0) & (rel < T)
    idx = jnp.broadcast_to(jnp.clip(rel, 0, T - 1), (lengths.shape[0], T, slots.shape[0]))
    seen = jnp.take_along_axis(jnp.broadcast_to(block, (lengths.shape[0], T, T)), idx, axis=2)
    return jnp.where(in_block, seen, rel < 0)


def cache_attention_mask(lengths, T: int, max_len: int, tree_mask=None, order_ids=None) -> jax.Array:
    """[batch, T, max_len] bool for T new queries against the cache.

    Query t of row b sits in slot `lengths[b] - T + t` and sees every slot up to
    its own (bottom-right-aligned causal). A tree mask (or order ids) replaces the
    causal pattern among the T new slots.
    """
    return _slots_mask(jnp.arange(max_len), lengths, T, new_block_mask(T, order_ids, tree_mask))


def xla_attention(q, k, v, mask, sm_scale):
    """Grouped-query attention in einsums.

    q: [B, T, H, Dh]; k, v: [B, S, K, Dh]; mask: [B, T, S] bool.
    """
    B, T, H, Dh = q.shape
    K = k.shape[2]
    G = H // K
    # [batch, T, kv_heads, group, head_dim]
    q = q.reshape(B, T, K, G, Dh)
    # [batch, kv_heads, group, T, S]
    logits = jnp.einsum("BTKGH,BSKH->BKGTS", q, k, preferred_element_type=jnp.float32) * sm_scale
    logits = jnp.where(mask[:, None, None, :, :], logits, NEG_INF)
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    # [batch, T, kv_heads, group, head_dim]
    out = jnp.einsum("BKGTS,BSKH->BTKGH", probs, v, preferred_element_type=jnp.float32)
    return out.reshape(B, T, H, Dh).astype(q.dtype)


def chunked_cache_attention(q, cache_k, cache_v, lengths, block, sm_scale, chunk: int = KV_CHUNK, scales=None):
    """Attention of T new queries over the cache, reading it only up to max(lengths).

    An online-softmax loop over `chunk`-slot pieces of the cache, as many as
    the longest row needs, so a step's cost follows the live tokens, not the
    buffer size. q: [B, T, H, Dh]; cache_k/v: [B, S, K, Dh] (S a multiple of
    chunk); lengths [B] valid slots after the write; block [B|1, T, T].
    scales: None, or (k_scale, v_scale) [B, S, K] of an int8 cache: the scores
    are multiplied by the key scales and the probabilities by the value
    scales, piece by piece (the dequantized cache is never built).
    """
    B, T, H, Dh = q.shape
    out_dtype = q.dtype if scales is not None else cache_v.dtype
    K = cache_k.shape[2]
    G = H // K
    # [batch, T, kv_heads, group, head_dim]
    q = q.reshape(B, T, K, G, Dh)
    n_chunks = (jnp.max(lengths) + chunk - 1) // chunk

    def body(carry):
        i, m, l, acc = carry
        start = i * chunk
        # [batch, chunk, kv_heads, head_dim]
        k = jax.lax.dynamic_slice_in_dim(cache_k, start, chunk, axis=1)
        v = jax.lax.dynamic_slice_in_dim(cache_v, start, chunk, axis=1)
        if scales is not None:
            k, v = k.astype(q.dtype), v.astype(q.dtype)
            # [batch, kv_heads, 1, 1, chunk]
            k_s, v_s = (jnp.transpose(jax.lax.dynamic_slice_in_dim(x, start, chunk, axis=1), (0, 2, 1))
                        [:, :, None, None] for x in scales)
        # [batch, kv_heads, group, T, chunk]
        s = jnp.einsum("BTKGH,BCKH->BKGTC", q, k, preferred_element_type=jnp.float32) * sm_scale
        if scales is not None:
            s = s * k_s
        seen = _slots_mask(start + jnp.arange(chunk), lengths, T, block)  # [B, T, chunk]
        s = jnp.where(seen[:, None, None], s, NEG_INF)
        m_new = jnp.maximum(m, jnp.max(s, axis=-1))
        p = jnp.exp(s - m_new[..., None])
        scale = jnp.exp(m - m_new)
        l = l * scale + jnp.sum(p, axis=-1)
        if scales is not None:
            p = p * v_s
        # [batch, kv_heads, group, T, head_dim]
        pv = jnp.einsum("BKGTC,BCKH->BKGTH", p.astype(v.dtype), v, preferred_element_type=jnp.float32)
        return i + 1, m_new, l, acc * scale[..., None] + pv

    m0 = jnp.full((B, K, G, T), NEG_INF, jnp.float32)
    init = (jnp.int32(0), m0, jnp.zeros_like(m0), jnp.zeros((B, K, G, T, Dh), jnp.float32))
    _, _, l, acc = jax.lax.while_loop(lambda c: c[0] < n_chunks, body, init)
    out = acc / jnp.maximum(l, 1e-30)[..., None]
    # [batch, T, heads, head_dim]
    return jnp.transpose(out, (0, 3, 1, 2, 4)).reshape(B, T, H, Dh).astype(out_dtype)


def project_qkv(config: ModelConfig, p: dict, x):
    """q [B, T, H, Dh], k and v [B, T, K, Dh] from x [B, T, D] (fused or separate projections)."""
    H, K, Dh = config.n_heads, config.num_kv_heads, config.dim_per_head
    dt = _dt(config)
    if "qkv_proj" in p:  # decode layout: one matmul for q | k | v
        qkv = linear(p["qkv_proj"], x, dt)
        q, k, v = jnp.split(qkv, [H * Dh, (H + K) * Dh], axis=-1)
        B, T = x.shape[:2]
        return q.reshape(B, T, H, Dh), k.reshape(B, T, K, Dh), v.reshape(B, T, K, Dh)
    return linear(p["q_proj"], x, dt), linear(p["k_proj"], x, dt), linear(p["v_proj"], x, dt)


def attention(config: ModelConfig, p: dict, x, inputs: AttentionInputs, layer_cache=None):
    """Multi-head / grouped-query attention with an explicit per-row KV cache.

    x: [B, T, D]; layer_cache: (k, v) each [B, S, K, Dh], or for an int8
    cache (k, v, k_scale, v_scale) with scales [B, S, K], or None.
    Returns (out [B, T, D], new layer_cache or None).
    """
    q, k, v = project_qkv(config, p, x)
    if config.position == "rope":
        inv_freq = rope_inverse_frequencies(config)
        q = apply_rope(q, inputs.positions, inv_freq)
        k = apply_rope(k, inputs.positions, inv_freq)
    sm_scale = 1.0 / math.sqrt(config.dim_per_head)
    if layer_cache is None:
        out, new_cache = _attend_full(config, q, k, v, inputs, sm_scale), None
    else:
        cache_k, cache_v = layer_cache[:2]
        # Only the T new slots of each row are written (a scatter into the
        # donated buffer); slots past max_len are dropped, never clamped.
        b_idx = jnp.arange(x.shape[0])[:, None]
        write = lambda buf, new: buf.at[b_idx, inputs.write_slots].set(new.astype(buf.dtype), mode="drop")  # noqa: E731
        scales = None
        if len(layer_cache) == 4:  # int8 cache: one scale per (token, kv head)
            (k, k_s), (v, v_s) = quantize_kv(k), quantize_kv(v)
            scales = (write(layer_cache[2], k_s), write(layer_cache[3], v_s))
        cache_k, cache_v = write(cache_k, k), write(cache_v, v)
        out = _attend_cache(config, q, cache_k, cache_v, inputs, sm_scale, scales)
        new_cache = (cache_k, cache_v) + (scales or ())
    return linear(p["o_proj"], out, _dt(config), in_axes=2), new_cache


def _attend_full(config, q, k, v, inputs, sm_scale):
    backend = config.attention_backend
    B, T = q.shape[:2]
    if backend == "pallas":
        from pallas_kernels.flash_attention import flash_attention

        # Order ids (block-causal, prefix, bidirectional) are the kernel's block-ids mode.
        return flash_attention(q, k, v, causal=True, segment_ids=inputs.segment_ids, block_ids=inputs.order_ids,
                               sm_scale=sm_scale, interpret=jax.default_backend() == "cpu")
    mask = full_attention_mask(B, T, inputs.segment_ids, inputs.order_ids)
    if backend == "cudnn":
        return jax.nn.dot_product_attention(q, k, v, mask=mask[:, None], scale=sm_scale, implementation="cudnn")
    return xla_attention(q, k, v, mask, sm_scale)


def _attend_cache(config, q, cache_k, cache_v, inputs, sm_scale, scales=None):
    T, S = q.shape[1], cache_k.shape[1]
    block = new_block_mask(T, inputs.order_ids, inputs.tree_mask)
    if config.attention_backend == "pallas":
        from pallas_kernels.decode_attention import decode_attention

        extent = None
        if inputs.tree_mask is None and inputs.order_ids is not None:
            # Non-decreasing order ids (what Mask.order_ids gives for every kind; block ids must be
            # sorted): new token t sees the new tokens j < extent[t] = #{j: ids[j] <= ids[t]}; all
            # ids equal (a VAR scale) -> T. One int per query instead of a [T, T] tree of bit words.
            ids = inputs.order_ids
            extent = jnp.sum(ids[:, None, :] <= ids[:, :, None], axis=-1, dtype=jnp.int32)
        return decode_attention(q, cache_k, cache_v, inputs.lengths, sm_scale=sm_scale, tree_mask=inputs.tree_mask,
                                new_extent=extent, interpret=jax.default_backend() == "cpu")
    if S > KV_CHUNK and S % KV_CHUNK == 0:
        return chunked_cache_attention(q, cache_k, cache_v, inputs.lengths, block, sm_scale, scales=scales)
    if scales is not None:
        cache_k, cache_v = (dequantize_kv(c, s).astype(q.dtype) for c, s in zip((cache_k, cache_v), scales))
    mask = _slots_mask(jnp.arange(S), inputs.lengths, T, block)
    return xla_attention(q, cache_k, cache_v, mask, sm_scale)


def adaptive_terms(config: ModelConfig, p: dict, cond):
    """AdaLN terms from the per-row conditioning vector cond [B, C] (VAR / DiT style).

    Returns six [B, 1, D] arrays (shift/scale/gate for attention and MLP), all
    zero for zero-initialised `ada` params, so the block starts as the plain one.
    """
    terms = linear(p["ada"], jax.nn.silu(cond.astype(_dt(config))), _dt(config))
    return [t[:, None, :] for t in jnp.split(terms, 6, axis=-1)]


def block(config: ModelConfig, p: dict, x, inputs: AttentionInputs, layer_cache=None, cond=None):
    """Pre-norm residual block. x [B, T, D] -> (x, new layer_cache or None).

    With `cond` (config.cond_dim > 0): norm(x) * (1 + scale) + shift before
    attention / MLP, and each branch scaled by (1 + gate).
    """
    if cond is not None and "ada" in p:
        a_shift, a_scale, a_gate, m_shift, m_scale, m_gate = adaptive_terms(config, p, cond)
        h = norm(config, p["attn_norm"], x) * (1 + a_scale) + a_shift
        h, layer_cache = attention(config, p["attn"], h, inputs, layer_cache)
        x = x + h * (1 + a_gate)
        h = norm(config, p["mlp_norm"], x) * (1 + m_scale) + m_shift
        return x + mlp(config, p["mlp"], h) * (1 + m_gate), layer_cache
    h, layer_cache = attention(config, p["attn"], norm(config, p["attn_norm"], x), inputs, layer_cache)
    x = x + h
    return x + mlp(config, p["mlp"], norm(config, p["mlp_norm"], x)), layer_cache
