"""The `sample.py` command line: batch generation from a jaxar or Hugging Face model directory.

Prompts: `--prompt TEXT` (repeatable), `--chat TEXT` (repeatable: one
conversation of one user turn each, after `--system TEXT` if given), or
`--prompts FILE.jsonl` whose rows hold "prompt" (text), "tokens" (ids) or
"messages" (a conversation `[{"role", "content"}, ...]`). Conversations are
rendered with the model's chat template as transformers'
`apply_chat_template(add_generation_prompt=True)` renders them (jaxar.chat),
tokenized without adding BOS again, and generation also stops at the
end-of-turn tokens (`<|im_end|>`, `<|eot_id|>`, `<|end|>`, `<end_of_turn>`)
the vocabulary has.

Output: one JSONL row per prompt (per sample with `--num-samples N > 1`,
which adds a "sample" index): "prompt" (the text, token ids, or for a
conversation the rendered prompt text, with the conversation under
"messages"), "completion", "tokens" (generated ids) and "finish_reason"
("stop": EOS / end of turn / a `--stop` string; "length": the budget).

`--stop STRING` (repeatable): a completion ends before the first occurrence
of any stop string in its decoded text; "tokens" then ends with the token that
completed the stop string. `--stream` prints completions to stdout as they are
produced (row by row, in order; each followed by a newline) and writes the
JSONL only to `--output`.

Bad input ends with one line on stderr and exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from typing import List, Optional

import numpy as np


class UsageError(Exception):
    """Bad input from the user: reported in one line, exit code 2."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sample.py", description="Batch generation with jaxar.")
    p.add_argument("--model", required=True, help="jaxar run/checkpoint directory, Hugging Face model directory or "
                   "llama.cpp .gguf file")
    p.add_argument("--prompt", action="append", default=[], help="prompt text (repeatable)")
    p.add_argument("--prompts", help="JSONL file: rows with \"prompt\" (text), \"tokens\" (ids) or \"messages\" "
                   "(a conversation: [{\"role\": ..., \"content\": ...}, ...], rendered with the chat template)")
    p.add_argument("--chat", action="append", default=[], help="a user message, rendered with the model's chat "
                   "template (repeatable: one conversation each)")
    p.add_argument("--system", help="system message for the --chat conversations")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=1.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--min-p", type=float, default=0.0)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--presence-penalty", type=float, default=0.0, help="OpenAI presence penalty: subtracted once "
                   "from the logit of every token generated so far (the prompt does not count)")
    p.add_argument("--frequency-penalty", type=float, default=0.0, help="OpenAI frequency penalty: subtracted from "
                   "a token's logit once per time it was generated so far (the prompt does not count)")
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable): the completion ends "
                   "before its first occurrence")
    p.add_argument("--num-samples", type=int, default=1, help="completions per prompt (rows carry a \"sample\" "
                   "index when > 1)")
    p.add_argument("--stream", action="store_true", help="print completions to stdout as they are generated, in "
                   "row order; the JSONL goes to --output only")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=None, help="rows per batch (default: 8 for text, 64 for images)")
    p.add_argument("--num-beams", type=int, default=1)
    p.add_argument("--draft", help="speculative decoding: a draft model directory, a Medusa/Hydra or EAGLE "
                   "drafter run (train.py --config configs/medusa.yaml / eagle.yaml), or a drafter name: 'ngram' "
                   "(prompt lookup), 'trigram' (latest-continuation trigram table), 'aded' (ADED: trigram counts + "
                   "PUCT draft search), 'jacobi' / 'mcjacobi' (speculative Jacobi windows, SJD / MC-SJD), or any other drafter registered in jaxar/decode/drafters/")
    p.add_argument("--num-draft", type=int, default=4, help="draft tokens per speculative round (chain drafters)")
    p.add_argument("--tree-nodes", type=int, default=None, help="heads / EAGLE drafters: draft tree size N, "
                   "verified in one target forward (1 = a chain; default 16)")
    p.add_argument("--tree-depth", type=int, default=None, help="heads / EAGLE drafters: deepest draft (default: "
                   "the number of heads for Medusa/Hydra, 5 for EAGLE)")
    p.add_argument("--tree-topk", type=int, default=None, help="heads / EAGLE drafters: children tried per node "
                   "(default 4)")
    p.add_argument("--acceptance", choices=["exact", "typical"], default="exact", help="heads / EAGLE drafters, "
                   "sampled rows: exact (lossless recursive rejection) or typical (Medusa's typical acceptance: "
                   "faster, LOSSY, see jaxar/decode/tree.py)")
    p.add_argument("--draft-vocab", type=int, default=None, help="EAGLE drafters: draft only the N most frequent "
                   "ids of the drafter's training data (a cheaper draft head; default 8192 for vocabularies over "
                   "16384, 0 = the whole vocabulary)")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default=None)
    p.add_argument("--weight-quant", choices=["none", "int8"], default=None,
                   help="int8: weight-only int8 with a float scale per output channel (default: the model's)")
    p.add_argument("--kv-cache-dtype", choices=["auto", "int8", "float32", "bfloat16"], default=None,
                   help="KV cache storage; int8: one float scale per slot and kv head (default: auto = --dtype)")
    p.add_argument("--mesh", help="run over a device mesh, e.g. 'data=2,tensor=4' (axes data, fsdp, tensor; -1: "
                   "the remaining devices); params placed with the training sharding rules")
    p.add_argument("--output", help="output JSONL (default: stdout)")
    p.add_argument("--stats", help="write speed statistics as JSON to this file")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    img = p.add_argument_group("image models (raster / VAR runs)")
    img.add_argument("--labels", help="comma-separated class ids to sample, e.g. 0,1,2 (a grid row each)")
    img.add_argument("--per-label", type=int, default=8, help="images per label (default 8)")
    img.add_argument("--cfg-scale", type=float, default=None, help="classifier-free guidance scale: 1 = "
                     "conditional, 0 = unconditional, > 1 = stronger (default 2.0)")
    img.add_argument("--cfg-schedule", choices=["constant", "linear"], default=None, help="guidance across steps "
                     "/ scales: constant, or linear (VAR's ramp from 0 at the first step to --cfg-scale at the last); "
                     "default: the model kind's")
    img.add_argument("--output-dir", help="where samples.npz and grid.png are written")
    img.add_argument("--overwrite", action="store_true", help="replace samples.npz / grid.png in --output-dir")
    img.add_argument("--decode", default="plain", help="raster models: plain (one forward per code), sjd "
                     "(speculative Jacobi decoding), mcsjd (SJD with coupled draws) or draft:DIR (a small raster run "
                     "on the same tokenizer drafts); default plain")
    img.add_argument("--window", type=int, default=None, help="--decode sjd / mcsjd / draft: codes drafted per "
                     "round (default 16 for sjd / mcsjd, 4 for draft)")
    img.add_argument("--accept", default="exact", help="--decode sjd / mcsjd / draft: exact (the model's "
                     "distribution), lantern:K,DELTA (K latent neighbours, per-code total-variation budget DELTA) or "
                     "gsd:G[,P_THR[,D_THR]] (grouped acceptance over +-G ranks); default exact")
    img.add_argument("--jacobi-init", choices=["random", "previous"], default="random", help="--decode sjd / "
                     "mcsjd: how codes entering the window start: random codes, or the previous iteration's newest "
                     "distribution")
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
    if args.draft_vocab is not None and args.draft_vocab < 0:
        raise UsageError(f"--draft-vocab must be >= 0 (0: the whole vocabulary), got {args.draft_vocab}")
    for name in ("tree_nodes", "tree_depth", "tree_topk"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
        if value is not None and not args.draft:
            raise UsageError(f"--{name.replace('_', '-')} needs --draft RUN (a Medusa/Hydra or EAGLE drafter run)")
    if args.draft and args.num_beams > 1:
        raise UsageError("--draft (speculative decoding) and --num-beams cannot be combined")
    if args.draft and args.repetition_penalty != 1.0:
        raise UsageError("--draft does not support --repetition-penalty yet")
    for name in ("presence_penalty", "frequency_penalty"):
        value = getattr(args, name)
        if not math.isfinite(value):
            raise UsageError(f"--{name.replace('_', '-')} must be a finite number (0 = off), got {value}")
    if args.num_samples < 1:
        raise UsageError(f"--num-samples must be >= 1, got {args.num_samples}")
    if args.num_samples > 1 and args.num_beams > 1:
        raise UsageError("--num-samples > 1 and --num-beams cannot be combined (beam search returns one sequence)")
    penalties = args.presence_penalty != 0 or args.frequency_penalty != 0
    if penalties and args.draft:
        raise UsageError("--draft does not support --presence-penalty / --frequency-penalty yet")
    if penalties and args.num_beams > 1:
        raise UsageError("--num-beams does not support --presence-penalty / --frequency-penalty")
    if args.stream and (args.draft or args.num_beams > 1):
        raise UsageError("--stream works with plain sampling only, not with --draft or --num-beams")
    if any(s == "" for s in args.stop):
        raise UsageError("--stop needs a non-empty string")
    if sum(map(bool, (args.prompt, args.prompts, args.chat))) != 1:
        raise UsageError("give prompts with --prompt TEXT (repeatable), --chat TEXT (repeatable) or --prompts "
                         "FILE.jsonl: exactly one of them")
    if args.system is not None and not args.chat:
        raise UsageError("--system applies to --chat conversations; give --chat TEXT with it (in --prompts files "
                         "put the system turn in \"messages\")")


def _check_messages(messages, where: str) -> list:
    if not isinstance(messages, list) or not messages:
        raise UsageError(f"{where}: \"messages\" must be a non-empty list of {{\"role\", \"content\"}} objects")
    for k, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise UsageError(f"{where}: message {k} must be an object with a string \"role\" (and \"content\")")
    return messages


def read_prompts(args) -> List[dict]:
    """[{"prompt": str | None, "tokens": list | None, "messages": list | None}] in input order."""
    if args.prompt:
        return [{"prompt": t, "tokens": None, "messages": None} for t in args.prompt]
    if args.chat:
        system = [] if args.system is None else [{"role": "system", "content": args.system}]
        return [{"prompt": None, "tokens": None, "messages": system + [{"role": "user", "content": t}]}
                for t in args.chat]
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
            if not isinstance(row, dict) or not any(k in row for k in ("prompt", "tokens", "messages")):
                raise UsageError(f"{path}:{n}: each row needs a \"prompt\" (text), \"tokens\" (list of ids) or "
                                 f"\"messages\" (a conversation)")
            if "messages" in row:
                if "prompt" in row or "tokens" in row:
                    raise UsageError(f"{path}:{n}: give \"messages\" alone, not with \"prompt\" or \"tokens\"")
                rows.append({"prompt": None, "tokens": None, "messages": _check_messages(row["messages"],
                                                                                           f"{path}:{n}"), "line": n})
            elif "tokens" in row:
                toks = row["tokens"]
                if not isinstance(toks, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in toks):
                    raise UsageError(f"{path}:{n}: \"tokens\" must be a list of integers")
                rows.append({"prompt": row.get("prompt"), "tokens": toks, "messages": None, "line": n})
            else:
                if not isinstance(row["prompt"], str):
                    raise UsageError(f"{path}:{n}: \"prompt\" must be a string")
                rows.append({"prompt": row["prompt"], "tokens": None, "messages": None, "line": n})
    if not rows:
        raise UsageError(f"--prompts {path}: the file has no prompts")
    return rows


def _resolve(path: str, flag: str) -> str:
    from jaxar.api import resolve_model_path

    try:
        return resolve_model_path(path)
    except FileNotFoundError as e:
        raise UsageError(f"{flag} {path}: {e}") from None


def _parse_mesh(text: Optional[str]):
    if not text:
        return None
    sizes = {}
    for part in text.split(","):
        name, eq, value = part.partition("=")
        name = name.strip()
        if not eq or name not in ("data", "fsdp", "tensor"):
            raise UsageError(f"--mesh {text}: use axis=size pairs over data, fsdp, tensor, e.g. 'data=2,tensor=4'")
        try:
            sizes[name] = int(value)
        except ValueError:
            raise UsageError(f"--mesh {text}: {name}={value!r} is not an integer") from None
    from jaxar.train.sharding import make_mesh

    try:
        return make_mesh(sizes)
    except ValueError as e:
        raise UsageError(f"--mesh {text}: {e}") from None


def _load_model(path: str, dtype, progress: Optional[bool] = None, *, weight_quant=None, kv_cache_dtype=None,
                mesh=None):
    import jaxar
    from jaxar.config import ConfigError
    from jaxar.convert.hf import CheckpointError

    is_gguf = os.path.isfile(path) and path.lower().endswith(".gguf")
    if not is_gguf and not os.path.isdir(path):
        raise UsageError(f"--model {path}: no such directory (or .gguf file)")
    if not os.access(path, os.R_OK | (0 if is_gguf else os.X_OK)):
        raise UsageError(f"--model {path}: {'file' if is_gguf else 'directory'} is not readable")
    try:
        config, params = jaxar.from_pretrained(path, dtype=dtype, progress=progress, weight_quant=weight_quant,
                                               kv_cache_dtype=kv_cache_dtype, mesh=mesh)
    except (FileNotFoundError, ConfigError, CheckpointError, PermissionError, ValueError) as e:
        raise UsageError(f"--model {path}: {e}") from None
    if mesh is not None:
        return config, params  # already in the decode layout, placed on the mesh
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
        args.model = _resolve(args.model, "--model")
        if _image_run(args.model):
            from jaxar.decode.image_cli import ImageUsageError, run_images

            try:
                return run_images(args, stdout)
            except ImageUsageError as e:
                raise UsageError(str(e)) from None
        if args.decode != "plain" or args.accept != "exact" or args.window is not None:
            raise UsageError(f"--decode / --accept / --window are for raster image models, and {args.model} is a "
                             "text model; for text use --draft (jacobi / mcjacobi for Jacobi windows, a draft DIR, ngram, ...)")
        if args.labels is not None or args.output_dir is not None:
            raise UsageError(f"--labels / --output-dir are for image models, and {args.model} is a text model; "
                             "give it --prompt TEXT (or --chat / --prompts) instead")
        if args.batch_size is None:
            args.batch_size = 8
        _check_flags(args)
        rows = read_prompts(args)
        return _generate_all(args, rows, stdout)
    except UsageError as e:
        print(f"sample.py: error: {e}", file=sys.stderr)
        return 2


def _image_run(path: str) -> bool:
    from jaxar.train.vision import run_task

    return os.path.isdir(path) and run_task(path) is not None


def _where(args, row, i: int) -> str:
    if args.prompts:
        return f"{args.prompts}:{row['line']}"
    return f"--chat #{i + 1}" if args.chat else f"--prompt #{i + 1}"


def _encode_rows(args, rows, tokenizer, config):
    """Token ids of every row; conversations rendered with the model's chat template."""
    from jaxar.chat import ChatTemplateError, load_chat_template

    template = None
    if any(row["messages"] is not None for row in rows):
        if tokenizer is None:
            raise UsageError(f"--model {args.model}: chat prompts need a tokenizer, and the model has none")
        try:
            template = load_chat_template(args.model, tokenizer)
        except ChatTemplateError as e:
            raise UsageError(f"--model {args.model}: {e}") from None
        if template is None:
            raise UsageError(f"--model {args.model}: the model has no chat template (no chat_template.jinja, no "
                             f"chat_template in tokenizer_config.json); give plain --prompt text instead")
    ids = []
    for i, row in enumerate(rows):
        where = _where(args, row, i)
        if row["messages"] is not None:
            try:
                row["prompt"] = template.render(row["messages"], add_generation_prompt=True)
            except ChatTemplateError as e:
                raise UsageError(f"{where}: {e}") from None
            toks = tokenizer.encode(row["prompt"])  # no BOS added: the template writes it when the model wants one
        elif row["tokens"] is None:
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
        ids.append(list(toks))
    return ids, template is not None


def first_stop(text: str, stops) -> Optional[int]:
    """Index in `text` where the earliest of the stop strings begins, or None."""
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(hits) if hits else None


def _held_back(text: str, stops) -> int:
    """Length of the longest end of `text` that could still grow into a stop string."""
    best = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), best, -1):
            if s.startswith(text[-k:]):
                best = k
                break
    return best


def _byte_level_alphabet() -> dict:
    """GPT-2's byte-to-character map, inverted: the character a byte-level BPE token uses -> the byte."""
    byte_ids = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(
        range(ord("®"), ord("ÿ") + 1))
    chars, extra = list(byte_ids), 0
    for b in range(256):
        if b not in byte_ids:
            byte_ids.append(b)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(byte_ids, chars)}


def token_bytes(tokenizer, vocab_size: int) -> Optional[list]:
    """The bytes each token id adds to the decoded text (b"" for ids the decoder drops),
    for byte-level tokenizers (jaxar's byte tokenizer, byte-level BPE: GPT-2, Llama 3,
    Qwen, SmolLM); None for others (stop strings are then only cut after generation)."""
    from jaxar.tokenizer import ByteTokenizer

    if isinstance(tokenizer, ByteTokenizer):
        return [bytes([i]) if i < 256 else b"" for i in range(vocab_size)]
    hf = getattr(tokenizer, "hf_tokenizer", None)
    try:
        from tokenizers import decoders
    except ImportError:  # pragma: no cover
        return None
    if hf is None or not isinstance(hf.decoder, decoders.ByteLevel):
        return None
    alphabet = _byte_level_alphabet()
    added = hf.get_added_tokens_decoder()
    out = []
    for i in range(vocab_size):
        if i in added:
            out.append(b"" if added[i].special else added[i].content.encode("utf-8"))
            continue
        piece = hf.id_to_token(i) if i < tokenizer.vocab_size else None
        if piece is None:
            out.append(b"")  # past the tokenizer's vocabulary: decode drops it
        elif all(ch in alphabet for ch in piece):
            out.append(bytes(alphabet[ch] for ch in piece))
        else:
            out.append(None)
    # a check on a sample of ids: the bytes must be what decode gives
    sample = [i for i in range(0, vocab_size, max(1, vocab_size // 97)) if out[i]][:64]
    if sample and tokenizer.decode(sample) != b"".join(out[i] for i in sample).decode("utf-8", errors="replace"):
        return None
    return out


class _Finisher:
    """Completion text of generated ids: EOS ids dropped, cut before the first stop string."""

    def __init__(self, tokenizer, eos, stops):
        self.tokenizer, self.eos, self.stops = tokenizer, set(eos), list(stops)

    def text(self, gen) -> Optional[str]:
        if self.tokenizer is None:
            return None
        return self.tokenizer.decode([t for t in gen if t not in self.eos])

    def finish(self, gen, reason: str):
        """(completion, tokens, finish_reason) of one row."""
        text = self.text(gen)
        if text is None or not self.stops:
            return text, gen, reason
        cut = first_stop(text, self.stops)
        if cut is None:
            return text, gen, reason
        # the shortest prefix of the tokens whose text holds a stop string (binary search)
        lo, hi = 1, len(gen)
        while lo < hi:
            mid = (lo + hi) // 2
            if first_stop(self.text(gen[:mid]), self.stops) is not None:
                hi = mid
            else:
                lo = mid + 1
        return text[:cut], gen[:lo], "stop"

    def partial(self, gen) -> str:
        """Text of a row still generating that is safe to print: no incomplete character at
        the end, nothing that may turn out to be the start of a stop string."""
        text = self.text(gen) or ""
        cut = first_stop(text, self.stops) if self.stops else None
        if cut is not None:
            return text[:cut]
        text = text.rstrip("\ufffd")
        return text[:len(text) - _held_back(text, self.stops)] if self.stops else text


class _StreamPrinter:
    """`--stream`: completions to stdout as produced, row by row in order; each ends with a newline.

    `on_tokens` is the decode loop's host callback (one call per step); rows of
    later batches are printed when their turn comes."""

    def __init__(self, out, finisher: _Finisher):
        self.out, self.finisher = out, finisher
        self.tokens, self.printed, self.final = {}, {}, {}
        self.current = 0
        self.batch_start, self.batch_rows = 0, 0

    def on_tokens(self, tokens, num_tokens, done):
        for j in range(self.batch_rows):
            row = self.batch_start + j
            got = self.tokens.setdefault(row, [])
            n = int(num_tokens[j])
            got.extend(int(t) for t in tokens[j, : n - len(got)])
        self._flush()

    def finish(self, row: int, completion: str):
        self.final[row] = completion or ""
        self._flush()

    def _write(self, row: int, text: str):
        done = self.printed.get(row, "")
        if text.startswith(done) and len(text) > len(done):
            self.out.write(text[len(done):])
            self.out.flush()
            self.printed[row] = text

    def _flush(self):
        while True:
            row = self.current
            if row in self.final:
                final = self.final[row]
                done = self.printed.get(row, "")
                self.out.write((final[len(done):] if final.startswith(done) else final) + "\n")
                self.out.flush()
                self.current += 1
                continue
            if row in self.tokens:
                self._write(row, self.finisher.partial(self.tokens[row]))
            return


def _generate_all(args, rows, stdout) -> int:
    from tqdm import tqdm

    from jaxar.chat import end_of_turn_ids
    from jaxar.decode.generate import beam_search, generate, pad_prompts
    from jaxar.decode.sampling import SamplingConfig

    from jaxar.decode import drafters
    from jaxar.decode.speculative import speculative_generate

    mesh = _parse_mesh(args.mesh)
    quant = dict(weight_quant=args.weight_quant, kv_cache_dtype=args.kv_cache_dtype, mesh=mesh)
    config, params = _load_model(args.model, args.dtype, progress=False if args.no_progress else None, **quant)
    tokenizer = _load_tokenizer(args.model)
    draft_kw = None
    if args.draft == "model":
        raise UsageError("--draft model: give the draft model's directory instead")
    from jaxar.train.drafter import is_drafter_run, load_drafter_run

    tree_flags = [n for n in ("tree_nodes", "tree_depth", "tree_topk") if getattr(args, n) is not None]
    if args.draft and args.draft in drafters.names() and not os.path.isdir(args.draft):
        draft_kw = dict(draft=args.draft)
    elif args.draft and os.path.isdir(args.draft) and is_drafter_run(args.draft):
        try:
            run = load_drafter_run(args.draft)
        except (OSError, ValueError) as e:
            raise UsageError(f"--draft {args.draft}: {e}") from None
        if run.base_config is not None and run.base_config.vocab_size != config.vocab_size:
            raise UsageError(f"--draft {args.draft}: the drafter was trained on a base with a vocabulary of "
                             f"{run.base_config.vocab_size}, the model has {config.vocab_size}; train it on this "
                             "model (base_model=...)")
        if run.base_config is not None and run.base_config.d_model != config.d_model:
            raise UsageError(f"--draft {args.draft}: the drafter reads {run.base_config.d_model}-wide hidden states, "
                             f"the model's are {config.d_model}; train it on this model (base_model=...)")
        from jaxar.train.drafter import draft_vocabulary

        size = args.draft_vocab if args.draft_vocab is not None else (8192 if config.vocab_size > 16384 else 0)
        vocab = draft_vocabulary(run.token_counts, config.vocab_size, size) if size else None
        draft_kw = dict(draft=run.kind, draft_params=run.params, draft_config=run.heads_config,
                        tree_nodes=args.tree_nodes or 16, tree_depth=args.tree_depth,
                        tree_topk=args.tree_topk, draft_vocab=vocab, acceptance=args.acceptance)
    elif args.draft:
        draft_config, draft_params = _load_model(args.draft, args.dtype, progress=False if args.no_progress else None,
                                                 **quant)
        if draft_config.vocab_size != config.vocab_size:
            raise UsageError(f"--draft {args.draft}: vocabulary of {draft_config.vocab_size} differs from the "
                             f"model's {config.vocab_size}; the draft must share the tokenizer")
        draft_kw = dict(draft="model", draft_params=draft_params, draft_config=draft_config)
    if args.acceptance != "exact" and (draft_kw is None or "tree_nodes" not in draft_kw):
        raise UsageError("--acceptance typical applies to Medusa/Hydra and EAGLE drafter runs only")
    if tree_flags and (draft_kw is None or "tree_nodes" not in draft_kw):
        raise UsageError(f"--{tree_flags[0].replace('_', '-')} applies to Medusa/Hydra and EAGLE drafter runs only; "
                         f"--draft {args.draft} drafts chains (use --num-draft)")
    if args.stop and tokenizer is None:
        raise UsageError(f"--stop needs the model's tokenizer to decode text, and {args.model} has none")
    ids, chat = _encode_rows(args, rows, tokenizer, config)
    draft_config = draft_kw.get("draft_config") if draft_kw and draft_kw["draft"] == "model" else None
    if draft_config is not None and draft_config.position != "learned":
        draft_config = None  # RoPE drafts extrapolate; learned positions end at max_seq_len
    for i, (row, toks) in enumerate(zip(rows, ids)):
        for what, cfg in (("model", config), ("draft model", draft_config)):
            if cfg is not None and len(toks) + args.max_new_tokens > cfg.max_seq_len:
                raise UsageError(
                    f"{_where(args, row, i)}: prompt of {len(toks)} tokens plus --max-new-tokens "
                    f"{args.max_new_tokens} exceeds the {what}'s context of {cfg.max_seq_len}; shorten the prompt "
                    f"or lower --max-new-tokens")

    sampling = SamplingConfig(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, min_p=args.min_p,
                              repetition_penalty=args.repetition_penalty, presence_penalty=args.presence_penalty,
                              frequency_penalty=args.frequency_penalty)
    eos = _eos_ids(args.model, config, tokenizer)
    if chat:  # a chat turn ends at the template's end-of-turn token
        eos = tuple(t for t in end_of_turn_ids(tokenizer, eos) if 0 <= t < config.vocab_size)
    # --num-samples: each prompt's rows side by side (distinct batch rows draw with distinct keys)
    n_samples = args.num_samples
    order = [(i, k) for i in range(len(ids)) for k in range(n_samples)]
    all_ids = [ids[i] for i, _ in order]
    finisher = _Finisher(tokenizer, eos, args.stop)
    stop_table = None  # stop strings inside the decode loop, where the tokens' bytes are known
    if args.stop and draft_kw is None and args.num_beams == 1:
        from jaxar.decode.loop import stop_string_table

        pieces = token_bytes(tokenizer, config.vocab_size)
        if pieces is not None:
            pieces = [b"" if i in eos else p for i, p in enumerate(pieces)]  # EOS ids are dropped from the text
            stop_table = stop_string_table(args.stop, pieces)
    printer = _StreamPrinter(stdout, finisher) if args.stream else None
    if args.stream and tokenizer is None:
        raise UsageError(f"--stream prints text and needs the model's tokenizer; {args.model} has none")
    out_f = open(args.output, "w", encoding="utf-8") if args.output else (None if args.stream else stdout)
    stats = {"prompts": len(ids), "samples_per_prompt": n_samples, "generated_tokens": 0,
             "prefill_tokens": sum(map(len, all_ids)), "wall_s": 0.0, "compile_and_first_batch_s": None,
             "dtype": config.dtype, "weight_quant": config.weight_quant, "kv_cache_dtype": config.cache_dtype,
             "mesh": dict(mesh.shape) if mesh is not None else None}
    t_start = time.perf_counter()
    try:
        batches = range(0, len(all_ids), args.batch_size)
        for bi, start in enumerate(tqdm(batches, desc="batches", unit="batch", file=sys.stderr,
                                        disable=args.no_progress or args.stream)):
            chunk = all_ids[start: start + args.batch_size]
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
                stats.setdefault("accepted_at", np.zeros(len(np.asarray(res.accepted_at)), np.int64))
                stats["accepted_at"] += np.asarray(res.accepted_at)
                stats.setdefault("all_rounds", 0)
                stats["all_rounds"] += int(np.asarray(res.rounds).sum())
            elif args.num_beams > 1:
                res = beam_search(params, toks, lens, config=config, max_new_tokens=args.max_new_tokens,
                                  num_beams=args.num_beams, eos_ids=eos)
                out_tokens, n_tok, reason = res.tokens[:, 0], res.num_tokens[:, 0], res.finish_reason[:, 0]
            else:
                if printer is not None:
                    printer.batch_start, printer.batch_rows = start, len(chunk)
                res = generate(params, toks, lens, config=config, max_new_tokens=args.max_new_tokens,
                               sampling=sampling, seed=args.seed + start, eos_ids=eos,
                               on_tokens=None if printer is None else printer.on_tokens, stop_table=stop_table)
                out_tokens, n_tok, reason = res.tokens, res.num_tokens, res.finish_reason
            out_tokens, n_tok, reason = (np.asarray(x) for x in (out_tokens, n_tok, reason))
            if bi == 0:
                stats["compile_and_first_batch_s"] = time.perf_counter() - t0
            for j, row_ids in enumerate(chunk):
                gen = [int(t) for t in out_tokens[j, : n_tok[j]]]
                i, k = order[start + j]
                row = rows[i]
                stats["generated_tokens"] += len(gen)
                text, gen, why = finisher.finish(gen, "stop" if reason[j] == 0 else "length")
                if printer is not None:
                    printer.finish(start + j, text)
                record = {"prompt": row["prompt"] if row["prompt"] is not None else row_ids}
                if row["messages"] is not None:
                    record["messages"] = row["messages"]
                record.update(completion=text, tokens=gen, finish_reason=why)
                if n_samples > 1:
                    record["sample"] = k
                if out_f is not None:
                    out_f.write(json.dumps(record) + "\n")
            if out_f is not None:
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
        stats["tokens_per_target_forward"] = stats["mean_accepted_length"]
        stats["acceptance_rate_per_position"] = (stats.pop("accepted_at") / max(stats.pop("all_rounds"), 1)).tolist()
        where = "tree depth" if "tree_nodes" in draft_kw else "draft position"
        print(f"speculative: mean accepted length {stats['mean_accepted_length']:.2f} tokens per target forward; "
              f"acceptance by {where} {[round(x, 3) for x in stats['acceptance_rate_per_position']]}",
              file=sys.stderr)
    print(f"generated {stats['generated_tokens']} tokens for {len(all_ids)} rows in {stats['wall_s']:.2f}s "
          f"({stats['tokens_per_s']:.1f} tok/s, first batch incl. compile {stats['compile_and_first_batch_s']:.2f}s)",
          file=sys.stderr)
    if args.stats:
        with open(args.stats, "w") as f:
            json.dump(stats, f, indent=2)
    return 0


def main() -> None:
    sys.exit(run())
