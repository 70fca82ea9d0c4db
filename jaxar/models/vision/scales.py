"""Next-scale schedules and the resampling VAR uses between scales.

A multi-scale token sequence (VAR, Tian et al. 2024) is the concatenation of square token
maps of sides ``patch_nums = (n_0, n_1, ..., n_{K-1})``, strictly increasing, the last one
equal to the latent side ``S``. Token ``t`` of the flattened sequence belongs to scale
``scale_ids(patch_nums)[t]``; within a scale, tokens are in raster (row-major) order.

Feature maps are ``[B, H, W, C]`` (channels last). Both resamplers are separable: one
``[n_out, n_in]`` matrix per spatial axis, built in float64 numpy at trace time (static
shapes) and applied with an einsum, so they are exact linear maps that match PyTorch's
``F.interpolate`` on the same input (what VAR trains with):

* :func:`area_downsample` is ``F.interpolate(mode="area")``, i.e. ``adaptive_avg_pool2d``:
  output cell ``i`` averages input cells ``floor(i*n_in/n_out) .. ceil((i+1)*n_in/n_out)-1``
  with equal weights (windows overlap when the ratio is not an integer, e.g. 7 -> 3 averages
  rows {0,1,2}, {2,3,4}, {4,5,6}). ``fractional=True`` gives instead the overlap-weighted
  (box-filter) average, each input cell weighted by the length of its intersection with
  ``[i*n_in/n_out, (i+1)*n_in/n_out)``; both agree for integer ratios.
* :func:`upsample` is ``F.interpolate(mode="bicubic", align_corners=False)``: Keys' cubic
  with ``a = -0.75``, source coordinate ``(o + 0.5) * n_in / n_out - 0.5``, out-of-range
  taps clamped to the border (replicate padding).
"""

from __future__ import annotations

import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "area_downsample",
    "area_matrix",
    "bicubic_matrix",
    "check_patch_nums",
    "flatten_scales",
    "num_tokens",
    "scale_ids",
    "scale_schedule",
    "scale_starts",
    "unflatten_scales",
    "upsample",
]

Array = jax.Array

_CUBIC_A = -0.75  # PyTorch's (and OpenCV's) bicubic coefficient


def check_patch_nums(patch_nums: Sequence[int]) -> tuple[int, ...]:
    """Validates a schedule: non-empty, positive, strictly increasing ints. Returns a tuple."""
    nums = tuple(int(n) for n in patch_nums)
    if not nums or nums[0] < 1 or any(b <= a for a, b in zip(nums, nums[1:])):
        raise ValueError(
            f"patch_nums must be a non-empty strictly increasing tuple of positive ints, got {tuple(patch_nums)}"
        )
    return nums


def scale_schedule(side: int, num_scales: int | None = None) -> tuple[int, ...]:
    """Token-map sides for a latent of side ``side``, ending at ``side``.

    ``num_scales=None`` gives every side ``(1, 2, ..., side)`` (7 -> (1, 2, 3, 4, 5, 6, 7), the
    Fashion-MNIST schedule for a 4x-downsampling encoder). Otherwise ``num_scales`` sides spaced
    geometrically from 1 to ``side`` (rounded, then pushed apart to be strictly increasing).
    """
    side = int(side)
    if side < 1:
        raise ValueError(f"side must be >= 1, got {side}")
    if num_scales is None:
        return tuple(range(1, side + 1))
    count = int(num_scales)
    if not 1 <= count <= side:
        raise ValueError(f"num_scales must be in [1, side={side}], got {num_scales}")
    if count == 1:
        return (side,)
    nums = [int(round(side ** (i / (count - 1)))) for i in range(count)]
    for i in range(1, count):  # strictly increasing from the left
        nums[i] = max(nums[i], nums[i - 1] + 1)
    nums[-1] = side
    for i in range(count - 2, -1, -1):  # and room for the later scales from the right
        nums[i] = min(nums[i], nums[i + 1] - 1)
    return tuple(nums)


def num_tokens(patch_nums: Sequence[int]) -> int:
    """Length of the flattened multi-scale sequence: sum of n_k^2."""
    return sum(n * n for n in check_patch_nums(patch_nums))


def scale_starts(patch_nums: Sequence[int]) -> tuple[int, ...]:
    """Offsets of each scale in the flattened sequence, plus the total: ``len == K + 1``."""
    starts = [0]
    for n in check_patch_nums(patch_nums):
        starts.append(starts[-1] + n * n)
    return tuple(starts)


def scale_ids(patch_nums: Sequence[int]) -> np.ndarray:
    """int32 ``[L]``: the scale index of every token ((1, 2, 3) -> [0, 1,1,1,1, 2 x9]).

    These are the block ids of VAR's block-causal mask (``masks.Mask`` kind ``block_causal``).
    """
    nums = check_patch_nums(patch_nums)
    return np.repeat(np.arange(len(nums), dtype=np.int32), [n * n for n in nums])


def flatten_scales(maps: Sequence[Array]) -> Array:
    """Per-scale maps ``[B, n_k, n_k, ...]`` -> one sequence ``[B, sum n_k^2, ...]`` (raster within a scale)."""
    return jnp.concatenate([m.reshape(m.shape[0], m.shape[1] * m.shape[2], *m.shape[3:]) for m in maps], axis=1)


def unflatten_scales(seq: Array, patch_nums: Sequence[int]) -> list[Array]:
    """Inverse of :func:`flatten_scales`: ``[B, L, ...]`` -> ``[B, n_k, n_k, ...]`` per scale."""
    nums = check_patch_nums(patch_nums)
    total = num_tokens(nums)
    if seq.ndim < 2 or seq.shape[1] != total:
        raise ValueError(f"sequence must be [B, {total}, ...] for patch_nums={nums}, got shape {tuple(seq.shape)}")
    starts = scale_starts(nums)
    return [
        seq[:, starts[k] : starts[k + 1]].reshape(seq.shape[0], n, n, *seq.shape[2:]) for k, n in enumerate(nums)
    ]


def area_matrix(n_in: int, n_out: int, fractional: bool = False) -> np.ndarray:
    """float64 ``[n_out, n_in]`` averaging matrix of :func:`area_downsample` along one axis (rows sum to 1)."""
    mat = np.zeros((n_out, n_in), np.float64)
    for i in range(n_out):
        if fractional:
            lo, hi = i * n_in / n_out, (i + 1) * n_in / n_out
            for j in range(int(math.floor(lo)), min(int(math.ceil(hi)), n_in)):
                mat[i, j] = max(0.0, min(hi, j + 1) - max(lo, j))
        else:
            lo, hi = (i * n_in) // n_out, -((-(i + 1) * n_in) // n_out)  # floor, ceil in exact ints
            mat[i, lo:hi] = 1.0
        mat[i] /= mat[i].sum()
    return mat


def _cubic_weights(t: float) -> tuple[float, float, float, float]:
    """Keys' cubic kernel at distances 1+t, t, 1-t, 2-t (taps at floor-1 .. floor+2)."""
    a = _CUBIC_A

    def near(x):  # |x| <= 1
        return ((a + 2) * x - (a + 3)) * x * x + 1

    def far(x):  # 1 < |x| < 2
        return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a

    return far(1 + t), near(t), near(1 - t), far(2 - t)


def bicubic_matrix(n_in: int, n_out: int) -> np.ndarray:
    """float64 ``[n_out, n_in]`` matrix of :func:`upsample` along one axis (rows sum to 1)."""
    mat = np.zeros((n_out, n_in), np.float64)
    if n_in == n_out:
        return np.eye(n_in)
    scale = n_in / n_out
    for o in range(n_out):
        src = (o + 0.5) * scale - 0.5  # not clamped at 0 for cubic, as in PyTorch
        base = int(math.floor(src))
        for tap, w in zip(range(base - 1, base + 3), _cubic_weights(src - base)):
            mat[o, min(max(tap, 0), n_in - 1)] += w
    return mat


@jax.jit  # one program per shape when called eagerly (inlined under an outer jit)
def _apply_matrices(mat_h: Array, mat_w: Array, f: Array) -> Array:
    # [B, H, W, C] -> [B, n_h, n_w, C]
    rows = jnp.einsum("ph,bhwc->bpwc", mat_h, f, precision=jax.lax.Precision.HIGHEST)
    return jnp.einsum("qw,bpwc->bpqc", mat_w, rows, precision=jax.lax.Precision.HIGHEST)


def _resample(f: Array, mat_h: np.ndarray, mat_w: np.ndarray) -> Array:
    dtype = jnp.result_type(f.dtype, jnp.float32)
    return _apply_matrices(jnp.asarray(mat_h, dtype), jnp.asarray(mat_w, dtype), f.astype(dtype))


def _check_map(f: Array, name: str) -> None:
    if f.ndim != 4:
        raise ValueError(f"{name} expects a feature map [B, H, W, C], got shape {tuple(f.shape)}")


def area_downsample(f: Array, n: int, fractional: bool = False) -> Array:
    """``[B, H, W, C] -> [B, n, n, C]``, PyTorch's ``F.interpolate(mode="area")`` (see module doc).

    ``n`` must be in ``[1, min(H, W)]``; ``n == H == W`` returns ``f`` unchanged.
    """
    _check_map(f, "area_downsample")
    _, height, width, _ = f.shape
    if not 1 <= n <= min(height, width):
        raise ValueError(f"area_downsample: n must be in [1, {min(height, width)}] for a {height}x{width} map, got {n}")
    if n == height == width:
        return f
    return _resample(f, area_matrix(height, n, fractional), area_matrix(width, n, fractional))


def upsample(f: Array, size: int) -> Array:
    """``[B, h, w, C] -> [B, size, size, C]``, PyTorch's bicubic ``F.interpolate`` (align_corners=False).

    ``size`` must be >= ``max(h, w)``; ``size == h == w`` returns ``f`` unchanged.
    """
    _check_map(f, "upsample")
    _, height, width, _ = f.shape
    if size < max(height, width):
        raise ValueError(f"upsample: size must be >= {max(height, width)} for a {height}x{width} map, got {size}")
    if size == height == width:
        return f
    return _resample(f, bicubic_matrix(height, size), bicubic_matrix(width, size))
