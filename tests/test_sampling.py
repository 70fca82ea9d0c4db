"""Tests for jaxar.decode.sampling against Hugging Face's logits processors."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from jaxar.decode import sampling as S
from jaxar.decode.sampling import SamplingConfig, SamplingParams

torch = pytest.importorskip("torch")
lp = pytest.importorskip("transformers.generation.logits_process")


def _logits(seed, shape, scale=3.0):
    return np.random.default_rng(seed).normal(size=shape).astype(np.float32) * scale


def _hf(proc, logits, input_ids=None):
    scores = torch.from_numpy(np.array(logits, np.float32))
    if input_ids is None:
        input_ids = torch.zeros((scores.shape[0], 1), dtype=torch.long)
    else:
        input_ids = torch.from_numpy(np.asarray(input_ids, np.int64))
    return proc(input_ids, scores.clone()).numpy()


def _assert_same(ours, ref, rtol=1e-6, atol=1e-6):
    ours, ref = np.asarray(ours), np.asarray(ref)
    np.testing.assert_array_equal(np.isneginf(ours), np.isneginf(ref))
    fin = np.isfinite(ref)
    np.testing.assert_allclose(ours[fin], ref[fin], rtol=rtol, atol=atol)


# --------------------------------------------------------------------------- config

def test_config_validate_and_hash():
    cfg = SamplingConfig(temperature=0.7, top_k=5, top_p=0.9, min_p=0.05, repetition_penalty=1.2)
    assert cfg.validate() is cfg
    assert hash(cfg) == hash(SamplingConfig(0.7, np.int64(5), 0.9, 0.05, 1.2))
    assert SamplingConfig(temperature=0).greedy and not cfg.greedy
    bad = [
        (dict(temperature=-0.1), "temperature"),
        (dict(top_k=-1), "top_k"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_p=1.5), "top_p"),
        (dict(min_p=1.0), "min_p"),
        (dict(min_p=-0.1), "min_p"),
        (dict(repetition_penalty=0.0), "repetition_penalty"),
    ]
    for kwargs, word in bad:
        with pytest.raises(ValueError, match=word):
            SamplingConfig(**kwargs).validate()
    with pytest.raises(ValueError, match="top_p"):  # process_logits validates too
        S.process_logits(jnp.zeros((1, 4)), SamplingConfig(top_p=2.0))


def test_config_is_a_jit_static_arg():
    f = jax.jit(S.process_logits, static_argnums=1)
    x = _logits(0, (2, 16))
    np.testing.assert_allclose(f(x, SamplingConfig(temperature=0.5)), x / 0.5, rtol=1e-6)


# --------------------------------------------------------------------------- processors vs HF

@pytest.mark.parametrize("penalty", [0.7, 1.3, 2.0])
def test_repetition_penalty_matches_hf(penalty):
    B, V, L = 4, 50, 12
    x = _logits(1, (B, V))
    ids = np.random.default_rng(2).integers(0, V, size=(B, L))
    ids[:, 3] = ids[:, 5]  # duplicates are penalised once
    lens = np.array([12, 7, 1, 0])
    mask = np.arange(L)[None, :] < lens[:, None]
    ours = np.asarray(S.apply_repetition_penalty(x, ids, mask, penalty))
    proc = lp.RepetitionPenaltyLogitsProcessor(penalty=penalty)
    for b in range(B):
        ref = x[b:b + 1] if lens[b] == 0 else _hf(proc, x[b:b + 1], ids[b:b + 1, :lens[b]])
        _assert_same(ours[b:b + 1], ref)
    # No mask: every token counts; ids >= V are ignored like in HF.
    ids2 = ids.copy()
    ids2[:, 0] = V + 3
    _assert_same(S.apply_repetition_penalty(x, ids2, None, penalty), _hf(proc, x, ids2))


def test_repetition_penalty_broadcasts_over_positions():
    x = _logits(3, (2, 3, 20))
    ids = np.array([[1, 2, 3], [4, 4, 5]])
    ours = S.apply_repetition_penalty(x, ids[:, None, :], None, 1.5)
    for t in range(3):
        np.testing.assert_allclose(ours[:, t], S.apply_repetition_penalty(x[:, t], ids, None, 1.5))


@pytest.mark.parametrize("temperature", [0.3, 1.0, 1.7])
def test_temperature_matches_hf(temperature):
    x = _logits(4, (3, 40))
    _assert_same(S.apply_temperature(x, temperature), _hf(lp.TemperatureLogitsWarper(temperature), x))


@pytest.mark.parametrize("top_k", [1, 5, 39, 40, 100])
def test_top_k_matches_hf(top_k):
    x = _logits(5, (3, 40))
    x[0, :4] = x[0, 4]  # ties with the k-th value are kept
    _assert_same(S.apply_top_k(x, top_k), _hf(lp.TopKLogitsWarper(top_k), x))


@pytest.mark.parametrize("top_p", [0.05, 0.3, 0.8, 0.95, 0.999])
def test_top_p_matches_hf(top_p):
    x = _logits(6, (6, 40), scale=2.0)
    x[1, 10:20] = 0.5  # a block of ties
    _assert_same(S.apply_top_p(x, top_p), _hf(lp.TopPLogitsWarper(top_p), x))


@pytest.mark.parametrize("min_p", [0.01, 0.1, 0.5, 0.9])
def test_min_p_matches_hf(min_p):
    x = _logits(7, (4, 40))
    _assert_same(S.apply_min_p(x, min_p), _hf(lp.MinPLogitsWarper(min_p), x))


@pytest.mark.parametrize(
    "cfg",
    [
        SamplingConfig(temperature=0.7, top_k=10, top_p=0.9, min_p=0.05, repetition_penalty=1.3),
        SamplingConfig(temperature=1.5, top_p=0.6),
        SamplingConfig(temperature=0.5, top_k=3),
        SamplingConfig(temperature=1.0, min_p=0.2, repetition_penalty=0.8),
    ],
)
def test_process_logits_matches_hf_chain(cfg):
    B, V = 4, 64
    x = _logits(8, (B, V))
    ids = np.random.default_rng(9).integers(0, V, size=(B, 10))
    procs = [lp.RepetitionPenaltyLogitsProcessor(cfg.repetition_penalty)] if cfg.repetition_penalty != 1 else []
    procs.append(lp.TemperatureLogitsWarper(cfg.temperature))
    if cfg.top_k:
        procs.append(lp.TopKLogitsWarper(cfg.top_k))
    if cfg.top_p < 1:
        procs.append(lp.TopPLogitsWarper(cfg.top_p))
    if cfg.min_p > 0:
        procs.append(lp.MinPLogitsWarper(cfg.min_p))
    ref = _hf(lp.LogitsProcessorList(procs), x, ids)
    ours = jax.jit(S.process_logits, static_argnums=1)(x, cfg, ids, np.ones_like(ids, bool))
    assert ours.dtype == jnp.float32
    _assert_same(ours, ref, rtol=1e-5, atol=1e-5)
    probs = np.asarray(S.probabilities(x, cfg, ids))
    np.testing.assert_allclose(probs, torch.softmax(torch.from_numpy(ref), -1).numpy(), atol=1e-6)
    lps = S.token_logprobs(x, np.zeros(B, np.int32) + np.argmax(ref, -1), cfg, ids)
    np.testing.assert_allclose(lps, np.log(probs.max(-1)), rtol=1e-5, atol=1e-6)


def test_greedy_is_argmax_after_penalty_only():
    x = _logits(10, (5, 30))
    ids = np.argmax(x, -1)[:, None]  # penalising the argmax can change the winner
    cfg = SamplingConfig(temperature=0.0, top_k=1, repetition_penalty=5.0)
    pen = np.asarray(S.apply_repetition_penalty(x, ids, None, 5.0))
    toks = S.sample(None, x, cfg, ids)
    assert toks.dtype == jnp.int32
    np.testing.assert_array_equal(toks, np.argmax(pen, -1))
    np.testing.assert_array_equal(S.sample(None, x, SamplingConfig(temperature=0)), np.argmax(x, -1))
    np.testing.assert_array_equal(S.probabilities(x, cfg, ids), np.eye(30)[np.argmax(pen, -1)])


# --------------------------------------------------------------------------- sampling

def _chi2_pvalue(draws, probs):
    counts = np.bincount(np.asarray(draws), minlength=len(probs))
    keep = probs > 0
    assert counts[~keep].sum() == 0, "drew a token of probability zero"
    return stats.chisquare(counts[keep], probs[keep] * counts.sum()).pvalue


@pytest.mark.parametrize(
    "cfg",
    [SamplingConfig(), SamplingConfig(temperature=0.6), SamplingConfig(top_k=3),
     SamplingConfig(top_p=0.7), SamplingConfig(min_p=0.2, temperature=1.3)],
)
def test_sample_distribution_chi2(cfg):
    N, V = 20000, 8
    base = np.log(np.array([0.3, 0.2, 0.15, 0.12, 0.1, 0.07, 0.04, 0.02], np.float32))
    logits = np.broadcast_to(base, (N, V))
    keys = S.row_keys(123, N, step=7)
    draws = jax.jit(S.sample, static_argnums=2)(keys, logits, cfg)
    probs = np.asarray(S.probabilities(base[None], cfg))[0].astype(np.float64)
    probs /= probs.sum()
    if cfg.top_k or cfg.top_p < 1 or cfg.min_p:
        assert (probs == 0).any()  # the filters actually filtered something
    assert _chi2_pvalue(draws, probs) > 1e-3


def test_sampling_detects_wrong_distribution():
    # Sanity check of the statistical test itself: a shifted distribution fails.
    N, V = 20000, 8
    base = np.log(np.full(V, 1.0 / V, np.float32))
    draws = S.sample(S.row_keys(1, N), np.broadcast_to(base, (N, V)), SamplingConfig())
    wrong = np.array([0.2] + [0.8 / 7] * 7)
    assert _chi2_pvalue(draws, wrong) < 1e-6


def test_row_keys_make_rows_independent_of_batch():
    V = 50
    logits = _logits(11, (6, V), scale=1.0)
    cfg = SamplingConfig(temperature=1.0)
    keys = S.row_keys(5, 6, step=3)
    full = np.asarray(S.sample(keys, logits, cfg))
    # Row 2 alone, with its own key, draws the same token.
    alone = S.sample(keys[2:3], logits[2:3], cfg)
    assert int(alone[0]) == full[2]
    # Changing other rows' logits does not change row 2.
    other = logits.copy()
    other[[0, 1, 3, 4, 5]] = _logits(12, (5, V))
    assert int(S.sample(keys, other, cfg)[2]) == full[2]
    # Same row index, seed and step give the same key regardless of batch size.
    np.testing.assert_array_equal(jax.random.key_data(S.row_keys(5, 9, 3)[:6]), jax.random.key_data(keys))
    # Different steps give different draws somewhere.
    draws = np.stack([np.asarray(S.sample(S.row_keys(5, 6, s), logits, cfg)) for s in range(8)])
    assert len({tuple(d) for d in draws}) > 1
    # Raw keys and explicit row ids work too.
    raw = S.row_keys(jax.random.PRNGKey(0), 6, 3)
    assert raw.shape == (6, 2) and raw.dtype == jnp.uint32
    S.sample(raw, logits, cfg)
    ids = S.row_keys(5, 2, 3, row_ids=jnp.array([2, 4]))
    np.testing.assert_array_equal(jax.random.key_data(ids), jax.random.key_data(keys[jnp.array([2, 4])]))
    with pytest.raises(ValueError, match="one key per row"):
        S.sample(jax.random.PRNGKey(0), logits, cfg)


def test_sample_under_jit_with_traced_step():
    cfg = SamplingConfig(temperature=0.8, top_k=5)

    @functools.partial(jax.jit, static_argnums=2)
    def step(seed, t, cfg, logits):
        return S.sample(S.row_keys(seed, logits.shape[0], t), logits, cfg)

    x = _logits(13, (3, 20))
    a = step(0, 4, cfg, x)
    b = S.sample(S.row_keys(0, 3, 4), x, cfg)
    np.testing.assert_array_equal(a, b)
    kept = np.asarray(S.process_logits(x, cfg)) > -np.inf
    assert kept[np.arange(3), np.asarray(a)].all()


def test_token_logprobs():
    x = _logits(14, (3, 20))
    toks = np.array([0, 5, 19])
    cfg = SamplingConfig(temperature=0.5)
    ref = jax.nn.log_softmax(x / 0.5, -1)[np.arange(3), toks]
    np.testing.assert_allclose(S.token_logprobs(x, toks, cfg), ref, rtol=1e-6)
    lp_k = np.asarray(S.token_logprobs(x, np.argsort(x, -1)[:, 0], SamplingConfig(top_k=2)))
    assert np.isneginf(lp_k).all()


def test_apply_cfg_formula_and_hf():
    c, u = _logits(15, (2, 30)), _logits(16, (2, 30))
    lc, lu = jax.nn.log_softmax(c, -1), jax.nn.log_softmax(u, -1)
    for scale in (0.0, 1.0, 3.0):
        np.testing.assert_allclose(S.apply_cfg(c, u, scale), lu + scale * (lc - lu), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(S.apply_cfg(c, u, 1.0), lc, atol=1e-5)
    np.testing.assert_allclose(S.apply_cfg(c + 7.0, u - 2.0, 2.0), S.apply_cfg(c, u, 2.0), atol=1e-5)
    # Per-row scales and -inf handling.
    out = S.apply_cfg(c, u, jnp.array([[1.0], [2.0]]))
    np.testing.assert_allclose(out[0], lc[0], atol=1e-5)
    c2 = c.copy()
    c2[0, 3] = -np.inf
    assert np.isneginf(np.asarray(S.apply_cfg(c2, u, 2.0))[0, 3])
    assert np.isfinite(np.asarray(S.apply_cfg(c2, u, 2.0))[1]).all()


# --------------------------------------------------------------------------- per-row traced settings

PER_ROW = [
    SamplingConfig(temperature=0.0, repetition_penalty=1.6),
    SamplingConfig(temperature=0.7, top_k=10, top_p=0.9, min_p=0.05, repetition_penalty=1.3),
    SamplingConfig(temperature=1.5, top_p=0.6),
    SamplingConfig(temperature=0.5, top_k=3),
    SamplingConfig(temperature=1.0, min_p=0.2, repetition_penalty=0.8),
    SamplingConfig(temperature=1.0),
]


def test_per_row_params_equal_each_rows_static_config():
    """SamplingParams rows give bit-for-bit what each row's SamplingConfig gives
    (which the tests above compare with transformers): disabled settings leave a
    row unchanged, greedy rows are only penalised."""
    B, V = len(PER_ROW), 64
    x = _logits(20, (B, V))
    x[2, 10:20] = 0.5  # ties under top-p
    ids = np.random.default_rng(21).integers(0, V, size=(B, 10))
    mask = np.arange(10)[None] < np.array([10, 7, 3, 10, 1, 0])[:, None]
    params = SamplingParams.build(PER_ROW, B)
    f = jax.jit(lambda *a: S.process_logits(*a))
    ours = np.asarray(f(x, params, ids, mask))
    probs = np.asarray(jax.jit(S.probabilities)(x, params, ids, mask))
    keys = S.row_keys(3, B, step=2)
    toks = np.asarray(jax.jit(S.sample)(keys, x, params, ids, mask))
    for b, cfg in enumerate(PER_ROW):
        one = (x[b:b + 1], cfg, ids[b:b + 1], mask[b:b + 1])
        np.testing.assert_array_equal(ours[b], np.asarray(S.process_logits(*one))[0])
        np.testing.assert_array_equal(probs[b], np.asarray(S.probabilities(*one))[0])
        assert toks[b] == int(S.sample(keys[b:b + 1], *one)[0])
    # other values, same program
    f(x, SamplingParams.build([SamplingConfig(temperature=0.3, top_p=0.5)] * B, B), ids, mask)
    assert f._cache_size() == 1


def test_per_row_params_over_positions():
    """[B, T, V] logits (speculative verification) take [B] settings per row."""
    x = _logits(22, (3, 4, 30))
    rows = PER_ROW[1:4]
    ours = np.asarray(S.probabilities(x, SamplingParams.build(rows, 3)))
    for b, cfg in enumerate(rows):
        np.testing.assert_array_equal(ours[b], np.asarray(S.probabilities(x[b], cfg)))


# --------------------------------------------------------------------------- presence / frequency penalties

def test_presence_and_frequency_penalties_match_float64_numpy_over_generated_tokens():
    """OpenAI's rule, logit -= presence * [count > 0] + frequency * count, with counts over the
    generated tokens only (the prompt does not count), after the repetition penalty, per row."""
    B, V, L = 5, 40, 14
    x = _logits(11, (B, V))
    rng = np.random.default_rng(12)
    ids = rng.integers(0, V, size=(B, L))
    ids[:, 9] = ids[:, 8]  # a token generated twice
    ids[:, 7] = ids[:, 1]  # a generated token that is also in the prompt
    prompt_len, seq_len = np.array([3, 1, 5, 2, 4]), np.array([14, 6, 5, 12, 10])
    pos = np.arange(L)[None]
    valid, generated = pos < seq_len[:, None], (pos >= prompt_len[:, None]) & (pos < seq_len[:, None])
    settings = [(0.5, 0.3, 1.0), (-1.0, 0.0, 1.0), (2.0, 1.0, 1.0), (0.0, -0.7, 1.3), (0.0, 0.0, 1.0)]
    rows = [SamplingConfig(temperature=0, presence_penalty=p, frequency_penalty=f, repetition_penalty=r)
            for p, f, r in settings]
    ours = np.asarray(jax.jit(S.process_logits)(x, SamplingParams.build(rows, B), ids, valid, generated))
    for b, (p, f, r) in enumerate(settings):
        ref = x[b].astype(np.float64)
        seen = np.zeros(V, bool)
        seen[ids[b, :seq_len[b]]] = True  # the repetition penalty sees the prompt too
        ref = np.where(seen, np.where(ref < 0, ref * r, ref / r), ref)
        counts = np.bincount(ids[b][generated[b]], minlength=V).astype(np.float64)
        ref = ref - p * (counts > 0) - f * counts
        np.testing.assert_allclose(ours[b], ref, rtol=1e-6, atol=1e-6)
    # a static config gives the same numbers as its per-row form
    single = S.process_logits(x[3:4], rows[3], ids[3:4], valid[3:4], generated[3:4])
    np.testing.assert_array_equal(np.asarray(single)[0], ours[3])
    np.testing.assert_array_equal(ours[4], x[4])  # both off: bit-for-bit unchanged
    # no output mask: nothing counted (speculative callers that do not mark generated tokens)
    np.testing.assert_array_equal(np.asarray(S.process_logits(x[4:], rows[0], ids[4:], valid[4:])), x[4:])


def test_new_penalty_values_reuse_the_compiled_program():
    B, V, L = 2, 16, 6
    x, ids = _logits(3, (B, V)), np.arange(B * L).reshape(B, L) % V
    mask = np.ones((B, L), bool)
    f = jax.jit(lambda logits, params: S.process_logits(logits, params, ids, mask, mask))
    outs = [f(x, SamplingParams.build(SamplingConfig(temperature=0.7, presence_penalty=p, frequency_penalty=q), B))
            for p, q in ((0.0, 0.0), (0.5, 0.2), (-1.0, 2.0))]
    assert f._cache_size() == 1
    assert not np.array_equal(outs[0], outs[1]) and not np.array_equal(outs[1], outs[2])
    with pytest.raises(ValueError, match="presence_penalty must be a finite"):
        SamplingConfig(presence_penalty=float("inf")).validate()
