"""Speculative decoding, batched, with ragged acceptance, inside one `jit`.

Per round a drafter proposes k tokens per row; the target scores the k+1
positions [last, x_0 .. x_{k-1}] in one forward; acceptance decides per row how
many drafts to keep and draws one more token. Each row's cache length then
advances by accepted + 1: rejected entries simply lie beyond the length, so
rows that accepted different numbers of tokens never need realignment (the
failure mode "Batch Speculative Decoding Done Right" describes).

Invariant between rounds, per row: the sequence buffer holds prompt + output
(`seq_len` tokens); the target cache holds all but the last of them; the draft
model's cache holds all but the last one or two (a fully accepted round leaves
its last draft unfed; the next round's first draft step feeds both).
"""

from __future__ import annotations

import functools
from typing import NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp

from jaxar.cache import KVCache
from jaxar.config import ModelConfig
from jaxar.decode.acceptance import deterministic_accept, greedy_accept, speculative_accept
from jaxar.decode.generate import FINISH_LENGTH, FINISH_STOP, _bucket, _eos_hit
from jaxar.decode.sampling import SamplingConfig, probabilities, row_keys
from jaxar.models.transformer import forward


class SpeculativeOutput(NamedTuple):
    tokens: jax.Array  # [batch, max_new_tokens] int32, pad after each row's end
    num_tokens: jax.Array  # [batch]
    finish_reason: jax.Array  # [batch]
    rounds: jax.Array  # [batch] verification rounds each row took part in
    accepted: jax.Array  # [batch] drafts accepted in total
    accepted_at: jax.Array  # [k] how many rounds accepted the draft at each position (all rows)


def speculative_generate(params, prompts, lengths, *, config: ModelConfig, max_new_tokens: int, num_draft: int,
                         draft: str = "model", draft_params=None, draft_config: Optional[ModelConfig] = None,
                         ngram: int = 2, sampling: SamplingConfig = SamplingConfig(temperature=0.0), seed=0,
                         eos_ids: Optional[Sequence[int]] = None, pad_id: int = 0,
                         verify_backend: str = "jnp") -> SpeculativeOutput:
    """Generate with speculative decoding; the output is distributed exactly as
    plain sampling from the target with the same `sampling` config (greedy:
    token-for-token the same as `generate`).

    draft="model": a smaller model sharing the tokenizer (`draft_params`,
    `draft_config`); its distribution q after the same processors is used in
    the min(1, p/q) test. draft="ngram": prompt lookup, the continuation of the
    latest earlier occurrence of the last `ngram` tokens (prompt and output);
    a deterministic draft, accepted with probability p(x). draft="trigram": the
    latest-continuation trigram table of `trigram_drafts`, also deterministic.
    draft="aded": ADED's trigram matrix (continuation counts, updated with every
    emitted token) with a PUCT draft maker that balances exploiting frequent
    continuations against exploring rarely tried ones, learning from which
    drafts the target accepted (`AdedTable`); deterministic given the past, so
    acceptance is the same exact rule.

    verify_backend: "jnp" (acceptance.py) or "pallas" (the fused
    pallas_kernels.verify kernel; interpret mode on CPU). Both consume the same
    randomness and return the same result.
    """
    if verify_backend not in ("jnp", "pallas"):
        raise ValueError(f"verify_backend must be 'jnp' or 'pallas', got {verify_backend!r}")
    sampling.validate()
    if sampling.repetition_penalty != 1.0:
        raise ValueError("speculative decoding does not support repetition_penalty yet; use generate()")
    if num_draft < 1:
        raise ValueError(f"num_draft must be >= 1, got {num_draft}")
    if draft == "model":
        if draft_params is None or draft_config is None:
            raise ValueError("draft='model' needs draft_params and draft_config")
        if draft_config.vocab_size != config.vocab_size:
            raise ValueError(f"draft vocab_size {draft_config.vocab_size} != target vocab_size {config.vocab_size}; "
                             "the draft must share the target's tokenizer")
    elif draft not in ("ngram", "trigram", "aded"):
        raise ValueError(f"draft must be 'model', 'ngram', 'trigram' or 'aded', got {draft!r}")
    prompts = jnp.asarray(prompts, jnp.int32)
    lengths = jnp.asarray(lengths, jnp.int32)
    eos_ids = tuple(config.eos_token_id or ()) if eos_ids is None else tuple(int(e) for e in eos_ids)
    P = prompts.shape[1]
    buf_len = P + max_new_tokens + num_draft + 1
    cache_len = _bucket(buf_len)
    return _speculative(params, draft_params, prompts, lengths, jnp.asarray(seed, jnp.uint32), config=config,
                        draft_config=draft_config if draft == "model" else None, k=num_draft, ngram=ngram,
                        drafter=draft,
                        sampling=sampling, max_new=max_new_tokens, cache_len=cache_len, buf_len=buf_len,
                        eos_ids=eos_ids, pad_id=pad_id, verify_backend=verify_backend)


def trigram_drafts(seq, seq_len, k: int, table_size: int = 4096):
    """Adaptive trigram drafts (after ADED): a per-row table mapping a hashed
    pair (a, b) to the token that most recently followed it in the prompt and
    output so far, rebuilt from the sequence each round (so it adapts as text
    is generated); drafts chain k lookups. A pair never seen drafts the prompt
    lookup's token instead."""
    B, L = seq.shape
    pos = jnp.arange(L)
    a, b = jnp.roll(seq, 2, axis=1), jnp.roll(seq, 1, axis=1)  # a[:, i] = seq[:, i-2]
    h = _pair_hash(a, b, table_size)
    valid = (pos[None] >= 2) & (pos[None] < seq_len[:, None])
    rows = jnp.arange(B)[:, None]
    # latest position per hash slot (deterministic: max, not an unordered set)
    latest = jnp.full((B, table_size), -1, jnp.int32).at[rows, h].max(jnp.where(valid, pos[None], -1))
    table = jnp.where(latest >= 0, jnp.take_along_axis(seq, jnp.maximum(latest, 0), axis=1), -1)
    fallback = ngram_drafts(seq, seq_len, k, 2)
    x = jnp.take_along_axis(seq, jnp.maximum(seq_len - 2, 0)[:, None], axis=1)[:, 0]
    y = jnp.take_along_axis(seq, (seq_len - 1)[:, None], axis=1)[:, 0]
    drafts = []
    for i in range(k):
        c = jnp.take_along_axis(table, _pair_hash(x, y, table_size)[:, None], axis=1)[:, 0]
        c = jnp.where(c >= 0, c, fallback[:, i])
        drafts.append(c)
        x, y = y, c
    return jnp.stack(drafts, axis=1)


ADED_TABLE_SIZE = 4096  # hashed (a, b) contexts per row
ADED_CANDIDATES = 4     # continuations kept per context (the least counted is replaced)
ADED_C_PUCT = 1.0       # exploration weight of the PUCT score


@jax.tree_util.register_pytree_node_class
class AdedTable:
    """ADED's draft maker (Liu et al., 2024, "Adaptive Draft-Verification"):
    a per-row trigram matrix approximating the target's next-token
    distribution, and search statistics over the drafts it proposed.

    tok / cnt [B, contexts, C]: for a hashed context (a, b), up to C
    continuations and how often each followed (a, b) in the prompt and output
    (every emitted token is observed, so the counts track the target's own
    text). vis / acc: how often a continuation was proposed as a draft, and
    how often the target accepted it. A draft position picks, among the
    context's candidates, the PUCT maximiser
        Q + c * P * sqrt(1 + sum vis) / (1 + vis),
    Q = acc / vis (0 when untried), P = cnt / sum cnt: frequent continuations
    are exploited, rarely tried ones explored, and rejected ones demoted.
    """

    def __init__(self, tok, cnt, vis, acc):
        self.tok, self.cnt, self.vis, self.acc = tok, cnt, vis, acc

    def tree_flatten(self):
        return (self.tok, self.cnt, self.vis, self.acc), None

    @classmethod
    def tree_unflatten(cls, _, leaves):
        return cls(*leaves)

    @classmethod
    def empty(cls, batch: int, size: int = ADED_TABLE_SIZE, candidates: int = ADED_CANDIDATES):
        shape = (batch, size, candidates)
        zeros = jnp.zeros(shape, jnp.float32)
        return cls(jnp.full(shape, -1, jnp.int32), zeros, zeros, zeros)

    def _context(self, a, b):
        return _pair_hash(a, b, self.tok.shape[1])

    def insert(self, a, b, x, valid):
        """Count x after (a, b) in each row where `valid` ([B] each)."""
        rows = jnp.arange(x.shape[0])
        h = self._context(a, b)
        tok, cnt = self.tok[rows, h], self.cnt[rows, h]  # [B, C]
        hit = tok == x[:, None]
        found = jnp.any(hit, axis=1)
        # a new continuation replaces the least counted (empty slots count 0)
        slot = jnp.where(found, jnp.argmax(hit, axis=1), jnp.argmin(jnp.where(tok < 0, -1.0, cnt), axis=1))
        fresh = valid & ~found
        upd = lambda arr, v: arr.at[rows, h, slot].set(jnp.where(valid, v, arr[rows, h, slot]))
        return AdedTable(upd(self.tok, x),
                         upd(self.cnt, jnp.where(fresh, 1.0, cnt[rows, slot] + 1.0)),
                         upd(self.vis, jnp.where(fresh, 0.0, self.vis[rows, h, slot])),
                         upd(self.acc, jnp.where(fresh, 0.0, self.acc[rows, h, slot])))

    def observe(self, seq, start, count, max_count: int):
        """Insert the trigrams ending at positions start .. start+count-1 of each row."""
        def body(i, table):
            pos = start + i
            at = lambda p: jnp.take_along_axis(seq, jnp.clip(p, 0, seq.shape[1] - 1)[:, None], axis=1)[:, 0]
            return table.insert(at(pos - 2), at(pos - 1), at(pos), (i < count) & (pos >= 2))
        return jax.lax.fori_loop(0, max(int(max_count), 0), body, self)

    def drafts(self, seq, seq_len, k: int, c_puct: float = ADED_C_PUCT):
        """[B, k] drafts chained through the table by PUCT, and the (context,
        slot) each came from (slot -1: an unseen context, prompt lookup used)."""
        rows = jnp.arange(seq.shape[0])
        fallback = ngram_drafts(seq, seq_len, k, 2)
        x = jnp.take_along_axis(seq, jnp.maximum(seq_len - 2, 0)[:, None], axis=1)[:, 0]
        y = jnp.take_along_axis(seq, (seq_len - 1)[:, None], axis=1)[:, 0]
        out, ctx, slots = [], [], []
        for i in range(k):
            h = self._context(x, y)
            tok, cnt, vis, acc = self.tok[rows, h], self.cnt[rows, h], self.vis[rows, h], self.acc[rows, h]
            prior = cnt / jnp.maximum(jnp.sum(cnt, axis=1, keepdims=True), 1.0)
            value = jnp.where(vis > 0, acc / jnp.maximum(vis, 1.0), 0.0)
            explore = c_puct * prior * jnp.sqrt(1.0 + jnp.sum(vis, axis=1, keepdims=True)) / (1.0 + vis)
            score = jnp.where(tok >= 0, value + explore, -jnp.inf)
            slot = jnp.argmax(score, axis=1)
            seen = jnp.any(tok >= 0, axis=1)
            c = jnp.where(seen, tok[rows, slot], fallback[:, i])
            out.append(c)
            ctx.append(h)
            slots.append(jnp.where(seen, slot, -1))
            x, y = y, c
        return jnp.stack(out, 1), (jnp.stack(ctx, 1), jnp.stack(slots, 1))

    def feedback(self, slots, n_acc, active):
        """Draft i was tried when i <= n_acc and accepted when i < n_acc."""
        ctx, slot = slots
        rows = jnp.arange(ctx.shape[0])
        vis, acc = self.vis, self.acc
        for i in range(ctx.shape[1]):
            ok = active & (slot[:, i] >= 0)
            s = jnp.maximum(slot[:, i], 0)
            tried = (ok & (i <= n_acc)).astype(jnp.float32)
            took = (ok & (i < n_acc)).astype(jnp.float32)
            vis = vis.at[rows, ctx[:, i], s].add(tried)
            acc = acc.at[rows, ctx[:, i], s].add(took)
        return AdedTable(self.tok, self.cnt, vis, acc)


def _pair_hash(a, b, size):
    a, b = a.astype(jnp.uint32), b.astype(jnp.uint32)
    return ((a * jnp.uint32(1000003) + b * jnp.uint32(7919)) % jnp.uint32(size)).astype(jnp.int32)


def ngram_drafts(seq, seq_len, k: int, n: int):
    """Prompt-lookup drafts [B, k]: the tokens after the latest earlier match of
    the last `n` tokens of each row; the last token repeated when none matches."""
    B, L = seq.shape
    idx = jnp.arange(L)
    # [B, n] the suffix to look up
    suffix = jnp.take_along_axis(seq, jnp.clip(seq_len[:, None] - n + jnp.arange(n)[None], 0, L - 1), axis=1)
    match = jnp.ones((B, L), bool)
    for i in range(n):
        shifted = jnp.roll(seq, -i, axis=1)  # shifted[:, j] = seq[:, j + i]
        match &= shifted == suffix[:, i: i + 1]
    # the match must end before the suffix starts, and leave >= 1 token after it
    match &= (idx[None] + n) <= (seq_len[:, None] - 1)
    match &= seq_len[:, None] >= n + 1
    start = jnp.max(jnp.where(match, idx[None], -1), axis=1)  # latest match
    found = start >= 0
    src = start[:, None] + n + jnp.arange(k)[None]
    src = jnp.where(src < seq_len[:, None], src, seq_len[:, None] - 1)
    drafts = jnp.take_along_axis(seq, jnp.clip(src, 0, L - 1), axis=1)
    last = jnp.take_along_axis(seq, (seq_len - 1)[:, None], axis=1)
    return jnp.where(found[:, None], drafts, last)


@functools.partial(jax.jit, static_argnames=("config", "draft_config", "k", "ngram", "drafter", "sampling",
                                             "max_new", "cache_len", "buf_len", "eos_ids", "pad_id",
                                             "verify_backend"))
def _speculative(params, draft_params, prompts, lengths, seed, *, config, draft_config, k, ngram, drafter, sampling,
                 max_new, cache_len, buf_len, eos_ids, pad_id, verify_backend):
    B, P = prompts.shape
    greedy = sampling.greedy
    rows = jnp.arange(B)
    seq = jnp.zeros((B, buf_len), jnp.int32).at[:, :P].set(prompts)

    # Prefill all but each prompt's last token (that one is fed with the drafts).
    t_cache = KVCache.empty(config, B, cache_len)
    _, t_cache = forward(params, prompts, config=config, cache=t_cache, num_new=lengths - 1)
    d_cache = None
    if draft_config is not None:
        d_cache = KVCache.empty(draft_config, B, cache_len)
        _, d_cache = forward(draft_params, prompts, config=draft_config, cache=d_cache, num_new=lengths - 1)

    def draft_model(state, key_step):
        seq, seq_len, d_cache = state["seq"], state["seq_len"], state["d_cache"]
        dl = d_cache.lengths
        # First step feeds the one or two tokens the draft cache lacks.
        feed = jnp.take_along_axis(seq, jnp.clip(dl[:, None] + jnp.arange(2)[None], 0, buf_len - 1), axis=1)
        n_feed = seq_len - dl
        logits, d_cache = forward(draft_params, feed, config=draft_config, cache=d_cache, num_new=n_feed)
        logits = jnp.take_along_axis(logits, (n_feed - 1)[:, None, None], axis=1)[:, 0]
        drafts, qs = [], []
        for i in range(k):
            q = probabilities(logits, sampling)
            if greedy:
                x = jnp.argmax(q, axis=-1).astype(jnp.int32)
            else:
                keys = row_keys(seed, B, key_step * (k + 2) + i)
                x = jax.vmap(lambda kk, qq: jax.random.categorical(kk, jnp.log(qq)))(keys, q).astype(jnp.int32)
            drafts.append(x)
            qs.append(q)
            if i < k - 1:
                logits, d_cache = forward(draft_params, x[:, None], config=draft_config, cache=d_cache)
                logits = logits[:, 0]
        return jnp.stack(drafts, 1), jnp.stack(qs, 1), d_cache

    def body(state):
        seq, seq_len, t_cache, done = state["seq"], state["seq_len"], state["t_cache"], state["done"]
        active = ~done
        step = state["step"]
        q, d_cache = None, None
        if drafter == "model":
            drafts, q, d_cache = draft_model(state, step)
        elif drafter == "trigram":
            drafts = trigram_drafts(seq, seq_len, k)
        elif drafter == "aded":
            drafts, slots = state["aded"].drafts(seq, seq_len, k)
        else:
            drafts = ngram_drafts(seq, seq_len, k, ngram)
        last = jnp.take_along_axis(seq, (seq_len - 1)[:, None], axis=1)
        # [B, k+1]: the target scores the last token and every draft in one forward.
        verify_in = jnp.concatenate([last, drafts], axis=1)
        logits, t_cache_new = forward(params, verify_in, config=config, cache=t_cache)
        if greedy:
            n_acc, nxt = greedy_accept(logits, drafts)
        else:
            p = probabilities(logits.reshape(B * (k + 1), -1), sampling).reshape(B, k + 1, -1)
            keys = row_keys(seed, B, step * (k + 2) + k + 1)
            if verify_backend == "pallas":
                from pallas_kernels.verify import verify

                n_acc, nxt = verify(p, q, drafts, key=keys, interpret=jax.default_backend() == "cpu")
            elif q is None:
                n_acc, nxt = deterministic_accept(p, drafts, keys)
            else:
                n_acc, nxt = speculative_accept(p, q, drafts, keys)
        n_acc = n_acc.astype(jnp.int32)
        # Emitted tokens: accepted drafts then the correction/bonus token.
        pos = jnp.arange(k + 1)[None]
        emitted = jnp.where(pos < n_acc[:, None], jnp.pad(drafts, ((0, 0), (0, 1))), nxt[:, None])
        emitted = jnp.where(pos <= n_acc[:, None], emitted, pad_id)
        n_emit = n_acc + 1
        # Stop at the first EOS and at the budget.
        out_count = seq_len - state["prompt_len"]
        room = max_new - out_count
        is_eos = _eos_hit(emitted, eos_ids) & (pos < n_emit[:, None])
        first_eos = jnp.where(jnp.any(is_eos, 1), jnp.argmax(is_eos, 1) + 1, k + 2)
        n_keep = jnp.minimum(jnp.minimum(n_emit, first_eos), room)
        n_keep = jnp.where(active, n_keep, 0)
        write = seq_len[:, None] + pos
        seq = seq.at[rows[:, None], jnp.where(pos < n_keep[:, None], write, buf_len)].set(emitted, mode="drop")
        new_len = seq_len + n_keep
        stop_eos = active & (first_eos <= n_keep)
        stop_len = active & ~stop_eos & (new_len - state["prompt_len"] >= max_new)
        reason = jnp.where(stop_eos, FINISH_STOP, jnp.where(stop_len, FINISH_LENGTH, state["reason"]))
        # Caches hold everything but the newest token; inactive rows stay put.
        t_cache = t_cache_new.with_lengths(jnp.where(active, new_len - 1, t_cache.lengths))
        out = dict(state, seq=seq, seq_len=new_len, t_cache=t_cache, done=done | stop_eos | stop_len, reason=reason,
                   step=step + 1, rounds=state["rounds"] + active,
                   accepted=state["accepted"] + jnp.where(active, jnp.minimum(n_acc, n_keep), 0),
                   accepted_at=state["accepted_at"] + jnp.sum(
                       (jnp.arange(k)[None] < n_acc[:, None]) & active[:, None], axis=0))
        if drafter == "aded":
            out["aded"] = state["aded"].feedback(slots, n_acc, active).observe(seq, seq_len, n_keep, k + 1)
        if d_cache is not None:
            d_len = jnp.minimum(d_cache.lengths, new_len - 1)
            out["d_cache"] = d_cache.with_lengths(jnp.where(active, d_len, state["d_cache"].lengths))
        return out

    state = dict(seq=seq, seq_len=lengths, prompt_len=lengths, t_cache=t_cache, d_cache=d_cache,
                 done=jnp.zeros((B,), bool), reason=jnp.full((B,), FINISH_LENGTH, jnp.int32), step=jnp.int32(0),
                 rounds=jnp.zeros((B,), jnp.int32), accepted=jnp.zeros((B,), jnp.int32),
                 accepted_at=jnp.zeros((k,), jnp.int32))
    if d_cache is None:
        state.pop("d_cache")
    if drafter == "aded":
        state["aded"] = AdedTable.empty(B).observe(seq, jnp.full((B,), 2, jnp.int32), lengths - 2, P - 2)
    state = jax.lax.while_loop(lambda s: ~jnp.all(s["done"]), body, state)
    n_out = state["seq_len"] - lengths
    idx = lengths[:, None] + jnp.arange(max_new)[None]
    tokens = jnp.take_along_axis(state["seq"], jnp.clip(idx, 0, buf_len - 1), axis=1)
    tokens = jnp.where(jnp.arange(max_new)[None] < n_out[:, None], tokens, pad_id)
    return SpeculativeOutput(tokens=tokens, num_tokens=n_out, finish_reason=state["reason"], rounds=state["rounds"],
                             accepted=state["accepted"], accepted_at=state["accepted_at"])
