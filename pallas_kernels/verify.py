"""Fused speculative-decoding verification kernels (Pallas): chain and tree.

Chain (:func:`verify`): per batch row the target probabilities ``p``
``[k+1, V]``, the draft probabilities ``q`` ``[k, V]`` (or, for deterministic
drafts, the one-hot of the draft tokens computed on the fly) and Exp(1) noise
``[k+1, V]`` are streamed once, in vocabulary chunks. In that pass the kernel

* gathers ``p_i(x_i)`` and ``q_i(x_i)`` for the acceptance tests, and
* keeps, for every position ``j``, a running first-argmax of the residual race
  ``max(p_j - q_j, 0) / E_j`` (``q_k := 0``: the bonus token) and of the
  fallback race ``p_j / E_j``;

the accepted length ``n`` and the race winner at position ``n`` follow. No
normalised residual is ever materialised. The rule and its use of the
randomness are exactly those of :mod:`jaxar.decode.acceptance`, which
:func:`verify_reference` calls; given the same uniforms and noise both return
identical results (bit-exact on CPU / in interpret mode; on an accelerator
whose f32 division is not correctly rounded a near-tie in the race could in
principle resolve differently -- both results are then valid samples).

Tree (:func:`verify_tree`): recursive rejection over siblings (see
:func:`verify_tree_reference` for the rule and its randomness contract).

Backends (``backend=None`` picks by the platform the call is lowered for, with
``lax.platform_dependent``, so one jitted function lowers for TPU and GPU):

* ``"triton"`` (GPU; also what runs with ``interpret=True`` on CPU).

  - Chain: grid ``(B, k+1, S)``, one program per (row, position, vocabulary
    split of ``split_v`` entries, default ``16 * block_v``). A program loops
    over its split in chunks of ``block_v`` (a power of two, default 512) with
    masked loads for the ragged tail (V = 257, 49152, 151936 are not
    multiples), so it holds three ``[1, block_v]`` f32 tiles (p, q, E: 6 KiB
    at 512, 12 values per thread over 4 warps) in registers; shared memory
    only holds Triton's cross-warp reduction scratch (bytes). It writes six scalars (``p(x_j)``, ``q(x_j)``, the two race
    maxima and their first argmaxes); a jnp epilogue on ``[B, k+1, S]``
    merges the splits (max, then the first split reaching it: exactly the
    global first argmax) and applies the acceptance rule.
  - Tree: the residual normalisers run one program per (row, node) (grid
    ``(B, N+1)``): a sequential loop over that node's rejected-sibling count,
    each a masked ``block_v`` sweep of its p/q rows; the final race runs one
    program per (row, split) (grid ``(B, S)``) on the data-dependent final
    node's row, read through a dynamic row index into the row's ``[N+1, V]``
    block (a pointer offset; nothing is staged).

  Why: the first design (one program per row with the ``[k+1, V]`` slab as
  one block) needed Mosaic GPU shared memory of 1.3-14 MB (227 KB on an
  H100/H200) and left all but B SMs idle; splitting over positions and
  vocabulary gives ``B (k+1) ceil(V / split_v)`` independent programs (171
  at B = 1, k = 8, V = 151936) that each stream ``3 x split_v x 4`` bytes,
  which is what a memory-bound op wants, and no block depends on V.
* ``"mosaic_tpu"``: the same kernels with one program per (row, position) /
  (row, node), the ``[1, V]`` rows as VMEM blocks (``(1, V)`` are the full
  last two dims, so any V is legal; 0.6 MB per f32 row at V = 151936, about
  3.6 MB double-buffered) and a static chunk loop whose last chunk is the
  ragged tail; the tree race picks the final node's row by scalar prefetch.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from jaxar.decode import acceptance

__all__ = ["verify", "verify_reference", "verify_tree", "verify_tree_reference",
           "DEFAULT_BLOCK_V", "BACKENDS"]

DEFAULT_BLOCK_V = 512
# Vocabulary entries per GPU program, in units of block_v.
DEFAULT_SPLIT_CHUNKS = 16
BACKENDS = ("triton", "mosaic_tpu")
_TINY = acceptance.TINY
_NUM_WARPS = 4


def _running_first_argmax(best, idx, scores, cols, vocab):
    """Merge a chunk's (max, first argmax) per row into the running state."""
    m = jnp.max(scores, axis=1, keepdims=True)
    ci = jnp.min(jnp.where(scores == m, cols, vocab), axis=1, keepdims=True)
    better = m > best
    return jnp.where(better, m, best), jnp.where(better, ci, idx)


# ----------------------------------------------------------------------------- helpers

def _triton_params():
    try:
        from jax.experimental.pallas import triton as plgpu  # pylint: disable=g-import-not-at-top
    except Exception:  # pragma: no cover - triton extras unavailable
        return None
    return plgpu.CompilerParams(num_warps=_NUM_WARPS, num_stages=2)


def _tpu_params(n_axes):
    from jax.experimental.pallas import tpu as pltpu  # pylint: disable=g-import-not-at-top
    return pltpu.CompilerParams(dimension_semantics=("parallel",) * n_axes)


def _load(ref, start, size, valid, other=0.0):
    """``ref[0:1, start:start+size]`` as f32; masked (``other``) where ``valid`` is False.

    ``ref`` may be ``(ref, row)``: row ``row`` of a 3-D ref (one indexer, as Triton needs)."""
    ref, lead = ref if isinstance(ref, tuple) else (ref, ())
    sl = lead + (slice(None), pl.ds(start, size))
    if valid is None:  # Mosaic TPU: static in-bounds slices
        return ref[sl].astype(jnp.float32)
    from jax.experimental.pallas import triton as plgpu  # pylint: disable=g-import-not-at-top
    return plgpu.load(ref.at[sl], mask=valid, other=other).astype(jnp.float32)


def _sweep(body, carry, *, vocab, block_v, tpu, lo=0, n_chunks=None):
    """Run ``carry = body(carry, start, size, cols, valid)`` over vocabulary chunks.

    TPU: full chunks then a static tail of ``vocab % block_v`` (``valid`` None).
    Triton: ``n_chunks`` (may be traced) chunks of ``block_v`` from ``lo``,
    ``valid = cols < vocab`` masks the ragged tail.
    """
    if tpu:
        n_full, rem = divmod(vocab, block_v)

        def step(i, c):
            start = pl.multiple_of(i * block_v, block_v)
            cols = start + jax.lax.broadcasted_iota(jnp.int32, (1, block_v), 1)
            return body(c, start, block_v, cols, None)
        if n_full:
            carry = jax.lax.fori_loop(0, n_full, step, carry)
        if rem:
            start = n_full * block_v
            cols = start + jax.lax.broadcasted_iota(jnp.int32, (1, rem), 1)
            carry = body(carry, start, rem, cols, None)
        return carry

    def gstep(i, c):
        start = lo + i * block_v
        cols = start + jax.lax.broadcasted_iota(jnp.int32, (1, block_v), 1)
        return body(c, start, block_v, cols, cols < vocab)
    return jax.lax.fori_loop(0, n_chunks, gstep, carry)


def _race_init():
    f32, i32 = jnp.float32, jnp.int32
    return (jnp.full((1, 1), -jnp.inf, f32), jnp.zeros((1, 1), i32),
            jnp.full((1, 1), -jnp.inf, f32), jnp.zeros((1, 1), i32))


def _race_update(state, residual, p, e, cols, valid, vocab):
    """Running first-argmax of ``residual / e`` and of ``p / e`` (masked columns never win)."""
    s_r = residual / e
    s_p = p / e
    if valid is not None:
        s_r = jnp.where(valid, s_r, -jnp.inf)
        s_p = jnp.where(valid, s_p, -jnp.inf)
    br, ir, bp, ip = state
    br, ir = _running_first_argmax(br, ir, s_r, cols, vocab)
    bp, ip = _running_first_argmax(bp, ip, s_p, cols, vocab)
    return br, ir, bp, ip


def _n_chunks(lo, split_v, vocab, block_v):
    """Chunks of block_v in the split starting at lo (the last split is shorter)."""
    return jnp.minimum(split_v, vocab - lo + block_v - 1) // block_v


def _merge_splits(best, idx):
    """Global (max, first argmax) from per-split ones ``[..., S]`` (splits in vocabulary order)."""
    s = acceptance.first_argmax(best)
    return (jnp.take_along_axis(best, s[..., None], -1)[..., 0],
            jnp.take_along_axis(idx, s[..., None], -1)[..., 0])


def _resolve_backend(backend):
    if backend is not None and backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS} or None (pick by platform), got {backend!r}")
    return backend


def _dispatch(backend, triton_fn, tpu_fn, *args):
    """Explicit backend, or the lowering platform's (TPU: Mosaic; otherwise Triton)."""
    if backend == "triton":
        return triton_fn(*args)
    if backend == "mosaic_tpu":
        return tpu_fn(*args)
    return jax.lax.platform_dependent(*args, tpu=tpu_fn, default=triton_fn)


def _check_block(block_v, split_v):
    if not isinstance(block_v, int) or block_v <= 0:
        raise ValueError(f"block_v must be a positive int, got {block_v!r}")
    if split_v is not None and (not isinstance(split_v, int) or split_v <= 0 or split_v % block_v):
        raise ValueError(f"split_v must be a positive multiple of block_v = {block_v}, got {split_v!r}")


def _gpu_blocks(block_v, split_v, vocab):
    """Triton tiles: block_v must be a power of two; never wider than V rounded up."""
    if block_v & (block_v - 1):
        raise ValueError(f"block_v must be a power of two for the triton backend, got {block_v}")
    block_v = min(block_v, 1 << max(vocab - 1, 1).bit_length())
    split_v = split_v or DEFAULT_SPLIT_CHUNKS * block_v
    split_v = max(block_v, split_v - split_v % block_v)
    return block_v, split_v, -(-vocab // split_v)


# ----------------------------------------------------------------------------- chain

def _chain_kernel(tok_ref, p_ref, *refs, k, vocab, block_v, split_v, has_q, tpu):
    """One (row b, position j, vocabulary split s) program; refs are ``[1, V]`` rows."""
    if has_q:
        q_ref, e_ref, *outs = refs
    else:
        e_ref, *outs = refs
    f32 = jnp.float32
    j = pl.program_id(1)
    lo = 0 if tpu else pl.program_id(2) * split_v
    tok = tok_ref[...]  # (1, 1); -1 at the bonus position: q_k := 0

    def body(carry, start, size, cols, valid):
        px, qx, race = carry
        p = _load(p_ref, start, size, valid)
        e = jnp.maximum(_load(e_ref, start, size, valid, 1.0), _TINY)
        hit = cols == tok
        if valid is not None:
            hit = hit & valid
        if has_q:
            q = jnp.where(j < k, _load(q_ref, start, size, valid), 0.0)
        else:
            q = hit.astype(f32)
        px = px + jnp.sum(jnp.where(hit, p, 0.0), axis=1, keepdims=True)
        qx = qx + jnp.sum(jnp.where(hit, q, 0.0), axis=1, keepdims=True)
        race = _race_update(race, jnp.maximum(p - q, 0.0), p, e, cols, valid, vocab)
        return px, qx, race

    zero = jnp.zeros((1, 1), f32)
    px, qx, race = _sweep(body, (zero, zero, _race_init()), vocab=vocab, block_v=block_v, tpu=tpu, lo=lo,
                          n_chunks=None if tpu else _n_chunks(lo, split_v, vocab, block_v))
    for ref, val in zip(outs, (px, qx) + race):
        ref[...] = val


def _chain(target_probs, draft_probs, draft_tokens, uniforms, noise, *, tpu, block_v, split_v, interpret):
    B, K1, V = target_probs.shape
    k = K1 - 1
    has_q = draft_probs is not None and k > 0
    if tpu:
        block_v, S = min(block_v, V), 1
    else:
        block_v, split_v, S = _gpu_blocks(block_v, split_v, V)
    toks = jnp.pad(draft_tokens.astype(jnp.int32), ((0, 0), (0, 1)), constant_values=-1)[..., None, None]
    row4 = lambda a: a.reshape(a.shape[:2] + (1, V))  # noqa: E731  [B, K1, 1, V], free
    pos = lambda b, j, s: (b, j, 0, 0)  # noqa: E731
    in_specs = [pl.BlockSpec((None, None, 1, 1), pos), pl.BlockSpec((None, None, 1, V), pos)]
    args = [toks, row4(target_probs)]
    if has_q:
        in_specs.append(pl.BlockSpec((None, None, 1, V), lambda b, j, s: (b, jnp.minimum(j, k - 1), 0, 0)))
        args.append(row4(draft_probs))
    in_specs.append(pl.BlockSpec((None, None, 1, V), pos))
    args.append(row4(noise))
    out_spec = pl.BlockSpec((None, None, None, 1, 1), lambda b, j, s: (b, j, s, 0, 0))
    shape = lambda dt: jax.ShapeDtypeStruct((B, K1, S, 1, 1), dt)  # noqa: E731
    f32, i32 = jnp.float32, jnp.int32
    if interpret:
        params = None
    else:
        params = _tpu_params(3) if tpu else _triton_params()
    kernel = functools.partial(_chain_kernel, k=k, vocab=V, block_v=block_v, split_v=split_v, has_q=has_q,
                               tpu=tpu)
    px, qx, br, ir, bp, ip = (o[..., 0, 0] for o in pl.pallas_call(
        kernel,
        out_shape=(shape(f32), shape(f32), shape(f32), shape(i32), shape(f32), shape(i32)),
        grid=(B, K1, S),
        in_specs=in_specs,
        out_specs=(out_spec,) * 6,
        compiler_params=params,
        interpret=interpret,
        name="speculative_verify",
    )(*args))
    br, ir = _merge_splits(br, ir)
    _, ip = _merge_splits(bp, ip)
    race = jnp.where(br > 0, ir, ip)  # [B, K1]: the token emitted if position j is reached rejecting
    if k == 0:
        return jnp.zeros((B,), i32), race[:, 0]
    px, qx = jnp.sum(px[:, :k], -1), jnp.sum(qx[:, :k], -1)
    u = uniforms.astype(f32)
    accepted = (u * qx < px) | ((px >= qx) & (px > 0))
    n = jnp.sum(jnp.cumprod(accepted.astype(i32), axis=-1), axis=-1).astype(i32)
    return n, jnp.take_along_axis(race, n[:, None], 1)[:, 0]


# ----------------------------------------------------------------------------- chain wrappers

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


@functools.partial(jax.jit, static_argnames=("block_v", "split_v", "interpret", "backend"))
def _verify_call(target_probs, draft_probs, draft_tokens, uniforms, noise, *, block_v, split_v, interpret,
                 backend):
    opts = dict(block_v=block_v, split_v=split_v, interpret=interpret)
    return _dispatch(backend, functools.partial(_chain, tpu=False, **opts),
                     functools.partial(_chain, tpu=True, **opts),
                     target_probs, draft_probs, draft_tokens, uniforms, noise)


def verify(target_probs, draft_probs, draft_tokens, uniforms=None, noise=None, *, key=None,
           block_v: int = DEFAULT_BLOCK_V, interpret: bool = False, backend: str | None = None,
           split_v: int | None = None):
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
        smaller; V need not be a multiple). A power of two for Triton.
      interpret: run the kernel in the Pallas interpreter (CPU).
      backend: "triton" (GPU), "mosaic_tpu" or None: by the platform the call
        is lowered for (TPU: Mosaic, anything else: Triton).
      split_v: vocabulary entries per Triton program (a multiple of block_v;
        default ``16 * block_v``).

    Returns ``(accepted_len [B] int32 in 0..k, next_token [B] int32)``.
    """
    _check_block(block_v, split_v)
    backend = _resolve_backend(backend)
    args = _prepare(target_probs, draft_probs, draft_tokens, uniforms, noise, key)
    return _verify_call(*args, block_v=block_v, split_v=split_v, interpret=bool(interpret), backend=backend)


def verify_reference(target_probs, draft_probs, draft_tokens, uniforms=None, noise=None, *, key=None):
    """Pure-jnp reference with :func:`verify`'s signature (``acceptance`` module)."""
    args = _prepare(target_probs, draft_probs, draft_tokens, uniforms, noise, key)
    return acceptance.accept_from_randomness(*args)


# ----------------------------------------------------------------------------- tree kernels

def _sums_body(p_row, q_row, passes, *, vocab, block_v, n_pad, tpu):
    """Residual normalisers of one node: ``Z[0] = 1``, ``A_m = A_{m-1} + Z_{m-1}`` (``A_0 = 0``),
    ``Z[m] = sum_v max(p - A_m q, 0)`` for ``m = 1 .. passes``; returns ``[1, n_pad]``."""
    f32 = jnp.float32
    iota = jax.lax.broadcasted_iota(jnp.int32, (1, n_pad), 1)
    n_chunks = None if tpu else -(-vocab // block_v)

    def one(i, carry):
        a, z, zs = carry
        a = a + z

        def body(acc, start, size, cols, valid):
            r = jnp.maximum(_load(p_row, start, size, valid) - a * _load(q_row, start, size, valid), 0.0)
            return acc + jnp.sum(r, axis=1, keepdims=True)
        z = _sweep(body, jnp.zeros((1, 1), f32), vocab=vocab, block_v=block_v, tpu=tpu, n_chunks=n_chunks)
        return a, z, jnp.where(iota == i + 1, z, zs)
    init = (jnp.zeros((1, 1), f32), jnp.ones((1, 1), f32), jnp.where(iota == 0, 1.0, 0.0).astype(f32))
    return jax.lax.fori_loop(0, passes, one, init)[2]


def _sums_triton_kernel(cnt_ref, p_ref, q_ref, z_ref, *, vocab, block_v, n_pad):
    z_ref[...] = _sums_body(p_ref, q_ref, cnt_ref[0, 0], vocab=vocab, block_v=block_v, n_pad=n_pad, tpu=False)


def _sums_tpu_kernel(cnt_ref, p_ref, q_ref, z_ref, *, vocab, block_v, n_pad, nodes):
    passes = cnt_ref[pl.program_id(0) * nodes + pl.program_id(1)]
    z_ref[...] = _sums_body(p_ref, q_ref, passes, vocab=vocab, block_v=block_v, n_pad=n_pad, tpu=True)


def _race_body(p_row, q_row, e_row, a, zero_toks, *, vocab, block_v, tpu, lo=0, n_chunks=None):
    """Race over the final node's residual: ``max(p - a q, 0)`` (sampled) or ``p`` with
    ``zero_toks`` (scalars, -1 = none) zeroed (deterministic)."""
    def body(race, start, size, cols, valid):
        p = _load(p_row, start, size, valid)
        e = jnp.maximum(_load(e_row, start, size, valid, 1.0), _TINY)
        if q_row is not None:
            r = jnp.maximum(p - a * _load(q_row, start, size, valid), 0.0)
        else:
            r = p
            for t in zero_toks:
                r = jnp.where(cols == t, 0.0, r)
        return _race_update(race, r, p, e, cols, valid, vocab)
    return _sweep(body, _race_init(), vocab=vocab, block_v=block_v, tpu=tpu, lo=lo, n_chunks=n_chunks)


def _race_triton_kernel(f_ref, a_ref, *refs, vocab, block_v, split_v, n_nodes, has_q):
    if has_q:
        p_ref, q_ref, e_ref, *outs = refs
        zero_toks = ()
    else:
        z_ref, p_ref, e_ref, *outs = refs
        q_ref = None
        zero_toks = [z_ref[m, 0] for m in range(n_nodes)]
    f = f_ref[0, 0]
    lo = pl.program_id(1) * split_v
    race = _race_body((p_ref, (f,)), None if q_ref is None else (q_ref, (f,)), e_ref, a_ref[...], zero_toks,
                      vocab=vocab, block_v=block_v, tpu=False, lo=lo,
                      n_chunks=_n_chunks(lo, split_v, vocab, block_v))
    for ref, val in zip(outs, race):
        ref[...] = val


def _race_tpu_kernel(f_ref, *refs, vocab, block_v, n_nodes, has_q):
    del f_ref  # used by the index maps
    if has_q:
        a_ref, p_ref, q_ref, e_ref, *outs = refs
        zero_toks = ()
    else:
        z_ref, a_ref, p_ref, e_ref, *outs = refs
        q_ref = None
        b = pl.program_id(0)
        zero_toks = [z_ref[b * n_nodes + m] for m in range(n_nodes)]
    race = _race_body(p_ref, q_ref, e_ref, a_ref[...], zero_toks, vocab=vocab, block_v=block_v, tpu=True)
    for ref, val in zip(outs, race):
        ref[...] = val


def _tree_sums(p4, q4, passes, *, tpu, block_v, split_v, interpret):
    B, T, _, V = p4.shape
    n_pad = 1 << max(T - 1, 0).bit_length()
    out_shape = jax.ShapeDtypeStruct((B, T, 1, n_pad), jnp.float32)
    node = (None, None, 1, V)
    if tpu:
        from jax.experimental.pallas import tpu as pltpu  # pylint: disable=g-import-not-at-top
        idx = lambda b, i, c: (b, i, 0, 0)  # noqa: E731
        z = pl.pallas_call(
            functools.partial(_sums_tpu_kernel, vocab=V, block_v=min(block_v, V), n_pad=n_pad, nodes=T),
            out_shape=out_shape,
            grid_spec=pltpu.PrefetchScalarGridSpec(
                num_scalar_prefetch=1, grid=(B, T),
                in_specs=[pl.BlockSpec(node, idx), pl.BlockSpec(node, idx)],
                out_specs=pl.BlockSpec((None, None, 1, n_pad), idx)),
            compiler_params=None if interpret else _tpu_params(2),
            interpret=interpret, name="tree_verify_normalisers",
        )(passes.reshape(-1), p4, q4)
    else:
        block_v, _, _ = _gpu_blocks(block_v, split_v, V)
        idx = lambda b, i: (b, i, 0, 0)  # noqa: E731
        z = pl.pallas_call(
            functools.partial(_sums_triton_kernel, vocab=V, block_v=block_v, n_pad=n_pad),
            out_shape=out_shape, grid=(B, T),
            in_specs=[pl.BlockSpec((None, None, 1, 1), idx), pl.BlockSpec(node, idx), pl.BlockSpec(node, idx)],
            out_specs=pl.BlockSpec((None, None, 1, n_pad), idx),
            compiler_params=None if interpret else _triton_params(),
            interpret=interpret, name="tree_verify_normalisers",
        )(passes[..., None, None], p4, q4)
    return z[:, :, 0]


def _tree_race(p4, q4, e, final, a, zero_toks, *, tpu, block_v, split_v, interpret):
    """Next token at each row's final node (``final`` [B] index into N+1)."""
    B, T, _, V = p4.shape
    N = T - 1
    has_q = q4 is not None
    e3 = e.reshape(B, 1, V)
    a3 = a.astype(jnp.float32).reshape(B, 1, 1)
    f32, i32 = jnp.float32, jnp.int32
    if tpu:
        from jax.experimental.pallas import tpu as pltpu  # pylint: disable=g-import-not-at-top
        n_pre = 1 if has_q else 2
        row = lambda b, f, *_: (b, f[b], 0, 0)  # noqa: E731
        per_b = lambda b, *_: (b, 0, 0)  # noqa: E731
        out_spec = pl.BlockSpec((None, None, 1, 1), lambda b, *_: (b, 0, 0, 0))
        in_specs = [pl.BlockSpec((None, 1, 1), per_b), pl.BlockSpec((None, None, 1, V), row)]
        args = [final.astype(i32)] + ([] if has_q else [zero_toks.reshape(-1).astype(i32)]) + [a3, p4]
        if has_q:
            in_specs.append(pl.BlockSpec((None, None, 1, V), row))
            args.append(q4)
        in_specs.append(pl.BlockSpec((None, 1, V), per_b))
        args.append(e3)
        S = 1
        call = functools.partial(
            pl.pallas_call,
            functools.partial(_race_tpu_kernel, vocab=V, block_v=min(block_v, V), n_nodes=N, has_q=has_q),
            grid_spec=pltpu.PrefetchScalarGridSpec(num_scalar_prefetch=n_pre, grid=(B,), in_specs=in_specs,
                                                   out_specs=(out_spec,) * 4),
            compiler_params=None if interpret else _tpu_params(1))
    else:
        block_v, split_v, S = _gpu_blocks(block_v, split_v, V)
        per_b = lambda b, s: (b, 0, 0)  # noqa: E731
        whole = lambda b, s: (b, 0, 0, 0)  # noqa: E731
        in_specs = [pl.BlockSpec((None, 1, 1), per_b), pl.BlockSpec((None, 1, 1), per_b)]
        args = [final.astype(i32).reshape(B, 1, 1), a3]
        if not has_q:
            in_specs.append(pl.BlockSpec((None, max(N, 1), 1), per_b))
            args.append((zero_toks if N else jnp.full((B, 1), -1, i32)).astype(i32)[..., None])
        in_specs.append(pl.BlockSpec((None, T, 1, V), whole))
        args.append(p4)
        if has_q:
            in_specs.append(pl.BlockSpec((None, T, 1, V), whole))
            args.append(q4)
        in_specs.append(pl.BlockSpec((None, 1, V), per_b))
        args.append(e3)
        out_spec = pl.BlockSpec((None, None, 1, 1), lambda b, s: (b, s, 0, 0))
        call = functools.partial(
            pl.pallas_call,
            functools.partial(_race_triton_kernel, vocab=V, block_v=block_v, split_v=split_v, n_nodes=N,
                              has_q=has_q),
            grid=(B, S), in_specs=in_specs, out_specs=(out_spec,) * 4,
            compiler_params=None if interpret else _triton_params())
    shape = lambda dt: jax.ShapeDtypeStruct((B, S, 1, 1), dt)  # noqa: E731
    br, ir, bp, ip = (o[:, :, 0, 0] for o in call(
        out_shape=(shape(f32), shape(i32), shape(f32), shape(i32)), interpret=interpret,
        name="tree_verify_race")(*args))
    br, ir = _merge_splits(br, ir)
    _, ip = _merge_splits(bp, ip)
    return jnp.where(br > 0, ir, ip).astype(i32)


def _tree_gathers(p, q, tokens, parents):
    """``p(x_j)``, ``q(x_j)`` at each node's parent (the only place node j is ever tested)."""
    B, T, V = p.shape
    in_range = (tokens >= 0) & (tokens < V)
    tok_c = jnp.clip(tokens, 0, V - 1)
    par_c = jnp.clip(parents + 1, 0, T - 1)
    rows = jnp.arange(B)[:, None]
    px = jnp.where(in_range, p[rows, par_c, tok_c].astype(jnp.float32), 0.0)
    if q is None:
        return px, in_range.astype(jnp.float32)
    return px, jnp.where(in_range, q[rows, par_c, tok_c].astype(jnp.float32), 0.0)


def _tree_walk(px, qx, tokens, parents, uniforms, z_table, dup, max_depth):
    """The rule over the nodes in index order on ``[B, N]`` scalars (see verify_tree_reference)."""
    B, N = px.shape
    i32, f32 = jnp.int32, jnp.float32
    sampled = z_table is not None
    rows = jnp.arange(B)
    d_iota = jnp.arange(max_depth, dtype=i32)[None]

    def body(j, c):
        cur, depth, m, a, z, path, rejected = c
        test = (parents[:, j] + 1 == cur) & (depth < max_depth)
        pxj, qxj = px[:, j], qx[:, j]
        rx = jnp.maximum(pxj - a * qxj, 0.0) if sampled else jnp.where(dup[:, j], 0.0, pxj)
        zq = z * qxj
        acc = test & ((uniforms[:, j] * zq < rx) | ((rx >= zq) & (rx > 0)))
        rej = test & ~acc
        if sampled:
            z_rej = z_table[rows, cur, jnp.minimum(m + 1, z_table.shape[-1] - 1)]
            a = jnp.where(acc, 0.0, jnp.where(rej, a + z, a))
        else:
            z_rej = z - rx
        z = jnp.where(acc, 1.0, jnp.where(rej, z_rej, z))
        path = jnp.where(acc[:, None] & (d_iota == depth[:, None]), j, path)
        rejected = jnp.where(jnp.arange(N)[None] == j, rej[:, None], rejected)
        return (jnp.where(acc, j + 1, cur), depth + acc, jnp.where(acc, 0, m + rej), a, z, path, rejected)

    init = (jnp.zeros((B,), i32), jnp.zeros((B,), i32), jnp.zeros((B,), i32), jnp.zeros((B,), f32),
            jnp.ones((B,), f32), jnp.full((B, max_depth), -1, i32), jnp.zeros((B, N), bool))
    cur, depth, _, a, _, path, rejected = jax.lax.fori_loop(0, N, body, init) if N else init
    zero_toks = jnp.where(rejected & (parents + 1 == cur[:, None]), tokens, -1)
    return cur, depth, a, path, zero_toks


@functools.partial(jax.jit, static_argnames=("max_depth", "block_v", "split_v", "interpret", "backend"))
def _verify_tree_call(p, q, tokens, parents, uniforms, noise, *, max_depth, block_v, split_v, interpret, backend):
    B, T, V = p.shape
    tokens = tokens.astype(jnp.int32)
    parents = parents.astype(jnp.int32)
    uniforms = uniforms.astype(jnp.float32)
    noise = noise.astype(jnp.float32)
    px, qx = _tree_gathers(p, q, tokens, parents)
    p4 = p.reshape(B, T, 1, V)
    q4 = None if q is None else q.reshape(B, T, 1, V)
    opts = dict(block_v=block_v, split_v=split_v, interpret=interpret)
    if q is None:
        z_table = None
        same = (parents[:, :, None] == parents[:, None, :]) & (tokens[:, :, None] == tokens[:, None, :])
        dup = jnp.any(same & jnp.tri(T - 1, k=-1, dtype=bool)[None], axis=-1)
    else:
        children = jnp.sum(parents[:, None, :] + 1 == jnp.arange(T)[None, :, None], axis=-1)
        passes = jnp.maximum(children - 1, 0).astype(jnp.int32)
        z_table = _dispatch(backend, lambda *a: _tree_sums(*a, tpu=False, **opts),
                            lambda *a: _tree_sums(*a, tpu=True, **opts), p4, q4, passes)
        dup = None
    final, depth, a, path, zero_toks = _tree_walk(px, qx, tokens, parents, uniforms, z_table, dup, max_depth)
    nxt = _dispatch(backend, lambda *x: _tree_race(*x, tpu=False, **opts),
                    lambda *x: _tree_race(*x, tpu=True, **opts), p4, q4, noise, final, a, zero_toks)
    return path, depth, nxt


def _check_tree(p, q, tokens, parents, uniforms, noise, max_depth):
    if p.ndim != 3 or not jnp.issubdtype(p.dtype, jnp.floating):
        raise ValueError(f"p must be float [B, N+1, V], got {p.dtype} {p.shape}")
    B, T, V = p.shape
    N = T - 1
    for name, a in (("tokens", tokens), ("parents", parents)):
        if a.shape != (B, N) or not jnp.issubdtype(a.dtype, jnp.integer):
            raise ValueError(f"{name} must be int [B, N] = {(B, N)} to match p {p.shape}, got {a.dtype} {a.shape}")
    if q is not None and (q.shape != p.shape or not jnp.issubdtype(q.dtype, jnp.floating)):
        raise ValueError(f"q must be float [B, N+1, V] = {p.shape} or None, got {q.dtype} {q.shape}")
    if uniforms is not None and uniforms.shape != (B, N):
        raise ValueError(f"uniforms must be [B, N] = {(B, N)}, got {uniforms.shape}")
    if noise is not None and noise.shape != (B, V):
        raise ValueError(f"noise must be [B, V] = {(B, V)}, got {noise.shape}")
    max_depth = N if max_depth is None else max_depth
    if not isinstance(max_depth, int) or max_depth < 1:
        raise ValueError(f"max_depth must be an int >= 1, got {max_depth!r}")
    return B, N, V, max_depth


def _prepare_tree(p, q, tokens, parents, key, max_depth, uniforms, noise):
    p, tokens, parents = jnp.asarray(p), jnp.asarray(tokens), jnp.asarray(parents)
    q = None if q is None else jnp.asarray(q)
    uniforms = None if uniforms is None else jnp.asarray(uniforms)
    noise = None if noise is None else jnp.asarray(noise)
    B, N, V, max_depth = _check_tree(p, q, tokens, parents, uniforms, noise, max_depth)
    if uniforms is None or noise is None:
        if key is None:
            raise ValueError("pass either key, or both uniforms [B, N] and noise [B, V]")
        from jaxar.decode.tree import draw_tree_randomness  # pylint: disable=g-import-not-at-top
        du, dn = draw_tree_randomness(key, B, N, V)
        uniforms = du if uniforms is None else uniforms
        noise = dn if noise is None else noise
    _check_randomness(uniforms, noise)
    return p, q, tokens, parents, uniforms, noise, max_depth


def verify_tree(p, q, tokens, parents, key=None, max_depth=None, *, uniforms=None, noise=None,
                block_v: int = DEFAULT_BLOCK_V, split_v: int | None = None, interpret: bool = False,
                backend: str | None = None):
    """Fused lossless tree verification (recursive rejection over siblings).

    Same rule and randomness as :func:`verify_tree_reference`. The heavy
    vocabulary work runs in two kernels: the residual normalisers ``Z`` of every
    node with several children (sampled drafts only; they depend on the node's
    ``p``/``q`` and on how many siblings were rejected, not on the path, so all
    nodes run in parallel), and the exponential race over the final node's
    residual. The walk itself is a scalar recurrence on ``[B, N]`` in jnp.

    Args:
      p: float ``[B, N+1, V]`` target probabilities at the root (index 0) and
        node j (index j+1).
      q: float ``[B, N+1, V]``: the children of index i were drawn i.i.d. from
        ``q[:, i]``; or None for deterministic drafts (distinct children).
      tokens, parents: int ``[B, N]``: node tokens; parent node (-1 = root),
        smaller than the node's own index.
      key: PRNG key (one, or one per row) drawing the missing randomness with
        ``jaxar.decode.tree.draw_tree_randomness``.
      max_depth: static int D >= 1 (default N): path length; deeper nodes are
        never accepted.
      uniforms: float ``[B, N]`` in [0, 1); noise: float ``[B, V]`` Exp(1).
      block_v, split_v: vocabulary chunk (power of two for Triton) and the
        vocabulary per race program (Triton; default ``16 * block_v``).
      interpret: run in the Pallas interpreter (CPU).
      backend: "triton", "mosaic_tpu" or None (by lowering platform).

    Returns ``(path [B, D] int32 (-1 after n_acc), n_acc [B] int32, next_token [B] int32)``.
    """
    _check_block(block_v, split_v)
    backend = _resolve_backend(backend)
    p, q, tokens, parents, uniforms, noise, max_depth = _prepare_tree(
        p, q, tokens, parents, key, max_depth, uniforms, noise)
    return _verify_tree_call(p, q, tokens, parents, uniforms, noise, max_depth=max_depth, block_v=block_v,
                             split_v=split_v, interpret=bool(interpret), backend=backend)


def verify_tree_reference(p, q, tokens, parents, key=None, max_depth=None, *, uniforms=None, noise=None):
    """Tree acceptance, pure jnp, with full-vocabulary residual vectors.

    Rule, per row (index 0 = root, node j at index j+1): start at the root with
    the residual ``R = p[root]``, normaliser ``Z = 1`` and ``A = 0``; go over the
    nodes j in index order and test node j iff its parent is the current node
    and the current depth is below ``max_depth`` (children come in index order
    and an accepted node's children all follow it, so one pass suffices). With
    ``rx = R(x_j)``, ``zq = Z q(x_j)`` (deterministic: ``q(x_j) = 1`` for an
    in-range token) accept iff ``u_j zq < rx`` or ``(rx >= zq and rx > 0)``
    (``u_j < min(1, (R/Z)(x) / q(x))`` without a division).

    * accepted: move to node j (``R = p[j+1]``, ``Z = 1``, ``A = 0``);
    * rejected, sampled drafts: ``A <- A + Z``, ``R = max(p_cur - A q_cur, 0)``,
      ``Z = sum(R)`` -- the unnormalised form of ``r <- norm(max(r - q, 0))``
      (``max(max(y, 0) - c, 0) = max(y - c, 0)`` for ``c >= 0``);
    * rejected, deterministic: ``Z <- Z - R(x_j)``, then ``R(x_j) = 0``.

    ``p`` is taken to sum to 1 (``Z = 1`` at each node). At the end emit
    ``argmax_v R(v) / max(E(v), tiny)`` (first index among ties), or
    ``argmax p_cur / E`` if R is all zero: a chain-shaped tree gives exactly
    :func:`verify` with ``noise[:, j] = E`` at every position.

    Randomness: ``uniforms [B, N]`` (node j's test; a node is tested at most
    once) and ``noise [B, V]`` Exp(1) for the one emitted token, as drawn by
    ``jaxar.decode.tree.draw_tree_randomness``. The kernel computes the sums Z
    in vocabulary chunks: their rounding may differ in the last bit, which
    changes a decision only if ``u_j`` lies within an ulp of its threshold.

    Returns ``(path [B, D] int32, n_acc [B] int32, next_token [B] int32)``.
    """
    p, q, tokens, parents, uniforms, noise, max_depth = _prepare_tree(
        p, q, tokens, parents, key, max_depth, uniforms, noise)
    return _tree_reference_core(p, q, tokens, parents, uniforms, noise, max_depth)


@functools.partial(jax.jit, static_argnums=(6,))
def _tree_reference_core(p, q, tokens, parents, uniforms, noise, max_depth):
    B, T, V = p.shape
    N = T - 1
    i32, f32 = jnp.int32, jnp.float32
    p = p.astype(f32)
    q = None if q is None else q.astype(f32)
    tokens = tokens.astype(i32)
    parents = parents.astype(i32)
    cols = jnp.arange(V, dtype=i32)[None]
    rows = jnp.arange(B)

    def body(j, c):
        cur, depth, a, z, r, path = c
        tok = tokens[:, j]
        in_range = (tok >= 0) & (tok < V)
        hit = cols == tok[:, None]
        rx = jnp.sum(jnp.where(hit, r, 0.0), axis=1)
        if q is None:
            qx = in_range.astype(f32)
        else:
            qx = jnp.sum(jnp.where(hit, q[rows, cur], 0.0), axis=1)
        test = (parents[:, j] + 1 == cur) & (depth < max_depth)
        zq = z * qx
        acc = test & ((uniforms[:, j].astype(f32) * zq < rx) | ((rx >= zq) & (rx > 0)))
        rej = test & ~acc
        if q is None:
            z_new = z - rx
            r_new = jnp.where(hit, 0.0, r)
        else:
            a_new = a + z
            r_new = jnp.maximum(p[rows, cur] - a_new[:, None] * q[rows, cur], 0.0)
            z_new = jnp.sum(r_new, axis=1)
            a = jnp.where(acc, 0.0, jnp.where(rej, a_new, a))
        r = jnp.where(acc[:, None], p[:, j + 1], jnp.where(rej[:, None], r_new, r))
        z = jnp.where(acc, 1.0, jnp.where(rej, z_new, z))
        path = path.at[:, :].set(jnp.where(acc[:, None] & (jnp.arange(max_depth)[None] == depth[:, None]), j, path))
        return jnp.where(acc, j + 1, cur), depth + acc, a, z, r, path

    init = (jnp.zeros((B,), i32), jnp.zeros((B,), i32), jnp.zeros((B,), f32), jnp.ones((B,), f32), p[:, 0],
            jnp.full((B, max_depth), -1, i32))
    cur, depth, _, _, r, path = jax.lax.fori_loop(0, N, body, init) if N else init
    e = jnp.maximum(noise.astype(f32), _TINY)
    s_r = r / e
    s_p = p[rows, cur] / e
    nxt = jnp.where(jnp.max(s_r, axis=-1) > 0, acceptance.first_argmax(s_r), acceptance.first_argmax(s_p))
    return path, depth.astype(i32), nxt.astype(i32)
