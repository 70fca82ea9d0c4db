"""Speculative decoding: greedy output identical to plain greedy; sampling draws from the target exactly."""

import numpy as np
import pytest
from scipy import stats

import jaxar
from jaxar.decode.generate import generate, pad_prompts
from jaxar.decode.sampling import SamplingConfig
from jaxar.decode.speculative import ngram_drafts, speculative_generate

TARGET = jaxar.ModelConfig.llama(vocab_size=48, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, mlp_dim=48,
                                 max_seq_len=128, initializer_range=0.3)
POOR_DRAFT = jaxar.ModelConfig.llama(vocab_size=48, d_model=16, n_layers=1, n_heads=2, mlp_dim=16, max_seq_len=128,
                                     initializer_range=0.3)


@pytest.fixture(scope="module")
def setup():
    rng = np.random.default_rng(0)
    # repetitive prompts, so n-gram drafts do get accepted sometimes
    base = list(rng.integers(0, 48, 6))
    prompts = [base * 2 + [1], list(rng.integers(0, 48, 3)), base + base[:3], [7]]
    toks, lens = pad_prompts(prompts)
    params = jaxar.init_params(TARGET, 0)
    plain = generate(params, toks, lens, config=TARGET, max_new_tokens=12, eos_ids=[3])
    return params, toks, lens, plain


@pytest.mark.parametrize("draft,k", [("perfect", 3), ("poor", 2), ("poor", 4), ("ngram", 3), ("trigram", 3),
                                     ("aded", 4), ("jacobi", 3), ("mcjacobi", 4)])
def test_greedy_speculative_equals_plain_greedy(setup, draft, k):
    params, toks, lens, plain = setup
    kw = {}
    if draft == "perfect":
        kw = dict(draft="model", draft_params=params, draft_config=TARGET)
    elif draft == "poor":
        kw = dict(draft="model", draft_params=jaxar.init_params(POOR_DRAFT, 1), draft_config=POOR_DRAFT)
    else:
        kw = dict(draft=draft, ngram=2)
    out = speculative_generate(params, toks, lens, config=TARGET, max_new_tokens=12, num_draft=k, eos_ids=[3], **kw)
    np.testing.assert_array_equal(out.num_tokens, plain.num_tokens)
    np.testing.assert_array_equal(out.tokens, plain.tokens)
    np.testing.assert_array_equal(out.finish_reason, plain.finish_reason)
    if draft == "perfect":  # a perfect draft is always fully accepted
        assert int(out.accepted.sum()) >= int(out.rounds.sum()) * k - len(lens) * k


def test_trigram_table_follows_the_latest_continuation_and_chains():
    from jaxar.decode.speculative import trigram_drafts

    # pairs: (1,2)->3 then later (1,2)->4 (latest wins); (2,4)->1; sequence ends with (1, 2)
    seq = np.array([[1, 2, 3, 9, 1, 2, 4, 1, 1, 2, 0, 0]])
    drafts = trigram_drafts(seq, np.array([10]), k=3)
    # (1,2)->4, (2,4)->1, (4,1)->1
    assert drafts.tolist() == [[4, 1, 1]]


def test_aded_table_counts_and_puct_choice():
    """The ADED table against a plain-Python trigram count and PUCT score."""
    from jaxar.decode.speculative import ADED_C_PUCT, AdedTable

    rng = np.random.default_rng(0)
    seq = np.concatenate([rng.integers(0, 5, (2, 40)), np.zeros((2, 4), int)], axis=1)
    lens = np.array([40, 27])
    table = AdedTable.empty(2, size=97, candidates=8).observe(seq, np.array([2, 2]), lens - 2, 38)
    drafts, (ctx, slots) = table.drafts(seq, lens, k=1)
    for row in range(2):
        s = seq[row, :lens[row]].tolist()
        counts = {}
        for i in range(2, len(s)):
            counts.setdefault((s[i - 2], s[i - 1]), {}).setdefault(s[i], 0)
            counts[(s[i - 2], s[i - 1])][s[i]] += 1
        follow = counts.get((s[-2], s[-1]))
        if follow is None:
            continue
        # untried continuations: PUCT reduces to the count prior -> the most frequent (first slot on ties)
        assert drafts[row, 0] in [t for t, c in follow.items() if c == max(follow.values())]
        h = int(ctx[row, 0])
        got = {int(t): float(c) for t, c in zip(np.asarray(table.tok[row, h]), np.asarray(table.cnt[row, h]))
               if t >= 0}
        assert got == {t: float(c) for t, c in follow.items()}  # no other context hashed here in this test
    # Feedback: a rejected first draft is demoted below an accepted alternative.
    row = 0
    h, slot = int(ctx[row, 0]), int(slots[row, 0])
    n_acc = np.array([0, 0])
    t2 = table
    for _ in range(3):
        t2 = t2.feedback((ctx, slots), n_acc, np.array([True, False]))
    vis, acc = np.asarray(t2.vis[row, h]), np.asarray(t2.acc[row, h])
    assert vis[slot] == 3 and acc[slot] == 0 and vis.sum() == 3
    cnt = np.asarray(t2.cnt[row, h])
    tok = np.asarray(t2.tok[row, h])
    prior = cnt / cnt.sum()
    score = np.where(vis > 0, acc / np.maximum(vis, 1), 0) + ADED_C_PUCT * prior * np.sqrt(1 + vis.sum()) / (1 + vis)
    score = np.where(tok >= 0, score, -np.inf)
    new = np.asarray(t2.drafts(seq, lens, k=1)[0])
    assert new[row, 0] == tok[np.argmax(score)]
    if (tok >= 0).sum() > 1:
        assert new[row, 0] != drafts[row, 0]


def test_ngram_drafts_copy_the_continuation_of_the_latest_match():
    seq = np.array([[5, 6, 7, 8, 5, 6, 9, 5, 6, 0, 0, 0]])
    drafts = ngram_drafts(seq, np.array([9]), k=3, n=2)
    # suffix (5, 6): latest earlier match at 4 -> continuation 9, 5, 6
    assert drafts.tolist() == [[9, 5, 6]]
    none = ngram_drafts(np.array([[1, 2, 3, 0]]), np.array([3]), k=2, n=2)
    assert none.tolist() == [[3, 3]]


@pytest.mark.parametrize("draft", ["model", "ngram", "trigram", "aded", "jacobi", "mcjacobi"])
def test_sampling_draws_from_the_target_distribution(draft):
    """chi-squared on the first two sampled tokens (36 cells) against the exact
    target distribution p(t1) p(t2 | t1), with a poor draft model or n-gram drafts."""
    target = jaxar.ModelConfig.llama(vocab_size=6, d_model=16, n_layers=1, n_heads=2, mlp_dim=16, max_seq_len=32,
                                     initializer_range=0.6)
    small = target.replace(d_model=8, n_heads=1, mlp_dim=8)
    tp, dp = jaxar.init_params(target, 2), jaxar.init_params(small, 3)
    prompt = [1, 2, 1]
    rows = 3000
    toks, lens = pad_prompts([prompt] * rows)
    kw = dict(draft="model", draft_params=dp, draft_config=small) if draft == "model" else dict(draft=draft)
    out = speculative_generate(tp, toks, lens, config=target, max_new_tokens=2, num_draft=3, eos_ids=[],
                               sampling=SamplingConfig(temperature=1.0), seed=11, **kw)
    pairs = np.asarray(out.tokens[:, 0]) * 6 + np.asarray(out.tokens[:, 1])
    observed = np.bincount(pairs, minlength=36)
    expected = _exact_pair_distribution(tp, target, prompt) * rows
    assert stats.chisquare(observed, expected).pvalue > 1e-3


def _exact_pair_distribution(params, config, prompt):
    def softmax(x):
        x = np.asarray(x, np.float64)
        e = np.exp(x - x.max())
        return e / e.sum()

    p1 = softmax(jaxar.forward(params, np.array([prompt]), config=config)[0][0, -1])
    seqs = np.array([prompt + [t] for t in range(6)])
    logits2 = np.asarray(jaxar.forward(params, seqs, config=config)[0][:, -1])
    return np.concatenate([p1[t] * softmax(logits2[t]) for t in range(6)])


def test_bad_arguments():
    params = jaxar.init_params(TARGET, 0)
    toks, lens = pad_prompts([[1, 2]])
    with pytest.raises(ValueError, match="needs draft_params"):
        speculative_generate(params, toks, lens, config=TARGET, max_new_tokens=2, num_draft=2)
    other = POOR_DRAFT.replace(vocab_size=50)
    with pytest.raises(ValueError, match="share the target's tokenizer"):
        speculative_generate(params, toks, lens, config=TARGET, max_new_tokens=2, num_draft=2,
                             draft_params=jaxar.init_params(other, 0), draft_config=other)
    with pytest.raises(ValueError, match="num_draft must be >= 1"):
        speculative_generate(params, toks, lens, config=TARGET, max_new_tokens=2, num_draft=0, draft="ngram")
    for name, value in (("repetition_penalty", 1.2), ("presence_penalty", 0.5), ("frequency_penalty", 0.5)):
        with pytest.raises(ValueError, match=f"does not support {name}"):
            speculative_generate(params, toks, lens, config=TARGET, max_new_tokens=2, num_draft=2, draft="ngram",
                                 sampling=SamplingConfig(temperature=0.0, **{name: value}))


@pytest.mark.parametrize("draft", ["model", "ngram"])
def test_pallas_verify_kernel_in_the_loop_equals_jnp_acceptance(draft):
    params = jaxar.init_params(TARGET, 0)
    dp = jaxar.init_params(POOR_DRAFT, 1)
    toks, lens = pad_prompts([[1, 2, 3, 1, 2], [4, 5]])
    kw = dict(draft="model", draft_params=dp, draft_config=POOR_DRAFT) if draft == "model" else dict(draft="ngram")
    common = dict(config=TARGET, max_new_tokens=8, num_draft=3, eos_ids=[], sampling=SamplingConfig(temperature=1.0),
                  seed=5, **kw)
    ref = speculative_generate(params, toks, lens, verify_backend="jnp", **common)
    got = speculative_generate(params, toks, lens, verify_backend="pallas", **common)
    np.testing.assert_array_equal(got.tokens, ref.tokens)
    np.testing.assert_array_equal(got.accepted, ref.accepted)


def test_mixed_greedy_and_sampled_rows(setup):
    """Greedy rows of a batch that also samples equal plain greedy; sampled rows equal
    speculative sampling with that setting for every row."""
    params, toks, lens, plain = setup
    rows = [SamplingConfig(temperature=0.0), SamplingConfig(temperature=1.0), SamplingConfig(temperature=0.0),
            SamplingConfig(temperature=1.0)]
    common = dict(config=TARGET, max_new_tokens=12, num_draft=3, eos_ids=[3], draft="ngram", seed=4)
    mixed = speculative_generate(params, toks, lens, sampling=rows, **common)
    sampled = speculative_generate(params, toks, lens, sampling=SamplingConfig(temperature=1.0), **common)
    for b in (0, 2):
        np.testing.assert_array_equal(mixed.tokens[b], plain.tokens[b])
    for b in (1, 3):
        np.testing.assert_array_equal(mixed.tokens[b], sampled.tokens[b])


def test_learned_positions_speculate_up_to_the_context():
    """GPT-2 (learned positions): drafts past the last position are never kept; the
    output up to the full context equals plain greedy."""
    config = jaxar.ModelConfig.gpt2(vocab_size=40, d_model=24, n_layers=2, n_heads=3, mlp_dim=40, max_seq_len=32,
                                    initializer_range=0.3)
    params = jaxar.init_params(config, 2)
    toks, lens = pad_prompts([[1, 2, 3, 1, 2, 3], [4] * 20])
    budgets = [32 - 6, 32 - 20]
    plain = generate(params, toks, lens, config=config, max_new_tokens=26, budgets=budgets, eos_ids=[])
    for kw in (dict(draft="ngram"), dict(draft="model", draft_params=params, draft_config=config)):
        spec = speculative_generate(params, toks, lens, config=config, max_new_tokens=26, budgets=budgets,
                                    num_draft=4, eos_ids=[], **kw)
        np.testing.assert_array_equal(spec.tokens, plain.tokens)
        assert spec.num_tokens.tolist() == budgets
    with pytest.raises(ValueError, match="exceeds the model's context of 32"):
        speculative_generate(params, toks, lens, config=config, max_new_tokens=26, num_draft=2, draft="ngram")
