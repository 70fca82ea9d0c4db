#!/usr/bin/env python3
"""Perplexity of a text model over a text source.

    python eval.py --model DIR_OR_GGUF --data SOURCE [--seq-len 1024] [--batch-size 8] [--max-tokens N]
                   [--json] [--output FILE] [--no-progress] [--scan-layers auto|true|false]

--model: a Hugging Face directory, a .gguf file (or a directory holding one), or a
jaxar run / checkpoint directory. --data: anything `train.py`'s data.source takes
("shakespeare", "python_stdlib", a text or .jsonl file, a directory, a glob).
Prints tokens scored, nats/token, perplexity and bits/byte; --json prints them as
JSON instead, --output FILE also writes that JSON. How the text is windowed and
scored: `jaxar.evaluate`. Bad input ends with one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import List, Optional

PROG = "eval.py"


class UsageError(Exception):
    """Bad input from the user: reported in one line, exit code 2."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description="Perplexity of a jaxar / Hugging Face / GGUF model on text.")
    p.add_argument("--model", required=True, help="model directory or .gguf file")
    p.add_argument("--data", required=True, help="text source: shakespeare, a file, .jsonl, directory or glob")
    p.add_argument("--text-field", default="text", help="field holding the text in .jsonl rows (default: text)")
    p.add_argument("--seq-len", type=int, default=None,
                   help="tokens of context per window (default: min(1024, the model's context))")
    p.add_argument("--batch-size", type=int, default=8, help="windows per forward pass (default: 8)")
    p.add_argument("--max-tokens", type=int, default=None, help="stop after scoring this many tokens")
    p.add_argument("--dtype", default=None, help="compute and parameter dtype, e.g. bfloat16 (default: the model's)")
    p.add_argument("--scan-layers", choices=("auto", "true", "false"), default="auto",
                   help="scan over the layers (compiles much faster on CPU) or unroll them (default: auto)")
    p.add_argument("--json", action="store_true", help="print the result as one JSON object")
    p.add_argument("--output", default=None, help="also write the result as JSON to this file")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --output file")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return p


def _check_flags(args) -> None:
    if args.seq_len is not None and args.seq_len < 1:
        raise UsageError(f"--seq-len must be >= 1, got {args.seq_len}")
    if args.batch_size < 1:
        raise UsageError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.max_tokens is not None and args.max_tokens < 1:
        raise UsageError(f"--max-tokens must be >= 1, got {args.max_tokens}")
    if args.output and os.path.exists(args.output) and not args.overwrite:
        raise UsageError(f"--output {args.output} already exists; pass --overwrite to replace it")
    from jaxar.api import resolve_model_path

    try:
        args.model = resolve_model_path(args.model)
    except FileNotFoundError as e:
        raise UsageError(f"--model {args.model}: {e}") from None
    if not os.path.exists(os.path.expanduser(args.model)):
        raise UsageError(f"--model {args.model}: no such file or directory")


def _load_model(args):
    import jaxar
    from jaxar.tokenizer import load_tokenizer

    try:
        config, params = jaxar.from_pretrained(args.model, dtype=args.dtype,
                                               progress=False if args.no_progress else None)
    except (OSError, ValueError) as e:  # ConfigError, CheckpointError and missing files are both
        raise UsageError(f"--model {args.model}: {e}") from None
    if args.scan_layers != "auto":
        config = config.replace(scan_layers=args.scan_layers == "true")
    try:
        tokenizer = load_tokenizer(args.model)
    except (OSError, ValueError) as e:
        raise UsageError(f"--model {args.model}: the model has no tokenizer to read text with ({e})") from None
    return config, params, tokenizer


def _load_documents(args) -> list:
    from jaxar.train.data import DataConfig, DataError, load_documents

    try:
        return load_documents(DataConfig(source=args.data, text_field=args.text_field, shuffle=False))
    except (DataError, OSError) as e:
        raise UsageError(f"--data {args.data}: {e}") from None


def run(argv: Optional[List[str]] = None, stdout=None) -> int:
    args = build_parser().parse_args(argv)
    stdout = stdout or sys.stdout
    try:
        _check_flags(args)
        documents = _load_documents(args)
        config, params, tokenizer = _load_model(args)
        from jaxar.evaluate import perplexity, token_windows

        seq_len = args.seq_len or min(1024, config.max_seq_len)
        if seq_len > config.max_seq_len:
            raise UsageError(f"--seq-len {seq_len} is longer than the model's context ({config.max_seq_len})")
        try:
            windows = token_windows(documents, tokenizer, seq_len=seq_len, max_tokens=args.max_tokens)
        except ValueError as e:
            raise UsageError(f"--data {args.data}: {e}") from None
        if int(windows.tokens.max()) >= config.vocab_size:
            raise UsageError(f"--model {args.model}: the tokenizer gives id {int(windows.tokens.max())}, outside the "
                             f"model's vocabulary of {config.vocab_size}")
        result = perplexity(params, config, windows, batch_size=args.batch_size, progress=not args.no_progress)
    except UsageError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    out = dict(model=args.model, data=args.data, **result.to_dict())
    if args.output:
        tmp = args.output + ".tmp"
        with open(tmp, "w") as f:
            f.write(json.dumps(out, indent=2) + "\n")
        os.replace(tmp, args.output)
    if args.json:
        print(json.dumps(out), file=stdout)
    else:
        print(f"tokens scored:  {result.tokens} in {result.windows} windows of {result.seq_len}\n"
              f"nats/token:     {result.nats_per_token:.6f}\n"
              f"perplexity:     {result.perplexity:.4f}\n"
              f"bits/byte:      {result.bits_per_byte:.6f} ({result.bytes} bytes)", file=stdout)
    return 0


def main() -> None:
    sys.exit(run())


if __name__ == "__main__":
    main()
