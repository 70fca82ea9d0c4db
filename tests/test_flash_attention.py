"""pallas_kernels.flash_attention vs a float64 jnp reference (CPU interpret)."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.flash_attention import (flash_attention,
                                            flash_attention_reference,
                                            masked_attention_reference)

from tests.kernel_testing import (ON_GPU, TRITON_SKIP_REASON, _rel, _run,  # noqa: F401
                                  _x64, triton_lowering_available)


def _inputs(seed, b, sq, sk, h, kh, d, dtype=jnp.float32, segments=False):
  rng = np.random.default_rng(seed)
  normal = lambda *s: rng.standard_normal(s, np.float32)
  q = jnp.asarray(normal(b, sq, h, d)).astype(dtype)
  k = jnp.asarray(normal(b, sk, kh, d)).astype(dtype)
  v = jnp.asarray(normal(b, sk, kh, d)).astype(dtype)
  ct = jnp.asarray(normal(b, sq, h, d))
  seg = None
  if segments:  # packed documents: sorted ids, plus one row with a single id
    seg = np.sort(rng.integers(0, 3, (b, sq)), axis=1).astype(np.int32)
    seg[0] = 7
    seg = jnp.asarray(seg)
  return q, k, v, ct, seg


def _reference_vjp(q, k, v, ct, seg, causal):
  """Output and (dq, dk, dv) of sum(out * ct) in float64."""
  with _x64():
    args = [jnp.asarray(np.asarray(x, np.float64)) for x in (q, k, v, ct)]
    seg64 = None if seg is None else jnp.asarray(np.asarray(seg))

    def run(q, k, v, ct):
      f = functools.partial(flash_attention_reference, causal=causal,
                            segment_ids=seg64)
      out, vjp = jax.vjp(f, q, k, v)
      return out, vjp(ct)

    out, grads = _run(run, *args)
    return np.asarray(out), [np.asarray(g) for g in grads]


# (batch, seq_q, seq_k, heads, kv_heads, head_dim, causal, segments,
#  block_q, block_k)
CASES = [
    # odd length (37 = 2*16 + 5) with padding, MHA, causal
    pytest.param(2, 37, 37, 2, 2, 32, True, False, 16, 16, id="causal-odd"),
    # GQA 4/2, non-causal cross attention with different odd lengths
    pytest.param(1, 24, 37, 4, 2, 16, False, False, 16, 16,
                 id="noncausal-gqa-cross"),
    # GQA 4/2 + causal + segment ids, block_q != block_k, padded to 64
    pytest.param(2, 40, 40, 4, 2, 16, True, True, 32, 16,
                 id="causal-gqa-segments"),
    # non-causal + segment ids, MQA (4 heads / 1 kv head)
    pytest.param(2, 32, 32, 4, 1, 16, False, True, 16, 16,
                 id="noncausal-mqa-segments"),
    # default block sizes (clamped to 64/64, backward chunk 32)
    pytest.param(1, 45, 45, 2, 1, 16, True, False, None, None,
                 id="causal-default-blocks"),
]


def _assert_matches_reference(out, grads, ref_out, ref_grads, q, k, v):
  """Output and dq/dk/dv: shapes, dtypes and relative error < 1e-4 vs the reference."""
  assert out.shape == q.shape and out.dtype == q.dtype
  assert _rel(out, ref_out) < 1e-4
  for name, g, rg, x in zip("qkv", grads, ref_grads, (q, k, v)):
    assert g.shape == x.shape and g.dtype == x.dtype, name
    err = _rel(g, rg)
    assert err < 1e-4, f"d{name}: rel err {err}"


@pytest.mark.parametrize(
    "b,sq,sk,h,kh,d,causal,segments,block_q,block_k", CASES)
def test_forward_and_gradients(b, sq, sk, h, kh, d, causal, segments, block_q,
                               block_k):
  q, k, v, ct, seg = _inputs(0, b, sq, sk, h, kh, d, segments=segments)
  f = functools.partial(flash_attention, causal=causal, segment_ids=seg,
                        block_q=block_q, block_k=block_k, interpret=True)

  def run(q, k, v, ct):
    out, vjp = jax.vjp(f, q, k, v)
    return out, vjp(ct)

  out, grads = _run(run, q, k, v, ct)
  ref_out, ref_grads = _reference_vjp(q, k, v, ct, seg, causal)
  _assert_matches_reference(out, grads, ref_out, ref_grads, q, k, v)


def test_bf16_forward():
  q, k, v, _, _ = _inputs(1, 2, 37, 37, 4, 2, 32, dtype=jnp.bfloat16)
  out = _run(flash_attention, q, k, v, causal=True, block_q=16, block_k=16,
             interpret=True)
  assert out.dtype == jnp.bfloat16
  with _x64():
    ref = _run(flash_attention_reference,
               *[jnp.asarray(np.asarray(x.astype(jnp.float32), np.float64))
                 for x in (q, k, v)], causal=True)
  assert _rel(out.astype(jnp.float32), ref) < 2e-2


def test_sm_scale_forwarded():
  q, k, v, _, _ = _inputs(2, 1, 16, 16, 2, 2, 16)
  out = _run(flash_attention, q, k, v, causal=False, sm_scale=0.3,
             block_q=16, block_k=16, interpret=True)
  with _x64():
    ref = _run(flash_attention_reference,
               *[jnp.asarray(np.asarray(x, np.float64)) for x in (q, k, v)],
               causal=False, sm_scale=0.3)
  assert _rel(out, ref) < 1e-4


def test_reference_matches_naive_loop():
  """The reference itself against an explicit per-query numpy loop."""
  q, k, v, _, seg = _inputs(3, 1, 9, 9, 4, 2, 8, segments=True)
  seg = np.array([[0, 0, 0, 1, 1, 2, 2, 2, 2]])
  q, k, v, seg = map(np.asarray, (q, k, v, seg))
  ref = np.asarray(_run(flash_attention_reference, q, k, v, causal=True,
                        segment_ids=seg))
  want = np.zeros_like(ref)
  for hq in range(4):
    hk = hq // 2
    for i in range(9):
      js = [j for j in range(9) if j <= i and seg[0, j] == seg[0, i]]
      s = np.array([q[0, i, hq] @ k[0, j, hk] for j in js]) / np.sqrt(8)
      p = np.exp(s - s.max())
      p /= p.sum()
      want[0, i, hq] = sum(pj * v[0, j, hk] for pj, j in zip(p, js))
  np.testing.assert_allclose(ref, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kwargs,match", [
    (dict(q=(1, 8, 3, 16), k=(1, 8, 2, 16)), "multiple of kv_heads"),
    (dict(q=(1, 8, 4, 16), k=(1, 8, 2, 32)), "head_dim mismatch"),
    (dict(q=(2, 8, 4, 16), k=(1, 8, 2, 16)), "batch mismatch"),
    (dict(q=(1, 8, 4, 16), k=(1, 8, 2)), "4-D"),
    (dict(q=(1, 8, 2, 16), k=(1, 8, 2, 16), seg=(1, 7)), "segment_ids"),
    (dict(q=(1, 8, 2, 16), k=(1, 9, 2, 16), seg=(1, 8)), "seq_q == seq_k"),
    (dict(q=(1, 8, 2, 16), k=(1, 8, 2, 16), block_q=24), "power of two"),
    (dict(q=(1, 8, 2, 16), k=(1, 8, 2, 16), kdtype=jnp.bfloat16),
     "dtypes must match"),
    (dict(q=(1, 8, 2, 16), k=(1, 8, 2, 16), ids=(1, 7)), "block_ids must"),
    (dict(q=(1, 8, 2, 16), k=(1, 9, 2, 16), ids=(1, 8)), "seq_q == seq_k"),
    (dict(q=(1, 8, 2, 16), k=(1, 8, 2, 16), ids=(1, 8), causal=False),
     "pass causal=True"),
    (dict(q=(1, 8, 2, 16), k=(1, 8, 2, 16), ids=(1, 8), ids_dtype=jnp.float32),
     "block_ids must be integers"),
])
def test_bad_inputs(kwargs, match):
  q = jnp.zeros(kwargs["q"], jnp.float32)
  k = jnp.zeros(kwargs["k"], kwargs.get("kdtype", jnp.float32))
  seg = (jnp.zeros(kwargs["seg"], jnp.int32) if "seg" in kwargs else None)
  ids = (jnp.zeros(kwargs["ids"], kwargs.get("ids_dtype", jnp.int32))
         if "ids" in kwargs else None)
  with pytest.raises(ValueError, match=match):
    flash_attention(q, k, k, segment_ids=seg, block_ids=ids,
                    causal=kwargs.get("causal", True),
                    block_q=kwargs.get("block_q"), interpret=True)


@pytest.mark.skipif(not triton_lowering_available(), reason=TRITON_SKIP_REASON)
@pytest.mark.parametrize("causal,segments,d", [(True, False, 128),
                                                (False, True, 80)])
def test_triton_lowering(causal, segments, d):
  """Fwd + bwd lower through the Pallas Triton backend (no GPU needed)."""
  q = jax.ShapeDtypeStruct((2, 300, 8, d), jnp.bfloat16)
  k = jax.ShapeDtypeStruct((2, 300, 2, d), jnp.bfloat16)
  seg = jax.ShapeDtypeStruct((2, 300), jnp.int32) if segments else None
  loss = lambda q, k, v, s: flash_attention(
      q, k, v, causal=causal, segment_ids=s).astype(jnp.float32).sum()
  fn = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
  text = fn.trace(q, k, k, seg).lower(lowering_platforms=("cuda",)).as_text()
  assert text.count("triton") >= 3  # fwd, dk/dv, dq kernels


@pytest.mark.skipif(not ON_GPU, reason="needs a GPU")
@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 1e-2),
                                       (jnp.bfloat16, 3e-2)])
def test_gpu_compiled(dtype, tol):
  q, k, v, ct, seg = _inputs(4, 2, 300, 300, 8, 2, 64, dtype=dtype,
                             segments=True)
  f = functools.partial(flash_attention, causal=True, segment_ids=seg)
  out, vjp = jax.vjp(f, q, k, v)
  ct = ct.astype(dtype)
  grads = vjp(ct)
  ref_out, ref_grads = _reference_vjp(
      *[x.astype(jnp.float32) for x in (q, k, v, ct)], seg, True)
  # Smoke test of the compiled kernels; loose bound in case fp32 dots run
  # in TF32 on some jax versions.
  assert _rel(out.astype(jnp.float32), ref_out) < tol
  for g, rg in zip(grads, ref_grads):
    assert _rel(g.astype(jnp.float32), rg) < tol * 2



# ----------------------------------------------------------------------------
# Order ids (block_ids): key j visible to query i iff ids[j] <= ids[i].
# ----------------------------------------------------------------------------
def _var_ids(scales, batch):
  """Block ids of next-scale (VAR) token maps: scale s holds scales[s] tokens."""
  return np.repeat(np.repeat(np.arange(len(scales)), scales)[None], batch, 0)


def _order_ids(kind, b, t, rng):
  """[b, t] int32 order ids of each mask kind, built independently of
  jaxar.models.masks."""
  if kind == "causal":
    ids = np.repeat(np.arange(t)[None], b, 0)
  elif kind == "bidirectional":
    ids = np.zeros((b, t))
  elif kind == "var":  # VAR scales 1, 4, 9, 16 (t == 30)
    ids = _var_ids([1, 4, 9, 16], b)
  elif kind == "prefix":  # prefix lengths 5 and t - 3, then causal
    ids = np.repeat(np.arange(t)[None], b, 0)
    for row, p in enumerate([5, t - 3][:b]):
      ids[row, :p] = 0
  elif kind == "restarting":  # block ids that restart per packed document
    ids = np.concatenate([_var_ids([1, 4, 9], b), _var_ids([2, 2, 2, 3, 7], b)],
                         axis=1)[:, :t]
  else:  # "random": not monotone
    ids = rng.integers(0, 5, (b, t))
  return np.asarray(ids, np.int32)


def _order_mask_loop(ids, seg):
  """[b, t, t] bool spelled out: ids[j] <= ids[i] and same segment."""
  b, t = ids.shape
  mask = np.zeros((b, t, t), bool)
  for r in range(b):
    for i in range(t):
      for j in range(t):
        mask[r, i, j] = (ids[r, j] <= ids[r, i]
                         and (seg is None or seg[r, i] == seg[r, j]))
  return mask


def _masked_reference_vjp(q, k, v, ct, mask):
  """Output and (dq, dk, dv) of sum(out * ct) in float64 for a dense mask."""
  with _x64():
    args = [jnp.asarray(np.asarray(x, np.float64)) for x in (q, k, v, ct)]

    def run(q, k, v, ct, mask):
      f = lambda q, k, v: masked_attention_reference(q, k, v, mask)
      out, vjp = jax.vjp(f, q, k, v)
      return out, vjp(ct)

    out, grads = _run(run, *args, jnp.asarray(mask))
    return np.asarray(out), [np.asarray(g) for g in grads]


def _check_block_ids_case(kind, b, t, h, kh, d, segments, block_q, block_k,
                          backend="triton"):
  """Kernel forward + gradients with block_ids vs the float64 dense reference."""
  q, k, v, ct, seg = _inputs(5, b, t, t, h, kh, d, segments=segments)
  if kind == "restarting":  # documents of length 14 and the rest
    seg = jnp.asarray(np.repeat((np.arange(t) >= 14)[None], b, 0).astype(
        np.int32))
  ids = _order_ids(kind, b, t, np.random.default_rng(1))
  f = functools.partial(flash_attention, segment_ids=seg,
                        block_ids=jnp.asarray(ids), block_q=block_q,
                        block_k=block_k, interpret=True, backend=backend)

  def run(q, k, v, ct):
    out, vjp = jax.vjp(f, q, k, v)
    return out, vjp(ct)

  out, grads = _run(run, q, k, v, ct)
  mask = _order_mask_loop(ids, None if seg is None else np.asarray(seg))
  ref_out, ref_grads = _masked_reference_vjp(q, k, v, ct, mask)
  _assert_matches_reference(out, grads, ref_out, ref_grads, q, k, v)


# (kind, batch, T, heads, kv_heads, head_dim, segments, block_q, block_k)
BLOCK_IDS_CASES = [
    # causal through ids, odd length, GQA 4/2, segments
    pytest.param("causal", 2, 37, 4, 2, 16, True, 16, 16, id="causal-ids"),
    # all-equal ids: bidirectional, MQA, segments
    pytest.param("bidirectional", 2, 24, 4, 1, 16, True, 16, 16,
                 id="bidirectional"),
    # VAR scales 1, 4, 9, 16: uneven blocks across tile edges, GQA 4/2,
    # segments, block_q != block_k (backward chunk 16 < key tile 32)
    pytest.param("var", 2, 30, 4, 2, 16, True, 32, 16, id="var-scales"),
    # prefix-LM, prefixes 5 and 37 of 40, GQA 4/2
    pytest.param("prefix", 2, 40, 4, 2, 16, False, 32, 16, id="prefix"),
    # ids restarting per packed document (not monotone) + segments
    pytest.param("restarting", 1, 30, 2, 2, 16, False, 16, 16,
                 id="restarting-per-document"),
    # random (non-monotone) ids, default blocks
    pytest.param("random", 1, 45, 2, 1, 16, False, None, None,
                 id="random-default-blocks"),
]


@pytest.mark.parametrize("kind,b,t,h,kh,d,segments,block_q,block_k",
                         BLOCK_IDS_CASES)
def test_block_ids_forward_and_gradients(kind, b, t, h, kh, d, segments,
                                         block_q, block_k):
  _check_block_ids_case(kind, b, t, h, kh, d, segments, block_q, block_k)


def test_block_ids_arange_equals_causal():
  q, k, v, _, seg = _inputs(6, 2, 37, 37, 4, 2, 16, segments=True)
  ids = jnp.broadcast_to(jnp.arange(37), (2, 37))
  kw = dict(segment_ids=seg, block_q=16, block_k=16, interpret=True)
  by_ids = _run(lambda q, k, v: flash_attention(q, k, v, block_ids=ids, **kw),
                q, k, v)
  causal = _run(lambda q, k, v: flash_attention(q, k, v, causal=True, **kw),
                q, k, v)
  np.testing.assert_allclose(np.asarray(by_ids), np.asarray(causal),
                             rtol=1e-6, atol=1e-6)


def _live_pairs(ids, seg, rows, cols, r, c, rows_are_queries):
  """(any visible pair, any order-hidden pair) of row block r x col block c."""
  row_range = range(r * rows, (r + 1) * rows)
  col_range = range(c * cols, (c + 1) * cols)
  qs, ks = (row_range, col_range) if rows_are_queries else (col_range,
                                                            row_range)
  same = lambda i, j: seg is None or seg[i] == seg[j]
  visible = any(ids[j] <= ids[i] and same(i, j) for i in qs for j in ks)
  hidden = any(ids[j] > ids[i] and same(i, j) for i in qs for j in ks)
  return visible, hidden


@pytest.mark.parametrize("kind,segments", [("var", False), ("prefix", True),
                                           ("random", True),
                                           ("restarting", False)])
@pytest.mark.parametrize("rows_are_queries", [True, False])
def test_order_bounds_skip_only_masked_blocks(kind, segments, rows_are_queries):
  """Skipped blocks hold no visible pair; unmasked loops no hidden pair."""
  from pallas_kernels.flash_attention import _order_bounds  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(3)
  ids = _order_ids(kind, 2, 30, rng)
  ids = np.pad(ids, ((0, 0), (0, 2)), mode="edge")          # 32 = 4 x 8
  seg = (np.sort(rng.integers(0, 3, (2, 32)), axis=1) if segments else None)
  rows, cols = 16, 8
  bounds = np.asarray(_order_bounds(
      jnp.asarray(ids), None if seg is None else jnp.asarray(seg, jnp.int32),
      rows, cols, rows_are_queries=rows_are_queries))
  assert bounds.shape == (2, 32 // rows, 4)
  for b in range(2):
    for r in range(32 // rows):
      lo, mid, hi, _ = bounds[b, r]
      assert 0 <= lo <= mid <= hi <= 32 // cols
      for c in range(32 // cols):
        visible, hidden = _live_pairs(ids[b], None if seg is None else seg[b],
                                      rows, cols, r, c, rows_are_queries)
        if not lo <= c < hi:
          assert not visible, (b, r, c)
        unmasked = (lo <= c < mid) if rows_are_queries else (mid <= c < hi)
        if unmasked:
          assert not hidden, (b, r, c)


def test_order_bounds_visit_only_live_blocks():
  """For non-decreasing ids the loops visit exactly the (query tile, key
  block) pairs holding a visible pair: ids = arange gives the causal
  schedule, VAR scales (1, 4, ..., 256 tokens) at T=1024 no more than needed."""
  from pallas_kernels.flash_attention import _order_bounds  # pylint: disable=g-import-not-at-top
  scales = [n * n for n in (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)]
  var = _var_ids(scales + [1024 - sum(scales)], 1)[0]
  for ids in (np.arange(1024), var):
    bounds = np.asarray(_order_bounds(jnp.asarray(ids[None], jnp.int32), None,
                                      128, 64, rows_are_queries=True))[0]
    # a key block is live for a query tile iff its first id <= the tile's last
    live = [sum(ids[c * 64] <= ids[r * 128 + 127] for c in range(16))
            for r in range(8)]
    np.testing.assert_array_equal(bounds[:, 2] - bounds[:, 0], live)
  causal = np.asarray(_order_bounds(jnp.arange(1024)[None], None, 128, 64,
                                    rows_are_queries=True))[0]
  np.testing.assert_array_equal(causal[:, 2], 2 * np.arange(1, 9))
  np.testing.assert_array_equal(causal[:, 1], 2 * np.arange(8))


@pytest.mark.skipif(not triton_lowering_available(), reason=TRITON_SKIP_REASON)
@pytest.mark.parametrize("d", [64, 128])
def test_block_ids_triton_lowering(d):
  """Fwd + bwd with block ids (and segments) lower through Triton at a real
  model shape."""
  q = jax.ShapeDtypeStruct((2, 1024, 16, d), jnp.bfloat16)
  k = jax.ShapeDtypeStruct((2, 1024, 4, d), jnp.bfloat16)
  ids = jax.ShapeDtypeStruct((2, 1024), jnp.int32)
  loss = lambda q, k, v, s, i: flash_attention(
      q, k, v, segment_ids=s, block_ids=i).astype(jnp.float32).sum()
  fn = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
  text = fn.trace(q, k, k, ids, ids).lower(
      lowering_platforms=("cuda",)).as_text()
  assert text.count("triton") >= 3  # fwd, dk/dv, dq kernels


def test_reference_block_ids_matches_loop_mask():
  q, k, v, _, seg = _inputs(8, 2, 30, 30, 4, 2, 8, segments=True)
  ids = _order_ids("var", 2, 30, None)
  ref = _run(lambda q, k, v: flash_attention_reference(
      q, k, v, segment_ids=seg, block_ids=jnp.asarray(ids)), q, k, v)
  mask = jnp.asarray(_order_mask_loop(ids, np.asarray(seg)))
  want = _run(masked_attention_reference, q, k, v, mask)
  np.testing.assert_allclose(np.asarray(ref), np.asarray(want), rtol=1e-6,
                             atol=1e-6)
