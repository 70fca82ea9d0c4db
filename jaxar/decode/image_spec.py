"""Speculative decoding of raster image models: Jacobi windows (SJD, MC-SJD) or a draft image model, with
exact or relaxed acceptance, batched with ragged per-row acceptance, inside one jitted program.

    tokens, stats = speculative_image_tokens(params, labels, config=cfg, decode="sjd", window=16,
                                             accept="exact", cfg_scale=2.0, seed=0)

A round per row: the drafter (`jaxar.decode.drafters`, the same interface as text: `jacobi` / `mcjacobi` for
SJD / MC-SJD, `image_model` for a small raster draft) proposes L codes x_0..x_{L-1} with their draft
distributions q; the target scores [last, x_0 .. x_{L-1}] in one forward of its 2B CFG rows (the conditional
rows, then the null-class rows; the first round feeds the class tokens, the null class to the null rows), so
p_j is the guided distribution (`apply_cfg` at the step's guidance scale, then temperature / top-k / top-p, as
plain decoding's `image._draw`) of the code j places after the accepted prefix. The acceptance rule
(`relaxed.relaxed_accept`: "exact" = Leviathan / Chen rejection, or LANTERN-style / GSD relaxations)
decides how many drafts each row keeps and draws one more code, so a round emits accepted + 1 codes. Greedy
rows accept while the draft equals the target's argmax (plain raster decoding's greedy output). Each row's
cache advances by what it kept (rejected entries lie beyond its length): rows never wait for each other, unlike
the reference SJD, whose batch accepts the minimum length over its rows.

Cost follows the real tokens: stats count the target forwards each row took part in (`rounds`; plain
decoding takes one per code, 49 for 7x7) and the drafts it accepted; `forwards_per_image = rounds`.

Randomness: round r of row b verifies with `row_keys(seed, B, r * (L + 2) + L + 1, row_ids)[b]` (L uniforms
and one Exp(1) vector, `_verify_randomness`); drafters use the other indices of the round. With `row_ids`, a row's stream depends on its id only, so a row decoded
in a batch equals the same row decoded alone with its id.
"""

from __future__ import annotations

import functools
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from jaxar.cache import KVCache
from jaxar.decode import drafters, loop
from jaxar.decode.acceptance import TINY, emitted_tokens, greedy_accept
from jaxar.decode.drafters import DraftContext
from jaxar.decode.generate import clipped_positions
from jaxar.decode.loop import StepOutput
from jaxar.decode.sampling import SamplingConfig, SamplingParams, apply_cfg, probabilities, row_keys
from jaxar.models import transformer
from jaxar.models.vision import ar

__all__ = ["DECODES", "ImageSpecStats", "parse_decode", "make_drafter", "speculative_image_tokens"]

DECODES = ("sjd", "mcsjd", "draft")


class ImageSpecStats(NamedTuple):
    rounds: jax.Array  # [B] target forwards (verification rounds) each row took
    accepted: jax.Array  # [B] drafts accepted and kept
    accepted_at: jax.Array  # [L] rounds (over all rows) that accepted a draft at each window position
    tv: jax.Array  # [B] summed per-token distortion bound of the relaxed rule over the kept drafts (0: exact)
    draft_forwards: jax.Array  # () draft-model forwards of the whole batch (0 for Jacobi windows)


def parse_decode(spec: str):
    """`--decode` -> (kind, draft_dir): "plain" | "sjd" | "mcsjd" | "draft:DIR"."""
    if spec in ("plain", "sjd", "mcsjd"):
        return spec, None
    if spec.startswith("draft:") and spec[len("draft:"):]:
        return "draft", spec[len("draft:"):]
    raise ValueError(f"--decode {spec!r}: use plain, sjd, mcsjd or draft:DIR (a raster run sharing the tokenizer)")


def make_drafter(kind: str, *, window: int, config: ar.ImageARConfig, draft_run=None, jacobi_init: str = "random",
                 cfg_schedule: str = "constant"):
    """`(drafter, drafter params)` for `kind` in DECODES (draft: `draft_run`, a loaded raster run)."""
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    if kind in ("sjd", "mcsjd"):
        return drafters.make("jacobi" if kind == "sjd" else "mcjacobi", num_draft=window, target_config=config,
                             vocab=config.codebook_size, jacobi_init=jacobi_init)
    if kind == "draft":
        if draft_run is None:
            raise ValueError("decode 'draft' needs the draft raster run")
        return drafters.make("image_model", num_draft=window, target_config=config, draft_params=draft_run.params,
                             draft_config=draft_run.config, schedule=cfg_schedule)
    raise ValueError(f"decode must be one of {DECODES}, got {kind!r}")


def _verify_randomness(keys, L: int, K: int):
    """(uniforms [B, L], noise [B, L+1, K]) for the acceptance rule: one Exp(1) vector per row, shared by the
    L+1 positions. Only the position of the first rejection (or the bonus) draws with it, and which one that
    is depends on the uniforms alone, so the draw is still exact; it needs L+1 times fewer random numbers than
    a vector per position (on a CPU the threefry noise of [B, L+1, K] costs about a forward)."""
    def one(key):
        ku, ke = jax.random.split(key)
        return jax.random.uniform(ku, (L,), jnp.float32), jax.random.exponential(ke, (K,), jnp.float32)

    u, e = jax.vmap(one)(keys)
    e = jnp.maximum(e, TINY)
    return u, jnp.broadcast_to(e[:, None, :], (e.shape[0], L + 1, K))


@functools.partial(jax.jit, static_argnames=("config", "schedule", "drafter", "rule"))
def _spec_program(params, d_params, labels, sampling, seed, cfg_scale, row_ids, tables, *, config, schedule,
                  drafter, rule):
    from jaxar.decode.image import guidance_scale
    from jaxar.decode.relaxed import relaxed_accept

    mcfg = config.model_config()
    K, B, n = config.codebook_size, labels.shape[0], config.seq_len
    L = drafter.num_draft
    null = K + config.null_class
    class_tokens = (labels + K).astype(jnp.int32)
    cache_len = mcfg.max_seq_len  # class token + all codes but the last; writes past it are dropped
    t_cache = KVCache.empty(mcfg, 2 * B, cache_len)
    d_state = drafter.init({"model": d_params, "cfg_scale": cfg_scale}, class_tokens[:, None],
                           jnp.ones((B,), jnp.int32), cache_len)
    zeros = jnp.zeros((B,), jnp.int32)
    stats = (zeros, zeros, jnp.zeros((L,), jnp.int32), jnp.zeros((B,), jnp.float32), jnp.int32(0))
    pending = (jnp.zeros((B, L + 1, K), jnp.float32), zeros, zeros, jnp.zeros((B, L), jnp.float32))
    wants_probs = bool(getattr(drafter, "wants_probs", False))
    draft_cost = L if getattr(drafter, "config", None) is not None else 0

    def context(state: loop.LoopState) -> DraftContext:
        return DraftContext(seq=state.seq, seq_len=state.seq_len, active=state.active, step=state.step, seed=seed,
                            sampling=sampling, row_ids=row_ids)

    def step(state: loop.LoopState):
        t_cache, d_state, stats, _ = state.inner
        drafts, _, q, d_state = drafter.propose(d_state, context(state))
        last = state.last_token
        first = jnp.concatenate([last, jnp.where(state.num_tokens == 0, null, last)])
        verify_in = jnp.concatenate([first[:, None], jnp.concatenate([drafts, drafts])], axis=1)  # [2B, L+1]
        logits, t_cache = transformer.forward(params, verify_in, config=mcfg, cache=t_cache,
                                              positions=clipped_positions(mcfg, t_cache, L + 1))
        index = state.num_tokens[:, None] + jnp.arange(L + 1)[None]  # the code each position predicts
        s = guidance_scale(cfg_scale, jnp.minimum(index, n - 1), n, schedule)
        guided = apply_cfg(logits[:B, :, :K], logits[B:, :, :K], jnp.broadcast_to(s, index.shape)[..., None])
        # positions past the image are never kept; give them a harmless distribution
        p = jnp.where((index < n)[..., None], probabilities(guided, sampling), 1.0 / K)
        keys = row_keys(seed, B, state.step * (L + 2) + L + 1, row_ids=row_ids)
        u, e = _verify_randomness(keys, L, K)
        n_s, x_s, tv = relaxed_accept(rule, tables, p, q, drafts, u, e)
        n_g, x_g = greedy_accept(guided, drafts)
        greedy = sampling.greedy
        n_acc = jnp.where(greedy, n_g, n_s).astype(jnp.int32)
        nxt = jnp.where(greedy, x_g, x_s).astype(jnp.int32)
        tv = jnp.where(greedy[:, None], 0.0, tv)
        tokens, n_emit = emitted_tokens(drafts, n_acc, nxt)
        return (t_cache, d_state, stats, (p, n_acc, nxt, tv)), StepOutput(tokens=tokens, n_emitted=n_emit)

    def after(inner, before: loop.LoopState, new: loop.LoopState, out: StepOutput):
        t_cache, d_state, (rounds, accepted, accepted_at, tv_sum, d_fwd), pending = inner
        p, n_acc, nxt, tv = pending
        active = before.active
        kept = new.num_tokens - before.num_tokens
        # the target cache holds everything but the newest token of each row (both CFG halves alike)
        lengths = new.seq_len - 1
        t_cache = t_cache.with_lengths(jnp.concatenate([lengths, lengths]))
        if wants_probs:
            verified = drafters.Verified(hiddens=(), path=jnp.zeros((B, 0), jnp.int32), accepted=n_acc,
                                         next_token=nxt, probs=p)
            d_state = drafter.update(d_state, context(before), n_acc, kept, new.seq, verified=verified)
        else:
            d_state = drafter.update(d_state, context(before), n_acc, kept, new.seq)
        n_kept = jnp.where(active, jnp.minimum(n_acc, kept), 0)
        kept_tv = jnp.sum(jnp.where(jnp.arange(L)[None] < n_kept[:, None], tv, 0.0), axis=1)
        stats = (rounds + active, accepted + n_kept, accepted_at + jnp.sum(
            (jnp.arange(L)[None] < n_acc[:, None]) & active[:, None], axis=0), tv_sum + kept_tv,
            d_fwd + draft_cost * jnp.any(active).astype(jnp.int32))
        return t_cache, d_state, stats, pending

    state = loop.init_state(class_tokens[:, None], jnp.ones((B,), jnp.int32), jnp.full((B,), n, jnp.int32), (), n,
                            inner=(t_cache, d_state, stats, pending))
    state = loop.run(step, state, after=after)
    tokens, _ = loop.outputs(state, n, 0)
    rounds, accepted, accepted_at, tv_sum, d_fwd = state.inner[2]
    return tokens, ImageSpecStats(rounds=rounds, accepted=accepted, accepted_at=accepted_at, tv=tv_sum,
                                  draft_forwards=d_fwd)


def speculative_image_tokens(params: dict, labels, *, config: ar.ImageARConfig, decode: str = "sjd",
                             window: int = 16, accept="exact", codebook=None, draft_run=None,
                             drafter=None, jacobi_init: str = "random", cfg_scale: float = 1.0,
                             cfg_schedule: str = "constant", temperature: float = 1.0, top_k: int = 0,
                             top_p: float = 1.0, seed: int = 0, row_ids=None, tables=None):
    """Code sequences int32 [B, seq_len] for `labels` [B] from a raster model by speculative decoding, and
    `ImageSpecStats`. Distributed exactly as `image.sample_tokens` with the same settings when `accept` is
    "exact" (greedy: the same codes); relaxed rules stay within their documented per-token bound.

    decode: "sjd" | "mcsjd" (Jacobi windows of `window` codes, `jacobi_init` "random" | "previous") or
    "draft" (`draft_run`: a loaded raster run on the same tokenizer, drafting `window` codes per round).
    accept: "exact", "lantern:k,delta", "gsd:g[,p_thr[,d_thr]]" or a `relaxed.AcceptRule`; the relaxed rules
    need `codebook` (the tokenizer's codes [K, C], `vq_params["params"]["codebook"]`) unless `tables` (from
    `relaxed.build_tables`, computed once) is given. `drafter`: a prebuilt `(drafter, params)` pair (reuse one
    across calls). `row_ids` int [B]: ids folded into each row's keys (default 0..B-1).
    """
    from jaxar.decode import image
    from jaxar.decode.relaxed import AcceptRule, build_tables, parse_accept

    if config.kind != "raster":
        raise ValueError(f"speculative image decoding is for raster models; this is a {config.kind!r} model "
                         "(VAR samples a whole scale per forward already)")
    labels = ar.check_labels(labels, config)
    B = image.check_settings(labels, cfg_scale, cfg_schedule, seed)
    rule = accept if isinstance(accept, AcceptRule) else parse_accept(accept)
    if tables is None:
        if rule.kind != "exact" and codebook is None:
            raise ValueError(f"accept={accept!r} needs the tokenizer's codebook (codebook=vq_params['params']"
                             "['codebook'])")
        tables = build_tables(rule, None if codebook is None else np.asarray(codebook))
    if drafter is None:
        drafter = make_drafter(decode, window=window, config=config, draft_run=draft_run, jacobi_init=jacobi_init,
                               cfg_schedule=cfg_schedule)
    drafter, d_params = drafter
    sampling = SamplingParams.build(SamplingConfig(temperature=temperature, top_k=top_k, top_p=top_p), B)
    mcfg = config.model_config()
    t_params = transformer.decode_params(params["transformer"], mcfg)
    if row_ids is None:
        row_ids = np.arange(B)
    row_ids = jnp.asarray(row_ids, jnp.int32)
    if row_ids.shape != (B,):
        raise ValueError(f"row_ids must have shape ({B},), got {row_ids.shape}")
    return _spec_program(t_params, d_params, labels, sampling, jnp.asarray(seed, jnp.uint32),
                         jnp.asarray(cfg_scale, jnp.float32), row_ids, tables, config=config,
                         schedule=cfg_schedule, drafter=drafter, rule=rule)
