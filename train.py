"""Train a model: python train.py --config configs/NAME.yaml [key=value ...]

    python train.py --config configs/shakespeare.yaml
    python train.py --config configs/tiny.yaml train.steps=50 model.d_model=64 run_dir=runs/t
    python train.py --config configs/llama-1b.yaml mesh.fsdp=-1 mesh.data=1
    python train.py --config configs/smollm2-sft.yaml init_from=runs/smollm2-135m lora.rank=8
    python train.py --config configs/fashion-vq.yaml                 # image tokenizer (VQ + multi-scale VQ)
    python train.py --config configs/fashion-var.yaml [tokenizer_run=runs/fashion-vq]   # or fashion-raster
    python train.py --config configs/medusa.yaml base_model=runs/smollm2-135m   # draft heads (or eagle.yaml)

Overrides are dotted keys (`train.lr=1e-3`, `data.source=corpus.jsonl`) with
YAML values. `init_from=PATH` starts from a pretrained model (a Hugging Face
directory, a .gguf file or a jaxar run directory; its architecture and
tokenizer are used) and `lora.rank=R` fine-tunes low-rank adapters only; the
merged model is written to run_dir/hf (train.export). Running again with the
same run_dir resumes from the latest complete checkpoint (not from init_from). Multi-host: pass --coordinator HOST:PORT --num-processes N
--process-id I (or set JAX_COORDINATOR_ADDRESS, JAXAR_NUM_PROCESSES,
JAXAR_PROCESS_ID) on every host.
"""

from __future__ import annotations

import argparse
import logging
import sys
import warnings


def _show_warning(message, category, filename, lineno, file=None, line=None):
    """Warnings as one line each (`train.py: warning: ...`), without the source line."""
    print(f"train.py: warning: {message}", file=file or sys.stderr)


def main(argv=None) -> int:
    previous = warnings.showwarning
    warnings.showwarning = _show_warning
    try:
        return _main(argv)
    finally:
        warnings.showwarning = previous


def _main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="YAML run config (configs/*.yaml)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. train.steps=100")
    parser.add_argument("--force", action="store_true",
                        help="if run_dir holds a different run, move its outputs aside and start over")
    parser.add_argument("--coordinator", help="multi-host: coordinator address HOST:PORT")
    parser.add_argument("--num-processes", type=int, help="multi-host: number of processes")
    parser.add_argument("--process-id", type=int, help="multi-host: this process's index")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    from jaxar.config import ConfigError
    from jaxar.train.data import DataError
    from jaxar.train.sharding import initialize_distributed

    try:
        # Before anything touches a jax backend.
        initialize_distributed(args.coordinator, args.num_processes, args.process_id)
        from jaxar.train.config import load_run_config, load_yaml
        from jaxar.train import drafter, vision

        raw = load_yaml(args.config)
        if drafter.is_drafter_config(raw, args.overrides):  # task: medusa | eagle (draft heads on a frozen base)
            config = drafter.load_drafter_run_config(args.config, args.overrides)
            if args.print_config:
                print(config.to_json())
                return 0
            result = drafter.train_drafter(config, force=args.force)
        elif vision.is_image_config(raw) or any(o.split("=", 1)[0].strip() == "task" for o in args.overrides):
            config = vision.load_image_run_config(args.config, args.overrides)
            if args.print_config:
                print(config.to_json())
                return 0
            result = vision.train_image(config, force=args.force)
        else:
            config = load_run_config(args.config, args.overrides)
            if args.print_config:
                print(config.to_json())
                return 0
            from jaxar.train.trainer import train

            result = train(config, force=args.force)
    except (ConfigError, DataError) as e:
        print(f"train.py: error: {e}", file=sys.stderr)
        return 2
    last = max(result.losses) if result.losses else None
    summary = f"[jaxar] step {result.step}"
    if last is not None:
        summary += f", loss {result.losses[last]:.6f}"
    if result.val_losses:
        summary += f", val_loss {result.val_losses[max(result.val_losses)]:.6f}"
    if result.preempted:
        summary += " (stopped by SIGTERM; run again to resume)"
    print(summary + f" -> {result.run_dir}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
