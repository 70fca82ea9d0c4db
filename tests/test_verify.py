"""Speculative-decoding acceptance: statistical correctness of the jnp rules
(jaxar.decode.acceptance) and exact agreement of the Pallas kernel
(pallas_kernels.verify, interpret mode) with them."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from jaxar.decode import acceptance as A
from pallas_kernels.verify import verify, verify_reference

# Fixed, context-independent target p_j (j = 0..k) and draft q_j (j = 0..k-1)
# on a tiny vocabulary, deliberately far apart.
P = np.array([
    [0.40, 0.30, 0.15, 0.10, 0.05],
    [0.05, 0.10, 0.50, 0.25, 0.10],
    [0.20, 0.20, 0.20, 0.20, 0.20],
    [0.00, 0.60, 0.10, 0.10, 0.20],
])
Q = np.array([
    [0.10, 0.10, 0.20, 0.30, 0.30],
    [0.30, 0.30, 0.20, 0.10, 0.10],
    [0.50, 0.05, 0.05, 0.10, 0.30],
])
K, V = Q.shape
N = 40000


def _draw_drafts(seed, q, n):
    rng = np.random.default_rng(seed)
    cum = np.cumsum(q, -1)
    u = rng.random((n, q.shape[0], 1))
    return np.minimum((u > cum[None]).sum(-1), q.shape[1] - 1).astype(np.int32)


def _pvalue(tokens, probs):
    counts = np.bincount(np.asarray(tokens), minlength=len(probs))
    keep = probs > 0
    if counts[~keep].sum():
        return 0.0  # emitted a token the target gives probability zero
    return stats.chisquare(counts[keep], probs[keep] * counts.sum()).pvalue


def _emitted_pvalues(n_acc, nxt, drafts, p):
    """p-values of: emitted token j ~ p_j among rows that emitted >= j+1 tokens."""
    out, count = A.emitted_tokens(drafts, n_acc, nxt)
    out, count = np.asarray(out), np.asarray(count)
    return [_pvalue(out[count > j, j], p[j]) for j in range(p.shape[0])]


def _broken_accept(p, q, x, u, e, mode):
    """Deliberately wrong variants, vectorised numpy."""
    rows = np.arange(len(x))[:, None]
    pos = np.arange(x.shape[1])[None]
    px, qx = p[:, :-1][rows, pos, x], q[rows, pos, x]
    acc = (u * px < qx) if mode == "inverse_ratio" else (u * qx < px) | (px >= qx)
    n = np.cumprod(acc, -1).sum(-1)
    qpad = np.concatenate([q, np.zeros_like(q[:, :1])], 1)
    p_n, q_n, e_n = p[np.arange(len(x)), n], qpad[np.arange(len(x)), n], e[np.arange(len(x)), n]
    r = p_n if mode == "resample_p" else np.maximum(p_n - q_n, 0)
    return n, np.argmax(r / e_n, -1)


@pytest.fixture(scope="module")
def sim():
    p = np.broadcast_to(P, (N,) + P.shape).astype(np.float32)
    q = np.broadcast_to(Q, (N,) + Q.shape).astype(np.float32)
    x = _draw_drafts(0, Q, N)
    u, e = A.draw_verify_randomness(jax.random.key(42), N, K, V)
    return p, q, x, np.asarray(u), np.asarray(e)


# --------------------------------------------------------------------------- statistics

def test_speculative_accept_emits_target_distribution(sim):
    p, q, x, u, e = sim
    n, nxt = jax.jit(A.speculative_accept)(p, q, x, uniforms=u, noise=e)
    n = np.asarray(n)
    assert n.dtype == np.int32 and n.min() >= 0 and n.max() <= K
    pvals = _emitted_pvalues(n, nxt, x, P)
    assert min(pvals) > 1e-3, pvals
    # First-draft acceptance rate is sum_v min(p_0, q_0).
    beta = np.minimum(P[0], Q[0]).sum()
    assert abs((n >= 1).mean() - beta) < 4 * np.sqrt(beta * (1 - beta) / N)


def test_key_path_is_also_correct(sim):
    p, q, x, _, _ = sim
    n, nxt = A.speculative_accept(p, q, x, jax.random.key(7))  # per-row keys: see kernel test
    assert min(_emitted_pvalues(np.asarray(n), nxt, x, P)) > 1e-3


@pytest.mark.parametrize("mode", ["inverse_ratio", "resample_p"])
def test_broken_rules_fail_the_test(sim, mode):
    p, q, x, u, e = sim
    n, nxt = _broken_accept(p, q, x, u, e, mode)
    assert _emitted_pvalues(n, nxt, x, P)[0] < 1e-8


def test_deterministic_accept_emits_target_distribution(sim):
    p, _, _, u, e = sim
    x = np.broadcast_to(np.array([0, 2, 4], np.int32), (N, K))  # fixed n-gram drafts
    n, nxt = A.deterministic_accept(p, x, uniforms=u, noise=e)
    assert min(_emitted_pvalues(np.asarray(n), nxt, x, P)) > 1e-3
    # Same as speculative_accept with q = one_hot(draft).
    n2, nxt2 = A.speculative_accept(p, jax.nn.one_hot(x, V), x, uniforms=u, noise=e)
    np.testing.assert_array_equal(n, n2)
    np.testing.assert_array_equal(nxt, nxt2)


# --------------------------------------------------------------------------- exact rules

def _loop_reference(p, q, x, u, e):
    """Direct per-row transcription of the rule (numpy, float32)."""
    B, k = x.shape
    ns, toks = [], []
    for b in range(B):
        n = 0
        while n < k:
            px = p[b, n, x[b, n]]
            qx = 1.0 if q is None else q[b, n, x[b, n]]
            if not (np.float32(u[b, n]) * np.float32(qx) < px or (px >= qx and px > 0)):
                break
            n += 1
        if n < k:
            qn = np.eye(p.shape[-1], dtype=np.float32)[x[b, n]] if q is None else q[b, n]
        else:
            qn = np.zeros(p.shape[-1], np.float32)
        en = np.maximum(e[b, n], A.TINY)
        r = np.maximum(p[b, n] - qn, np.float32(0)) / en
        tok = int(np.argmax(r)) if r.max() > 0 else int(np.argmax(p[b, n] / en))
        ns.append(n)
        toks.append(tok)
    return np.array(ns), np.array(toks)


def _random_case(seed, B, k, V, concentration=0.5):
    rng = np.random.default_rng(seed)
    p = rng.dirichlet(np.full(V, concentration), size=(B, k + 1)).astype(np.float32)
    q = rng.dirichlet(np.full(V, concentration), size=(B, k)).astype(np.float32)
    # Make drafts often agree with the target so long accepts happen.
    q = (0.5 * q + 0.5 * p[:, :k]).astype(np.float32)
    x = np.stack([_draw_drafts(seed + b, q[b], 1)[0] for b in range(B)]).astype(np.int32)
    u = rng.random((B, k), dtype=np.float32)
    e = rng.exponential(size=(B, k + 1, V)).astype(np.float32)
    return p, q, x, u, e


def _add_extreme_rows(p, q, x, u):
    """Rows 0-3: greedy-like one-hot p, p == q (zero residual), q(x) = 0, p(x) = 0."""
    V = p.shape[-1]
    p, q, x, u = p.copy(), q.copy(), x.copy(), u.copy()
    p[0] = np.eye(V, dtype=np.float32)[np.arange(p.shape[1]) % V]
    x[0, :2] = np.arange(2) % V  # first two match the one-hot target, then mismatch
    x[0, 2:] = (np.arange(2, x.shape[1]) + 1) % V
    q[1] = p[1, :-1]
    u[1] = 0.999999
    q[2, 0, x[2, 0]] = 0.0
    p[3, 0, x[3, 0]] = 0.0
    return p, q, x, u


@pytest.mark.parametrize("deterministic", [False, True])
def test_jnp_rule_matches_loop(deterministic):
    p, q, x, u, e = _random_case(1, 16, 4, 11)
    p, q, x, u = _add_extreme_rows(p, q, x, u)
    qq = None if deterministic else q
    n, nxt = A.accept_from_randomness(p, qq, x, u, e)
    rn, rt = _loop_reference(p, qq, x, u, e)
    np.testing.assert_array_equal(n, rn)
    np.testing.assert_array_equal(nxt, rt)
    assert len(set(np.asarray(n).tolist())) > 2  # several acceptance lengths exercised


def test_greedy_accept_matches_loop():
    rng = np.random.default_rng(3)
    B, k, V = 64, 5, 7
    logits = rng.normal(size=(B, k + 1, V)).astype(np.float32)
    target = logits.argmax(-1)
    x = np.where(rng.random((B, k)) < 0.8, target[:, :k], rng.integers(0, V, (B, k))).astype(np.int32)
    n, nxt = A.greedy_accept(logits, x)
    n2, nxt2 = A.greedy_accept(target.astype(np.int32), x)
    for b in range(B):
        m = 0
        while m < k and x[b, m] == target[b, m]:
            m += 1
        assert n[b] == m == n2[b] and nxt[b] == target[b, m] == nxt2[b]
    # One-hot p and q reduce speculative sampling to the greedy rule.
    p = jax.nn.one_hot(target, V)
    u, e = rng.random((B, k), dtype=np.float32), rng.exponential(size=(B, k + 1, V)).astype(np.float32)
    ns, nts = A.speculative_accept(p, jax.nn.one_hot(x, V), x, uniforms=u, noise=e)
    np.testing.assert_array_equal(ns, n)
    np.testing.assert_array_equal(nts, nxt)


def test_emitted_tokens():
    x = np.array([[5, 6, 7], [5, 6, 7]])
    out, cnt = A.emitted_tokens(x, np.array([0, 3]), np.array([9, 8]), pad_id=-1)
    np.testing.assert_array_equal(out, [[9, -1, -1, -1], [5, 6, 7, 8]])
    np.testing.assert_array_equal(cnt, [1, 4])


# --------------------------------------------------------------------------- kernel

@pytest.mark.parametrize(
    "B,k,V,block_v,deterministic",
    [
        (12, 4, 37, 16, False),  # V not a multiple of the block: 2 full chunks + tail
        (10, 3, 50, 32, True),   # deterministic drafts
        (3, 0, 10, 4, False),    # k = 0: only the bonus token
        (5, 2, 24, 512, False),  # V smaller than the block
    ],
)
def test_kernel_matches_reference(B, k, V, block_v, deterministic):
    p, q, x, u, e = _random_case(B * 100 + k, B, k, V)
    if k >= 2 and B >= 4:
        p, q, x, u = _add_extreme_rows(p, q, x, u)
    if block_v > V:  # also: bf16 probabilities are upcast identically by both
        p = np.asarray(jnp.asarray(p, jnp.bfloat16).astype(jnp.float32))
        q = np.asarray(jnp.asarray(q, jnp.bfloat16).astype(jnp.float32))
        n, nxt = verify(jnp.asarray(p, jnp.bfloat16), jnp.asarray(q, jnp.bfloat16), x, u, e,
                        block_v=block_v, interpret=True)
        rn, rt = verify_reference(p, q, x, u, e)
        np.testing.assert_array_equal(n, rn)
        np.testing.assert_array_equal(nxt, rt)
    qq = None if deterministic else q
    n, nxt = verify(p, qq, x, u, e, block_v=block_v, interpret=True)
    rn, rt = verify_reference(p, qq, x, u, e)
    assert n.shape == (B,) and nxt.shape == (B,) and n.dtype == jnp.int32 and nxt.dtype == jnp.int32
    np.testing.assert_array_equal(n, rn)
    np.testing.assert_array_equal(nxt, rt)
    if k:
        ln, lt = _loop_reference(p, qq, x, u, e)
        np.testing.assert_array_equal(n, ln)
        np.testing.assert_array_equal(nxt, lt)
    if (B, k) == (12, 4):
        # Same shapes again (no recompile): the key path draws identical randomness.
        keys = jax.random.split(jax.random.key(5), B)
        a = verify(p, qq, x, key=keys, block_v=block_v, interpret=True)
        b = verify_reference(p, qq, x, key=keys)
        c = A.speculative_accept(p, qq, x, keys)
        for got in (b, c):
            np.testing.assert_array_equal(a[0], got[0])
            np.testing.assert_array_equal(a[1], got[1])
        # Fully one-hot targets: the kernel reproduces the greedy rule.
        onehot = np.asarray(jax.nn.one_hot(p.argmax(-1), V), np.float32)
        xg = np.where(np.arange(k)[None] < 2, p.argmax(-1)[:, :k], x).astype(np.int32)
        n1, t1 = verify(onehot, np.asarray(jax.nn.one_hot(xg, V), np.float32), xg, u, e,
                        block_v=block_v, interpret=True)
        gn, gt = A.greedy_accept(p, xg)
        np.testing.assert_array_equal(n1, gn)
        np.testing.assert_array_equal(t1, gt)


def test_kernel_input_validation():
    p, q, x, u, e = _random_case(0, 2, 3, 8)
    with pytest.raises(ValueError, match="target_probs"):
        verify(p[0], q, x, u, e, interpret=True)
    with pytest.raises(ValueError, match="draft_tokens"):
        verify(p, q, x[:, :2], u, e, interpret=True)
    with pytest.raises(ValueError, match="draft_tokens must be integer"):
        verify(p, q, x.astype(np.float32), u, e, interpret=True)
    with pytest.raises(ValueError, match="draft_probs"):
        verify(p, q[:, :, :7], x, u, e, interpret=True)
    with pytest.raises(ValueError, match="uniforms"):
        verify(p, q, x, u[:, :1], e, interpret=True)
    with pytest.raises(ValueError, match="noise"):
        verify(p, q, x, u, e[:, :3], interpret=True)
    with pytest.raises(ValueError, match="either key"):
        verify(p, q, x, interpret=True)
    with pytest.raises(ValueError, match="block_v"):
        verify(p, q, x, u, e, block_v=0, interpret=True)
    with pytest.raises(ValueError, match="key"):
        verify(p, q, x, key=jax.random.split(jax.random.key(0), 3), interpret=True)
