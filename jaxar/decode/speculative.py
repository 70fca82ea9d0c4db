"""Speculative decoding: the decode loop with a draft -> verify step.

Per round a drafter (`drafters/`, looked up by name) proposes k tokens per
row; the target scores the k+1 positions [last, x_0 .. x_{k-1}] in one
forward; acceptance decides per row how many drafts to keep and draws one
more token, so the step emits accepted + 1 tokens and the driver (`loop.py`)
applies EOS and budgets exactly as for plain sampling. Each row's cache
length then advances by what it kept: rejected entries simply lie beyond the
length, so rows that accepted different numbers of tokens never need
realignment (the failure mode "Batch Speculative Decoding Done Right"
describes).

Invariant between rounds, per row: the driver's sequence buffer holds prompt +
output (`seq_len` tokens); the target cache holds all but the last of them.
Greedy rows (temperature 0) accept while the draft equals the target argmax,
so greedy output equals `generate`'s token for token; sampled rows use the
exact rejection rule of `acceptance.py`.
"""

from __future__ import annotations

import functools
from typing import NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxar.cache import KVCache
from jaxar.config import ModelConfig
from jaxar.decode import drafters, loop
from jaxar.decode.acceptance import deterministic_accept, emitted_tokens, greedy_accept, speculative_accept
from jaxar.decode.drafters import DraftContext
# Re-exported: the drafters' building blocks used to live here.
from jaxar.decode.drafters.aded import ADED_C_PUCT, ADED_CANDIDATES, ADED_TABLE_SIZE, AdedTable  # noqa: F401
from jaxar.decode.drafters.ngram import ngram_drafts  # noqa: F401
from jaxar.decode.drafters.trigram import pair_hash as _pair_hash  # noqa: F401
from jaxar.decode.drafters.trigram import trigram_drafts  # noqa: F401
from jaxar.decode.generate import (check_context, check_request, clipped_positions, decode_layout,
                                   eos_array, eos_tuple, fit_width, plan_shapes)
from jaxar.decode.loop import StepOutput
from jaxar.decode.sampling import Sampling, SamplingConfig, SamplingParams, probabilities, row_keys
from jaxar.models.transformer import forward
from jaxar.parallel import check_same_mesh


class SpeculativeOutput(NamedTuple):
    tokens: jax.Array  # [batch, max_new_tokens] int32, pad after each row's end
    num_tokens: jax.Array  # [batch]
    finish_reason: jax.Array  # [batch]
    rounds: jax.Array  # [batch] verification rounds each row took part in
    accepted: jax.Array  # [batch] drafts accepted (and kept) in total
    accepted_at: jax.Array  # [depth] how many rounds accepted a draft at each position / tree depth (all rows)


def speculative_generate(params, prompts, lengths, *, config: ModelConfig, max_new_tokens: int, num_draft: int,
                         draft: str = "model", draft_params=None, draft_config: Optional[ModelConfig] = None,
                         ngram: int = 2, sampling: Sampling = SamplingConfig(temperature=0.0), seed=0,
                         eos_ids: Optional[Sequence[int]] = None, pad_id: int = 0,
                         verify_backend: str = "jnp", budgets=None, tree_nodes: Optional[int] = None,
                         tree_depth: Optional[int] = None, tree_topk: Optional[int] = None,
                         draft_vocab=None, acceptance: str = "exact") -> SpeculativeOutput:
    """Generate with speculative decoding; the output is distributed exactly as
    plain sampling from the target with the same `sampling` settings (greedy:
    token-for-token the same as `generate`).

    draft: a registered drafter name (`drafters.names()`):
      "model": a smaller model sharing the tokenizer (`draft_params`,
        `draft_config`); its distribution q after the same processors is used
        in the min(1, p/q) test.
      "ngram": prompt lookup, the continuation of the latest earlier occurrence
        of the last `ngram` tokens (prompt and output); a deterministic draft,
        accepted with probability p(x).
      "trigram": the latest-continuation trigram table of `trigram_drafts`,
        also deterministic.
      "jacobi" / "mcjacobi": speculative Jacobi decoding (SJD / MC-SJD,
        `drafters/jacobi.py`): the window of k drafts is the previous round's
        target distributions, redrawn (or maximally coupled) each round.
      "aded": ADED's trigram matrix (continuation counts, updated with every
        emitted token) with a PUCT draft maker that balances exploiting
        frequent continuations against exploring rarely tried ones, learning
        from which drafts the target accepted (`AdedTable`); deterministic
        given the past, so acceptance is the same exact rule.

      "medusa": Medusa / Hydra heads (`draft_params`, `draft_config` a
        `HeadsConfig`, from `jaxar.train.drafter.load_drafter_run`) on the
        target's last hidden state; a fixed tree of `tree_nodes` nodes
        (`tree.default_tree(tree_nodes, tree_depth, tree_topk)`), or a chain
        of the heads' top-1 tokens when tree_nodes is 1.
      "eagle": the EAGLE-style one-layer feature drafter; a dynamic tree
        (EAGLE-2: depth `tree_depth`, top-k `tree_topk`, best `tree_nodes`
        nodes), a chain when tree_nodes is 1; `draft_vocab` (ids, e.g.
        `jaxar.train.drafter.draft_vocabulary(run.token_counts, V, 8192)`)
        restricts its drafts to those ids (a cheaper draft head).
      Trees are verified in one target forward through the tree mask and
      accepted losslessly (`tree.tree_accept`: recursive rejection over
      siblings; greedy: the longest path matching the argmax); the accepted
      path's cache entries are moved next to the prefix (`tree.compact_cache`).

    acceptance: "exact" (lossless) or, for tree drafters' sampled rows,
      "typical" (Medusa's typical acceptance, `tree.tree_accept_typical`:
      LOSSY, documented there; greedy rows stay exact).
    sampling: as for `generate` (one config, one per row, or SamplingParams);
      the repetition, presence and frequency penalties are not supported here.
    verify_backend: "jnp" (acceptance.py, tree.py) or "pallas" (the fused
      pallas_kernels.verify / verify_tree kernels; interpret mode on CPU). Both consume the
      same randomness and return the same result.
    budgets: optional int `[batch]` per-row limits (<= max_new_tokens).
    """
    if acceptance not in ("exact", "typical"):
        raise ValueError(f"acceptance must be 'exact' or 'typical', got {acceptance!r}")
    if verify_backend not in ("jnp", "pallas"):
        raise ValueError(f"verify_backend must be 'jnp' or 'pallas', got {verify_backend!r}")
    if num_draft < 1:
        raise ValueError(f"num_draft must be >= 1, got {num_draft}")
    prompts, lengths, budgets, sampling = check_request(prompts, lengths, budgets, max_new_tokens, sampling)
    params = decode_layout(params, config)
    drafter, drafter_params = drafters.make(draft, num_draft=num_draft, target_config=config,
                                            draft_params=draft_params, draft_config=draft_config, ngram=ngram,
                                            target_params=params, tree_nodes=tree_nodes, tree_depth=tree_depth,
                                            tree_topk=tree_topk, draft_vocab=draft_vocab)
    num_draft = drafter.num_draft
    if acceptance == "typical" and not drafters.is_tree(drafter):
        raise ValueError(f"acceptance='typical' is for tree drafters (medusa, eagle); draft={draft!r} drafts chains")
    B = prompts.shape[0]
    check_same_mesh(params, drafter_params)
    for name in ("repetition_penalty", "presence_penalty", "frequency_penalty"):
        value = getattr(sampling, name, None)
        off = 1.0 if name == "repetition_penalty" else 0.0
        if value is not None and np.any(np.asarray(value) != off):
            raise ValueError(f"speculative decoding does not support {name} yet; use generate()")
    check_context(config, lengths, budgets)
    draft_model_config = getattr(drafter, "config", None)
    if draft_model_config is not None:
        check_context(draft_model_config, lengths, budgets, " (draft model)")
    prompt_width, width, cache_len = plan_shapes(config, int(lengths.max()), max_new_tokens, extra=num_draft + 1)
    out = _speculative(params, drafter_params, fit_width(prompts, prompt_width), lengths, budgets,
                       jnp.asarray(seed, jnp.uint32), sampling, eos_array(eos_tuple(config, eos_ids)),
                       jnp.asarray(pad_id, jnp.int32), config=config, drafter=drafter, width=width,
                       cache_len=cache_len, verify_backend=verify_backend, acceptance=acceptance)
    return out._replace(tokens=out.tokens[:, :max_new_tokens])


def _verify(logits, draft_probs, drafts, ctx: DraftContext, verify_backend: str):
    """`(accepted [B], next_token [B])`: greedy rows by argmax match, sampled
    rows by the exact rejection rule (keys row_keys(seed, B, step * (k+2) + k+1))."""
    B, k = drafts.shape
    greedy = ctx.sampling.greedy

    def sampled():
        p = probabilities(logits, ctx.sampling)  # [B, k+1, V]
        keys = row_keys(ctx.seed, B, ctx.step * (k + 2) + k + 1)
        if verify_backend == "pallas":
            from pallas_kernels.verify import verify

            n_s, x_s = verify(p, draft_probs, drafts, key=keys, interpret=jax.default_backend() == "cpu")
        elif draft_probs is None:
            n_s, x_s = deterministic_accept(p, drafts, keys)
        else:
            n_s, x_s = speculative_accept(p, draft_probs, drafts, keys)
        n_g, x_g = greedy_accept(logits, drafts)
        return jnp.where(greedy, n_g, n_s).astype(jnp.int32), jnp.where(greedy, x_g, x_s).astype(jnp.int32)

    def all_greedy():
        n_g, x_g = greedy_accept(logits, drafts)
        return n_g.astype(jnp.int32), x_g.astype(jnp.int32)

    return jax.lax.cond(jnp.all(greedy), all_greedy, sampled)


def _verify_tree(logits, draft_probs, drafts, parents, depth: int, ctx: DraftContext, verify_backend: str,
                 acceptance: str = "exact"):
    """`(path [B, depth], accepted [B], next_token [B])` for a tree of drafts:
    greedy rows take the longest root path matching the target argmax; sampled
    rows the exact recursive rejection over siblings (`tree.tree_accept`)."""
    from jaxar.decode import tree

    B, N = drafts.shape
    greedy = ctx.sampling.greedy

    def all_greedy():
        return tree.tree_accept_greedy(logits, drafts, parents, depth)

    def sampled():
        p = probabilities(logits, ctx.sampling)  # [B, N+1, V]
        keys = row_keys(ctx.seed, B, ctx.step * (N + 2) + N + 1)
        if acceptance == "typical":
            path_s, n_s, x_s = tree.tree_accept_typical(p, drafts, parents, keys, depth)
        elif verify_backend == "pallas":
            from pallas_kernels.verify import verify_tree

            path_s, n_s, x_s = verify_tree(p, draft_probs, drafts, parents, key=keys, max_depth=depth,
                                           interpret=jax.default_backend() == "cpu")
        else:
            path_s, n_s, x_s = tree.tree_accept(p, draft_probs, drafts, parents, keys, depth)
        path_g, n_g, x_g = all_greedy()
        g = greedy[:, None]
        return (jnp.where(g, path_g, path_s), jnp.where(greedy, n_g, n_s), jnp.where(greedy, x_g, x_s))

    path, n, x = jax.lax.cond(jnp.all(greedy), all_greedy, sampled)
    return path.astype(jnp.int32), n.astype(jnp.int32), x.astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("config", "drafter", "width", "cache_len", "verify_backend",
                                             "acceptance"))
def _speculative(params, drafter_params, prompts, lengths, budgets, seed, sampling, eos_ids, pad_id, *, config,
                 drafter, width, cache_len, verify_backend, acceptance="exact"):
    B, P = prompts.shape
    n_nodes = drafter.num_draft
    is_tree = drafters.is_tree(drafter)
    depth = drafters.max_depth(drafter)
    feature_layers = tuple(getattr(drafter, "feature_layers", ()))
    wants_probs = bool(getattr(drafter, "wants_probs", False))  # Jacobi windows learn from the target's p
    if wants_probs and (is_tree or feature_layers):
        raise ValueError(f"{type(drafter).__name__}: wants_probs is for chain drafters without features")

    # Prefill all but each prompt's last token (that one is fed with the drafts).
    t_cache = KVCache.empty(config, B, cache_len)
    prefill = forward(params, prompts, config=config, cache=t_cache, num_new=lengths - 1, logits_at="last",
                      hidden_layers=feature_layers)
    t_cache = prefill[1]
    if feature_layers:
        d_state = drafter.init(drafter_params, prompts, lengths, cache_len, features=prefill[2])
    else:
        d_state = drafter.init(drafter_params, prompts, lengths, cache_len)
    zeros = jnp.zeros((B,), jnp.int32)
    stats = (zeros, zeros, jnp.zeros((depth,), jnp.int32))  # rounds, accepted, accepted_at
    pending = (jnp.full((B, depth), -1, jnp.int32), zeros, zeros)  # the last round's path, n_acc, next token
    hiddens = tuple(jnp.zeros((B, n_nodes + 1, config.d_model), jnp.float32) for _ in feature_layers)
    if wants_probs:  # the verified positions' target distributions ride where the features would
        hiddens = (jnp.zeros((B, n_nodes + 1, config.vocab_size), jnp.float32),)
    inner = (t_cache, d_state, stats, pending, hiddens)

    def context(state: loop.LoopState) -> DraftContext:
        return DraftContext(seq=state.seq, seq_len=state.seq_len, active=state.active, step=state.step, seed=seed,
                            sampling=sampling)

    def step(state: loop.LoopState):
        t_cache, d_state, stats, _, _ = state.inner
        ctx = context(state)
        drafts, parents, draft_probs, d_state = drafter.propose(d_state, ctx)
        if (parents is not None) != is_tree:
            raise ValueError(f"{type(drafter).__name__}.propose returned parents={parents is not None} but "
                             f"is_tree={is_tree}")
        # [B, N+1]: the target scores the last token and every draft in one forward.
        verify_in = jnp.concatenate([state.last_token[:, None], drafts], axis=1)
        start = t_cache.lengths
        if is_tree:
            from jaxar.decode import tree

            positions = tree.tree_positions(parents, start)
            if config.position == "learned":
                positions = jnp.minimum(positions, config.max_seq_len - 1)
            out = forward(params, verify_in, config=config, cache=t_cache, positions=positions,
                          tree_mask=tree.tree_mask(parents), hidden_layers=feature_layers)
            logits, t_cache = out[0], out[1]
            path, n_acc, nxt = _verify_tree(logits, draft_probs, drafts, parents, depth, ctx, verify_backend,
                                               acceptance)
            # the accepted path's keys and values move next to the root; the rest lies beyond the length
            t_cache = tree.compact_cache(t_cache, start, path, n_acc)
            path_tokens = jnp.take_along_axis(drafts, jnp.maximum(path, 0), axis=1)
        else:
            out = forward(params, verify_in, config=config, cache=t_cache,
                          positions=clipped_positions(config, t_cache, n_nodes + 1), hidden_layers=feature_layers)
            logits, t_cache = out[0], out[1]
            n_acc, nxt = _verify(logits, draft_probs, drafts, ctx, verify_backend)
            path = jnp.where(jnp.arange(depth)[None] < n_acc[:, None], jnp.arange(depth)[None], -1)
            path_tokens = drafts
        hiddens = tuple(h.astype(jnp.float32) for h in out[2]) if feature_layers else ()
        if wants_probs:
            hiddens = (probabilities(logits, ctx.sampling),)
        tokens, n_emit = emitted_tokens(path_tokens, n_acc, nxt)
        return (t_cache, d_state, stats, (path, n_acc, nxt), hiddens), StepOutput(tokens=tokens, n_emitted=n_emit)

    def after(inner, before: loop.LoopState, new: loop.LoopState, out: StepOutput):
        t_cache, d_state, (rounds, accepted, accepted_at), pending, hiddens = inner
        active = before.active
        n_acc = out.n_emitted - 1
        kept = new.num_tokens - before.num_tokens
        # The target cache holds everything but the newest token; the rest is rolled back.
        t_cache = t_cache.with_lengths(new.seq_len - 1)
        if feature_layers:
            verified = drafters.Verified(hiddens=hiddens, path=pending[0], accepted=pending[1], next_token=pending[2])
            d_state = drafter.update(d_state, context(before), n_acc, kept, new.seq, verified=verified)
        elif wants_probs:
            verified = drafters.Verified(hiddens=(), path=pending[0], accepted=pending[1], next_token=pending[2],
                                         probs=hiddens[0])
            d_state = drafter.update(d_state, context(before), n_acc, kept, new.seq, verified=verified)
        else:
            d_state = drafter.update(d_state, context(before), n_acc, kept, new.seq)
        stats = (rounds + active, accepted + jnp.where(active, jnp.minimum(n_acc, kept), 0),
                 accepted_at + jnp.sum((jnp.arange(depth)[None] < n_acc[:, None]) & active[:, None], axis=0))
        return t_cache, d_state, stats, pending, hiddens

    state = loop.init_state(prompts, lengths, budgets, eos_ids, width, inner=inner)
    state = loop.run(step, state, after=after)
    tokens, _ = loop.outputs(state, width, pad_id)
    rounds, accepted, accepted_at = state.inner[2]
    return SpeculativeOutput(tokens=tokens, num_tokens=state.num_tokens, finish_reason=state.finish_reason,
                             rounds=rounds, accepted=accepted, accepted_at=accepted_at)
