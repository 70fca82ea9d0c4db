"""Decode throughput: jaxar.generate vs transformers (dynamic and static caches) vs the memory-bandwidth floor.

    python benchmarks/decode.py --model runs/smollm2-135m     # a real checkpoint (HF directory), the CPU arena
    python benchmarks/decode.py                               # GPU: 1.1B Llama shape (random weights)
    python benchmarks/decode.py --small                       # CPU-sized random model

`runs/smollm2-135m` is written by `make smollm2` (benchmarks/prepare_smollm2.py).
Both run the same weights (with random weights jaxar writes a Hugging Face
directory that transformers loads). Greedy, no EOS, so every row generates
exactly the budget; times include prefill, medians after a warm-up run.

Tables:
1. per batch size: jaxar, transformers with its dynamic and its static
   cache, the bandwidth floor = (weight bytes + live KV bytes read per step) /
   measured read bandwidth, and whether the greedy tokens agree;
2. the cost against the cache buffer: the same tokens (prompt + new) with
   `cache_len` 128 .. 4096: decode cost should follow the tokens, not the buffer.
Full JSON with --out.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import jaxar  # noqa: E402
from jaxar.decode.generate import generate, pad_prompts  # noqa: E402
from jaxar.models.transformer import decode_params  # noqa: E402


def read_bandwidth_gbs() -> float:
    """Large-array read rate (bytes read / s): a jnp sum over 512 MB (256 MB off CPU: 1 GB)."""
    n = (1 << 30) if jax.default_backend() != "cpu" else (512 << 20)
    x = jnp.ones((n // 4,), jnp.float32)
    f = jax.jit(lambda a: jnp.sum(a))
    f(x).block_until_ready()
    times = []
    for _ in range(10):
        t = time.perf_counter()
        f(x).block_until_ready()
        times.append(time.perf_counter() - t)
    return n / min(times) / 1e9


def model_config(small: bool):
    if small:
        return jaxar.ModelConfig.llama(vocab_size=2048, d_model=256, n_layers=4, n_heads=8, n_kv_heads=2,
                                       mlp_dim=704, max_seq_len=512, dtype="float32", param_dtype="float32")
    return jaxar.ModelConfig.llama(vocab_size=32000, d_model=2048, n_layers=22, n_heads=32, n_kv_heads=4,
                                   mlp_dim=5632, max_seq_len=2048, dtype="bfloat16", param_dtype="bfloat16")


def prompts_for(config, batch, prompt_len):
    rng = np.random.default_rng(0)
    return rng.integers(0, config.vocab_size, (batch, prompt_len)).astype(np.int32)


def median_time(run, repeats):
    run()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        run()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def time_jaxar(params, config, ids, new_tokens, repeats, cache_len=None):
    toks, lens = pad_prompts([list(r) for r in ids], bucket=False)

    def run():
        out = generate(params, toks, lens, config=config, max_new_tokens=new_tokens, eos_ids=[], cache_len=cache_len)
        return np.asarray(out.tokens)

    return median_time(run, repeats), run()


def time_transformers(model, ids, new_tokens, repeats, cache):
    import torch

    dev = next(model.parameters()).device
    ids = torch.tensor(ids, device=dev)
    kw = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, eos_token_id=None,
              pad_token_id=0, attention_mask=torch.ones_like(ids))
    if cache == "static":
        kw["cache_implementation"] = "static"

    def run():
        with torch.no_grad():
            out = model.generate(ids, **kw)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        return out[:, ids.shape[1]:].cpu().numpy()

    return median_time(run, repeats), run()


def load_transformers(model_dir, dtype_name):
    import torch
    import transformers

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if dtype_name == "bfloat16" else torch.float32
    return transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(dev).eval()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", help="Hugging Face model directory (e.g. runs/smollm2-135m); default random weights")
    ap.add_argument("--small", action="store_true", help="CPU-sized random model")
    ap.add_argument("--batches", default=None, help="comma-separated batch sizes")
    ap.add_argument("--prompt-len", type=int, default=None)
    ap.add_argument("--new-tokens", type=int, default=None)
    ap.add_argument("--cache-lens", default="128,256,1024,4096", help="buffer-length table ('' to skip)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-transformers", action="store_true")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    on_cpu = jax.default_backend() == "cpu"
    small = args.small or (on_cpu and not args.model)
    batches = [int(b) for b in (args.batches or ("1,8" if on_cpu else "1,8,32,128")).split(",")]
    prompt_len = args.prompt_len or (32 if on_cpu else 128)
    new_tokens = args.new_tokens or (64 if on_cpu else 256)
    tmp = tempfile.TemporaryDirectory()
    if args.model:
        config, params = jaxar.from_pretrained(args.model)
        model_dir = args.model
    else:
        config = model_config(small)
        params = jaxar.init_params(config, 0)
        model_dir = os.path.join(tmp.name, "model")
        jaxar.save_pretrained(config, params, model_dir)
    weight_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(params))
    params = decode_params(params, config)  # once, as sample.py does
    bw = read_bandwidth_gbs()
    hf_model = None if args.no_transformers else load_transformers(model_dir, config.dtype)
    kv_item = jnp.dtype(config.dtype).itemsize
    kv_per_token = 2 * config.n_layers * config.num_kv_heads * config.dim_per_head * kv_item

    results = []
    for batch in batches:
        ids = prompts_for(config, batch, prompt_len)
        t_jax, toks_jax = time_jaxar(params, config, ids, new_tokens, args.repeats)
        row = {"batch": batch, "jaxar_tok_s": batch * new_tokens / t_jax}
        for cache in ("dynamic", "static"):
            if hf_model is None:
                continue
            try:
                t_hf, toks_hf = time_transformers(hf_model, ids, new_tokens, args.repeats, cache)
                row[f"hf_{cache}_tok_s"] = batch * new_tokens / t_hf
                row[f"same_tokens_as_hf_{cache}"] = float(np.mean(toks_hf == toks_jax))
            except Exception as e:  # noqa: BLE001 - report and go on
                row[f"hf_{cache}_error"] = repr(e)[:200]
        hf = [row[k] for k in ("hf_dynamic_tok_s", "hf_static_tok_s") if k in row]
        row["hf_best_tok_s"] = max(hf) if hf else None
        # Bytes read per decode step: all weights + the mean live KV of every row.
        mean_ctx = prompt_len + new_tokens / 2
        step_floor_s = (weight_bytes + batch * mean_ctx * kv_per_token) / (bw * 1e9)
        row["floor_tok_s"] = batch / step_floor_s
        row["jaxar_fraction_of_floor"] = row["jaxar_tok_s"] / row["floor_tok_s"]
        results.append(row)
        print(json.dumps(row), flush=True)

    buffer_rows = []
    cache_lens = [int(c) for c in args.cache_lens.split(",") if c]
    if cache_lens:
        ids = prompts_for(config, 1, prompt_len)
        for cl in cache_lens:
            if cl < prompt_len + new_tokens:
                continue
            t, _ = time_jaxar(params, config, ids, new_tokens, args.repeats, cache_len=cl)
            buffer_rows.append({"cache_len": cl, "jaxar_tok_s": new_tokens / t})
            print(json.dumps(buffer_rows[-1]), flush=True)

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip()
    meta = {"device": jax.devices()[0].device_kind, "backend": jax.default_backend(), "jax": jax.__version__,
            "model": args.model or ("small random" if small else "1.1B random"), "prompt_len": prompt_len,
            "new_tokens": new_tokens, "read_bandwidth_gbs": bw, "weight_bytes": weight_bytes,
            "date": time.strftime("%Y-%m-%d"), "commit": commit}
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"meta": meta, "results": results, "buffer": buffer_rows}, f, indent=2)
    print(f"\nmodel={meta['model']} device={meta['device']} jax={meta['jax']} commit={commit} prompt={prompt_len} "
          f"new={new_tokens} read_bw={bw:.1f} GB/s weights={weight_bytes / 1e6:.1f} MB")
    fmt = lambda v, spec=".1f": "n/a" if v is None else format(v, spec)  # noqa: E731
    print(f"{'batch':>5} {'jaxar tok/s':>11} {'HF dyn':>8} {'HF static':>9} {'jaxar/HF best':>13} "
          f"{'floor tok/s':>11} {'jaxar/floor':>11} {'same tokens':>11}")
    for r in results:
        best = r["hf_best_tok_s"]
        same = min([r[k] for k in r if k.startswith("same_tokens")], default=None)
        print(f"{r['batch']:>5} {r['jaxar_tok_s']:>11.1f} {fmt(r.get('hf_dynamic_tok_s')):>8} "
              f"{fmt(r.get('hf_static_tok_s')):>9} {fmt(best and r['jaxar_tok_s'] / best, '.2f'):>13} "
              f"{r['floor_tok_s']:>11.1f} {r['jaxar_fraction_of_floor']:>11.2f} {fmt(same, '.3f'):>11}")
    if buffer_rows:
        ref = next((r["jaxar_tok_s"] for r in buffer_rows if r["cache_len"] == 256), buffer_rows[0]["jaxar_tok_s"])
        print(f"\nsame {prompt_len}+{new_tokens} tokens, batch 1, by cache buffer length")
        print(f"{'cache_len':>9} {'jaxar tok/s':>11} {'vs 256':>7}")
        for r in buffer_rows:
            print(f"{r['cache_len']:>9} {r['jaxar_tok_s']:>11.1f} {r['jaxar_tok_s'] / ref:>7.2f}")


if __name__ == "__main__":
    main()
