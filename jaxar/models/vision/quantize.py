"""Single-scale vector quantisation: nearest code, straight-through, VQ losses, usage, EMA codebook, dead-code restart.

Pure functions over plain arrays, shared by the VQ-VAE tokenizer (vqvae.py) and VAR's multi-scale residual quantizer
(msvq.py). Layout: latents z are [..., D] (any leading dims, e.g. [B, H, W, D]); a codebook is [K, D].

References: van den Oord et al. 2017 (VQ-VAE: straight-through estimator, codebook + beta * commitment loss);
Razavi et al. 2019 (VQ-VAE-2) and sonnet's VectorQuantizerEMA (EMA cluster sizes / embedding sums with Laplace
smoothing).
"""

from typing import NamedTuple, Tuple

import jax
import jax.numpy as jnp


def _check_codebook(z: jax.Array, codebook: jax.Array) -> None:
    if codebook.ndim != 2:
        raise ValueError(f"codebook must be [K, D], got shape {codebook.shape}; pass a 2-D array of codes")
    if z.ndim < 1 or z.shape[-1] != codebook.shape[1]:
        raise ValueError(f"z's last dim must equal the code dim {codebook.shape[1]}, got z shape {z.shape}; "
                         "project the latents to D channels first")


def code_distances(z: jax.Array, codebook: jax.Array) -> jax.Array:
    """Squared L2 distances |z|^2 - 2 z.c + |c|^2.

    Args:
      z: [..., D] latents.
      codebook: [K, D] codes.
    Returns:
      [..., K] float distances (in z's / codebook's promoted dtype).
    """
    _check_codebook(z, codebook)
    # [..., 1]
    z_sq = jnp.sum(z * z, axis=-1, keepdims=True)
    # [K]
    c_sq = jnp.sum(codebook * codebook, axis=-1)
    # [..., K]
    cross = jnp.einsum("...d,kd->...k", z, codebook, precision=jax.lax.Precision.HIGHEST)
    return z_sq - 2.0 * cross + c_sq


def nearest_code(z: jax.Array, codebook: jax.Array) -> Tuple[jax.Array, jax.Array]:
    """Nearest code per latent vector by squared L2 distance; ties go to the lowest index.

    Args:
      z: [..., D] latents.
      codebook: [K, D] codes.
    Returns:
      indices: int32 [...] in [0, K).
      quantized: [..., D] = codebook[indices] (no gradient path to z; use straight_through for that).
    """
    distances = code_distances(z, codebook)
    # jnp.argmin returns the first minimum, i.e. the lowest index among ties.
    indices = jnp.argmin(distances, axis=-1).astype(jnp.int32)
    return indices, jnp.take(codebook, indices, axis=0)


def lookup_codes(indices: jax.Array, codebook: jax.Array) -> jax.Array:
    """codebook[indices]: int [...] -> [..., D]."""
    if codebook.ndim != 2:
        raise ValueError(f"codebook must be [K, D], got shape {codebook.shape}; pass a 2-D array of codes")
    return jnp.take(codebook, indices, axis=0)


def straight_through(z: jax.Array, q: jax.Array) -> jax.Array:
    """Forward value q, gradient passed to z unchanged (identity Jacobian); no gradient reaches q."""
    return z + jax.lax.stop_gradient(q - z)


class VQLosses(NamedTuple):
    """total = codebook + beta * commitment (scalars, means over all elements)."""
    total: jax.Array
    codebook: jax.Array  # mean |sg(z) - q|^2: moves codes towards the encoder outputs
    commitment: jax.Array  # mean |z - sg(q)|^2: keeps the encoder close to its codes


def vq_losses(z: jax.Array, q: jax.Array, beta: float = 0.25) -> VQLosses:
    """VQ-VAE codebook and commitment losses (means over every element of z, as in sonnet / VAR).

    With an EMA codebook the codebook term carries no gradient to anything trained by the optimiser; use
    `beta * commitment` alone as the loss then.
    """
    if z.shape != q.shape:
        raise ValueError(f"z {z.shape} and q {q.shape} must have the same shape; pass q = codebook[indices]")
    codebook_loss = jnp.mean(jnp.square(jax.lax.stop_gradient(z) - q))
    commitment_loss = jnp.mean(jnp.square(z - jax.lax.stop_gradient(q)))
    return VQLosses(codebook_loss + beta * commitment_loss, codebook_loss, commitment_loss)


def code_usage(indices: jax.Array, num_codes: int) -> Tuple[jax.Array, jax.Array]:
    """How often each code is used.

    Args:
      indices: int [...] code indices in [0, num_codes).
      num_codes: K.
    Returns:
      counts: int32 [K], counts.sum() == indices.size.
      perplexity: exp(entropy of counts / indices.size), in [1, min(K, indices.size)]; K when usage is uniform.
    """
    counts = jnp.bincount(indices.reshape(-1), length=num_codes).astype(jnp.int32)
    probs = counts.astype(jnp.float32) / max(indices.size, 1)
    entropy = -jnp.sum(jnp.where(probs > 0, probs * jnp.log(jnp.where(probs > 0, probs, 1.0)), 0.0))
    return counts, jnp.exp(entropy)


class EMAState(NamedTuple):
    """EMA codebook statistics. codebook == embed_sum / smoothed(cluster_size) after each ema_update."""
    cluster_size: jax.Array  # [K] float: EMA of how many latents each code received
    embed_sum: jax.Array  # [K, D] float: EMA of the sum of the latents assigned to each code
    codebook: jax.Array  # [K, D]


def ema_init(codebook: jax.Array) -> EMAState:
    """Statistics that reproduce `codebook`: cluster_size 1, embed_sum = codebook.

    Starting from (1, codebook) rather than zeros keeps unused codes where they are: their sum and size decay at the
    same rate, so embed_sum / cluster_size stays at the initial code instead of collapsing to 0 or blowing up.
    """
    if codebook.ndim != 2:
        raise ValueError(f"codebook must be [K, D], got shape {codebook.shape}; pass a 2-D array of codes")
    return EMAState(jnp.ones(codebook.shape[0], codebook.dtype), codebook, codebook)


def ema_update(state: EMAState, z: jax.Array, indices: jax.Array, decay: float = 0.99,
               eps: float = 1e-5) -> EMAState:
    """One EMA codebook step (VQ-VAE-2 appendix / sonnet VectorQuantizerEMA, without zero-debiasing).

      n_k   <- decay * n_k + (1 - decay) * #{i : indices_i = k}
      m_k   <- decay * m_k + (1 - decay) * sum_{i : indices_i = k} z_i
      N      = sum_k n_k
      ñ_k    = (n_k + eps) / (N + K * eps) * N          (Laplace smoothing: no division by zero)
      e_k    = m_k / ñ_k

    Args:
      state: EMAState with K codes of dim D.
      z: [..., D] latents (treated as constants: gradients are stopped).
      indices: int [...] their assigned codes (z.shape[:-1]).
      decay, eps: EMA decay and smoothing constant.
    Returns:
      The new EMAState.
    """
    num_codes, dim = state.codebook.shape
    if z.shape[-1] != dim or z.shape[:-1] != indices.shape:
        raise ValueError(f"z {z.shape} must be [..., {dim}] with indices {indices.shape} equal to z.shape[:-1]")
    # [N, D], [N]
    flat_z = jax.lax.stop_gradient(z).reshape(-1, dim).astype(state.embed_sum.dtype)
    flat_indices = indices.reshape(-1)
    counts = jnp.zeros(num_codes, state.cluster_size.dtype).at[flat_indices].add(1.0)
    # [K, D]
    sums = jnp.zeros((num_codes, dim), state.embed_sum.dtype).at[flat_indices].add(flat_z)
    cluster_size = decay * state.cluster_size + (1.0 - decay) * counts
    embed_sum = decay * state.embed_sum + (1.0 - decay) * sums
    total = jnp.sum(cluster_size)
    smoothed = (cluster_size + eps) / (total + num_codes * eps) * total
    codebook = (embed_sum / smoothed[:, None]).astype(state.codebook.dtype)
    return EMAState(cluster_size, embed_sum, codebook)


def restart_dead_codes(state: EMAState, z: jax.Array, key: jax.Array,
                       threshold: float = 1.0) -> Tuple[EMAState, jax.Array]:
    """Re-initialise codes whose EMA usage is below `threshold` from random latents of the batch.

    A dead code k gets codebook_k = embed_sum_k = z_j for a randomly chosen latent j (distinct latents when the batch
    has at least K of them) and cluster_size_k = 1, so the EMA invariant codebook = embed_sum / cluster_size holds.
    Live codes are untouched.

    Args:
      state: EMAState.
      z: [..., D] latents of the current batch (gradients stopped).
      key: PRNG key choosing the latents.
      threshold: codes with cluster_size < threshold are dead.
    Returns:
      (new EMAState, dead: bool [K] — the codes that were replaced).
    """
    num_codes, dim = state.codebook.shape
    if z.shape[-1] != dim:
        raise ValueError(f"z {z.shape} must be [..., {dim}] (the codebook's code dim)")
    flat_z = jax.lax.stop_gradient(z).reshape(-1, dim)
    num_latents = flat_z.shape[0]
    if num_latents >= num_codes:
        choice = jax.random.permutation(key, num_latents)[:num_codes]
    else:
        choice = jax.random.randint(key, (num_codes,), 0, num_latents)
    # [K, D]
    fresh = jnp.take(flat_z, choice, axis=0)
    dead = state.cluster_size < threshold
    codebook = jnp.where(dead[:, None], fresh.astype(state.codebook.dtype), state.codebook)
    embed_sum = jnp.where(dead[:, None], fresh.astype(state.embed_sum.dtype), state.embed_sum)
    cluster_size = jnp.where(dead, jnp.ones_like(state.cluster_size), state.cluster_size)
    return EMAState(cluster_size, embed_sum, codebook), dead


__all__ = ["EMAState", "VQLosses", "code_distances", "code_usage", "ema_init", "ema_update", "lookup_codes",
           "nearest_code", "restart_dead_codes", "straight_through", "vq_losses"]
