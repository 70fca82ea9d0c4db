"""VAR's multi-scale residual quantizer: the tokenizer behind next-scale prediction.

Tian et al. 2024, "Visual Autoregressive Modeling: Scalable Image Generation via Next-Scale
Prediction" (reference code: FoundationVision/VAR, ``models/quant.py`` ``VectorQuantizer2``).
One codebook ``[K, D]`` is shared by every scale. For a latent ``f`` ``[B, S, S, D]`` and
``patch_nums = (n_0, ..., n_{K-1} = S)``:

    residual = f;  f_hat = 0
    for k, n in enumerate(patch_nums):
        z = area_downsample(residual, n)           # [B, n, n, D] (identity at the last scale)
        tokens[k] = nearest code of every z vector  # int32 [B, n, n]
        h = phi_k(upsample(codebook[tokens[k]], S)) # bicubic up to [B, S, S, D]
        f_hat += h;  residual -= h

``phi_k`` is a 3x3 'SAME' conv blended with its input, ``h * (1 - r) + conv(h) * r`` with
``r = |quant_resi|`` (0.5 in VAR); ``num_phi`` distinct convs are shared across the scales as
VAR's ``PhiPartiallyShared`` does (:func:`phi_index`); ``quant_resi = 0`` makes phi the identity.
Per scale the loss is VAR's ``mse(f_hat, sg(f)) + beta * mse(sg(f_hat), f)`` on the running
``f_hat``; the mean over scales is returned, and the output is straight-through on the final
``f_hat`` (forward value ``f_hat``, identity gradient to ``f``).

The VAR transformer's teacher-forcing input of scale ``k + 1`` is the ``f_hat`` accumulated over
scales ``0..k`` area-downsampled to ``n_{k+1}`` (:meth:`MultiScaleVQ.next_scale_input`,
:meth:`MultiScaleVQ.teacher_forcing_inputs`); sampling adds one scale at a time with
:meth:`MultiScaleVQ.add_scale`. Feature maps are channels-last ``[B, H, W, D]``, computed in float32.
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxar.models.vision.quantize import lookup_codes, nearest_code, straight_through, vq_losses
from jaxar.models.vision.scales import area_downsample, check_patch_nums, flatten_scales, upsample

__all__ = ["MSVQOutput", "MultiScaleVQ", "Phi", "phi_index"]

Array = jax.Array

_nearest_code = jax.jit(nearest_code)  # one program per scale shape when run eagerly


def phi_index(scale: int, num_scales: int, num_phi: int) -> int:
    """Which of ``num_phi`` shared phi convs refines scale ``scale`` of ``num_scales``.

    ``num_phi == num_scales``: one per scale (VAR's ``PhiNonShared``); ``num_phi == 1``: one for
    all (``PhiShared``); otherwise VAR's ``PhiPartiallyShared``: the conv whose tick in
    ``linspace(1/(3 num_phi), 1 - 1/(3 num_phi), num_phi)`` is nearest to ``scale / (num_scales - 1)``.
    """
    if num_phi == num_scales:
        return scale
    if num_phi == 1:
        return 0
    at = scale / (num_scales - 1) if num_scales > 1 else 0.0
    ticks = np.linspace(1 / 3 / num_phi, 1 - 1 / 3 / num_phi, num_phi)
    return int(np.argmin(np.abs(ticks - at)))


class Phi(nn.Module):
    """VAR's refinement of an upsampled code map: ``h * (1 - r) + conv3x3(h) * r``."""

    dim: int
    resi_ratio: float = 0.5

    @nn.compact
    def __call__(self, h: Array) -> Array:
        # [B, S, S, D]
        conv = nn.Conv(self.dim, (3, 3), padding="SAME", dtype=jnp.float32, precision=jax.lax.Precision.HIGHEST,
                       name="conv")(h)
        return h * (1.0 - self.resi_ratio) + conv * self.resi_ratio


class MSVQOutput(NamedTuple):
    quantized: Array  # [B, S, S, D] straight-through f_hat: value f_hat, gradient identity to f
    tokens: list  # K token maps, int32 [B, n_k, n_k]
    loss: Array  # scalar: mean over scales of codebook_loss + beta * commitment_loss
    codebook_loss: Array  # scalar: mean over scales of mse(f_hat_k, sg(f)) (trains codebook and phi)
    commitment_loss: Array  # scalar: mean over scales of mse(sg(f_hat_k), f) (trains the encoder)
    inputs: Optional[list] = None  # K quantizer inputs, the area-downsampled residuals [B, n_k, n_k, D] (EMA)


class MultiScaleVQ(nn.Module):
    """Multi-scale residual quantizer (VAR). See the module docstring for the algorithm.

    Attributes:
      codebook_size: K, number of codes (shared by all scales).
      dim: D, latent channels.
      patch_nums: token-map sides, strictly increasing; the last is the latent side S.
      beta: commitment weight.
      quant_resi: phi's blend ratio r (VAR: 0.5); 0 makes phi the identity (no conv params).
      num_phi: distinct phi convs shared across scales (VAR's ``share_quant_resi``, default 4),
        capped at ``len(patch_nums)``.
      codebook_init_scale: codes start uniform in ``±scale / K`` (VAR's ``eini(-1)`` init is scale 1).
    """

    codebook_size: int
    dim: int
    patch_nums: Sequence[int] = (1, 2, 3, 4, 5, 6, 7)
    beta: float = 0.25
    quant_resi: float = 0.5
    num_phi: int = 4
    codebook_init_scale: float = 1.0

    def setup(self):
        nums = check_patch_nums(self.patch_nums)
        if self.codebook_size < 1 or self.dim < 1:
            raise ValueError(f"codebook_size and dim must be >= 1, got {self.codebook_size}, {self.dim}")
        if self.num_phi < 1:
            raise ValueError(f"num_phi must be >= 1 (1 = one phi shared by all scales), got {self.num_phi}")
        bound = abs(self.codebook_init_scale) / self.codebook_size

        def init_codebook(key, shape):
            return jax.random.uniform(key, shape, jnp.float32, -bound, bound)

        self.codebook = self.param("codebook", init_codebook, (self.codebook_size, self.dim))
        if self.quant_resi != 0:
            count = min(self.num_phi, len(nums))
            self.phis = [Phi(self.dim, abs(self.quant_resi)) for _ in range(count)]

    # --- pieces -------------------------------------------------------------------------------

    @property
    def side(self) -> int:
        return int(self.patch_nums[-1])

    def _phi(self, h: Array, scale: int) -> Array:
        if self.quant_resi == 0:
            return h
        return self.phis[phi_index(scale, len(self.patch_nums), len(self.phis))](h)

    def _check_latent(self, f: Array) -> None:
        shape = (self.side, self.side, self.dim)
        if f.ndim != 4 or tuple(f.shape[1:]) != shape:
            raise ValueError(f"latent must be [B, {shape[0]}, {shape[1]}, {shape[2]}] (patch_nums[-1], dim), "
                             f"got shape {tuple(f.shape)}")

    def _check_tokens(self, tokens: Sequence[Array], count: Optional[int] = None) -> None:
        nums = tuple(self.patch_nums)[: len(self.patch_nums) if count is None else count]
        if len(tokens) != len(nums) or any(t.ndim != 3 or t.shape[1:] != (n, n) for t, n in zip(tokens, nums)):
            raise ValueError(f"tokens must be a list of {len(nums)} int maps [B, n, n] for n in {nums}, "
                             f"got shapes {[tuple(t.shape) for t in tokens]}")

    def scale_contribution(self, tokens_k: Array, k: int) -> Array:
        """``phi_k(upsample(codebook[tokens_k], S))``: int ``[B, n_k, n_k]`` -> ``[B, S, S, D]``."""
        if tokens_k.ndim != 3 or tokens_k.shape[1:] != (self.patch_nums[k],) * 2:
            n = self.patch_nums[k]
            raise ValueError(f"tokens of scale {k} must be [B, {n}, {n}], got shape {tuple(tokens_k.shape)}")
        return self._phi(upsample(lookup_codes(tokens_k, self.codebook), self.side), k)

    # --- tokenizer ----------------------------------------------------------------------------

    def __call__(self, f: Array) -> MSVQOutput:
        """Quantize a latent ``[B, S, S, D]``: straight-through ``f_hat``, token maps, losses."""
        self._check_latent(f)
        f = f.astype(jnp.float32)
        # [B, S, S, D]
        residual = jax.lax.stop_gradient(f)
        f_hat = jnp.zeros_like(f)
        tokens, codebook_losses, commitment_losses, inputs = [], [], [], []
        for k, n in enumerate(self.patch_nums):
            # [B, n, n, D]
            z = area_downsample(residual, n)
            inputs.append(z)
            # [B, n, n]
            indices, _ = _nearest_code(z, jax.lax.stop_gradient(self.codebook))
            # [B, S, S, D]; carries gradient to the codebook and phi
            h = self.scale_contribution(indices, k)
            f_hat = f_hat + h
            residual = residual - jax.lax.stop_gradient(h)
            losses = vq_losses(f, f_hat, self.beta)
            codebook_losses.append(losses.codebook)
            commitment_losses.append(losses.commitment)
            tokens.append(indices)
        codebook_loss = jnp.mean(jnp.stack(codebook_losses))
        commitment_loss = jnp.mean(jnp.stack(commitment_losses))
        return MSVQOutput(
            quantized=straight_through(f, f_hat),
            tokens=tokens,
            loss=codebook_loss + self.beta * commitment_loss,
            codebook_loss=codebook_loss,
            commitment_loss=commitment_loss,
            inputs=inputs,
        )

    def encode_scales(self, f: Array) -> list:
        """Latent ``[B, S, S, D]`` -> K token maps, int32 ``[B, n_k, n_k]`` (no gradient)."""
        return self(jax.lax.stop_gradient(f)).tokens

    def decode_tokens(self, tokens: Sequence[Array]) -> Array:
        """K token maps ``[B, n_k, n_k]`` -> ``f_hat`` ``[B, S, S, D]`` = sum of the scale contributions."""
        self._check_tokens(tokens)
        f_hat = self.scale_contribution(tokens[0], 0)
        for k in range(1, len(tokens)):
            f_hat = f_hat + self.scale_contribution(tokens[k], k)
        return f_hat

    # --- the VAR transformer's inputs ---------------------------------------------------------

    def next_scale_input(self, f_hat: Array, k: int) -> Array:
        """``f_hat`` accumulated over scales ``0..k`` ``[B, S, S, D]`` -> its area downsample to
        ``n_{k+1}``, ``[B, n_{k+1}, n_{k+1}, D]``: the input of scale ``k + 1`` (``0 <= k < K - 1``)."""
        if not 0 <= k < len(self.patch_nums) - 1:
            raise ValueError(f"next_scale_input: k must be in [0, {len(self.patch_nums) - 2}] "
                             f"(there is no scale after the last), got {k}")
        self._check_latent(f_hat)
        return area_downsample(f_hat, self.patch_nums[k + 1])

    def add_scale(self, f_hat: Array, tokens_k: Array, k: int) -> tuple:
        """One sampling step (VAR's ``get_next_autoregressive_input``).

        Args:
          f_hat: ``[B, S, S, D]`` accumulated over scales ``0..k-1`` (zeros before scale 0).
          tokens_k: int ``[B, n_k, n_k]`` sampled tokens of scale ``k``.
          k: the scale index.
        Returns:
          ``(f_hat + contribution of scale k, next_input)`` with ``next_input`` the
          ``[B, n_{k+1}, n_{k+1}, D]`` input of scale ``k + 1``, or None after the last scale.
        """
        f_hat = f_hat + self.scale_contribution(tokens_k, k)
        if k == len(self.patch_nums) - 1:
            return f_hat, None
        return f_hat, self.next_scale_input(f_hat, k)

    def teacher_forcing_inputs(self, tokens: Sequence[Array]) -> Array:
        """Inputs of scales ``1..K-1`` for training (VAR's ``idxBl_to_var_input``).

        Args:
          tokens: K token maps (the last one is not needed and may be omitted).
        Returns:
          ``[B, sum_{k>=1} n_k^2, D]``: for every scale ``k >= 1``, the ``f_hat`` of scales
          ``0..k-1`` area-downsampled to ``n_k``, flattened raster within a scale. The scale-0
          input (VAR: the class embedding as start token) is the transformer's business.
        """
        count = len(self.patch_nums)
        if count == 1:
            raise ValueError("teacher_forcing_inputs needs at least two scales in patch_nums")
        if len(tokens) == count:
            tokens = tokens[:-1]
        self._check_tokens(tokens, count - 1)
        f_hat = 0.0
        inputs = []
        for k, tokens_k in enumerate(tokens):
            f_hat = f_hat + self.scale_contribution(tokens_k, k)
            inputs.append(self.next_scale_input(f_hat, k))
        return flatten_scales(inputs)
