"""Speculative-decoding acceptance rules (pure ``jnp`` reference).

Notation, per batch row: the draft proposed tokens ``x_0 .. x_{k-1}`` with
draft distributions ``q_0 .. q_{k-1}``; the target scored them giving
``p_0 .. p_k`` (``p_i`` is the target distribution for the token at draft
position ``i``; ``p_k`` is the one after the last draft token).

Rule (Leviathan et al. 2023; Chen et al. 2023): for ``i = 0, 1, ...`` accept
``x_i`` with probability ``min(1, p_i(x_i) / q_i(x_i))``; at the first
rejection ``j`` emit a token from ``norm(max(p_j - q_j, 0))`` (from ``p_j`` if
that residual is all zero); if all ``k`` drafts pass emit a bonus token from
``p_k``. The emitted sequence ``x_0 .. x_{n-1}, next`` is distributed exactly
as ``n + 1`` tokens sampled from the target.

Randomness is explicit so that the fused kernel in
``pallas_kernels/verify.py`` consumes the very same numbers:

* ``uniforms`` ``[B, k]`` in ``[0, 1)``: with ``px = p_i(x_i)`` and
  ``qx = q_i(x_i)``, draft ``i`` is accepted iff
  ``(u_i * qx < px) | ((px >= qx) & (px > 0))``, i.e. ``u_i < min(1, px / qx)``
  written without a division (``px = 0`` is always rejected, ``qx = 0 < px``
  always accepted; out-of-range draft ids are rejected).
* ``noise`` ``[B, k+1, V]`` of Exp(1) samples: the emitted token at position
  ``j`` is ``argmax_v r(v) / max(E_j(v), tiny)`` (first index among ties),
  where ``r`` is the residual (or ``p_k`` for the bonus). This "exponential
  race" samples ``v`` with probability ``r(v) / sum(r)`` without normalising
  ``r``. If the largest score is 0 (residual all zero) the argmax of
  ``p_j(v) / E_j(v)`` is used instead.

Deterministic drafts (n-gram / prompt lookup, no ``q``) are the case
``q_i = one_hot(x_i)``: accept with probability ``p_i(x_i)``, on rejection
sample from ``p_i`` with ``x_i`` zeroed out.
"""

from __future__ import annotations

import functools

import numpy as np
import jax
import jax.numpy as jnp

__all__ = [
    "TINY",
    "draw_verify_randomness",
    "speculative_accept",
    "deterministic_accept",
    "greedy_accept",
    "accept_from_randomness",
    "accept_from_masses",
    "emitted_tokens",
    "first_argmax",
]

# Exp(1) noise is clamped to this before dividing, so a (rare) exact 0 draw
# cannot produce inf/nan scores.
TINY = float(np.finfo(np.float32).tiny)


def first_argmax(x, axis: int = -1) -> jax.Array:
    """Index of the first maximum along ``axis`` (int32), written as max + min.

    Same as ``jnp.argmax`` for NaN-free input; spelled out so the Pallas kernel
    can use the identical two reductions.
    """
    m = jnp.max(x, axis=axis, keepdims=True)
    n = x.shape[axis]
    iota = jax.lax.broadcasted_iota(jnp.int32, x.shape, axis % x.ndim)
    return jnp.min(jnp.where(x == m, iota, n), axis=axis).astype(jnp.int32)


def _is_typed_key(x) -> bool:
    return hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jax.dtypes.prng_key)


def draw_verify_randomness(key, batch: int, k: int, vocab: int):
    """Draw ``(uniforms [B, k], noise [B, k+1, V])`` float32 for one verification.

    ``key`` is a single PRNG key (typed scalar or raw ``uint32[2]``), or one key
    per row (typed ``[B]`` or raw ``[B, 2]``) so a row's randomness does not
    depend on the rest of the batch. Noise is Exp(1), clamped to ``>= TINY``.
    """
    return _draw_verify_randomness(key, int(batch), int(k), int(vocab))


def key_layout(key, batch: int):
    """``(key, single)``: a PRNG key checked to be one key (``single``) or one per
    row (typed ``[batch]`` or raw ``uint32 [batch, 2]``); one-line errors otherwise."""
    typed = _is_typed_key(key)
    key = key if typed else jnp.asarray(key)
    if not typed and key.dtype != jnp.uint32:
        raise ValueError(f"key must be a PRNG key, got dtype {key.dtype}")
    single_shape = () if typed else (2,)
    per_row_shape = (batch,) if typed else (batch, 2)
    if key.shape not in (single_shape, per_row_shape):
        raise ValueError(
            f"key must be one key ({'typed scalar' if typed else 'uint32[2]'}) or one per row "
            f"(shape {per_row_shape}); got shape {key.shape}")
    return key, key.shape == single_shape


@functools.partial(jax.jit, static_argnums=(1, 2, 3))
def _draw_verify_randomness(key, batch, k, vocab):
    key, single = key_layout(key, batch)

    def draw(kk, lead):
        ku, ke = jax.random.split(kk)
        u = jax.random.uniform(ku, lead + (k,), jnp.float32)
        e = jax.random.exponential(ke, lead + (k + 1, vocab), jnp.float32)
        return u, jnp.maximum(e, TINY)

    if single:
        return draw(key, (batch,))
    return jax.vmap(lambda kk: draw(kk, ()))(key)


def _check_shapes(target_probs, draft_probs, draft_tokens, uniforms=None, noise=None):
    if target_probs.ndim != 3:
        raise ValueError(f"target_probs must be [B, k+1, V], got shape {target_probs.shape}")
    B, K1, V = target_probs.shape
    k = K1 - 1
    if K1 < 1:
        raise ValueError("target_probs needs at least one position (k + 1 >= 1)")
    if not jnp.issubdtype(target_probs.dtype, jnp.floating):
        raise ValueError(f"target_probs must be floating point, got {target_probs.dtype}")
    if draft_tokens.shape != (B, k):
        raise ValueError(
            f"draft_tokens must be [B, k] = {(B, k)} to match target_probs {target_probs.shape}, "
            f"got {draft_tokens.shape}")
    if not jnp.issubdtype(draft_tokens.dtype, jnp.integer):
        raise ValueError(f"draft_tokens must be integer, got {draft_tokens.dtype}")
    if draft_probs is not None:
        if draft_probs.shape != (B, k, V):
            raise ValueError(
                f"draft_probs must be [B, k, V] = {(B, k, V)} to match target_probs, "
                f"got {draft_probs.shape}")
        if not jnp.issubdtype(draft_probs.dtype, jnp.floating):
            raise ValueError(f"draft_probs must be floating point, got {draft_probs.dtype}")
    if uniforms is not None and uniforms.shape != (B, k):
        raise ValueError(f"uniforms must be [B, k] = {(B, k)}, got {uniforms.shape}")
    if noise is not None and noise.shape != (B, K1, V):
        raise ValueError(f"noise must be [B, k+1, V] = {(B, K1, V)}, got {noise.shape}")
    return B, k, V


def _randomness(key, uniforms, noise, B, k, V):
    if uniforms is None or noise is None:
        if key is None:
            raise ValueError("pass either key, or both uniforms [B, k] and noise [B, k+1, V]")
        du, dn = draw_verify_randomness(key, B, k, V)
        uniforms = du if uniforms is None else uniforms
        noise = dn if noise is None else noise
    return jnp.asarray(uniforms, jnp.float32), jnp.asarray(noise, jnp.float32)


def accept_from_randomness(target_probs, draft_probs, draft_tokens, uniforms, noise):
    """The acceptance rule given explicit randomness (see the module docstring).

    Args:
      target_probs: ``[B, k+1, V]`` target distributions ``p``.
      draft_probs: ``[B, k, V]`` draft distributions ``q``, or ``None`` for
        deterministic drafts (``q_i = one_hot(x_i)``).
      draft_tokens: int ``[B, k]``.
      uniforms: ``[B, k]`` in ``[0, 1)``.
      noise: ``[B, k+1, V]`` positive Exp(1) samples.

    Returns ``(accepted_len [B] int32 in 0..k, next_token [B] int32)``.
    """
    return _checked_accept(target_probs, draft_probs, draft_tokens, uniforms, noise)


def accept_from_masses(target_probs, draft_probs, draft_tokens, uniforms, noise, px, qx):
    """:func:`accept_from_randomness` with the acceptance test on given masses.

    Draft ``i`` is accepted iff ``(u_i * qx_i < px_i) | ((px_i >= qx_i) & (px_i > 0))``,
    i.e. with probability ``min(1, px_i / qx_i)``, where ``px, qx`` ``[B, k]``
    replace ``p_i(x_i), q_i(x_i)`` (e.g. the masses of a group of tokens around
    ``x_i`` for grouped speculative decoding). The token at the first
    rejection ``n`` is still drawn from ``norm(max(0, p_n - q_n))`` and the
    bonus from ``p_k``, with the same exponential race; with
    ``px = p_i(x_i), qx = q_i(x_i)`` the result is bit-identical to
    :func:`accept_from_randomness`.

    Returns ``(accepted_len [B] int32 in 0..k, next_token [B] int32)``.
    """
    return _checked_accept(target_probs, draft_probs, draft_tokens, uniforms, noise, jnp.asarray(px),
                           jnp.asarray(qx))


def _checked_accept(target_probs, draft_probs, draft_tokens, uniforms, noise, px=None, qx=None):
    """Arrays in, shapes checked (one-line errors), then the jitted rule."""
    target_probs = jnp.asarray(target_probs)
    draft_tokens = jnp.asarray(draft_tokens)
    uniforms = jnp.asarray(uniforms)
    noise = jnp.asarray(noise)
    draft_probs = None if draft_probs is None else jnp.asarray(draft_probs)
    B, k, _ = _check_shapes(target_probs, draft_probs, draft_tokens, uniforms, noise)
    for name, m in (("px", px), ("qx", qx)):
        if m is not None and m.shape != (B, k):
            raise ValueError(f"{name} must be [B, k] = {(B, k)} like draft_tokens, got {m.shape}")
    return _accept_core(target_probs, draft_probs, draft_tokens, uniforms, noise, px, qx)


@jax.jit
def _accept_core(target_probs, draft_probs, draft_tokens, uniforms, noise, px=None, qx=None):
    V = target_probs.shape[-1]
    k = draft_tokens.shape[-1]
    p = target_probs.astype(jnp.float32)
    u = uniforms.astype(jnp.float32)
    e = jnp.maximum(noise.astype(jnp.float32), TINY)
    toks = draft_tokens.astype(jnp.int32)
    cols = jnp.arange(V, dtype=jnp.int32)

    # Acceptance tests (on p_i(x_i), q_i(x_i) unless the masses are given).
    if draft_probs is not None:
        q = draft_probs.astype(jnp.float32)
    if px is None:
        px = jnp.take_along_axis(p[:, :k], toks[..., None], axis=-1)[..., 0]
    px = px.astype(jnp.float32)
    if qx is None:
        if draft_probs is None:
            qx = jnp.where((toks >= 0) & (toks < V), 1.0, 0.0).astype(jnp.float32)
        else:
            qx = jnp.take_along_axis(q, toks[..., None], axis=-1)[..., 0]
    qx = qx.astype(jnp.float32)
    accepted = (u * qx < px) | ((px >= qx) & (px > 0))
    n = jnp.sum(jnp.cumprod(accepted.astype(jnp.int32), axis=-1), axis=-1).astype(jnp.int32)

    # Residual at position n (q_k := 0, so position k is the bonus from p_k).
    take = lambda a: jnp.take_along_axis(a, n[:, None, None], axis=1)[:, 0]  # noqa: E731
    p_n = take(p)
    e_n = take(e)
    if draft_probs is None:
        tok_n = jnp.take_along_axis(jnp.pad(toks, ((0, 0), (0, 1)), constant_values=-1), n[:, None], axis=1)
        q_n = (cols[None, :] == tok_n).astype(jnp.float32)
    else:
        q_n = take(jnp.pad(q, ((0, 0), (0, 1), (0, 0))))
    r = jnp.maximum(p_n - q_n, 0.0)
    s_r = r / e_n
    s_p = p_n / e_n
    next_token = jnp.where(jnp.max(s_r, axis=-1) > 0, first_argmax(s_r), first_argmax(s_p))
    return n, next_token.astype(jnp.int32)


def speculative_accept(target_probs, draft_probs, draft_tokens, key=None, *, uniforms=None, noise=None):
    """Speculative sampling acceptance (Leviathan et al. / Chen et al.).

    Args:
      target_probs: ``[B, k+1, V]`` target probabilities (e.g.
        ``sampling.probabilities`` of the target logits at the k+1 positions).
      draft_probs: ``[B, k, V]`` draft probabilities the drafts were sampled
        from, or ``None`` for deterministic drafts.
      draft_tokens: int ``[B, k]``.
      key: PRNG key (one, or one per row) used to draw the randomness with
        :func:`draw_verify_randomness`; not needed when both ``uniforms`` and
        ``noise`` are given.
      uniforms, noise: explicit randomness (see module docstring).

    Returns ``(accepted_len [B] int32 in 0..k, next_token [B] int32)``: emit
    ``draft_tokens[:, :accepted_len]`` then ``next_token``.
    """
    target_probs = jnp.asarray(target_probs)
    draft_tokens = jnp.asarray(draft_tokens)
    draft_probs = None if draft_probs is None else jnp.asarray(draft_probs)
    B, k, V = _check_shapes(target_probs, draft_probs, draft_tokens,
                            None if uniforms is None else jnp.asarray(uniforms),
                            None if noise is None else jnp.asarray(noise))
    uniforms, noise = _randomness(key, uniforms, noise, B, k, V)
    return accept_from_randomness(target_probs, draft_probs, draft_tokens, uniforms, noise)


def deterministic_accept(target_probs, draft_tokens, key=None, *, uniforms=None, noise=None):
    """Acceptance for deterministic drafts (n-gram / prompt lookup; no ``q``).

    Accept ``x_i`` with probability ``p_i(x_i)``; on rejection sample from
    ``p_i`` with ``x_i`` zeroed and renormalised. Exactly
    ``speculative_accept`` with ``q_i = one_hot(x_i)``.
    """
    return speculative_accept(target_probs, None, draft_tokens, key, uniforms=uniforms, noise=noise)


def greedy_accept(target, draft_tokens):
    """Greedy verification: accept while the draft equals the target argmax.

    Args:
      target: target logits/probabilities ``[B, k+1, V]`` (floating) or their
        argmax ``[B, k+1]`` (integer).
      draft_tokens: int ``[B, k]``.

    Returns ``(accepted_len [B] int32, next_token [B] int32)`` where
    ``next_token`` is the target argmax at the first mismatch (or at ``k``).
    """
    target = jnp.asarray(target)
    draft_tokens = jnp.asarray(draft_tokens)
    if target.ndim == 3 and jnp.issubdtype(target.dtype, jnp.floating):
        target = jnp.argmax(target, axis=-1)
    elif not (target.ndim == 2 and jnp.issubdtype(target.dtype, jnp.integer)):
        raise ValueError(
            f"target must be float logits [B, k+1, V] or integer argmax [B, k+1]; "
            f"got {target.dtype} {target.shape}")
    B, K1 = target.shape
    if draft_tokens.shape != (B, K1 - 1):
        raise ValueError(f"draft_tokens must be [B, k] = {(B, K1 - 1)}, got {draft_tokens.shape}")
    return _greedy_core(target.astype(jnp.int32), draft_tokens)


@jax.jit
def _greedy_core(target, draft_tokens):
    match = (draft_tokens.astype(jnp.int32) == target[:, :-1]).astype(jnp.int32)
    n = jnp.sum(jnp.cumprod(match, axis=-1), axis=-1).astype(jnp.int32)
    return n, jnp.take_along_axis(target, n[:, None], axis=1)[:, 0]


def emitted_tokens(draft_tokens, accepted_len, next_token, pad_id: int = 0):
    """Assemble the emitted tokens ``[B, k+1]`` and their count ``n + 1`` ``[B]``.

    Row ``b`` is ``draft_tokens[b, :n], next_token[b]`` followed by
    ``pad_id``.
    """
    draft_tokens = jnp.asarray(draft_tokens, jnp.int32)
    B, k = draft_tokens.shape
    n = jnp.asarray(accepted_len, jnp.int32)
    pos = jnp.arange(k + 1, dtype=jnp.int32)[None, :]
    padded = jnp.pad(draft_tokens, ((0, 0), (0, 1)), constant_values=pad_id)
    out = jnp.where(pos < n[:, None], padded,
                    jnp.where(pos == n[:, None], jnp.asarray(next_token, jnp.int32)[:, None], pad_id))
    return out, n + 1
