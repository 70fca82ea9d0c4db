"""Attention kernel benchmark: prefill (fwd, fwd+bwd) and decode.

GPU (default when one is present):
  prefill  B8 S2048 H16 D128, causal, bf16: TFLOP/s of the forward and of
           forward+backward for XLA, cuDNN, tokamax (if it imports) and
           pallas_kernels.flash_attention;
  decode   B32 Hq32 Hkv8 S4096 D128, T=1 and T=5: GB/s of KV-cache read for an
           XLA einsum implementation and pallas_kernels.decode_attention.

Every implementation is first checked against the float32 reference on fresh
inputs (different seed, ragged lengths for decode); failures are reported and
the timing is skipped. Timings: warm-up, then the median over samples of
`--inner` back-to-back calls each, synchronised with block_until_ready.

  python benchmarks/attention.py [--small] [--tune] [--out results.json]

Decode also times a device-to-device copy of the cache (read + write bytes,
as BENCHMARKING.md counts it): the goal is decode >= 80% of that bandwidth.
`--tune` adds the Pallas kernels at every block size / warp / stage setting
of a small grid (prefill) and every block_k / num_splits (decode), one row
each, so one GPU run picks the defaults.

`--small` (the default without a GPU) runs tiny sizes on CPU with the Pallas
kernels in interpret mode, so the script itself can be exercised anywhere.
"""
from __future__ import annotations

import argparse
import functools
import json
import math
import os
import statistics
import sys
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from pallas_kernels.decode_attention import (  # noqa: E402
    decode_attention, decode_attention_reference)
from pallas_kernels.flash_attention import (  # noqa: E402
    flash_attention, flash_attention_reference)


def _has_gpu() -> bool:
  try:
    return bool(jax.devices("gpu"))
  except RuntimeError:
    return False


def _rel(a, b) -> float:
  a = np.asarray(jnp.asarray(a, jnp.float32), np.float64)
  b = np.asarray(jnp.asarray(b, jnp.float32), np.float64)
  return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


def _time(fn, args, *, warmup: int, samples: int, inner: int) -> float:
  """Median seconds per call."""
  out = None
  for _ in range(warmup):
    out = fn(*args)
  jax.block_until_ready(out)
  times = []
  for _ in range(samples):
    t0 = time.perf_counter()
    for _ in range(inner):
      out = fn(*args)
    jax.block_until_ready(out)
    times.append((time.perf_counter() - t0) / inner)
  return statistics.median(times)


def _skipped(rec, e):
  """Marks a record skipped with the exception's first line (BENCH_DEBUG=1: traceback)."""
  msg = str(e).strip().splitlines()[0][:120] if str(e) else ""
  rec["status"] = f"skipped: {type(e).__name__}: {msg}"
  if os.environ.get("BENCH_DEBUG"):
    traceback.print_exc()


def _normal(key, shape, dtype):
  return jax.random.normal(key, shape, jnp.float32).astype(dtype)


# ----------------------------------------------------------------------------
# Prefill.
# ----------------------------------------------------------------------------
PREFILL_TUNE = [dict(block_q=bq, block_k=bk, num_warps=w, num_stages=st)
                for bq in (64, 128) for bk in (32, 64, 128)
                for w in (4, 8) for st in (2, 3)]
DECODE_TUNE = [dict(block_k=bk, num_splits=ns)
               for bk in (64, 128, 256) for ns in (1, 4, 16, 64)]


def _tag(kw) -> str:
  short = dict(block_q="bq", block_k="bk", num_warps="w", num_stages="s",
               num_splits="sp")
  return " ".join(f"{short[k]}{v}" for k, v in kw.items())


def _prefill_impls(interpret: bool, tune: bool = False):
  impls = {}

  def xla(q, k, v):
    return jax.nn.dot_product_attention(q, k, v, is_causal=True,
                                        implementation="xla")
  impls["xla"] = xla

  def cudnn(q, k, v):
    return jax.nn.dot_product_attention(q, k, v, is_causal=True,
                                        implementation="cudnn")
  impls["cudnn"] = cudnn

  try:
    import tokamax  # pylint: disable=g-import-not-at-top

    def tok(q, k, v):
      return tokamax.dot_product_attention(q, k, v, is_causal=True)
    impls["tokamax"] = tok
  except Exception as e:  # pylint: disable=broad-except
    impls["tokamax"] = f"skipped: import tokamax failed ({type(e).__name__})"

  impls["pallas_flash"] = functools.partial(flash_attention, causal=True,
                                            interpret=interpret)
  for kw in PREFILL_TUNE if tune else ():
    impls[f"pallas {_tag(kw)}"] = functools.partial(
        flash_attention, causal=True, interpret=interpret, **kw)
  return impls


def bench_prefill(shape, dtype, *, interpret, timing, records, tune=False):
  b, s, h, d = shape
  fwd_flops = 4.0 * b * h * s * s * d / 2          # causal: half the matrix
  total_flops = 3.5 * fwd_flops                    # bwd = 2.5x fwd
  case = f"prefill B{b} S{s} H{h} D{d} causal {jnp.dtype(dtype).name}"

  # Fresh inputs for the check, different seed from the timing inputs.
  kc = jax.random.split(jax.random.PRNGKey(1), 4)
  qc, kc_, vc, ctc = (_normal(kk, shape, dtype) for kk in kc)
  @jax.jit
  def ref_fn(q, k, v, ct):
    f32 = lambda x: x.astype(jnp.float32)
    out, vjp = jax.vjp(
        functools.partial(flash_attention_reference, causal=True),
        f32(q), f32(k), f32(v))
    return out, vjp(f32(ct))

  ref_out, ref_grads = ref_fn(qc, kc_, vc, ctc)

  kt = jax.random.split(jax.random.PRNGKey(0), 4)
  qt, kt_, vt, ctt = (_normal(kk, shape, dtype) for kk in kt)

  for name, fn in _prefill_impls(interpret, tune).items():
    for mode in ("fwd", "fwd+bwd"):
      rec = dict(case=case, impl=name, mode=mode, metric="TFLOP/s")
      records.append(rec)
      if isinstance(fn, str):
        rec["status"] = fn
        continue
      try:
        if mode == "fwd":
          run = jax.jit(fn)
          args = (qt, kt_, vt)
          out = run(qc, kc_, vc)
          err = _rel(out, ref_out)
        else:
          def fwd_bwd(q, k, v, ct, fn=fn):
            out, vjp = jax.vjp(fn, q, k, v)
            return out, vjp(ct)
          run = jax.jit(fwd_bwd)
          args = (qt, kt_, vt, ctt)
          out, grads = run(qc, kc_, vc, ctc)
          err = max([_rel(out, ref_out)]
                    + [_rel(g, rg) for g, rg in zip(grads, ref_grads)])
        rec["max_rel_err"] = err
        if not math.isfinite(err) or err > 5e-2:
          rec["status"] = f"FAILED check (rel err {err:.3g})"
          continue
        t = _time(run, args, **timing)
        flops = fwd_flops if mode == "fwd" else total_flops
        rec.update(time_ms=t * 1e3, value=flops / t / 1e12, status="ok")
      except Exception as e:  # pylint: disable=broad-except
        _skipped(rec, e)


# ----------------------------------------------------------------------------
# Decode.
# ----------------------------------------------------------------------------
def xla_decode(q, k, v, lengths):
  """Plain XLA decode attention over the whole static cache (einsum)."""
  b, t, h, d = q.shape
  max_len, kh = k.shape[1], k.shape[2]
  g = h // kh
  qg = q.reshape(b, t, kh, g, d)
  s = jnp.einsum("btkgd,bskd->bkgts", qg, k,
                 preferred_element_type=jnp.float32) / math.sqrt(d)
  q_pos = lengths[:, None] - t + jnp.arange(t)[None, :]
  mask = jnp.arange(max_len)[None, None, :] <= q_pos[:, :, None]
  s = jnp.where(mask[:, None, None], s, -jnp.inf)
  p = jax.nn.softmax(s, axis=-1).astype(v.dtype)
  o = jnp.einsum("bkgts,bskd->btkgd", p, v, preferred_element_type=jnp.float32)
  return o.reshape(b, t, h, d).astype(q.dtype)


def bench_decode(b, hq, hkv, s, d, t, dtype, *, interpret, timing, records,
                 tune=False):
  case = f"decode B{b} Hq{hq} Hkv{hkv} S{s} D{d} T{t} {jnp.dtype(dtype).name}"
  itemsize = jnp.dtype(dtype).itemsize

  kc = jax.random.split(jax.random.PRNGKey(11), 3)
  qc = _normal(kc[0], (b, t, hq, d), dtype)
  kcc = _normal(kc[1], (b, s, hkv, d), dtype)
  vcc = _normal(kc[2], (b, s, hkv, d), dtype)
  lc = jnp.asarray(np.random.default_rng(0).integers(t, s + 1, b), jnp.int32)
  lc = lc.at[0].set(t).at[-1].set(s)   # an empty prefix and a full row
  ref = jax.jit(decode_attention_reference)(
      qc.astype(jnp.float32), kcc.astype(jnp.float32),
      vcc.astype(jnp.float32), lc)

  kt = jax.random.split(jax.random.PRNGKey(10), 3)
  qt = _normal(kt[0], (b, t, hq, d), dtype)
  kt_ = _normal(kt[1], (b, s, hkv, d), dtype)
  vt = _normal(kt[2], (b, s, hkv, d), dtype)
  lt = jnp.full((b,), s, jnp.int32)     # every row reads the full cache
  cache_bytes = 2.0 * b * s * hkv * d * itemsize

  impls = {
      "xla_einsum": xla_decode,
      "pallas_decode": functools.partial(decode_attention,
                                         interpret=interpret),
  }
  for kw in DECODE_TUNE if tune else ():
    impls[f"pallas {_tag(kw)}"] = functools.partial(
        decode_attention, interpret=interpret, **kw)
  if t == 1:  # the ceiling: copy the cache (read + write, BENCHMARKING.md)
    rec = dict(case=case, impl="copy (r+w)", mode="copy", metric="GB/s")
    records.append(rec)
    copy = jax.jit(lambda k, v: (k * 1, v * 1))
    tt = _time(copy, (kt_, vt), **timing)
    rec.update(time_ms=tt * 1e3, value=2 * cache_bytes / tt / 1e9, status="ok")
  for name, fn in impls.items():
    rec = dict(case=case, impl=name, mode="decode", metric="GB/s")
    records.append(rec)
    try:
      run = jax.jit(fn)
      err = _rel(run(qc, kcc, vcc, lc), ref)
      rec["max_rel_err"] = err
      if not math.isfinite(err) or err > 5e-2:
        rec["status"] = f"FAILED check (rel err {err:.3g})"
        continue
      tt = _time(run, (qt, kt_, vt, lt), **timing)
      rec.update(time_ms=tt * 1e3, value=cache_bytes / tt / 1e9, status="ok")
    except Exception as e:  # pylint: disable=broad-except
      _skipped(rec, e)


# ----------------------------------------------------------------------------
def _print_table(records):
  header = (f"{'case':<44} {'impl':<22} {'mode':<8} {'ms':>9} "
            f"{'value':>10} {'unit':<8} {'rel_err':>9}  status")
  print("\n" + header)
  print("-" * len(header))
  for r in records:
    ms = f"{r['time_ms']:.3f}" if "time_ms" in r else "-"
    val = f"{r['value']:.4g}" if "value" in r else "-"
    err = f"{r['max_rel_err']:.2e}" if "max_rel_err" in r else "-"
    print(f"{r['case']:<44} {r['impl']:<22} {r['mode']:<8} {ms:>9} {val:>10} "
          f"{r['metric']:<8} {err:>9}  {r['status']}")


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--small", action="store_true",
                      help="tiny sizes, Pallas interpret mode (default "
                           "without a GPU)")
  parser.add_argument("--out", help="write the results as JSON here")
  parser.add_argument("--samples", type=int, default=None)
  parser.add_argument("--inner", type=int, default=None)
  parser.add_argument("--warmup", type=int, default=None)
  parser.add_argument("--tune", action="store_true",
                      help="also time the Pallas kernels over a grid of "
                           "block sizes / warps / stages / splits")
  args = parser.parse_args(argv)

  gpu = _has_gpu()
  small = args.small or not gpu
  interpret = not gpu
  timing = dict(warmup=args.warmup if args.warmup is not None else
                (1 if small else 5),
                samples=args.samples or (3 if small else 30),
                inner=args.inner or (1 if small else 10))
  dtype = jnp.bfloat16
  if small:
    prefill_shape = (1, 64, 2, 32)
    decode_cfg = (2, 4, 2, 96, 32)      # B, Hq, Hkv, S, D
  else:
    prefill_shape = (8, 2048, 16, 128)
    decode_cfg = (32, 32, 8, 4096, 128)

  print(f"jax {jax.__version__}, backend {jax.default_backend()}, device "
        f"{jax.devices()[0].device_kind}, small={small}, "
        f"interpret={interpret}", flush=True)
  records = []
  bench_prefill(prefill_shape, dtype, interpret=interpret, timing=timing,
                records=records, tune=args.tune)
  for t in (1, 5):
    bench_decode(*decode_cfg, t, dtype, interpret=interpret, timing=timing,
                 records=records, tune=args.tune)
  _print_table(records)
  if args.out:
    meta = dict(jax=jax.__version__, backend=jax.default_backend(),
                device=jax.devices()[0].device_kind, small=small,
                interpret=interpret, timing=timing)
    with open(args.out, "w") as f:
      json.dump(dict(meta=meta, results=records), f, indent=2)
    print(f"\nwrote {args.out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
