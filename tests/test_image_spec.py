"""Speculative decoding of raster image models (SJD, MC-SJD, a draft image model; exact and relaxed acceptance).

References: plain raster decoding (`image.sample_tokens`) for greedy outputs; the exact distribution of a
tiny-vocabulary model enumerated in float64 from the uncached full-sequence forward (`ar.score`) for the
chi-squared tests; each row decoded alone for ragged batches.
"""

import itertools
import types

import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from jaxar.decode import image, image_spec, relaxed
from jaxar.decode.acceptance import accept_from_randomness, first_argmax
from jaxar.models.vision import ar

from tests.test_image_ar import random_params

K = 16
CFG = ar.ImageARConfig(kind="raster", codebook_size=K, patch_nums=(7,), d_model=32, n_layers=2, n_heads=2,
                       mlp_dim=64, num_classes=10)
DRAFT_CFG = ar.ImageARConfig(kind="raster", codebook_size=K, patch_nums=(7,), d_model=16, n_layers=1, n_heads=1,
                             mlp_dim=32, num_classes=10)
LABELS = np.array([0, 3, 10, 5, 9], np.int32)  # 10: the null class (unconditional rows)


@pytest.fixture(scope="module")
def models():
    params = random_params(CFG, 1)
    draft = types.SimpleNamespace(params=random_params(DRAFT_CFG, 4), config=DRAFT_CFG)
    codebook = np.random.RandomState(0).normal(size=(K, 4)).astype(np.float32)
    return params, draft, codebook


def spec(params, labels, decode, draft=None, config=CFG, **kw):
    return image_spec.speculative_image_tokens(params, labels, config=config, decode=decode, draft_run=draft, **kw)


# Settings are traced: the greedy, ragged and relaxed tests share these programs (window, init and rule are static).
WINDOW = {"sjd": 5, "mcsjd": 5, "draft": 3}
INIT = {"sjd": "random", "mcsjd": "previous", "draft": "random"}


@pytest.mark.parametrize("decode,schedule", [("sjd", "constant"), ("sjd", "linear"), ("mcsjd", "constant"),
                                             ("draft", "constant")])
def test_greedy_equals_greedy_raster_decoding(models, decode, schedule):
    window, init = WINDOW[decode], INIT[decode]
    params, draft, _ = models
    plain = image.sample_tokens(params, LABELS, config=CFG, cfg_scale=2.0, cfg_schedule=schedule, temperature=0.0)
    toks, st = spec(params, LABELS, decode, draft, window=window, jacobi_init=init, cfg_scale=2.0,
                    cfg_schedule=schedule, temperature=0.0)
    np.testing.assert_array_equal(np.asarray(toks), np.asarray(plain))
    rounds, accepted = np.asarray(st.rounds), np.asarray(st.accepted)
    # every round emits its accepted drafts and one more code (the last round may be cut at the image's end)
    assert np.all((rounds + accepted >= CFG.seq_len) & (rounds + accepted <= CFG.seq_len + 1))
    assert np.all(rounds <= CFG.seq_len) and np.all(np.asarray(st.tv) == 0)
    assert int(st.draft_forwards) == (window * int(rounds.max()) if decode == "draft" else 0)


@pytest.mark.parametrize("decode", ["sjd", "mcsjd", "draft"])
def test_ragged_rows_equal_each_row_decoded_alone(models, decode):
    params, draft, _ = models
    kw = dict(window=WINDOW[decode], jacobi_init=INIT[decode], cfg_scale=2.0, temperature=1.0, seed=7)
    toks, st = spec(params, LABELS, decode, draft, **kw)
    rounds = np.asarray(st.rounds)
    assert len(set(rounds.tolist())) > 1  # the rows really took different numbers of rounds
    for b in range(len(LABELS)):
        alone, st1 = spec(params, LABELS[b:b + 1], decode, draft, row_ids=[b], **kw)
        np.testing.assert_array_equal(np.asarray(alone)[0], np.asarray(toks)[b])
        assert int(st1.rounds[0]) == rounds[b] and int(st1.accepted[0]) == int(st.accepted[b])


@pytest.mark.parametrize("accept", ["lantern:3,0", "gsd:0"])
def test_relaxed_rules_with_zero_budget_equal_the_exact_rule(models, accept):
    params, draft, codebook = models
    kw = dict(window=WINDOW["mcsjd"], jacobi_init=INIT["mcsjd"], cfg_scale=2.0, temperature=1.0, seed=3)
    exact, st = spec(params, LABELS, "mcsjd", **kw)
    relaxed_toks, st_r = spec(params, LABELS, "mcsjd", accept=accept, codebook=codebook, **kw)
    np.testing.assert_array_equal(np.asarray(relaxed_toks), np.asarray(exact))
    np.testing.assert_array_equal(np.asarray(st_r.rounds), np.asarray(st.rounds))


def test_lantern_stays_within_its_budget_and_accepts_more(models):
    params, draft, codebook = models
    delta, rounds, rounds_r = 0.2, [], []
    for seed in range(4):
        kw = dict(window=WINDOW["sjd"], cfg_scale=2.0, temperature=1.0, seed=seed)
        rounds.append(np.asarray(spec(params, LABELS, "sjd", **kw)[1].rounds))
        _, st_r = spec(params, LABELS, "sjd", accept=f"lantern:3,{delta}", codebook=codebook, **kw)
        tv, acc = np.asarray(st_r.tv), np.asarray(st_r.accepted)
        assert np.all(tv <= delta * acc + 1e-5) and tv.sum() > 0
        rounds_r.append(np.asarray(st_r.rounds))
    assert np.mean(rounds_r) < np.mean(rounds)


# --- exactness: chi-squared over every image of a tiny model (K = 3 codes, 2x2 images: 81 cells) -------------

TINY = ar.ImageARConfig(kind="raster", codebook_size=3, patch_nums=(2,), d_model=16, n_layers=2, n_heads=2,
                        mlp_dim=32, num_classes=2)
TINY_DRAFT = ar.ImageARConfig(kind="raster", codebook_size=3, patch_nums=(2,), d_model=8, n_layers=1, n_heads=1,
                              mlp_dim=16, num_classes=2)
ROWS = 6000
SCALE = 1.5


@pytest.fixture(scope="module")
def tiny():
    params = random_params(TINY, 2)
    seqs = np.array(list(itertools.product(range(3), repeat=4)), np.int32)  # [81, 4]
    cond = np.asarray(ar.score(params, seqs, np.full(81, 1, np.int32), TINY), np.float64)
    uncond = np.asarray(ar.score(params, seqs, np.full(81, TINY.null_class, np.int32), TINY), np.float64)

    def log_softmax(x):
        x = x - x.max(-1, keepdims=True)
        return x - np.log(np.exp(x).sum(-1, keepdims=True))

    c, u = log_softmax(cond), log_softmax(uncond)
    logp = log_softmax(u + SCALE * (c - u))  # [81, 4, 3]
    probs = np.exp(np.take_along_axis(logp, seqs[..., None], axis=-1)[..., 0].sum(-1))
    draft = types.SimpleNamespace(params=random_params(TINY_DRAFT, 5), config=TINY_DRAFT)
    return params, draft, probs


def _cells(tokens):
    t = np.asarray(tokens)
    return np.bincount(((t[:, 0] * 3 + t[:, 1]) * 3 + t[:, 2]) * 3 + t[:, 3], minlength=81)


def _broken_accept(rule, tables, p, q, drafts, u, e):
    """The exact rule, except that a rejection resamples from p instead of the residual norm(max(0, p - q))."""
    n, x = accept_from_randomness(p, q, drafts, u, e)
    take = lambda a: jnp.take_along_axis(a, n[:, None, None], axis=1)[:, 0]  # noqa: E731
    x = jnp.where(n < drafts.shape[1], first_argmax(take(p) / take(e)), x)
    return n, x, jnp.zeros(drafts.shape, jnp.float32)


@pytest.mark.parametrize("decode", ["sjd", "mcsjd", "draft"])
def test_exact_rules_keep_the_model_distribution(tiny, decode, monkeypatch):
    params, draft, probs = tiny
    np.testing.assert_allclose(probs.sum(), 1.0, rtol=1e-6)
    kw = dict(window=3, cfg_scale=SCALE, temperature=1.0, seed=11)
    toks, st = spec(params, np.full(ROWS, 1, np.int32), decode, draft, config=TINY, **kw)
    assert np.asarray(st.rounds).mean() < 4  # drafts were accepted: the test exercises acceptance
    assert stats.chisquare(_cells(toks), probs * ROWS).pvalue > 1e-3
    if decode != "sjd":
        return
    # a deliberately broken rule (a different batch size: a fresh trace picks up the patched rule) fails
    monkeypatch.setattr(relaxed, "relaxed_accept", _broken_accept)
    bad, _ = spec(params, np.full(ROWS + 1, 1, np.int32), decode, draft, config=TINY, **kw)
    assert stats.chisquare(_cells(bad), probs * (ROWS + 1)).pvalue < 1e-6


def test_plain_sampler_on_the_same_cells_passes(tiny):
    """The chi-squared setup itself: plain raster sampling matches the enumerated distribution."""
    params, _, probs = tiny
    toks = image.sample_tokens(params, np.full(ROWS, 1, np.int32), config=TINY, cfg_scale=SCALE, seed=2)
    assert stats.chisquare(_cells(toks), probs * ROWS).pvalue > 1e-3


def test_bad_arguments(models):
    params, draft, codebook = models
    with pytest.raises(ValueError, match="use plain, sjd, mcsjd or draft:DIR"):
        image_spec.parse_decode("jacobi")
    assert image_spec.parse_decode("draft:runs/x") == ("draft", "runs/x")
    with pytest.raises(ValueError, match="window must be >= 1"):
        spec(params, LABELS, "sjd", window=0)
    with pytest.raises(ValueError, match="needs the tokenizer's codebook"):
        spec(params, LABELS, "sjd", accept="lantern:3,0.1")
    var = ar.ImageARConfig(kind="var", codebook_size=K, patch_nums=(1, 2), d_model=16, n_layers=1, n_heads=1,
                           mlp_dim=16)
    with pytest.raises(ValueError, match="for raster models"):
        spec(params, LABELS, "sjd", config=var)
    other = types.SimpleNamespace(params=draft.params, config=DRAFT_CFG.__class__(
        kind="raster", codebook_size=8, patch_nums=(7,), d_model=16, n_layers=1, n_heads=1, mlp_dim=32))
    with pytest.raises(ValueError, match="codebook_size 8 != the target's 16"):
        spec(params, LABELS, "draft", other)
