"""Batch generation: prefill into the static cache, then a `lax.while_loop`.

One compiled program per (batch, prompt bucket, cache length, sampling config).
Rows keep their own lengths and positions, so ragged prompts need no
left-padding and give the same tokens as each prompt alone. Nothing returns
to the host until every row has stopped.
"""

from __future__ import annotations

import functools
from typing import NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxar.cache import KVCache
from jaxar.config import ModelConfig
from jaxar.decode.sampling import SamplingConfig, apply_cfg, process_logits, row_keys, sample, token_logprobs
from jaxar.models.transformer import forward

FINISH_STOP = 0  # emitted an EOS token
FINISH_LENGTH = 1  # used its whole budget


class GenerateOutput(NamedTuple):
    tokens: jax.Array  # [batch, max_new_tokens] int32, pad_id after each row's end
    num_tokens: jax.Array  # [batch] int32 generated tokens (the EOS included)
    finish_reason: jax.Array  # [batch] int32: FINISH_STOP or FINISH_LENGTH
    logprobs: Optional[jax.Array] = None  # [batch, max_new_tokens] float32 when requested


def _bucket(n: int, minimum: int = 16) -> int:
    """Next power of two (at least `minimum`): few distinct compiled shapes."""
    b = minimum
    while b < n:
        b *= 2
    return b


def pad_prompts(prompts: Sequence[Sequence[int]], pad_id: int = 0, bucket: bool = True):
    """Right-pad token lists into `[batch, P]` int32 plus lengths `[batch]`."""
    lengths = np.array([len(p) for p in prompts], np.int32)
    if len(prompts) == 0 or lengths.min() < 1:
        raise ValueError("every prompt needs at least one token")
    width = _bucket(int(lengths.max())) if bucket else int(lengths.max())
    out = np.full((len(prompts), width), pad_id, np.int32)
    for i, p in enumerate(prompts):
        out[i, : len(p)] = p
    return out, lengths


def _eos_hit(tokens, eos_ids):
    if not eos_ids:
        return jnp.zeros(tokens.shape, bool)
    return jnp.any(tokens[..., None] == jnp.asarray(eos_ids, jnp.int32), axis=-1)


def generate(params, prompts, lengths, *, config: ModelConfig, max_new_tokens: int,
             sampling: SamplingConfig = SamplingConfig(temperature=0.0), seed=0, budgets=None,
             eos_ids: Optional[Sequence[int]] = None, pad_id: int = 0, return_logprobs: bool = False,
             cache_len: Optional[int] = None, cfg_scale: Optional[float] = None, uncond_prompts=None,
             uncond_lengths=None) -> GenerateOutput:
    """Generate up to `max_new_tokens` per row.

    Args:
      prompts: int `[batch, P]`, row b's prompt in `prompts[b, :lengths[b]]`.
      lengths: int `[batch]` prompt lengths (>= 1).
      sampling: processors and temperature (0 = greedy).
      seed: one integer seed; row b draws with keys folded from (seed, b, step).
      budgets: optional int `[batch]` per-row limits (<= max_new_tokens).
      eos_ids: tokens that end a row (default: the model config's eos_token_id).
      cfg_scale, uncond_prompts, uncond_lengths: classifier-free guidance: the
        unconditional prompts run as extra rows, and each step samples from
        `uncond + scale * (cond - uncond)` in log-probability space; both rows
        are fed the sampled token.
    """
    sampling.validate()
    prompts = jnp.asarray(prompts, jnp.int32)
    lengths = jnp.asarray(lengths, jnp.int32)
    B, P = prompts.shape
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    budgets = jnp.full((B,), max_new_tokens, jnp.int32) if budgets is None else jnp.asarray(budgets, jnp.int32)
    eos_ids = tuple(config.eos_token_id or ()) if eos_ids is None else tuple(int(e) for e in eos_ids)
    cfg = None
    if cfg_scale is not None:
        if uncond_prompts is None:
            raise ValueError("cfg_scale needs uncond_prompts (and uncond_lengths)")
        up = jnp.asarray(uncond_prompts, jnp.int32)
        ul = jnp.asarray(uncond_lengths, jnp.int32)
        if up.shape[0] != B:
            raise ValueError(f"uncond_prompts has {up.shape[0]} rows, prompts has {B}")
        width = max(P, up.shape[1])
        pad = lambda x: jnp.pad(x, ((0, 0), (0, width - x.shape[1])))  # noqa: E731
        prompts, lengths = jnp.concatenate([pad(prompts), pad(up)]), jnp.concatenate([lengths, ul])
        P = width
        cfg = float(cfg_scale)
    if cache_len is None:
        cache_len = _bucket(P + max_new_tokens)
    if cache_len < P + max_new_tokens - 1:
        raise ValueError(f"cache_len={cache_len} is too small for prompts of {P} plus {max_new_tokens} new tokens")
    return _generate(params, prompts, lengths, budgets, jnp.asarray(seed, jnp.uint32), config=config,
                     sampling=sampling, max_new=max_new_tokens, cache_len=cache_len, eos_ids=eos_ids,
                     pad_id=pad_id, return_logprobs=return_logprobs, cfg_scale=cfg)


@functools.partial(jax.jit, static_argnames=("config", "sampling", "max_new", "cache_len", "eos_ids", "pad_id",
                                             "return_logprobs", "cfg_scale"))
def _generate(params, prompts, lengths, budgets, seed, *, config, sampling, max_new, cache_len, eos_ids, pad_id,
              return_logprobs, cfg_scale):
    rows, P = prompts.shape
    B = budgets.shape[0]  # rows == 2B with classifier-free guidance
    need_history = sampling.repetition_penalty != 1.0
    cache = KVCache.empty(config, rows, cache_len)
    logits, cache = forward(params, prompts, config=config, cache=cache, num_new=lengths)
    # [rows, V]: logits at each row's last prompt token
    last = jnp.take_along_axis(logits, (lengths - 1)[:, None, None], axis=1)[:, 0]
    history = None
    if need_history:  # prompt + generated tokens of the conditional rows, for the repetition penalty
        history = jnp.zeros((B, P + max_new), jnp.int32).at[:, :P].set(prompts[:B])

    def pick(step, logits_rows, history, hist_len):
        if cfg_scale is not None:
            logits_b = apply_cfg(logits_rows[:B], logits_rows[B:], cfg_scale)
        else:
            logits_b = logits_rows
        hist_mask = None
        if need_history:
            hist_mask = jnp.arange(history.shape[1])[None] < hist_len[:, None]
        keys = row_keys(seed, B, step)
        token = sample(keys, logits_b, sampling, history if need_history else None, hist_mask)
        logp = token_logprobs(logits_b, token, sampling, history if need_history else None, hist_mask) \
            if return_logprobs else None
        return token, logp

    out = jnp.full((B, max_new), pad_id, jnp.int32)
    out_logp = jnp.zeros((B, max_new), jnp.float32) if return_logprobs else None
    prompt_len = lengths[:B]

    def emit(state, token, logp):
        step, cache, _, out, out_logp, done, count, reason, history = state
        active = ~done
        token = jnp.where(active, token, pad_id)
        out = out.at[:, step].set(token)
        if return_logprobs:
            out_logp = out_logp.at[:, step].set(jnp.where(active, logp, 0.0))
        if need_history:
            history = history.at[jnp.arange(B), prompt_len + count].set(token, mode="drop")
        count = count + active
        hit_eos = active & _eos_hit(token, eos_ids)
        hit_len = active & (count >= budgets)
        reason = jnp.where(hit_eos, FINISH_STOP, jnp.where(hit_len, FINISH_LENGTH, reason))
        done = done | hit_eos | hit_len
        return (step + 1, cache, token, out, out_logp, done, count, reason, history)

    zeros = jnp.zeros((B,), jnp.int32)
    state = (jnp.int32(0), cache, zeros, out, out_logp, budgets <= 0, zeros, jnp.full((B,), FINISH_LENGTH, jnp.int32),
             history)
    token, logp = pick(0, last, history, prompt_len)
    state = emit(state, token, logp)

    def cond(state):
        step, done = state[0], state[5]
        return (step < max_new) & ~jnp.all(done)

    def body(state):
        step, cache, token, _, _, done, count, _, history = state
        feed = token if cfg_scale is None else jnp.concatenate([token, token])
        active = ~done if cfg_scale is None else jnp.concatenate([~done, ~done])
        # Stopped rows feed a dummy token and do not advance their length.
        logits, cache = forward(params, feed[:, None], config=config, cache=cache, num_new=active.astype(jnp.int32))
        state = (step, cache) + state[2:]
        token, logp = pick(step, logits[:, 0], history, prompt_len + count)
        return emit(state, token, logp)

    state = jax.lax.while_loop(cond, body, state)
    _, _, _, out, out_logp, _, count, reason, _ = state
    return GenerateOutput(tokens=out, num_tokens=count, finish_reason=reason, logprobs=out_logp)


# ---------------------------------------------------------------------------
# Beam search


class BeamOutput(NamedTuple):
    tokens: jax.Array  # [batch, num_return, max_new_tokens] int32
    num_tokens: jax.Array  # [batch, num_return]
    scores: jax.Array  # [batch, num_return] length-normalised log-probabilities
    finish_reason: jax.Array  # [batch, num_return]


def beam_search(params, prompts, lengths, *, config: ModelConfig, max_new_tokens: int, num_beams: int,
                num_beam_groups: int = 1, diversity_penalty: float = 0.0, length_penalty: float = 1.0,
                num_return_sequences: int = 1, eos_ids: Optional[Sequence[int]] = None, pad_id: int = 0,
                cache_len: Optional[int] = None) -> BeamOutput:
    """Beam search with Hugging Face's semantics (early_stopping=False).

    Per step, the top `max(2, 1 + n_eos) * num_beams` continuations of all
    beams are taken; those ending in EOS (or at the length limit) among the
    top `num_beams` become finished hypotheses scored by sum log-prob /
    generated_len ** length_penalty; the best non-finished continue. The search
    stops when no running beam can beat the worst finished one.

    Diverse beam search (Vijayakumar et al. 2016): `num_beam_groups` groups of
    `num_beams // num_beam_groups` beams run the same procedure one after the
    other within a step, each group's log-probabilities lowered by
    `diversity_penalty` times how often earlier groups picked each token at
    this step (Hamming diversity). Hypotheses of all groups compete at the end.
    """
    prompts = jnp.asarray(prompts, jnp.int32)
    lengths = jnp.asarray(lengths, jnp.int32)
    if num_beams < 1 or num_beams % num_beam_groups:
        raise ValueError(f"num_beams={num_beams} must be a positive multiple of num_beam_groups={num_beam_groups}")
    if not 1 <= num_return_sequences <= num_beams:
        raise ValueError(f"num_return_sequences={num_return_sequences} must be in [1, num_beams={num_beams}]")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    eos_ids = tuple(config.eos_token_id or ()) if eos_ids is None else tuple(int(e) for e in eos_ids)
    P = prompts.shape[1]
    cache_len = cache_len or _bucket(P + max_new_tokens)
    return _beam_search(params, prompts, lengths, config=config, max_new=max_new_tokens, num_beams=num_beams,
                        groups=num_beam_groups, diversity_penalty=float(diversity_penalty),
                        length_penalty=float(length_penalty), num_return=num_return_sequences, eos_ids=eos_ids,
                        pad_id=pad_id, cache_len=cache_len)


@functools.partial(jax.jit, static_argnames=("config", "max_new", "num_beams", "groups", "diversity_penalty",
                                             "length_penalty", "num_return", "eos_ids", "pad_id", "cache_len"))
def _beam_search(params, prompts, lengths, *, config, max_new, num_beams, groups, diversity_penalty, length_penalty,
                 num_return, eos_ids, pad_id, cache_len):
    B = prompts.shape[0]
    nb = num_beams // groups  # beams per group
    G = groups
    keep = max(2, 1 + len(eos_ids)) * nb
    top_mask = jnp.arange(keep) < nb
    NEG = -1.0e9

    cache = KVCache.empty(config, B, cache_len)
    logits, cache = forward(params, prompts, config=config, cache=cache, num_new=lengths)
    last = jnp.take_along_axis(logits, (lengths - 1)[:, None, None], axis=1)[:, 0]  # [B, V]
    V = last.shape[-1]
    # Rows are ordered (batch, group, beam).
    rep = lambda x: jnp.repeat(x, G * nb, axis=0)  # noqa: E731
    cache = cache.repeat_rows(G * nb)
    logits = rep(last)  # [B*G*nb, V]

    run_seq = jnp.full((B, G, nb, max_new), pad_id, jnp.int32)
    run_score = jnp.tile(jnp.where(jnp.arange(nb) == 0, 0.0, NEG), (B, G, 1))
    fin_seq = jnp.full((B, G, nb, max_new), pad_id, jnp.int32)
    fin_score = jnp.full((B, G, nb), NEG)
    fin_len = jnp.zeros((B, G, nb), jnp.int32)
    fin_done = jnp.zeros((B, G, nb), bool)
    unsatisfied = jnp.ones((B, G), bool)
    any_running = jnp.array(True)

    def gather(x, idx):  # x [B, G, n, ...], idx [B, G, m] -> [B, G, m, ...]
        return jnp.take_along_axis(x, idx.reshape(idx.shape + (1,) * (x.ndim - 3)), axis=2)

    def step_fn(state):
        (i, cache, logits, run_seq, run_score, fin_seq, fin_score, fin_len, fin_done, unsatisfied, _) = state
        logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1).reshape(B, G, nb, V)
        counts = jnp.zeros((B, V), jnp.float32)
        new = {k: [] for k in ("run_seq", "run_score", "src", "fin_seq", "fin_score", "fin_len", "fin_done", "hits")}
        for g in range(G):  # groups run one after another: later groups see earlier picks
            lp = logp[:, g] - diversity_penalty * counts[:, None, :]
            acc = (lp + run_score[:, g, :, None]).reshape(B, nb * V)
            top_lp, top_idx = jax.lax.top_k(acc, keep)
            src, tok = top_idx // V, top_idx % V  # [B, keep]
            seqs = jnp.take_along_axis(run_seq[:, g], src[:, :, None], axis=1).at[:, :, i].set(tok)
            hits = _eos_hit(tok, eos_ids) | (i + 1 >= max_new)
            # continuing beams: best non-finished
            cont_lp = top_lp + hits * NEG
            nxt_lp, nxt = jax.lax.top_k(cont_lp, nb)
            new["run_seq"].append(jnp.take_along_axis(seqs, nxt[:, :, None], axis=1))
            new["run_score"].append(nxt_lp)
            new["src"].append(jnp.take_along_axis(src, nxt, axis=1) + g * nb)
            new["hits"].append(hits)
            # finished hypotheses
            just = hits & top_mask[None]
            norm = top_lp / ((i + 1.0) ** length_penalty)
            norm = norm + (~unsatisfied[:, g, None]) * NEG + (~just) * NEG
            m_seq = jnp.concatenate([fin_seq[:, g], seqs], axis=1)
            m_score = jnp.concatenate([fin_score[:, g], norm], axis=1)
            m_len = jnp.concatenate([fin_len[:, g], jnp.full((B, keep), i + 1, jnp.int32)], axis=1)
            m_done = jnp.concatenate([fin_done[:, g], just], axis=1)
            f_score, f_idx = jax.lax.top_k(m_score, nb)
            new["fin_seq"].append(jnp.take_along_axis(m_seq, f_idx[:, :, None], axis=1))
            new["fin_score"].append(f_score)
            new["fin_len"].append(jnp.take_along_axis(m_len, f_idx, axis=1))
            new["fin_done"].append(jnp.take_along_axis(m_done, f_idx, axis=1))
            if G > 1:
                chosen = jnp.take_along_axis(seqs[:, :, i], nxt, axis=1)  # tokens this group continues with
                counts = counts + jax.nn.one_hot(chosen, V).sum(axis=1)
        stack = lambda name: jnp.stack(new[name], axis=1)  # noqa: E731
        run_seq, run_score, src = stack("run_seq"), stack("run_score"), stack("src")
        fin_seq, fin_score, fin_len, fin_done = stack("fin_seq"), stack("fin_score"), stack("fin_len"), stack("fin_done")
        all_hit = jnp.all(stack("hits"))
        # Early-stop heuristic (early_stopping=False): can the best running beam
        # still beat the worst finished one?
        best_running = run_score[:, :, 0] / ((i + 1.0) ** length_penalty)
        worst_fin = jnp.where(fin_done, jnp.min(fin_score, axis=2, keepdims=True), NEG)
        unsatisfied = unsatisfied & jnp.any(best_running[:, :, None] > worst_fin, axis=2)
        # Reorder the cache to the surviving beams and feed their new tokens.
        rows = (jnp.arange(B)[:, None, None] * (G * nb) + src).reshape(-1)
        cache = cache.take_rows(rows)
        logits, cache = forward(params, run_seq[..., i].reshape(-1, 1), config=config, cache=cache)
        keep_going = jnp.any(unsatisfied) & ~all_hit
        return (i + 1, cache, logits[:, 0], run_seq, run_score, fin_seq, fin_score, fin_len, fin_done, unsatisfied,
                keep_going)

    state = (jnp.int32(0), cache, logits, run_seq, run_score, fin_seq, fin_score, fin_len, fin_done, unsatisfied,
             any_running)
    state = jax.lax.while_loop(lambda s: (s[0] < max_new) & s[10], step_fn, state)
    fin_seq, fin_score, fin_len = state[5], state[6], state[7]
    # All groups' hypotheses compete for the final ranking.
    flat = lambda x: x.reshape((B, G * nb) + x.shape[3:])  # noqa: E731
    score, idx = jax.lax.top_k(flat(fin_score), num_return)
    seqs = jnp.take_along_axis(flat(fin_seq), idx[:, :, None], axis=1)
    n = jnp.take_along_axis(flat(fin_len), idx, axis=1)
    seqs = jnp.where(jnp.arange(max_new)[None, None] < n[:, :, None], seqs, pad_id)
    last_tok = jnp.take_along_axis(seqs, jnp.maximum(n - 1, 0)[:, :, None], axis=2)[..., 0]
    reason = jnp.where(_eos_hit(last_tok, eos_ids), FINISH_STOP, FINISH_LENGTH)
    return BeamOutput(tokens=seqs, num_tokens=n, scores=score, finish_reason=reason)
