"""Speculative decoding speed-up over plain decoding, on real text.

    python benchmarks/speculative.py --target runs/target --draft runs/draft [--batches 1,8,32] [--temperature T]
                                     [--medusa RUN] [--hydra RUN] [--eagle RUN] [--trees 1,16]
                                     [--tree-depth D] [--tree-topk K] [--only medusa,eagle] [--out FILE]

For each prompt set (prose: Shakespeare; code: the Python standard library;
both cut from the validation documents of the target's own training run, so
held out from training) and batch size, times plain greedy `generate`, speculative decoding
with the draft model, with n-gram (prompt lookup) drafts and with trained
Medusa / Hydra heads and EAGLE drafters (a chain, tree size 1, and the
trees of --trees; `--tree-depth` / `--tree-topk` shape them), all in one process
on the same prompts; checks the speculative outputs equal plain greedy; reports
wall-clock speed-up and mean accepted length (tokens per target forward).
Without --target, a tiny random model is used so the script is exercised on
CPU (speed-ups there mean nothing). Prints a table last; JSON with --out.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402

import jaxar  # noqa: E402
from jaxar.decode.generate import generate, pad_prompts  # noqa: E402
from jaxar.decode.sampling import SamplingConfig  # noqa: E402
from jaxar.decode.speculative import speculative_generate  # noqa: E402
from jaxar.tokenizer import load_tokenizer  # noqa: E402


SET_NAMES = {"shakespeare": "prose", "python_stdlib": "code"}


def run_data_config(path):
    """The DataConfig a jaxar run was trained on (None for a Hugging Face dir)."""
    from jaxar.train.checkpoint import find_checkpoint, read_run_config
    from jaxar.train.data import DataConfig

    step_dir = find_checkpoint(path) if path else None
    if step_dir is None:
        return None
    return DataConfig.from_dict(read_run_config(step_dir)["data"])


def prompt_sets(tokenizer, n: int, length: int, data_config=None):
    """n prompts of `length` tokens per source, cut at line starts from the
    source's *validation* documents (held out from training when the models were
    trained on `data_config`; default: Shakespeare as prose, the Python standard
    library as code, with train.py's default 5% split)."""
    from jaxar.train.data import DataConfig, load_documents, split_documents

    if data_config is None:
        data_config = DataConfig(source=["shakespeare", "python_stdlib"])
    sets = {}
    for source in data_config.sources:
        docs = load_documents(DataConfig(source=source, text_field=data_config.text_field,
                                         max_docs=data_config.max_docs))
        _, val = split_documents(docs, data_config.val_fraction or 0.05)
        ids = tokenizer.encode("\n".join(val))
        newline = tokenizer.encode("\n")[-1]
        starts = [0] + [i + 1 for i, t in enumerate(ids[:-length]) if t == newline]
        if len(starts) < n:
            raise SystemExit(f"source {source!r}: its validation documents hold fewer than {n} prompts of "
                             f"{length} tokens")
        picks = [starts[(i * len(starts)) // n] for i in range(n)]
        sets[SET_NAMES.get(source, source)] = [ids[i: i + length] for i in picks]
    return sets


def timed(fn, repeats):
    out = fn()
    jax.block_until_ready(out.tokens)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(fn().tokens)
        times.append(time.perf_counter() - t)
    return statistics.median(times), out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--target")
    ap.add_argument("--draft")
    ap.add_argument("--batches", default="1,8,32")
    ap.add_argument("--num-draft", type=int, default=4)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--temperature", type=float, default=0.0,
                    help="0: greedy (speculative output must equal plain); > 0: sampling, where outputs differ by "
                         "design (exactness is the chi-squared tests' job) and only speed and acceptance are reported")
    ap.add_argument("--medusa", help="a Medusa heads run (train.py --config configs/medusa.yaml)")
    ap.add_argument("--hydra", help="a Hydra heads run (configs/medusa.yaml heads.hydra=true)")
    ap.add_argument("--eagle", help="an EAGLE drafter run (configs/eagle.yaml)")
    ap.add_argument("--trees", default="1,16", help="tree sizes for the heads / EAGLE drafters (1 = a chain)")
    ap.add_argument("--tree-depth", type=int, default=None)
    ap.add_argument("--tree-topk", type=int, default=None)
    ap.add_argument("--draft-vocab", type=int, default=8192,
                    help="EAGLE: draft over the N most frequent training ids when the vocabulary is larger (0: all)")
    ap.add_argument("--only", default=None, help="comma-separated drafter names to run (default: all given)")
    ap.add_argument("--out")
    args = ap.parse_args()
    if args.target:
        config, params = jaxar.from_pretrained(args.target)
        tokenizer = load_tokenizer(args.target)
    else:
        config = jaxar.ModelConfig.llama(vocab_size=257, d_model=64, n_layers=2, n_heads=4, mlp_dim=128,
                                         max_seq_len=512)
        params, tokenizer = jaxar.init_params(config, 0), load_tokenizer("byte")
        args.prompt_len, args.new_tokens, args.batches = 32, 32, "1,8"
    draft_kw = None
    if args.draft:
        dconfig, dparams = jaxar.from_pretrained(args.draft)
        draft_kw = dict(draft="model", draft_params=dparams, draft_config=dconfig)
    candidates = [("model", draft_kw), ("ngram", dict(draft="ngram")), ("trigram", dict(draft="trigram")),
                  ("aded", dict(draft="aded"))]
    for name in ("medusa", "hydra", "eagle"):
        path = getattr(args, name)
        if not path:
            continue
        from jaxar.train.drafter import load_drafter_run

        from jaxar.train.drafter import draft_vocabulary

        run = load_drafter_run(path)
        vocab = (draft_vocabulary(run.token_counts, config.vocab_size, args.draft_vocab)
                 if name == "eagle" and args.draft_vocab else None)
        for n in (int(x) for x in args.trees.split(",")):
            label = f"{name}-{'chain' if n == 1 else f'tree{n}'}"
            candidates.append((label, dict(draft=run.kind, draft_params=run.params, draft_config=run.heads_config,
                                           tree_nodes=n, tree_depth=args.tree_depth, tree_topk=args.tree_topk,
                                           **({"draft_vocab": vocab} if vocab is not None else {}))))
    if args.only:
        keep = set(args.only.split(","))
        candidates = [(n, kw) for n, kw in candidates if n.split("-")[0] in keep or n in keep]
    batches = [int(b) for b in args.batches.split(",")]
    data_config = run_data_config(args.target)
    if args.draft and data_config is not None and run_data_config(args.draft) not in (None, data_config):
        print("warning: the draft was trained on different data than the target; prompts are held out from the "
              "target's training only", file=sys.stderr)
    sets = prompt_sets(tokenizer, max(batches), args.prompt_len, data_config)
    rows = []
    for set_name, prompts in sets.items():
        for batch in batches:
            toks, lens = pad_prompts(prompts[:batch])
            common = dict(config=config, max_new_tokens=args.new_tokens, eos_ids=[],
                          sampling=SamplingConfig(temperature=args.temperature), seed=0)
            t_plain, plain = timed(lambda: generate(params, toks, lens, **common), args.repeats)
            for drafter, kw in candidates:
                if kw is None:
                    continue
                t_spec, spec = timed(lambda: speculative_generate(params, toks, lens, num_draft=args.num_draft,
                                                                  **common, **kw), args.repeats)
                rows.append({
                    "prompts": set_name, "batch": batch, "drafter": drafter,
                    "plain_tok_s": batch * args.new_tokens / t_plain,
                    "spec_tok_s": batch * args.new_tokens / t_spec,
                    "speedup": t_plain / t_spec,
                    "mean_accepted_length": float(np.sum(spec.num_tokens) / max(np.sum(spec.rounds), 1)),
                    "target_forwards": int(np.max(spec.rounds)),
                    "acceptance_at": [round(float(a) / max(int(np.sum(spec.rounds)), 1), 3)
                                      for a in np.asarray(spec.accepted_at)],
                    "identical_to_plain": (bool(np.array_equal(np.asarray(spec.tokens), np.asarray(plain.tokens)))
                                           if args.temperature == 0 else None),
                })
    meta = {"device": jax.devices()[0].device_kind, "jax": jax.__version__, "target": args.target,
            "temperature": args.temperature,
            "draft": args.draft, "num_draft": args.num_draft, "medusa": args.medusa, "hydra": args.hydra,
            "eagle": args.eagle, "trees": args.trees, "tree_depth": args.tree_depth, "tree_topk": args.tree_topk,
            "draft_vocab": args.draft_vocab, "prompt_len": args.prompt_len,
            "new_tokens": args.new_tokens, "date": time.strftime("%Y-%m-%d")}
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"meta": meta, "results": rows}, f, indent=2)
    print(f"\n{meta}")
    print(f"{'prompts':>7} {'batch':>5} {'drafter':>13} {'plain tok/s':>11} {'spec tok/s':>10} {'speedup':>7} "
          f"{'acc.len':>7} {'identical':>9}  acceptance by draft position / tree depth")
    for r in rows:
        print(f"{r['prompts']:>7} {r['batch']:>5} {r['drafter']:>13} {r['plain_tok_s']:>11.1f} {r['spec_tok_s']:>10.1f} "
              f"{r['speedup']:>7.2f} {r['mean_accepted_length']:>7.2f} {'n/a' if r['identical_to_plain'] is None else r['identical_to_plain']!s:>9}  {r['acceptance_at']}")


if __name__ == "__main__":
    main()
