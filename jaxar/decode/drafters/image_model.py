"""A small raster image model as the draft of a raster image model (same tokenizer, same class tokens).

Like `model.ModelDrafter`, with classifier-free guidance: the draft runs its own 2B rows (the B conditional
rows, then B null-class rows), and its draft distribution q of a code is the guided, processed distribution
(`apply_cfg` at the same guidance scale and schedule as the target, then the row's temperature / top-k /
top-p), restricted to the K codes. Drafts are sampled from q (greedy rows: its argmax), so the exact test
min(1, p/q) applies.

The image decoder passes `params = {"model": draft transformer params, "cfg_scale": traced scale}`; the
sequence buffer holds each row's class token and then its codes (`jaxar.decode.image_spec`).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jaxar.cache import KVCache
from jaxar.decode.drafters import register
from jaxar.decode.sampling import apply_cfg, probabilities, row_keys
from jaxar.models.transformer import forward


@dataclasses.dataclass(frozen=True)
class ImageModelDrafter:
    """State: (params, cfg_scale, KV cache of 2B rows holding all but the last one or two tokens)."""

    num_draft: int
    config: object  # the draft's transformer ModelConfig
    codebook_size: int  # K
    null_token: int  # the null class's token id (K + num_classes)
    num_codes: int  # n codes per image (guidance schedule length)
    schedule: str = "constant"

    def _positions(self, cache, T):
        return jnp.minimum(cache.lengths[:, None] + jnp.arange(T, dtype=jnp.int32)[None], self.config.max_seq_len - 1)

    def init(self, params, prompts, lengths, cache_len):
        B = prompts.shape[0]
        cache = KVCache.empty(self.config, 2 * B, min(cache_len, self.config.max_seq_len))
        return params["model"], params["cfg_scale"], cache

    def _guided(self, logits, index, cfg_scale, sampling):
        from jaxar.decode.image import guidance_scale

        B = logits.shape[0] // 2
        K = self.codebook_size
        s = guidance_scale(cfg_scale, jnp.minimum(index, self.num_codes - 1), self.num_codes, self.schedule)
        guided = apply_cfg(logits[:B, :K], logits[B:, :K], jnp.broadcast_to(s, (B,))[:, None])
        return probabilities(guided, sampling)

    def propose(self, state, ctx):
        params, cfg_scale, cache = state
        k, K = self.num_draft, self.codebook_size
        B, L = ctx.seq.shape
        lengths = cache.lengths[:B]
        # The first forward feeds the one or two tokens the cache lacks; the null rows' first token is the null class.
        idx = lengths[:, None] + jnp.arange(2)[None]
        cond = jnp.take_along_axis(ctx.seq, jnp.clip(idx, 0, L - 1), axis=1)
        uncond = jnp.where(idx == 0, self.null_token, cond)
        n_feed = ctx.seq_len - lengths
        logits, cache = forward(params, jnp.concatenate([cond, uncond]), config=self.config, cache=cache,
                                num_new=jnp.concatenate([n_feed, n_feed]), logits_at="last",
                                positions=self._positions(cache, 2))
        index = ctx.seq_len - 1  # the code index being drafted (the class token is not a code)
        greedy = ctx.sampling.greedy
        drafts, qs = [], []
        for i in range(k):
            q = self._guided(logits[:, 0], index + i, cfg_scale, ctx.sampling)  # [B, K]
            keys = row_keys(ctx.seed, B, ctx.step * (k + 2) + i, row_ids=ctx.row_ids)
            sampled = jax.vmap(lambda kk, qq: jax.random.categorical(kk, jnp.log(qq)))(keys, q).astype(jnp.int32)
            x = jnp.where(greedy, jnp.argmax(q, axis=-1).astype(jnp.int32), sampled)
            drafts.append(x)
            qs.append(q)
            if i < k - 1:
                logits, cache = forward(params, jnp.concatenate([x, x])[:, None], config=self.config, cache=cache,
                                        positions=self._positions(cache, 1))
        return jnp.stack(drafts, 1), None, jnp.stack(qs, 1), (params, cfg_scale, cache)

    def update(self, state, ctx, accepted, kept, seq):
        params, cfg_scale, cache = state
        lengths = cache.lengths[: ctx.seq.shape[0]]
        new_len = ctx.seq_len + kept
        lengths = jnp.where(ctx.active, jnp.minimum(lengths, new_len - 1), lengths)
        return params, cfg_scale, cache.with_lengths(jnp.concatenate([lengths, lengths]))


@register("image_model")
def make(*, num_draft, target_config, draft_params=None, draft_config=None, schedule="constant", **_):
    """`target_config` and `draft_config` are `ImageARConfig`s of raster runs sharing the tokenizer."""
    if draft_params is None or draft_config is None:
        raise ValueError("draft='image_model' needs draft_params and draft_config (a raster run)")
    if getattr(draft_config, "kind", None) != "raster":
        raise ValueError("the image draft must be a raster run (task: raster)")
    for name in ("codebook_size", "num_classes", "side"):
        if getattr(draft_config, name) != getattr(target_config, name):
            raise ValueError(f"the draft's {name} {getattr(draft_config, name)} != the target's "
                             f"{getattr(target_config, name)}: train the draft on the same tokenizer and classes")
    from jaxar.models import transformer

    mcfg = draft_config.model_config()
    drafter = ImageModelDrafter(num_draft=num_draft, config=mcfg, codebook_size=draft_config.codebook_size,
                                null_token=draft_config.codebook_size + draft_config.null_class,
                                num_codes=draft_config.seq_len, schedule=schedule)
    return drafter, transformer.decode_params(draft_params["transformer"], mcfg)
