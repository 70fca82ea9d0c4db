#!/usr/bin/env python3
"""Raster (LlamaGen-style) vs next-scale (VAR) image generation on Fashion-MNIST, side by side in one process.

    python benchmarks/image_ar.py [--raster runs/fashion-raster] [--var runs/fashion-var] [--vq runs/fashion-vq]
        [--classifier runs/fashion-classifier] [--cfg-scales 1,1.5,2,3] [--per-label 100] [--out-dir docs/images]

For the tokenizer: reconstruction MSE and the metrics of reconstructions of the test split. For each model and
guidance scale: FD, precision, recall and class consistency of `--per-label` samples per class (the classifier's
feature space, against the 10,000 test images; the same seed for both models), and images/s at batch 1 and
batch 64 (compile excluded: each batch shape is run once before it is timed). Prints a table and writes JSON
(`--json`), an FD-against-guidance plot and sample grids into --out-dir.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def images_per_s(run, batch: int, *, cfg_scale: float, repeats: int, seed: int = 0) -> float:
    import jax

    from jaxar.decode.image import decode_images, sample_tokens

    labels = np.arange(batch) % run.config.num_classes

    def once(s):
        tokens = sample_tokens(run.params, labels, config=run.config, tokenizer=run.tokenizer, cfg_scale=cfg_scale,
                               seed=s)
        return jax.block_until_ready(decode_images(tokens, config=run.config, tokenizer=run.tokenizer))

    once(seed)  # compile
    times = []
    for r in range(repeats):
        t0 = time.perf_counter()
        once(seed + 1 + r)
        times.append(time.perf_counter() - t0)
    return batch / float(np.median(times))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--raster", default="runs/fashion-raster")
    p.add_argument("--var", default="runs/fashion-var")
    p.add_argument("--vq", default="runs/fashion-vq")
    p.add_argument("--classifier", default="runs/fashion-classifier")
    p.add_argument("--cfg-scales", default="1,1.5,2,3")
    p.add_argument("--per-label", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--speed-scale", type=float, default=2.0, help="guidance scale of the speed runs")
    p.add_argument("--repeats-b1", type=int, default=5)
    p.add_argument("--repeats-b64", type=int, default=3)
    p.add_argument("--top-k", type=int, default=0, help="sampling top-k of every quality run (0: off)")
    p.add_argument("--top-p", type=float, default=1.0, help="sampling top-p of every quality run (1: off)")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--no-var-ramp", action="store_true", help="skip the VAR rows with the linear guidance ramp")
    p.add_argument("--out-dir", default="docs/images")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    scales = [float(x) for x in args.cfg_scales.split(",")]

    from jaxar.decode.image_cli import sample_run
    from jaxar.image_eval import ImageEvaluator, balanced_labels, evaluate_tokenizer
    from jaxar.image_metrics import plot_curve, save_grid
    from jaxar.train.images import FASHION_MNIST_CLASSES
    from jaxar.train.vision import load_image_run

    import jax

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    device = f"{jax.devices()[0].device_kind} ({jax.device_count()} device(s), {os.cpu_count()} CPU cores)"
    print(f"# device: {device}; jax {jax.__version__}; {platform.python_version()}; commit {commit}; "
          f"{time.strftime('%Y-%m-%d')}")
    evaluator = ImageEvaluator(args.classifier)
    result = {"device": device, "commit": commit, "date": time.strftime("%Y-%m-%d"), "jax": jax.__version__,
              "classifier_test_accuracy": evaluator.accuracy()}
    print(f"classifier test accuracy: {result['classifier_test_accuracy']:.4f}")
    os.makedirs(args.out_dir, exist_ok=True)

    tok = evaluate_tokenizer(load_image_run(args.vq), evaluator)
    result["tokenizer"] = tok
    print("\n| quantizer | recon MSE | recon FD | precision | recall | class consistency |")
    print("|---|---|---|---|---|---|")
    for name, m in tok.items():
        print(f"| {name} | {m['mse']:.4f} | {m['fd']:.3f} | {m['precision']:.3f} | {m['recall']:.3f} | "
              f"{m['class_consistency']:.3f} |")

    runs = {"raster": load_image_run(args.raster), "var": load_image_run(args.var)}
    labels = balanced_labels(10, args.per_label)
    rows = []
    variants = [("raster", "constant"), ("var", "constant")] + ([] if args.no_var_ramp else [("var", "linear")])
    result["sampling"] = {"temperature": args.temperature, "top_k": args.top_k, "top_p": args.top_p,
                          "per_label": args.per_label, "seed": args.seed}
    for name, schedule in variants:
        run = runs[name]
        label = name if schedule == "constant" else f"{name} (linear ramp)"
        for s in scales:
            images, stats = sample_run(run, labels, cfg_scale=s, cfg_schedule=schedule, temperature=args.temperature,
                                       top_k=args.top_k, top_p=args.top_p, seed=args.seed, batch_size=64,
                                       progress=False)
            m = evaluator.evaluate(images, labels)
            rows.append({"model": label, "cfg_scale": s, **{k: m[k] for k in ("fd", "precision", "recall",
                                                                                "class_consistency")},
                         "forwards_per_image": stats["forwards_per_image"]})
            if s == args.speed_scale and schedule == "constant":
                grid_labels = np.repeat(np.arange(10), 8)
                pick = np.concatenate([np.flatnonzero(labels == c)[:8] for c in range(10)])
                save_grid(images[pick], os.path.join(args.out_dir, f"{name}_grid.png"), rows=10,
                          labels=grid_labels, class_names=FASHION_MNIST_CLASSES)
            print(f"  {label} cfg {s}: fd {m['fd']:.3f} consistency {m['class_consistency']:.3f}", file=sys.stderr,
                  flush=True)
    speed = {}
    for name, run in runs.items():
        speed[name] = {1: images_per_s(run, 1, cfg_scale=args.speed_scale, repeats=args.repeats_b1),
                       64: images_per_s(run, 64, cfg_scale=args.speed_scale, repeats=args.repeats_b64)}
    result["quality"] = rows
    result["images_per_s"] = speed
    print("\n| model | guidance | FD | precision | recall | class consistency | forwards / image |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['cfg_scale']:g} | {r['fd']:.3f} | {r['precision']:.3f} | {r['recall']:.3f} | "
              f"{r['class_consistency']:.3f} | {r['forwards_per_image']} |")
    print(f"\n| model | images/s batch 1 | images/s batch 64 | (guidance {args.speed_scale:g}) |")
    print("|---|---|---|---|")
    for name, s in speed.items():
        print(f"| {name} | {s[1]:.2f} | {s[64]:.1f} | |")
    print(f"| var / raster | {speed['var'][1] / speed['raster'][1]:.2f}x | "
          f"{speed['var'][64] / speed['raster'][64]:.2f}x | |")
    names = list(dict.fromkeys(r["model"] for r in rows))
    by = {n: [r for r in rows if r["model"] == n] for n in names}
    plot_curve(scales, {f"{n}": [r["fd"] for r in by[n]] for n in names},
               os.path.join(args.out_dir, "fd_vs_guidance.png"), xlabel="guidance scale",
               ylabel="FD (classifier features)", title="Fashion-MNIST: FD against guidance")
    plot_curve(scales, {f"{n}": [r["class_consistency"] for r in by[n]] for n in names},
               os.path.join(args.out_dir, "consistency_vs_guidance.png"), xlabel="guidance scale",
               ylabel="class consistency", title="Fashion-MNIST: class consistency against guidance")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
