"""Batch generation: prefill into the static cache, then the decode loop.

`generate` is the plain method of the one driver (`loop.py`): prefill writes
the prompts in one forward (logits only at each row's last token), and each
step feeds every row's newest token and samples one more. Rows keep their own
lengths and positions, so ragged prompts need no left-padding and give the
same tokens as each prompt alone. Nothing returns to the host until every row
has stopped.

One compiled program per (batch, prompt bucket, max_new_tokens bucket, cache
length, CFG on/off, logprobs on/off): sampling settings, seeds, budgets, EOS
ids (padded to a power of two) and the guidance scale are traced arrays, and prompt widths
and `max_new_tokens` are rounded up to powers of two, so a second call with
other settings reuses the program.

Beam search stays a separate loop (`beam_search`): each step reranks whole
beams (it reorders rows and their caches, and keeps finished hypotheses apart
from the running ones), which is not "emit up to n tokens per row".
"""

from __future__ import annotations

import functools
from typing import Callable, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import io_callback

from jaxar.cache import KVCache
from jaxar.config import ModelConfig
from jaxar.decode import loop
from jaxar.decode.loop import FINISH_LENGTH, FINISH_STOP, StepOutput, is_eos
from jaxar.decode.sampling import Sampling, SamplingConfig, SamplingParams, apply_cfg, row_keys, sample, \
    token_logprobs
from jaxar.models import transformer
from jaxar.models.transformer import forward

__all__ = ["FINISH_STOP", "FINISH_LENGTH", "GenerateOutput", "generate", "pad_prompts", "BeamOutput", "beam_search"]


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
    return is_eos(tokens, jnp.asarray(tuple(eos_ids), jnp.int32))


def decode_layout(params, config: ModelConfig):
    """`params` in the model's decode layout, when the model provides one
    (`transformer.decode_params`); converted once, outside jit."""
    convert = getattr(transformer, "decode_params", None)
    return params if convert is None else convert(params, config)


def eos_tuple(config: ModelConfig, eos_ids) -> tuple:
    return tuple(config.eos_token_id or ()) if eos_ids is None else tuple(int(e) for e in eos_ids)


def eos_array(eos: Sequence[int]) -> jax.Array:
    """EOS ids as int32 `[E]`, E a power of two (>= 4) padded with -1 (never a
    token), so another EOS list reuses the compiled program."""
    eos = [int(e) for e in eos]
    return jnp.asarray(eos + [-1] * (_bucket(len(eos), 4) - len(eos)), jnp.int32)


def check_context(config: ModelConfig, lengths: np.ndarray, new_tokens: np.ndarray, what: str = "") -> None:
    """A learned-position model (GPT-2) has no position past `max_seq_len - 1`:
    refuse requests whose prompt + new tokens do not fit, in one clear line."""
    if config.position != "learned":
        return
    total = lengths.astype(np.int64) + new_tokens.astype(np.int64)
    if total.size and total.max() > config.max_seq_len:
        b = int(np.argmax(total))
        raise ValueError(
            f"row {b}: prompt of {int(lengths[b])} tokens plus {int(new_tokens[b])} new tokens exceeds the model's "
            f"context of {config.max_seq_len} (learned positions){what}; shorten the prompt or lower max_new_tokens")


def plan_shapes(config: ModelConfig, max_prompt: int, max_new_tokens: int, extra: int = 0,
                cache_len: Optional[int] = None):
    """Bucketed `(prompt width, output width, cache length)` for a request.

    Prompt width and output width are powers of two (>= 16); the cache holds
    both plus `extra` slots (speculative drafts), rounded up to a power of two
    and capped at `max_seq_len` for learned positions (writes past the cache
    are dropped; positions past the context are never kept).
    """
    width = _bucket(max_new_tokens)
    prompt_width = _bucket(max_prompt)
    if cache_len is None:
        cache_len = _bucket(prompt_width + width + extra)
        if config.position == "learned":
            cache_len = min(cache_len, config.max_seq_len)
    elif cache_len < max_prompt + max_new_tokens - 1:
        raise ValueError(f"cache_len={cache_len} is too small for prompts of {max_prompt} plus {max_new_tokens} new "
                         f"tokens; use cache_len >= {max_prompt + max_new_tokens - 1} (or leave it unset)")
    return min(prompt_width, max(cache_len, max_prompt)), width, cache_len


def fit_width(prompts, width: int):
    """`prompts [B, P]` cut or zero-padded to `[B, width]` (columns past every row's length only)."""
    prompts = np.asarray(prompts, np.int32)
    if prompts.shape[1] >= width:
        return prompts[:, :width]
    return np.pad(prompts, ((0, 0), (0, width - prompts.shape[1])))


def clipped_positions(config: ModelConfig, cache: KVCache, T: int):
    """Positions of T new tokens per row, clamped to the learned table; None (the
    cache slots) for RoPE. Only tokens past the context, never kept, are clamped."""
    if config.position != "learned":
        return None
    return jnp.minimum(cache.lengths[:, None] + jnp.arange(T, dtype=jnp.int32)[None], config.max_seq_len - 1)


def _lengths_array(lengths, batch: int) -> np.ndarray:
    lengths = np.asarray(lengths, np.int32).reshape(-1)
    if lengths.shape != (batch,):
        raise ValueError(f"lengths must have shape ({batch},), got {lengths.shape}")
    if lengths.min() < 1:
        raise ValueError("every prompt needs at least one token (lengths >= 1)")
    return lengths


def _budgets_array(budgets, batch: int, max_new_tokens: int) -> np.ndarray:
    if budgets is None:
        return np.full((batch,), max_new_tokens, np.int32)
    budgets = np.asarray(budgets, np.int32).reshape(-1)
    if budgets.shape != (batch,):
        raise ValueError(f"budgets must have shape ({batch},), got {budgets.shape}")
    return np.minimum(budgets, max_new_tokens)


def check_request(prompts, lengths, budgets, max_new_tokens: int, sampling):
    """The host-side arrays of a request: prompts int32 [B, P], lengths [B],
    budgets [B] (<= max_new_tokens) and per-row `SamplingParams`; one-line errors."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    prompts = np.asarray(prompts, np.int32)
    if prompts.ndim != 2:
        raise ValueError(f"prompts must be [batch, P], got shape {prompts.shape}")
    B = prompts.shape[0]
    return (prompts, _lengths_array(lengths, B), _budgets_array(budgets, B, max_new_tokens),
            SamplingParams.build(sampling, B))


def generate(params, prompts, lengths, *, config: ModelConfig, max_new_tokens: int,
             sampling: Sampling = SamplingConfig(temperature=0.0), seed=0, budgets=None,
             eos_ids: Optional[Sequence[int]] = None, pad_id: int = 0, return_logprobs: bool = False,
             cache_len: Optional[int] = None, cfg_scale: Optional[float] = None, uncond_prompts=None,
             uncond_lengths=None, on_tokens: Optional[Callable] = None, stop_table=None) -> GenerateOutput:
    """Generate up to `max_new_tokens` per row.

    Args:
      prompts: int `[batch, P]`, row b's prompt in `prompts[b, :lengths[b]]`.
      lengths: int `[batch]` prompt lengths (>= 1).
      sampling: a `SamplingConfig` for every row, a list of one per row, or
        `SamplingParams` (per-row arrays); temperature 0 rows are greedy. Traced:
        new settings do not recompile.
      seed: one integer seed; row b draws with keys folded from (seed, b, step).
      budgets: optional int `[batch]` per-row limits (<= max_new_tokens).
      eos_ids: tokens that end a row (default: the model config's eos_token_id).
      cache_len: KV cache slots (default: prompt bucket + output bucket,
        rounded to a power of two; at most `max_seq_len` for learned positions).
      cfg_scale, uncond_prompts, uncond_lengths: classifier-free guidance: the
        unconditional prompts run as extra rows, and each step samples from
        `uncond + scale * (cond - uncond)` in log-probability space; both rows
        are fed the sampled token.
      on_tokens: streaming: a host function `on_tokens(tokens, num_tokens, done)`
        called (in order, through `jax.experimental.io_callback`) after every
        step with numpy arrays: `tokens [batch, 1]` the step's tokens,
        `num_tokens [batch]` each row's count so far (a row whose count did not
        grow kept nothing) and `done [batch]`. It is part of the compiled
        program: pass the same function again to reuse it. None (the default):
        no host round trip until every row has stopped.
      stop_table: stop strings, as the automaton `loop.stop_string_table(stops,
        token_bytes)` `[S, vocab_size]`: a row stops (FINISH_STOP) at the token
        that completes a stop string. Traced, and always present (a table that
        never matches when None), so stop strings reuse the compiled program
        (up to the power-of-two bucket of states). Cutting the text is the caller's.

    Raises ValueError when a learned-position model's context cannot hold a
    row's prompt plus its new tokens.
    """
    prompts, lengths, budgets, sampling = check_request(prompts, lengths, budgets, max_new_tokens, sampling)
    B = prompts.shape[0]
    check_context(config, lengths, budgets)
    eos = eos_tuple(config, eos_ids)
    max_prompt = int(lengths.max())
    cfg = None
    if cfg_scale is not None:
        if uncond_prompts is None or uncond_lengths is None:
            raise ValueError("cfg_scale needs uncond_prompts and uncond_lengths")
        up = np.asarray(uncond_prompts, np.int32)
        if up.ndim != 2 or up.shape[0] != B:
            raise ValueError(f"uncond_prompts must be [{B}, P'] like prompts, got shape {up.shape}")
        ul = _lengths_array(uncond_lengths, B)
        check_context(config, ul, budgets, " (unconditional prompt)")
        max_prompt = max(max_prompt, int(ul.max()))
        cfg = jnp.float32(cfg_scale)
    prompt_width, width, cache_len = plan_shapes(config, max_prompt, max_new_tokens, cache_len=cache_len)
    rows_prompts, rows_lengths = fit_width(prompts, prompt_width), lengths
    if cfg is not None:
        rows_prompts = np.concatenate([rows_prompts, fit_width(up, prompt_width)])
        rows_lengths = np.concatenate([lengths, ul])
    if stop_table is None:  # a table that never matches: same program with or without stop strings
        stop_table = np.broadcast_to(np.arange(8, dtype=np.int32)[:, None], (8, config.vocab_size))
    else:
        stop_table = np.asarray(stop_table, np.int32)
        if stop_table.ndim != 2 or stop_table.shape[1] != config.vocab_size:
            raise ValueError(f"stop_table must be [states, {config.vocab_size}] (loop.stop_string_table over the "
                             f"model's vocabulary), got shape {stop_table.shape}")
    params = decode_layout(params, config)
    out = _generate(params, rows_prompts, rows_lengths, budgets, jnp.asarray(seed, jnp.uint32), sampling,
                    eos_array(eos), jnp.asarray(pad_id, jnp.int32), cfg, stop_table, config=config, width=width,
                    cache_len=cache_len, return_logprobs=return_logprobs, on_tokens=on_tokens)
    return GenerateOutput(tokens=out.tokens[:, :max_new_tokens], num_tokens=out.num_tokens,
                          finish_reason=out.finish_reason,
                          logprobs=None if out.logprobs is None else out.logprobs[:, :max_new_tokens])


def plain_step(params, *, config: ModelConfig, sampling: SamplingParams, seed, cfg_scale=None,
               return_logprobs: bool = False):
    """The plain method: `step(state)` feeds each row's newest token and samples
    the next one (n = 1). `state.inner` is the KV cache (2B rows with
    classifier-free guidance: the unconditional rows after the conditional)."""

    def pick(state: loop.LoopState, logits_rows):
        B = state.seq.shape[0]
        logits = logits_rows if cfg_scale is None else apply_cfg(logits_rows[:B], logits_rows[B:], cfg_scale)
        history = state.seq  # prompt + output: the repetition penalty's previous tokens
        pos = jnp.arange(history.shape[1])[None]
        mask = pos < state.seq_len[:, None]
        generated = mask & (pos >= state.prompt_len[:, None])  # what the presence / frequency penalties count
        token = sample(row_keys(seed, B, state.step), logits, sampling, history, mask, generated)
        logp = (token_logprobs(logits, token, sampling, history, mask, generated)[:, None] if return_logprobs
                else None)
        return StepOutput(tokens=token[:, None], n_emitted=jnp.ones_like(token), logprobs=logp)

    def step(state: loop.LoopState):
        cache = state.inner
        feed, active = state.last_token, state.active
        if cfg_scale is not None:
            feed, active = jnp.concatenate([feed, feed]), jnp.concatenate([active, active])
        # Stopped rows feed their last token again and do not advance their length.
        logits, cache = forward(params, feed[:, None], config=config, cache=cache, num_new=active.astype(jnp.int32))
        return cache, pick(state, logits[:, 0])

    return step, pick


def _stream_after(on_tokens: Callable):
    """The loop's `after` hook that hands each step's kept tokens to the host, in order."""

    def after(inner, before: loop.LoopState, new: loop.LoopState, out: StepOutput):
        io_callback(on_tokens, None, out.tokens, new.num_tokens, new.done, ordered=True)
        return inner

    return after


@functools.partial(jax.jit, static_argnames=("config", "width", "cache_len", "return_logprobs", "on_tokens"))
def _generate(params, prompts, lengths, budgets, seed, sampling, eos_ids, pad_id, cfg_scale, stop_table, *, config,
              width, cache_len, return_logprobs, on_tokens=None):
    rows = prompts.shape[0]
    B = budgets.shape[0]  # rows == 2B with classifier-free guidance
    cache = KVCache.empty(config, rows, cache_len)
    logits, cache = forward(params, prompts, config=config, cache=cache, num_new=lengths, logits_at="last")
    step, pick = plain_step(params, config=config, sampling=sampling, seed=seed, cfg_scale=cfg_scale,
                            return_logprobs=return_logprobs)
    state = loop.init_state(prompts[:B], lengths[:B], budgets, eos_ids, width, inner=cache,
                            record_logprobs=return_logprobs, stop_table=stop_table)
    # The first token comes from the prefill logits; the loop does the rest.
    first = pick(state, logits[:, 0])
    new = loop.emit(state, first)
    after = None
    if on_tokens is not None:
        after = _stream_after(on_tokens)
        after(None, state, new, first)
    state = loop.run(step, new, after=after)
    tokens, logprobs = loop.outputs(state, width, pad_id)
    return GenerateOutput(tokens=tokens, num_tokens=state.num_tokens, finish_reason=state.finish_reason,
                          logprobs=logprobs)


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
    eos_ids = eos_tuple(config, eos_ids)
    lengths_np = _lengths_array(lengths, prompts.shape[0])
    check_context(config, lengths_np, np.full_like(lengths_np, max_new_tokens))
    prompt_width, _, cache_len = plan_shapes(config, int(lengths_np.max()), max_new_tokens, cache_len=cache_len)
    prompts = jnp.asarray(fit_width(prompts, prompt_width))
    params = decode_layout(params, config)
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
    logits, cache = forward(params, prompts, config=config, cache=cache, num_new=lengths, logits_at="last")
    last = logits[:, 0]  # [B, V]
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
