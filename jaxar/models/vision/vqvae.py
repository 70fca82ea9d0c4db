"""VQ-VAE image tokenizer for 28x28 single-channel images (Fashion-MNIST): 7x7 grids of codes from a K-code book.

  image [B, 28, 28, 1] in [-1, 1]
    -> conv encoder (stride 2 twice: 28 -> 14 -> 7) -> 1x1 pre-quant conv to D        z  [B, 7, 7, D]
    -> nearest code (quantize.nearest_code)                                          tokens int32 [B, 7, 7]
    -> straight-through -> 1x1 post-quant conv -> transposed-conv decoder (7 -> 14 -> 28)
    -> reconstruction [B, 28, 28, 1]

The decoder's last layer is a plain conv (no tanh): reconstructions live in the same [-1, 1] space as the inputs
but are not clamped; `to_uint8` clips when turning them back into pixels.

The codebook is the parameter params["params"]["codebook"] [K, D]. With `use_ema=False` it is trained by the
optimiser through the codebook loss. With `use_ema=True` the loss has no codebook term (its gradient is exactly 0),
and after each optimiser step `ema_codebook_step` moves the codes to the EMA means of the latents assigned to them
(and optionally restarts dead codes).

Usage:
  config = VQVAEConfig()
  model = VQVAE(config)
  params = model.init(key, jnp.zeros((1, 28, 28, 1)))
  tokens = model.apply(params, images, method=VQVAE.tokens)           # int32 [B, 7, 7]
  recon = model.apply(params, tokens, method=VQVAE.decode_tokens)     # [B, 28, 28, 1]
  (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, images, config)
"""

import dataclasses
from typing import Any, Dict, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxar.models.vision.msvq import MultiScaleVQ
from jaxar.models.vision.scales import check_patch_nums
from jaxar.models.vision.quantize import (EMAState, code_usage, ema_init, ema_update, lookup_codes, nearest_code,
                                          restart_dead_codes, straight_through, vq_losses)

IMAGE_SIZE = 28
LATENT_SIZE = 7  # two stride-2 convs: 28 -> 14 -> 7


@dataclasses.dataclass(frozen=True)
class VQVAEConfig:
    """VQ-VAE hyper-parameters.

    channels: width of the first encoder / last decoder stage; the 7x7 stage uses 2 * channels.
    codebook_size: K, the image-token vocabulary.
    code_dim: D, the dimension of a latent / code vector.
    num_res_blocks: residual blocks at the 7x7 stage, in the encoder and in the decoder each.
    beta: commitment weight.
    use_ema: EMA codebook (ema_codebook_step) instead of the codebook loss.
    ema_decay, ema_eps: EMA decay and Laplace smoothing.
    dead_code_threshold: with EMA, codes whose EMA cluster size falls below this are restarted (0 disables).
    patch_nums: () for a single-scale tokenizer; else the token-map sides of a second quantizer on the same
      encoder / decoder, VAR's multi-scale residual quantizer (`MultiScaleVQ`, its own codebook of
      codebook_size codes, last side 7). One tokenizer run then serves both the raster model (the single-scale
      codes) and the next-scale model (the multi-scale codes), so the two compare on one decoder.
    quant_resi, num_phi: the multi-scale quantizer's phi blend ratio and number of shared phi convs.
    """
    channels: int = 64
    codebook_size: int = 512
    code_dim: int = 32
    num_res_blocks: int = 1
    beta: float = 0.25
    use_ema: bool = False
    ema_decay: float = 0.99
    ema_eps: float = 1e-5
    dead_code_threshold: float = 0.0
    patch_nums: Tuple[int, ...] = ()
    quant_resi: float = 0.5
    num_phi: int = 4

    def __post_init__(self):
        object.__setattr__(self, "patch_nums", tuple(int(n) for n in self.patch_nums))
        if self.patch_nums:
            check_patch_nums(self.patch_nums)
            if self.patch_nums[-1] != LATENT_SIZE:
                raise ValueError(f"VQVAEConfig.patch_nums must end at the latent side {LATENT_SIZE}, "
                                 f"got {self.patch_nums}")
        for name in ("channels", "codebook_size", "code_dim"):
            if getattr(self, name) < 1:
                raise ValueError(f"VQVAEConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.num_res_blocks < 0:
            raise ValueError(f"VQVAEConfig.num_res_blocks must be >= 0, got {self.num_res_blocks}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"VQVAEConfig.ema_decay must be in [0, 1), got {self.ema_decay}")


def _check_images(images: jax.Array) -> jax.Array:
    """[B, 28, 28] or [B, 28, 28, 1] float -> [B, 28, 28, 1]."""
    if images.ndim == 3:
        images = images[..., None]
    if images.ndim != 4 or images.shape[1:] != (IMAGE_SIZE, IMAGE_SIZE, 1):
        raise ValueError(f"images must be [B, 28, 28] or [B, 28, 28, 1], got {images.shape}; "
                         "use to_model_images on uint8 pixels")
    if not jnp.issubdtype(images.dtype, jnp.floating):
        raise ValueError(f"images must be float in [-1, 1], got dtype {images.dtype}; use to_model_images first")
    return images


def to_model_images(pixels: Any) -> jax.Array:
    """uint8 [B, 28, 28] (or [B, 28, 28, 1]) pixels -> float32 [B, 28, 28, 1] in [-1, 1]."""
    pixels = jnp.asarray(pixels)
    if pixels.ndim == 3:
        pixels = pixels[..., None]
    return pixels.astype(jnp.float32) / 127.5 - 1.0


def to_uint8(images: jax.Array) -> np.ndarray:
    """Model-space images [B, 28, 28, 1] -> uint8 [B, 28, 28] (clipped to [-1, 1] first)."""
    pixels = (np.clip(np.asarray(images, np.float32), -1.0, 1.0) + 1.0) * 127.5
    return np.round(pixels)[..., 0].astype(np.uint8)


class ResBlock(nn.Module):
    """x + conv1x1(relu(conv3x3(relu(x)))), as in the VQ-VAE paper."""
    channels: int

    @nn.compact
    def __call__(self, x):
        h = nn.Conv(self.channels, (3, 3), padding="SAME")(nn.relu(x))
        return x + nn.Conv(x.shape[-1], (1, 1))(nn.relu(h))


class VQVAE(nn.Module):
    config: VQVAEConfig

    def setup(self):
        c = self.config
        self.codebook = self.param(
            "codebook", nn.initializers.variance_scaling(1.0, "fan_in", "uniform", in_axis=1, out_axis=0),
            (c.codebook_size, c.code_dim))
        self.enc_in = nn.Conv(c.channels, (3, 3), padding="SAME")
        self.enc_down1 = nn.Conv(c.channels, (4, 4), strides=(2, 2), padding="SAME")  # 28 -> 14
        self.enc_down2 = nn.Conv(2 * c.channels, (4, 4), strides=(2, 2), padding="SAME")  # 14 -> 7
        self.enc_res = [ResBlock(c.channels) for _ in range(c.num_res_blocks)]
        self.pre_quant = nn.Conv(c.code_dim, (1, 1))
        self.post_quant = nn.Conv(2 * c.channels, (1, 1))
        self.dec_in = nn.Conv(2 * c.channels, (3, 3), padding="SAME")
        self.dec_res = [ResBlock(c.channels) for _ in range(c.num_res_blocks)]
        self.dec_up1 = nn.ConvTranspose(c.channels, (4, 4), strides=(2, 2), padding="SAME")  # 7 -> 14
        self.dec_up2 = nn.ConvTranspose(c.channels, (4, 4), strides=(2, 2), padding="SAME")  # 14 -> 28
        self.dec_out = nn.Conv(1, (3, 3), padding="SAME")
        if c.patch_nums:
            self.msvq = msvq_module(c)

    def encode(self, images: jax.Array) -> jax.Array:
        """images [B, 28, 28(, 1)] in [-1, 1] -> continuous latents z [B, 7, 7, D]."""
        x = _check_images(images)
        x = nn.relu(self.enc_in(x))
        x = nn.relu(self.enc_down1(x))
        x = self.enc_down2(x)
        for block in self.enc_res:
            x = block(x)
        return self.pre_quant(nn.relu(x))

    def quantize(self, z: jax.Array) -> Tuple[jax.Array, jax.Array]:
        """z [..., D] -> (tokens int32 [...], codes [..., D])."""
        return nearest_code(z, self.codebook)

    def tokens(self, images: jax.Array) -> jax.Array:
        """images [B, 28, 28(, 1)] -> int32 tokens [B, 7, 7] in [0, K)."""
        return self.quantize(self.encode(images))[0]

    def decode(self, quantized: jax.Array) -> jax.Array:
        """Code vectors [B, 7, 7, D] -> images [B, 28, 28, 1] (unclamped, in [-1, 1] space)."""
        if quantized.ndim != 4 or quantized.shape[-1] != self.config.code_dim:
            raise ValueError(f"decode wants code vectors [B, H, W, {self.config.code_dim}], got {quantized.shape}")
        x = self.dec_in(self.post_quant(quantized))
        for block in self.dec_res:
            x = block(x)
        x = nn.relu(self.dec_up1(nn.relu(x)))
        x = nn.relu(self.dec_up2(x))
        return self.dec_out(x)

    def decode_tokens(self, tokens: jax.Array) -> jax.Array:
        """int tokens [B, 7, 7] -> images [B, 28, 28, 1]."""
        if tokens.ndim != 3 or not jnp.issubdtype(tokens.dtype, jnp.integer):
            raise ValueError(f"tokens must be integer [B, 7, 7], got {tokens.dtype} {tokens.shape}")
        return self.decode(lookup_codes(tokens, self.codebook))

    def scale_tokens(self, images: jax.Array) -> list:
        """images -> the multi-scale quantizer's token maps, int32 [B, n, n] for n in patch_nums."""
        self._need_multiscale()
        return self.msvq.encode_scales(self.encode(images))

    def decode_scale_tokens(self, tokens) -> jax.Array:
        """Multi-scale token maps [B, n, n] (n in patch_nums) -> images [B, 28, 28, 1]."""
        self._need_multiscale()
        return self.decode(self.msvq.decode_tokens(tokens))

    def _need_multiscale(self):
        if not self.config.patch_nums:
            raise ValueError("this tokenizer has no multi-scale quantizer (VQVAEConfig.patch_nums is empty); "
                             "train one with tokenizer.patch_nums set")

    def __call__(self, images: jax.Array) -> Tuple[jax.Array, Dict[str, jax.Array]]:
        """images -> (reconstruction [B, 28, 28, 1], {"z", "quantized", "tokens"}); with patch_nums also
        "ms_recon" (the multi-scale quantizer's reconstruction) and "ms" (its MSVQOutput).

        The reconstruction goes through straight_through(z, quantized), so the decoder's gradient reaches the encoder.
        """
        z = self.encode(images)
        tokens, quantized = self.quantize(z)
        recon = self.decode(straight_through(z, quantized))
        aux = {"z": z, "quantized": quantized, "tokens": tokens}
        if self.config.patch_nums:
            ms = self.msvq(z)
            aux["ms"] = ms
            aux["ms_recon"] = self.decode(ms.quantized)
        return recon, aux


def msvq_module(config: VQVAEConfig) -> MultiScaleVQ:
    """The multi-scale quantizer of a VQVAEConfig with patch_nums (apply it to `msvq_variables(params)`)."""
    if not config.patch_nums:
        raise ValueError("VQVAEConfig.patch_nums is empty: this tokenizer has no multi-scale quantizer")
    return MultiScaleVQ(codebook_size=config.codebook_size, dim=config.code_dim, patch_nums=config.patch_nums,
                        beta=config.beta, quant_resi=config.quant_resi, num_phi=config.num_phi, name="msvq")


def msvq_variables(params: Any) -> dict:
    """The multi-scale quantizer's variables inside VQVAE variables: {"params": params["params"]["msvq"]}."""
    return {"params": params["params"]["msvq"]}


def loss_fn(params: Any, images: jax.Array, config: VQVAEConfig) -> Tuple[jax.Array, Dict[str, jax.Array]]:
    """Reconstruction MSE + VQ loss.

    loss = mean (recon - images)^2 + codebook + beta * commitment        (use_ema=False)
    loss = mean (recon - images)^2 + beta * commitment                    (use_ema=True: codes move by EMA)
    with patch_nums, plus mean (ms_recon - images)^2 + the multi-scale quantizer's loss (its codebook always
    trains through its loss; EMA applies to the single-scale codebook only)

    Args:
      params: VQVAE variables ({"params": ...}).
      images: float [B, 28, 28(, 1)] in [-1, 1].
      config: the model's VQVAEConfig.
    Returns:
      (loss, metrics) with scalar metrics "recon_mse", "codebook_loss", "commitment_loss", "perplexity" (code usage
      over the batch) and "codes_used" (distinct codes in the batch).
    """
    images = _check_images(images)
    recon, aux = VQVAE(config).apply(params, images)
    recon_mse = jnp.mean(jnp.square(recon - images))
    losses = vq_losses(aux["z"], aux["quantized"], config.beta)
    vq_term = config.beta * losses.commitment if config.use_ema else losses.total
    counts, perplexity = code_usage(aux["tokens"], config.codebook_size)
    metrics = {"recon_mse": recon_mse, "codebook_loss": losses.codebook, "commitment_loss": losses.commitment,
               "perplexity": perplexity, "codes_used": jnp.sum(counts > 0)}
    total = recon_mse + vq_term
    if config.patch_nums:
        ms = aux["ms"]
        ms_mse = jnp.mean(jnp.square(aux["ms_recon"] - images))
        ms_counts, ms_perplexity = code_usage(jnp.concatenate([t.reshape(-1) for t in ms.tokens]),
                                              config.codebook_size)
        metrics.update(ms_recon_mse=ms_mse, ms_vq_loss=ms.loss, ms_perplexity=ms_perplexity,
                       ms_codes_used=jnp.sum(ms_counts > 0))
        total = total + ms_mse + ms.loss
    return total, metrics


def init_ema_state(params: Any):
    """EMA statistics reproducing the current codebook (see quantize.ema_init); with a multi-scale quantizer
    a dict {"vq": ..., "msvq": ...}, one EMAState per codebook."""
    state = ema_init(params["params"]["codebook"])
    if "msvq" in params["params"]:
        return {"vq": state, "msvq": ema_init(params["params"]["msvq"]["codebook"])}
    return state


def ema_codebook_step(params: Any, ema_state, images: jax.Array, config: VQVAEConfig,
                      key: Optional[jax.Array] = None) -> Tuple[Any, Any, Dict[str, jax.Array]]:
    """EMA codebook update on a batch (call after the optimiser step when config.use_ema).

    Encodes `images` with `params`, assigns latents to codes, applies quantize.ema_update, then, if
    config.dead_code_threshold > 0, restarts (key required) dead codes from this batch's latents. With a
    multi-scale quantizer (ema_state a dict from init_ema_state) its codebook moves the same way, to the EMA
    means of the quantizer inputs (the area-downsampled residuals of every scale) assigned to each code, and
    its dead codes restart from those inputs.
    Returns (params with the new codebook(s), new EMA state, {"dead_codes": number restarted[, "ms_dead_codes"]}).
    """
    if not config.use_ema:
        raise ValueError("ema_codebook_step needs VQVAEConfig(use_ema=True); without EMA the optimiser trains codes")
    if config.dead_code_threshold > 0 and key is None:
        raise ValueError("dead_code_threshold > 0 needs a PRNG key: pass key=jax.random.PRNGKey(...)")
    multi = isinstance(ema_state, dict)
    if multi != bool(config.patch_nums):
        raise ValueError("ema_state does not match the tokenizer (one EMAState per codebook); build it with "
                         "init_ema_state(params)")
    images = _check_images(images)
    model = VQVAE(config)
    z = model.apply(params, images, method=VQVAE.encode)
    vq_state = ema_state["vq"] if multi else ema_state
    if vq_state.codebook.shape != params["params"]["codebook"].shape:
        raise ValueError(f"ema_state codebook {vq_state.codebook.shape} does not match the model's "
                         f"{params['params']['codebook'].shape}; build it with init_ema_state(params)")
    key_vq, key_ms = jax.random.split(key) if key is not None else (None, None)

    def step(state, latents, tokens, k):
        state = ema_update(state, latents, tokens, config.ema_decay, config.ema_eps)
        dead_count = jnp.zeros((), jnp.int32)
        if config.dead_code_threshold > 0:
            state, dead = restart_dead_codes(state, latents, k, config.dead_code_threshold)
            dead_count = jnp.sum(dead).astype(jnp.int32)
        return state, dead_count

    tokens, _ = nearest_code(z, params["params"]["codebook"])
    vq_state, dead_count = step(vq_state, z, tokens, key_vq)
    inner = dict(params["params"])
    inner["codebook"] = vq_state.codebook
    metrics = {"dead_codes": dead_count}
    new_state = vq_state
    if multi:
        out = msvq_module(config).apply(msvq_variables(params), jax.lax.stop_gradient(z))
        dim = config.code_dim
        latents = jnp.concatenate([x.reshape(-1, dim) for x in out.inputs])
        ms_tokens = jnp.concatenate([t.reshape(-1) for t in out.tokens])
        ms_state, ms_dead = step(ema_state["msvq"], latents, ms_tokens, key_ms)
        inner["msvq"] = {**inner["msvq"], "codebook": ms_state.codebook}
        metrics["ms_dead_codes"] = ms_dead
        new_state = {"vq": vq_state, "msvq": ms_state}
    new_params = dict(params)
    new_params["params"] = inner
    return new_params, new_state, metrics


__all__ = ["IMAGE_SIZE", "LATENT_SIZE", "ResBlock", "VQVAE", "VQVAEConfig", "ema_codebook_step", "init_ema_state",
           "loss_fn", "msvq_module", "msvq_variables", "to_model_images", "to_uint8"]
