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

--vs-torch: one process, one batch, the same initial weights, side by side (defaults: Llama d384 x 6 layers,
6 heads, MLP 1024, vocab 257, untied head, B16 x T256, fp32, AdamW lr 3e-4 wd 0.1 + global-norm clip 1.0):
  torch           transformers LlamaForCausalLM + torch.optim.AdamW, eager (--threads, default 2)
  minimal_jax     a hand-written Llama step in this file: plain jnp + optax.adamw under jit, no flax
  jaxar_scan_*    jaxar's real train step (build_step_functions, as train.py runs it), scan_layers true / false
First every competitor's loss on the initial weights (and after one update) is compared with torch's
(exit status 1 when step 0 differs by more than --loss-rtol); then interleaved rounds of timed steps
(median; each step ends on the host with its loss). Table: tok/s, ratio to torch and to the minimal step,
compile time and XLA's cost analysis (FLOPs, bytes accessed) of the compiled step.

  python benchmarks/train_throughput.py --vs-torch [--d-model 384 --n-layers 6 --n-heads 6 --n-kv-heads 6
      --mlp-dim 1024 --vocab-size 257 --tie-embeddings --batch-size 16 --seq-len 256] [--out vs_torch.json]
"""
from __future__ import annotations

import argparse
import functools
import json
import math
import os
import re
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


# ---------------------------------------------------------------------------
# --vs-torch: jaxar's train step next to HF transformers + torch AdamW and a minimal pure-JAX step


def vs_torch_configs(*, d_model=384, n_layers=6, n_heads=6, n_kv_heads=None, mlp_dim=1024, vocab_size=257,
                     batch_size=16, seq_len=256, tie_embeddings=False, lr=3e-4, weight_decay=0.1, grad_clip=1.0,
                     scan_layers=True):
    """(ModelConfig, TrainConfig) of the comparison: a Llama in fp32, AdamW at a constant lr (warmup 0, so
    jaxar's schedule gives the peak lr at step 0, as the two others use), weight decay on matrices only."""
    from jaxar.config import ModelConfig
    from jaxar.train.config import TrainConfig

    model = ModelConfig.llama(vocab_size=vocab_size, d_model=d_model, n_layers=n_layers, n_heads=n_heads,
                              n_kv_heads=n_kv_heads, mlp_dim=mlp_dim, max_seq_len=seq_len,
                              tie_embeddings=tie_embeddings, dtype="float32", param_dtype="float32",
                              scan_layers=scan_layers, remat="none")
    train = TrainConfig(steps=100_000, batch_size=batch_size, seq_len=seq_len, lr=lr, warmup_steps=0,
                        min_lr_ratio=1.0, weight_decay=weight_decay, grad_clip=grad_clip, grad_accum=1)
    return model, train


# --- (b) the minimal hand-written step: plain jnp + optax, one Python loop over the layers, no flax


def minimal_params(params, cfg) -> dict:
    """jaxar's (stacked) params -> per-layer 2-D matrices: x @ w everywhere."""
    p = jax.tree_util.tree_map(np.asarray, params)
    D, H, K, Dh = cfg.d_model, cfg.n_heads, cfg.num_kv_heads, cfg.dim_per_head
    at, mlp, lay = p["layers"]["attn"], p["layers"]["mlp"], p["layers"]
    layers = []
    for i in range(cfg.n_layers):
        layers.append({
            "attn_norm": lay["attn_norm"]["scale"][i], "mlp_norm": lay["mlp_norm"]["scale"][i],
            "wq": at["q_proj"]["kernel"][i].reshape(D, H * Dh), "wk": at["k_proj"]["kernel"][i].reshape(D, K * Dh),
            "wv": at["v_proj"]["kernel"][i].reshape(D, K * Dh), "wo": at["o_proj"]["kernel"][i].reshape(H * Dh, D),
            "w_gate": mlp["gate_proj"]["kernel"][i], "w_up": mlp["up_proj"]["kernel"][i],
            "w_down": mlp["down_proj"]["kernel"][i]})
    out = {"embed": p["embed"]["embedding"], "layers": layers, "final_norm": p["final_norm"]["scale"]}
    if not cfg.tie_embeddings:
        out["lm_head"] = p["lm_head"]["kernel"]
    return out


def _rms_norm(x, scale, eps):
    return x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + eps) * scale


def _rope(x, cos, sin):  # x [B, T, heads, Dh]; rotate-half layout (Hugging Face Llama)
    half = x.shape[-1] // 2
    return x * cos + jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1) * sin


def minimal_loss(p, tokens, targets, cfg):
    """Mean next-token cross-entropy of a Llama written in plain jnp."""
    B, T = tokens.shape
    H, K, Dh = cfg.n_heads, cfg.num_kv_heads, cfg.dim_per_head
    G = H // K
    inv_freq = 1.0 / (cfg.rope_theta ** (jnp.arange(0, Dh, 2, dtype=jnp.float32) / Dh))
    angles = jnp.arange(T, dtype=jnp.float32)[:, None] * inv_freq
    angles = jnp.concatenate([angles, angles], axis=-1)[None, :, None, :]  # [1, T, 1, Dh]
    cos, sin = jnp.cos(angles), jnp.sin(angles)
    causal = jnp.tril(jnp.ones((T, T), bool))
    x = p["embed"][tokens]
    for layer in p["layers"]:
        h = _rms_norm(x, layer["attn_norm"], cfg.norm_eps)
        q = _rope((h @ layer["wq"]).reshape(B, T, H, Dh), cos, sin).reshape(B, T, K, G, Dh)
        k = _rope((h @ layer["wk"]).reshape(B, T, K, Dh), cos, sin)
        v = (h @ layer["wv"]).reshape(B, T, K, Dh)
        s = jnp.einsum("btkgd,bskd->bkgts", q, k) / math.sqrt(Dh)
        s = jnp.where(causal, s, -1e30)
        o = jnp.einsum("bkgts,bskd->btkgd", jax.nn.softmax(s, axis=-1), v).reshape(B, T, H * Dh)
        x = x + o @ layer["wo"]
        h = _rms_norm(x, layer["mlp_norm"], cfg.norm_eps)
        x = x + (jax.nn.silu(h @ layer["w_gate"]) * (h @ layer["w_up"])) @ layer["w_down"]
    x = _rms_norm(x, p["final_norm"], cfg.norm_eps)
    logits = x @ (p["embed"].T if cfg.tie_embeddings else p["lm_head"])
    nll = jax.nn.logsumexp(logits, axis=-1) - jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    return jnp.mean(nll)


def make_minimal_step(cfg, train):
    """(init(params) -> opt_state, jit step(params, opt_state, tokens, targets) -> (params, opt_state, loss))."""
    import optax

    parts = [optax.clip_by_global_norm(train.grad_clip)] if train.grad_clip > 0 else []
    optimizer = optax.chain(*parts, optax.adamw(train.lr, b1=train.beta1, b2=train.beta2, eps=train.eps,
                                                weight_decay=train.weight_decay,
                                                mask=lambda ps: jax.tree_util.tree_map(lambda a: a.ndim >= 2, ps)))

    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def step(params, opt_state, tokens, targets):
        loss, grads = jax.value_and_grad(minimal_loss)(params, tokens, targets, cfg)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return optimizer.init, step


# --- (a) Hugging Face LlamaForCausalLM + torch.optim.AdamW, eager


def torch_model(params, cfg, attn_implementation: str = "sdpa"):
    """transformers LlamaForCausalLM holding jaxar's params (fp32, train mode)."""
    import torch
    import transformers

    from jaxar.convert.hf import config_to_hf, params_to_hf

    hf = {k: v for k, v in config_to_hf(cfg).items() if k not in ("model_type", "architectures")}
    config = transformers.LlamaConfig(**hf)
    config._attn_implementation = attn_implementation
    model = transformers.LlamaForCausalLM(config).float()
    tensors = {k: torch.from_numpy(np.array(v, np.float32)) for k, v in params_to_hf(params, cfg).items()}
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    missing = [m for m in missing if not (cfg.tie_embeddings and m == "lm_head.weight")]
    if missing or unexpected:
        raise RuntimeError(f"weights do not fit the torch model: missing {missing}, unexpected {unexpected}")
    if cfg.tie_embeddings:
        model.tie_weights()
    return model.train()


def make_torch_step(model, train, tokens, targets):
    """step() -> loss (python float, taken before the update): forward, backward, clip, AdamW."""
    import torch

    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": train.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=train.lr, betas=(train.beta1, train.beta2), eps=train.eps)
    tokens = torch.as_tensor(np.asarray(tokens), dtype=torch.long)
    targets = torch.as_tensor(np.asarray(targets), dtype=torch.long)
    params = list(model.parameters())

    def step():
        opt.zero_grad(set_to_none=True)
        logits = model(input_ids=tokens, use_cache=False).logits
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1))
        loss.backward()
        if train.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, train.grad_clip)
        opt.step()
        return float(loss.detach())

    return step


# --- the competitors as step() -> loss closures, with their compiled programs


class Competitor:
    def __init__(self, name, step, compiled=None, compile_s=None):
        self.name, self.step, self.compiled, self.compile_s = name, step, compiled, compile_s


def _cost(compiled) -> dict:
    """flops / bytes accessed from XLA's cost analysis, and op counts of the optimized HLO."""
    out = {}
    try:
        cost = compiled.cost_analysis()
        if isinstance(cost, (list, tuple)):
            cost = cost[0] if cost else {}
        out["flops"] = float(cost.get("flops", float("nan")))
        out["bytes_accessed"] = float(cost.get("bytes accessed", float("nan")))
    except Exception as e:  # noqa: BLE001 - cost analysis is best effort
        out["cost_error"] = str(e)
    try:
        text = compiled.as_text()
        for op in ("while", "dynamic-update-slice", "dynamic-slice", "fusion", "dot", "copy", "transpose"):
            out[f"hlo_{op}"] = len(re.findall(rf" {re.escape(op)}\(", text))
    except Exception as e:  # noqa: BLE001
        out["hlo_error"] = str(e)
    return out


def build_competitors(cfg, train, params, batch, *, scan_modes=(True, False), with_torch=True,
                      torch_attn="sdpa"):
    """Every competitor, each starting from `params` (jaxar's layout, host numpy) on `batch`."""
    from jaxar.train import sharding as shd
    from jaxar.train.trainer import TrainState, build_step_functions

    out = []
    if with_torch:
        out.append(Competitor("torch", make_torch_step(torch_model(params, cfg, torch_attn), train,
                                                       batch["tokens"], batch["targets"])))

    opt_init, mstep = make_minimal_step(cfg, train)
    mp = jax.tree_util.tree_map(jnp.asarray, minimal_params(params, cfg))
    tokens, targets = jnp.asarray(batch["tokens"]), jnp.asarray(batch["targets"])
    mstate = [mp, opt_init(mp)]
    t = time.perf_counter()
    mcompiled = mstep.lower(mstate[0], mstate[1], tokens, targets).compile()
    mcompile_s = time.perf_counter() - t

    def minimal_step():
        mstate[0], mstate[1], loss = mcompiled(mstate[0], mstate[1], tokens, targets)
        return float(loss)

    out.append(Competitor("minimal_jax", minimal_step, mcompiled, mcompile_s))

    mesh = shd.make_mesh({"data": 1, "fsdp": -1, "tensor": 1})
    device_batch = shd.global_batch(batch, mesh)
    for scan in scan_modes:
        model = cfg.replace(scan_layers=scan)
        fns = build_step_functions(model, train, mesh)
        make_state = jax.jit(lambda p, fns=fns: TrainState(step=jnp.zeros((), jnp.int32), params=p,
                                                           opt_state=fns.optimizer.init(p),
                                                           rng=jax.random.PRNGKey(0)),
                             out_shardings=fns.state_shardings)
        state = [make_state(jax.tree_util.tree_map(np.asarray, params))]
        t = time.perf_counter()
        compiled = fns.train_step.lower(state[0], device_batch).compile()
        compile_s = time.perf_counter() - t

        def jaxar_step(state=state, compiled=compiled):
            state[0], metrics = compiled(state[0], device_batch)
            return float(metrics["loss"])

        out.append(Competitor(f"jaxar_scan_{str(scan).lower()}", jaxar_step, compiled, compile_s))
    return out


def first_losses(competitors, steps: int = 2) -> dict:
    """name -> the losses of the first `steps` steps (step 0: the initial weights; step 1: after one update)."""
    return {c.name: [c.step() for _ in range(steps)] for c in competitors}


def loss_check(losses: dict, reference: str) -> dict:
    """name -> relative difference of each step's loss to the reference's."""
    ref = losses[reference]
    return {name: [abs(a - b) / abs(b) for a, b in zip(ls, ref)] for name, ls in losses.items()}


def vs_torch(args) -> int:
    import torch

    torch.set_num_threads(args.threads)
    batch_size = args.batch_size or 16
    seq_len = args.seq_len or 256
    cfg, train = vs_torch_configs(d_model=args.d_model, n_layers=args.n_layers, n_heads=args.n_heads,
                                  n_kv_heads=args.n_kv_heads, mlp_dim=args.mlp_dim, vocab_size=args.vocab_size,
                                  batch_size=batch_size, seq_len=seq_len, tie_embeddings=args.tie_embeddings)
    from jaxar.models.transformer import init_params

    params = jax.tree_util.tree_map(np.asarray, init_params(cfg, jax.random.PRNGKey(0)))
    batch = synthetic_batch(batch_size, seq_len, cfg.vocab_size)
    competitors = build_competitors(cfg, train, params, batch, torch_attn=args.torch_attn)
    reference = "torch"

    losses = first_losses(competitors)
    rel = loss_check(losses, reference)
    ok = all(r[0] <= args.loss_rtol for r in rel.values())
    print(f"loss check on the same initial weights and batch (relative to {reference}; step 0 tolerance "
          f"{args.loss_rtol:g}):")
    for c in competitors:
        print(f"  {c.name:<18} step0 {losses[c.name][0]:.7f} ({rel[c.name][0]:.1e})   "
              f"after one update {losses[c.name][1]:.7f} ({rel[c.name][1]:.1e})")
    print("  " + ("OK" if ok else "MISMATCH"), flush=True)

    times = {c.name: [] for c in competitors}
    cpu_times = {c.name: [] for c in competitors}  # process CPU seconds: less sensitive to other load
    for c in competitors:
        for _ in range(args.warmup):
            c.step()
    for r in range(args.rounds):  # interleaved rounds: a noisy neighbour hits every competitor alike
        for c in competitors:
            for _ in range(args.steps):
                t, cpu = time.perf_counter(), time.process_time()
                c.step()  # returns a python float: the step is finished
                times[c.name].append(time.perf_counter() - t)
                cpu_times[c.name].append(time.process_time() - cpu)
            print(f"  round {r + 1}/{args.rounds} {c.name}: "
                  f"{statistics.median(times[c.name][-args.steps:]) * 1e3:.0f} ms/step", file=sys.stderr, flush=True)

    tokens = batch_size * seq_len
    rows = {}
    for c in competitors:
        step_s = statistics.median(times[c.name])
        rows[c.name] = {"step_s": step_s, "tokens_per_s": tokens / step_s, "step_s_min": min(times[c.name]),
                        "step_s_all": times[c.name], "cpu_s": statistics.median(cpu_times[c.name]),
                        "cpu_s_all": cpu_times[c.name], "compile_s": c.compile_s,
                        "loss_first_steps": losses[c.name], "loss_rel_diff_to_torch": rel[c.name]}
        if c.compiled is not None:
            rows[c.name].update(_cost(c.compiled))
    base_t, base_m = rows["torch"]["tokens_per_s"], rows["minimal_jax"]["tokens_per_s"]
    print(f"\nLlama d{cfg.d_model} x {cfg.n_layers} layers, {cfg.n_heads} heads / {cfg.num_kv_heads} kv, "
          f"MLP {cfg.mlp_dim}, vocab {cfg.vocab_size}, {'tied' if cfg.tie_embeddings else 'untied'} head, "
          f"B{batch_size} x T{seq_len} fp32, AdamW + clip; {jax.default_backend()} jax {jax.__version__}, "
          f"torch {torch.__version__} ({args.threads} threads, attention {args.torch_attn}); median of "
          f"{args.rounds} x {args.steps} steps")
    best_t, best_m = tokens / rows["torch"]["step_s_min"], tokens / rows["minimal_jax"]["step_s_min"]
    cpu_t, cpu_m = rows["torch"]["cpu_s"], rows["minimal_jax"]["cpu_s"]
    print("(best: the fastest step of each, the least disturbed by other load on the machine; CPU s: median "
          "process CPU seconds per step; XLA's FLOPs and bytes count a scanned loop body once)")
    cols = ("step", "tok/s", "vs torch", "vs minimal JAX", "best tok/s", "best vs torch", "best vs minimal",
            "CPU s/step", "CPU vs torch", "CPU vs minimal", "compile s", "GFLOP (XLA)", "GB accessed")
    widths = [max(len(c), 8) for c in cols]
    widths[0] = 18
    print("| " + " | ".join(f"{c:<{w}}" if i == 0 else f"{c:>{w}}" for i, (c, w) in enumerate(zip(cols, widths)))
          + " |")
    print("|" + "|".join("-" * (w + 1) + (":" if i else "-") for i, w in enumerate(widths)) + "|")
    for name, r in rows.items():
        best = tokens / r["step_s_min"]
        cells = [name, f"{r['tokens_per_s']:,.0f}", f"{r['tokens_per_s'] / base_t:.2f}x",
                 f"{r['tokens_per_s'] / base_m:.2f}x", f"{best:,.0f}", f"{best / best_t:.2f}x", f"{best / best_m:.2f}x",
                 f"{r['cpu_s']:.2f}", f"{cpu_t / r['cpu_s']:.2f}x", f"{cpu_m / r['cpu_s']:.2f}x",
                 f"{r['compile_s']:.1f}" if r["compile_s"] is not None else "",
                 f"{r['flops'] / 1e9:.0f}" if "flops" in r else "",
                 f"{r['bytes_accessed'] / 1e9:.1f}" if "bytes_accessed" in r else ""]
        print("| " + " | ".join(f"{c:<{w}}" if i == 0 else f"{c:>{w}}" for i, (c, w) in enumerate(zip(cells, widths)))
              + " |")
    from jaxar.train.trainer import resolve_scan_layers

    auto = resolve_scan_layers(cfg.replace(scan_layers="auto")).scan_layers
    print(f"model.scan_layers='auto' trains with scan_layers={str(auto).lower()} here")
    result = {"mode": "vs_torch", "device": jax.devices()[0].device_kind, "backend": jax.default_backend(),
              "scan_layers_auto": auto,
              "model": cfg.to_dict(), "batch_size": batch_size, "seq_len": seq_len, "lr": train.lr,
              "weight_decay": train.weight_decay, "grad_clip": train.grad_clip, "torch_threads": args.threads,
              "torch_attention": args.torch_attn, "loss_check_ok": ok, "loss_rtol": args.loss_rtol,
              "rounds": args.rounds, "steps": args.steps, "warmup": args.warmup, "results": rows,
              "jax": jax.__version__, "torch": torch.__version__, "date": time.strftime("%Y-%m-%d")}
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(f"wrote {args.out}")
    return 0 if ok else 1


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=os.path.join(ROOT, "configs", "llama-1b.yaml"))
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    parser.add_argument("--small", action="store_true", help="a tiny model on CPU (default without an accelerator)")
    parser.add_argument("--batch-size", type=int, help="global batch (default 32; 8 with --small)")
    parser.add_argument("--seq-len", type=int, help="default 2048; 128 with --small")
    parser.add_argument("--grad-accum", type=int, help="micro-batches per step (default 2; 1 with --small)")
    parser.add_argument("--steps", type=int, help="timed steps (default 10; --vs-torch: per round, default 3)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--out", default="train_throughput.json")
    vt = parser.add_argument_group("--vs-torch")
    vt.add_argument("--vs-torch", action="store_true", help="jaxar vs transformers + torch vs a minimal JAX step")
    vt.add_argument("--d-model", type=int, default=384)
    vt.add_argument("--n-layers", type=int, default=6)
    vt.add_argument("--n-heads", type=int, default=6)
    vt.add_argument("--n-kv-heads", type=int, default=None, help="default: n_heads (multi-head attention)")
    vt.add_argument("--mlp-dim", type=int, default=1024)
    vt.add_argument("--vocab-size", type=int, default=257)
    vt.add_argument("--tie-embeddings", action="store_true")
    vt.add_argument("--threads", type=int, default=2, help="torch threads")
    vt.add_argument("--torch-attn", default="sdpa", help="transformers attention implementation (sdpa | eager)")
    vt.add_argument("--rounds", type=int, default=3, help="interleaved timing rounds")
    vt.add_argument("--loss-rtol", type=float, default=1e-5)
    args = parser.parse_args(argv)
    if args.vs_torch:
        args.steps = args.steps or 3
        if args.out == "train_throughput.json":
            args.out = "train_throughput_vs_torch.json"
        return vs_torch(args)
    args.steps = args.steps or 10

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
