"""Fused speculative-decoding verification kernel (Pallas).

One program per batch row streams the row's target probabilities ``p``
``[k+1, V]``, draft probabilities ``q`` ``[k, V]`` (or the one-hot of the draft
tokens, computed on the fly, for deterministic drafts) and Exp(1) noise
``[k+1, V]`` once, in vocabulary chunks of ``block_v``. In that single pass it

* gathers ``p_i(x_i)`` and ``q_i(x_i)`` for the acceptance tests, and
* keeps, for every position ``j``, a running first-argmax of the residual race
  ``max(p_j - q_j, 0) / E_j`` (``q_k := 0``: the bonus token) and of the
  fallback race ``p_j / E_j``,

then decides the accepted length ``n`` and picks the race winner at position
``n``. No normalised residual is ever materialised. The rule and its use of the
randomness are exactly those of :mod:`jaxar.decode.acceptance` (see its
docstring), which :func:`verify_reference` calls; given the same uniforms and
noise both return identical results (bit-exact on CPU / in interpret mode; on
an accelerator whose f32 division is not correctly rounded a near-tie in the
race could in principle resolve differently -- both results are then valid
samples of the same distribution).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from jaxar.decode import acceptance

__all__ = ["verify", "verify_reference", "DEFAULT_BLOCK_V"]

DEFAULT_BLOCK_V = 512
_TINY = acceptance.TINY


def _running_first_argmax(best, idx, scores, cols, vocab):
    """Merge a chunk's (max, first argmax) per row into the running state."""
    m = jnp.max(scores, axis=1, keepdims=True)
    ci = jnp.min(jnp.where(scores == m, cols, vocab), axis=1, keepdims=True)
    better = m > best
    return jnp.where(better, m, best), jnp.where(better, ci, idx)


def _verify_kernel(tok_ref, u_ref, p_ref, *refs, k, vocab, block_v, has_q):
    if has_q:
        q_ref, e_ref, len_ref, next_ref = refs
    else:
        q_ref = None
        e_ref, len_ref, next_ref = refs
    f32, i32 = jnp.float32, jnp.int32
    toks = tok_ref[0]  # (max(k,1), 1) int32 column
    kk = max(k, 1)

    def race_state(rows):
        return (jnp.full((rows, 1), -jnp.inf, f32), jnp.zeros((rows, 1), i32),
                jnp.full((rows, 1), -jnp.inf, f32), jnp.zeros((rows, 1), i32))

    def update(state, p, q, e, cols):
        s_r = (jnp.maximum(p - q, 0.0)) / e
        s_p = p / e
        br, ir, bp, ip = state
        br, ir = _running_first_argmax(br, ir, s_r, cols, vocab)
        bp, ip = _running_first_argmax(bp, ip, s_p, cols, vocab)
        return br, ir, bp, ip

    def chunk(start, size, carry):
        px, qx, head, tail = carry
        cols = start + jax.lax.broadcasted_iota(i32, (1, size), 1)
        sl = pl.ds(start, size)
        # Bonus / last position: residual against q_k := 0.
        p_t = p_ref[0, k:k + 1, sl].astype(f32)
        e_t = jnp.maximum(e_ref[0, k:k + 1, sl].astype(f32), _TINY)
        tail = update(tail, p_t, jnp.zeros_like(p_t), e_t, cols)
        if k > 0:
            p_h = p_ref[0, 0:k, sl].astype(f32)
            e_h = jnp.maximum(e_ref[0, 0:k, sl].astype(f32), _TINY)
            hit = cols == toks  # (k, size)
            q_h = q_ref[0, :, sl].astype(f32) if has_q else hit.astype(f32)
            px = px + jnp.sum(jnp.where(hit, p_h, 0.0), axis=1, keepdims=True)
            qx = qx + jnp.sum(jnp.where(hit, q_h, 0.0), axis=1, keepdims=True)
            head = update(head, p_h, q_h, e_h, cols)
        return px, qx, head, tail

    carry = (jnp.zeros((kk, 1), f32), jnp.zeros((kk, 1), f32), race_state(kk), race_state(1))
    n_full, rem = divmod(vocab, block_v)
    if n_full:
        def body(i, c):
            return chunk(pl.multiple_of(i * block_v, block_v), block_v, c)
        carry = jax.lax.fori_loop(0, n_full, body, carry)
    if rem:
        carry = chunk(n_full * block_v, rem, carry)
    px, qx, head, tail = carry

    br_t, ir_t, _, ip_t = tail
    tail_next = jnp.where(br_t > 0, ir_t, ip_t)  # (1, 1)
    if k > 0:
        u = u_ref[0]  # (k, 1)
        accepted = (u * qx < px) | ((px >= qx) & (px > 0))
        rows = jax.lax.broadcasted_iota(i32, (k, 1), 0)
        n = jnp.min(jnp.where(accepted, k, rows), axis=0, keepdims=True)  # (1, 1)
        sel = rows == n
        br, ir, _, ip = head
        best_n = jnp.sum(jnp.where(sel, br, 0.0), axis=0, keepdims=True)
        ir_n = jnp.sum(jnp.where(sel, ir, 0), axis=0, keepdims=True)
        ip_n = jnp.sum(jnp.where(sel, ip, 0), axis=0, keepdims=True)
        head_next = jnp.where(best_n > 0, ir_n, ip_n)
        next_tok = jnp.where(n < k, head_next, tail_next)
    else:
        n = jnp.zeros((1, 1), i32)
        next_tok = tail_next
    len_ref[0] = n.astype(i32)
    next_ref[0] = next_tok.astype(i32)


def _check_randomness(uniforms, noise):
    for name, a in (("uniforms", uniforms), ("noise", noise)):
        if not jnp.issubdtype(a.dtype, jnp.floating):
            raise ValueError(f"{name} must be floating point, got {a.dtype}")


def _prepare(target_probs, draft_probs, draft_tokens, uniforms, noise, key):
    target_probs = jnp.asarray(target_probs)
    draft_tokens = jnp.asarray(draft_tokens)
    draft_probs = None if draft_probs is None else jnp.asarray(draft_probs)
    uniforms = None if uniforms is None else jnp.asarray(uniforms)
    noise = None if noise is None else jnp.asarray(noise)
    B, k, V = acceptance._check_shapes(target_probs, draft_probs, draft_tokens, uniforms, noise)
    uniforms, noise = acceptance._randomness(key, uniforms, noise, B, k, V)
    _check_randomness(uniforms, noise)
    return target_probs, draft_probs, draft_tokens, uniforms, noise


@functools.partial(jax.jit, static_argnames=("block_v", "interpret"))
def _verify_call(target_probs, draft_probs, draft_tokens, uniforms, noise, *, block_v, interpret):
    B, K1, V = target_probs.shape
    k = K1 - 1
    kk = max(k, 1)
    has_q = draft_probs is not None and k > 0
    if k > 0:
        toks = draft_tokens.astype(jnp.int32)[..., None]  # [B, k, 1]
        u = uniforms.astype(jnp.float32)[..., None]
    else:  # dummies; the kernel ignores them when k == 0
        toks = jnp.zeros((B, 1, 1), jnp.int32)
        u = jnp.zeros((B, 1, 1), jnp.float32)
    row = lambda b: (b, 0, 0)  # noqa: E731
    in_specs = [pl.BlockSpec((1, kk, 1), row), pl.BlockSpec((1, kk, 1), row),
                pl.BlockSpec((1, K1, V), row)]
    args = [toks, u, target_probs]
    if has_q:
        in_specs.append(pl.BlockSpec((1, k, V), row))
        args.append(draft_probs)
    in_specs.append(pl.BlockSpec((1, K1, V), row))
    args.append(noise)
    kernel = functools.partial(_verify_kernel, k=k, vocab=V, block_v=min(block_v, V), has_q=has_q)
    out_shape = (jax.ShapeDtypeStruct((B, 1, 1), jnp.int32), jax.ShapeDtypeStruct((B, 1, 1), jnp.int32))
    n, nxt = pl.pallas_call(
        kernel,
        out_shape=out_shape,
        grid=(B,),
        in_specs=in_specs,
        out_specs=(pl.BlockSpec((1, 1, 1), row), pl.BlockSpec((1, 1, 1), row)),
        interpret=interpret,
        name="speculative_verify",
    )(*args)
    return n[:, 0, 0], nxt[:, 0, 0]


def verify(target_probs, draft_probs, draft_tokens, uniforms=None, noise=None, *, key=None,
           block_v: int = DEFAULT_BLOCK_V, interpret: bool = False):
    """Fused speculative-decoding verification.

    Args:
      target_probs: float ``[B, k+1, V]`` target probabilities ``p``.
      draft_probs: float ``[B, k, V]`` draft probabilities ``q``, or ``None`` for
        deterministic drafts (``q_i = one_hot(x_i)``).
      draft_tokens: int ``[B, k]``.
      uniforms: float ``[B, k]`` in ``[0, 1)`` for the acceptance tests.
      noise: float ``[B, k+1, V]`` positive Exp(1) noise for the residual race.
      key: alternatively a PRNG key (one, or one per row), from which the
        missing ``uniforms``/``noise`` are drawn with
        ``acceptance.draw_verify_randomness`` -- the same draw the reference
        makes, so ``verify(..., key=k) == verify_reference(..., key=k)``.
      block_v: vocabulary chunk the kernel streams (the tail chunk may be
        smaller; V need not be a multiple).
      interpret: run the kernel in the Pallas interpreter (CPU).

    Returns ``(accepted_len [B] int32 in 0..k, next_token [B] int32)``.
    """
    if not isinstance(block_v, int) or block_v <= 0:
        raise ValueError(f"block_v must be a positive int, got {block_v!r}")
    args = _prepare(target_probs, draft_probs, draft_tokens, uniforms, noise, key)
    return _verify_call(*args, block_v=block_v, interpret=bool(interpret))


def verify_reference(target_probs, draft_probs, draft_tokens, uniforms=None, noise=None, *, key=None):
    """Pure-jnp reference with :func:`verify`'s signature (``acceptance`` module)."""
    args = _prepare(target_probs, draft_probs, draft_tokens, uniforms, noise, key)
    return acceptance.accept_from_randomness(*args)
