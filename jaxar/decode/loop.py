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
records why a row stopped (FINISH_STOP: EOS or a stop string; FINISH_LENGTH:
budget).

Stop strings run inside the loop as a byte automaton: `stop_string_table`
turns the stop strings and every token's bytes into a table `[S, V]` of
automaton states (state 0: nothing matched, state 1: a stop string
occurred, absorbing), and each kept token moves a row's state by one table
lookup. A row stops at the token that completes a stop string, like an EOS.
Cutting the text before the stop string is the caller's (it has the text).
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

FINISH_STOP = 0  # emitted an EOS token, or completed a stop string
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
    stop_table: Optional[jax.Array] = None  # [S, V] int32 stop-string automaton (see stop_string_table), or None
    stop_state: Optional[jax.Array] = None  # [B] int32 each row's automaton state (STOP_MATCHED: stopped)

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


STOP_MATCHED = 1  # the stop-string automaton's absorbing state: a stop string occurred


def stop_string_table(stops: Sequence[str], token_bytes: Sequence[Optional[bytes]], min_states: int = 8):
    """The stop-string automaton over tokens, numpy int32 `[S, V]`.

    `table[s, v]` is the state after reading token v's bytes in state s
    (Aho-Corasick over the UTF-8 bytes of `stops`): 0 is the start, 1
    (`STOP_MATCHED`) means some stop string occurred and never changes. S is a
    power of two (>= `min_states`; unused states map to themselves) so stop
    strings of similar total length share a compiled program.

    `token_bytes[v]`: the bytes token v adds to the decoded text (b"" for
    tokens the decoder drops, such as special tokens), or None when unknown
    (the automaton restarts there: it may miss a stop string spanning that
    token, never reports one that is not in the text).
    """
    import numpy as np

    patterns = [s.encode("utf-8") for s in stops]
    if not patterns or any(not p for p in patterns):
        raise ValueError("stop strings must be non-empty")
    goto = [dict(), None]  # 0: root; 1: matched (absorbing)
    terminal = {1}
    for p in patterns:
        node = 0
        for b in p:
            nxt = goto[node].get(b)
            if nxt is None:
                nxt = len(goto)
                goto.append(dict())
                goto[node][b] = nxt
            node = nxt
        terminal.add(node)
    n = len(goto)
    delta = np.zeros((max(n, 2), 256), np.int32)
    fail = [0] * n
    order = [0]
    for node in order:  # breadth first: a node's failure link is finished before its children's
        if node == 1:
            continue
        for b in range(256):
            child = goto[node].get(b)
            if child is not None:
                fail[child] = 0 if node == 0 else int(delta[fail[node], b])
                if fail[child] in terminal:
                    terminal.add(child)
                delta[node, b] = child
                order.append(child)
            else:
                delta[node, b] = 0 if node == 0 else delta[fail[node], b]
    for t in terminal:
        if t != 1:
            delta[:, :][delta == t] = 1  # reaching a terminal node is reaching the matched state
    delta[1, :] = 1
    states = min_states
    while states < n:
        states *= 2
    V = len(token_bytes)
    used = set(b"".join(patterns))
    # A token none of whose bytes is in a stop string sends every state back to the start (an
    # empty one leaves it, an unknown one restarts it); only the others run through the automaton.
    empty = np.array([b is not None and len(b) == 0 for b in token_bytes], bool)
    relevant = [v for v, b in enumerate(token_bytes) if b and not used.isdisjoint(b)]
    cur = np.where(empty[None], np.arange(n)[:, None], 0).astype(np.int64)
    if relevant:
        pieces = [token_bytes[v] for v in relevant]
        lens = np.array([len(b) for b in pieces], np.int64)
        flat = np.zeros((len(pieces), int(lens.max())), np.int64)
        for k, b in enumerate(pieces):
            flat[k, :len(b)] = np.frombuffer(b, np.uint8)
        sub = np.broadcast_to(np.arange(n)[:, None], (n, len(pieces))).copy()
        for pos in range(flat.shape[1]):
            sub = np.where((pos < lens)[None], delta[sub, flat[None, :, pos]], sub)
        cur[:, relevant] = sub
    cur[1] = 1
    table = np.broadcast_to(np.arange(states)[:, None], (states, V)).astype(np.int32).copy()
    table[:n] = cur
    return table


def init_state(prompts, prompt_len, budgets, eos_ids: Sequence[int], width: int, inner: Any = None,
               record_logprobs: bool = False, stop_table=None) -> LoopState:
    """The driver state before the first step.

    Args:
      prompts: int `[B, P]`, row b's prompt in `prompts[b, :prompt_len[b]]`.
      prompt_len: int `[B]`.
      budgets: int `[B]` tokens each row may emit (<= width; <= 0: stopped at once).
      eos_ids: token ids that stop a row.
      width: static size of the output area (the largest budget, bucketed).
      inner: the method's initial state.
      record_logprobs: keep a `[B, width]` buffer for the steps' logprobs.
      stop_table: the stop-string automaton `[S, V]` (`stop_string_table`), or None.
    """
    prompts = jnp.asarray(prompts, jnp.int32)
    B, P = prompts.shape
    budgets = jnp.asarray(budgets, jnp.int32)
    seq = jnp.zeros((B, P + width), jnp.int32).at[:, :P].set(prompts)
    return LoopState(seq=seq, prompt_len=jnp.asarray(prompt_len, jnp.int32), num_tokens=jnp.zeros((B,), jnp.int32),
                     budgets=budgets, done=budgets <= 0, finish_reason=jnp.full((B,), FINISH_LENGTH, jnp.int32),
                     eos_ids=jnp.asarray(eos_ids, jnp.int32).reshape(-1), step=jnp.int32(0),
                     logprobs=jnp.zeros((B, width), jnp.float32) if record_logprobs else None, inner=inner,
                     stop_table=None if stop_table is None else jnp.asarray(stop_table, jnp.int32),
                     stop_state=None if stop_table is None else jnp.zeros((B,), jnp.int32))


def is_eos(tokens, eos_ids) -> jax.Array:
    """bool, shape of `tokens`: which tokens are among `eos_ids [E]` (all False when E == 0)."""
    eos_ids = jnp.asarray(eos_ids, jnp.int32).reshape(-1)
    return jnp.any(tokens[..., None] == eos_ids, axis=-1)


def _stop_states(state: LoopState, tokens) -> Optional[jax.Array]:
    """`[B, n]` automaton state after each of a step's tokens, or None without stop strings."""
    if state.stop_table is None:
        return None
    table, cur, states = state.stop_table, state.stop_state, []
    vocab = table.shape[1]
    for j in range(tokens.shape[1]):  # n is small and static (1, or k + 1 for speculative steps)
        cur = table[cur, jnp.clip(tokens[:, j], 0, vocab - 1)]
        states.append(cur)
    return jnp.stack(states, axis=1)


def _kept(state: LoopState, out: StepOutput):
    n = out.tokens.shape[1]
    pos = jnp.arange(n)[None]
    hit = is_eos(out.tokens, state.eos_ids)
    stop_states = _stop_states(state, out.tokens)
    if stop_states is not None:
        hit = hit | (stop_states == STOP_MATCHED)
    hit = hit & (pos < out.n_emitted[:, None])
    first_eos = jnp.where(jnp.any(hit, axis=1), jnp.argmax(hit, axis=1) + 1, n + 1)
    room = state.budgets - state.num_tokens
    n_keep = jnp.minimum(jnp.minimum(out.n_emitted, first_eos), room)
    n_keep = jnp.where(state.active, n_keep, 0).astype(jnp.int32)
    new_stop = None
    if stop_states is not None:
        last = jnp.take_along_axis(stop_states, jnp.maximum(n_keep - 1, 0)[:, None], axis=1)[:, 0]
        new_stop = jnp.where(n_keep > 0, last, state.stop_state)
    return n_keep, state.active & (first_eos <= n_keep), new_stop


def kept(state: LoopState, out: StepOutput):
    """How many of a step's tokens each row keeps: `(n_keep [B], stopped [B])`.

    A row keeps its emitted tokens up to and including the first EOS or the
    token that completes a stop string, at most its remaining budget; a
    stopped row keeps none.
    """
    return _kept(state, out)[:2]


def emit(state: LoopState, out: StepOutput) -> LoopState:
    """Write the kept tokens of one step, count them, stop rows (EOS / budget), advance `step`."""
    n_keep, stop_eos, stop_state = _kept(state, out)
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
                          finish_reason=reason, step=state.step + 1, logprobs=logprobs, stop_state=stop_state)


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
