#!/usr/bin/env python3
"""Speculative decoding of the raster image model (SJD, MC-SJD, a draft model; exact / LANTERN / GSD acceptance)
against plain raster decoding, side by side in one process.

    python benchmarks/image_spec.py [--raster runs/fashion-raster] [--draft runs/fashion-raster-draft]
        [--classifier runs/fashion-classifier] [--methods plain,sjd,mcsjd,draft,sjd+lantern:8,0.2,...]
        [--window 16] [--per-label 100] [--seeds 0,1,2] [--batches 1,16,64] [--json out.json]

Each method is `decode[+accept]` (decode: plain | sjd | mcsjd | draft; accept: exact | lantern:k,delta |
gsd:g[,p_thr[,d_thr]]). Quality: for every seed, `--per-label` samples per class at batch 64 through the same
`sample_run` as sample.py; FD, precision, recall and class consistency in the classifier's feature space against
the 10,000 test images (mean and standard deviation over the seeds), with the measured target forwards per image
and the relaxed rule's mean per-code distortion bound. Speed: images/s at each batch size (compile excluded: the
shape runs once before it is timed; median of --repeats), and the speed-up over plain decoding at that batch.
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


def parse_method(text: str):
    """"sjd+lantern:8,0.2" -> ("sjd", "lantern:8,0.2")."""
    decode, _, accept = text.partition("+")
    return decode, accept or "exact"


def split_methods(text: str):
    """Methods separated by ';' or by ',' where a ',' does not continue an accept spec's numbers."""
    if ";" in text:
        return [m for m in text.split(";") if m]
    out = []
    for piece in text.split(","):
        if out and piece and (piece[0].isdigit() or piece[0] == "."):
            out[-1] += "," + piece
        else:
            out.append(piece)
    return [m for m in out if m]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--raster", default="runs/fashion-raster")
    p.add_argument("--draft", default="runs/fashion-raster-draft")
    p.add_argument("--classifier", default="runs/fashion-classifier")
    p.add_argument("--methods", default="plain,sjd,mcsjd,draft,sjd+lantern:8,0.2,mcsjd+lantern:8,0.2,sjd+gsd:3,"
                                        "mcsjd+gsd:3")
    p.add_argument("--window", type=int, default=16, help="Jacobi window (sjd / mcsjd)")
    p.add_argument("--draft-window", type=int, default=4, help="codes the draft model drafts per round")
    p.add_argument("--jacobi-init", default="random", choices=["random", "previous"])
    p.add_argument("--cfg-scale", type=float, default=2.0)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--per-label", type=int, default=100)
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--batches", default="1,16,64")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--speed-images", type=int, default=64, help="images per timed speed run (at least one batch)")
    p.add_argument("--no-quality", action="store_true")
    p.add_argument("--no-speed", action="store_true")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    methods = [parse_method(m) for m in split_methods(args.methods)]
    seeds = [int(s) for s in args.seeds.split(",")]
    batches = [int(b) for b in args.batches.split(",")]

    import jax

    from jaxar.decode.image_cli import sample_run
    from jaxar.image_eval import ImageEvaluator, balanced_labels
    from jaxar.train.vision import load_image_run

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    device = f"{jax.devices()[0].device_kind} ({jax.device_count()} device(s), {os.cpu_count()} CPU cores)"
    print(f"# device: {device}; jax {jax.__version__}; {platform.python_version()}; commit {commit}; "
          f"{time.strftime('%Y-%m-%d')}", flush=True)
    run = load_image_run(args.raster)
    draft_run = load_image_run(args.draft) if any(d == "draft" for d, _ in methods) else None
    result = {"device": device, "commit": commit, "date": time.strftime("%Y-%m-%d"), "jax": jax.__version__,
              "settings": vars(args)}

    def sample(decode, accept, labels, seed, batch):
        window = None if decode == "plain" else (args.draft_window if decode == "draft" else args.window)
        return sample_run(run, labels, cfg_scale=args.cfg_scale, cfg_schedule=None, temperature=args.temperature,
                          top_k=0, top_p=1.0, seed=seed, batch_size=batch, progress=False, decode=decode,
                          window=window, accept=accept, jacobi_init=args.jacobi_init,
                          draft_run=draft_run if decode == "draft" else None)

    quality = []
    if not args.no_quality:
        evaluator = ImageEvaluator(args.classifier)
        labels = balanced_labels(run.config.num_classes, args.per_label)
        for decode, accept in methods:
            per_seed = []
            for seed in seeds:
                images, st = sample(decode, accept, labels, seed, 64)
                m = evaluator.evaluate(images, labels)
                per_seed.append({**{k: m[k] for k in ("fd", "precision", "recall", "class_consistency")},
                                 "forwards_per_image": st["forwards_per_image"],
                                 "tv_bound_per_code": st.get("tv_bound_per_code", 0.0)})
            row = {"method": f"{decode}+{accept}" if accept != "exact" else decode, "seeds": per_seed}
            for k in per_seed[0]:
                vals = np.array([s[k] for s in per_seed], np.float64)
                row[k], row[k + "_std"] = float(vals.mean()), float(vals.std(ddof=1) if len(vals) > 1 else 0.0)
            quality.append(row)
            print(f"  {row['method']}: fd {row['fd']:.3f}+-{row['fd_std']:.3f} forwards/image "
                  f"{row['forwards_per_image']:.1f}", file=sys.stderr, flush=True)
    speed = []
    for decode, accept in ([] if args.no_speed else methods):
        row = {"method": f"{decode}+{accept}" if accept != "exact" else decode}
        for batch in batches:
            n = max(batch, args.speed_images // batch * batch)
            labels = np.arange(n) % run.config.num_classes
            sample(decode, accept, labels[:batch], 100, batch)  # compile this shape
            times, fwd = [], []
            for r in range(args.repeats):
                t0 = time.perf_counter()
                _, st = sample(decode, accept, labels, 101 + r, batch)
                times.append(time.perf_counter() - t0)
                fwd.append(st["forwards_per_image"])
            row[f"images_per_s_b{batch}"] = n / float(np.median(times))
            row[f"forwards_per_image_b{batch}"] = float(np.mean(fwd))
        speed.append(row)
        print(f"  speed {row['method']}: " + ", ".join(f"b{b} {row[f'images_per_s_b{b}']:.1f}/s" for b in batches),
              file=sys.stderr, flush=True)
    base = {b: speed[0][f"images_per_s_b{b}"] for b in batches} if speed and methods[0][0] == "plain" else None
    result.update(quality=quality, speed=speed)

    if quality:
        plain_fd = quality[0]["fd"] if methods[0][0] == "plain" else None
        print(f"\nquality: {args.per_label} images per class x seeds {args.seeds}, guidance {args.cfg_scale:g}, "
              f"temperature {args.temperature:g}, batch 64 (mean +- std over seeds)")
        print("| method | forwards / image | fewer forwards | FD | FD vs plain | precision | recall | "
              "class consistency | TV bound / code |")
        print("|---|---|---|---|---|---|---|---|---|")
        for r in quality:
            fewer = 49.0 / r["forwards_per_image"]
            rel = f"{100 * (r['fd'] / plain_fd - 1):+.1f}%" if plain_fd else "-"
            print(f"| {r['method']} | {r['forwards_per_image']:.1f} | {fewer:.2f}x | {r['fd']:.3f} +- "
                  f"{r['fd_std']:.3f} | {rel} | {r['precision']:.3f} | {r['recall']:.3f} | "
                  f"{r['class_consistency']:.3f} | {r['tv_bound_per_code']:.4f} |")
    if speed:
        print(f"\nspeed: images/s (median of {args.repeats}), compile excluded; speed-up over plain at the same batch")
        print("| method | " + " | ".join(f"batch {b}: forwards / image | images/s | speed-up" for b in batches) + " |")
        print("|---|" + "---|---|---|" * len(batches))
        for r in speed:
            cells = []
            for b in batches:
                ips = r[f"images_per_s_b{b}"]
                up = f"{ips / base[b]:.2f}x" if base else "-"
                cells.append(f"{r[f'forwards_per_image_b{b}']:.1f} | {ips:.1f} | {up}")
            print(f"| {r['method']} | " + " | ".join(cells) + " |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
