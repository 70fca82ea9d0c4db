"""The decoder-only transformer and its pure-function API.

    params = init_params(config, rng)
    logits, cache = forward(params, tokens, config=config, positions=None, cache=None)

Parameter tree (every leaf under `layers` has a leading [n_layers] axis; the
per-layer names are listed in `jaxar.models.layers`):

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
    layers/ada/{kernel,bias}        [L, C, 6D], [L, 6D]      (cond_dim > 0)
    final_norm/{scale,bias}         [D]
    final_ada/{kernel,bias}         [C, 2D], [2D]            (cond_dim > 0)
    lm_head/kernel                  [D, V]                   (untied only)

The `Transformer` linen module declares these parameters (names, shapes,
initializers); the computation is the pure functions of `layers.py`, run by
`apply_model`. Training scans the stacked layers (`lax.scan`) or unrolls them
(`config.scan_layers`); decoding uses `decode_params(params, config)`: the
layers unstacked once into a tuple of per-layer dicts with q|k|v and gate|up
fused into one matmul each, so a decode step reads each weight once and
copies none.
"""

from __future__ import annotations

import functools
from typing import NamedTuple, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxar.cache import KVCache
from jaxar.config import ModelConfig
from jaxar.models import layers as L
from jaxar.models.layers import AttentionInputs


class _Leaf(NamedTuple):
    shape: tuple
    init: str  # "normal" | "zeros" | "ones"


def param_spec(config: ModelConfig) -> dict:
    """The parameter tree as nested dicts of `_Leaf(shape, init)`."""
    cfg = config
    D, F, V, N = cfg.d_model, cfg.mlp_dim, cfg.vocab_size, cfg.n_layers
    H, K, Dh = cfg.n_heads, cfg.num_kv_heads, cfg.dim_per_head

    def lin(shape, bias_shape, bias):
        out = {"kernel": _Leaf((N,) + shape, "normal")}
        if bias:
            out["bias"] = _Leaf((N,) + bias_shape, "zeros")
        return out

    def norm_p(lead=()):
        out = {"scale": _Leaf(lead + (D,), "ones")}
        if cfg.norm == "layernorm":
            out["bias"] = _Leaf(lead + (D,), "zeros")
        return out

    attn = {"q_proj": lin((D, H, Dh), (H, Dh), cfg.qkv_bias), "k_proj": lin((D, K, Dh), (K, Dh), cfg.qkv_bias),
            "v_proj": lin((D, K, Dh), (K, Dh), cfg.qkv_bias), "o_proj": lin((H, Dh, D), (D,), cfg.out_bias)}
    mlp = {"up_proj": lin((D, F), (F,), cfg.mlp_bias), "down_proj": lin((F, D), (D,), cfg.mlp_bias)}
    if cfg.gated_mlp:
        mlp["gate_proj"] = lin((D, F), (F,), cfg.mlp_bias)
    layer = {"attn_norm": norm_p((N,)), "attn": attn, "mlp_norm": norm_p((N,)), "mlp": mlp}
    spec = {"embed": {"embedding": _Leaf((V, D), "normal")}}
    if cfg.position == "learned":
        spec["pos_embed"] = {"embedding": _Leaf((cfg.max_seq_len, D), "normal")}
    if cfg.cond_dim:
        C = cfg.cond_dim
        layer["ada"] = {"kernel": _Leaf((N, C, 6 * D), "zeros"), "bias": _Leaf((N, 6 * D), "zeros")}
        spec["final_ada"] = {"kernel": _Leaf((C, 2 * D), "zeros"), "bias": _Leaf((2 * D,), "zeros")}
    spec["layers"] = layer
    spec["final_norm"] = norm_p()
    if not cfg.tie_embeddings:
        spec["lm_head"] = {"kernel": _Leaf((D, V), "normal")}
    return spec


def _freeze(spec):
    return tuple((k, v if isinstance(v, _Leaf) else _freeze(v)) for k, v in spec.items())


class _ParamTree(nn.Module):
    """Declares a frozen spec of `_Leaf`s under this module's scope and returns them as a dict."""

    spec: tuple
    config: ModelConfig

    @nn.compact
    def __call__(self):
        out = {}
        dtype = jnp.dtype(self.config.param_dtype)
        inits = {"normal": nn.initializers.normal(stddev=self.config.initializer_range),
                 "zeros": nn.initializers.zeros, "ones": nn.initializers.ones}
        for name, sub in self.spec:
            if isinstance(sub, _Leaf):
                out[name] = self.param(name, inits[sub.init], sub.shape, dtype)
            else:
                out[name] = _ParamTree(sub, self.config, name=name)()
        return out


class Transformer(nn.Module):
    """Declares the parameters and runs `apply_model` (used by `init_params` and `Transformer.apply`)."""

    config: ModelConfig

    @nn.compact
    def __call__(self, tokens, positions, cache_kv=None, inputs_extra: Optional[dict] = None, **kw):
        params = {name: _ParamTree(sub, self.config, name=name)() for name, sub in _freeze(param_spec(self.config))}
        inputs = AttentionInputs(positions=positions, **(inputs_extra or {}))
        return apply_model(self.config, params, tokens, inputs, cache_kv=cache_kv, **kw)


def _remat_policy(name: str):
    if name == "dots":
        return jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims
    return None  # "full": save nothing, recompute everything


def is_decode_layout(params) -> bool:
    return isinstance(params.get("layers"), (tuple, list))


def _unstack(layers, n: int):
    """Per-layer dicts from the stacked tree (a split: its transpose is one concatenate)."""
    parts = jax.tree_util.tree_map(lambda x: [jnp.squeeze(s, 0) for s in jnp.split(x, n, axis=0)], layers)
    return [jax.tree_util.tree_map(lambda _, leaf: leaf[i], layers, parts) for i in range(n)]


def apply_model(config: ModelConfig, params: dict, tokens, inputs: AttentionInputs, *, cache_kv=None, embeds=None,
                cond=None, hidden_layers: Sequence[int] = (), return_hidden: bool = False, logits_at=None):
    """The forward computation over a params dict (stacked or decode layout).

    tokens [B, T] int (or None with embeds [B, T, D]); cache_kv: (k, v) tuples
    of per-layer [B, S, K, Dh] buffers, (k, v, k_scale, v_scale) for an int8
    cache (scales per-layer [B, S, K]), or None. Returns (logits float32, new
    cache_kv) + (final hidden,) if return_hidden + (hidden states,) if
    hidden_layers.
    """
    cfg = config
    dt = jnp.dtype(cfg.dtype)
    emb = params["embed"]["embedding"]
    emb_scale = params["embed"].get("embedding_scale")  # [V] per row when the table is int8 (jaxar.quant)
    if embeds is not None:
        x = embeds.astype(dt)
    elif emb_scale is not None:
        rows = jnp.take(emb, tokens, axis=0).astype(jnp.float32)
        x = (rows * jnp.take(emb_scale, tokens, axis=0)[..., None]).astype(dt)
    else:
        x = jnp.take(emb.astype(dt), tokens, axis=0)
    if cfg.position == "learned":
        x = x + jnp.take(params["pos_embed"]["embedding"].astype(dt), inputs.positions, axis=0)
    if cond is not None and not cfg.cond_dim:
        raise ValueError("cond was given but model.cond_dim is 0; set model.cond_dim to the conditioning width")
    want = sorted(set(int(i) for i in hidden_layers))
    collected = {0: x} if 0 in want else {}
    n = cfg.n_layers

    layers = params["layers"]
    parts = 0 if cache_kv is None else (4 if len(cache_kv) == 4 and len(cache_kv[2]) else 2)
    if cache_kv is not None and cfg.scan_layers is True and not is_decode_layout(params):
        # Scoring through a cache with stacked params and scan_layers=True: the layers scanned (one layer
        # to compile), the per-layer buffers stacked for the scan and split again. Decoding uses the
        # decode layout instead, which writes each layer's buffer in place.
        def cached_body(x, p_and_cache):
            p, layer_cache = p_and_cache
            x, layer_cache = L.block(cfg, p, x, inputs, layer_cache, cond)
            return x, (x if want else None, layer_cache)

        stacked = tuple(jnp.stack(c) for c in cache_kv[:parts])
        x, (ys, stacked) = jax.lax.scan(cached_body, x, (layers, stacked))
        cache_kv = tuple(tuple(b[i] for i in range(n)) for b in stacked)
        for i in want:
            if 0 < i <= n:
                collected[i] = ys[i - 1]
    elif cache_kv is not None or is_decode_layout(params) or not cfg.uses_scan():
        per_layer = list(layers) if is_decode_layout(params) else _unstack(layers, n)
        step = lambda p, x: L.block(cfg, p, x, inputs, None, cond)[0]  # noqa: E731
        if cfg.remat != "none" and cache_kv is None:
            step = jax.checkpoint(step, policy=_remat_policy(cfg.remat))
        new_kv = [[] for _ in range(parts)]
        for i, p in enumerate(per_layer):
            if cache_kv is None:
                x = step(p, x)
            else:
                x, layer_cache = L.block(cfg, p, x, inputs, tuple(c[i] for c in cache_kv[:parts]), cond)
                for buffers, b in zip(new_kv, layer_cache):
                    buffers.append(b)
            if i + 1 in want:
                collected[i + 1] = x
        if cache_kv is not None:
            cache_kv = tuple(tuple(b) for b in new_kv)
    else:
        collect = any(0 < i <= n for i in want)

        def body(x, p):
            x = L.block(cfg, p, x, inputs, None, cond)[0]
            return x, (x if collect else None)

        if cfg.remat != "none":
            body = jax.checkpoint(body, policy=_remat_policy(cfg.remat), prevent_cse=False)
        x, ys = jax.lax.scan(body, x, layers)
        for i in want:
            if 0 < i <= n:
                collected[i] = ys[i - 1]

    hidden = L.norm(cfg, params["final_norm"], x)
    if cond is not None:
        shift, scale = jnp.split(L.linear(params["final_ada"], jax.nn.silu(cond.astype(dt)), dt), 2, axis=-1)
        hidden = hidden * (1 + scale[:, None]) + shift[:, None]
    if n in want:  # Hugging Face convention: the last hidden state is after the final norm
        collected[n] = hidden
    if logits_at is not None:  # [B, m] positions whose logits are wanted
        hidden = jnp.take_along_axis(hidden, logits_at[:, :, None], axis=1)
    if cfg.tie_embeddings:
        # Contract over the table's own D axis: no transposed copy of [V, D].
        if emb_scale is not None:  # int8 table: one scale per row = per output channel of the head
            logits = jax.lax.dot_general(hidden.astype(dt), emb.astype(dt), (((hidden.ndim - 1,), (1,)), ((), ())),
                                         preferred_element_type=jnp.float32) * emb_scale
        else:
            logits = jax.lax.dot_general(hidden.astype(dt), emb.astype(dt), (((hidden.ndim - 1,), (1,)), ((), ())))
    else:
        logits = L.linear(params["lm_head"], hidden, dt)
    out = (logits.astype(jnp.float32), cache_kv)
    if return_hidden:
        out += (hidden,)
    if hidden_layers:
        out += (tuple(collected[int(i)] for i in hidden_layers),)
    return out


def init_params(config: ModelConfig, rng) -> dict:
    """Random parameters (normal(0, initializer_range), norms at 1, adaptive terms at 0) as a plain dict."""
    if isinstance(rng, int):
        rng = jax.random.PRNGKey(rng)
    tokens = jnp.zeros((1, 1), jnp.int32)
    variables = jax.jit(lambda r: Transformer(config).init(r, tokens, tokens, logits_at=jnp.zeros((1, 0), jnp.int32)))(
        rng)
    return jax.tree_util.tree_map(lambda x: x, variables["params"])


def decode_params(params: dict, config: ModelConfig, fuse: Optional[bool] = None) -> dict:
    """Params in the decode layout: `layers` a tuple of per-layer dicts, q|k|v
    and gate|up fused into one kernel each (`qkv_proj`, `gate_up_proj`).

    Done once (outside jit) before a decode loop, so each step reads every
    weight in place instead of slicing it out of the stacked tree. Already
    converted params are returned as they are. `fuse` defaults to True unless
    the params are sharded over several devices (fusing would mix shards of
    the head axis; `jaxar.parallel.shard_params` fuses before placing when
    the mesh has no tensor axis). With `config.weight_quant == "int8"` the
    result holds int8 weights (`jaxar.quant`), also when `params` already
    were in the decode layout.
    """
    if not is_decode_layout(params):
        params = _decode_layout(params, config, fuse)
    if config.weight_quant == "int8":
        from jaxar.quant import quantize_decode_layout

        params = quantize_decode_layout(params)
    return params


def _spans_devices(x) -> bool:
    try:
        return len(x.devices()) > 1
    except Exception:  # noqa: BLE001 - tracers and numpy arrays live nowhere in particular
        return False


def _decode_layout(params: dict, config: ModelConfig, fuse: Optional[bool]) -> dict:
    if fuse is None:
        fuse = not any(_spans_devices(x) for x in jax.tree_util.tree_leaves(params))
    # One compiled program instead of thousands of eager slices (30 layers x every leaf).
    return _decode_layout_jit(params, config=config, fuse=bool(fuse))


@functools.partial(jax.jit, static_argnames=("config", "fuse"))
def _decode_layout_jit(params: dict, *, config: ModelConfig, fuse: bool) -> dict:
    D = config.d_model
    out_layers = []
    for p in _unstack(params["layers"], config.n_layers):
        p = jax.tree_util.tree_map(lambda x: x, p)  # fresh dicts
        if fuse:
            attn = p["attn"]
            parts = [attn.pop(name) for name in ("q_proj", "k_proj", "v_proj")]
            fused = {"kernel": jnp.concatenate([q["kernel"].reshape(D, -1) for q in parts], axis=1)}
            for name in ("bias", "kernel_scale"):  # kernel_scale: int8 stacked params (per output channel)
                if name in parts[0]:
                    fused[name] = jnp.concatenate([q[name].reshape(-1) for q in parts])
            attn["qkv_proj"] = fused
            if config.gated_mlp:
                mlp = p["mlp"]
                gate, up = mlp.pop("gate_proj"), mlp.pop("up_proj")
                fused = {"kernel": jnp.concatenate([gate["kernel"], up["kernel"]], axis=1)}
                for name in ("bias", "kernel_scale"):
                    if name in gate:
                        fused[name] = jnp.concatenate([gate[name], up[name]])
                mlp["gate_up_proj"] = fused
        out_layers.append(p)
    return {**params, "layers": tuple(out_layers)}


def forward(params, tokens=None, *, config: ModelConfig, positions=None, cache: Optional[KVCache] = None,
            segment_ids=None, num_new=None, tree_mask=None, mask=None, embeds=None, cond=None,
            hidden_layers: Sequence[int] = (), return_hidden: bool = False, logits_at=None):
    """Run the model on `tokens [batch, T]` (or `embeds [batch, T, d_model]`).

    Without a cache (training, scoring): causal attention over the T tokens
    unless `mask` (a `jaxar.models.masks.Mask`: bidirectional, block-causal by
    block ids, prefix-LM; with packed segments) says otherwise;
    `segment_ids [batch, T]` keeps packed documents apart; positions default
    to 0..T-1.

    With a cache: the T tokens of row b are written at slots
    `cache.lengths[b] + t` and attend to everything before them in that row;
    positions default to those slots. `num_new [batch]` (default T) says how
    many of the T tokens of each row are real: the row's length advances by
    that much (padding after them is written but lies beyond the length, so it
    is never attended and is overwritten later). Among the new tokens the
    pattern is causal, or `mask` (e.g. `Mask.bidirectional()`: a VAR scale or
    a diffusion block sees itself whole), or `tree_mask [batch, T, T]`
    (draft-tree verification).

    `cond [batch, cond_dim]`: a conditioning vector per row (class embedding)
    into the adaptive norms (config.cond_dim > 0).

    `logits_at`: None (logits at every position), "last" (only at each row's
    last real token: position num_new - 1, or T - 1; logits [batch, 1, vocab]),
    or int [batch, n] positions (logits [batch, n, vocab]). Prefill asks for
    "last", so the vocabulary projection runs once per row, not per token.

    `hidden_layers`: indices in 0..n_layers of hidden states to return
    (Hugging Face's `hidden_states` numbering: 0 the embeddings, l the output
    of layer l, n_layers after the final norm), each [batch, T, d_model].

    Returns (logits [batch, T or n, vocab] float32, updated cache or None),
    then the final hidden states [batch, T or n, d_model] when `return_hidden`,
    then the tuple of requested hidden states when `hidden_layers`.
    """
    if embeds is not None:
        if tokens is not None:
            raise ValueError("give tokens or embeds, not both")
        embeds = jnp.asarray(embeds)
        if embeds.ndim != 3 or embeds.shape[-1] != config.d_model:
            raise ValueError(f"embeds must be [batch, T, d_model={config.d_model}], got shape {embeds.shape}")
        B, T = embeds.shape[:2]
    else:
        if tokens is None:
            raise ValueError("forward needs tokens [batch, T] or embeds [batch, T, d_model]")
        tokens = jnp.asarray(tokens)
        if tokens.ndim != 2:
            raise ValueError(f"tokens must be [batch, T], got shape {tokens.shape}")
        if not jnp.issubdtype(tokens.dtype, jnp.integer):
            raise ValueError(f"tokens must be integers, got {tokens.dtype}")
        B, T = tokens.shape
    if cache is not None and cache.batch != B:
        raise ValueError(f"cache has {cache.batch} rows but tokens has {B}")
    if cache is not None and cache.n_layers != config.n_layers:
        raise ValueError(f"cache has {cache.n_layers} layers but the model has {config.n_layers}")
    for name, hl in (("hidden_layers", hidden_layers),):
        bad = [i for i in hl if not 0 <= int(i) <= config.n_layers]
        if bad:
            raise ValueError(f"{name} {bad} out of range: use indices in 0..{config.n_layers}")
    if cond is not None:
        cond = jnp.asarray(cond)
        if not config.cond_dim:
            raise ValueError("cond was given but model.cond_dim is 0; set model.cond_dim to the conditioning width")
        if cond.shape != (B, config.cond_dim):
            raise ValueError(f"cond must be [batch, cond_dim] = {(B, config.cond_dim)}, got {cond.shape}")
    order_ids = None
    if mask is not None:
        if cache is not None and mask.segment_ids is not None:
            raise ValueError("packed segments are for the no-cache path; with a cache each row is one sequence")
        if segment_ids is not None and mask.segment_ids is not None:
            raise ValueError("give segment_ids once: as the argument or inside mask")
        order_ids = mask.order_ids(B, T)
        if mask.kind == "causal":
            order_ids = None  # the default path (and the kernels' causal mode)
        if mask.segment_ids is not None:
            segment_ids = mask.segment_ids
    if isinstance(logits_at, str):
        if logits_at != "last":
            raise ValueError(f"logits_at must be None, 'last' or int [batch, n] positions, got {logits_at!r}")
        last = (jnp.asarray(num_new, jnp.int32) if num_new is not None else jnp.full((B,), T, jnp.int32)) - 1
        logits_at = jnp.clip(last, 0, T - 1)[:, None]
    elif logits_at is not None:
        logits_at = jnp.asarray(logits_at, jnp.int32)
    if config.weight_quant == "int8" and "embedding_scale" not in params["embed"]:
        params = decode_params(params, config)  # float params: quantized here (once per call)
    if cache is not None and cache.quantized != (jnp.dtype(config.cache_dtype) == jnp.int8):
        raise ValueError(f"the cache is {cache.k[0].dtype} but model.kv_cache_dtype={config.kv_cache_dtype!r}; "
                         "build it with KVCache.empty(config, ...)")
    return _forward_jit(params, tokens, embeds, cond, positions, cache, segment_ids, order_ids, num_new, tree_mask,
                        logits_at, config=config, return_hidden=return_hidden,
                        hidden_layers=tuple(int(i) for i in hidden_layers))


@functools.partial(jax.jit, static_argnames=("config", "return_hidden", "hidden_layers"))
def _forward_jit(params, tokens, embeds, cond, positions, cache, segment_ids, order_ids, num_new, tree_mask, logits_at,
                 *, config, return_hidden, hidden_layers):
    B, T = (tokens if tokens is not None else embeds).shape[:2]
    placement = params.get("placement")  # jaxar.parallel.shard_params: the mesh the params live on
    if placement is not None:
        tokens, embeds, cache = placement.constrain_inputs(tokens, embeds, cache)
    kw = dict(embeds=embeds, cond=cond, hidden_layers=hidden_layers, return_hidden=return_hidden,
              logits_at=logits_at)
    if cache is None:
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
        inputs = AttentionInputs(positions=positions, order_ids=order_ids, segment_ids=segment_ids)
        out = apply_model(config, params, tokens, inputs, **kw)
        return (out[0], None) + tuple(out[2:])

    start = cache.lengths.astype(jnp.int32)
    # [batch, T]
    write_slots = start[:, None] + jnp.arange(T, dtype=jnp.int32)[None, :]
    if positions is None:
        positions = write_slots
    new_len = start + (jnp.asarray(num_new, jnp.int32) if num_new is not None else T)
    # Attention sees the T written entries of each row; the row's stored
    # length then advances by num_new only.
    inputs = AttentionInputs(positions=positions, order_ids=order_ids, write_slots=write_slots, lengths=start + T,
                             tree_mask=tree_mask)
    out = apply_model(config, params, tokens, inputs, cache_kv=(cache.k, cache.v, cache.k_scale, cache.v_scale), **kw)
    logits, kv = out[0], out[1]
    scales = kv[2:] if len(kv) == 4 else ((), ())
    new_cache = KVCache(k=kv[0], v=kv[1], lengths=jnp.minimum(new_len, cache.max_len), k_scale=scales[0],
                        v_scale=scales[1])
    if placement is not None:
        new_cache = placement.constrain_cache(new_cache)
    return (logits, new_cache) + tuple(out[2:])


def param_logical_axes(config: ModelConfig) -> dict:
    """Logical axis names for every parameter, mirroring the params tree.

    Names: layers, vocab, embed, heads, kv_heads, head_dim, mlp, pos, cond.
    Mesh rules (jaxar.train.sharding) map them onto (data, fsdp, tensor).
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
        if names[0] == "final_ada":
            return ("cond", "embed") if names[-1] == "kernel" else ("embed",)
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
            ("ada", "kernel"): ("cond", "embed"),
            ("ada", "bias"): ("embed",),
        }
        axes = ("layers",) + table[(mod, leafname)]
        assert len(axes) == nd, (names, axes, leaf.shape)
        return axes

    return jax.tree_util.tree_map_with_path(axes_for, shapes)
