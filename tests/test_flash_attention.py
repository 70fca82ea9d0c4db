"""pallas_kernels.flash_attention vs a float64 jnp reference (CPU interpret)."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.flash_attention import (flash_attention,
                                            flash_attention_reference)

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
  assert out.shape == q.shape and out.dtype == q.dtype
  assert _rel(out, ref_out) < 1e-4
  for name, g, rg, x in zip("qkv", grads, ref_grads, (q, k, v)):
    assert g.shape == x.shape and g.dtype == x.dtype, name
    err = _rel(g, rg)
    assert err < 1e-4, f"d{name}: rel err {err}"


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
])
def test_bad_inputs(kwargs, match):
  q = jnp.zeros(kwargs["q"], jnp.float32)
  k = jnp.zeros(kwargs["k"], kwargs.get("kdtype", jnp.float32))
  seg = (jnp.zeros(kwargs["seg"], jnp.int32) if "seg" in kwargs else None)
  with pytest.raises(ValueError, match=match):
    flash_attention(q, k, k, segment_ids=seg,
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

