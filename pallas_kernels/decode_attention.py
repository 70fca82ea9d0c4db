"""Split-K (flash-decoding) attention over a static KV cache, in Pallas.

``q [batch, T, heads, head_dim]`` holds T >= 1 new query positions per row;
``k``/``v`` are one layer's cache ``[batch, max_len, kv_heads, head_dim]`` and
``lengths [batch]`` counts the valid entries per row *including* the T new
ones (already written). Query t of row b sits at position
``lengths[b] - T + t`` and sees cache positions ``<=`` its own
(bottom-right-aligned causal); with ``new="bidirectional"`` every one of the T
new positions (a VAR scale, a diffusion block; the same as an all-ones tree);
with ``new_extent [batch, T]`` every earlier position plus the new positions
``j < new_extent[b, t]`` (one int per query: block-causal new blocks, e.g.
several VAR scales at once, or order ids that may differ per row); with
``tree_mask [batch, T, T]`` every earlier position plus the new positions j
with ``tree_mask[b, t, j]`` (ceil(T/32) bit words per query).

Kernel layout: grid ``(batch, kv_heads, num_splits)``. The T new positions
and the G query heads sharing a KV head are folded into the rows of one
``[T*G, head_dim]`` query tile, so each K/V block is read once per KV head.
Each split walks its contiguous range of key blocks (stopping at the row's
length; splits entirely past it do no work) with an online softmax and writes
an unnormalised partial (o, m, l); the partials are merged in jnp.

The cache is never padded or copied along ``max_len``: the last block is
loaded from ``max_len - block_k`` (clamped start) and the keys it shares with
the previous block are masked out. Slots at or past ``lengths[b]`` may hold
arbitrary values (including NaN); they never reach the output.
"""
from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels.flash_attention import (_LANES, _LOG2E, MASK_VALUE,
                                            _compiler_params, _dot, _is_pow2,
                                            _next_pow2, _online_softmax_init,
                                            _online_softmax_step,
                                            _resolve_backend, _tpu_params,
                                            masked_attention_reference)

__all__ = ["decode_attention", "decode_attention_reference"]

DEFAULT_BLOCK_K = 128
_MIN_TILE = 16          # Triton dot tiles need >= 16 rows / cols.
_TARGET_PROGRAMS = 528  # ~4 programs per SM on an H100 (132 SMs).
_MAX_SPLITS = 64
NEW_PATTERNS = ("causal", "bidirectional")


@dataclasses.dataclass(frozen=True)
class _Config:
  sm_scale: float
  t: int               # new positions per row
  groups: int          # query heads per kv head
  rows: int            # padded T * groups (power of two)
  block_k: int
  blocks_per_split: int
  num_splits: int
  max_len: int
  tree_words: int      # 0: causal among new positions, else 32-bit words
  bidirectional: bool  # (no tree) the new positions see each other fully
  extent: bool         # (no tree) query row r sees new j < aux word 0
  interpret: bool
  num_warps: int | None
  num_stages: int | None
  tpu: bool = False    # Mosaic TPU layout (see _decode_kernel_tpu)


def _attend_split(cfg: _Config, q, load_k, load_v, tree_word, length, lo, hi):
  """Online softmax of the query tile q [rows, D] over key blocks [lo, hi) of
  one row's cache: unnormalised (acc [rows, D], m [rows], l [rows]), base 2.
  load_k / load_v(start) -> [block_k, D]; tree_word(w) -> [rows, 1] int32
  (the tree's bit word w, or with cfg.extent the query's new-block extent)."""
  bk, rows = cfg.block_k, cfg.rows
  base = length - cfg.t                      # position of the first new token
  # Blocks that lie entirely before the new tokens are visible to every row.
  n_full = jnp.minimum(lax.div(base, bk), hi)
  d = q.shape[-1]
  scale = cfg.sm_scale * _LOG2E
  t_of_row = lax.div(lax.broadcasted_iota(jnp.int32, (rows, 1), 0),
                     jnp.int32(cfg.groups))
  q_pos = base + t_of_row                                    # [rows, 1]

  def body(kb, carry, *, masked):
    nominal = kb * bk
    start = jnp.minimum(nominal, cfg.max_len - bk) if masked else nominal
    k = load_k(start)
    v = load_v(start)
    s = _dot(q, k, trans_b=True) * scale                     # [rows, bk]
    if masked:
      k_pos = start + lax.broadcasted_iota(jnp.int32, (1, bk), 1)
      valid = (k_pos >= nominal) & (k_pos < length)
      if cfg.tree_words:
        j = k_pos - base
        vis = k_pos < base
        for w in range(cfg.tree_words):
          word = tree_word(w)                                # [rows, 1]
          jw = j - 32 * w
          in_word = (jw >= 0) & (jw < 32)
          bit = lax.shift_right_logical(
              jnp.broadcast_to(word, (rows, bk)),
              jnp.broadcast_to(jnp.clip(jw, 0, 31), (rows, bk))) & 1
          vis = vis | (in_word & (bit == 1))
      elif cfg.extent:
        vis = k_pos < base + tree_word(0)                    # [rows, bk]
      elif cfg.bidirectional:
        vis = None                                           # valid suffices
      else:
        vis = k_pos <= q_pos
      s = jnp.where(valid if vis is None else valid & vis, s, MASK_VALUE)
      # Slots past the length may hold anything (even NaN/inf): p == 0
      # there, but 0 * NaN is NaN, so zero those V rows too.
      row_pos = start + lax.broadcasted_iota(jnp.int32, (bk, 1), 0)
      v = jnp.where((row_pos >= nominal) & (row_pos < length), v,
                    jnp.zeros_like(v))
    return _online_softmax_step(carry, s, v)

  carry = _online_softmax_init(rows, d)
  mid = jnp.maximum(lo, n_full)
  carry = lax.fori_loop(lo, mid, functools.partial(body, masked=False), carry)
  return lax.fori_loop(mid, hi, functools.partial(body, masked=True), carry)


def _split_range(cfg: _Config, split, length):
  lo = split * cfg.blocks_per_split
  hi = jnp.minimum(lo + cfg.blocks_per_split,
                   lax.div(length + cfg.block_k - 1, cfg.block_k))
  return lo, hi


def _decode_kernel(len_ref, q_ref, k_ref, v_ref, bits_ref, o_ref, m_ref, l_ref,
                   *, cfg: _Config):
  """GPU layout: one program per (row, kv head, split)."""
  length = len_ref[()]
  lo, hi = _split_range(cfg, pl.program_id(2), length)

  @pl.when(lo < hi)
  def _compute():
    acc, m, l = _attend_split(
        cfg, q_ref[...], lambda st: k_ref[pl.ds(st, cfg.block_k), :],
        lambda st: v_ref[pl.ds(st, cfg.block_k), :],
        lambda w: bits_ref[w, :][:, None], length, lo, hi)
    o_ref[...] = acc
    m_ref[...] = m
    l_ref[...] = l

  @pl.when(lo >= hi)
  def _skip():
    o_ref[...] = jnp.zeros(o_ref.shape, o_ref.dtype)
    m_ref[...] = jnp.full(m_ref.shape, MASK_VALUE, m_ref.dtype)
    l_ref[...] = jnp.zeros(l_ref.shape, l_ref.dtype)


def _decode_kernel_tpu(len_ref, q_ref, k_ref, v_ref, bits_ref, o_ref, m_ref,
                       l_ref, *, cfg: _Config, kv_heads: int):
  """TPU layout: one program per (row, split), looping over the kv heads.
  The cache block is [max_len, kv_heads, D] as stored (last two dims whole),
  lengths live in SMEM, m / l are stored lane-broadcast [.., rows, 128]."""
  length = len_ref[pl.program_id(0)]
  lo, hi = _split_range(cfg, pl.program_id(1), length)

  @pl.when(lo < hi)
  def _compute():
    for h in range(kv_heads):
      acc, m, l = _attend_split(
          cfg, q_ref[h], lambda st: k_ref[pl.ds(st, cfg.block_k), h, :],
          lambda st: v_ref[pl.ds(st, cfg.block_k), h, :],
          lambda w: bits_ref[:, w:w + 1], length, lo, hi)
      o_ref[h] = acc
      m_ref[h] = jnp.broadcast_to(m[:, None], m_ref.shape[1:])
      l_ref[h] = jnp.broadcast_to(l[:, None], l_ref.shape[1:])

  @pl.when(lo >= hi)
  def _skip():
    o_ref[...] = jnp.zeros(o_ref.shape, o_ref.dtype)
    m_ref[...] = jnp.full(m_ref.shape, MASK_VALUE, m_ref.dtype)
    l_ref[...] = jnp.zeros(l_ref.shape, l_ref.dtype)


def _tree_bits(tree_mask, groups: int, rows: int, rows_last: bool = True):
  """[B, T, T] bool -> [B, words, rows] int32 bitmasks, row r = t*G + g
  ([B, rows, words] with rows_last=False, the TPU kernel's layout)."""
  batch, t, _ = tree_mask.shape
  words = -(-t // 32)
  m = jnp.pad(tree_mask.astype(jnp.uint32), ((0, 0), (0, 0),
                                              (0, words * 32 - t)))
  m = m.reshape(batch, t, words, 32)
  shifts = jnp.arange(32, dtype=jnp.uint32)
  bits = jnp.sum(m << shifts, axis=-1, dtype=jnp.uint32)   # distinct bits: OR
  bits = lax.bitcast_convert_type(bits, jnp.int32)         # [B, T, W]
  bits = jnp.repeat(bits, groups, axis=1)                  # [B, T*G, W]
  bits = jnp.pad(bits, ((0, 0), (0, rows - t * groups), (0, 0)))
  return jnp.swapaxes(bits, 1, 2) if rows_last else bits   # [B, W, rows]


@functools.partial(jax.jit, static_argnums=(6,))
def _decode(q, k, v, lengths, tree_mask, new_extent, cfg: _Config):
  batch, t, heads, head_dim = q.shape
  kv_heads = k.shape[2]
  g, rows = cfg.groups, cfg.rows
  d_pad = max(_next_pow2(head_dim), _MIN_TILE)
  # Fold (T, group) into the query rows of each kv head.
  # The kernel's matmuls take the cache dtype (the cache is never cast).
  qr = q.astype(k.dtype).reshape(batch, t, kv_heads, g, head_dim)
  qr = qr.transpose(0, 2, 1, 3, 4)
  qr = qr.reshape(batch, kv_heads, t * g, head_dim)
  qr = jnp.pad(qr, ((0, 0), (0, 0), (0, rows - t * g), (0, d_pad - head_dim)))
  max_len = k.shape[1]
  if d_pad != head_dim or max_len < cfg.max_len:
    # Only for head_dim not a power of two or a cache shorter than one tile.
    pad = ((0, 0), (0, cfg.max_len - max_len), (0, 0), (0, d_pad - head_dim))
    k, v = jnp.pad(k, pad), jnp.pad(v, pad)
  lengths = lengths.astype(jnp.int32)

  if cfg.tree_words:
    bits = _tree_bits(tree_mask, g, rows, rows_last=not cfg.tpu)
  elif cfg.extent:  # one int32 "word" per query row, the tree's layout
    ext = jnp.repeat(new_extent.astype(jnp.int32), g, axis=1)  # [B, T*G]
    ext = jnp.pad(ext, ((0, 0), (0, rows - t * g)), constant_values=t)
    bits = ext[:, None, :] if not cfg.tpu else ext[:, :, None]
  else:
    bits = None

  ns, ml = cfg.num_splits, cfg.max_len
  if cfg.tpu:
    o, m, l = _decode_call_tpu(lengths, qr, k, v, bits, cfg)
  else:
    o, m, l = _decode_call_gpu(lengths, qr, k, v, bits, cfg)

  # Merge the splits (flash-decoding reduction), base-2 domain.
  m_all = jnp.max(m, axis=2, keepdims=True)
  w = jnp.exp2(m - m_all)                                  # [B, Hkv, S, R]
  l_all = jnp.sum(l * w, axis=2)                           # [B, Hkv, R]
  out = jnp.sum(o * w[..., None], axis=2) / l_all[..., None]
  out = out[:, :, : t * g, :head_dim].reshape(batch, kv_heads, t, g, head_dim)
  out = out.transpose(0, 2, 1, 3, 4).reshape(batch, t, heads, head_dim)
  return out.astype(q.dtype)


def _decode_call_tpu(lengths, qr, k, v, bits, cfg: _Config):
  """Partials [B, Hkv, splits, rows(, D)] from the TPU kernel."""
  from jax.experimental.pallas import tpu as pltpu  # pylint: disable=g-import-not-at-top
  batch, kv_heads, rows, d_pad = qr.shape
  ns, ml = cfg.num_splits, cfg.max_len
  smem = getattr(pltpu, "SMEM", None) or pltpu.MemorySpace.SMEM
  if bits is not None:  # [B, rows, W]: words as columns
    bits_spec = pl.BlockSpec((None, rows, bits.shape[2]),
                             lambda b, s: (b, 0, 0))
  else:
    bits_spec = None
  stat_spec = pl.BlockSpec((None, None, kv_heads, rows, _LANES),
                           lambda b, s: (b, s, 0, 0, 0))
  o, m, l = pl.pallas_call(
      functools.partial(_decode_kernel_tpu, cfg=cfg, kv_heads=kv_heads),
      grid=(batch, ns),
      in_specs=[
          pl.BlockSpec(memory_space=smem),
          pl.BlockSpec((None, kv_heads, rows, d_pad), lambda b, s: (b, 0, 0, 0)),
          pl.BlockSpec((None, ml, kv_heads, d_pad), lambda b, s: (b, 0, 0, 0)),
          pl.BlockSpec((None, ml, kv_heads, d_pad), lambda b, s: (b, 0, 0, 0)),
          bits_spec,
      ],
      out_specs=[
          pl.BlockSpec((None, None, kv_heads, rows, d_pad),
                       lambda b, s: (b, s, 0, 0, 0)),
          stat_spec, stat_spec,
      ],
      out_shape=[
          jax.ShapeDtypeStruct((batch, ns, kv_heads, rows, d_pad), jnp.float32),
          jax.ShapeDtypeStruct((batch, ns, kv_heads, rows, _LANES), jnp.float32),
          jax.ShapeDtypeStruct((batch, ns, kv_heads, rows, _LANES), jnp.float32),
      ],
      compiler_params=_tpu_params(2),
      interpret=cfg.interpret,
      name="decode_attention",
  )(lengths, qr, k, v, bits)
  o = jnp.swapaxes(o, 1, 2)
  m = jnp.swapaxes(m[..., 0], 1, 2)
  l = jnp.swapaxes(l[..., 0], 1, 2)
  return o, m, l


def _decode_call_gpu(lengths, qr, k, v, bits, cfg: _Config):
  """Partials [B, Hkv, splits, rows(, D)] from the Triton kernel."""
  batch, kv_heads, rows, d_pad = qr.shape
  ns, ml = cfg.num_splits, cfg.max_len
  if bits is not None:
    bits_spec = pl.BlockSpec((None, bits.shape[1], rows),
                             lambda b, h, s: (b, 0, 0))
  else:
    bits_spec = None
  o, m, l = pl.pallas_call(
      functools.partial(_decode_kernel, cfg=cfg),
      grid=(batch, kv_heads, ns),
      in_specs=[
          pl.BlockSpec((None,), lambda b, h, s: (b,)),
          pl.BlockSpec((None, None, rows, d_pad), lambda b, h, s: (b, h, 0, 0)),
          pl.BlockSpec((None, ml, None, d_pad), lambda b, h, s: (b, 0, h, 0)),
          pl.BlockSpec((None, ml, None, d_pad), lambda b, h, s: (b, 0, h, 0)),
          bits_spec,
      ],
      out_specs=[
          pl.BlockSpec((None, None, None, rows, d_pad),
                       lambda b, h, s: (b, h, s, 0, 0)),
          pl.BlockSpec((None, None, None, rows), lambda b, h, s: (b, h, s, 0)),
          pl.BlockSpec((None, None, None, rows), lambda b, h, s: (b, h, s, 0)),
      ],
      out_shape=[
          jax.ShapeDtypeStruct((batch, kv_heads, ns, rows, d_pad), jnp.float32),
          jax.ShapeDtypeStruct((batch, kv_heads, ns, rows), jnp.float32),
          jax.ShapeDtypeStruct((batch, kv_heads, ns, rows), jnp.float32),
      ],
      # A 256-row query tile (T = 256: a 16x16 VAR scale) keeps its [rows,
      # block_k] scores and [rows, D] accumulator in registers over 8 warps.
      compiler_params=_compiler_params(cfg.num_warps
                                       or (8 if cfg.rows >= 256 else 4),
                                       cfg.num_stages or 2),
      interpret=cfg.interpret,
      name="decode_attention",
  )(lengths, qr, k, v, bits)
  return o, m, l


def _concrete(x):
  """numpy value of x if it is concrete (not traced), else None."""
  try:
    return np.asarray(x)
  except Exception:  # TracerArrayConversionError / ConcretizationTypeError
    return None


def _check_inputs(q, k, v, lengths, tree_mask, new_extent=None):
  for name, x in (("q", q), ("k", k), ("v", v)):
    if getattr(x, "ndim", None) != 4:
      raise ValueError(f"decode_attention: {name} must be 4-D, got shape "
                       f"{getattr(x, 'shape', None)}")
  if k.shape != v.shape:
    raise ValueError(f"decode_attention: k and v shapes differ: {k.shape} vs "
                     f"{v.shape}")
  batch, t, heads, head_dim = q.shape
  if k.shape[0] != batch:
    raise ValueError(f"decode_attention: batch mismatch: q {batch} vs cache "
                     f"{k.shape[0]}")
  if k.shape[3] != head_dim:
    raise ValueError(f"decode_attention: head_dim mismatch: q {head_dim} vs "
                     f"cache {k.shape[3]}")
  if k.shape[2] == 0 or heads % k.shape[2] != 0:
    raise ValueError(f"decode_attention: heads ({heads}) must be a multiple "
                     f"of kv_heads ({k.shape[2]})")
  if t < 1 or t > k.shape[1]:
    raise ValueError(f"decode_attention: need 1 <= T <= max_len, got T={t}, "
                     f"max_len={k.shape[1]}")
  if k.dtype != v.dtype:
    raise ValueError(f"decode_attention: k and v dtypes must match, got "
                     f"{k.dtype}, {v.dtype}")
  if not (jnp.issubdtype(q.dtype, jnp.floating)
          and jnp.issubdtype(k.dtype, jnp.floating)):
    raise ValueError(f"decode_attention: floating inputs required, got "
                     f"q {q.dtype}, cache {k.dtype}")
  if getattr(lengths, "shape", None) != (batch,):
    raise ValueError(f"decode_attention: lengths must have shape ({batch},), "
                     f"got {getattr(lengths, 'shape', None)}")
  if not jnp.issubdtype(lengths.dtype, jnp.integer):
    raise ValueError(f"decode_attention: lengths must be integers, got "
                     f"{lengths.dtype}")
  vals = _concrete(lengths)
  if vals is not None and vals.size and (vals.min() < t
                                         or vals.max() > k.shape[1]):
    raise ValueError(f"decode_attention: lengths must lie in [T, max_len] = "
                     f"[{t}, {k.shape[1]}], got {vals.tolist()}")
  if tree_mask is not None:
    if getattr(tree_mask, "shape", None) != (batch, t, t):
      raise ValueError(f"decode_attention: tree_mask must have shape "
                       f"{(batch, t, t)}, got "
                       f"{getattr(tree_mask, 'shape', None)}")
    if tree_mask.dtype != jnp.bool_:
      raise ValueError(f"decode_attention: tree_mask must be bool, got "
                       f"{tree_mask.dtype}")
  if new_extent is not None:
    if tree_mask is not None:
      raise ValueError("decode_attention: give tree_mask or new_extent, not "
                       "both")
    if getattr(new_extent, "shape", None) != (batch, t):
      raise ValueError(f"decode_attention: new_extent must have shape "
                       f"{(batch, t)}, got "
                       f"{getattr(new_extent, 'shape', None)}")
    if not jnp.issubdtype(new_extent.dtype, jnp.integer):
      raise ValueError(f"decode_attention: new_extent must be integers, got "
                       f"{new_extent.dtype}")
    ext = _concrete(new_extent)
    if ext is not None and ext.size and (ext.min() < 1 or ext.max() > t):
      raise ValueError(f"decode_attention: new_extent must lie in [1, T] = "
                       f"[1, {t}] (each query sees itself), got min "
                       f"{ext.min()}, max {ext.max()}")


def decode_attention(q, k, v, lengths, *, sm_scale: float | None = None,
                     tree_mask=None, new: str = "causal", new_extent=None,
                     num_splits: int | None = None,
                     block_k: int | None = None, interpret: bool = False,
                     num_warps: int | None = None,
                     num_stages: int | None = None,
                     backend: str | None = None):
  """Attention of T new queries per row against a static KV cache.

  Args:
    q: ``[batch, T, heads, head_dim]``.
    k, v: cache ``[batch, max_len, kv_heads, head_dim]``.
    lengths: int ``[batch]``, valid entries per row including the T new ones
      (``T <= lengths[b] <= max_len``).
    sm_scale: default ``1/sqrt(head_dim)``.
    tree_mask: optional bool ``[batch, T, T]``; replaces the causal pattern
      among the new positions (each row should at least see itself).
    new: pattern among the T new positions without a tree: "causal", or
      "bidirectional" (each sees all T: a VAR scale, a diffusion block).
    new_extent: optional int ``[batch, T]`` in [1, T]: query t sees the new
      positions ``j < new_extent[b, t]`` (replaces ``new``; causal is t + 1,
      bidirectional T, block-causal the end of the query's block). One int per
      query instead of a tree's ceil(T/32) words and no bit loop in the kernel.
    num_splits: key-range splits per (row, kv head); default from a heuristic
      that targets enough programs to fill an H100.
    block_k: key tile (power of two, default 128, clamped to max_len).
    interpret: Pallas interpret mode (CPU).
    num_warps, num_stages: Triton compiler parameters (GPU only).
    backend: "triton" (GPU), "mosaic_tpu" (TPU: one program per (row, split)
      looping over the kv heads, so the cache is read in its stored layout),
      or None: "mosaic_tpu" when the default device is a TPU.

  Returns:
    ``[batch, T, heads, head_dim]`` in ``q.dtype``. If ``q.dtype`` differs
    from the cache dtype, q is cast to the cache dtype for the matmuls.
  """
  _check_inputs(q, k, v, lengths, tree_mask, new_extent)
  if new not in NEW_PATTERNS:
    raise ValueError(f"decode_attention: new must be one of {NEW_PATTERNS}, "
                     f"got {new!r}")
  if new_extent is not None and new != "causal":
    raise ValueError("decode_attention: new_extent replaces new; leave new "
                     "at its default")
  tpu = _resolve_backend(backend, "decode_attention") == "mosaic_tpu"
  batch, t, heads, head_dim = q.shape
  max_len, kv_heads = k.shape[1], k.shape[2]
  groups = heads // kv_heads
  if sm_scale is None:
    sm_scale = 1.0 / math.sqrt(head_dim)
  if block_k is None:
    block_k = DEFAULT_BLOCK_K
  if not isinstance(block_k, (int, np.integer)) or not _is_pow2(int(block_k)):
    raise ValueError(f"decode_attention: block_k must be a power of two, got "
                     f"{block_k}")
  # The clamped last block needs block_k <= (possibly padded) max_len.
  padded_len = max(max_len, _MIN_TILE)
  block_k = min(int(block_k), 1 << (padded_len.bit_length() - 1))
  num_blocks = -(-padded_len // block_k)
  if num_splits is None:
    # TPU: a core runs the grid in order and each program already holds the
    # row's whole cache block, so splitting buys nothing there.
    num_splits = 1 if tpu else min(
        num_blocks, _MAX_SPLITS,
        max(1, -(-_TARGET_PROGRAMS // (batch * kv_heads))))
  if not isinstance(num_splits, (int, np.integer)) or num_splits < 1:
    raise ValueError(f"decode_attention: num_splits must be a positive int, "
                     f"got {num_splits}")
  blocks_per_split = -(-num_blocks // int(num_splits))
  num_splits = -(-num_blocks // blocks_per_split)  # drop splits with no keys
  cfg = _Config(
      sm_scale=float(sm_scale), t=t, groups=groups,
      rows=max(_MIN_TILE, _next_pow2(t * groups)), block_k=block_k,
      blocks_per_split=blocks_per_split, num_splits=num_splits,
      max_len=padded_len, tree_words=0 if tree_mask is None else -(-t // 32),
      bidirectional=tree_mask is None and new == "bidirectional",
      extent=new_extent is not None,
      interpret=bool(interpret), num_warps=num_warps, num_stages=num_stages,
      tpu=tpu)
  return _decode(q, k, v, lengths, tree_mask, new_extent, cfg)


def decode_attention_reference(q, k, v, lengths, *, sm_scale=None,
                               tree_mask=None, new: str = "causal",
                               new_extent=None):
  """Plain jnp version of :func:`decode_attention` (computes in
  ``promote_types(q.dtype, float32)`` and returns that dtype)."""
  batch, t = q.shape[:2]
  max_len = k.shape[1]
  lengths = jnp.asarray(lengths)
  q_pos = lengths[:, None] - t + jnp.arange(t)[None, :]          # [B, T]
  if new == "bidirectional":  # every new position sees the last one's view
    q_pos = jnp.broadcast_to(lengths[:, None] - 1, q_pos.shape)
  k_pos = jnp.arange(max_len)
  mask = k_pos[None, None, :] <= q_pos[:, :, None]               # [B, T, S]
  if new_extent is not None:  # the last new position each query sees
    mask = k_pos[None, None, :] < (lengths[:, None] - t + new_extent)[..., None]
  if tree_mask is not None:
    base = (lengths - t)[:, None, None]
    j = k_pos[None, None, :] - base                              # [B, 1, S]
    in_new = (j >= 0) & (j < t)
    tree = jnp.take_along_axis(
        tree_mask, jnp.broadcast_to(jnp.clip(j, 0, t - 1), (batch, t, max_len)),
        axis=2)
    mask = jnp.where(in_new, tree, j < 0)
  mask = mask & (k_pos[None, None, :] < lengths[:, None, None])
  return masked_attention_reference(q, k, v, mask, sm_scale=sm_scale)
