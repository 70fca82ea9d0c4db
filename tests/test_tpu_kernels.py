"""The Mosaic TPU variants of the Pallas kernels (backend="mosaic_tpu").

No TPU here: the kernels run in interpret mode on CPU against the float64
references, and `jax.export` lowers them for the TPU platform, which runs the
Pallas -> Mosaic lowering (block-shape rules, memory spaces, op support) on
CPU. Mosaic's own compile passes only run on a TPU.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export

from pallas_kernels.decode_attention import decode_attention
from pallas_kernels.flash_attention import flash_attention
from tests import test_decode_attention as tda
from tests import test_flash_attention as tfa
from tests.kernel_testing import _rel, _run


@pytest.mark.parametrize("b,sq,sk,h,kh,d,causal,segments", [
    pytest.param(2, 40, 40, 4, 2, 16, True, True, id="causal-gqa-segments-odd"),
    pytest.param(1, 24, 37, 4, 1, 16, False, False, id="noncausal-mqa-cross"),
])
def test_flash_attention_tpu_layout(b, sq, sk, h, kh, d, causal, segments):
  q, k, v, ct, seg = tfa._inputs(3, b, sq, sk, h, kh, d, segments=segments)
  f = functools.partial(flash_attention, causal=causal, segment_ids=seg,
                        interpret=True, backend="mosaic_tpu")

  def run(q, k, v, ct):
    out, vjp = jax.vjp(f, q, k, v)
    return out, vjp(ct)

  out, grads = _run(run, q, k, v, ct)
  ref_out, ref_grads = tfa._reference_vjp(q, k, v, ct, seg, causal)
  assert _rel(out, ref_out) < 1e-4
  for name, g, rg in zip("qkv", grads, ref_grads):
    assert _rel(g, rg) < 1e-4, name


@pytest.mark.parametrize("kind,b,t,h,kh,d,segments", [
    pytest.param("var", 2, 30, 4, 2, 16, True, id="var-scales-segments"),
    # two 128-row tiles per row: per-(row, tile) bounds from the flat SMEM array
    pytest.param("prefix", 2, 250, 4, 1, 16, True, id="prefix-mqa-two-tiles"),
    pytest.param("random", 1, 37, 2, 2, 16, False, id="random-ids"),
])
def test_flash_attention_block_ids_tpu_layout(kind, b, t, h, kh, d, segments):
  """Block ids (order ids) in the TPU layout: loop bounds from SMEM."""
  tfa._check_block_ids_case(kind, b, t, h, kh, d, segments, None, None,
                            backend="mosaic_tpu")


@pytest.mark.parametrize("b,t,h,kh,d,max_len,lengths,tree,num_splits,new", [
    pytest.param(3, 1, 4, 2, 16, 45, [45, 7, 1], False, None, "causal",
                 id="T1-gqa"),
    pytest.param(2, 5, 8, 2, 16, 40, [5, 33], True, 2, "causal",
                 id="T5-tree-splits"),
    pytest.param(2, 6, 4, 2, 16, 40, [6, 29], False, 2, "bidirectional",
                 id="T6-bidirectional-splits"),
])
def test_decode_attention_tpu_layout(b, t, h, kh, d, max_len, lengths, tree,
                                     num_splits, new):
  q, k, v = tda._inputs(t, b, t, h, kh, d, max_len)
  lengths = jnp.asarray(lengths, jnp.int32)
  tm = (jnp.asarray(tda._random_tree(np.random.default_rng(t), b, t))
        if tree else None)
  out = _run(lambda q, k, v, n, tm: decode_attention(
      q, k, v, n, tree_mask=tm, new=new, num_splits=num_splits, block_k=16,
      interpret=True, backend="mosaic_tpu"), q, k, v, lengths, tm)
  want = tda._naive(*(np.asarray(x, np.float64) for x in (q, k, v)),
                    np.asarray(lengths), None if tm is None else np.asarray(tm),
                    new=new)
  assert _rel(out, want) < 1e-4


def _tpu_kernels(fn, *args):
  """Number of Mosaic TPU custom calls in fn lowered for the TPU platform."""
  exported = export.export(jax.jit(fn), platforms=("tpu",))(*args)
  return exported.mlir_module().count("tpu_custom_call")


def test_flash_attention_lowers_to_mosaic_tpu():
  q = jax.ShapeDtypeStruct((2, 300, 8, 128), jnp.bfloat16)
  k = jax.ShapeDtypeStruct((2, 300, 2, 128), jnp.bfloat16)
  seg = jax.ShapeDtypeStruct((2, 300), jnp.int32)
  attn = functools.partial(flash_attention, backend="mosaic_tpu")
  assert _tpu_kernels(lambda q, k, v, s: attn(q, k, v, segment_ids=s),
                      q, k, k, seg) == 1
  loss = lambda q, k, v, s: attn(q, k, v, segment_ids=s).astype(
      jnp.float32).sum()
  # forward (recomputed for the residuals), dK/dV and dQ
  assert _tpu_kernels(jax.grad(loss, argnums=(0, 1, 2)), q, k, k, seg) == 3


@pytest.mark.parametrize("d,segments", [(64, True), (128, False)])
def test_flash_attention_block_ids_lower_to_mosaic_tpu(d, segments):
  """Block-ids kernels (fwd, dK/dV, dQ) at a real model shape."""
  q = jax.ShapeDtypeStruct((2, 1024, 16, d), jnp.bfloat16)
  k = jax.ShapeDtypeStruct((2, 1024, 4, d), jnp.bfloat16)
  ids = jax.ShapeDtypeStruct((2, 1024), jnp.int32)
  seg = ids if segments else None
  attn = functools.partial(flash_attention, backend="mosaic_tpu")
  assert _tpu_kernels(lambda q, k, v, s, i: attn(q, k, v, segment_ids=s,
                                                 block_ids=i),
                      q, k, k, seg, ids) == 1
  loss = lambda q, k, v, s, i: attn(q, k, v, segment_ids=s,
                                    block_ids=i).astype(jnp.float32).sum()
  assert _tpu_kernels(jax.grad(loss, argnums=(0, 1, 2)), q, k, k, seg,
                      ids) == 3


@pytest.mark.parametrize("tree,new", [(False, "causal"), (True, "causal"),
                                      (False, "bidirectional")])
def test_decode_attention_lowers_to_mosaic_tpu(tree, new):
  q = jax.ShapeDtypeStruct((4, 5, 32, 128), jnp.bfloat16)
  cache = jax.ShapeDtypeStruct((4, 1000, 8, 128), jnp.bfloat16)
  lengths = jax.ShapeDtypeStruct((4,), jnp.int32)
  tm = jax.ShapeDtypeStruct((4, 5, 5), jnp.bool_) if tree else None
  fn = lambda q, k, v, n, m: decode_attention(q, k, v, n, tree_mask=m, new=new,
                                              backend="mosaic_tpu")
  assert _tpu_kernels(fn, q, cache, cache, lengths, tm) == 1


def test_backend_names_checked():
  x = jnp.zeros((1, 16, 2, 16), jnp.float32)
  with pytest.raises(ValueError, match="backend must be one of"):
    flash_attention(x, x, x, backend="tpu", interpret=True)
  with pytest.raises(ValueError, match="backend must be one of"):
    decode_attention(x, x, x, jnp.array([16]), backend="cuda", interpret=True)
  y = jnp.zeros((1, 300, 2, 16))
  with pytest.raises(ValueError, match="block_q must be a multiple of 128"):
    flash_attention(y, y, y, segment_ids=jnp.zeros((1, 300), jnp.int32),
                    block_q=64, backend="mosaic_tpu", interpret=True)


@pytest.mark.parametrize("has_q", [True, False])
def test_verify_lowers_to_mosaic_tpu(has_q):
  from pallas_kernels.verify import verify  # pylint: disable=g-import-not-at-top
  b, k, vocab = 8, 4, 32000
  p = jax.ShapeDtypeStruct((b, k + 1, vocab), jnp.float32)
  q = jax.ShapeDtypeStruct((b, k, vocab), jnp.float32) if has_q else None
  toks = jax.ShapeDtypeStruct((b, k), jnp.int32)
  u = jax.ShapeDtypeStruct((b, k), jnp.float32)
  assert _tpu_kernels(lambda p, q, t, u, e: verify(p, q, t, u, e),
                      p, q, toks, u, p) == 1
