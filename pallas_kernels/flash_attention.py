"""FlashAttention-2 style fused attention (forward + backward) in Pallas.

Layout: ``q [batch, seq_q, heads, head_dim]``, ``k``/``v``
``[batch, seq_k, kv_heads, head_dim]`` with ``heads % kv_heads == 0``
(grouped-query attention).

* Forward: one program per (q block, batch, head); online softmax over the key
  blocks in fp32; writes the output and the (base-2) logsumexp per row.
* Backward (``jax.custom_vjp``): ``delta = rowsum(o * do)`` in jnp, then two
  Pallas kernels that recompute ``p = exp2(s - lse)``:
  - dK/dV: one program per (k block, batch, kv head); loops over the query
    heads of its group and over the query blocks, so dK/dV of a KV head are
    reduced in registers (no per-query-head dK/dV buffer for GQA).
  - dQ: one program per (q block, batch, head); loops over the key blocks.
* Masks: top-left causal by position, packed segment ids, or order ids
  (``block_ids``: key j visible to query i iff ``ids[j] <= ids[i]``, which
  covers causal, bidirectional, block-causal and prefix-LM masks, see
  ``jaxar.models.masks``). In the order-id mode each program reads its inner
  loop's (lo, mid, hi) from a small table computed in jnp from per-block
  min / max ids (:func:`_order_bounds`): fully masked blocks are skipped and
  blocks that need no order mask skip the compare, as the causal mode does.
* Sequence lengths that are not block multiples are zero-padded in the wrapper
  and padded keys are masked. Padded query rows get a zero cotangent, so they
  contribute nothing to dK/dV.

The kernels only use operations that the Pallas Triton lowering supports
(power-of-two tiles, ``pl.ds`` loads, ``lax.fori_loop``), so the same code
runs on GPU (Triton) and on CPU with ``interpret=True``.

TPU (``backend="mosaic_tpu"``, the default on a TPU): the same kernels with
the layout Mosaic TPU needs (the last two dims of every block are full or
(8, 128)-aligned): q/k/v are transposed to ``[batch, heads, seq, head_dim]``
around the kernels, the logsumexp and delta rows are stored lane-broadcast
(``[..., seq, 128]``), segment and order ids are passed twice (a
``[batch, seq, 128]`` column copy and a ``[batch, 8, seq]`` row copy), the
order-id loop bounds live in SMEM (flat ``[batch * blocks * 4]``), and the
dK/dV kernel works on
``s = q k^T`` (contracting its first axis for the dK/dV matmuls) instead of
``s^T``, so no vector is ever transposed inside a kernel.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl

__all__ = ["flash_attention", "flash_attention_reference"]

# Finite "minus infinity": keeps fully masked rows (padding) free of NaNs.
MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)
_LOG2E = math.log2(math.e)
_LN2 = math.log(2.0)

DEFAULT_BLOCK_Q = 128
DEFAULT_BLOCK_K = 64
# Inner chunk of both backward kernels (the Triton FA-2 tutorial's choice:
# resident tile of 128, streamed chunks of 32).
DEFAULT_BLOCK_BWD = 32
# TPU: tiles are (8, 128)-aligned; row statistics are stored lane-broadcast.
TPU_BLOCK = 128
_LANES = 128
_SUBLANES = 8
BACKENDS = ("triton", "mosaic_tpu")


# ----------------------------------------------------------------------------
# Small version-robust helpers (shared with decode_attention).
# ----------------------------------------------------------------------------
def _next_pow2(x: int) -> int:
  return 1 if x <= 1 else 1 << (int(x) - 1).bit_length()


def _is_pow2(x: int) -> bool:
  return x > 0 and (x & (x - 1)) == 0


def _compiler_params(num_warps: int | None, num_stages: int | None):
  """Triton compiler params, or None where they do not apply (TPU)."""
  try:
    if jax.default_backend() == "tpu":
      return None
    from jax.experimental.pallas import triton as plgpu  # pylint: disable=g-import-not-at-top
  except Exception:  # pragma: no cover - triton extras unavailable
    return None
  cls = getattr(plgpu, "CompilerParams", None) or getattr(
      plgpu, "TritonCompilerParams", None)
  if cls is None:  # pragma: no cover
    return None
  return cls(num_warps=num_warps, num_stages=num_stages)


def _resolve_backend(backend, who: str) -> str:
  """"triton" / "mosaic_tpu"; None picks by the default JAX backend."""
  if backend is None:
    return "mosaic_tpu" if jax.default_backend() == "tpu" else "triton"
  if backend not in BACKENDS:
    raise ValueError(f"{who}: backend must be one of {BACKENDS} or None "
                     f"(pick by device), got {backend!r}")
  return backend


def _tpu_params(grid_rank: int, arbitrary: tuple = ()):
  """Mosaic TPU compiler params: every grid axis parallel except `arbitrary`."""
  from jax.experimental.pallas import tpu as pltpu  # pylint: disable=g-import-not-at-top
  cls = getattr(pltpu, "CompilerParams", None) or getattr(
      pltpu, "TPUCompilerParams")
  sem = tuple("arbitrary" if i in arbitrary else "parallel"
              for i in range(grid_rank))
  return cls(dimension_semantics=sem)


def _col(ref, rows, tpu: bool):
  """[n, 1] column from a per-row vector ref: [S] (GPU) or [S, 128] (TPU)."""
  return ref[rows, 0:1] if tpu else ref[rows][:, None]


def _row(ref, cols, tpu: bool):
  """[1, n] row from a per-key vector ref: [S] (GPU) or [8, S] (TPU)."""
  return ref[0:1, cols] if tpu else ref[cols][None, :]


def _dot(a, b, *, trans_b: bool = False):
  """2-D matmul with fp32 accumulation (a @ b or a @ b.T)."""
  dims = (((1,), (1,)), ((), ())) if trans_b else (((1,), (0,)), ((), ()))
  return lax.dot_general(a, b, dims, preferred_element_type=jnp.float32)


def _online_softmax_init(rows: int, d: int):
  """(acc [rows, D], running max [rows], running sum [rows]) before any key."""
  return (jnp.zeros((rows, d), jnp.float32),
          jnp.full((rows,), -jnp.inf, jnp.float32),
          jnp.zeros((rows,), jnp.float32))


def _online_softmax_step(carry, s, v):
  """Folds one key block (base-2 scores s [rows, bk], values v) into carry."""
  acc, m_prev, l_prev = carry
  m_new = jnp.maximum(m_prev, jnp.max(s, axis=1))
  alpha = jnp.exp2(m_prev - m_new)
  p = jnp.exp2(s - m_new[:, None])
  l_new = alpha * l_prev + jnp.sum(p, axis=1)
  acc = acc * alpha[:, None] + _dot(p.astype(v.dtype), v)
  return acc, m_new, l_new


def _dot_tn(a, b):
  """a.T @ b with fp32 accumulation."""
  return lax.dot_general(a, b, (((0,), (0,)), ((), ())),
                         preferred_element_type=jnp.float32)


# ----------------------------------------------------------------------------
# Static configuration.
# ----------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class _Config:
  causal: bool
  sm_scale: float
  block_q: int
  block_k: int
  block_bwd: int      # inner chunk of the backward loops (<= block_k)
  seq_q: int          # true (unpadded) lengths
  seq_k: int
  groups: int         # query heads per kv head
  has_segments: bool
  interpret: bool
  num_warps: int | None
  num_stages: int | None
  tpu: bool = False   # Mosaic TPU layout (see the module docstring)
  has_ids: bool = False  # order-id (block_ids) mask instead of positions

  @property
  def kv_padded(self) -> bool:
    return self.seq_k % self.block_k != 0 or self.seq_k % self.block_q != 0


def _mask_block(cfg: _Config, qk, q_pos, k_pos, q_seg, k_seg, q_ord=None,
                k_ord=None, *, causal: bool):
  """Applies causal / segment / kv-padding masks to a [rows, cols] tile.

  q_pos / k_pos are broadcastable position vectors ([rows, 1] / [1, cols]);
  q_ord / k_ord the same for order ids (block_ids), which replace the
  positions in the causal comparison when given.
  """
  mask = None

  def _and(m, x):
    return x if m is None else jnp.logical_and(m, x)

  if causal:
    mask = _and(mask, q_pos >= k_pos if q_ord is None else q_ord >= k_ord)
  if cfg.kv_padded:
    mask = _and(mask, k_pos < cfg.seq_k)
  if q_seg is not None:
    mask = _and(mask, q_seg == k_seg)
  if mask is None:
    return qk
  return jnp.where(mask, qk, MASK_VALUE)


# ----------------------------------------------------------------------------
# Forward kernel.
# ----------------------------------------------------------------------------
def _loop_bounds(ref, cfg: _Config, block, num_blocks: int):
  """(lo, mid, hi) of this program's inner loop (order-id mode, see
  :func:`_order_bounds`): a [4] block on GPU, the whole flat int32
  [batch * num_blocks * 4] array in SMEM on TPU."""
  if cfg.tpu:
    base = (pl.program_id(1) * num_blocks + block) * 4
    return ref[base], ref[base + 1], ref[base + 2]
  return ref[0], ref[1], ref[2]


def _fwd_kernel(q_ref, k_ref, v_ref, seg_q_ref, seg_k_ref, ids_q_ref,
                ids_k_ref, bounds_ref, o_ref, lse_ref, *, cfg: _Config,
                num_q_blocks: int, num_k_blocks: int):
  bq, bk = cfg.block_q, cfg.block_k
  qi = pl.program_id(0)
  if cfg.causal:  # heaviest blocks first: better tail behaviour on GPU
    qi = num_q_blocks - 1 - qi
  q_start = qi * bq
  q = q_ref[...]                                   # [bq, D]
  d = q.shape[-1]
  scale = cfg.sm_scale * _LOG2E                    # work in base 2
  q_pos = (q_start + lax.broadcasted_iota(jnp.int32, (bq, 1), 0))
  q_seg = _col(seg_q_ref, slice(None), cfg.tpu) if cfg.has_segments else None
  q_ord = _col(ids_q_ref, slice(None), cfg.tpu) if cfg.has_ids else None

  def body(kb, carry, *, causal):
    k_start = kb * bk
    k = k_ref[pl.ds(k_start, bk), :]
    v = v_ref[pl.ds(k_start, bk), :]
    s = _dot(q, k, trans_b=True) * scale           # [bq, bk] fp32
    k_pos = k_start + lax.broadcasted_iota(jnp.int32, (1, bk), 1)
    k_seg = (_row(seg_k_ref, pl.ds(k_start, bk), cfg.tpu)
             if cfg.has_segments else None)
    k_ord = (_row(ids_k_ref, pl.ds(k_start, bk), cfg.tpu)
             if cfg.has_ids else None)
    s = _mask_block(cfg, s, q_pos, k_pos, q_seg, k_seg, q_ord, k_ord,
                    causal=causal)
    return _online_softmax_step(carry, s, v)

  carry = _online_softmax_init(bq, d)
  if cfg.has_ids:
    # Key blocks [lo, mid) need no order mask, [mid, hi) do, the rest are
    # fully masked (skipped).
    lo, mid, hi = _loop_bounds(bounds_ref, cfg, qi, num_q_blocks)
    carry = lax.fori_loop(lo, mid, functools.partial(body, causal=False),
                          carry)
    carry = lax.fori_loop(mid, hi, functools.partial(body, causal=True),
                          carry)
  elif cfg.causal:
    # Key blocks entirely at or below the diagonal need no causal mask.
    upper = jnp.minimum(lax.div(q_start + bq + bk - 1, bk), num_k_blocks)
    n_full = jnp.minimum(lax.div(q_start + 1, bk), upper)
    carry = lax.fori_loop(0, n_full, functools.partial(body, causal=False),
                          carry)
    carry = lax.fori_loop(n_full, upper, functools.partial(body, causal=True),
                          carry)
  else:
    carry = lax.fori_loop(0, num_k_blocks,
                          functools.partial(body, causal=False), carry)
  acc, m, l = carry
  o_ref[...] = (acc / l[:, None]).astype(o_ref.dtype)
  lse = m + jnp.log2(l)
  if cfg.tpu:
    lse_ref[...] = jnp.broadcast_to(lse[:, None], lse_ref.shape)
  else:
    lse_ref[...] = lse


def _q_block_index(cfg: _Config, num_q_blocks: int):
  if cfg.causal:
    return lambda i: num_q_blocks - 1 - i
  return lambda i: i


class _Specs:
  """BlockSpecs of one layout for grids (block index, batch, head).

  GPU: q/k/v ``[B, S, H, D]``, row statistics ``[B, H, S]``, segment ids
  ``[B, S]``. TPU: q/k/v ``[B, H, S, D]``, row statistics ``[B, H, S, 128]``,
  segment ids as a ``[B, S, 128]`` column copy and a ``[B, 8, S]`` row copy.
  Methods take the block length and the map from grid index to block index;
  `head` maps the grid's head index to the array's (e.g. h -> h // groups).
  """

  def __init__(self, cfg: _Config, d: int):
    self.tpu, self.d = cfg.tpu, d

  def tile(self, n, blk, head=lambda h: h):
    if self.tpu:
      return pl.BlockSpec((None, None, n, self.d),
                          lambda i, b, h: (b, head(h), blk(i), 0))
    return pl.BlockSpec((None, n, None, self.d),
                        lambda i, b, h: (b, blk(i), head(h), 0))

  def group(self, g, s):
    """All g query heads of kv head h, whole sequence (the dK/dV kernel)."""
    if self.tpu:
      return pl.BlockSpec((None, g, s, self.d), lambda i, b, h: (b, h, 0, 0))
    return pl.BlockSpec((None, s, g, self.d), lambda i, b, h: (b, 0, h, 0))

  def rows(self, n, blk):
    if self.tpu:
      return pl.BlockSpec((None, None, n, _LANES),
                          lambda i, b, h: (b, h, blk(i), 0))
    return pl.BlockSpec((None, None, n), lambda i, b, h: (b, h, blk(i)))

  def group_rows(self, g, s):
    if self.tpu:
      return pl.BlockSpec((None, g, s, _LANES), lambda i, b, h: (b, h, 0, 0))
    return pl.BlockSpec((None, g, s), lambda i, b, h: (b, h, 0))

  def rows_shape(self, batch, heads, s):
    return (batch, heads, s, _LANES) if self.tpu else (batch, heads, s)

  def seg_col(self, n, blk):
    if self.tpu:
      return pl.BlockSpec((None, n, _LANES), lambda i, b, h: (b, blk(i), 0))
    return pl.BlockSpec((None, n), lambda i, b, h: (b, blk(i)))

  def seg_row(self, n, blk):
    if self.tpu:
      return pl.BlockSpec((None, _SUBLANES, n), lambda i, b, h: (b, 0, blk(i)))
    return pl.BlockSpec((None, n), lambda i, b, h: (b, blk(i)))

  def bounds(self, blk):
    """Loop bounds (order-id mode): this program's [4] on GPU; the whole flat
    array in SMEM on TPU (scalars that drive loops live there)."""
    if self.tpu:
      return pl.BlockSpec(memory_space=_smem_space())
    return pl.BlockSpec((None, None, 4), lambda i, b, h: (b, blk(i), 0))

  def params(self, num_warps, num_stages):
    return _tpu_params(3) if self.tpu else _compiler_params(num_warps,
                                                             num_stages)


def _dims(q, k, cfg: _Config):
  """(batch, seq_q, heads, head_dim, seq_k, kv_heads) of either layout."""
  if cfg.tpu:
    (batch, heads, sq, d), (kv_heads, sk) = q.shape, k.shape[1:3]
  else:
    (batch, sq, heads, d), (sk, kv_heads) = q.shape, k.shape[1:3]
  return batch, sq, heads, d, sk, kv_heads


class _Aux(NamedTuple):
  """Non-differentiable kernel inputs (padded). seg / ids: (column source,
  row source) pairs (the same array on GPU, the two copies on TPU) or None;
  bounds: (fwd, dq, dkdv) loop bounds of the order-id mode or None."""
  seg: tuple | None
  ids: tuple | None
  bounds: tuple | None

  def per_token(self):
    """(seg col, seg row, ids col, ids row), None where absent."""
    return (*(self.seg or (None, None)), *(self.ids or (None, None)))

  def bound(self, which: int):
    return None if self.bounds is None else self.bounds[which]


def _id_specs(sp: _Specs, cfg: _Config, col, row):
  """Specs of (seg col, seg row, ids col, ids row) for the given column /
  row (block length, block map) pairs."""
  pair = [sp.seg_col(*col), sp.seg_row(*row)]
  return ((pair if cfg.has_segments else [None, None])
          + (pair if cfg.has_ids else [None, None]))


def _smem_space():
  from jax.experimental.pallas import tpu as pltpu  # pylint: disable=g-import-not-at-top
  return getattr(pltpu, "SMEM", None) or pltpu.MemorySpace.SMEM


def _fwd_call(q, k, v, aux: _Aux, cfg: _Config):
  batch, sq, heads, d, sk, _ = _dims(q, k, cfg)
  bq, bk, g = cfg.block_q, cfg.block_k, cfg.groups
  nq, nk = sq // bq, sk // bk
  qidx = _q_block_index(cfg, nq)
  sp = _Specs(cfg, d)
  whole = lambda i: 0
  out, lse = pl.pallas_call(
      functools.partial(_fwd_kernel, cfg=cfg, num_q_blocks=nq,
                        num_k_blocks=nk),
      grid=(nq, batch, heads),
      in_specs=[sp.tile(bq, qidx),
                sp.tile(sk, whole, head=lambda h: lax.div(h, g)),
                sp.tile(sk, whole, head=lambda h: lax.div(h, g)),
                *_id_specs(sp, cfg, (bq, qidx), (sk, whole)),
                sp.bounds(qidx) if cfg.has_ids else None],
      out_specs=[sp.tile(bq, qidx), sp.rows(bq, qidx)],
      out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype),
                 jax.ShapeDtypeStruct(sp.rows_shape(batch, heads, sq),
                                      jnp.float32)],
      compiler_params=sp.params(cfg.num_warps or (4 if d <= 64 else 8),
                                cfg.num_stages or 3),
      interpret=cfg.interpret,
      name="flash_attention_fwd",
  )(q, k, v, *aux.per_token(), aux.bound(0))
  return out, lse


# ----------------------------------------------------------------------------
# Backward kernels.
# ----------------------------------------------------------------------------
def _dkdv_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, seg_q_ref,
                 seg_k_ref, ids_q_ref, ids_k_ref, bounds_ref, dk_ref, dv_ref, *,
                 cfg: _Config, num_q_blocks: int, num_k_blocks: int):
  # Key tile of size block_q (the bigger tile stays resident), query chunks of
  # size block_bwd. GPU: q/do blocks [S, G, D], lse/delta [G, S], and the
  # tile is worked on as s^T = k q^T. TPU: q/do [G, S, D], lse/delta
  # [G, S, 128], s = q k^T with the dK/dV matmuls contracting its first axis
  # (row statistics stay columns: nothing is transposed in the kernel).
  bkv, bqc = cfg.block_q, cfg.block_bwd
  tpu = cfg.tpu
  kb = pl.program_id(0)
  k_start = kb * bkv
  k = k_ref[...]                                   # [bkv, D]
  v = v_ref[...]
  d = k.shape[-1]
  scale = cfg.sm_scale * _LOG2E
  if tpu:
    k_pos = k_start + lax.broadcasted_iota(jnp.int32, (1, bkv), 1)
    k_seg = _row(seg_k_ref, slice(None), True) if cfg.has_segments else None
    k_ord = _row(ids_k_ref, slice(None), True) if cfg.has_ids else None
  else:
    k_pos = k_start + lax.broadcasted_iota(jnp.int32, (bkv, 1), 0)
    k_seg = seg_k_ref[...][:, None] if cfg.has_segments else None
    k_ord = ids_k_ref[...][:, None] if cfg.has_ids else None

  def q_body(qb, carry, *, j, causal):
    dk, dv = carry
    q_start = qb * bqc
    rows = pl.ds(q_start, bqc)
    if tpu:
      q, do = q_ref[j, rows, :], do_ref[j, rows, :]  # [bqc, D]
      lse, delta = lse_ref[j, rows, 0:1], delta_ref[j, rows, 0:1]  # [bqc, 1]
      s = _dot(q, k, trans_b=True) * scale         # [bqc, bkv]
      q_pos = q_start + lax.broadcasted_iota(jnp.int32, (bqc, 1), 0)
      q_seg = _col(seg_q_ref, rows, True) if cfg.has_segments else None
      q_ord = _col(ids_q_ref, rows, True) if cfg.has_ids else None
    else:
      q, do = q_ref[rows, j, :], do_ref[rows, j, :]
      lse, delta = lse_ref[j, rows][None, :], delta_ref[j, rows][None, :]
      s = _dot(k, q, trans_b=True) * scale         # s^T: [bkv, bqc]
      q_pos = q_start + lax.broadcasted_iota(jnp.int32, (1, bqc), 1)
      q_seg = seg_q_ref[rows][None, :] if cfg.has_segments else None
      q_ord = ids_q_ref[rows][None, :] if cfg.has_ids else None
    # Broadcasting makes _mask_block orientation-agnostic.
    s = _mask_block(cfg, s, q_pos, k_pos, q_seg, k_seg, q_ord, k_ord,
                    causal=causal)
    p = jnp.exp2(s - lse)
    dot = _dot_tn if tpu else _dot                 # p^T @ do either way
    dv = dv + dot(p.astype(do.dtype), do)
    dp = _dot(do, v, trans_b=True) if tpu else _dot(v, do, trans_b=True)
    ds = p * (dp - delta)
    dk = dk + dot(ds.astype(q.dtype), q)
    return dk, dv

  if cfg.has_ids:
    # Query chunks [lo, mid) need the order mask, [mid, hi) see the whole key
    # tile, the rest see none of it (skipped).
    q_lo, q_mid, q_hi = _loop_bounds(bounds_ref, cfg, kb, num_k_blocks)

  def head_body(j, carry):
    if cfg.has_ids:
      carry = lax.fori_loop(
          q_lo, q_mid, functools.partial(q_body, j=j, causal=True), carry)
      carry = lax.fori_loop(
          q_mid, q_hi, functools.partial(q_body, j=j, causal=False), carry)
    elif cfg.causal:
      lo = lax.div(k_start, bqc)
      # Query chunks starting at/after the last key of the tile see it all.
      full = jnp.minimum(lax.div(k_start + bkv - 1 + bqc - 1, bqc),
                         num_q_blocks)
      carry = lax.fori_loop(
          lo, full, functools.partial(q_body, j=j, causal=True), carry)
      carry = lax.fori_loop(
          full, num_q_blocks, functools.partial(q_body, j=j, causal=False),
          carry)
    else:
      carry = lax.fori_loop(
          0, num_q_blocks, functools.partial(q_body, j=j, causal=False), carry)
    return carry

  carry = (jnp.zeros((bkv, d), jnp.float32), jnp.zeros((bkv, d), jnp.float32))
  dk, dv = lax.fori_loop(0, cfg.groups, head_body, carry)
  dk_ref[...] = (dk * cfg.sm_scale).astype(dk_ref.dtype)
  dv_ref[...] = dv.astype(dv_ref.dtype)


def _dq_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, seg_q_ref,
               seg_k_ref, ids_q_ref, ids_k_ref, bounds_ref, dq_ref, *,
               cfg: _Config, num_q_blocks: int, num_k_blocks: int):
  bq, bk = cfg.block_q, cfg.block_bwd
  qi = pl.program_id(0)
  if cfg.causal:
    qi = num_q_blocks - 1 - qi
  q_start = qi * bq
  q = q_ref[...]
  do = do_ref[...]
  lse = _col(lse_ref, slice(None), cfg.tpu)         # [bq, 1]
  delta = _col(delta_ref, slice(None), cfg.tpu)
  d = q.shape[-1]
  scale = cfg.sm_scale * _LOG2E
  q_pos = q_start + lax.broadcasted_iota(jnp.int32, (bq, 1), 0)
  q_seg = _col(seg_q_ref, slice(None), cfg.tpu) if cfg.has_segments else None
  q_ord = _col(ids_q_ref, slice(None), cfg.tpu) if cfg.has_ids else None

  def body(kb, dq, *, causal):
    k_start = kb * bk
    k = k_ref[pl.ds(k_start, bk), :]
    v = v_ref[pl.ds(k_start, bk), :]
    s = _dot(q, k, trans_b=True) * scale
    k_pos = k_start + lax.broadcasted_iota(jnp.int32, (1, bk), 1)
    k_seg = (_row(seg_k_ref, pl.ds(k_start, bk), cfg.tpu)
             if cfg.has_segments else None)
    k_ord = (_row(ids_k_ref, pl.ds(k_start, bk), cfg.tpu)
             if cfg.has_ids else None)
    s = _mask_block(cfg, s, q_pos, k_pos, q_seg, k_seg, q_ord, k_ord,
                    causal=causal)
    p = jnp.exp2(s - lse)
    dp = _dot(do, v, trans_b=True)
    ds = p * (dp - delta)
    return dq + _dot(ds.astype(k.dtype), k)

  dq = jnp.zeros((bq, d), jnp.float32)
  if cfg.has_ids:  # as in the forward kernel, over key chunks of block_bwd
    lo, mid, hi = _loop_bounds(bounds_ref, cfg, qi, num_q_blocks)
    dq = lax.fori_loop(lo, mid, functools.partial(body, causal=False), dq)
    dq = lax.fori_loop(mid, hi, functools.partial(body, causal=True), dq)
  elif cfg.causal:
    upper = jnp.minimum(lax.div(q_start + bq + bk - 1, bk), num_k_blocks)
    n_full = jnp.minimum(lax.div(q_start + 1, bk), upper)
    dq = lax.fori_loop(0, n_full, functools.partial(body, causal=False), dq)
    dq = lax.fori_loop(n_full, upper, functools.partial(body, causal=True), dq)
  else:
    dq = lax.fori_loop(0, num_k_blocks, functools.partial(body, causal=False),
                       dq)
  dq_ref[...] = (dq * cfg.sm_scale).astype(dq_ref.dtype)


def _bwd_call(q, k, v, aux: _Aux, out, lse, do, cfg: _Config):
  batch, sq, heads, d, sk, kv_heads = _dims(q, k, cfg)
  bq, bk, g = cfg.block_q, cfg.block_bwd, cfg.groups
  # delta_i = sum_d o_id * do_id  (FA-2 preprocessing; XLA fuses this).
  delta = jnp.einsum("bhsd,bhsd->bhs" if cfg.tpu else "bshd,bshd->bhs",
                     out.astype(jnp.float32), do.astype(jnp.float32))
  if cfg.tpu:
    delta = jnp.broadcast_to(delta[..., None], delta.shape + (_LANES,))
  sp = _Specs(cfg, d)
  params = sp.params(cfg.num_warps or (4 if d <= 64 else 8),
                     cfg.num_stages or 2)
  whole, ident = (lambda i: 0), (lambda i: i)

  # dK / dV: grid over key tiles of size block_q, query chunks of block_bwd.
  nkv, nqc = sk // bq, sq // bk
  dk, dv = pl.pallas_call(
      functools.partial(_dkdv_kernel, cfg=cfg, num_q_blocks=nqc,
                        num_k_blocks=nkv),
      grid=(nkv, batch, kv_heads),
      in_specs=[sp.group(g, sq), sp.tile(bq, ident), sp.tile(bq, ident),
                sp.group(g, sq), sp.group_rows(g, sq), sp.group_rows(g, sq),
                *_id_specs(sp, cfg, (sq, whole), (bq, ident)),
                sp.bounds(ident) if cfg.has_ids else None],
      out_specs=[sp.tile(bq, ident), sp.tile(bq, ident)],
      out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype),
                 jax.ShapeDtypeStruct(v.shape, v.dtype)],
      compiler_params=params,
      interpret=cfg.interpret,
      name="flash_attention_bwd_dkdv",
  )(q, k, v, do, lse, delta, *aux.per_token(), aux.bound(2))

  # dQ: grid over query tiles of size block_q, key chunks of block_bwd.
  nq, nk = sq // bq, sk // bk
  qidx = _q_block_index(cfg, nq)
  kv_spec = sp.tile(sk, whole, head=lambda h: lax.div(h, g))
  dq = pl.pallas_call(
      functools.partial(_dq_kernel, cfg=cfg, num_q_blocks=nq, num_k_blocks=nk),
      grid=(nq, batch, heads),
      in_specs=[sp.tile(bq, qidx), kv_spec, kv_spec, sp.tile(bq, qidx),
                sp.rows(bq, qidx), sp.rows(bq, qidx),
                *_id_specs(sp, cfg, (bq, qidx), (sk, whole)),
                sp.bounds(qidx) if cfg.has_ids else None],
      out_specs=sp.tile(bq, qidx),
      out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
      compiler_params=params,
      interpret=cfg.interpret,
      name="flash_attention_bwd_dq",
  )(q, k, v, do, lse, delta, *aux.per_token(), aux.bound(1))
  return dq, dk, dv


# ----------------------------------------------------------------------------
# custom_vjp plumbing (operates on padded arrays).
# ----------------------------------------------------------------------------
@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _flash(q, k, v, aux: _Aux, cfg: _Config):
  return _fwd_call(q, k, v, aux, cfg)[0]


def _flash_fwd(q, k, v, aux: _Aux, cfg: _Config):
  out, lse = _fwd_call(q, k, v, aux, cfg)
  return out, (q, k, v, aux, out, lse)


def _flash_bwd(cfg: _Config, res, do):
  q, k, v, aux, out, lse = res
  dq, dk, dv = _bwd_call(q, k, v, aux, out, lse, do, cfg)
  return dq, dk, dv, jax.tree.map(lambda _: None, aux)


_flash.defvjp(_flash_fwd, _flash_bwd)


def _block_min_max(x, blk: int):
  """Per-block (min, max) of x [batch, S] over blocks of blk: [batch, S/blk]."""
  x = x.reshape(x.shape[0], -1, blk)
  return jnp.min(x, axis=2), jnp.max(x, axis=2)


def _order_bounds(ids, seg, row_blk: int, col_blk: int, *,
                  rows_are_queries: bool):
  """Inner-loop bounds of the order-id mode: int32 [batch, n_rows, 4].

  A kernel program owns one block of rows (queries for fwd / dQ, keys for
  dK/dV) and loops over column blocks. From per-block min / max of the order
  ids (and segment ids), entry (lo, mid, hi, 0) of a row block says: column
  blocks outside [lo, hi) are fully masked (no visible pair: skipped); in
  fwd / dQ, blocks [lo, mid) need no order mask and [mid, hi) do; in dK/dV
  (columns are queries, walked upwards) [lo, mid) need it and [mid, hi) not.

  Exact for any ids; it skips the most when the ids are non-decreasing along
  T (every `jaxar.models.masks` kind), where it equals the causal schedule
  for ids = arange(T) and costs about as much for block-causal ids.
  ids, seg: int32 [batch, S] (seg may be None), padded like the kernels see
  them.
  """
  r_min, r_max = _block_min_max(ids, row_blk)          # [B, R]
  c_min, c_max = _block_min_max(ids, col_blk)          # [B, C]
  r_min, r_max = r_min[:, :, None], r_max[:, :, None]  # [B, R, 1]
  c_min, c_max = c_min[:, None, :], c_max[:, None, :]  # [B, 1, C]
  if rows_are_queries:
    (q_min, q_max), (k_min, k_max) = (r_min, r_max), (c_min, c_max)
  else:
    (q_min, q_max), (k_min, k_max) = (c_min, c_max), (r_min, r_max)
  order_dead = k_min > q_max              # no key of the block visible
  needs_mask = k_max > q_min              # some key hidden from some query
  if seg is not None:
    rs_min, rs_max = _block_min_max(seg, row_blk)
    cs_min, cs_max = _block_min_max(seg, col_blk)
    seg_dead = ((cs_max[:, None, :] < rs_min[:, :, None])
                | (cs_min[:, None, :] > rs_max[:, :, None]))
  else:
    seg_dead = jnp.zeros_like(order_dead)
  live = ~(order_dead | seg_dead)                       # [B, R, C]
  # Blocks whose order mask matters (seg-dead ones are zeroed by the segment
  # mask, which every block applies).
  masked = needs_mask & ~seg_dead
  n = live.shape[2]
  col = jnp.arange(n, dtype=jnp.int32)
  lo = jnp.min(jnp.where(live, col, n), axis=2)
  hi = jnp.maximum(jnp.max(jnp.where(live, col + 1, 0), axis=2), lo)
  if rows_are_queries:  # first masked block at or after lo
    mid = jnp.min(jnp.where(masked & (col >= lo[..., None]), col,
                            hi[..., None]), axis=2)
  else:                 # one past the last masked block before hi
    mid = jnp.max(jnp.where(masked & (col < hi[..., None]), col + 1,
                            lo[..., None]), axis=2)
  mid = jnp.clip(mid, lo, hi)
  return jnp.stack([lo, mid, hi, jnp.zeros_like(lo)], axis=-1).astype(
      jnp.int32)


def _pad_axis(x, axis: int, size: int, value=0):
  if x.shape[axis] == size:
    return x
  pad = [(0, 0)] * x.ndim
  pad[axis] = (0, size - x.shape[axis])
  return jnp.pad(x, pad, constant_values=value)


def _round_up(x: int, m: int) -> int:
  return -(-x // m) * m


def _check_token_ids(name, ids, q, k):
  """Per-token int ids ([batch, seq], self-attention only): one-line errors."""
  if q.shape[1] != k.shape[1]:
    raise ValueError(f"flash_attention: {name} require seq_q == seq_k, "
                     f"got {q.shape[1]} and {k.shape[1]}")
  if getattr(ids, "shape", None) != q.shape[:2]:
    raise ValueError(
        f"flash_attention: {name} must have shape [batch, seq] = "
        f"{q.shape[:2]}, got {getattr(ids, 'shape', None)}")
  if not jnp.issubdtype(ids.dtype, jnp.integer):
    raise ValueError(f"flash_attention: {name} must be integers, got "
                     f"{ids.dtype}")


def _check_inputs(q, k, v, segment_ids, block_ids=None, causal=True):
  for name, x in (("q", q), ("k", k), ("v", v)):
    if getattr(x, "ndim", None) != 4:
      raise ValueError(
          f"flash_attention: {name} must be 4-D [batch, seq, heads, head_dim],"
          f" got shape {getattr(x, 'shape', None)}")
  if k.shape != v.shape:
    raise ValueError(f"flash_attention: k and v shapes differ: {k.shape} vs "
                     f"{v.shape}")
  if q.shape[0] != k.shape[0]:
    raise ValueError(f"flash_attention: batch mismatch: q {q.shape[0]} vs k "
                     f"{k.shape[0]}")
  if q.shape[3] != k.shape[3]:
    raise ValueError(f"flash_attention: head_dim mismatch: q {q.shape[3]} vs "
                     f"k/v {k.shape[3]}")
  if k.shape[2] == 0 or q.shape[2] % k.shape[2] != 0:
    raise ValueError(
        f"flash_attention: heads ({q.shape[2]}) must be a multiple of kv_heads"
        f" ({k.shape[2]})")
  if q.shape[1] == 0 or k.shape[1] == 0:
    raise ValueError("flash_attention: empty sequence")
  if not (q.dtype == k.dtype == v.dtype):
    raise ValueError(f"flash_attention: q, k, v dtypes must match, got "
                     f"{q.dtype}, {k.dtype}, {v.dtype}")
  if not jnp.issubdtype(q.dtype, jnp.floating):
    raise ValueError(f"flash_attention: floating inputs required, got "
                     f"{q.dtype}")
  if segment_ids is not None:
    _check_token_ids("segment_ids", segment_ids, q, k)
  if block_ids is not None:
    if not causal:
      raise ValueError("flash_attention: block_ids define the mask; pass "
                       "causal=True with them (all-equal ids: bidirectional)")
    _check_token_ids("block_ids", block_ids, q, k)


def _check_block(name: str, b: int):
  if not isinstance(b, (int, np.integer)) or not _is_pow2(int(b)):
    raise ValueError(f"flash_attention: {name} must be a power of two, got {b}")


def flash_attention(q, k, v, *, causal: bool = True, segment_ids=None,
                    block_ids=None, sm_scale: float | None = None,
                    block_q: int | None = None,
                    block_k: int | None = None, interpret: bool = False,
                    num_warps: int | None = None,
                    num_stages: int | None = None, backend: str | None = None):
  """Fused multi-head / grouped-query attention with a FlashAttention-2 VJP.

  Args:
    q: ``[batch, seq_q, heads, head_dim]``.
    k, v: ``[batch, seq_k, kv_heads, head_dim]``; ``heads % kv_heads == 0``.
    causal: top-left aligned causal mask (query i sees keys j <= i).
    segment_ids: optional int ``[batch, seq]`` (requires seq_q == seq_k);
      tokens only attend to tokens with the same id.
    block_ids: optional int ``[batch, seq]`` order ids (requires seq_q ==
      seq_k and causal=True): key j is visible to query i iff
      ``block_ids[j] <= block_ids[i]`` (and same segment), replacing the
      position-causal mask: arange(T) is causal, all-equal ids bidirectional,
      block ids block-causal, 0 on a prefix then t prefix-LM (see
      ``jaxar.models.masks``). Fully masked key blocks are skipped exactly for
      any ids, which saves the most where the ids are non-decreasing along T
      (then block-causal costs about what causal does); other ids stay
      correct, with less skipping.
    sm_scale: softmax scale, default ``1/sqrt(head_dim)``.
    block_q, block_k: tile sizes (powers of two). Defaults 128/64 (H100),
      128/128 on TPU, clamped to the padded sequence length for short inputs.
    interpret: run the Pallas kernels in interpret mode (CPU testing).
    num_warps, num_stages: Triton compiler parameters (GPU only).
    backend: "triton" (GPU), "mosaic_tpu" (TPU layout, see the module
      docstring) or None: "mosaic_tpu" when the default device is a TPU.

  Returns:
    ``[batch, seq_q, heads, head_dim]`` in ``q.dtype``.
  """
  _check_inputs(q, k, v, segment_ids, block_ids, causal)
  backend = _resolve_backend(backend, "flash_attention")
  tpu = backend == "mosaic_tpu"
  batch, seq_q, heads, head_dim = q.shape
  seq_k, kv_heads = k.shape[1], k.shape[2]
  if sm_scale is None:
    sm_scale = 1.0 / math.sqrt(head_dim)
  min_block = 16  # Triton dot tiles need >= 16 rows/cols.
  default_q, default_k = ((TPU_BLOCK, TPU_BLOCK) if tpu
                          else (DEFAULT_BLOCK_Q, DEFAULT_BLOCK_K))
  if block_q is None:
    block_q = min(default_q, max(min_block, _next_pow2(seq_q)))
  if block_k is None:
    block_k = min(default_k, max(min_block, _next_pow2(seq_k)))
  _check_block("block_q", block_q)
  _check_block("block_k", block_k)
  block_q, block_k = int(block_q), int(block_k)

  # Both sequence axes are tiled by both block sizes (fwd/dq use block_q rows
  # and block_k keys, dkdv the reverse), so pad to the larger (pow2) block.
  tile = max(block_q, block_k)
  sq_pad, sk_pad = _round_up(seq_q, tile), _round_up(seq_k, tile)
  d_pad = max(_next_pow2(head_dim), min_block)
  if (tpu and (segment_ids is not None or block_ids is not None)
      and block_q % TPU_BLOCK and sk_pad > block_q):
    # The dK/dV kernel's segment-id row block is lane-dim: 128-aligned or whole.
    raise ValueError(
        f"flash_attention: on TPU with segment_ids / block_ids, block_q must "
        f"be a multiple of {TPU_BLOCK} when the sequence ({seq_k}) is longer "
        f"than it (got block_q={block_q}); leave block_q=None for the default")

  cfg = _Config(causal=bool(causal), sm_scale=float(sm_scale),
                block_q=block_q, block_k=block_k,
                block_bwd=block_k if tpu else min(block_k, DEFAULT_BLOCK_BWD),
                seq_q=seq_q, seq_k=seq_k,
                groups=heads // kv_heads, has_segments=segment_ids is not None,
                interpret=bool(interpret), num_warps=num_warps,
                num_stages=num_stages, tpu=tpu,
                has_ids=block_ids is not None)
  return _flash_padded(q, k, v, segment_ids, block_ids, cfg, sq_pad, sk_pad,
                       d_pad)


@functools.partial(jax.jit, static_argnums=(5, 6, 7, 8))
def _flash_padded(q, k, v, segment_ids, block_ids, cfg, sq_pad, sk_pad, d_pad):
  seq_q, head_dim = q.shape[1], q.shape[3]
  qp = _pad_axis(_pad_axis(q, 1, sq_pad), 3, d_pad)
  kp = _pad_axis(_pad_axis(k, 1, sk_pad), 3, d_pad)
  vp = _pad_axis(_pad_axis(v, 1, sk_pad), 3, d_pad)
  seg = ids = bounds = None
  if segment_ids is not None:
    seg = _pad_axis(segment_ids.astype(jnp.int32), 1, sq_pad, value=-1)
  if block_ids is not None:
    # Padding repeats the last id: keeps non-decreasing ids non-decreasing
    # (padded keys are masked anyway, padded queries are dropped).
    ids = block_ids.astype(jnp.int32)
    ids = jnp.pad(ids, ((0, 0), (0, sq_pad - seq_q)), mode="edge")
    bq, bk, bb = cfg.block_q, cfg.block_k, cfg.block_bwd
    bounds = (_order_bounds(ids, seg, bq, bk, rows_are_queries=True),
              _order_bounds(ids, seg, bq, bb, rows_are_queries=True),
              _order_bounds(ids, seg, bq, bb, rows_are_queries=False))
    if cfg.tpu:  # flat, for SMEM
      bounds = tuple(b.reshape(-1) for b in bounds)

  def copies(x):
    """(column source, row source): a lane-broadcast column copy and a
    sublane-broadcast row copy on TPU, the array itself twice on GPU."""
    if x is None or not cfg.tpu:
      return None if x is None else (x, x)
    return (jnp.broadcast_to(x[:, :, None], x.shape + (_LANES,)),
            jnp.broadcast_to(x[:, None, :], (x.shape[0], _SUBLANES,
                                             x.shape[1])))

  aux = _Aux(copies(seg), copies(ids), bounds)
  if cfg.tpu:
    to_bhsd = lambda x: jnp.swapaxes(x, 1, 2)
    out = to_bhsd(_flash(to_bhsd(qp), to_bhsd(kp), to_bhsd(vp), aux, cfg))
  else:
    out = _flash(qp, kp, vp, aux, cfg)
  return out[:, :seq_q, :, :head_dim]


# ----------------------------------------------------------------------------
# Reference.
# ----------------------------------------------------------------------------
def masked_attention_reference(q, k, v, mask, *, sm_scale=None):
  """Grouped-query softmax attention with an explicit boolean mask
  ``[batch, seq_q, seq_k]`` (True: may attend), in
  ``promote_types(q.dtype, float32)``; the core of both kernels' references."""
  batch, seq_q, heads, head_dim = q.shape
  kv_heads = k.shape[2]
  g = heads // kv_heads
  dtype = jnp.promote_types(q.dtype, jnp.float32)
  if sm_scale is None:
    sm_scale = 1.0 / math.sqrt(head_dim)
  qg = q.astype(dtype).reshape(batch, seq_q, kv_heads, g, head_dim)
  s = jnp.einsum("bqhgd,bkhd->bhgqk", qg, k.astype(dtype)) * sm_scale
  s = jnp.where(mask[:, None, None], s, -jnp.inf)
  p = jax.nn.softmax(s, axis=-1)
  out = jnp.einsum("bhgqk,bkhd->bqhgd", p, v.astype(dtype))
  return out.reshape(batch, seq_q, heads, head_dim)


def flash_attention_reference(q, k, v, *, causal: bool = True, segment_ids=None,
                              block_ids=None, sm_scale: float | None = None):
  """Plain jnp attention, same semantics as :func:`flash_attention`.

  Computes in ``promote_types(q.dtype, float32)`` (float64 under x64 when the
  inputs are float64) and returns that dtype.
  """
  batch, seq_q = q.shape[:2]
  seq_k = k.shape[1]
  mask = jnp.ones((batch, seq_q, seq_k), bool)
  if block_ids is not None:
    mask &= block_ids[:, None, :] <= block_ids[:, :, None]
  elif causal:
    mask &= (jnp.arange(seq_q)[:, None] >= jnp.arange(seq_k)[None, :])
  if segment_ids is not None:
    mask &= segment_ids[:, :, None] == segment_ids[:, None, :]
  return masked_attention_reference(q, k, v, mask, sm_scale=sm_scale)
