"""A small draft model sharing the target's tokenizer: drafts sampled from its
processed distribution q, which the acceptance test uses."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jaxar.cache import KVCache
from jaxar.config import ModelConfig
from jaxar.decode.drafters import register
from jaxar.decode.sampling import probabilities, row_keys
from jaxar.models.transformer import forward


@dataclasses.dataclass(frozen=True)
class ModelDrafter:
    """Chain drafts from `config`'s model. State: (params, KV cache). Between
    rounds the cache holds all but the last one or two tokens of the sequence
    (a fully accepted round leaves its last draft unfed; the next proposal's
    first forward feeds both)."""

    num_draft: int
    config: ModelConfig

    def _positions(self, cache, T):
        if self.config.position != "learned":
            return None
        return jnp.minimum(cache.lengths[:, None] + jnp.arange(T, dtype=jnp.int32)[None], self.config.max_seq_len - 1)

    def init(self, params, prompts, lengths, cache_len):
        if self.config.position == "learned":
            cache_len = min(cache_len, self.config.max_seq_len)
        cache = KVCache.empty(self.config, prompts.shape[0], cache_len)
        # all but each prompt's last token (that one is fed by the first proposal)
        _, cache = forward(params, prompts, config=self.config, cache=cache, num_new=lengths - 1, logits_at="last")
        return params, cache

    def propose(self, state, ctx):
        params, cache = state
        k = self.num_draft
        B, L = ctx.seq.shape
        # The first forward feeds the one or two tokens the cache lacks.
        feed = jnp.take_along_axis(ctx.seq, jnp.clip(cache.lengths[:, None] + jnp.arange(2)[None], 0, L - 1), axis=1)
        n_feed = ctx.seq_len - cache.lengths
        logits, cache = forward(params, feed, config=self.config, cache=cache, num_new=n_feed, logits_at="last",
                                positions=self._positions(cache, 2))
        logits = logits[:, 0]
        greedy = ctx.sampling.greedy
        drafts, qs = [], []
        for i in range(k):
            q = probabilities(logits, ctx.sampling)  # [B, V]
            keys = row_keys(ctx.seed, B, ctx.step * (k + 2) + i)
            sampled = jax.vmap(lambda kk, qq: jax.random.categorical(kk, jnp.log(qq)))(keys, q).astype(jnp.int32)
            x = jnp.where(greedy, jnp.argmax(q, axis=-1).astype(jnp.int32), sampled)
            drafts.append(x)
            qs.append(q)
            if i < k - 1:
                logits, cache = forward(params, x[:, None], config=self.config, cache=cache,
                                        positions=self._positions(cache, 1))
                logits = logits[:, 0]
        return jnp.stack(drafts, 1), None, jnp.stack(qs, 1), (params, cache)

    def update(self, state, ctx, accepted, kept, seq):
        params, cache = state
        # keep what matches the kept sequence: at most all but its newest token
        new_len = ctx.seq_len + kept
        lengths = jnp.where(ctx.active, jnp.minimum(cache.lengths, new_len - 1), cache.lengths)
        return params, cache.with_lengths(lengths)


@register("model")
def make(*, num_draft, target_config, draft_params=None, draft_config=None, **_):
    if draft_params is None or draft_config is None:
        raise ValueError("draft='model' needs draft_params and draft_config")
    if draft_config.vocab_size != target_config.vocab_size:
        raise ValueError(f"draft vocab_size {draft_config.vocab_size} != target vocab_size "
                         f"{target_config.vocab_size}; the draft must share the target's tokenizer")
    from jaxar.decode.generate import decode_layout

    return ModelDrafter(num_draft=num_draft, config=draft_config), decode_layout(draft_params, draft_config)
