"""Draft heads on a frozen base model: Medusa-1, Hydra and an EAGLE-style one-layer drafter.

Pure functions over plain pytrees. The heads' params never hold a copy of the base's weights: the
frozen base's params (`base_params`, the training layout of `jaxar.models.transformer`) are passed
beside them and their embedding table, final norm and output projection are read from there.

Offsets. `hidden [B, T, D]` is the base's last hidden state (after its final norm: what
`forward(..., return_hidden=True)` returns); at position t the base itself predicts token t+1.

* **Medusa-1** (`medusa_logits`): head i (0-based) predicts token t+i+2, i.e. i+1 tokens beyond
  the base's own next token: logits_i = lm_head(ResBlock^L(h_t)), ResBlock(x) = x + SiLU(W x + b),
  W and b zero-initialised, so an untrained head equals the base's own head exactly.
* **Hydra** (`hydra_head_logits`, `hydra_logits_teacher_forced`): head i also sees the tokens
  between: the base's own next token x_{t+1} and the i tokens drafted before it, x_{t+2..t+i+1}
  (i + 1 tokens in all): input concat(h_t, e(x_{t+1}), ..., e(x_{t+i+1})) -> Linear((i+2)D -> D)
  -> ResBlocks -> base lm head; e is the base's (frozen) embedding table. The Linear starts as
  [I; 0; ...; 0], so an untrained Hydra head is the base's head on h_t as well.
* **EAGLE** (`eagle_forward`): one decoder layer of the base's family (jaxar's transformer with a
  1-layer `ModelConfig` derived from the base's, `drafter_model_config`), fed through `embeds`, so
  KV caches, RoPE, `tree_mask`, `num_new` and the Pallas backends work as for any jaxar model. Its
  input at position t is fc(concat(e(token_{t+1}), feature_t)); its output hidden state goes
  through the base's final norm and lm head, so the logits at t are the draft distribution of token
  t+2. The feature is either the fused target feature `eagle_fuse` = Linear(3D -> D) of the base's
  low / mid / high hidden states (EAGLE-3 style; `HeadsConfig.feature_layers`) or, while drafting
  (and in the training-time-test rollout), the drafter's own output hidden state of the previous
  position. That output hidden is taken after the (base's) final norm, like the base's own last
  hidden state (EAGLE-1 regresses onto that one); `eagle_forward` returns it.

Params:

    medusa:  heads/{i}/res/{j}/{kernel [D, D], bias [D]}          i < num_heads, j < num_layers
    hydra:   heads/{i}/in/{kernel [(i+2)D, D], bias [D]}, heads/{i}/res/{j}/...
    eagle:   fuse/kernel [3D, D], fc/{kernel [2D, D], bias [D]}, layer/... (the transformer's
             `layers` subtree of a 1-layer model: leaves with a leading [1] axis)
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

import jax
import jax.numpy as jnp

from jaxar.config import ModelConfig
from jaxar.models import layers as L

KINDS = ("medusa", "eagle")


@dataclasses.dataclass(frozen=True)
class HeadsConfig:
    """What draft heads to build on a base model.

    kind: "medusa" (Medusa-1 heads; `hydra=True` makes them Hydra heads) or "eagle" (a one-layer
        EAGLE drafter).
    num_heads: Medusa / Hydra: how many heads (head i predicts the token i+2 after the hidden
        state's position). Unused for EAGLE (its depth is how many steps the caller rolls it).
    hydra: Medusa only: each head also sees the embeddings of the tokens before the one it drafts.
    num_layers: residual blocks per Medusa / Hydra head.
    feature_layers: EAGLE: the base's hidden states fused into the target feature (low, mid,
        high), in Hugging Face's numbering (0 = embeddings, l = output of layer l, n_layers = after
        the final norm). None: `default_feature_layers(n_layers)` = (min(2, n), max(1, n // 2),
        max(1, n - 1)), e.g. (2, 15, 29) for a 30-layer base.
    dtype: the heads' parameter dtype (the computation runs in the base config's dtype).
    """

    kind: str = "medusa"
    num_heads: int = 4
    hydra: bool = False
    num_layers: int = 1
    feature_layers: Optional[tuple] = None
    dtype: str = "float32"

    def __post_init__(self):
        if self.feature_layers is not None:
            object.__setattr__(self, "feature_layers", tuple(int(i) for i in self.feature_layers))

    def validate(self, base_config: Optional[ModelConfig] = None) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"heads kind={self.kind!r} is unknown; use one of {KINDS}")
        for name in ("num_heads", "num_layers"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < (1 if name == "num_heads" else 0):
                raise ValueError(f"heads {name}={v!r} must be an integer >= {1 if name == 'num_heads' else 0}")
        if not isinstance(self.hydra, bool):
            raise ValueError(f"heads hydra={self.hydra!r} must be true or false")
        if self.hydra and self.kind != "medusa":
            raise ValueError("hydra=true is a switch of Medusa heads; set kind='medusa'")
        try:
            jnp.dtype(self.dtype)
        except TypeError:
            raise ValueError(f"heads dtype={self.dtype!r} is not a dtype") from None
        if self.feature_layers is not None and len(self.feature_layers) != 3:
            raise ValueError(f"feature_layers={self.feature_layers!r} must name 3 hidden states (low, mid, high)")
        if base_config is not None:
            n = base_config.n_layers
            bad = [i for i in self.layers_for(base_config) if not 0 <= i <= n]
            if bad:
                raise ValueError(f"feature_layers {bad} out of range for a {n}-layer base: use 0..{n}")
            if base_config.cond_dim:
                raise ValueError("draft heads need an unconditioned base (model.cond_dim = 0)")

    def layers_for(self, base_config: ModelConfig) -> tuple:
        """The EAGLE feature layers for this base (the default when None)."""
        return self.feature_layers if self.feature_layers is not None else default_feature_layers(
            base_config.n_layers)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        if d["feature_layers"] is not None:
            d["feature_layers"] = list(d["feature_layers"])
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "HeadsConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown heads config keys {unknown}; known: {sorted(names)}")
        return cls(**d)


def default_feature_layers(n_layers: int) -> tuple:
    """(low, mid, high) hidden-state indices (HF numbering) for an n-layer base."""
    n = int(n_layers)
    return (min(2, n), max(1, n // 2), max(1, n - 1))


# ---------------------------------------------------------------------------
# The base's pieces (read from base_params, never copied)


def base_embed(base_params: dict, tokens, base_config: ModelConfig):
    """Rows of the base's input embedding table for `tokens [...]` -> [..., D] in the base's dtype."""
    dt = jnp.dtype(base_config.dtype)
    emb = base_params["embed"]["embedding"]
    scale = base_params["embed"].get("embedding_scale")
    rows = jnp.take(emb, tokens, axis=0)
    if scale is not None:  # int8 table (jaxar.quant)
        rows = rows.astype(jnp.float32) * jnp.take(scale, tokens, axis=0)[..., None]
    return rows.astype(dt)


def base_final_norm(base_params: dict, x, base_config: ModelConfig):
    """The base's final norm of x [..., D]."""
    return L.norm(base_config, base_params["final_norm"], x.astype(jnp.dtype(base_config.dtype)))


def base_lm_head(base_params: dict, hidden, base_config: ModelConfig):
    """The base's output projection of a final-norm'd hidden state [..., D] -> float32 logits [..., V].

    The same computation as the end of `jaxar.models.transformer.apply_model` (tied table
    contracted over its own D axis, int8 table with its per-row scale, or `lm_head`)."""
    dt = jnp.dtype(base_config.dtype)
    hidden = hidden.astype(dt)
    if base_config.tie_embeddings:
        emb = base_params["embed"]["embedding"]
        scale = base_params["embed"].get("embedding_scale")
        dims = (((hidden.ndim - 1,), (1,)), ((), ()))
        if scale is not None:
            return jax.lax.dot_general(hidden, emb.astype(dt), dims, preferred_element_type=jnp.float32) * scale
        return jax.lax.dot_general(hidden, emb.astype(dt), dims).astype(jnp.float32)
    return L.linear(base_params["lm_head"], hidden, dt).astype(jnp.float32)


# ---------------------------------------------------------------------------
# Init


def drafter_model_config(base_config: ModelConfig) -> ModelConfig:
    """The EAGLE drafter's 1-layer ModelConfig: the base's family, widths, norm, RoPE and attention
    backend; float weights (no int8), the layers unrolled."""
    return base_config.replace(n_layers=1, weight_quant="none", scan_layers=False, remat="none")


def init_heads(config: HeadsConfig, base_config: ModelConfig, rng, base_params: Optional[dict] = None) -> dict:
    """Fresh head params for `config` on a base with `base_config`.

    Medusa / Hydra: residual blocks zero-initialised and the Hydra input projection [I; 0 ...],
    so every untrained head reproduces the base's logits on h_t. EAGLE: fuse = [noise; noise; I] (the
    high hidden state passed through), fc = [noise; I] (the feature passed through), noise ~
    N(0, initializer_range), the decoder layer as `init_params` of `drafter_model_config(base_config)`
    makes it.
    `base_params` is accepted for symmetry (it is not read, nothing of the base is copied).
    """
    config.validate(base_config)
    if isinstance(rng, int):
        rng = jax.random.PRNGKey(rng)
    D = base_config.d_model
    dt = jnp.dtype(config.dtype)
    if config.kind == "medusa":
        heads = []
        for i in range(config.num_heads):
            head = {"res": [{"kernel": jnp.zeros((D, D), dt), "bias": jnp.zeros((D,), dt)}
                            for _ in range(config.num_layers)]}
            if config.hydra:
                eye = jnp.concatenate([jnp.eye(D, dtype=dt), jnp.zeros(((i + 1) * D, D), dt)], axis=0)
                head["in"] = {"kernel": eye, "bias": jnp.zeros((D,), dt)}
            heads.append(head)
        return {"heads": heads}
    from jaxar.models.transformer import init_params

    r_fuse, r_fc, r_layer = jax.random.split(rng, 3)
    dcfg = drafter_model_config(base_config).replace(param_dtype=config.dtype)
    layer = init_params(dcfg, r_layer)["layers"]
    std = base_config.initializer_range
    eye = jnp.eye(D, dtype=dt)
    # Pass-through start: fuse picks the high hidden state, fc the feature (small noise elsewhere), so an
    # untrained drafter's logits are about the base's own at the feature's position, not noise.
    fuse = jnp.concatenate([std * jax.random.normal(r_fuse, (2 * D, D), dt), eye], axis=0)
    fc = jnp.concatenate([std * jax.random.normal(r_fc, (D, D), dt), eye], axis=0)
    return {"fuse": {"kernel": fuse}, "fc": {"kernel": fc, "bias": jnp.zeros((D,), dt)}, "layer": layer}


# ---------------------------------------------------------------------------
# Medusa / Hydra


def _res_blocks(blocks, x, dt):
    for p in blocks:
        x = x + jax.nn.silu(L.linear(p, x, dt))
    return x


def _check_kind(config: HeadsConfig, kind: str, hydra: Optional[bool] = None) -> None:
    if config.kind != kind:
        raise ValueError(f"these are {config.kind!r} heads, not {kind!r} ones")
    if hydra is not None and config.hydra != hydra:
        raise ValueError("these are Hydra heads: use hydra_head_logits / hydra_logits_teacher_forced"
                         if config.hydra else "these are plain Medusa heads (hydra=false): use medusa_logits")


def medusa_logits(params: dict, base_params: dict, hidden, *, config: HeadsConfig, base_config: ModelConfig):
    """All Medusa-1 heads at every position: hidden [B, T, D] (the base's final-norm'd last hidden
    state) -> float32 logits [B, T, num_heads, V]; head i's row at t is its distribution of token
    t+i+2."""
    _check_kind(config, "medusa", hydra=False)
    dt = jnp.dtype(base_config.dtype)
    hidden = jnp.asarray(hidden).astype(dt)
    if hidden.ndim != 3 or hidden.shape[-1] != base_config.d_model:
        raise ValueError(f"hidden must be [batch, T, d_model={base_config.d_model}], got {hidden.shape}")
    outs = jnp.stack([_res_blocks(h["res"], hidden, dt) for h in params["heads"]], axis=2)  # [B, T, H, D]
    return base_lm_head(base_params, outs, base_config)


def _hydra_head(head: dict, base_params, hidden, prev_tokens, base_config):
    dt = jnp.dtype(base_config.dtype)
    emb = base_embed(base_params, prev_tokens, base_config)  # [..., i+1, D]
    x = jnp.concatenate([hidden.astype(dt), emb.reshape(emb.shape[:-2] + (-1,))], axis=-1)
    x = L.linear(head["in"], x, dt)
    return base_lm_head(base_params, _res_blocks(head["res"], x, dt), base_config)


def hydra_head_logits(params: dict, base_params: dict, hidden, prev_tokens, i: int, *, config: HeadsConfig,
                      base_config: ModelConfig):
    """Hydra head i (static) at one position per row: hidden [B, D] (the base's final-norm'd hidden
    at t), prev_tokens [B, i+1] = (x_{t+1}: the base's own next token, then the i tokens drafted by
    heads 0..i-1) -> float32 logits [B, V] of token t+i+2."""
    _check_kind(config, "medusa", hydra=True)
    if not 0 <= i < config.num_heads:
        raise ValueError(f"head index {i} out of range: the config has {config.num_heads} heads")
    hidden, prev_tokens = jnp.asarray(hidden), jnp.asarray(prev_tokens)
    if hidden.ndim != 2 or prev_tokens.shape != (hidden.shape[0], i + 1):
        raise ValueError(f"hydra head {i} needs hidden [batch, d_model] and prev_tokens [batch, {i + 1}], got "
                         f"{hidden.shape} and {prev_tokens.shape}")
    return _hydra_head(params["heads"][i], base_params, hidden, prev_tokens, base_config)


def hydra_logits_teacher_forced(params: dict, base_params: dict, hidden, tokens, *, config: HeadsConfig,
                                base_config: ModelConfig):
    """Every Hydra head at every position with the true tokens as the previous ones (training):
    hidden [B, T, D], tokens [B, T] (the sequence the hidden states were computed on) -> logits
    [B, T, num_heads, V]; head i at t sees x_{t+1}..x_{t+i+1} (ids past the end read token 0:
    those positions have no target for head i anyway)."""
    _check_kind(config, "medusa", hydra=True)
    hidden, tokens = jnp.asarray(hidden), jnp.asarray(tokens)
    B, T = tokens.shape
    if hidden.shape[:2] != (B, T):
        raise ValueError(f"hidden {hidden.shape} and tokens {tokens.shape} disagree on [batch, T]")
    pad = jnp.concatenate([tokens, jnp.zeros((B, config.num_heads + 1), tokens.dtype)], axis=1)
    outs = []
    for i, head in enumerate(params["heads"]):
        prev = jnp.stack([pad[:, 1 + j: 1 + j + T] for j in range(i + 1)], axis=-1)  # [B, T, i+1]
        outs.append(_hydra_head(head, base_params, hidden, prev, base_config))
    return jnp.stack(outs, axis=2)


# ---------------------------------------------------------------------------
# EAGLE


def _drafter_params(params: dict, base_params: dict, base_config: ModelConfig) -> dict:
    """The 1-layer model's params: the drafter's layer with the base's table, final norm and head
    (references inside the traced function, not copies)."""
    out = {"embed": base_params["embed"], "layers": params["layer"], "final_norm": base_params["final_norm"]}
    for name in ("lm_head", "pos_embed"):
        if name in base_params:
            out[name] = base_params[name]
    return out


def eagle_fuse(params: dict, hiddens: Sequence) -> jax.Array:
    """The fused target feature: Linear(3D -> D) of concat(h_low, h_mid, h_high), each [B, T, D]."""
    if len(hiddens) != 3:
        raise ValueError(f"eagle_fuse takes the 3 hidden states (low, mid, high), got {len(hiddens)}")
    x = jnp.concatenate([jnp.asarray(h) for h in hiddens], axis=-1)
    return L.linear(params["fuse"], x, x.dtype)


def eagle_cache(config: HeadsConfig, base_config: ModelConfig, batch: int, max_len: int):
    """An empty KV cache for the EAGLE drafter (one layer)."""
    from jaxar.cache import KVCache

    _check_kind(config, "eagle")
    return KVCache.empty(drafter_model_config(base_config), batch, max_len)


def eagle_forward(params: dict, base_params: dict, tokens, features, *, config: HeadsConfig,
                  base_config: ModelConfig, cache=None, positions=None, tree_mask=None, num_new=None):
    """The EAGLE drafter on T positions: tokens [B, T] where tokens[:, t] = token_{t+1} (the token that
    follows the feature's position), features [B, T, D] (fused target features or the drafter's own
    previous output hiddens). cache / positions / tree_mask [B, T, T] / num_new [B] as in
    `jaxar.models.transformer.forward` (one layer; `eagle_cache` builds the cache).

    Returns (logits [B, T, V] float32: the draft distribution of token_{t+2}, hidden [B, T, D]: the
    output after the base's final norm, the feature of position t+1 for the next drafting step,
    the updated cache or None).
    """
    from jaxar.models.transformer import forward

    _check_kind(config, "eagle")
    tokens, features = jnp.asarray(tokens), jnp.asarray(features)
    if tokens.ndim != 2 or features.shape != tokens.shape + (base_config.d_model,):
        raise ValueError(f"eagle_forward needs tokens [batch, T] and features [batch, T, d_model="
                         f"{base_config.d_model}], got {tokens.shape} and {features.shape}")
    dt = jnp.dtype(base_config.dtype)
    x = jnp.concatenate([base_embed(base_params, tokens, base_config), features.astype(dt)], axis=-1)
    x = L.linear(params["fc"], x, dt)
    dcfg = drafter_model_config(base_config)
    logits, cache, hidden = forward(_drafter_params(params, base_params, base_config), embeds=x, config=dcfg,
                                    positions=positions, cache=cache, tree_mask=tree_mask, num_new=num_new,
                                    return_hidden=True)
    return logits, hidden, cache


__all__ = ["HeadsConfig", "KINDS", "base_embed", "base_final_norm", "base_lm_head", "default_feature_layers",
           "drafter_model_config", "eagle_cache", "eagle_forward", "eagle_fuse", "hydra_head_logits",
           "hydra_logits_teacher_forced", "init_heads", "medusa_logits"]
