"""The decoder-only transformer and its pure-function API.

    params = init_params(config, rng)
    logits, cache = forward(params, tokens, config=config, positions=None, cache=None)

Parameter tree (every leaf under `layers` has a leading [n_layers] axis, the
layers are run with `nn.scan`, unrolled when `config.scan_layers` is False):

    embed/embedding                 [V, D]
    pos_embed/embedding             [max_seq_len, D]         (position == "learned")
    layers/attn_norm/{scale,bias}   [L, D]
    layers/attn/q_proj/kernel       [L, D, H, Dh]   (+ bias [L, H, Dh])
    layers/attn/k_proj/kernel       [L, D, K, Dh]   (+ bias [L, K, Dh])
    layers/attn/v_proj/kernel       [L, D, K, Dh]   (+ bias [L, K, Dh])
    layers/attn/o_proj/kernel       [L, H, Dh, D]   (+ bias [L, D])
    layers/mlp_norm/{scale,bias}    [L, D]
    layers/mlp/gate_proj/kernel     [L, D, F]                (gated_mlp)
    layers/mlp/up_proj/kernel       [L, D, F]       (+ bias [L, F])
    layers/mlp/down_proj/kernel     [L, F, D]       (+ bias [L, D])
    final_norm/{scale,bias}         [D]
    lm_head/kernel                  [D, V]                   (untied only)
"""

from __future__ import annotations

import functools
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxar.cache import KVCache
from jaxar.config import ModelConfig
from jaxar.models.layers import MLP, Attention, AttentionInputs, Norm, _init


class Block(nn.Module):
    """Pre-norm residual block; the scan body. The carry holds the activations
    and the whole stacked cache, which the block updates at its layer index
    (an in-place update inside the loop, no per-layer copy of the cache)."""

    config: ModelConfig

    @nn.compact
    def __call__(self, carry, layer_idx, inputs: AttentionInputs):
        x, cache_kv = carry
        layer_cache = None
        if cache_kv is not None:
            layer_cache = (cache_kv[0][layer_idx], cache_kv[1][layer_idx])
        h, new_layer_cache = Attention(self.config, name="attn")(Norm(self.config, name="attn_norm")(x), inputs,
                                                                  layer_cache)
        x = x + h
        x = x + MLP(self.config, name="mlp")(Norm(self.config, name="mlp_norm")(x))
        if cache_kv is not None:
            cache_kv = (
                jax.lax.dynamic_update_index_in_dim(cache_kv[0], new_layer_cache[0], layer_idx, 0),
                jax.lax.dynamic_update_index_in_dim(cache_kv[1], new_layer_cache[1], layer_idx, 0),
            )
        return (x, cache_kv), None


def _remat_policy(name: str):
    if name == "dots":
        return jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims
    return None  # "full": save nothing, recompute everything


class Transformer(nn.Module):
    config: ModelConfig

    @nn.compact
    def __call__(self, tokens, positions, cache_kv=None, inputs_extra: Optional[dict] = None,
                 return_hidden: bool = False, logits_at=None):
        """tokens, positions: [B, T] int. cache_kv: (k, v) stacked caches or None.

        Returns (logits [B, T, V] float32, new cache_kv, hidden [B, T, D] if asked).
        """
        cfg = self.config
        pdt = jnp.dtype(cfg.param_dtype)
        inputs = AttentionInputs(positions=positions, **(inputs_extra or {}))
        embed = nn.Embed(cfg.vocab_size, cfg.d_model, dtype=cfg.dtype, param_dtype=pdt,
                         embedding_init=_init(cfg), name="embed")
        x = embed(tokens)
        if cfg.position == "learned":
            pos_embed = nn.Embed(cfg.max_seq_len, cfg.d_model, dtype=cfg.dtype, param_dtype=pdt,
                                 embedding_init=_init(cfg), name="pos_embed")
            x = x + pos_embed(positions)

        block = Block
        if cfg.remat != "none":
            block = nn.remat(Block, policy=_remat_policy(cfg.remat), prevent_cse=not cfg.scan_layers)
        layers = nn.scan(
            block,
            variable_axes={"params": 0},
            split_rngs={"params": True},
            in_axes=(0, nn.broadcast),
            length=cfg.n_layers,
            unroll=1 if cfg.scan_layers else cfg.n_layers,
        )(cfg, name="layers")
        (x, cache_kv), _ = layers((x, cache_kv), jnp.arange(cfg.n_layers), inputs)

        hidden = Norm(cfg, name="final_norm")(x)
        if logits_at is not None:  # [B, n] positions whose logits are wanted
            hidden = jnp.take_along_axis(hidden, logits_at[:, :, None], axis=1)
        if cfg.tie_embeddings:
            logits = embed.attend(hidden)
        else:
            logits = nn.Dense(cfg.vocab_size, use_bias=False, dtype=cfg.dtype, param_dtype=pdt,
                              kernel_init=_init(cfg), name="lm_head")(hidden)
        logits = logits.astype(jnp.float32)
        if return_hidden:
            return logits, cache_kv, hidden
        return logits, cache_kv


def init_params(config: ModelConfig, rng) -> dict:
    """Random parameters (normal(0, initializer_range), norms at 1) as a plain dict."""
    if isinstance(rng, int):
        rng = jax.random.PRNGKey(rng)
    tokens = jnp.zeros((1, 1), jnp.int32)
    variables = jax.jit(Transformer(config).init)(rng, tokens, tokens)
    return variables["params"]


def forward(params, tokens, *, config: ModelConfig, positions=None, cache: Optional[KVCache] = None,
            segment_ids=None, num_new=None, tree_mask=None, return_hidden: bool = False, logits_at=None):
    """Run the model on `tokens [batch, T]`.

    Without a cache (training, scoring): full causal attention over the T
    tokens; `segment_ids [batch, T]` keeps packed documents apart; positions
    default to 0..T-1.

    With a cache: the T tokens of row b are written at slots
    `cache.lengths[b] + t` and attend to everything before them in that row;
    positions default to those slots. `num_new [batch]` (default T) says how
    many of the T tokens of each row are real: the row's length advances by
    that much (padding after them is written but lies beyond the length, so it
    is never attended and is overwritten later). `tree_mask [batch, T, T]`
    replaces the causal pattern among the new tokens (draft-tree verification).

    `logits_at`: None (logits at every position), "last" (only at each row's
    last real token: position num_new - 1, or T - 1; logits [batch, 1, vocab]),
    or int [batch, n] positions (logits [batch, n, vocab]). Prefill asks for
    "last", so the vocabulary projection runs once per row, not per token.

    Returns (logits [batch, T or n, vocab] float32, updated cache or None), plus
    the final hidden states [batch, T or n, d_model] when `return_hidden`.
    """
    tokens = jnp.asarray(tokens)
    if tokens.ndim != 2:
        raise ValueError(f"tokens must be [batch, T], got shape {tokens.shape}")
    if not jnp.issubdtype(tokens.dtype, jnp.integer):
        raise ValueError(f"tokens must be integers, got {tokens.dtype}")
    if cache is not None and cache.batch != tokens.shape[0]:
        raise ValueError(f"cache has {cache.batch} rows but tokens has {tokens.shape[0]}")
    if isinstance(logits_at, str):
        if logits_at != "last":
            raise ValueError(f"logits_at must be None, 'last' or int [batch, n] positions, got {logits_at!r}")
        T = tokens.shape[1]
        last = (jnp.asarray(num_new, jnp.int32) if num_new is not None else jnp.full(tokens.shape[:1], T)) - 1
        logits_at = jnp.clip(last, 0, T - 1)[:, None]
    elif logits_at is not None:
        logits_at = jnp.asarray(logits_at, jnp.int32)
    return _forward_jit(params, tokens, positions, cache, segment_ids, num_new, tree_mask, logits_at, config=config,
                        return_hidden=return_hidden)


@functools.partial(jax.jit, static_argnames=("config", "return_hidden"))
def _forward_jit(params, tokens, positions, cache, segment_ids, num_new, tree_mask, logits_at, *, config,
                 return_hidden):
    B, T = tokens.shape
    model = Transformer(config)
    if cache is None:
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
        out = model.apply({"params": params}, tokens, positions, None, {"segment_ids": segment_ids},
                          return_hidden=return_hidden, logits_at=logits_at)
        return (out[0], None) + tuple(out[2:])

    start = cache.lengths.astype(jnp.int32)
    # [batch, T]
    write_slots = start[:, None] + jnp.arange(T, dtype=jnp.int32)[None, :]
    if positions is None:
        positions = write_slots
    new_len = start + (jnp.asarray(num_new, jnp.int32) if num_new is not None else T)
    # Attention sees the T written entries of each row; the row's stored
    # length then advances by num_new only.
    extra = {"write_slots": write_slots, "lengths": start + T, "tree_mask": tree_mask}
    out = model.apply({"params": params}, tokens, positions, (jnp.stack(cache.k), jnp.stack(cache.v)), extra,
                      return_hidden=return_hidden, logits_at=logits_at)
    logits, (k, v) = out[0], out[1]
    new_cache = KVCache(k=tuple(k), v=tuple(v), lengths=jnp.minimum(new_len, cache.max_len))
    return (logits, new_cache) + tuple(out[2:])


def param_logical_axes(config: ModelConfig) -> dict:
    """Logical axis names for every parameter, mirroring the params tree.

    Names: layers, vocab, embed, heads, kv_heads, head_dim, mlp, pos. Mesh
    rules (jaxar.train.sharding) map them onto (data, fsdp, tensor).
    """
    shapes = jax.eval_shape(lambda: init_params(config, jax.random.PRNGKey(0)))

    def axes_for(path, leaf):
        names = [p.key for p in path]
        nd = len(leaf.shape)
        if names[0] == "embed":
            return ("vocab", "embed")
        if names[0] == "pos_embed":
            return ("pos", "embed")
        if names[0] == "lm_head":
            return ("embed", "vocab")
        if names[0] == "final_norm":
            return ("embed",)
        # under layers/
        mod, leafname = names[-2], names[-1]
        table = {
            ("q_proj", "kernel"): ("embed", "heads", "head_dim"),
            ("q_proj", "bias"): ("heads", "head_dim"),
            ("k_proj", "kernel"): ("embed", "kv_heads", "head_dim"),
            ("k_proj", "bias"): ("kv_heads", "head_dim"),
            ("v_proj", "kernel"): ("embed", "kv_heads", "head_dim"),
            ("v_proj", "bias"): ("kv_heads", "head_dim"),
            ("o_proj", "kernel"): ("heads", "head_dim", "embed"),
            ("o_proj", "bias"): ("embed",),
            ("gate_proj", "kernel"): ("embed", "mlp"),
            ("up_proj", "kernel"): ("embed", "mlp"),
            ("up_proj", "bias"): ("mlp",),
            ("down_proj", "kernel"): ("mlp", "embed"),
            ("down_proj", "bias"): ("embed",),
            ("gate_proj", "bias"): ("mlp",),
            ("attn_norm", "scale"): ("embed",),
            ("attn_norm", "bias"): ("embed",),
            ("mlp_norm", "scale"): ("embed",),
            ("mlp_norm", "bias"): ("embed",),
        }
        axes = ("layers",) + table[(mod, leafname)]
        assert len(axes) == nd, (names, axes, leaf.shape)
        return axes

    return jax.tree_util.tree_map_with_path(axes_for, shapes)
