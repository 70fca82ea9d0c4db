"""Training throughput: tokens/s and MFU of jaxar's train step, next to a measured matmul rate.

GPU / TPU (default): configs/llama-1b.yaml (~1.1B Llama, bf16 compute, fp32
master weights, full remat) on every device (fsdp over all of them), synthetic
token batches (the data pipeline is not timed). Reported:

  step_s        median seconds per optimizer step (after compile and warm-up)
  tokens_per_s  global batch tokens / step_s
  model_tflops  6 * N(matmul params) + attention FLOPs per token * tokens/s / devices
  mfu           model_tflops / peak dense bf16 of the device kind (table in jaxar.train.trainer)
  matmul_tflops a large bf16 matmul measured on the same device: the reachable ceiling
  of_matmul     model_tflops / matmul_tflops

  python benchmarks/train_throughput.py [--batch-size 32 --seq-len 2048 --grad-accum 2]
      [--config configs/llama-1b.yaml] [key=value ...] [--out train_throughput.json]
  python benchmarks/train_throughput.py --small      # tiny model on CPU: exercises the script anywhere
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from jaxar.train import sharding as shd  # noqa: E402
from jaxar.train.config import load_run_config  # noqa: E402
from jaxar.train.trainer import build_step_functions, flops_per_token, peak_flops  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = ["model.d_model=128", "model.n_layers=4", "model.n_heads=4", "model.n_kv_heads=2", "model.mlp_dim=384",
         "model.vocab_size=512", "model.max_seq_len=128", "model.dtype=float32", "model.remat=none"]


def synthetic_batch(batch: int, seq_len: int, vocab: int, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, vocab, (batch, seq_len + 1), dtype=np.int32)
    return {"tokens": tokens[:, :-1], "targets": tokens[:, 1:],
            "segment_ids": np.ones((batch, seq_len), np.int32),
            "positions": np.broadcast_to(np.arange(seq_len, dtype=np.int32), (batch, seq_len)).copy(),
            "loss_mask": np.ones((batch, seq_len), np.int32)}


def matmul_tflops(n: int, dtype, repeats: int = 10) -> float:
    """Measured TFLOP/s of an [n, n] x [n, n] matmul on the default device."""
    a = jax.random.normal(jax.random.PRNGKey(0), (n, n), dtype)
    b = jax.random.normal(jax.random.PRNGKey(1), (n, n), dtype)
    f = jax.jit(lambda x, y: x @ y)
    f(a, b).block_until_ready()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        f(a, b).block_until_ready()
        times.append(time.perf_counter() - t)
    return 2 * n ** 3 / statistics.median(times) / 1e12


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=os.path.join(ROOT, "configs", "llama-1b.yaml"))
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    parser.add_argument("--small", action="store_true", help="a tiny model on CPU (default without an accelerator)")
    parser.add_argument("--batch-size", type=int, help="global batch (default 32; 8 with --small)")
    parser.add_argument("--seq-len", type=int, help="default 2048; 128 with --small")
    parser.add_argument("--grad-accum", type=int, help="micro-batches per step (default 2; 1 with --small)")
    parser.add_argument("--steps", type=int, default=10, help="timed steps")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--out", default="train_throughput.json")
    args = parser.parse_args(argv)

    small = args.small or jax.default_backend() == "cpu"
    batch = args.batch_size or (8 if small else 32)
    seq_len = args.seq_len or (128 if small else 2048)
    accum = args.grad_accum or (1 if small else 2)
    overrides = (SMALL if small else []) + [
        "run_dir=unused", f"train.batch_size={batch}", f"train.seq_len={seq_len}", f"train.grad_accum={accum}",
        "mesh.data=1", "mesh.fsdp=-1", "mesh.tensor=1"] + list(args.overrides)
    run = load_run_config(args.config, overrides)
    model, train_cfg = run.model, run.train
    mesh = shd.make_mesh(run.mesh.as_dict())
    fns = build_step_functions(model, train_cfg, mesh)
    state = fns.init(jax.random.PRNGKey(0))
    local = synthetic_batch(batch // jax.process_count(), seq_len, model.vocab_size)
    device_batch = shd.global_batch(local, mesh)

    t = time.perf_counter()
    compiled = fns.train_step.lower(state, device_batch).compile()
    compile_s = time.perf_counter() - t
    for _ in range(args.warmup):
        state, metrics = compiled(state, device_batch)
    jax.block_until_ready(metrics)
    times = []
    for _ in range(args.steps):
        t = time.perf_counter()
        state, metrics = compiled(state, device_batch)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - t)
    step_s = statistics.median(times)
    loss = float(metrics["loss"])

    devices = mesh.devices.size
    tokens_per_s = batch * seq_len / step_s
    model_tflops = tokens_per_s * flops_per_token(model, seq_len) / devices / 1e12
    peak = peak_flops()
    mm_dtype = jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16
    mm = matmul_tflops(1024 if small else 8192, mm_dtype)
    result = {
        "device": jax.devices()[0].device_kind, "backend": jax.default_backend(), "devices": devices,
        "config": os.path.relpath(args.config, ROOT) + (" --small" if small else ""),
        "params": model.num_params(), "dtype": model.dtype, "param_dtype": model.param_dtype, "remat": model.remat,
        "batch_size": batch, "seq_len": seq_len, "grad_accum": accum, "compile_s": compile_s, "step_s": step_s,
        "tokens_per_s": tokens_per_s, "model_tflops_per_device": model_tflops,
        "peak_tflops_per_device": peak / 1e12 if peak else None,
        "mfu": model_tflops * 1e12 / peak if peak else None,
        "matmul_tflops": mm, "matmul_dtype": jnp.dtype(mm_dtype).name, "of_matmul": model_tflops / mm,
        "loss": loss, "jax": jax.__version__, "date": time.strftime("%Y-%m-%d"),
    }
    rows = [
        ("device", f"{result['device']} x{devices} ({result['backend']})"),
        ("model", f"{result['config']}: {result['params'] / 1e9:.3f}B params, {model.dtype} compute, "
                  f"{model.param_dtype} params, remat={model.remat}"),
        ("batch", f"{batch} x {seq_len} tokens, grad_accum {accum}"),
        ("compile", f"{compile_s:.1f} s"),
        ("step", f"{step_s * 1e3:.1f} ms (median of {args.steps})"),
        ("tokens/s", f"{tokens_per_s:,.0f}"),
        ("model TFLOP/s/dev", f"{model_tflops:.2f}"),
        ("MFU", f"{result['mfu']:.1%} of {result['peak_tflops_per_device']:.0f} TFLOP/s peak" if peak
         else "n/a (no peak for this device)"),
        (f"{result['matmul_dtype']} matmul", f"{mm:.2f} TFLOP/s measured ({result['of_matmul']:.1%} reached)"),
    ]
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
