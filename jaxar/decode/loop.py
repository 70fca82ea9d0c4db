"""The one decode driver: output buffer, per-row stop rules and progress.

A decoding method is a step

    step(state: LoopState) -> (inner, StepOutput(tokens [B, n], n_emitted [B], logprobs [B, n] | None))

that proposes up to `n` tokens per row (plain sampling: n = 1; speculative
decoding: n = k + 1 with n_emitted = accepted + 1) and returns its own new
state `inner`. The driver (`emit`) decides how many of them each row keeps:
tokens up to and including the first EOS, at most the row's remaining
budget, none for a row that has stopped. It writes them after the row's
prompt in one buffer `seq [B, L]` (prompt then output, so a step reads each
row's whole history: n-gram drafters, the repetition penalty), counts them and
records why a row stopped (FINISH_STOP: EOS; FINISH_LENGTH: budget).
`run` repeats step + emit in one `lax.while_loop` until every row has stopped;
nothing returns to the host in between.

A method that must know what was kept (a speculative step rolls its caches
back to the kept length, a drafter learns from accepted drafts) passes
`after(inner, before, after_state, out) -> inner`, called right after each
emit with the driver states before and after it.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp

FINISH_STOP = 0  # emitted an EOS token
FINISH_LENGTH = 1  # used its whole budget


class StepOutput(NamedTuple):
    tokens: jax.Array  # [B, n] int32 proposed tokens, the first n_emitted of each row valid
    n_emitted: jax.Array  # [B] int32 in 1..n
    logprobs: Optional[jax.Array] = None  # [B, n] float32 (only when the loop records logprobs)


class LoopState(NamedTuple):
    seq: jax.Array  # [B, L] int32: row b's prompt in [:prompt_len[b]], its output right after
    prompt_len: jax.Array  # [B] int32
    num_tokens: jax.Array  # [B] int32 emitted so far (an EOS included)
    budgets: jax.Array  # [B] int32 most tokens a row may emit
    done: jax.Array  # [B] bool
    finish_reason: jax.Array  # [B] int32 FINISH_STOP / FINISH_LENGTH (valid once done)
    eos_ids: jax.Array  # [E] int32 tokens that stop a row (E may be 0)
    step: jax.Array  # () int32 steps taken (progress; key derivation of the methods)
    logprobs: Optional[jax.Array]  # [B, W] float32 per emitted token, or None
    inner: Any  # the decoding method's own state (caches, drafter state, ...)

    @property
    def seq_len(self) -> jax.Array:
        """[B] int32: prompt + output tokens in `seq`."""
        return self.prompt_len + self.num_tokens

    @property
    def active(self) -> jax.Array:
        """[B] bool: rows still generating."""
        return ~self.done

    @property
    def last_token(self) -> jax.Array:
        """[B] int32: each row's newest token (the last prompt token before any output)."""
        return jnp.take_along_axis(self.seq, (self.seq_len - 1)[:, None], axis=1)[:, 0]


def init_state(prompts, prompt_len, budgets, eos_ids: Sequence[int], width: int, inner: Any = None,
               record_logprobs: bool = False) -> LoopState:
    """The driver state before the first step.

    Args:
      prompts: int `[B, P]`, row b's prompt in `prompts[b, :prompt_len[b]]`.
      prompt_len: int `[B]`.
      budgets: int `[B]` tokens each row may emit (<= width; <= 0: stopped at once).
      eos_ids: token ids that stop a row.
      width: static size of the output area (the largest budget, bucketed).
      inner: the method's initial state.
      record_logprobs: keep a `[B, width]` buffer for the steps' logprobs.
    """
    prompts = jnp.asarray(prompts, jnp.int32)
    B, P = prompts.shape
    budgets = jnp.asarray(budgets, jnp.int32)
    seq = jnp.zeros((B, P + width), jnp.int32).at[:, :P].set(prompts)
    return LoopState(seq=seq, prompt_len=jnp.asarray(prompt_len, jnp.int32), num_tokens=jnp.zeros((B,), jnp.int32),
                     budgets=budgets, done=budgets <= 0, finish_reason=jnp.full((B,), FINISH_LENGTH, jnp.int32),
                     eos_ids=jnp.asarray(eos_ids, jnp.int32).reshape(-1), step=jnp.int32(0),
                     logprobs=jnp.zeros((B, width), jnp.float32) if record_logprobs else None, inner=inner)


def is_eos(tokens, eos_ids) -> jax.Array:
    """bool, shape of `tokens`: which tokens are among `eos_ids [E]` (all False when E == 0)."""
    eos_ids = jnp.asarray(eos_ids, jnp.int32).reshape(-1)
    return jnp.any(tokens[..., None] == eos_ids, axis=-1)


def kept(state: LoopState, out: StepOutput):
    """How many of a step's tokens each row keeps: `(n_keep [B], stopped_at_eos [B])`.

    A row keeps its emitted tokens up to and including the first EOS, at most
    its remaining budget; a stopped row keeps none.
    """
    n = out.tokens.shape[1]
    pos = jnp.arange(n)[None]
    hit = is_eos(out.tokens, state.eos_ids) & (pos < out.n_emitted[:, None])
    first_eos = jnp.where(jnp.any(hit, axis=1), jnp.argmax(hit, axis=1) + 1, n + 1)
    room = state.budgets - state.num_tokens
    n_keep = jnp.minimum(jnp.minimum(out.n_emitted, first_eos), room)
    n_keep = jnp.where(state.active, n_keep, 0).astype(jnp.int32)
    return n_keep, state.active & (first_eos <= n_keep)


def emit(state: LoopState, out: StepOutput) -> LoopState:
    """Write the kept tokens of one step, count them, stop rows (EOS / budget), advance `step`."""
    n_keep, stop_eos = kept(state, out)
    B, n = out.tokens.shape
    pos = jnp.arange(n)[None]
    rows = jnp.arange(B)[:, None]
    keep = pos < n_keep[:, None]
    seq = state.seq.at[rows, jnp.where(keep, state.seq_len[:, None] + pos, state.seq.shape[1])].set(
        out.tokens.astype(jnp.int32), mode="drop")
    logprobs = state.logprobs
    if logprobs is not None:
        if out.logprobs is None:
            raise ValueError("the loop records logprobs but the step returned none")
        logprobs = logprobs.at[rows, jnp.where(keep, state.num_tokens[:, None] + pos, logprobs.shape[1])].set(
            out.logprobs.astype(jnp.float32), mode="drop")
    num_tokens = state.num_tokens + n_keep
    stop_len = state.active & ~stop_eos & (num_tokens >= state.budgets)
    reason = jnp.where(stop_eos, FINISH_STOP, jnp.where(stop_len, FINISH_LENGTH, state.finish_reason))
    return state._replace(seq=seq, num_tokens=num_tokens, done=state.done | stop_eos | stop_len,
                          finish_reason=reason, step=state.step + 1, logprobs=logprobs)


AfterFn = Callable[[Any, LoopState, LoopState, StepOutput], Any]


def run(step: Callable[[LoopState], tuple], state: LoopState, after: Optional[AfterFn] = None) -> LoopState:
    """Step and emit until every row has stopped, in one `lax.while_loop`.

    Every step emits at least one token for each active row, so the loop ends
    within `width + 1` steps (the bound `L + 1` is only a guard).
    """
    max_steps = state.seq.shape[1] + 1

    def body(state):
        inner, out = step(state)
        new = emit(state._replace(inner=inner), out)
        if after is not None:
            new = new._replace(inner=after(new.inner, state, new, out))
        return new

    return jax.lax.while_loop(lambda s: ~jnp.all(s.done) & (s.step < max_steps), body, state)


def outputs(state: LoopState, width: int, pad_id):
    """`(tokens [B, width] int32, pad_id after each row's end; logprobs [B, width] or None)`."""
    idx = state.prompt_len[:, None] + jnp.arange(width)[None]
    tokens = jnp.take_along_axis(state.seq, jnp.clip(idx, 0, state.seq.shape[1] - 1), axis=1)
    tokens = jnp.where(jnp.arange(width)[None] < state.num_tokens[:, None], tokens, jnp.asarray(pad_id, jnp.int32))
    logprobs = None if state.logprobs is None else state.logprobs[:, :width]
    return tokens, logprobs
