"""Tree speculative decoding inside the decode loop: greedy output equals plain greedy token for token
(oracle trees with a known accepted path, Medusa / Hydra heads, the EAGLE drafter; chains and trees; ragged
batches), and the accepted lengths are the ones the trees were built to give."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxar
from jaxar.decode import drafters, tree
from jaxar.decode.generate import generate, pad_prompts
from jaxar.decode.speculative import speculative_generate

V = 48
TARGET = jaxar.ModelConfig.llama(vocab_size=V, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, mlp_dim=48,
                                 max_seq_len=128, initializer_range=0.3)
NEW = 14
CHOICES = [(0,), (1,), (2,), (0, 0), (0, 1), (1, 0), (2, 0), (0, 0, 0), (0, 1, 0), (1, 0, 0), (0, 0, 0, 0)]


def _mix(*xs):
    h = jnp.uint32(2166136261)
    for x in xs:
        h = (h ^ jnp.asarray(x).astype(jnp.uint32)) * jnp.uint32(16777619)
    return h


@dataclasses.dataclass(frozen=True)
class OracleTree:
    """Knows the greedy continuation (its params); each round it hides the true path at a pseudo-random rank
    per depth, cut at a pseudo-random depth, and fills every other node with a wrong token. The round's
    expected acceptance is that cut (the test compares)."""

    num_draft: int
    parents: tuple
    depths: tuple
    ranks: tuple
    is_tree: bool = True

    @property
    def max_depth(self):
        return max(self.depths)

    def init(self, params, prompts, lengths, cache_len):
        return params  # the reference sequence [B, L]

    def propose(self, ref, ctx):
        B, L = ref.shape
        N = self.num_draft
        truth = jnp.take_along_axis(ref, jnp.clip(ctx.seq_len[:, None] + jnp.arange(self.max_depth)[None], 0, L - 1),
                                    axis=1)
        anc = np.eye(N, dtype=bool)  # anc[t, j]: j is t or an ancestor of t
        for t in range(N):
            p = self.parents[t]
            while p >= 0:
                anc[t, p] = True
                p = self.parents[p]
        b = jnp.arange(B)
        target = (_mix(ctx.step, b, 1) % N).astype(jnp.int32)  # the node whose root path is right ...
        depths = jnp.asarray(self.depths, jnp.int32)
        cut = (_mix(ctx.step, b, 2) % (depths[target] + 1)).astype(jnp.int32)  # ... down to this depth
        good = jnp.asarray(anc)[target] & (depths[None] <= cut[:, None])  # [B, N]
        right = truth[:, depths - 1]
        toks = jnp.where(good, right, (right + 1) % V)
        parents = jnp.broadcast_to(jnp.asarray(self.parents, jnp.int32)[None], (B, N))
        return toks.astype(jnp.int32), parents, None, ref

    def update(self, ref, ctx, accepted, kept, seq):
        return ref


@drafters.register("oracle-tree")
def _make_oracle(*, num_draft, target_config, draft_params=None, **_):
    t = tree.fixed_tree(CHOICES)
    return OracleTree(num_draft=len(t.parents), parents=tuple(int(x) for x in t.parents),
                      depths=tuple(int(x) for x in t.depth), ranks=tuple(int(x) for x in t.rank)), draft_params


@pytest.fixture(scope="module")
def setup():
    rng = np.random.default_rng(0)
    base = list(rng.integers(0, V, 6))
    prompts = [base * 2 + [1], list(rng.integers(0, V, 3)), base + base[:3], [7, 9]]
    toks, lens = pad_prompts(prompts)
    params = jaxar.init_params(TARGET, 0)
    plain = generate(params, toks, lens, config=TARGET, max_new_tokens=NEW, eos_ids=[3])
    ref = np.zeros((len(prompts), toks.shape[1] + NEW + 8), np.int32)
    for b, p in enumerate(prompts):
        ref[b, :len(p)] = p
        ref[b, len(p):len(p) + NEW] = np.asarray(plain.tokens[b])
    return params, toks, lens, plain, jnp.asarray(ref)


def _same(out, plain):
    np.testing.assert_array_equal(out.num_tokens, plain.num_tokens)
    np.testing.assert_array_equal(np.asarray(out.tokens), np.asarray(plain.tokens))
    np.testing.assert_array_equal(out.finish_reason, plain.finish_reason)


def test_oracle_tree_greedy_equals_plain_and_accepts_the_hidden_path(setup):
    params, toks, lens, plain, ref = setup
    out = speculative_generate(params, toks, lens, config=TARGET, max_new_tokens=NEW, num_draft=1,
                               draft="oracle-tree", draft_params=ref, eos_ids=[3])
    _same(out, plain)
    assert int(out.accepted.sum()) > 0 and int(out.accepted_at[2]) > 0  # deep paths were taken
    # every round accepted exactly its cut (while the row had room): at least as many as a chain-less run
    assert int(out.accepted.sum()) + int(out.rounds.sum()) >= int(np.sum(plain.num_tokens))


def test_oracle_tree_sampled_rows_keep_greedy_rows_exact(setup):
    """A batch mixing greedy and sampled rows: the greedy rows still equal plain greedy."""
    from jaxar.decode.sampling import SamplingConfig

    params, toks, lens, plain, ref = setup
    samp = [SamplingConfig(temperature=0.0), SamplingConfig(temperature=1.0), SamplingConfig(temperature=0.0),
            SamplingConfig(temperature=1.0)]
    out = speculative_generate(params, toks, lens, config=TARGET, max_new_tokens=NEW, num_draft=1,
                               draft="oracle-tree", draft_params=ref, eos_ids=[3], sampling=samp)
    for b in (0, 2):
        n = int(plain.num_tokens[b])
        assert int(out.num_tokens[b]) == n
        np.testing.assert_array_equal(np.asarray(out.tokens[b, :n]), np.asarray(plain.tokens[b, :n]))


def _heads(kind, hydra=False, seed=1, scale=0.5):
    """Untrained heads with random (not zero) residual weights, so drafts vary between positions."""
    from jaxar.models import heads

    cfg = heads.HeadsConfig(kind=kind, num_heads=3, hydra=hydra)
    params = heads.init_heads(cfg, TARGET, jax.random.PRNGKey(seed))
    leaves, tdef = jax.tree_util.tree_flatten(params)
    keys = jax.random.split(jax.random.PRNGKey(seed + 1), len(leaves))
    leaves = [x + scale * jax.random.normal(k, x.shape, x.dtype) / np.sqrt(x.shape[0]) if kind == "medusa" else x
              for x, k in zip(leaves, keys)]
    return cfg, jax.tree_util.tree_unflatten(tdef, leaves)


@pytest.mark.parametrize("kind,hydra,nodes,depth,topk", [
    ("medusa", False, 1, 3, None), ("medusa", False, 8, 3, 3), ("medusa", True, 6, 3, 2),
    ("eagle", False, 1, 3, None), ("eagle", False, 7, 3, 3)])
def test_heads_and_eagle_greedy_equal_plain(setup, kind, hydra, nodes, depth, topk):
    params, toks, lens, plain, _ = setup
    cfg, hp = _heads(kind, hydra)
    out = speculative_generate(params, toks, lens, config=TARGET, max_new_tokens=NEW, num_draft=1, draft=kind,
                               draft_params=hp, draft_config=cfg, eos_ids=[3], tree_nodes=nodes, tree_depth=depth,
                               tree_topk=topk)
    _same(out, plain)
    assert out.accepted_at.shape == (depth,)


def test_tree_sampling_pallas_kernel_equals_jnp(setup):
    """Sampled rows: the fused verify_tree kernel (interpret mode here) consumes the same randomness as
    tree.tree_accept and gives the same output."""
    from jaxar.decode.sampling import SamplingConfig

    params, toks, lens, plain, ref = setup
    kw = dict(config=TARGET, max_new_tokens=8, num_draft=1, draft="oracle-tree", draft_params=ref, eos_ids=[3],
              sampling=SamplingConfig(temperature=1.0), seed=3)
    a = speculative_generate(params, toks, lens, verify_backend="jnp", **kw)
    b = speculative_generate(params, toks, lens, verify_backend="pallas", **kw)
    np.testing.assert_array_equal(np.asarray(a.tokens), np.asarray(b.tokens))
    np.testing.assert_array_equal(np.asarray(a.rounds), np.asarray(b.rounds))


def test_tree_sampling_keeps_the_target_distribution_end_to_end():
    """Temperature 1 through the whole loop (drafts, tree verify, recursive rejection, compaction): the first two
    emitted tokens of 6000 independent rows follow the target's exact joint p(x1) p(x2 | x1) (float64)."""
    from scipy import stats

    from jaxar.decode.sampling import SamplingConfig

    small = jaxar.ModelConfig.llama(vocab_size=5, d_model=16, n_layers=1, n_heads=2, mlp_dim=16, max_seq_len=16,
                                    initializer_range=1.0)
    params = jaxar.init_params(small, 2)
    prompt = np.array([[1, 2, 0, 4]], np.int32)
    logits, _ = jaxar.forward(params, jnp.asarray(prompt), config=small)
    p1 = np.asarray(jax.nn.softmax(logits[0, -1]), np.float64)
    nxt = np.concatenate([np.repeat(prompt, 5, 0), np.arange(5, dtype=np.int32)[:, None]], axis=1)
    logits2, _ = jaxar.forward(params, jnp.asarray(nxt), config=small)
    p2 = np.asarray(jax.nn.softmax(logits2[:, -1]), np.float64)
    joint = (p1 / p1.sum())[:, None] * (p2 / p2.sum(1, keepdims=True))
    n = 6000
    # the oracle's "truth": a fixed continuation, right for some samples and wrong for others
    ref = jnp.asarray(np.tile(np.array([[1, 2, 0, 4, int(np.argmax(p1)), 0, 0, 0, 0, 0]], np.int32), (n, 1)))
    out = speculative_generate(params, np.repeat(prompt, n, 0), np.full((n,), 4, np.int32), config=small,
                               max_new_tokens=2, num_draft=1, draft="oracle-tree", draft_params=ref, eos_ids=[],
                               sampling=SamplingConfig(temperature=1.0), seed=11)
    toks = np.asarray(out.tokens)
    counts = np.zeros((5, 5))
    np.add.at(counts, (toks[:, 0], toks[:, 1]), 1)
    assert int(out.accepted.sum()) > n // 10  # the tree path was accepted often enough to matter
    res = stats.chisquare(counts.ravel(), joint.ravel() * n)
    assert res.pvalue > 1e-3, res


def test_eagle_with_a_draft_vocabulary_equals_plain(setup):
    """EAGLE drafting over a subset of the vocabulary (EAGLE-3's draft vocabulary): still lossless; every draft
    token lies in the subset."""
    from jaxar.train.drafter import draft_vocabulary

    params, toks, lens, plain, _ = setup
    cfg, hp = _heads("eagle")
    counts = np.bincount(np.asarray(plain.tokens).ravel(), minlength=V)  # the subset holds the likely ids
    vocab = draft_vocabulary(counts, V, 12)
    top = np.lexsort((np.arange(V), -counts))[:12]  # most frequent first, ties to the lower id
    assert vocab.tolist() == sorted(top.tolist())
    out = speculative_generate(params, toks, lens, config=TARGET, max_new_tokens=NEW, num_draft=1, draft="eagle",
                               draft_params=hp, draft_config=cfg, eos_ids=[3], tree_nodes=7, tree_depth=3,
                               tree_topk=3, draft_vocab=vocab)
    _same(out, plain)
    drafter, dparams = drafters.make("eagle", num_draft=1, target_config=TARGET, draft_params=hp, draft_config=cfg,
                                     target_params=params, tree_nodes=7, tree_depth=3, tree_topk=3, draft_vocab=vocab)
    assert drafter.draft_vocab == 12 and np.array_equal(np.asarray(dparams[2]), vocab)


def test_typical_acceptance_in_the_loop(setup):
    """acceptance='typical' (lossy, sampled rows only): greedy rows stay exact; chains refuse it."""
    from jaxar.decode.sampling import SamplingConfig

    params, toks, lens, plain, ref = setup
    samp = [SamplingConfig(temperature=0.0), SamplingConfig(temperature=1.0)] * 2
    out = speculative_generate(params, toks, lens, config=TARGET, max_new_tokens=NEW, num_draft=1,
                               draft="oracle-tree", draft_params=ref, eos_ids=[3], sampling=samp,
                               acceptance="typical")
    for b in (0, 2):
        n = int(plain.num_tokens[b])
        np.testing.assert_array_equal(np.asarray(out.tokens[b, :n]), np.asarray(plain.tokens[b, :n]))
    with pytest.raises(ValueError, match="tree drafters"):
        speculative_generate(params, toks, lens, config=TARGET, max_new_tokens=4, num_draft=2, draft="ngram",
                             acceptance="typical")
