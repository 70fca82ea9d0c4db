"""pallas_kernels.decode_attention vs a float64 jnp reference (CPU interpret)."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.decode_attention import (decode_attention,
                                             decode_attention_reference)
from pallas_kernels.flash_attention import flash_attention_reference

from tests.kernel_testing import (ON_GPU, TRITON_SKIP_REASON, _rel, _run,  # noqa: F401
                                  _x64, triton_lowering_available)


def _random_tree(rng, batch, t):
  """Each node sees itself and its ancestors (parent index < node index)."""
  mask = np.zeros((batch, t, t), bool)
  for b in range(batch):
    parent = [-1] + [int(rng.integers(0, i)) for i in range(1, t)]
    for i in range(t):
      a = i
      while a >= 0:
        mask[b, i, a] = True
        a = parent[a]
  return mask


def _inputs(seed, b, t, h, kh, d, max_len, dtype=jnp.float32):
  rng = np.random.default_rng(seed)
  shapes = [(b, t, h, d), (b, max_len, kh, d), (b, max_len, kh, d)]
  return tuple(jnp.asarray(rng.standard_normal(s, np.float32)).astype(dtype)
               for s in shapes)


def _reference(q, k, v, lengths, tree_mask=None, sm_scale=None, new="causal"):
  with _x64():
    args = [jnp.asarray(np.asarray(x, np.float64)) for x in (q, k, v)]
    tm = None if tree_mask is None else jnp.asarray(np.asarray(tree_mask))
    fn = lambda q, k, v, n, tm: decode_attention_reference(
        q, k, v, n, tree_mask=tm, sm_scale=sm_scale, new=new)
    return np.asarray(_run(fn, *args, jnp.asarray(np.asarray(lengths)), tm))


# (batch, T, heads, kv_heads, head_dim, max_len, lengths, tree, num_splits,
#  block_k)
CASES = [
    # T=1, GQA 4/2, ragged lengths incl. length == T (empty prefix), max_len
    # (45) not a multiple of block_k (16), default splits
    pytest.param(3, 1, 4, 2, 16, 45, [45, 7, 1], False, None, 16,
                 id="T1-gqa-ragged"),
    # T=4, MQA, 3 splits, rows ending exactly at / inside / before blocks
    pytest.param(3, 4, 4, 1, 16, 40, [4, 32, 21], False, 3, 16,
                 id="T4-mqa-splits"),
    # T=8 causal, MHA, many splits (some rows skip whole splits)
    pytest.param(2, 8, 2, 2, 16, 37, [8, 30], False, 4, 16,
                 id="T8-causal-splits"),
    # T=8 tree mask, GQA 4/2, lengths == T row, default block_k (clamped)
    pytest.param(2, 8, 4, 2, 16, 50, [8, 50], True, 2, None,
                 id="T8-tree-gqa"),
    # T=40 tree (two 32-bit mask words), one split
    pytest.param(2, 40, 2, 1, 16, 70, [40, 61], True, 1, 16,
                 id="T40-tree-2words"),
]


@pytest.mark.parametrize(
    "b,t,h,kh,d,max_len,lengths,tree,num_splits,block_k", CASES)
def test_decode_matches_reference(b, t, h, kh, d, max_len, lengths, tree,
                                  num_splits, block_k):
  rng = np.random.default_rng(t)
  q, k, v = _inputs(t, b, t, h, kh, d, max_len)
  lengths = jnp.asarray(lengths, jnp.int32)
  tm = jnp.asarray(_random_tree(rng, b, t)) if tree else None
  out = _run(lambda q, k, v, n, tm: decode_attention(
      q, k, v, n, tree_mask=tm, num_splits=num_splits, block_k=block_k,
      interpret=True), q, k, v, lengths, tm)
  assert out.shape == q.shape and out.dtype == q.dtype
  ref = _reference(q, k, v, lengths, tm)
  err = _rel(out, ref)
  assert err < 1e-4, err


def test_garbage_beyond_length_is_ignored():
  """Cache entries past lengths[b] (NaN here) must not leak into the output."""
  q, k, v = _inputs(5, 2, 1, 2, 2, 16, 24)
  lengths = jnp.array([5, 17], jnp.int32)
  poison = np.arange(24)[None, :, None, None] >= np.array([5, 17])[:, None,
                                                                  None, None]
  k_bad = jnp.asarray(np.where(poison, np.nan, np.asarray(k)))
  v_bad = jnp.asarray(np.where(poison, np.nan, np.asarray(v)))
  out = _run(decode_attention, q, k_bad, v_bad, lengths, block_k=16,
             num_splits=2, sm_scale=0.5, interpret=True)
  ref = _reference(q, k, v, lengths, sm_scale=0.5)
  assert np.all(np.isfinite(np.asarray(out)))
  assert _rel(out, ref) < 1e-4


@pytest.mark.parametrize("q_dtype", [jnp.bfloat16, jnp.float32])
def test_bf16_cache(q_dtype):
  """bf16 cache; q either bf16 or float32 (cast to the cache dtype)."""
  q, k, v = _inputs(6, 2, 4, 4, 2, 32, 40, dtype=jnp.bfloat16)
  q = q.astype(q_dtype)
  lengths = jnp.array([40, 9], jnp.int32)
  out = _run(decode_attention, q, k, v, lengths, block_k=16, interpret=True)
  assert out.dtype == q_dtype
  ref = _reference(*(x.astype(jnp.float32) for x in (q, k, v)), lengths)
  assert _rel(out.astype(jnp.float32), ref) < 2e-2


def _naive(q, k, v, lengths, tree_mask=None, new="causal"):
  """Per-query numpy loop: the semantics spelled out."""
  b, t, h, d = q.shape
  g = h // k.shape[2]
  out = np.zeros(q.shape, np.float64)
  for bi in range(b):
    base = int(lengths[bi]) - t
    for ti in range(t):
      if tree_mask is None and new == "bidirectional":
        js = list(range(base + t))
      elif tree_mask is None:
        js = list(range(base + ti + 1))
      else:
        js = list(range(base)) + [base + j for j in range(t)
                                  if tree_mask[bi, ti, j]]
      for hq in range(h):
        s = np.array([q[bi, ti, hq] @ k[bi, j, hq // g] for j in js])
        p = np.exp(s / np.sqrt(d) - np.max(s / np.sqrt(d)))
        out[bi, ti, hq] = (p / p.sum()) @ v[bi, js, hq // g]
  return out


@pytest.mark.parametrize("b,t,h,kh,max_len,lengths,num_splits,block_k", [
    # GQA 4/2, lengths == T row, 2 splits
    pytest.param(3, 5, 4, 2, 40, [5, 33, 21], 2, 16, id="T5-gqa-splits"),
    # T=40 (a tree would need two 32-bit words), MQA, default blocks
    pytest.param(2, 40, 2, 1, 70, [40, 61], None, None, id="T40-mqa"),
])
def test_bidirectional_new_block(b, t, h, kh, max_len, lengths, num_splits,
                                 block_k):
  """The T new positions see each other fully (a VAR scale, a diffusion
  block): new="bidirectional" and an all-ones tree mask both give it."""
  q, k, v = _inputs(11, b, t, h, kh, 16, max_len)
  lengths = np.asarray(lengths, np.int32)
  want = _naive(*(np.asarray(x, np.float64) for x in (q, k, v)), lengths,
                new="bidirectional")
  ones = jnp.ones((b, t, t), bool)
  run = lambda **kw: _run(lambda q, k, v, n: decode_attention(
      q, k, v, n, num_splits=num_splits, block_k=block_k, interpret=True,
      **kw), q, k, v, jnp.asarray(lengths))
  assert _rel(run(new="bidirectional"), want) < 1e-4
  assert _rel(run(tree_mask=ones), want) < 1e-4
  np.testing.assert_allclose(
      _reference(q, k, v, lengths, new="bidirectional"), want, rtol=1e-10,
      atol=1e-10)


@pytest.mark.parametrize("tree", [False, True])
def test_reference_semantics(tree):
  """The jnp reference against the per-query loop (bottom-right causal,
  tree over the new positions, lengths == T row)."""
  b, t, h, kh, d, max_len = 2, 3, 4, 2, 8, 10
  q, k, v = (np.asarray(x, np.float64)
             for x in _inputs(7, b, t, h, kh, d, max_len))
  lengths = np.array([10, 3])
  tm = _random_tree(np.random.default_rng(2), b, t) if tree else None
  ref = _reference(q, k, v, lengths, tm)
  np.testing.assert_allclose(ref, _naive(q, k, v, lengths, tm), rtol=1e-10,
                             atol=1e-10)


def test_decode_reference_matches_prefill_reference():
  """Decode (bottom-right) == the last T rows of causal prefill attention."""
  b, t, h, kh, d, n = 1, 3, 4, 2, 8, 7
  q, k, v = (np.asarray(x) for x in _inputs(9, b, n, h, kh, d, n))
  dec = _run(decode_attention_reference, q[:, n - t:], k, v, np.array([n]))
  pre = _run(flash_attention_reference, q, k, v, causal=True)
  np.testing.assert_allclose(np.asarray(dec), np.asarray(pre)[:, n - t:],
                             rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("change,match", [
    (dict(k=(2, 16, 3, 16)), "multiple of kv_heads"),
    (dict(k=(2, 16, 2, 8)), "head_dim mismatch"),
    (dict(k=(3, 16, 2, 16)), "batch mismatch"),
    (dict(lengths=[4]), "lengths must have shape"),
    (dict(lengths=[4, 17]), r"lengths must lie in \[T, max_len\]"),
    (dict(lengths=[2, 8]), r"lengths must lie in \[T, max_len\]"),
    (dict(q=(2, 20, 4, 16)), "T <= max_len"),
    (dict(tree=(2, 4, 3)), "tree_mask must have shape"),
    (dict(block_k=24), "power of two"),
    (dict(vdtype=jnp.bfloat16), "k and v dtypes must match"),
    (dict(new="tree"), "new must be one of"),
])
def test_bad_inputs(change, match):
  q = jnp.zeros(change.get("q", (2, 3, 4, 16)), jnp.float32)
  k = jnp.zeros(change.get("k", (2, 16, 2, 16)), jnp.float32)
  lengths = jnp.asarray(change.get("lengths", [4, 8]), jnp.int32)
  tree = (jnp.ones(change["tree"], bool) if "tree" in change else None)
  v = k.astype(change.get("vdtype", k.dtype))
  with pytest.raises(ValueError, match=match):
    decode_attention(q, k, v, lengths, tree_mask=tree,
                     new=change.get("new", "causal"),
                     block_k=change.get("block_k"), interpret=True)


@pytest.mark.skipif(not triton_lowering_available(), reason=TRITON_SKIP_REASON)
@pytest.mark.parametrize("t,tree,d,new", [(1, False, 128, "causal"),
                                          (5, True, 80, "causal"),
                                          (16, False, 64, "bidirectional")])
def test_triton_lowering(t, tree, d, new):
  q = jax.ShapeDtypeStruct((4, t, 16, d), jnp.bfloat16)
  k = jax.ShapeDtypeStruct((4, 1000, 4, d), jnp.bfloat16)
  lengths = jax.ShapeDtypeStruct((4,), jnp.int32)
  tm = jax.ShapeDtypeStruct((4, t, t), jnp.bool_) if tree else None
  fn = jax.jit(lambda q, k, v, n, tm: decode_attention(q, k, v, n,
                                                       tree_mask=tm, new=new))
  text = fn.trace(q, k, k, lengths, tm).lower(
      lowering_platforms=("cuda",)).as_text()
  assert "triton" in text


@pytest.mark.skipif(not ON_GPU, reason="needs a GPU")
@pytest.mark.parametrize("t,tree", [(1, False), (5, False), (5, True)])
def test_gpu_compiled(t, tree):
  b, max_len = 4, 1000
  q, k, v = _inputs(8, b, t, 16, 4, 128, max_len, dtype=jnp.bfloat16)
  lengths = jnp.array([max_len, t, 513, 77], jnp.int32)
  tm = jnp.asarray(_random_tree(np.random.default_rng(1), b, t)) if tree else None
  out = decode_attention(q, k, v, lengths, tree_mask=tm)
  ref = _reference(*(x.astype(jnp.float32) for x in (q, k, v)), lengths, tm)
  assert _rel(out.astype(jnp.float32), ref) < 2e-2
