"""Class-conditional image AR models over VQ codes, on the core transformer engine.

Two kinds, one config (`ImageARConfig.kind`):

* ``"raster"`` (LlamaGen, Sun et al. 2024): a decoder LM over the single-scale codes of
  `VQVAE.tokens` in raster order. Vocabulary = K codes, then ``num_classes`` class tokens
  (id ``K + c``), then the null-class token (id ``K + num_classes``, for classifier-free
  guidance). Input ``[class token, code_0 .. code_{L-2}]`` predicts ``code_0 .. code_{L-1}``
  (L = side^2 = 49), learned absolute positions. Only the K code logits are scored / sampled.
* ``"var"`` (VAR, Tian et al. 2024): next-scale prediction over the multi-scale codes of
  `VQVAE.scale_tokens`, all scales in one sequence of ``sum n_k^2`` tokens with block-causal
  attention by scale (`Mask.block_causal(scale_ids)`: full within a scale, causal across).
  Input of scale 0 is the class embedding (the start token); input of scale k+1 is the
  accumulated ``f_hat`` of scales 0..k area-downsampled to ``n_{k+1}``
  (`MultiScaleVQ.teacher_forcing_inputs`) through a linear word embedding ``D_code -> d_model``.
  Every input gets a learned position embedding (the engine's ``pos_embed``) and a level
  (scale) embedding; the class embedding also conditions every block through AdaLN
  (``cond_dim = d_model``). Output head over the K codes.

Labels are ``0 .. num_classes - 1``; ``num_classes`` is the null class (unconditional), which
training substitutes with probability ``label_dropout`` (`drop_labels`).

Parameters are one plain dict: ``{"transformer": <engine params>}`` plus, for VAR,
``class_embed [C + 1, D]``, ``word_embed/{kernel [D_code, D], bias [D]}``, ``level_embed [S, D]``.
Sampling lives in `jaxar.decode.image`.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Dict, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxar.config import ModelConfig
from jaxar.models import transformer
from jaxar.models.masks import Mask
from jaxar.models.vision import scales
from jaxar.models.vision.msvq import MultiScaleVQ
from jaxar.models.vision.vqvae import VQVAE, VQVAEConfig, msvq_module, msvq_variables, to_model_images

__all__ = ["KINDS", "ImageARConfig", "init_params", "drop_labels", "embed_inputs", "score", "loss_fn",
           "encode_tokens", "check_labels", "check_tokens", "check_tokenizer", "word_embed", "msvq_apply"]

KINDS = ("raster", "var")
_DTYPES = ("float32", "bfloat16", "float16")
_BACKENDS = ("xla", "cudnn", "pallas")


@dataclasses.dataclass(frozen=True)
class ImageARConfig:
    """Hyper-parameters of an image AR model (frozen, hashable: a jit static argument)."""

    kind: str  # "raster" | "var"
    num_classes: int = 10
    codebook_size: int = 512  # K: the tokenizer's codebook size
    patch_nums: tuple = (1, 2, 3, 5, 7)  # var: the tokenizer's scales; raster: side patch_nums[-1]
    d_model: int = 256
    n_layers: int = 6
    n_heads: int = 4
    mlp_dim: int = 768
    label_dropout: float = 0.1
    code_dim: int = 32  # var: the tokenizer's code_dim (the word embedding's input width)
    dtype: str = "float32"
    attention_backend: str = "xla"

    def __post_init__(self):
        if isinstance(self.patch_nums, (list, tuple)):
            object.__setattr__(self, "patch_nums", tuple(int(n) for n in self.patch_nums))
        self.validate()

    def validate(self) -> "ImageARConfig":
        def need(ok, msg):
            if not ok:
                raise ValueError(msg)

        need(self.kind in KINDS, f"image model kind={self.kind!r} is not supported; use one of {KINDS}")
        for name in ("num_classes", "codebook_size", "code_dim", "d_model", "n_layers", "n_heads", "mlp_dim"):
            value = getattr(self, name)
            need(isinstance(value, int) and not isinstance(value, bool) and value > 0,
                 f"image model {name} must be a positive integer, got {value!r}")
        need(isinstance(self.patch_nums, tuple) and len(self.patch_nums) > 0,
             f"image model patch_nums must be a non-empty list of scale sides, got {self.patch_nums!r}")
        try:
            scales.check_patch_nums(self.patch_nums)
        except ValueError as e:
            raise ValueError(f"image model patch_nums={self.patch_nums}: {e}") from None
        need(self.kind != "var" or len(self.patch_nums) >= 2,
             f"a var model needs at least two scales in patch_nums, got {self.patch_nums}")
        need(self.d_model % self.n_heads == 0,
             f"image model d_model={self.d_model} is not divisible by n_heads={self.n_heads}")
        need(0.0 <= float(self.label_dropout) < 1.0,
             f"image model label_dropout must be in [0, 1), got {self.label_dropout}")
        need(self.dtype in _DTYPES, f"image model dtype={self.dtype!r}: use one of {_DTYPES}")
        need(self.attention_backend in _BACKENDS,
             f"image model attention_backend={self.attention_backend!r}: use one of {_BACKENDS}")
        return self

    @property
    def side(self) -> int:
        return int(self.patch_nums[-1])

    @property
    def seq_len(self) -> int:
        """Tokens per image: side^2 (raster, 49) or sum n_k^2 (var, 88 for (1, 2, 3, 5, 7))."""
        return self.side ** 2 if self.kind == "raster" else scales.num_tokens(self.patch_nums)

    @property
    def null_class(self) -> int:
        return self.num_classes

    @property
    def num_steps(self) -> int:
        """Sampling steps: one per token (raster) or one per scale (var)."""
        return self.seq_len if self.kind == "raster" else len(self.patch_nums)

    def model_config(self) -> ModelConfig:
        """The engine's config: raster a Llama over K + C + 1 ids, var a LayerNorm/AdaLN stack over K codes."""
        common = dict(d_model=self.d_model, n_layers=self.n_layers, n_heads=self.n_heads, mlp_dim=self.mlp_dim,
                      max_seq_len=self.seq_len, position="learned", dtype=self.dtype,
                      attention_backend=self.attention_backend)
        if self.kind == "raster":
            return ModelConfig(family="llama", vocab_size=self.codebook_size + self.num_classes + 1, **common)
        return ModelConfig(family="llama", vocab_size=self.codebook_size, norm="layernorm", cond_dim=self.d_model,
                           **common)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["patch_nums"] = list(self.patch_nums)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "ImageARConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown image model config keys {unknown}; known keys are {sorted(known)}")
        if "kind" not in d:
            raise ValueError(f"image model config needs kind (one of {KINDS})")
        return cls(**d)


# ---------------------------------------------------------------------------------------------
# Parameters


def init_params(config: ImageARConfig, rng) -> dict:
    """Random parameters: `{"transformer": ...}` (+ class/word/level embeddings for var)."""
    if isinstance(rng, int):
        rng = jax.random.PRNGKey(rng)
    k_tr, k_cls, k_word, k_lvl = jax.random.split(rng, 4)
    params = {"transformer": transformer.init_params(config.model_config(), k_tr)}
    if config.kind == "var":
        D = config.d_model
        params["class_embed"] = jax.random.normal(k_cls, (config.num_classes + 1, D)) * (1.0 / np.sqrt(3 * D))
        params["level_embed"] = jax.random.normal(k_lvl, (len(config.patch_nums), D)) * 0.02
        Dc = config.code_dim
        params["word_embed"] = {"kernel": jax.random.normal(k_word, (Dc, D)) / np.sqrt(Dc), "bias": jnp.zeros((D,))}
    return params


# ---------------------------------------------------------------------------------------------
# Checks (host side, one-line errors)


def _concrete(x) -> bool:
    return not isinstance(x, jax.core.Tracer)


def check_labels(labels, config: ImageARConfig, allow_null: bool = True) -> jax.Array:
    """int [B] class labels in 0..num_classes-1 (num_classes: the null class when allowed)."""
    labels = jnp.asarray(labels)
    if labels.ndim != 1 or not jnp.issubdtype(labels.dtype, jnp.integer):
        raise ValueError(f"labels must be an int vector [batch], got {labels.dtype} shape {tuple(labels.shape)}")
    if _concrete(labels) and labels.size:
        top = config.num_classes if allow_null else config.num_classes - 1
        lo, hi = int(jnp.min(labels)), int(jnp.max(labels))
        if lo < 0 or hi > top:
            bad = lo if lo < 0 else hi
            raise ValueError(f"label {bad} out of range: use 0..{config.num_classes - 1}"
                             + (f" (or {config.num_classes}, the null class)" if allow_null else ""))
    return labels.astype(jnp.int32)


def check_tokens(tokens, config: ImageARConfig, batch: Optional[int] = None) -> jax.Array:
    """int [B, seq_len] code ids in 0..K-1."""
    tokens = jnp.asarray(tokens)
    if tokens.ndim != 2 or tokens.shape[1] != config.seq_len or not jnp.issubdtype(tokens.dtype, jnp.integer):
        raise ValueError(f"tokens must be int [batch, {config.seq_len}] ({config.kind} sequence of "
                         f"patch_nums={config.patch_nums}), got {tokens.dtype} shape {tuple(tokens.shape)}")
    if batch is not None and tokens.shape[0] != batch:
        raise ValueError(f"tokens have {tokens.shape[0]} rows but labels have {batch}; give one label per row")
    if _concrete(tokens) and tokens.size:
        lo, hi = int(jnp.min(tokens)), int(jnp.max(tokens))
        if lo < 0 or hi >= config.codebook_size:
            raise ValueError(f"token {lo if lo < 0 else hi} out of range: codes are 0..{config.codebook_size - 1}")
    return tokens.astype(jnp.int32)


def check_tokenizer(config: ImageARConfig, tokenizer) -> Tuple[VQVAEConfig, Any]:
    """`tokenizer = (VQVAEConfig, VQVAE variables)` matching the model (var needs its multi-scale quantizer)."""
    if tokenizer is None:
        if config.kind == "var":
            raise ValueError("a var model needs tokenizer=(vq_config, vq_params) (its inputs are the tokenizer's "
                             "accumulated feature maps); pass the tokenizer run's config and params")
        return None
    if not (isinstance(tokenizer, tuple) and len(tokenizer) == 2 and isinstance(tokenizer[0], VQVAEConfig)):
        raise ValueError("tokenizer must be a pair (VQVAEConfig, VQVAE variables)")
    vq_config, vq_params = tokenizer
    if vq_config.codebook_size != config.codebook_size:
        raise ValueError(f"the tokenizer has {vq_config.codebook_size} codes but the model codebook_size="
                         f"{config.codebook_size}; set model codebook_size to the tokenizer's")
    if config.kind == "var" and vq_config.code_dim != config.code_dim:
        raise ValueError(f"the tokenizer's code_dim is {vq_config.code_dim} but the model code_dim="
                         f"{config.code_dim}; set model code_dim to the tokenizer's")
    if config.kind == "var" and tuple(vq_config.patch_nums) != tuple(config.patch_nums):
        raise ValueError(f"the tokenizer's patch_nums {tuple(vq_config.patch_nums)} differ from the model's "
                         f"{config.patch_nums}; set model patch_nums to the tokenizer's")
    if config.kind == "raster" and config.side != 7:
        raise ValueError(f"the raster model's side patch_nums[-1]={config.side} must be the tokenizer's latent "
                         "side 7")
    return vq_config, vq_params


# ---------------------------------------------------------------------------------------------
# Inputs and scoring


def drop_labels(labels, rng, rate: float, num_classes: int) -> jax.Array:
    """Each label replaced by the null class `num_classes` with probability `rate` (classifier-free guidance)."""
    if rate <= 0:
        return labels
    drop = jax.random.bernoulli(rng, rate, labels.shape)
    return jnp.where(drop, num_classes, labels).astype(jnp.int32)


def msvq_apply(vq_config: VQVAEConfig, vq_params, method: str, *args):
    """Run a `MultiScaleVQ` method of the tokenizer (teacher_forcing_inputs, add_scale, ...)."""
    return msvq_module(vq_config).apply(msvq_variables(vq_params), *args, method=getattr(MultiScaleVQ, method))


def word_embed(params: dict, feats) -> jax.Array:
    """[..., D_code] -> [..., d_model] (the VAR word embedding)."""
    p = params["word_embed"]
    return feats.astype(jnp.float32) @ p["kernel"] + p["bias"]


def embed_inputs(params: dict, tokens, labels, config: ImageARConfig, tokenizer=None):
    """Var: (embeds [B, L, d_model], cond [B, d_model]) of the full teacher-forced sequence."""
    vq_config, vq_params = tokenizer
    maps = scales.unflatten_scales(tokens, config.patch_nums)
    # [B, L - 1, D_code]: f_hat of scales 0..k-1 downsampled to n_k, for k >= 1
    feats = msvq_apply(vq_config, vq_params, "teacher_forcing_inputs", maps)
    # [B, d_model]
    cls = jnp.take(params["class_embed"], labels, axis=0)
    x = jnp.concatenate([cls[:, None, :], word_embed(params, feats)], axis=1)
    level = jnp.take(params["level_embed"], jnp.asarray(scales.scale_ids(config.patch_nums)), axis=0)
    return x + level[None], cls


def _score(params, tokens, labels, config: ImageARConfig, tokenizer):
    mcfg = config.model_config()
    K = config.codebook_size
    B = tokens.shape[0]
    if config.kind == "raster":
        inputs = jnp.concatenate([(labels + K)[:, None], tokens[:, :-1]], axis=1)
        logits, _ = transformer.forward(params["transformer"], inputs, config=mcfg)
        return logits[..., :K]
    embeds, cond = embed_inputs(params, tokens, labels, config, tokenizer)
    ids = jnp.broadcast_to(jnp.asarray(scales.scale_ids(config.patch_nums)), (B, config.seq_len))
    logits, _ = transformer.forward(params["transformer"], config=mcfg, embeds=embeds, cond=cond,
                                    mask=Mask.block_causal(ids))
    return logits


def score(params: dict, tokens, labels, config: ImageARConfig, tokenizer=None) -> jax.Array:
    """The uncached full-sequence forward: logits float32 [B, seq_len, K] of every code given the ones before
    (raster: the class token and earlier codes; var: the class and all earlier scales)."""
    labels = check_labels(labels, config)
    tokens = check_tokens(tokens, config, labels.shape[0])
    tokenizer = check_tokenizer(config, tokenizer)
    return _score(params, tokens, labels, config, tokenizer)


def loss_fn(params: dict, batch: Dict[str, Any], rng, config: ImageARConfig, tokenizer=None):
    """Mean next-code cross-entropy over the sequence, with label dropout (labels -> null class with
    probability `config.label_dropout`, drawn from `rng` by `drop_labels`).

    batch: {"tokens": int32 [B, seq_len], "labels": int32 [B]}. Returns (loss, {"loss", "accuracy"}).
    """
    if not isinstance(batch, dict) or "tokens" not in batch or "labels" not in batch:
        raise ValueError("batch must be a dict with 'tokens' [B, seq_len] and 'labels' [B]")
    labels = check_labels(batch["labels"], config)
    tokens = check_tokens(batch["tokens"], config, labels.shape[0])
    tokenizer = check_tokenizer(config, tokenizer)
    labels = drop_labels(labels, rng, float(config.label_dropout), config.num_classes)
    logits = _score(params, tokens, labels, config, tokenizer)
    logp = jax.nn.log_softmax(logits, axis=-1)
    nll = -jnp.take_along_axis(logp, tokens[..., None], axis=-1)[..., 0]
    loss = jnp.mean(nll)
    accuracy = jnp.mean((jnp.argmax(logits, axis=-1) == tokens).astype(jnp.float32))
    return loss, {"loss": loss, "accuracy": accuracy}


# ---------------------------------------------------------------------------------------------
# Tokenizing a data set


@functools.partial(jax.jit, static_argnames=("kind", "vq_config"))
def _encode_batch(vq_params, pixels, *, kind, vq_config):
    images = to_model_images(pixels)
    model = VQVAE(vq_config)
    if kind == "raster":
        codes = model.apply(vq_params, images, method=VQVAE.tokens)
        return codes.reshape(codes.shape[0], -1).astype(jnp.int32)
    return scales.flatten_scales(model.apply(vq_params, images, method=VQVAE.scale_tokens)).astype(jnp.int32)


def encode_tokens(config: ImageARConfig, vq_config: VQVAEConfig, vq_params, images_uint8,
                  batch_size: int = 256) -> np.ndarray:
    """uint8 images [N, 28, 28] -> int32 [N, seq_len] (raster: VQVAE.tokens in raster order; var:
    VQVAE.scale_tokens flattened scale by scale), in jitted batches of `batch_size` (the last one padded)."""
    check_tokenizer(config, (vq_config, vq_params))
    if config.kind == "var" and not vq_config.patch_nums:
        raise ValueError("a var model needs a tokenizer with a multi-scale quantizer (tokenizer.patch_nums)")
    images = np.asarray(images_uint8)
    if images.ndim == 4 and images.shape[-1] == 1:
        images = images[..., 0]
    if images.ndim != 3 or images.shape[1:] != (28, 28):
        raise ValueError(f"images must be uint8 [N, 28, 28], got shape {images.shape}")
    n = images.shape[0]
    out = np.zeros((n, config.seq_len), np.int32)
    for start in range(0, n, batch_size):
        chunk = images[start:start + batch_size]
        m = chunk.shape[0]
        if m < batch_size and n > batch_size:
            chunk = np.concatenate([chunk, np.zeros((batch_size - m, 28, 28), chunk.dtype)])
        out[start:start + m] = np.asarray(_encode_batch(vq_params, chunk, kind=config.kind,
                                                        vq_config=vq_config))[:m]
    return out
