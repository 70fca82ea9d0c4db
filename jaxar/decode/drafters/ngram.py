"""Prompt lookup (n-gram) drafts: copy what followed the latest earlier match."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from jaxar.decode.drafters import register


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


@dataclasses.dataclass(frozen=True)
class NgramDrafter:
    """Deterministic chain drafts from the row's own prompt and output (no state)."""

    num_draft: int
    n: int = 2

    def init(self, params, prompts, lengths, cache_len):
        return ()

    def propose(self, state, ctx):
        return ngram_drafts(ctx.seq, ctx.seq_len, self.num_draft, self.n), None, None, state

    def update(self, state, ctx, accepted, kept, seq):
        return state


@register("ngram")
def make(*, num_draft, target_config, ngram: int = 2, **_):
    if int(ngram) < 1:
        raise ValueError(f"ngram must be >= 1, got {ngram}")
    return NgramDrafter(num_draft=num_draft, n=int(ngram)), None
