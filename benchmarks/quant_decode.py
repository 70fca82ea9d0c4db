"""Quantized decode: tok/s and perplexity of fp32, bf16, int8 weights, int8 weights + int8 KV (one process),
plus a decode row over a mesh of fake CPU devices (a subprocess).

    python benchmarks/quant_decode.py --model runs/smollm2-135m          # the real checkpoint (HF directory)
    python benchmarks/quant_decode.py --small                            # CPU-sized random model
    python benchmarks/quant_decode.py --model runs/smollm2-135m --max-new-tokens 8 --repeats 1   # smoke run

Each variant decodes greedy, no EOS (every row generates exactly the budget), times include prefill, medians
after a warm-up run. Perplexity: one cached forward over a fixed English text (the int8 cache is what
attention reads), `exp(mean NLL)`. "same tokens" is the fraction of greedy tokens equal to fp32's.
The mesh row (`--mesh data=2,tensor=4`, '' to skip) runs the fp32 variant on
`--mesh-devices` fake CPU devices (XLA_FLAGS=--xla_force_host_platform_device_count) through
`jaxar.parallel.shard_params`: on one CPU it measures overhead, not speed-up; on a real multi-device host
run it there with `--mesh-devices 0` (use the real devices). Full JSON with --out.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import jaxar  # noqa: E402
from jaxar.cache import KVCache  # noqa: E402
from jaxar.decode.generate import generate, pad_prompts  # noqa: E402
from jaxar.models.transformer import decode_params, forward  # noqa: E402
from benchmarks.decode import median_time  # noqa: E402  (one timing rule for the decode benchmarks)

TEXT = (
    "The history of the printing press begins in the fifteenth century, when Johannes Gutenberg, a goldsmith from "
    "Mainz, combined several existing technologies into a single practical system. Movable type had been used in "
    "East Asia for centuries, but Gutenberg's metal alloy, oil-based ink and adapted screw press made it possible "
    "to produce books quickly and at a reasonable cost. Within fifty years, printing shops had spread to more than "
    "two hundred cities across Europe, and millions of volumes had been produced. The consequences were enormous. "
    "Knowledge that had been locked away in a few monasteries and universities became available to merchants, "
    "craftsmen and ordinary readers. Scientists could share their observations with colleagues in distant "
    "countries, and errors in texts could be corrected in later editions instead of being copied again by hand. "
    "Religious reformers used pamphlets to spread their ideas, while governments learned to use printed "
    "proclamations to announce new laws. Literacy rates rose slowly but steadily, and the demand for schools grew "
    "along with them. Newspapers appeared in the seventeenth century, first as weekly reports of trade and "
    "politics, and later as daily publications that shaped public opinion. By the nineteenth century, "
    "steam-powered presses could print thousands of pages every hour.")


def variants(config):
    """name -> (config, param dtype or None)."""
    return {
        "fp32": (config.replace(dtype="float32", param_dtype="float32"), jnp.float32),
        "bf16": (config.replace(dtype="bfloat16", param_dtype="bfloat16"), jnp.bfloat16),
        "int8 w": (config.replace(dtype="float32", param_dtype="float32", weight_quant="int8"), jnp.float32),
        "int8 w + int8 kv": (config.replace(dtype="float32", param_dtype="float32", weight_quant="int8",
                                            kv_cache_dtype="int8"), jnp.float32),
    }


def prompts_for(config, batch: int, prompt_len: int):
    """The same random prompts for a batch size in every process."""
    return np.random.default_rng(batch).integers(0, config.vocab_size, (batch, prompt_len)).astype(np.int32)


def decode_tok_s(params, config, ids, new_tokens, repeats):
    toks, lens = pad_prompts([list(r) for r in ids], bucket=False)

    def run():
        return np.asarray(generate(params, toks, lens, config=config, max_new_tokens=new_tokens, eos_ids=[]).tokens)

    t = median_time(run, repeats)
    return ids.shape[0] * new_tokens / t, run()


def perplexity(params, config, ids):
    cache = KVCache.empty(config, 1, max(256, 1 << (len(ids) - 1).bit_length()))
    logits, _ = forward(params, ids[None], config=config, cache=cache)
    lp = jax.nn.log_softmax(logits[0, :-1], -1)
    return float(jnp.exp(-jnp.mean(jnp.take_along_axis(lp, jnp.asarray(ids[1:, None]), 1))))


def load(args):
    if args.model:
        config, params = jaxar.from_pretrained(args.model)
        try:
            from jaxar.tokenizer import load_tokenizer

            text_ids = np.asarray(load_tokenizer(args.model).encode(TEXT)[:args.text_tokens], np.int32)
        except Exception:  # noqa: BLE001 - no tokenizer: bytes
            text_ids = np.frombuffer(TEXT.encode(), np.uint8)[:args.text_tokens].astype(np.int32) % config.vocab_size
    else:
        config = jaxar.ModelConfig.llama(vocab_size=2048, d_model=256, n_layers=4, n_heads=8, n_kv_heads=2,
                                         mlp_dim=704, max_seq_len=512, tie_embeddings=True)
        params = jaxar.init_params(config, 0)
        text_ids = np.frombuffer(TEXT.encode(), np.uint8)[:args.text_tokens].astype(np.int32)
    return config, params, text_ids


def mesh_worker(args):
    """Runs in the subprocess: the fp32 variant on a mesh; prints one JSON row."""
    from jaxar import parallel
    from jaxar.train.sharding import make_mesh

    sizes = {k: int(v) for k, v in (kv.split("=") for kv in args.mesh.split(","))}
    config, params, _ = load(args)
    config = config.replace(dtype="float32", param_dtype="float32")
    mesh = make_mesh(sizes)
    sharded = parallel.shard_params(params, config, mesh)
    batch = max(int(b) for b in args.batches.split(","))
    ids = prompts_for(config, batch, args.prompt_len)
    tok_s, tokens = decode_tok_s(sharded, config, ids, args.max_new_tokens, args.repeats)
    print("MESHROW " + json.dumps({"variant": f"fp32 mesh {args.mesh} ({jax.device_count()} devices)",
                                   "batch": batch, "tok_s": tok_s, "tokens": tokens.tolist()}), flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", help="Hugging Face / jaxar model directory (e.g. runs/smollm2-135m)")
    ap.add_argument("--small", action="store_true", help="CPU-sized random model (the default without --model)")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--text-tokens", type=int, default=256, help="tokens of the fixed text scored for perplexity")
    ap.add_argument("--mesh", default="data=2,tensor=4", help="mesh sizes of the mesh row ('' to skip)")
    ap.add_argument("--mesh-devices", type=int, default=8,
                    help="fake CPU devices for the mesh row (0: the real devices of this host)")
    ap.add_argument("--out", default=None)
    ap.add_argument("--mesh-worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.mesh_worker:
        return mesh_worker(args)

    config, params, text_ids = load(args)
    batches = [int(b) for b in args.batches.split(",")]
    prompts = {b: prompts_for(config, b, args.prompt_len) for b in batches}
    results, reference = [], {}
    for name, (cfg, dtype) in variants(config).items():
        p = decode_params(jax.tree_util.tree_map(lambda x: x.astype(dtype), params), cfg)  # once, as sample.py does
        weight_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(p))
        kv_item = 1 + 4 / cfg.dim_per_head if cfg.cache_dtype == "int8" else jnp.dtype(cfg.cache_dtype).itemsize
        row = {"variant": name, "weight_mb": weight_bytes / 1e6,
               "kv_bytes_per_token": 2 * cfg.n_layers * cfg.num_kv_heads * cfg.dim_per_head * kv_item,
               "perplexity": perplexity(p, cfg, text_ids)}
        for b in batches:
            tok_s, tokens = decode_tok_s(p, cfg, prompts[b], args.max_new_tokens, args.repeats)
            row[f"tok_s_b{b}"] = tok_s
            reference.setdefault(b, tokens)
            row[f"same_tokens_b{b}"] = float(np.mean(tokens == reference[b]))
        results.append(row)
        print(json.dumps(row), flush=True)

    mesh_row = None
    if args.mesh:
        env = dict(os.environ)
        if args.mesh_devices:
            env.update(JAX_PLATFORMS="cpu", XLA_FLAGS=(env.get("XLA_FLAGS", "") + " --xla_force_host_platform_"
                                                       f"device_count={args.mesh_devices}").strip())
        cmd = [sys.executable, os.path.abspath(__file__), "--mesh-worker", "--mesh", args.mesh, "--batches",
               args.batches, "--prompt-len", str(args.prompt_len), "--max-new-tokens", str(args.max_new_tokens),
               "--repeats", str(args.repeats), "--text-tokens", str(args.text_tokens)]
        cmd += ["--model", args.model] if args.model else []
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if proc.returncode != 0 or "MESHROW " not in proc.stdout:
            mesh_row = {"variant": f"mesh {args.mesh}", "error": proc.stderr.strip().splitlines()[-1:]}
        else:
            mesh_row = json.loads(proc.stdout.split("MESHROW ", 1)[1].splitlines()[0])
            b = mesh_row["batch"]
            if b in reference:
                mesh_row["same_tokens_as_fp32"] = float(np.mean(np.asarray(mesh_row["tokens"]) == reference[b]))
            del mesh_row["tokens"]
        print(json.dumps(mesh_row), flush=True)

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip()
    meta = {"device": jax.devices()[0].device_kind, "backend": jax.default_backend(), "jax": jax.__version__,
            "model": args.model or "small random", "prompt_len": args.prompt_len,
            "max_new_tokens": args.max_new_tokens, "text_tokens": int(len(text_ids)),
            "date": time.strftime("%Y-%m-%d"), "commit": commit}
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"meta": meta, "results": results, "mesh": mesh_row}, f, indent=2)
    print(f"\nmodel={meta['model']} device={meta['device']} jax={meta['jax']} commit={commit} "
          f"prompt={args.prompt_len} new={args.max_new_tokens} ppl text={len(text_ids)} tokens")
    head = f"{'variant':>18} {'weights MB':>10} {'KV B/tok':>9} {'ppl':>8}"
    head += "".join(f" {'tok/s b' + str(b):>10} {'same b' + str(b):>8}" for b in batches)
    print(head)
    for r in results:
        line = f"{r['variant']:>18} {r['weight_mb']:>10.1f} {r['kv_bytes_per_token']:>9.0f} {r['perplexity']:>8.3f}"
        line += "".join(f" {r[f'tok_s_b{b}']:>10.1f} {r[f'same_tokens_b{b}']:>8.3f}" for b in batches)
        print(line)
    if mesh_row is not None:
        if "error" in mesh_row:
            print(f"{mesh_row['variant']}: error {mesh_row['error']}")
        else:
            print(f"{mesh_row['variant']}: batch {mesh_row['batch']} {mesh_row['tok_s']:.1f} tok/s, "
                  f"same tokens as fp32 {mesh_row.get('same_tokens_as_fp32', float('nan')):.3f}")


if __name__ == "__main__":
    main()
