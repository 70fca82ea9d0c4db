"""The `sample.py` command line: batch generation from a jaxar or Hugging Face model directory.

Bad input ends with one line on stderr and exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import List, Optional

import numpy as np


class UsageError(Exception):
    """Bad input from the user: reported in one line, exit code 2."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sample.py", description="Batch generation with jaxar.")
    p.add_argument("--model", required=True, help="jaxar run/checkpoint directory or Hugging Face model directory")
    p.add_argument("--prompt", action="append", default=[], help="prompt text (repeatable)")
    p.add_argument("--prompts", help="JSONL file: rows with \"prompt\" (text) or \"tokens\" (ids)")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=1.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--min-p", type=float, default=0.0)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--num-beams", type=int, default=1)
    p.add_argument("--draft", help="speculative decoding: a draft model directory or a drafter name: 'ngram' "
                   "(prompt lookup), 'trigram' (latest-continuation trigram table), 'aded' (ADED: trigram counts + "
                   "PUCT draft search), or any other drafter registered in jaxar/decode/drafters/")
    p.add_argument("--num-draft", type=int, default=4, help="draft tokens per speculative round")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default=None)
    p.add_argument("--output", help="output JSONL (default: stdout)")
    p.add_argument("--stats", help="write speed statistics as JSON to this file")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return p


def _check_flags(args) -> None:
    if args.max_new_tokens < 1:
        raise UsageError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if args.batch_size < 1:
        raise UsageError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.num_beams < 1:
        raise UsageError(f"--num-beams must be >= 1, got {args.num_beams}")
    if args.temperature < 0:
        raise UsageError(f"--temperature must be >= 0 (0 = greedy), got {args.temperature}")
    if args.top_k < 0:
        raise UsageError(f"--top-k must be >= 0 (0 = off), got {args.top_k}")
    if not 0 < args.top_p <= 1:
        raise UsageError(f"--top-p must be in (0, 1], got {args.top_p}")
    if not 0 <= args.min_p < 1:
        raise UsageError(f"--min-p must be in [0, 1), got {args.min_p}")
    if args.repetition_penalty <= 0:
        raise UsageError(f"--repetition-penalty must be > 0, got {args.repetition_penalty}")
    if args.num_beams > 1 and args.temperature != 0:
        raise UsageError("--num-beams > 1 is deterministic beam search; pass --temperature 0 with it")
    if args.num_draft < 1:
        raise UsageError(f"--num-draft must be >= 1, got {args.num_draft}")
    if args.draft and args.num_beams > 1:
        raise UsageError("--draft (speculative decoding) and --num-beams cannot be combined")
    if args.draft and args.repetition_penalty != 1.0:
        raise UsageError("--draft does not support --repetition-penalty yet")
    if bool(args.prompt) == bool(args.prompts):
        raise UsageError("give prompts with --prompt TEXT (repeatable) or --prompts FILE.jsonl, not both or neither")


def read_prompts(args) -> List[dict]:
    """[{"prompt": str | None, "tokens": list | None}] in input order."""
    if args.prompt:
        return [{"prompt": t, "tokens": None} for t in args.prompt]
    path = args.prompts
    if not os.path.isfile(path):
        raise UsageError(f"--prompts {path}: no such file")
    rows = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError as e:
                raise UsageError(f"{path}:{n}: malformed JSON ({e.msg})") from None
            if not isinstance(row, dict) or ("prompt" not in row and "tokens" not in row):
                raise UsageError(f"{path}:{n}: each row needs a \"prompt\" (text) or \"tokens\" (list of ids)")
            if "tokens" in row:
                toks = row["tokens"]
                if not isinstance(toks, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in toks):
                    raise UsageError(f"{path}:{n}: \"tokens\" must be a list of integers")
                rows.append({"prompt": row.get("prompt"), "tokens": toks, "line": n})
            else:
                if not isinstance(row["prompt"], str):
                    raise UsageError(f"{path}:{n}: \"prompt\" must be a string")
                rows.append({"prompt": row["prompt"], "tokens": None, "line": n})
    if not rows:
        raise UsageError(f"--prompts {path}: the file has no prompts")
    return rows


def _load_model(path: str, dtype):
    import jaxar
    from jaxar.config import ConfigError
    from jaxar.convert.hf import CheckpointError

    if not os.path.isdir(path):
        raise UsageError(f"--model {path}: no such directory")
    if not os.access(path, os.R_OK | os.X_OK):
        raise UsageError(f"--model {path}: directory is not readable")
    try:
        config, params = jaxar.from_pretrained(path, dtype=dtype)
    except (FileNotFoundError, ConfigError, CheckpointError, PermissionError) as e:
        raise UsageError(f"--model {path}: {e}") from None
    from jaxar.models.transformer import decode_params

    # Once per run, not per batch: the layers unstacked, q|k|v and gate|up fused.
    return config, decode_params(params, config)


def _load_tokenizer(path: str):
    from jaxar.tokenizer import load_tokenizer

    try:
        return load_tokenizer(path)
    except (FileNotFoundError, ValueError):
        return None


def _eos_ids(path: str, config, tokenizer) -> tuple:
    """EOS ids: config.json's (the model config) merged with an HF directory's
    generation_config.json (`eos_token_id`, an int or a list); the tokenizer's
    when neither names one."""
    eos = list(config.eos_token_id or ())
    gen_path = os.path.join(path, "generation_config.json")
    if os.path.isfile(gen_path):
        try:
            with open(gen_path, encoding="utf-8") as f:
                gen = json.load(f)
        except (OSError, ValueError) as e:
            raise UsageError(f"--model {path}: cannot read generation_config.json ({e})") from None
        value = gen.get("eos_token_id") if isinstance(gen, dict) else None
        values = [value] if isinstance(value, int) else value if isinstance(value, list) else []
        bad = [v for v in values if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v < config.vocab_size]
        if bad:
            raise UsageError(f"--model {path}: generation_config.json eos_token_id {bad[0]!r} is not a token id in "
                             f"[0, {config.vocab_size})")
        eos += values
    if not eos and tokenizer is not None and getattr(tokenizer, "eos_ids", ()):
        eos = list(tokenizer.eos_ids)
    return tuple(dict.fromkeys(int(e) for e in eos))


def run(argv: Optional[List[str]] = None, stdout=None) -> int:
    args = build_parser().parse_args(argv)
    stdout = stdout or sys.stdout
    try:
        _check_flags(args)
        rows = read_prompts(args)
        return _generate_all(args, rows, stdout)
    except UsageError as e:
        print(f"sample.py: error: {e}", file=sys.stderr)
        return 2


def _generate_all(args, rows, stdout) -> int:
    from tqdm import tqdm

    from jaxar.decode.generate import beam_search, generate, pad_prompts
    from jaxar.decode.sampling import SamplingConfig

    from jaxar.decode import drafters
    from jaxar.decode.speculative import speculative_generate

    config, params = _load_model(args.model, args.dtype)
    tokenizer = _load_tokenizer(args.model)
    draft_kw = None
    if args.draft == "model":
        raise UsageError("--draft model: give the draft model's directory instead")
    if args.draft and args.draft in drafters.names() and not os.path.isdir(args.draft):
        draft_kw = dict(draft=args.draft)
    elif args.draft:
        draft_config, draft_params = _load_model(args.draft, args.dtype)
        if draft_config.vocab_size != config.vocab_size:
            raise UsageError(f"--draft {args.draft}: vocabulary of {draft_config.vocab_size} differs from the "
                             f"model's {config.vocab_size}; the draft must share the tokenizer")
        draft_kw = dict(draft="model", draft_params=draft_params, draft_config=draft_config)
    ids = []
    for i, row in enumerate(rows):
        where = f"{args.prompts}:{row['line']}" if args.prompts else f"--prompt #{i + 1}"
        if row["tokens"] is None:
            if tokenizer is None:
                raise UsageError(f"{where}: text prompt but the model directory has no tokenizer; give \"tokens\"")
            toks = tokenizer.encode_prompt(row["prompt"])  # with BOS when the tokenizer adds one
        else:
            toks = row["tokens"]
        if not toks:
            raise UsageError(f"{where}: empty prompt")
        bad = [t for t in toks if not 0 <= t < config.vocab_size]
        if bad:
            raise UsageError(f"{where}: token id {bad[0]} is outside the vocabulary [0, {config.vocab_size})")
        draft_config = draft_kw.get("draft_config") if draft_kw else None
        if draft_config is not None and draft_config.position != "learned":
            draft_config = None  # RoPE drafts extrapolate; learned positions end at max_seq_len
        for what, cfg in (("model", config), ("draft model", draft_config)):
            if cfg is not None and len(toks) + args.max_new_tokens > cfg.max_seq_len:
                raise UsageError(
                    f"{where}: prompt of {len(toks)} tokens plus --max-new-tokens {args.max_new_tokens} exceeds the "
                    f"{what}'s context of {cfg.max_seq_len}; shorten the prompt or lower --max-new-tokens")
        ids.append(list(toks))

    sampling = SamplingConfig(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, min_p=args.min_p,
                              repetition_penalty=args.repetition_penalty)
    eos = _eos_ids(args.model, config, tokenizer)
    out_f = open(args.output, "w", encoding="utf-8") if args.output else stdout
    stats = {"prompts": len(ids), "generated_tokens": 0, "prefill_tokens": sum(map(len, ids)), "wall_s": 0.0,
             "compile_and_first_batch_s": None}
    t_start = time.perf_counter()
    try:
        batches = range(0, len(ids), args.batch_size)
        for bi, start in enumerate(tqdm(batches, desc="batches", unit="batch", file=sys.stderr,
                                        disable=args.no_progress)):
            chunk = ids[start: start + args.batch_size]
            # Pad the last batch to the batch size: one compiled program per bucket.
            padded = chunk + [chunk[-1]] * (args.batch_size - len(chunk))
            toks, lens = pad_prompts(padded)
            t0 = time.perf_counter()
            if draft_kw is not None:
                res = speculative_generate(params, toks, lens, config=config, max_new_tokens=args.max_new_tokens,
                                           num_draft=args.num_draft, sampling=sampling, seed=args.seed + start,
                                           eos_ids=eos, **draft_kw)
                out_tokens, n_tok, reason = res.tokens, res.num_tokens, res.finish_reason
                real = slice(0, len(chunk))
                stats.setdefault("rounds", 0)
                stats["rounds"] += int(np.asarray(res.rounds)[real].sum())
                stats.setdefault("accepted", 0)
                stats["accepted"] += int(np.asarray(res.accepted)[real].sum())
                # per-position counts include the padding rows of the last batch (copies of a real prompt)
                stats.setdefault("accepted_at", np.zeros(args.num_draft, np.int64))
                stats["accepted_at"] += np.asarray(res.accepted_at)
                stats.setdefault("all_rounds", 0)
                stats["all_rounds"] += int(np.asarray(res.rounds).sum())
            elif args.num_beams > 1:
                res = beam_search(params, toks, lens, config=config, max_new_tokens=args.max_new_tokens,
                                  num_beams=args.num_beams, eos_ids=eos)
                out_tokens, n_tok, reason = res.tokens[:, 0], res.num_tokens[:, 0], res.finish_reason[:, 0]
            else:
                res = generate(params, toks, lens, config=config, max_new_tokens=args.max_new_tokens,
                               sampling=sampling, seed=args.seed + start, eos_ids=eos)
                out_tokens, n_tok, reason = res.tokens, res.num_tokens, res.finish_reason
            out_tokens, n_tok, reason = (np.asarray(x) for x in (out_tokens, n_tok, reason))
            if bi == 0:
                stats["compile_and_first_batch_s"] = time.perf_counter() - t0
            for j, row_ids in enumerate(chunk):
                gen = [int(t) for t in out_tokens[j, : n_tok[j]]]
                stats["generated_tokens"] += len(gen)
                row = rows[start + j]
                text = tokenizer.decode([t for t in gen if t not in eos]) if tokenizer is not None else None
                out_f.write(json.dumps({"prompt": row["prompt"] if row["prompt"] is not None else row_ids,
                                        "completion": text, "tokens": gen,
                                        "finish_reason": "stop" if reason[j] == 0 else "length"}) + "\n")
            out_f.flush()
    finally:
        if args.output:
            out_f.close()
    stats["wall_s"] = time.perf_counter() - t_start
    stats["tokens_per_s"] = stats["generated_tokens"] / max(stats["wall_s"], 1e-9)
    if draft_kw is not None:
        rounds = max(stats["rounds"], 1)
        # tokens emitted per target forward (accepted drafts + the correction/bonus token)
        stats["mean_accepted_length"] = stats["generated_tokens"] / rounds
        stats["acceptance_rate_per_position"] = (stats.pop("accepted_at") / max(stats.pop("all_rounds"), 1)).tolist()
        print(f"speculative: mean accepted length {stats['mean_accepted_length']:.2f} tokens per target forward; "
              f"acceptance by draft position {[round(x, 3) for x in stats['acceptance_rate_per_position']]}",
              file=sys.stderr)
    print(f"generated {stats['generated_tokens']} tokens for {len(ids)} prompts in {stats['wall_s']:.2f}s "
          f"({stats['tokens_per_s']:.1f} tok/s, first batch incl. compile {stats['compile_and_first_batch_s']:.2f}s)",
          file=sys.stderr)
    if args.stats:
        with open(args.stats, "w") as f:
            json.dump(stats, f, indent=2)
    return 0


def main() -> None:
    sys.exit(run())
