"""Building blocks: norms, rotary embeddings, MLPs and attention.

Every module is configured by the `ModelConfig` it carries; a family
difference is a flag (`norm`, `gated_mlp`, `qkv_bias`, ...), not a subclass.
Parameter names and shapes are stable and documented, because the Hugging
Face converter and the sharding rules address them by name.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxar.config import ModelConfig

NEG_INF = -1e30  # finite, so fully-masked rows give a uniform softmax instead of NaN


def _init(config: ModelConfig):
    return nn.initializers.normal(stddev=config.initializer_range)


class Norm(nn.Module):
    """RMSNorm (Llama, Qwen2) or LayerNorm (GPT-2), computed in float32.

    Params: `scale [D]`, and `bias [D]` for LayerNorm.
    """

    config: ModelConfig

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        d = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (d,), jnp.dtype(cfg.param_dtype))
        x32 = x.astype(jnp.float32)
        if cfg.norm == "rmsnorm":
            y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + cfg.norm_eps)
            y = y * scale.astype(jnp.float32)
        else:
            bias = self.param("bias", nn.initializers.zeros, (d,), jnp.dtype(cfg.param_dtype))
            mean = jnp.mean(x32, axis=-1, keepdims=True)
            var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
            y = (x32 - mean) * jax.lax.rsqrt(var + cfg.norm_eps)
            y = y * scale.astype(jnp.float32) + bias.astype(jnp.float32)
        return y.astype(cfg.dtype)


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


class MLP(nn.Module):
    """Gated (SwiGLU: down(act(gate x) * up x)) or plain (GPT-2: down(act(up x))).

    Params: `gate_proj.kernel [D, F]` (gated only), `up_proj.kernel [D, F]`,
    `down_proj.kernel [F, D]`, with `bias` when `mlp_bias`.
    """

    config: ModelConfig

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        dense = lambda features, name: nn.Dense(  # noqa: E731
            features, use_bias=cfg.mlp_bias, dtype=cfg.dtype, param_dtype=jnp.dtype(cfg.param_dtype),
            kernel_init=_init(cfg), name=name)
        act = activation_fn(cfg.activation)
        if cfg.gated_mlp:
            h = act(dense(cfg.mlp_dim, "gate_proj")(x)) * dense(cfg.mlp_dim, "up_proj")(x)
        else:
            h = act(dense(cfg.mlp_dim, "up_proj")(x))
        return dense(cfg.d_model, "down_proj")(h)


class AttentionInputs(NamedTuple):
    """What every layer's attention needs besides its own activations.

    Exactly one of the two modes is set up by the transformer:
    - training / full forward (no cache): `segment_ids [batch, T]` or None;
    - cached: `write_slots [batch, T]` (cache slot of each new token; out of
      range means dropped) and `lengths [batch]` = valid entries per row after
      the write (the T new tokens included), optional `tree_mask [batch, T, T]`.
    """

    positions: jax.Array  # [batch, T]
    segment_ids: Optional[jax.Array] = None
    write_slots: Optional[jax.Array] = None
    lengths: Optional[jax.Array] = None
    tree_mask: Optional[jax.Array] = None


def full_attention_mask(batch: int, T: int, segment_ids) -> jax.Array:
    """[batch, T, T] bool: causal, and within a document when segment ids are given."""
    causal = jnp.tril(jnp.ones((T, T), bool))[None]
    if segment_ids is None:
        return jnp.broadcast_to(causal, (batch, T, T))
    same = segment_ids[:, :, None] == segment_ids[:, None, :]
    return causal & same


def cache_attention_mask(lengths, T: int, max_len: int, tree_mask=None) -> jax.Array:
    """[batch, T, max_len] bool for T new queries against the cache.

    Query t of row b sits in slot `lengths[b] - T + t` and sees every slot up to
    its own (bottom-right-aligned causal). A tree mask replaces the causal
    pattern among the T new slots.
    """
    slots = jnp.arange(max_len)[None, None, :]  # [1, 1, S]
    start = (lengths - T)[:, None, None]  # [B, 1, 1]
    query_slot = start + jnp.arange(T)[None, :, None]  # [B, T, 1]
    mask = slots <= query_slot
    if tree_mask is not None:
        rel = slots - start  # [B, 1, S]: index among the new block
        in_block = (rel >= 0) & (rel < T)
        # tree_mask[b, t, rel] where the slot is in the new block
        tm = jnp.take_along_axis(tree_mask, jnp.clip(rel, 0, T - 1).repeat(T, axis=1), axis=2)
        mask = jnp.where(in_block, tm, slots < start)
    return mask


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


class Attention(nn.Module):
    """Multi-head / grouped-query attention with an explicit per-row KV cache.

    Params: `q_proj.kernel [D, H, Dh]`, `k_proj.kernel [D, K, Dh]`,
    `v_proj.kernel [D, K, Dh]`, `o_proj.kernel [H, Dh, D]`; biases `[H, Dh]` /
    `[K, Dh]` with `qkv_bias`, `o_proj.bias [D]` with `out_bias`.
    """

    config: ModelConfig

    @nn.compact
    def __call__(self, x, inputs: AttentionInputs, layer_cache=None):
        """x: [B, T, D]; layer_cache: (k, v) each [B, S, K, Dh] or None.

        Returns (out [B, T, D], new layer_cache or None).
        """
        cfg = self.config
        H, K, Dh = cfg.n_heads, cfg.num_kv_heads, cfg.dim_per_head
        pdt = jnp.dtype(cfg.param_dtype)

        def proj(heads, bias, name):
            return nn.DenseGeneral((heads, Dh), use_bias=bias, dtype=cfg.dtype, param_dtype=pdt,
                                   kernel_init=_init(cfg), name=name)

        # [batch, T, heads, head_dim]
        q = proj(H, cfg.qkv_bias, "q_proj")(x)
        # [batch, T, kv_heads, head_dim]
        k = proj(K, cfg.qkv_bias, "k_proj")(x)
        v = proj(K, cfg.qkv_bias, "v_proj")(x)
        if cfg.position == "rope":
            inv_freq = rope_inverse_frequencies(cfg)
            q = apply_rope(q, inputs.positions, inv_freq)
            k = apply_rope(k, inputs.positions, inv_freq)
        sm_scale = 1.0 / math.sqrt(Dh)

        if layer_cache is None:
            out = self._attend_full(q, k, v, inputs, sm_scale)
            new_cache = None
        else:
            cache_k, cache_v = layer_cache
            b_idx = jnp.arange(x.shape[0])[:, None]
            # Slots past max_len are dropped, never clamped onto valid entries.
            cache_k = cache_k.at[b_idx, inputs.write_slots].set(k.astype(cache_k.dtype), mode="drop")
            cache_v = cache_v.at[b_idx, inputs.write_slots].set(v.astype(cache_v.dtype), mode="drop")
            out = self._attend_cache(q, cache_k, cache_v, inputs, sm_scale)
            new_cache = (cache_k, cache_v)

        o_proj = nn.DenseGeneral(cfg.d_model, axis=(-2, -1), use_bias=cfg.out_bias, dtype=cfg.dtype,
                                 param_dtype=pdt, kernel_init=_init(cfg), name="o_proj")
        return o_proj(out), new_cache

    def _attend_full(self, q, k, v, inputs, sm_scale):
        backend = self.config.attention_backend
        B, T = q.shape[:2]
        if backend == "pallas":
            from pallas_kernels.flash_attention import flash_attention

            return flash_attention(q, k, v, causal=True, segment_ids=inputs.segment_ids, sm_scale=sm_scale,
                                   interpret=jax.default_backend() == "cpu")
        mask = full_attention_mask(B, T, inputs.segment_ids)
        if backend == "cudnn":
            return jax.nn.dot_product_attention(q, k, v, mask=mask[:, None], scale=sm_scale, implementation="cudnn")
        return xla_attention(q, k, v, mask, sm_scale)

    def _attend_cache(self, q, cache_k, cache_v, inputs, sm_scale):
        backend = self.config.attention_backend
        T = q.shape[1]
        if backend == "pallas":
            from pallas_kernels.decode_attention import decode_attention

            return decode_attention(q, cache_k, cache_v, inputs.lengths, sm_scale=sm_scale,
                                    tree_mask=inputs.tree_mask, interpret=jax.default_backend() == "cpu")
        mask = cache_attention_mask(inputs.lengths, T, cache_k.shape[1], inputs.tree_mask)
        return xla_attention(q, cache_k, cache_v, mask, sm_scale)
