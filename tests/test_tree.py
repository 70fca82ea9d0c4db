"""Draft trees: construction, masks, dynamic expansion, acceptance and cache compaction against plain references."""

import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

import jaxar
from jaxar.decode import tree

# ----------------------------------------------------------------------------------------------------------------
# helpers


def random_parents(rng, n):
    """A random topological tree: node j's parent is -1 or a node < j."""
    return np.array([rng.integers(-1, j) if j else -1 for j in range(n)], np.int32)


def python_ancestors(parents):
    """Per index of [root, nodes], the set of indices it sees (itself and ancestors)."""
    out = [{0}]
    for j, par in enumerate(parents):
        out.append({j + 1} | out[par + 1])
    return out


def python_depth(parents, j):
    return 1 if parents[j] < 0 else 1 + python_depth(parents, parents[j])


# ----------------------------------------------------------------------------------------------------------------
# fixed trees


def test_fixed_tree_sorts_topologically_and_links_parents():
    t = tree.fixed_tree([(0, 0, 0), (1,), (0, 1), (0,), (0, 0), (1, 0)])
    assert t.choices == ((0,), (1,), (0, 0), (0, 1), (1, 0), (0, 0, 0))
    np.testing.assert_array_equal(t.parents, [-1, -1, 0, 0, 1, 2])
    np.testing.assert_array_equal(t.depth, [1, 1, 2, 2, 2, 3])
    np.testing.assert_array_equal(t.rank, [0, 1, 0, 1, 0, 0])
    assert t.max_depth == 3 and t.n_nodes == 6 and t.topk == 2
    # tokens: node j is the rank[j]-th candidate of head depth[j]-1
    topk = np.arange(2 * 3 * 3).reshape(2, 3, 3) + 100
    want = [[topk[b, d - 1, r] for d, r in zip(t.depth, t.rank)] for b in range(2)]
    np.testing.assert_array_equal(np.asarray(t.tokens_from_topk(topk)), want)
    chain = tree.chain_tree(4)
    np.testing.assert_array_equal(chain.parents, [-1, 0, 1, 2])
    np.testing.assert_array_equal(chain.rank, [0, 0, 0, 0])


@pytest.mark.parametrize("choices,msg", [
    ([(0,), (0, 1, 0)], "lacks its prefix"),
    ([(0,), (1,), (0,)], "more than once"),
    ([(0,), ()], "non-empty"),
    ([(0,), (-1,)], ">= 0"),
    ([], "at least one"),
])
def test_fixed_tree_rejects_bad_choices(choices, msg):
    with pytest.raises(ValueError, match=msg):
        tree.fixed_tree(choices)


@pytest.mark.parametrize("n,depth,topk", [(12, 3, 4), (25, 4, 3), (5, 5, 1), (1, 2, 2)])
def test_default_tree_is_the_most_probable_prefix_closed_set(n, depth, topk):
    t = tree.default_tree(n, depth, topk)
    h = sum(1 / (r + 1) for r in range(topk))
    prob = lambda path: math.prod(1 / (r + 1) / h for r in path)  # noqa: E731
    every = [p for d in range(1, depth + 1) for p in itertools.product(range(topk), repeat=d)]
    chosen = set(t.choices)
    assert len(chosen) == n and t.max_depth <= depth and t.topk <= topk
    assert all(p[:-1] in chosen for p in chosen if len(p) > 1)
    worst_in = min(prob(p) for p in chosen)
    best_out = max((prob(p) for p in every if p not in chosen), default=0.0)
    assert worst_in >= best_out - 1e-12
    assert tree.default_tree(n, depth, topk).choices == t.choices  # deterministic
    with pytest.raises(ValueError, match="has only"):
        tree.default_tree(len(every) + 1, depth, topk)


# ----------------------------------------------------------------------------------------------------------------
# masks, depths, positions


def test_tree_mask_depths_positions_match_python_and_jit():
    rng = np.random.default_rng(0)
    B, N = 3, 11
    parents = np.stack([random_parents(rng, N) for _ in range(B)])
    parents[2] = np.arange(N) - 1  # a chain: the mask is causal
    start = np.array([0, 7, 3])
    mask = np.asarray(tree.tree_mask(parents))
    depths = np.asarray(tree.tree_depths(parents))
    pos = np.asarray(tree.tree_positions(parents, start))
    for b in range(B):
        seen = python_ancestors(parents[b])
        want = np.array([[j in seen[i] for j in range(N + 1)] for i in range(N + 1)])
        np.testing.assert_array_equal(mask[b], want)
        want_depth = [python_depth(parents[b], j) for j in range(N)]
        np.testing.assert_array_equal(depths[b], want_depth)
        np.testing.assert_array_equal(pos[b], start[b] + np.array([0] + want_depth))
    np.testing.assert_array_equal(mask[2], np.tril(np.ones((N + 1, N + 1), bool)))
    traced = jax.jit(lambda p, s: (tree.tree_mask(p), tree.tree_positions(p, s)))(jnp.asarray(parents), start)
    np.testing.assert_array_equal(np.asarray(traced[0]), mask)
    np.testing.assert_array_equal(np.asarray(traced[1]), pos)
    with pytest.raises(ValueError, match="node index < j"):
        tree.tree_mask(np.array([[-1, 1]]))


# ----------------------------------------------------------------------------------------------------------------
# dynamic trees


def test_select_top_nodes_matches_brute_force_with_ties():
    rng = np.random.default_rng(1)
    B, M, n = 4, 15, 6
    parents = np.stack([random_parents(rng, M) for _ in range(B)])
    scores = np.zeros((B, M), np.float32)
    for b in range(B):
        for j in range(M):
            base = 0.0 if parents[b, j] < 0 else scores[b, parents[b, j]]
            scores[b, j] = base - rng.choice([0.0, 0.5, 1.0])  # coarse steps: many ties, some equal to the parent
    index, new_parents = map(np.asarray, tree.select_top_nodes(scores, parents, n))
    for b in range(B):
        order = sorted(range(M), key=lambda j: (-scores[b, j], j))[:n]
        kept = sorted(order)
        np.testing.assert_array_equal(index[b], kept)
        remap = {old: new for new, old in enumerate(kept)}
        want = [-1 if parents[b, j] < 0 else remap[parents[b, j]] for j in kept]  # KeyError if not closed
        np.testing.assert_array_equal(new_parents[b], want)


def test_dynamic_tree_matches_python_eagle2_expansion():
    """A Markov drafter (next log-probs depend on the frontier token only) against a plain-Python EAGLE-2."""
    rng = np.random.default_rng(2)
    B, V, depth, k, n = 2, 9, 3, 3, 10
    table = np.log(rng.dirichlet(np.ones(V), size=V)).astype(np.float32)  # [V, V] logp of next | token
    root_logp = np.log(rng.dirichlet(np.ones(V), size=B)).astype(np.float32)
    calls = []

    def expand(state, cand_tokens, cand_parents, frontier, d):
        calls.append((d, cand_tokens.shape[1]))
        tok = jnp.take_along_axis(cand_tokens, frontier, axis=1)
        return state + 1, jnp.asarray(table)[tok]

    tokens, parents, state = tree.dynamic_tree(expand, jnp.zeros(()), jnp.asarray(root_logp), depth=depth, topk=k,
                                               n=n)
    assert int(state) == depth - 1 and calls == [(1, k), (2, k + k * k)]
    for b in range(B):
        # candidates: (score, token, parent)
        top = lambda lp: sorted(range(V), key=lambda v: (-lp[v], v))[:k]  # noqa: E731
        cands = [(float(root_logp[b, v]), v, -1) for v in top(root_logp[b])]
        level = list(range(k))
        for _ in range(1, depth):
            frontier = sorted(level, key=lambda j: (-cands[j][0], j))[:k]
            level = []
            for f in frontier:
                for v in top(table[cands[f][1]]):
                    level.append(len(cands))
                    cands.append((cands[f][0] + float(table[cands[f][1], v]), v, f))
        kept = sorted(sorted(range(len(cands)), key=lambda j: (-cands[j][0], j))[:n])
        remap = {old: new for new, old in enumerate(kept)}
        np.testing.assert_array_equal(np.asarray(tokens[b]), [cands[j][1] for j in kept])
        np.testing.assert_array_equal(np.asarray(parents[b]),
                                      [-1 if cands[j][2] < 0 else remap[cands[j][2]] for j in kept])


# ----------------------------------------------------------------------------------------------------------------
# acceptance


def python_greedy(argmax, tokens, parents, max_depth):
    cur, path = -1, []
    while len(path) < max_depth:
        kids = [j for j in range(len(tokens)) if parents[j] == cur and tokens[j] == argmax[cur + 1]]
        if not kids:
            break
        cur = kids[0]
        path.append(cur)
    return path, int(argmax[cur + 1])


def test_greedy_tree_accept_matches_python():
    rng = np.random.default_rng(3)
    B, N, V = 64, 10, 3  # tiny vocabulary: many matches, duplicate siblings
    parents = np.stack([random_parents(rng, N) for _ in range(B)])
    tokens = rng.integers(0, V, (B, N)).astype(np.int32)
    logits = rng.normal(size=(B, N + 1, V)).astype(np.float32)
    max_depth = int(np.asarray(tree.tree_depths(parents)).max())
    for depth_cap in (max_depth, 2):
        path, n_acc, nxt = map(np.asarray, tree.tree_accept_greedy(logits, tokens, parents, depth_cap))
        assert path.shape == (B, depth_cap)
        for b in range(B):
            want_path, want_next = python_greedy(logits[b].argmax(-1), tokens[b], parents[b], depth_cap)
            assert n_acc[b] == len(want_path) and nxt[b] == want_next
            np.testing.assert_array_equal(path[b], want_path + [-1] * (depth_cap - len(want_path)))
    assert (n_acc > 1).any()  # the test exercised deep paths


# A 2-level tree: the root has 3 children; they have 2, 2 and 1 children. V = 5.
V = 5
PARENTS = np.array([-1, -1, -1, 0, 0, 1, 1, 2], np.int32)
N = len(PARENTS)
SAMPLES = 20000


def _dists(seed):
    rng = np.random.default_rng(seed)
    soft = lambda x: np.exp(x) / np.exp(x).sum(-1, keepdims=True)  # noqa: E731
    p0, p1, p2 = soft(rng.normal(0, 0.8, V)), soft(rng.normal(0, 0.8, (V, V))), soft(rng.normal(0, 0.8, (V, V, V)))
    q0, q1 = soft(rng.normal(0, 1.5, V)), soft(rng.normal(0, 1.5, (V, V)))
    return [x.astype(np.float32) for x in (p0, p1, p2, q0, q1)]


def _first_two_tokens(key, dists, sampled, rule):
    """Draft a tree per row, verify it, return the first two emitted tokens [S, 2]
    (when only one was emitted, the second is drawn from the target, as the next round would)."""
    p0, p1, p2, q0, q1 = (jnp.asarray(x) for x in dists)
    k_draft, k_acc, k_next = jax.random.split(key, 3)
    kd = jax.random.split(k_draft, N)
    root_kids, deep = np.arange(3), np.arange(3, N)
    if sampled:  # i.i.d. with replacement from q
        t_root = jax.random.categorical(kd[0], jnp.log(q0), shape=(SAMPLES, 3))
        par_tok = t_root[:, PARENTS[deep]]
        t_deep = jax.random.categorical(kd[1], jnp.log(q1[par_tok]))
    else:  # distinct siblings: Gumbel top-k (without replacement) from q
        g = jax.random.gumbel(kd[0], (SAMPLES, V))
        t_root = jax.lax.top_k(jnp.log(q0) + g, 3)[1]
        cols = []
        for i in root_kids:
            n_kids = int((PARENTS == i).sum())
            g = jax.random.gumbel(kd[1 + i], (SAMPLES, V))
            cols.append(jax.lax.top_k(jnp.log(q1[t_root[:, i]]) + g, n_kids)[1])
        t_deep = jnp.concatenate(cols, axis=1)
    tokens = jnp.concatenate([t_root, t_deep], axis=1).astype(jnp.int32)
    par_tok = tokens[:, PARENTS[deep]]
    p = jnp.concatenate([p0[None, None].repeat(SAMPLES, 0), p1[tokens[:, root_kids]], p2[par_tok, tokens[:, deep]]], 1)
    q = None
    if sampled:
        q = jnp.concatenate([q0[None, None].repeat(SAMPLES, 0), q1[tokens[:, root_kids]],
                             jnp.full((SAMPLES, len(deep), V), 1.0 / V)], 1)
    parents = jnp.broadcast_to(jnp.asarray(PARENTS), (SAMPLES, N))
    keys = jax.random.split(k_acc, SAMPLES)
    if rule is None:  # the public entry point
        path, n_acc, nxt = tree.tree_accept(p, q, tokens, parents, keys, 2)
    else:
        u, e = tree.draw_tree_randomness(keys, SAMPLES, N, V)
        path, n_acc, nxt = tree._tree_accept_core(p, q, tokens, parents, u, e, 2, rule)
    path_tok = jnp.take_along_axis(tokens, jnp.maximum(path, 0), axis=1)
    x1 = jnp.where(n_acc >= 1, path_tok[:, 0], nxt)
    x2_target = jax.random.categorical(k_next, jnp.log(p1[x1]))
    x2 = jnp.where(n_acc >= 2, path_tok[:, 1], jnp.where(n_acc == 1, nxt, x2_target))
    return jnp.stack([x1, x2], 1)


_first_two_tokens_jit = jax.jit(_first_two_tokens, static_argnums=(2, 3))


def _chi2_pvalue(sampled, rule, seed):
    dists = _dists(seed)
    x = np.asarray(_first_two_tokens_jit(jax.random.key(seed), dists, sampled, rule))
    counts = np.bincount(x[:, 0] * V + x[:, 1], minlength=V * V)
    p0, p1 = dists[0].astype(np.float64), dists[1].astype(np.float64)
    joint = (p0 / p0.sum())[:, None] * (p1 / p1.sum(-1, keepdims=True))
    return stats.chisquare(counts, joint.ravel() * SAMPLES).pvalue


def _no_residual_update(r, q_child, p_node):
    return r


@pytest.mark.parametrize("sampled", [False, True], ids=["distinct", "iid"])
def test_tree_accept_emits_the_target_distribution(sampled):
    assert _chi2_pvalue(sampled, None, seed=4) > 1e-3


@pytest.mark.parametrize("sampled", [False, True], ids=["distinct", "iid"])
def test_a_broken_sibling_rule_fails_the_same_test(sampled):
    assert _chi2_pvalue(sampled, tree._residual, seed=5) > 1e-3  # the private core with the real rule passes
    assert _chi2_pvalue(sampled, _no_residual_update, seed=5) < 1e-8


def test_tree_accept_degenerate_cases():
    """A perfect deterministic draft path is always accepted; a draft with p = 0 never is."""
    parents = np.array([[-1, 0, -1, 2]], np.int32)
    tokens = np.array([[1, 2, 3, 0]], np.int32)
    p = np.zeros((1, 5, 4), np.float32)
    p[0, 0, 1] = p[0, 1, 2] = 1.0  # the target is certain of tokens 1 then 2, then 0
    p[0, 2, 0] = 1.0
    p[0, 3:] = 0.25
    for key in (jax.random.key(0), jax.random.PRNGKey(0)):  # typed or raw
        keys = jax.random.split(key, 1)
        path, n_acc, nxt = map(np.asarray, tree.tree_accept(p, None, tokens, parents, keys, 2))
        assert path.tolist() == [[0, 1]] and n_acc.tolist() == [2] and nxt.tolist() == [0]
    p2 = p.copy()
    p2[0, 0] = [0.0, 0.0, 0.0, 1.0]  # only the second root child (token 3) can pass; then p = uniform
    path, n_acc, _ = map(np.asarray, tree.tree_accept(p2, None, tokens, parents, jax.random.split(key, 1), 2))
    assert path[0, 0] == 2 and n_acc[0] >= 1


# ----------------------------------------------------------------------------------------------------------------
# cache compaction


@pytest.mark.parametrize("quantized", [False, True], ids=["float", "int8"])
def test_compact_cache_moves_only_the_accepted_path(quantized):
    rng = np.random.default_rng(6)
    B, L, K, Dh, n_layers = 3, 20, 2, 4, 2
    make = lambda shape, dt: tuple(jnp.asarray(rng.normal(size=shape) * 50).astype(dt)  # noqa: E731
                                   for _ in range(n_layers))
    dt = jnp.int8 if quantized else jnp.float32
    cache = jaxar.KVCache(k=make((B, L, K, Dh), dt), v=make((B, L, K, Dh), dt), lengths=jnp.full((B,), 12),
                          k_scale=make((B, L, K), jnp.float32) if quantized else (),
                          v_scale=make((B, L, K), jnp.float32) if quantized else ())
    start = np.array([2, 0, 5])
    path = np.array([[1, 4, 6], [0, 1, 2], [3, -1, -1]])
    n_acc = np.array([3, 0, 1])
    out = tree.compact_cache(cache, start, path, n_acc)
    np.testing.assert_array_equal(np.asarray(out.lengths), start + 1 + n_acc)
    for name in ("k", "v", "k_scale", "v_scale"):
        for before, after in zip(getattr(cache, name), getattr(out, name)):
            want = np.array(before)
            for b in range(B):
                for i in range(n_acc[b]):
                    want[b, start[b] + 1 + i] = np.asarray(before)[b, start[b] + 1 + path[b, i]]
            np.testing.assert_array_equal(np.asarray(after), want)


CONFIG = jaxar.ModelConfig.llama(vocab_size=48, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, mlp_dim=48,
                                 max_seq_len=64, initializer_range=0.3)


def test_tree_forward_matches_root_paths_and_compaction_matches_a_chain():
    """forward with tree_mask / tree_positions scores every node as the causal forward of its root path does;
    compacting the accepted path gives the cache (and next logits) of writing that path as a chain."""
    rng = np.random.default_rng(7)
    params = jaxar.init_params(CONFIG, 0)
    t = tree.fixed_tree([(0,), (1,), (2,), (0, 0), (0, 1), (1, 0), (0, 0, 0), (1, 0, 0), (1, 0, 1)])
    B, Nn, D, P = 2, t.n_nodes, t.max_depth, 6
    prefix = rng.integers(0, 48, (B, P)).astype(np.int32)
    plen = np.array([6, 3])
    root = rng.integers(0, 48, B).astype(np.int32)
    tokens = rng.integers(0, 48, (B, Nn)).astype(np.int32)
    parents = t.batched_parents(B)
    cache = jaxar.KVCache.empty(CONFIG, B, 32)
    _, cache = jaxar.forward(params, prefix, config=CONFIG, cache=cache, num_new=plen)
    start = cache.lengths
    verify_in = np.concatenate([root[:, None], tokens], 1)
    logits, t_cache = jaxar.forward(params, verify_in, config=CONFIG, cache=cache,
                                    positions=tree.tree_positions(parents, start), tree_mask=tree.tree_mask(parents))

    def root_path(j):  # node indices from depth 1 down to j
        return [] if j < 0 else root_path(int(t.parents[j])) + [j]

    # every index of [root, nodes] of every row as one padded causal batch without a cache
    seqs, at = [], []
    for b in range(B):
        for j in range(-1, Nn):
            s = list(prefix[b, :plen[b]]) + [root[b]] + [tokens[b, i] for i in root_path(j)]
            at.append(len(s) - 1)
            seqs.append(s + [0] * (P + 1 + D - len(s)))
    ref = np.asarray(jaxar.forward(params, np.array(seqs), config=CONFIG)[0])[np.arange(len(seqs)), at]
    np.testing.assert_allclose(np.asarray(logits).reshape(B * (Nn + 1), -1), ref, atol=2e-5, rtol=1e-5)

    # accept the path to node 7 = (1, 0, 0) in row 0 (nodes 1, 5, 7 move), node 3's parent path (0,) in row 1
    path = np.array([root_path(7), [0, -1, -1]], np.int32)
    n_acc = np.array([3, 1], np.int32)
    compact = tree.compact_cache(t_cache, start, path, n_acc)
    chain = np.stack([np.concatenate([[root[b]], tokens[b, np.maximum(path[b], 0)]]) for b in range(B)])
    _, chain_cache = jaxar.forward(params, chain, config=CONFIG, cache=cache, num_new=1 + n_acc)
    np.testing.assert_array_equal(np.asarray(compact.lengths), np.asarray(chain_cache.lengths))
    for got, want in zip(compact.k + compact.v, chain_cache.k + chain_cache.v):
        for b in range(B):
            n = int(chain_cache.lengths[b])
            np.testing.assert_allclose(np.asarray(got)[b, :n], np.asarray(want)[b, :n], atol=1e-5, rtol=1e-5)
    nxt = rng.integers(0, 48, (B, 1)).astype(np.int32)
    got = jaxar.forward(params, nxt, config=CONFIG, cache=compact)[0]
    want = jaxar.forward(params, nxt, config=CONFIG, cache=chain_cache)[0]
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5, rtol=1e-5)


def test_typical_acceptance_matches_a_python_reference():
    """Medusa's typical acceptance (lossy): the deepest node whose whole root path passes
    p(x) > min(eps, delta * exp(-H)) at its parent, against a plain-Python walk; next token from p at its end."""
    from jaxar.decode.tree import tree_accept_typical

    rng = np.random.default_rng(5)
    B, N, V, D = 32, 7, 4, 3
    parents = np.full((B, N), -1, np.int32)
    for b in range(B):
        for j in range(1, N):
            parents[b, j] = rng.integers(-1, j)
    tokens = rng.integers(0, V, (B, N)).astype(np.int32)
    p = rng.dirichlet(np.full(V, 0.5), (B, N + 1)).astype(np.float32)
    keys = jax.random.split(jax.random.PRNGKey(0), B)
    path, n, nxt = tree_accept_typical(p, tokens, parents, keys, D, epsilon=0.3, delta=0.2)
    path, n, nxt = np.asarray(path), np.asarray(n), np.asarray(nxt)
    pp = p.astype(np.float64)
    for b in range(B):
        def thr(i):
            h = -np.sum(pp[b, i] * np.log(np.maximum(pp[b, i], 1e-30)))
            return min(0.3, 0.2 * np.exp(-h))
        best, best_d, best_path = -1, 0, []
        for j in range(N):
            chain, c = [], j
            while c >= 0:
                chain.append(c)
                c = parents[b, c]
            chain = chain[::-1]
            ok = all(pp[b, parents[b, c] + 1, tokens[b, c]] > thr(parents[b, c] + 1) for c in chain)
            if ok and len(chain) <= D and len(chain) > best_d:
                best, best_d, best_path = j, len(chain), chain
        assert n[b] == best_d, b
        assert path[b, :best_d].tolist() == best_path and np.all(path[b, best_d:] == -1)
        assert pp[b, best + 1 if best_d else 0, nxt[b]] > 0
