"""Relaxed speculative acceptance (jaxar.decode.relaxed): the LANTERN-style
transport and the GSD group against plain-Python float64 references, bit
identity with the exact rule at delta = 0 / g = 0, the emitted distribution of
one draft (chi-squared) and its TV bounds, the --accept parser and the tables."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from jaxar.decode import acceptance as A
from jaxar.decode import relaxed as R


def _softmax(z):
    z = np.exp(z - z.max(-1, keepdims=True))
    return z / z.sum(-1, keepdims=True)


def _dists(rng, shape, scale=2.0):
    return _softmax(rng.normal(size=shape) * scale).astype(np.float32)


# ----------------------------------------------------------------------------
# Plain-Python references (float64).

def _lantern_ref(p, q, nb, delta):
    p, q = np.asarray(p, np.float64), np.asarray(q, np.float64)
    K, k = nb.shape
    s = [max(p[i] - q[i], 0.0) for i in range(K)]
    d = [max(q[i] - p[i], 0.0) for i in range(K)]
    D = [0.0] * K
    for x in range(K):
        for y in nb[x]:
            D[y] += d[x]
    raw = {}
    for x in range(K):
        for y in nb[x]:
            raw[x, y] = s[y] * d[x] / D[y] if D[y] > 0 else 0.0
    inflow, outflow = [0.0] * K, [0.0] * K
    for x in range(K):
        rin = sum(raw[x, y] for y in nb[x])
        c = min(1.0, d[x] / rin) if rin > 0 else 1.0
        for y in nb[x]:
            inflow[x] += raw[x, y] * c
            outflow[y] += raw[x, y] * c
    M = sum(inflow)
    lam = min(1.0, delta / M) if (M > 0 and delta > 0) else 0.0
    return np.array([p[i] + lam * (inflow[i] - outflow[i]) for i in range(K)]), lam * M, M


def _group_ref(p, x, dist, g, p_thr, d_thr):
    V = len(p)
    order = sorted(range(V), key=lambda y: (-float(p[y]), y))
    r = order.index(x)
    return [y for j, y in enumerate(order)
            if abs(j - r) <= g and (y == x or (abs(float(p[y]) - float(p[x])) < p_thr and dist[x, y] < d_thr))]


def _gsd_out_ref(p, q, dist, g, p_thr, d_thr):
    """(out, bound): the gsd rule's emitted distribution and sum q |a' - a|."""
    p64, q64 = p.astype(np.float64), q.astype(np.float64)
    V = len(p)
    a = np.minimum(1.0, p64 / q64)
    ag = np.empty(V)
    for x in range(V):
        G = _group_ref(p, x, dist, g, p_thr, d_thr)
        ag[x] = min(1.0, p64[G].sum() / q64[G].sum())
    r = np.maximum(p64 - q64, 0.0)
    r /= r.sum()
    out = q64 * ag + (1.0 - np.sum(q64 * ag)) * r
    return out, float(np.sum(q64 * np.abs(ag - a)))


def _pvalue(tokens, probs):
    counts = np.bincount(np.asarray(tokens), minlength=len(probs))
    keep = probs > 1e-12
    if counts[~keep].sum():
        return 0.0
    return stats.chisquare(counts[keep], probs[keep] / probs[keep].sum() * counts.sum()).pvalue


# ----------------------------------------------------------------------------
# LANTERN transport.

@pytest.mark.parametrize("K,k", [(12, 2), (20, 3), (32, 4)])
def test_lantern_target_matches_reference(K, k):
    rng = np.random.default_rng(K)
    nb = R.codebook_neighbours(rng.normal(size=(K, 4)), k)
    rows = 6
    p, q = _dists(rng, (rows, K)), _dists(rng, (rows, K))
    for delta in (0.0, 0.01, 0.05, 0.2, 1.0):
        pr, moved = R.lantern_target(p, q, nb, delta)
        pr, moved = np.asarray(pr), np.asarray(moved)
        assert pr.dtype == np.float32 and pr.shape == p.shape and moved.shape == (rows,)
        for b in range(rows):
            ref, ref_moved, M = _lantern_ref(p[b], q[b], nb, delta)
            assert np.abs(pr[b] - ref).sum() <= 2e-6 * np.abs(ref).sum(), (delta, b)
            np.testing.assert_allclose(moved[b], ref_moved, rtol=2e-6, atol=1e-7)
            if delta == 1.0:  # M <= sum d <= 1, so lam = 1
                np.testing.assert_allclose(moved[b], M, rtol=2e-6, atol=1e-7)
            p64, pr64, q64 = p[b].astype(np.float64), pr[b].astype(np.float64), q[b].astype(np.float64)
            assert pr64.min() >= 0.0
            assert abs(pr64.sum() - 1.0) < 2e-6
            tv = 0.5 * np.abs(pr64 - p64).sum()
            np.testing.assert_allclose(tv, moved[b], rtol=1e-5, atol=2e-7)
            assert moved[b] <= delta * (1 + 1e-6) + 1e-7
            gain = np.minimum(pr64, q64).sum() - np.minimum(p64, q64).sum()
            assert gain >= -1e-6
            np.testing.assert_allclose(gain, moved[b], rtol=1e-4, atol=1e-6)
        if delta == 0.0:
            assert np.array_equal(pr.view(np.uint32), p.view(np.uint32))
    # Leading dims are arbitrary.
    pr3, m3 = R.lantern_target(p.reshape(2, 3, K), q.reshape(2, 3, K), nb, 0.05)
    pr2, m2 = R.lantern_target(p, q, nb, 0.05)
    np.testing.assert_array_equal(np.asarray(pr3).reshape(rows, K), np.asarray(pr2))
    np.testing.assert_array_equal(np.asarray(m3).reshape(rows), np.asarray(m2))


def test_lantern_target_inside_jit_and_errors():
    rng = np.random.default_rng(0)
    nb = R.codebook_neighbours(rng.normal(size=(10, 3)), 2)
    p, q = _dists(rng, (4, 10)), _dists(rng, (4, 10))
    f = jax.jit(lambda p, q, nb: R.lantern_target(p, q, nb, 0.1))
    np.testing.assert_array_equal(np.asarray(f(p, q, nb)[0]), np.asarray(R.lantern_target(p, q, nb, 0.1)[0]))
    with pytest.raises(ValueError, match="neighbours must be"):
        R.lantern_target(p, q, nb[:5], 0.1)


# ----------------------------------------------------------------------------
# GSD group.

def test_gsd_masses_match_reference():
    rng = np.random.default_rng(1)
    B, V = 40, 16
    dist = R.codebook_cosine_distance(rng.normal(size=(V, 3)))
    p, q = _dists(rng, (B, V), 1.0), _dists(rng, (B, V), 1.0)
    x = rng.integers(0, V, size=B).astype(np.int32)
    for g, p_thr, d_thr in [(0, 0.15, 0.5), (1, 0.15, 0.5), (3, 0.05, 1.0), (5, 1.0, 2.5)]:
        pg, qg = map(np.asarray, R.gsd_masses(p, q, x, dist, g, p_thr, d_thr))
        for b in range(B):
            G = _group_ref(p[b], int(x[b]), dist, g, p_thr, d_thr)
            np.testing.assert_allclose(pg[b], p[b, G].astype(np.float64).sum(), rtol=1e-6, atol=1e-8)
            np.testing.assert_allclose(qg[b], q[b, G].astype(np.float64).sum(), rtol=1e-6, atol=1e-8)
        if g == 0:
            assert np.array_equal(pg, p[np.arange(B), x]) and np.array_equal(qg, q[np.arange(B), x])
    # Leading dims are arbitrary and the group is nontrivial somewhere.
    pg2, _ = R.gsd_masses(p.reshape(4, 10, V), q.reshape(4, 10, V), x.reshape(4, 10), dist, 5, 1.0, 2.5)
    np.testing.assert_array_equal(np.asarray(pg2).reshape(B), pg)
    assert np.any(pg > p[np.arange(B), x] + 1e-3)


def _random_round(seed, B=64, k=3, V=16):
    rng = np.random.default_rng(seed)
    p, q = _dists(rng, (B, k + 1, V), 1.5), _dists(rng, (B, k, V), 1.5)
    cum = np.cumsum(q.astype(np.float64), -1)
    x = np.minimum((rng.random((B, k, 1)) * cum[..., -1:] > cum).sum(-1), V - 1).astype(np.int32)
    u, e = A.draw_verify_randomness(jax.random.key(seed), B, k, V)
    return p, q, x, u, e


def test_accept_from_masses_is_the_exact_rule_on_point_masses():
    p, q, x, u, e = _random_round(2)
    n0, t0 = A.accept_from_randomness(p, q, x, u, e)
    px = np.take_along_axis(p[:, :-1], x[..., None], -1)[..., 0]
    qx = np.take_along_axis(q, x[..., None], -1)[..., 0]
    n1, t1 = A.accept_from_masses(p, q, x, u, e, px, qx)
    np.testing.assert_array_equal(n0, n1)
    np.testing.assert_array_equal(t0, t1)
    assert 0 < int(np.sum(n0)) < 3 * len(n0)
    # The masses drive the test; the residual is unchanged.
    ones = np.ones_like(px)
    n2, t2 = A.accept_from_masses(p, q, x, u, e, ones, ones)
    assert np.all(np.asarray(n2) == 3)
    n3, t3 = A.accept_from_masses(p, q, x, u, e, 0 * ones, ones)
    assert np.all(np.asarray(n3) == 0)
    t_ref = np.argmax(np.maximum(p[:, 0] - q[:, 0], 0) / np.asarray(e)[:, 0], -1)  # residual at 0
    np.testing.assert_array_equal(t3, t_ref)
    with pytest.raises(ValueError, match="px must be"):
        A.accept_from_masses(p, q, x, u, e, px[:, :2], qx)


def test_relaxed_rules_reduce_to_exact():
    V = 16
    rng = np.random.default_rng(3)
    cb = rng.normal(size=(V, 3))
    for seed in range(3):
        p, q, x, u, e = _random_round(10 + seed)
        n0, t0 = A.accept_from_randomness(p, q, x, u, e)
        for rule in (R.AcceptRule("exact"), R.AcceptRule("lantern", k=3, delta=0.0), R.AcceptRule("gsd", g=0),
                     R.AcceptRule("gsd", g=4, p_thr=0.0, d_thr=0.5), R.AcceptRule("gsd", g=4, p_thr=1.0, d_thr=0.0)):
            assert rule.is_exact or rule.g > 0
            n, t, tv = R.relaxed_accept(rule, R.build_tables(rule, cb), p, q, x, u, e)
            np.testing.assert_array_equal(n, n0, err_msg=str(rule))
            np.testing.assert_array_equal(t, t0, err_msg=str(rule))
            assert np.asarray(tv).shape == (64, 3) and np.all(np.asarray(tv) == 0), rule
    # A real relaxation changes decisions (either way: p(G)/q(G) may be below p(x)/q(x)).
    rule = R.AcceptRule("gsd", g=3, p_thr=1.0, d_thr=2.5)
    n, _, tv = R.relaxed_accept(rule, R.build_tables(rule, cb), p, q, x, u, e)
    assert np.any(np.asarray(n) != np.asarray(n0))
    np.testing.assert_allclose(tv, R.gsd_tv_bound(p[:, :3], q, R.build_tables(rule, cb).distance, 3, 1.0, 2.5),
                               rtol=1e-6, atol=1e-7)


# ----------------------------------------------------------------------------
# Emitted distribution of one draft (k = 1).

V1 = 8
N1 = 20000
P1 = np.array([0.30, 0.22, 0.16, 0.12, 0.08, 0.06, 0.04, 0.02], np.float32)
Q1 = np.array([0.04, 0.06, 0.10, 0.10, 0.20, 0.20, 0.15, 0.15], np.float32)
CB1 = np.random.default_rng(7).normal(size=(V1, 3))


def _one_draft_round(rule, seed):
    tables = R.build_tables(rule, CB1)
    kx, kr = jax.random.split(jax.random.key(seed))
    x = jax.random.categorical(kx, jnp.log(jnp.asarray(Q1)), shape=(N1, 1)).astype(jnp.int32)
    u, e = A.draw_verify_randomness(kr, N1, 1, V1)
    p = np.broadcast_to(np.stack([P1, P1[::-1]]), (N1, 2, V1))
    q = np.broadcast_to(Q1, (N1, 1, V1))
    n, nxt, tv = R.relaxed_accept(rule, tables, p, q, x, u, e)
    first = np.where(np.asarray(n) == 1, np.asarray(x)[:, 0], np.asarray(nxt))
    return first, np.asarray(tv), tables


def test_lantern_emits_the_relaxed_target():
    rule = R.parse_accept("lantern:2,0.15")
    first, tv, tables = _one_draft_round(rule, 0)
    pr, moved = map(np.asarray, R.lantern_target(P1, Q1, tables.neighbours, rule.delta))
    tv_p = 0.5 * np.abs(pr.astype(np.float64) - P1).sum()
    assert 0.05 < tv_p <= rule.delta + 1e-6
    np.testing.assert_allclose(tv, moved, rtol=0, atol=0)
    assert _pvalue(first, pr.astype(np.float64)) > 1e-3
    assert _pvalue(first, P1.astype(np.float64)) < 1e-6  # the relaxation is visible
    exact, _, _ = _one_draft_round(R.AcceptRule("exact"), 0)
    assert _pvalue(exact, P1.astype(np.float64)) > 1e-3
    assert np.mean(first == _one_draft_round(rule, 0)[0]) == 1.0  # deterministic given the key


def test_gsd_emits_out_and_is_within_its_bound():
    rule = R.parse_accept("gsd:3,0.15,1.0")
    first, tv, tables = _one_draft_round(rule, 1)
    out, bound_ref = _gsd_out_ref(P1, Q1, tables.distance, rule.g, rule.p_thr, rule.d_thr)
    tv_out = 0.5 * np.abs(out - P1.astype(np.float64)).sum()
    bound = float(R.gsd_tv_bound(P1, Q1, tables.distance, rule.g, rule.p_thr, rule.d_thr))
    np.testing.assert_allclose(bound, bound_ref, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(tv, bound, rtol=1e-6)
    assert 0.03 < tv_out <= bound + 1e-7
    assert _pvalue(first, out) > 1e-3
    assert _pvalue(first, P1.astype(np.float64)) < 1e-6


# ----------------------------------------------------------------------------
# Parser, rule and tables.

@pytest.mark.parametrize("spec,rule", [
    ("exact", R.AcceptRule("exact")),
    (" EXACT ", R.AcceptRule("exact")),
    ("lantern:8,0.1", R.AcceptRule("lantern", k=8, delta=0.1)),
    ("lantern:1,0", R.AcceptRule("lantern", k=1, delta=0.0)),
    ("gsd:3", R.AcceptRule("gsd", g=3)),
    ("gsd:0", R.AcceptRule("gsd", g=0)),
    ("gsd: 3, 0.2", R.AcceptRule("gsd", g=3, p_thr=0.2)),
    ("gsd:3,0.2,0.4", R.AcceptRule("gsd", g=3, p_thr=0.2, d_thr=0.4)),
])
def test_parse_accept_valid(spec, rule):
    got = R.parse_accept(spec)
    assert got == rule and hash(got) == hash(rule)


@pytest.mark.parametrize("spec,msg", [
    ("", "unknown --accept"),
    ("greedy", "unknown --accept"),
    ("exact:1", "takes no parameters"),
    ("lantern", "lantern needs k,delta, e.g. lantern:8,0.1"),
    ("lantern:8", "lantern needs k,delta"),
    ("lantern:8,0.1,3", "lantern needs k,delta"),
    ("lantern:0,0.1", "k must be an integer >= 1"),
    ("lantern:x,0.1", "k must be an integer >= 1"),
    ("lantern:8,1.5", "delta must be a number in \\[0, 1\\]"),
    ("lantern:8,-0.1", "delta must be"),
    ("lantern:8,nan", "delta must be"),
    ("gsd", "gsd needs g"),
    ("gsd:", "gsd needs g"),
    ("gsd:1,0.1,0.2,0.3", "gsd needs g"),
    ("gsd:-1", "g must be an integer >= 0"),
    ("gsd:1.5", "g must be an integer >= 0"),
    ("gsd:1,a", "p_thr must be a number >= 0"),
    ("gsd:1,0.1,-2", "d_thr must be a number >= 0"),
])
def test_parse_accept_rejects(spec, msg):
    with pytest.raises(ValueError, match=msg) as err:
        R.parse_accept(spec)
    m = str(err.value)
    assert "\n" not in m and ("e.g." in m or "use" in m)


def test_accept_rule_checks_and_is_static():
    with pytest.raises(ValueError, match="kind must be one of"):
        R.AcceptRule("typical")
    with pytest.raises(ValueError, match="delta must be in"):
        R.AcceptRule("lantern", k=2, delta=2.0)
    assert R.AcceptRule("lantern", k=2, delta=0.0).is_exact and not R.AcceptRule("lantern", k=2, delta=0.1).is_exact
    assert R.AcceptRule("gsd", g=0).is_exact and not R.AcceptRule("gsd", g=1).is_exact
    f = jax.jit(lambda rule, a: a + rule.delta, static_argnums=0)
    assert float(f(R.AcceptRule("lantern", k=2, delta=0.5), 1.0)) == 1.5


def test_tables():
    rng = np.random.default_rng(5)
    cb = rng.normal(size=(12, 3))
    assert R.build_tables(R.AcceptRule("exact")) == R.AcceptTables(None, None)
    t = R.build_tables(R.AcceptRule("lantern", k=4, delta=0.1), cb)
    assert t.distance is None and t.neighbours.shape == (12, 4) and t.neighbours.dtype == np.int32
    t = R.build_tables(R.AcceptRule("gsd", g=2), cb)
    assert t.neighbours is None and t.distance.shape == (12, 12) and t.distance.dtype == np.float32
    with pytest.raises(ValueError, match="lantern k=12 must be < codebook size K=12; lower k"):
        R.build_tables(R.AcceptRule("lantern", k=12, delta=0.1), cb)
    with pytest.raises(ValueError, match="needs the VQ codebook"):
        R.build_tables(R.AcceptRule("gsd", g=2))
    p, q, x, u, e = _random_round(4, V=12)
    with pytest.raises(ValueError, match="needs tables.neighbours"):
        R.relaxed_accept(R.AcceptRule("lantern", k=2, delta=0.1), R.AcceptTables(), p, q, x, u, e)
    with pytest.raises(ValueError, match="needs draft_probs"):
        R.relaxed_accept(R.AcceptRule("gsd", g=1), t, p, None, x, u, e)


@pytest.mark.parametrize("integer", [True, False])
def test_codebook_neighbours_brute_force(integer):
    rng = np.random.default_rng(6)
    # Small integer codes: exact arithmetic, many exact ties (broken by lower index).
    cb = rng.integers(-2, 3, size=(24, 3)).astype(np.float64) if integer else rng.normal(size=(24, 5))
    nb = R.codebook_neighbours(cb, 5, chunk=7)
    for x in range(len(cb)):
        d = ((cb - cb[x]) ** 2).sum(-1)
        ref = sorted((y for y in range(len(cb)) if y != x), key=lambda y: (d[y], y))[:5]
        assert list(nb[x]) == ref, x
    dist = R.codebook_cosine_distance(cb)
    assert np.all(np.diag(dist) == 0)
    for x in range(0, 24, 5):
        for y in range(24):
            if x != y:
                nx, ny = np.linalg.norm(cb[x]), np.linalg.norm(cb[y])
                cos = cb[x] @ cb[y] / (nx * ny) if nx > 0 and ny > 0 else 0.0
                assert abs(dist[x, y] - (1 - cos)) < 1e-6
