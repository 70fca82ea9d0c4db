"""`sample.py --model RUN_DIR --labels 0,1,2 --per-label N --cfg-scale S --seed K --output-dir DIR`: images from a
class-conditional raster (LlamaGen-style) or next-scale (VAR) run.

Writes `DIR/samples.npz` (`images` uint8 [N, 28, 28], `labels` int64 [N], label-major: the first `--per-label`
rows are the first label's) and `DIR/grid.png` (a row per label), and prints speed statistics as one JSON line
on stderr (also to `--stats FILE`). Existing outputs are never overwritten: pass another --output-dir, or
--overwrite. Batches of `--batch-size` rows (default 64; the last one is padded, so one program is compiled);
guidance, temperature and the seed are traced, so changing them does not recompile.
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Optional

import numpy as np

IMAGE_FLAGS = ("labels", "per_label", "cfg_scale", "cfg_schedule", "output_dir", "overwrite", "decode", "window",
               "accept", "jacobi_init")
DEFAULT_BATCH = 64
DEFAULT_WINDOW = {"sjd": 16, "mcsjd": 16, "draft": 4}


class ImageUsageError(Exception):
    pass


def parse_labels(text: str, num_classes: int, class_names=None) -> list:
    names = ""
    if class_names:
        names = " (" + ", ".join(f"{i} {n}" for i, n in enumerate(class_names[:num_classes])) + ")"
    try:
        labels = [int(x) for x in text.split(",") if x.strip() != ""]
    except ValueError:
        raise ImageUsageError(f"--labels must be comma-separated class ids in 0..{num_classes - 1}, got "
                              f"{text!r}{names}") from None
    if not labels:
        raise ImageUsageError(f"--labels is empty; give class ids in 0..{num_classes - 1}{names}")
    bad = [x for x in labels if not 0 <= x < num_classes]
    if bad:
        raise ImageUsageError(f"--labels {bad} out of range: this model has classes 0..{num_classes - 1}{names}")
    return labels


def row_seed(seed: int, batch_index: int) -> int:
    """The seed of batch `batch_index` (independent streams per batch, reproducible from --seed)."""
    return int(np.random.SeedSequence([seed, batch_index]).generate_state(1)[0] & 0x7FFFFFFF)


def sample_run(run, labels, *, cfg_scale: float, cfg_schedule: Optional[str], temperature: float, top_k: int,
               top_p: float, seed: int, batch_size: int = DEFAULT_BATCH, progress: bool = True,
               decode: str = "plain", window: Optional[int] = None, accept: str = "exact",
               jacobi_init: str = "random", draft_run=None):
    """Images (uint8 [N, 28, 28]) for `labels` [N] from a loaded image run, in padded batches.

    decode: "plain" (one forward per code / scale) or, for raster runs, "sjd" | "mcsjd" | "draft" (with
    `draft_run`) with `window` codes per round and acceptance `accept` (`jaxar.decode.image_spec`).

    Returns (images, stats) with stats: seconds (sampling, compile included in the first batch), first_batch_s,
    images_per_s (after the first batch), forwards_per_image (target forwards, measured per image for the
    speculative decoders), and for those also tokens_per_forward, accepted_per_forward (drafts accepted per
    round), tv_bound_per_code (the relaxed rule's mean per-code distortion bound, 0 when exact) and
    draft_forwards_per_image (forwards of the draft model a batch ran, per image).
    """
    import jax

    from jaxar.decode.image import decode_images, sample_tokens
    from jaxar.models.transformer import decode_params

    labels = np.asarray(labels, np.int32)
    n = len(labels)
    batch_size = max(1, min(batch_size, n))
    config = run.config
    # The decode layout once for every batch (sample_tokens passes params already in it through unchanged).
    params = {**run.params, "transformer": decode_params(run.params["transformer"], config.model_config())}
    kw = dict(config=config, tokenizer=run.tokenizer, cfg_scale=float(cfg_scale), temperature=float(temperature),
              top_k=int(top_k), top_p=float(top_p))
    if cfg_schedule is not None:
        kw["cfg_schedule"] = cfg_schedule
    speculative = decode != "plain"
    if speculative:
        from jaxar.decode import image_spec
        from jaxar.decode.relaxed import build_tables, parse_accept

        window = window or DEFAULT_WINDOW[decode]
        rule = parse_accept(accept)
        codebook = np.asarray(run.tokenizer[1]["params"]["codebook"]) if rule.kind != "exact" else None
        kw.pop("tokenizer")
        kw.update(decode=decode, window=window, accept=rule, tables=jax.device_put(build_tables(rule, codebook)),
                  drafter=image_spec.make_drafter(decode, window=window, config=config, draft_run=draft_run,
                                                  jacobi_init=jacobi_init,
                                                  cfg_schedule=cfg_schedule or "constant"))
        sums = {"rounds": 0, "accepted": 0, "tv": 0.0, "draft_forwards": 0}
    bar = None
    batches = range(0, n, batch_size)
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=n, desc="sampling images", unit="img", dynamic_ncols=True, file=sys.stderr)
    out = []
    t0 = time.perf_counter()
    first_s = None
    for b, start in enumerate(batches):
        chunk = labels[start:start + batch_size]
        padded = np.concatenate([chunk, np.repeat(chunk[-1:], batch_size - len(chunk))])
        if speculative:
            tokens, st = image_spec.speculative_image_tokens(params, padded, seed=row_seed(seed, b), **kw)
            real = slice(0, len(chunk))
            sums["rounds"] += int(np.sum(np.asarray(st.rounds)[real]))
            sums["accepted"] += int(np.sum(np.asarray(st.accepted)[real]))
            sums["tv"] += float(np.sum(np.asarray(st.tv)[real]))
            sums["draft_forwards"] += int(st.draft_forwards) * len(chunk)
        else:
            tokens = sample_tokens(params, padded, seed=row_seed(seed, b), **kw)
        images = np.asarray(jax.device_get(decode_images(tokens, config=config, tokenizer=run.tokenizer)))
        out.append(images[: len(chunk)])
        if first_s is None:
            first_s = time.perf_counter() - t0
        if bar is not None:
            bar.update(len(chunk))
    total = time.perf_counter() - t0
    if bar is not None:
        bar.close()
    steady = total - first_s
    n_steady = n - min(batch_size, n)
    stats = {"images": n, "batch_size": batch_size, "seconds": total, "first_batch_s": first_s,
             "images_per_s": n_steady / steady if n_steady and steady > 0 else None,
             "forwards_per_image": forwards_per_image(config), "decode": decode}
    if speculative:
        stats.update(window=window, accept=accept, forwards_per_image=sums["rounds"] / n,
                     tokens_per_forward=n * config.seq_len / sums["rounds"],
                     accepted_per_forward=sums["accepted"] / sums["rounds"],
                     tv_bound_per_code=sums["tv"] / (n * config.seq_len),
                     draft_forwards_per_image=sums["draft_forwards"] / n)
    return np.concatenate(out), stats


def _decode_options(args, run):
    """(decode kind, loaded draft run or None) from --decode / --window / --accept, checked against the run."""
    from jaxar.decode.image_spec import parse_decode
    from jaxar.decode.relaxed import parse_accept
    from jaxar.train.vision import load_image_run

    try:
        decode, draft_dir = parse_decode(args.decode)
        parse_accept(args.accept)
    except ValueError as e:
        raise ImageUsageError(str(e)) from None
    if decode == "plain":
        if args.accept != "exact" or args.window is not None:
            raise ImageUsageError("--accept / --window are for speculative decoding: add --decode sjd, mcsjd or "
                                  "draft:DIR")
        return decode, None
    if run.config.kind != "raster":
        raise ImageUsageError(f"--decode {args.decode} is for raster runs; {args.model} is a {run.config.kind} run "
                              "(it samples a whole scale per forward already): drop --decode")
    if args.window is not None and args.window < 1:
        raise ImageUsageError(f"--window must be >= 1, got {args.window}")
    if decode != "draft":
        return decode, None
    try:
        draft_run = load_image_run(draft_dir)
    except (OSError, ValueError) as e:
        raise ImageUsageError(f"--decode draft:{draft_dir}: {e}") from None
    if draft_run.task != "raster":
        raise ImageUsageError(f"--decode draft:{draft_dir} is a {draft_run.task!r} run; the draft must be a raster "
                              "run on the same tokenizer (train.py --config configs/fashion-raster-draft.yaml)")
    for name in ("codebook_size", "num_classes", "side"):
        a, b = getattr(draft_run.config, name), getattr(run.config, name)
        if a != b:
            raise ImageUsageError(f"--decode draft:{draft_dir}: its {name} {a} != the model's {b}; train the draft "
                                  "on the same tokenizer and classes")
    codes = [np.asarray(r.tokenizer[1]["params"]["codebook"]) for r in (draft_run, run)]
    if codes[0].shape != codes[1].shape or not np.array_equal(*codes):
        raise ImageUsageError(f"--decode draft:{draft_dir} was trained on another tokenizer than {args.model}; "
                              "train the draft with the model's tokenizer_run")
    return decode, draft_run


def forwards_per_image(config) -> int:
    """Model forwards one image takes: raster one per token (the class-token prefill included), VAR one per scale."""
    return len(config.patch_nums) if config.kind == "var" else config.seq_len


def run_images(args, stdout=None) -> int:
    """The image branch of sample.py (args from jaxar.decode.cli.build_parser). Raises ImageUsageError."""
    from jaxar.image_metrics import save_grid
    from jaxar.train.images import FASHION_MNIST_CLASSES
    from jaxar.train.vision import load_image_run

    if args.prompt or args.prompts or args.chat:
        raise ImageUsageError(f"{args.model} is an image model: give --labels 0,1,... (class ids), not "
                              "--prompt / --prompts / --chat")
    if args.labels is None:
        raise ImageUsageError(f"{args.model} is an image model: give --labels (comma-separated class ids) and "
                              "--output-dir DIR")
    if args.output_dir is None:
        raise ImageUsageError("--output-dir DIR is required for image models (samples.npz and grid.png go there)")
    if args.per_label < 1:
        raise ImageUsageError(f"--per-label must be >= 1, got {args.per_label}")
    if args.temperature < 0:
        raise ImageUsageError(f"--temperature must be >= 0 (0 = greedy), got {args.temperature}")
    if args.top_k < 0 or not 0 < args.top_p <= 1:
        raise ImageUsageError(f"--top-k must be >= 0 and --top-p in (0, 1], got {args.top_k}, {args.top_p}")
    if args.batch_size is not None and args.batch_size < 1:
        raise ImageUsageError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.cfg_scale is not None and not np.isfinite(args.cfg_scale):
        raise ImageUsageError(f"--cfg-scale must be a finite number, got {args.cfg_scale}")
    out_dir = os.path.abspath(os.path.expanduser(args.output_dir))
    targets = [os.path.join(out_dir, n) for n in ("samples.npz", "grid.png")]
    existing = [t for t in targets if os.path.exists(t)]
    if existing and not args.overwrite:
        raise ImageUsageError(f"{existing[0]} already exists; choose another --output-dir or pass --overwrite")
    try:
        run = load_image_run(args.model)
    except (OSError, ValueError) as e:
        raise ImageUsageError(f"--model {args.model}: {e}") from None
    if run.task not in ("raster", "var"):
        raise ImageUsageError(f"--model {args.model} is a {run.task!r} run, not a generative image model; sample "
                              "from a raster or var run (train.py --config configs/fashion-var.yaml)")
    decode, draft_run = _decode_options(args, run)
    names = FASHION_MNIST_CLASSES if run.config.num_classes == len(FASHION_MNIST_CLASSES) else None
    labels = parse_labels(args.labels, run.config.num_classes, names)
    all_labels = np.repeat(np.asarray(labels, np.int64), args.per_label)
    cfg_scale = DEFAULT_CFG_SCALE if args.cfg_scale is None else args.cfg_scale
    images, stats = sample_run(run, all_labels, cfg_scale=cfg_scale, cfg_schedule=args.cfg_schedule,
                               temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed,
                               batch_size=args.batch_size or DEFAULT_BATCH, progress=not args.no_progress,
                               decode=decode, window=args.window, accept=args.accept, jacobi_init=args.jacobi_init,
                               draft_run=draft_run)
    os.makedirs(out_dir, exist_ok=True)
    tmp = os.path.join(out_dir, ".samples.tmp.npz")
    np.savez(tmp, images=images, labels=all_labels)
    os.replace(tmp, targets[0])
    save_grid(images, targets[1], rows=len(labels), labels=all_labels, class_names=names)
    stats.update(model=os.path.abspath(args.model), kind=run.config.kind, cfg_scale=cfg_scale,
                 cfg_schedule=args.cfg_schedule, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                 seed=args.seed, output_dir=out_dir)
    line = json.dumps(stats)
    print(line, file=sys.stderr)
    if args.stats:
        with open(args.stats, "w") as f:
            f.write(line + "\n")
    print(f"[jaxar] wrote {len(images)} images to {targets[0]} and {targets[1]}", file=sys.stderr)
    return 0


DEFAULT_CFG_SCALE = 2.0
