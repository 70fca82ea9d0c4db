"""Decode throughput: jaxar.generate vs transformers (static cache) vs the memory-bandwidth floor.

    python benchmarks/decode.py                 # GPU: 1.1B Llama shape, prompt 128, 256 new, batch 1/8/32/128
    python benchmarks/decode.py --small         # CPU-sized model (default when no GPU is present)

Both run the same random weights (jaxar writes a Hugging Face directory that
transformers loads). Greedy, no EOS, so every row generates exactly the budget.
The floor is (weight bytes + KV bytes read per step) / measured copy bandwidth.
Prints a table last and writes JSON with --out.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import jaxar  # noqa: E402
from jaxar.decode.generate import generate, pad_prompts  # noqa: E402


def copy_bandwidth_gbs() -> float:
    """Device-to-device copy rate (read + write bytes / s)."""
    n = (256 << 20) if jax.default_backend() != "cpu" else (64 << 20)
    x = jnp.ones((n // 4,), jnp.float32)
    f = jax.jit(lambda a: a + 1.0)
    f(x).block_until_ready()
    times = []
    for _ in range(10):
        t = time.perf_counter()
        f(x).block_until_ready()
        times.append(time.perf_counter() - t)
    return 2 * n / statistics.median(times) / 1e9


def model_config(small: bool):
    if small:
        return jaxar.ModelConfig.llama(vocab_size=2048, d_model=256, n_layers=4, n_heads=8, n_kv_heads=2,
                                       mlp_dim=704, max_seq_len=512, dtype="float32", param_dtype="float32")
    return jaxar.ModelConfig.llama(vocab_size=32000, d_model=2048, n_layers=22, n_heads=32, n_kv_heads=4,
                                   mlp_dim=5632, max_seq_len=2048, dtype="bfloat16", param_dtype="bfloat16")


def time_jaxar(params, config, batch, prompt_len, new_tokens, repeats):
    rng = np.random.default_rng(0)
    prompts = [list(rng.integers(0, config.vocab_size, prompt_len)) for _ in range(batch)]
    toks, lens = pad_prompts(prompts, bucket=False)
    run = lambda: generate(params, toks, lens, config=config, max_new_tokens=new_tokens, eos_ids=[])  # noqa: E731
    out = run()
    out.tokens.block_until_ready()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        run().tokens.block_until_ready()
        times.append(time.perf_counter() - t)
    return statistics.median(times), np.asarray(out.tokens)


def time_transformers(model_dir, config, batch, prompt_len, new_tokens, repeats, compile_=False):
    import torch
    import transformers

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if config.dtype == "bfloat16" else torch.float32
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(dev).eval()
    if compile_:
        model.forward = torch.compile(model.forward, mode="reduce-overhead", fullgraph=True)
    rng = np.random.default_rng(0)
    ids = torch.tensor(rng.integers(0, config.vocab_size, (batch, prompt_len)), device=dev)
    kw = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, eos_token_id=None,
              pad_token_id=0, cache_implementation="static", attention_mask=torch.ones_like(ids))
    with torch.no_grad():
        out = model.generate(ids, **kw)
        times = []
        for _ in range(repeats):
            if dev == "cuda":
                torch.cuda.synchronize()
            t = time.perf_counter()
            model.generate(ids, **kw)
            if dev == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t)
    return statistics.median(times), out[:, prompt_len:].cpu().numpy()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--small", action="store_true", help="CPU-sized model")
    ap.add_argument("--batches", default=None, help="comma-separated batch sizes")
    ap.add_argument("--prompt-len", type=int, default=None)
    ap.add_argument("--new-tokens", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--torch-compile", action="store_true")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    small = args.small or jax.default_backend() == "cpu"
    batches = [int(b) for b in (args.batches or ("1,8" if small else "1,8,32,128")).split(",")]
    prompt_len = args.prompt_len or (32 if small else 128)
    new_tokens = args.new_tokens or (32 if small else 256)
    config = model_config(small)
    params = jaxar.init_params(config, 0)
    weight_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(params))
    bw = copy_bandwidth_gbs()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = os.path.join(tmp, "model")
        jaxar.save_pretrained(config, params, model_dir)
        for batch in batches:
            t_jax, toks_jax = time_jaxar(params, config, batch, prompt_len, new_tokens, args.repeats)
            row = {"batch": batch, "jaxar_tok_s": batch * new_tokens / t_jax}
            try:
                t_hf, toks_hf = time_transformers(model_dir, config, batch, prompt_len, new_tokens, args.repeats)
                row["transformers_tok_s"] = batch * new_tokens / t_hf
                row["same_tokens_as_transformers"] = float(np.mean(toks_hf == toks_jax))
            except Exception as e:  # noqa: BLE001 - report and go on
                row["transformers_error"] = repr(e)[:200]
            if args.torch_compile:
                try:
                    t_c, _ = time_transformers(model_dir, config, batch, prompt_len, new_tokens, args.repeats, True)
                    row["transformers_compiled_tok_s"] = batch * new_tokens / t_c
                except Exception as e:  # noqa: BLE001
                    row["transformers_compiled_error"] = repr(e)[:200]
            # Bytes read per decode step: all weights + the mean KV cache length of every row.
            mean_ctx = prompt_len + new_tokens / 2
            kv_bytes = (2 * config.n_layers * batch * mean_ctx * config.num_kv_heads * config.dim_per_head *
                        jnp.dtype(config.dtype).itemsize)
            step_floor_s = (weight_bytes + kv_bytes) / (bw * 1e9 / 2)  # copy bw counts read + write
            row["floor_tok_s"] = batch / step_floor_s
            row["jaxar_fraction_of_floor"] = row["jaxar_tok_s"] / row["floor_tok_s"]
            results.append(row)
    meta = {"device": jax.devices()[0].device_kind, "backend": jax.default_backend(), "jax": jax.__version__,
            "small": small, "prompt_len": prompt_len, "new_tokens": new_tokens, "copy_bandwidth_gbs": bw,
            "weight_bytes": weight_bytes, "date": time.strftime("%Y-%m-%d")}
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"meta": meta, "results": results}, f, indent=2)
    print(f"\ndevice={meta['device']} jax={meta['jax']} prompt={prompt_len} new={new_tokens} "
          f"copy_bw={bw:.1f} GB/s weights={weight_bytes / 1e6:.1f} MB")
    print(f"{'batch':>5} {'jaxar tok/s':>12} {'HF static tok/s':>16} {'floor tok/s':>12} {'jaxar/floor':>11} "
          f"{'jaxar/HF':>9} {'same tokens':>11}")
    for r in results:
        hf = r.get("transformers_tok_s")
        print(f"{r['batch']:>5} {r['jaxar_tok_s']:>12.1f} {hf if hf is None else round(hf, 1)!s:>16} "
              f"{r['floor_tok_s']:>12.1f} {r['jaxar_fraction_of_floor']:>11.2f} "
              f"{(r['jaxar_tok_s'] / hf) if hf else float('nan'):>9.2f} {r.get('same_tokens_as_transformers', 'n/a')!s:>11}")


if __name__ == "__main__":
    main()
