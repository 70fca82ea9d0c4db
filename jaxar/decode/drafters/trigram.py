"""Adaptive trigram drafts (after ADED): the latest continuation of each token pair."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from jaxar.decode.drafters import register
from jaxar.decode.drafters.ngram import ngram_drafts


def pair_hash(a, b, size):
    """Hash of the token pair (a, b) into `size` slots (int32, shape of a)."""
    a, b = a.astype(jnp.uint32), b.astype(jnp.uint32)
    return ((a * jnp.uint32(1000003) + b * jnp.uint32(7919)) % jnp.uint32(size)).astype(jnp.int32)


def trigram_drafts(seq, seq_len, k: int, table_size: int = 4096):
    """Adaptive trigram drafts (after ADED): a per-row table mapping a hashed
    pair (a, b) to the token that most recently followed it in the prompt and
    output so far, rebuilt from the sequence each round (so it adapts as text
    is generated); drafts chain k lookups. A pair never seen drafts the prompt
    lookup's token instead."""
    B, L = seq.shape
    pos = jnp.arange(L)
    a, b = jnp.roll(seq, 2, axis=1), jnp.roll(seq, 1, axis=1)  # a[:, i] = seq[:, i-2]
    h = pair_hash(a, b, table_size)
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
        c = jnp.take_along_axis(table, pair_hash(x, y, table_size)[:, None], axis=1)[:, 0]
        c = jnp.where(c >= 0, c, fallback[:, i])
        drafts.append(c)
        x, y = y, c
    return jnp.stack(drafts, axis=1)


@dataclasses.dataclass(frozen=True)
class TrigramDrafter:
    """Deterministic chain drafts from a trigram table rebuilt every round (no state)."""

    num_draft: int

    def init(self, params, prompts, lengths, cache_len):
        return ()

    def propose(self, state, ctx):
        return trigram_drafts(ctx.seq, ctx.seq_len, self.num_draft), None, None, state

    def update(self, state, ctx, accepted, kept, seq):
        return state


@register("trigram")
def make(*, num_draft, target_config, **_):
    return TrigramDrafter(num_draft=num_draft), None
