"""Sampling the image AR models (`jaxar.models.vision.ar`) inside one jitted program.

    tokens = sample_tokens(params, labels, config=cfg, tokenizer=(vq_config, vq_params), cfg_scale=3.0)
    images = decode_images(tokens, config=cfg, tokenizer=(vq_config, vq_params))   # uint8 [B, 28, 28]

Classifier-free guidance: the B conditional rows and B null-class rows run as ONE batch of 2B
through the model; each step's logits are `sampling.apply_cfg(cond, uncond, s)` (log-softmax
space, ``u + s (c - u)``: ``s = 1`` conditional, ``s = 0`` unconditional), and the token sampled
from them is fed to both halves.

Guidance schedule over the n sampling steps (raster: n = 49 tokens; var: n = number of scales),
step i = 0 .. n-1:

* ``"constant"``: ``s_i = s``;
* ``"linear"``: VAR's ramp ``s_i = 1 + (s - 1) * i / (n - 1)``: conditional (no guidance) at the
  first step rising to ``s`` at the last (VAR writes ``(1 + t) c - t u`` with ``t = (s - 1) i/(n-1)``).

Raster: `jaxar.decode.loop` (the one decode driver: fixed budget of 49 tokens, no EOS) runs one
token per step in a `lax.while_loop`; step 0 feeds the class tokens (the prompt) into the KV cache,
step i > 0 the newest code.
VAR: one forward per scale, that scale's n_k^2 inputs as new queries against the KV cache
(`Mask.bidirectional()` among them), all its tokens sampled in parallel, then the tokenizer's
`add_scale` gives the next scale's input; the loop over the (few, differently shaped) scales is
unrolled inside the one jit. Settings (cfg_scale, temperature, top_k, top_p, seed) are traced: new
values reuse the compiled program, which is one per (config, batch, schedule, tokenizer config).

Tokens are drawn as `sampling.sample` draws them (temperature, top-k, top-p per row; same keys,
same draws). Random keys: raster token i of row b uses `row_keys(seed, B, i)[b]`; var scale k uses
`row_keys(seed, B * n_k^2, k)` over its tokens row-major (row b, position j -> b * n_k^2 + j).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from jaxar.cache import KVCache
from jaxar.decode import loop
from jaxar.decode.loop import StepOutput
from jaxar.decode.sampling import (SamplingConfig, SamplingParams, _when_any, apply_cfg, apply_temperature,
                                   apply_top_k, apply_top_p, row_keys)
from jaxar.models import transformer
from jaxar.models.masks import Mask
from jaxar.models.vision import ar, scales
from jaxar.models.vision.vqvae import VQVAE, to_uint8

__all__ = ["SCHEDULES", "guidance_scale", "sample_tokens", "decode_images", "sample_images"]

SCHEDULES = ("constant", "linear")


def guidance_scale(cfg_scale, step, num_steps: int, schedule: str):
    """The guidance scale of step `step` (0-based) of `num_steps` (see the module docstring)."""
    if schedule == "constant" or num_steps <= 1:
        return jnp.asarray(cfg_scale, jnp.float32)
    return 1.0 + (jnp.asarray(cfg_scale, jnp.float32) - 1.0) * (jnp.asarray(step, jnp.float32) / (num_steps - 1))


def _gumbel(keys, vocab: int) -> jax.Array:
    """float32 [N, vocab]: the noise `jax.random.categorical(keys[n], row)` adds to a row before its argmax."""
    return jax.vmap(lambda key: jax.random.gumbel(key, (vocab,), jnp.float32))(keys)


def _draw(noise, logits, sampling: SamplingParams) -> jax.Array:
    """int32 [N]: what `sampling.sample(keys, logits, sampling)` draws, given `noise = _gumbel(keys, V)`,
    for settings without penalties or min-p (temperature, top-k, top-p per row; temperature 0 = argmax):
    the same draws without sample()'s runtime branches, and (VAR) with the noise of every scale made by one
    PRNG call up front, which keeps the program small (it is inlined once per scale)."""
    warped = apply_temperature(logits, sampling.temperature)
    # The sorts of top-k / top-p only when some row asks for them (a runtime branch, no recompile): on a CPU
    # they cost more than the model's forward of a whole scale.
    warped = _when_any(sampling.top_k > 0, lambda x: apply_top_k(x, sampling.top_k), warped)
    warped = _when_any(sampling.top_p < 1.0, lambda x: apply_top_p(x, sampling.top_p, sampling.top_p_cut), warped)
    drawn = jnp.argmax(noise + warped, axis=-1)
    return jnp.where(sampling.greedy, jnp.argmax(logits, axis=-1), drawn).astype(jnp.int32)


def _var_noise(seed, batch: int, patch_nums, vocab: int) -> jax.Array:
    """float32 [batch, sum n_k^2, vocab]: for token j of scale k in row b the noise of key
    `row_keys(seed, batch * n_k^2, k)[b * n_k^2 + j]`, all keys in one vmapped call."""
    rows, steps = [], []
    for k, n in enumerate(patch_nums):
        m = n * n
        rows.append(np.arange(batch * m, dtype=np.uint32).reshape(batch, m))
        steps.append(np.full((batch, m), k, np.int32))
    rows, steps = np.concatenate(rows, axis=1).reshape(-1), np.concatenate(steps, axis=1).reshape(-1)
    base = jax.random.key(seed)
    keys = jax.vmap(lambda r, k: jax.random.fold_in(jax.random.fold_in(base, r), k))(jnp.asarray(rows),
                                                                                    jnp.asarray(steps))
    return _gumbel(keys, vocab).reshape(batch, -1, vocab)


def _raster_program(params, labels, sampling, seed, cfg_scale, *, config, schedule):
    mcfg = config.model_config()
    K, B, n = config.codebook_size, labels.shape[0], config.seq_len
    # [2B]: the conditional rows' class tokens, then the null-class rows'
    class_tokens = jnp.concatenate([labels + K, jnp.full((B,), K + config.null_class, jnp.int32)])

    def step(state: loop.LoopState):
        cache, history = state.inner
        i = state.step  # the index of the token being sampled (one token per step for every row)
        # Step 0 writes the class tokens (the prompt) into the cache; later steps the newest code, fed to both halves.
        feed = jnp.where(i == 0, class_tokens, jnp.concatenate([state.last_token, state.last_token]))
        rows_logits, cache = transformer.forward(params, feed[:, None], config=mcfg, cache=cache)
        guided = apply_cfg(rows_logits[:B, 0, :K], rows_logits[B:, 0, :K], guidance_scale(cfg_scale, i, n, schedule))
        token = _draw(_gumbel(row_keys(seed, B, i), K), guided, sampling)
        history = jax.lax.dynamic_update_slice(history, guided[:, None, :], (0, i, 0))
        return (cache, history), StepOutput(tokens=token[:, None], n_emitted=jnp.ones_like(token))

    inner = (KVCache.empty(mcfg, 2 * B, n), jnp.zeros((B, n, K), jnp.float32))
    state = loop.init_state(class_tokens[:B, None], jnp.ones((B,), jnp.int32), jnp.full((B,), n, jnp.int32), (), n,
                            inner=inner)
    state = loop.run(step, state)
    tokens, _ = loop.outputs(state, n, 0)
    return tokens, state.inner[1]


def _var_program(params, labels, sampling, seed, cfg_scale, vq_params, *, config, schedule, vq_config):
    mcfg = config.model_config()
    tr = params["transformer"]
    B, nums = labels.shape[0], config.patch_nums
    S = len(nums)
    labels2 = jnp.concatenate([labels, jnp.full((B,), config.null_class, jnp.int32)])
    # [2B, D]: the AdaLN condition and the scale-0 input (start token)
    cond = jnp.take(params["class_embed"], labels2, axis=0)
    x = cond[:, None, :]
    cache = KVCache.empty(mcfg, 2 * B, config.seq_len)
    f_hat = jnp.zeros((B, nums[-1], nums[-1], vq_config.code_dim), jnp.float32)
    tokens, history = [], []
    starts = scales.scale_starts(nums)
    noise = _var_noise(seed, B, nums, config.codebook_size)
    for k, side in enumerate(nums):
        m = side * side
        embeds = x + params["level_embed"][k][None, None, :]
        rows_logits, cache = transformer.forward(tr, config=mcfg, cache=cache, mask=Mask.bidirectional(),
                                                 embeds=embeds, cond=cond)
        guided = apply_cfg(rows_logits[:B], rows_logits[B:], guidance_scale(cfg_scale, k, S, schedule))
        # [B, m]: every token of the scale at once, one key per (row, position)
        rows = jnp.repeat(jnp.arange(B), m)
        start = starts[k]
        flat = _draw(noise[:, start:start + m].reshape(B * m, -1), guided.reshape(B * m, -1),
                     sampling.take_rows(rows))
        tokens_k = flat.reshape(B, side, side)
        tokens.append(tokens_k)
        history.append(guided)
        f_hat, nxt = ar.msvq_apply(vq_config, vq_params, "add_scale", f_hat, tokens_k, k)
        if nxt is not None:
            x = ar.word_embed(params, nxt.reshape(B, -1, nxt.shape[-1])).astype(embeds.dtype)
            x = jnp.concatenate([x, x], axis=0)
    return scales.flatten_scales(tokens), jnp.concatenate(history, axis=1)


@functools.partial(jax.jit, static_argnames=("config", "schedule", "vq_config"))
def _sample_jit(params, labels, sampling, seed, cfg_scale, vq_params, *, config, schedule, vq_config):
    if config.kind == "raster":
        return _raster_program(params["transformer"], labels, sampling, seed, cfg_scale, config=config,
                               schedule=schedule)
    return _var_program(params, labels, sampling, seed, cfg_scale, vq_params, config=config, schedule=schedule,
                        vq_config=vq_config)


def check_settings(labels, cfg_scale, cfg_schedule: str, seed) -> int:
    """One-line errors for bad guidance / seed settings or no labels; returns the batch size."""
    if cfg_schedule not in SCHEDULES:
        raise ValueError(f"cfg_schedule={cfg_schedule!r}: use one of {SCHEDULES}")
    if not np.isfinite(float(cfg_scale)):
        raise ValueError(f"cfg_scale must be a finite number, got {cfg_scale}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= int(seed) < 2 ** 32:
        raise ValueError(f"seed must be an integer in [0, 2**32), got {seed!r}")
    if labels.shape[0] == 0:
        raise ValueError("labels is empty: give at least one label")
    return int(labels.shape[0])


def sample_tokens(params: dict, labels, *, config: ar.ImageARConfig, tokenizer=None, cfg_scale: float = 1.0,
                  cfg_schedule: str = "constant", temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                  seed: int = 0, return_logits: bool = False):
    """Sample code sequences int32 [B, seq_len] for `labels` int [B] (num_classes = the null class).

    cfg_scale: guidance scale s (1: conditional, 0: unconditional); cfg_schedule: "constant" | "linear"
    (module docstring). temperature 0 is greedy; top_k 0 / top_p 1 are off. `tokenizer=(vq_config,
    vq_params)` is needed by var. With `return_logits`, also the guided logits float32 [B, seq_len, K]
    each token was sampled from (apply_cfg's output, before temperature / top-k / top-p).
    """
    labels = ar.check_labels(labels, config)
    tokenizer = ar.check_tokenizer(config, tokenizer)
    B = check_settings(labels, cfg_scale, cfg_schedule, seed)
    sampling = SamplingParams.build(SamplingConfig(temperature=temperature, top_k=top_k, top_p=top_p), B)
    mcfg = config.model_config()
    params = {**params, "transformer": transformer.decode_params(params["transformer"], mcfg)}
    vq_config, vq_params = tokenizer if (tokenizer is not None and config.kind == "var") else (None, None)
    tokens, logits = _sample_jit(params, labels, sampling, jnp.asarray(seed, jnp.uint32),
                                 jnp.asarray(cfg_scale, jnp.float32), vq_params, config=config,
                                 schedule=cfg_schedule, vq_config=vq_config)
    return (tokens, logits) if return_logits else tokens


@functools.partial(jax.jit, static_argnames=("config", "vq_config"))
def _decode_jit(tokens, vq_params, *, config, vq_config):
    model = VQVAE(vq_config)
    if config.kind == "raster":
        side = config.side
        return model.apply(vq_params, tokens.reshape(tokens.shape[0], side, side), method=VQVAE.decode_tokens)
    maps = scales.unflatten_scales(tokens, config.patch_nums)
    return model.apply(vq_params, maps, method=VQVAE.decode_scale_tokens)


def decode_images(tokens, *, config: ar.ImageARConfig, tokenizer) -> np.ndarray:
    """Code sequences int [B, seq_len] -> uint8 images [B, 28, 28] through the tokenizer's decoder."""
    if tokenizer is None:
        raise ValueError("decode_images needs tokenizer=(vq_config, vq_params)")
    vq_config, vq_params = ar.check_tokenizer(config, tokenizer)
    if config.kind == "var" and not vq_config.patch_nums:
        raise ValueError("a var model needs a tokenizer with a multi-scale quantizer (tokenizer.patch_nums)")
    tokens = ar.check_tokens(tokens, config)
    return to_uint8(_decode_jit(tokens, vq_params, config=config, vq_config=vq_config))


def sample_images(params: dict, labels, *, config: ar.ImageARConfig, tokenizer, cfg_scale: float = 1.0,
                  cfg_schedule: str = "constant", temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                  seed: int = 0) -> np.ndarray:
    """`sample_tokens` then `decode_images`: uint8 [B, 28, 28]."""
    tokens = sample_tokens(params, labels, config=config, tokenizer=tokenizer, cfg_scale=cfg_scale,
                           cfg_schedule=cfg_schedule, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)
    return decode_images(tokens, config=config, tokenizer=tokenizer)

