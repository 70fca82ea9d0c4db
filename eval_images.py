#!/usr/bin/env python3
"""Image metrics of a run, in a trained Fashion-MNIST classifier's feature space.

    python eval_images.py --model runs/fashion-var [--cfg-scale 1,2,3] [--per-label 100] [--plot fd.png]
    python eval_images.py --model runs/fashion-vq            # tokenizer: reconstruction MSE and FD
    python eval_images.py --samples out/samples.npz          # a sample.py output
    python eval_images.py --model runs/fashion-classifier    # the classifier's own test accuracy

Prints class consistency (the classifier agrees with the sampled label), the Frechet distance of the
classifier's penultimate features between samples and the 10,000 test images (FD: the FID recipe with a domain
network), and precision / recall of the samples (k-NN manifolds, k = 3). --json FILE writes the rows.
Bad input: one line on stderr, exit code 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys


def _scales(text: str) -> list:
    try:
        values = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--cfg-scale must be comma-separated numbers, got {text!r}") from None
    if not values:
        raise argparse.ArgumentTypeError("--cfg-scale is empty")
    return values


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="eval_images.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="an image run: raster / var (sampled), vq (reconstructions) or classifier")
    p.add_argument("--samples", help="evaluate a sample.py output (samples.npz) instead of sampling")
    p.add_argument("--classifier", default="runs/fashion-classifier", help="the classifier run (default %(default)s)")
    p.add_argument("--data", default="fashion_mnist", help="the reference images: the test split of this source "
                   "(fashion_mnist, or a directory of IDX files; default %(default)s)")
    p.add_argument("--cfg-scale", type=_scales, default=[2.0], help="guidance scale(s), comma-separated")
    p.add_argument("--cfg-schedule", choices=["constant", "linear"], default=None)
    p.add_argument("--per-label", type=int, default=100, help="samples per class (default %(default)s)")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--json", help="write the result rows as JSON to this file")
    p.add_argument("--plot", help="with several --cfg-scale values: FD / consistency against guidance, a PNG")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)

    def fail(msg: str) -> int:
        print(f"eval_images.py: error: {msg}", file=sys.stderr)
        return 2

    if bool(args.model) == bool(args.samples):
        return fail("give exactly one of --model RUN_DIR or --samples FILE.npz")
    if args.per_label < 1 or args.batch_size < 1:
        return fail("--per-label and --batch-size must be >= 1")
    for path in (args.json, args.plot):
        if path and os.path.exists(path):
            return fail(f"{path} already exists; choose another file name")

    from jaxar.image_eval import ImageEvaluator, evaluate_generator, evaluate_tokenizer
    from jaxar.train.vision import load_image_run, run_task

    try:
        evaluator = ImageEvaluator(args.classifier, data_source=args.data)
    except (OSError, ValueError) as e:
        return fail(f"--classifier {args.classifier}: {e}")
    rows = []
    if args.samples:
        import numpy as np

        if not os.path.isfile(args.samples):
            return fail(f"--samples {args.samples} does not exist")
        try:
            with np.load(args.samples) as f:
                images, labels = f["images"], f["labels"]
        except (OSError, ValueError, KeyError) as e:
            return fail(f"--samples {args.samples}: not a sample.py output with 'images' and 'labels' ({e})")
        if images.ndim != 3 or images.shape[1:] != (28, 28) or len(labels) != len(images):
            return fail(f"--samples {args.samples}: images must be uint8 [N, 28, 28] with N labels, got "
                        f"{images.shape} and {labels.shape}")
        rows.append({"samples": args.samples, **evaluator.evaluate(images, labels)})
    else:
        if not os.path.isdir(args.model) or run_task(args.model) is None:
            return fail(f"--model {args.model} is not an image run directory (train one with train.py --config "
                        "configs/fashion-*.yaml)")
        try:
            run = load_image_run(args.model)
        except (OSError, ValueError) as e:
            return fail(f"--model {args.model}: {e}")
        if run.task == "classifier":
            rows.append({"model": args.model, "test_accuracy": ImageEvaluator(args.model, data_source=args.data).accuracy()})
        elif run.task == "vq":
            for name, m in evaluate_tokenizer(run, evaluator).items():
                rows.append({"model": args.model, "quantizer": name, **m})
        else:
            for row in evaluate_generator(run, evaluator, cfg_scales=args.cfg_scale, cfg_schedule=args.cfg_schedule,
                                          per_label=args.per_label, temperature=args.temperature, top_k=args.top_k,
                                          top_p=args.top_p, seed=args.seed, batch_size=args.batch_size,
                                          progress=not args.no_progress):
                rows.append({"model": args.model, "kind": run.task, **row})
    keys = [k for k in ("quantizer", "cfg_scale", "test_accuracy", "mse", "fd", "precision", "recall",
                        "class_consistency", "images_per_s", "forwards_per_image", "num_samples")
            if any(k in r for r in rows)]
    print(" | ".join(keys))
    for r in rows:
        print(" | ".join(_fmt(r.get(k)) for k in keys))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
    if args.plot and len(rows) > 1 and "cfg_scale" in rows[0]:
        from jaxar.image_metrics import plot_curve

        xs = [r["cfg_scale"] for r in rows]
        plot_curve(xs, {"FD": [r["fd"] for r in rows]}, args.plot, xlabel="guidance scale", ylabel="FD",
                   title=f"{args.model}: FD against guidance")
    return 0


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4f}"
    return str(v)


if __name__ == "__main__":
    sys.exit(main())
