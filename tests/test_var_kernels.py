"""Attention kernels for next-scale (VAR) models.

* Training: block-causal attention over the scales through flash_attention's
  block-ids mode (attention_backend="pallas") equals the dense XLA path, values
  and gradients, in a tiny conditioned model fed embeddings.
* Sampling: a scale's queries against the KV cache through decode_attention's
  ``new_extent`` mode (every new query sees every earlier slot and the whole
  new scale) equals the XLA cache path and the uncached block-causal forward.
* Real VAR shapes (VAR-d16 at 256 px: 680 tokens, 16 heads of 64) lower for
  cuda (Triton) and TPU (Mosaic), lowering only.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export

import jaxar
from jaxar.models.masks import Mask
from jaxar.models.vision.scales import scale_ids
from pallas_kernels.decode_attention import (decode_attention,
                                             decode_attention_reference)
from pallas_kernels.flash_attention import flash_attention
from tests.kernel_testing import (TRITON_SKIP_REASON, _rel, _run,
                                  triton_lowering_available)

PATCH_NUMS = (1, 2, 3, 5, 7)  # 88 tokens; the last scale has 49
# VAR-d16 at 256 px: 680 tokens; the last scale has 256
VAR_D16 = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)


def _naive_extent(q, k, v, lengths, extent):
  """float64 loop: query t of row b sees the slots
  < lengths[b] - T + extent[b, t]."""
  b, t, h, d = q.shape
  g = h // k.shape[2]
  out = np.zeros(q.shape, np.float64)
  for bi in range(b):
    for ti in range(t):
      js = np.arange(int(lengths[bi]) - t + int(extent[bi, ti]))
      for hq in range(h):
        s = k[bi, js, hq // g] @ q[bi, ti, hq] / np.sqrt(d)
        p = np.exp(s - s.max())
        out[bi, ti, hq] = (p / p.sum()) @ v[bi, js, hq // g]
  return out


def test_decode_new_extent_matches_loop():
  """T = 49 new queries (a 7x7 scale, two tree words' worth), GQA 4/2, ragged
  lengths incl. length == T: row 0 sees its block whole (extent T, VAR), row 1
  is block-causal inside the new block (two scales at once: 9 + 40)."""
  t, max_len = 49, 100
  rng = np.random.default_rng(0)
  q, k, v = (rng.standard_normal(s).astype(np.float32)
             for s in [(2, t, 4, 16), (2, max_len, 2, 16), (2, max_len, 2, 16)])
  lengths = np.array([t, 97], np.int32)
  extent = np.stack([np.full(t, t), np.where(np.arange(t) < 9, 9, t)])
  want = _naive_extent(*(x.astype(np.float64) for x in (q, k, v)), lengths,
                       extent)
  fn = lambda q, k, v, n, e: (
      decode_attention(q, k, v, n, new_extent=e, block_k=16, num_splits=3,
                       interpret=True),
      decode_attention_reference(q, k, v, n, new_extent=e))
  got, ref = _run(fn, q, k, v, lengths, jnp.asarray(extent, jnp.int32))
  assert _rel(got, want) < 1e-5
  assert _rel(ref, want) < 1e-5
  with pytest.raises(ValueError, match="new_extent must lie in"):
    decode_attention(q, k, v, lengths, new_extent=jnp.zeros((2, t), jnp.int32),
                     interpret=True)


def _model(backend):
  return jaxar.ModelConfig(vocab_size=32, d_model=32, n_layers=1, n_heads=4,
                           n_kv_heads=2, mlp_dim=48, max_seq_len=128,
                           cond_dim=8, initializer_range=0.2,
                           attention_backend=backend)


def _rows_ids():
  """Order ids of two ragged rows of L + 1 tokens: row 0 is VAR's block-causal
  scale ids followed by one pad token (a later block: it cannot reach the 88
  before it), row 1 has an extra token after scale 0, so its scales sit one
  slot later and the rows' cache lengths differ by one."""
  ids = scale_ids(PATCH_NUMS)
  return np.stack([np.append(ids, len(PATCH_NUMS)),
                   np.concatenate([[0, 1], ids[1:] + 1])]).astype(np.int32)


def _program(params, embeds, cond, w, *, backend, cached):
  """One compiled program per backend: (a) the block-causal training forward
  and its gradients; (b) with `cached`, the same rows through the cache:
  scales 0-2 (and row 1's extra token) in one block-causal call, then scale 3
  (5x5) and scale 4 (7x7) one at a time, each a bidirectional new block."""
  config = _model(backend)
  ids = jnp.asarray(_rows_ids())

  def loss(params, embeds):
    logits = jaxar.forward(params, config=config, embeds=embeds, cond=cond,
                           mask=Mask.block_causal(ids))[0]
    return jnp.sum(logits * w), logits

  (_, logits), grads = jax.value_and_grad(loss, argnums=(0, 1),
                                          has_aux=True)(params, embeds)

  if not cached:
    return logits, grads
  n0 = sum(n * n for n in PATCH_NUMS[:3])  # 14
  cache = jaxar.KVCache.empty(config, 2, 96)
  out, cache = jaxar.forward(params, config=config, embeds=embeds[:, :n0 + 1],
                             cond=cond, cache=cache,
                             num_new=jnp.array([n0, n0 + 1]),
                             mask=Mask.block_causal(ids[:, :n0 + 1]))
  steps = [out]
  for n in PATCH_NUMS[3:]:
    idx = cache.lengths[:, None] + jnp.arange(n * n)[None]  # [2, n*n]
    block = jnp.take_along_axis(embeds, idx[..., None], axis=1)
    out, cache = jaxar.forward(params, config=config, embeds=block, cond=cond,
                               cache=cache, mask=Mask.bidirectional())
    steps.append(out)
  return logits, grads, steps, cache.lengths


def test_var_pallas_equals_xla_training_and_cached_scales():
  config = _model("xla")
  params = jaxar.init_params(config, 3)
  rng = np.random.default_rng(3)
  L = sum(n * n for n in PATCH_NUMS)  # 88
  embeds = jnp.asarray(rng.standard_normal((2, L + 1, 32)), jnp.float32)
  cond = jnp.asarray(rng.standard_normal((2, 8)), jnp.float32)
  w = jnp.asarray(rng.standard_normal((2, L + 1, 32)), jnp.float32)
  # AdaLN params start at zero; random ones so the conditioning matters
  params = jax.tree_util.tree_map_with_path(
      lambda path, x: (0.1 * jax.random.normal(jax.random.PRNGKey(len(path)),
                                               x.shape, x.dtype)
                       if "ada" in jax.tree_util.keystr(path) else x), params)
  args = (params, embeds, cond, w)
  pal = _run(functools.partial(_program, backend="pallas", cached=True), *args)
  # The dense-mask XLA path is the reference (its own cache path equals its
  # uncached forward in the model tests; not recompiled here).
  xla = _run(functools.partial(_program, backend="xla", cached=False), *args)

  # (a) forward per row, gradients w.r.t. params and embeds
  for b in range(2):
    assert _rel(pal[0][b], xla[0][b]) < 1e-5
  g_pal = jax.tree_util.tree_leaves(pal[1])
  g_xla = jax.tree_util.tree_leaves(xla[1])
  assert len(g_pal) == len(g_xla) > 10
  for a, r in zip(g_pal, g_xla):
    assert _rel(a, r) < 1e-5
  assert float(jnp.max(jnp.abs(xla[1][1]))) > 0  # d loss / d embeds is live

  # (b) each cached call's logits == the uncached block-causal forward's at
  # those positions, per row (row 1 has one token more before scale 3)
  np.testing.assert_array_equal(pal[3], [L, L + 1])
  full = np.asarray(xla[0])
  n0 = sum(n * n for n in PATCH_NUMS[:3])
  for b in range(2):
    sizes = [n0 + b, PATCH_NUMS[3] ** 2, PATCH_NUMS[4] ** 2]
    ends = np.cumsum(sizes)
    for got, size, end in zip(pal[2], sizes, ends):
      assert _rel(got[b, :size], full[b, end - size:end]) < 1e-5


def _tpu_kernels(fn, *args):
  exported = export.export(jax.jit(fn), platforms=("tpu",))(*args)
  return exported.mlir_module().count("tpu_custom_call")


def _var_shapes():
  L = sum(n * n for n in VAR_D16)
  assert L == 680
  q = jax.ShapeDtypeStruct((2, L, 16, 64), jnp.bfloat16)
  ids = jax.ShapeDtypeStruct((2, L), jnp.int32)
  # sampling: the last scale (16 x 16 = 256 queries) against the 680 cache
  dq = jax.ShapeDtypeStruct((2, 256, 16, 64), jnp.bfloat16)
  cache = jax.ShapeDtypeStruct((2, 768, 16, 64), jnp.bfloat16)
  lengths = jax.ShapeDtypeStruct((2,), jnp.int32)
  ext = jax.ShapeDtypeStruct((2, 256), jnp.int32)
  return q, ids, dq, cache, lengths, ext


def _flash_grad(backend):
  def loss(q, k, v, i):
    out = flash_attention(q, k, v, block_ids=i, backend=backend)
    return out.astype(jnp.float32).sum()
  return jax.grad(loss, argnums=(0, 1, 2))


@pytest.mark.skipif(not triton_lowering_available(), reason=TRITON_SKIP_REASON)
def test_var_d16_shapes_lower_for_cuda():
  q, ids, dq, cache, lengths, ext = _var_shapes()
  text = jax.jit(_flash_grad("triton")).trace(q, q, q, ids).lower(
      lowering_platforms=("cuda",)).as_text()
  assert text.count("triton") >= 3  # fwd, dK/dV, dQ
  dec = jax.jit(lambda q, k, v, n, e: decode_attention(
      q, k, v, n, new_extent=e, backend="triton"))
  text = dec.trace(dq, cache, cache, lengths, ext).lower(
      lowering_platforms=("cuda",)).as_text()
  assert "triton" in text


def test_var_d16_shapes_lower_for_tpu():
  q, ids, dq, cache, lengths, ext = _var_shapes()
  assert _tpu_kernels(_flash_grad("mosaic_tpu"), q, q, q, ids) == 3
  fn = lambda q, k, v, n, e: decode_attention(q, k, v, n, new_extent=e,
                                              backend="mosaic_tpu")
  assert _tpu_kernels(fn, dq, cache, cache, lengths, ext) == 1
