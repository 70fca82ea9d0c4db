"""ADED drafts (Liu et al., 2024, "Adaptive Draft-Verification"): trigram
counts updated with every emitted token and a PUCT draft maker that learns
from which drafts the target accepted."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jaxar.decode.drafters import register
from jaxar.decode.drafters.ngram import ngram_drafts
from jaxar.decode.drafters.trigram import pair_hash


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
        return pair_hash(a, b, self.tok.shape[1])

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


@dataclasses.dataclass(frozen=True)
class AdedDrafter:
    """Deterministic chain drafts from an `AdedTable`; the state is the table and
    the (context, slot) each draft of the last proposal came from."""

    num_draft: int
    table_size: int = ADED_TABLE_SIZE
    candidates: int = ADED_CANDIDATES

    def init(self, params, prompts, lengths, cache_len):
        B, P = prompts.shape
        prompts = jnp.asarray(prompts, jnp.int32)
        table = AdedTable.empty(B, self.table_size, self.candidates).observe(
            prompts, jnp.full((B,), 2, jnp.int32), lengths - 2, P - 2)
        no_slots = jnp.zeros((B, self.num_draft), jnp.int32)
        return table, (no_slots, no_slots)

    def propose(self, state, ctx):
        table, _ = state
        drafts, slots = table.drafts(ctx.seq, ctx.seq_len, self.num_draft)
        return drafts, None, None, (table, slots)

    def update(self, state, ctx, accepted, kept, seq):
        table, slots = state
        table = table.feedback(slots, accepted, ctx.active).observe(seq, ctx.seq_len, kept, self.num_draft + 1)
        return table, slots


@register("aded")
def make(*, num_draft, target_config, **_):
    return AdedDrafter(num_draft=num_draft), None
