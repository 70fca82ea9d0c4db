"""Image AR models (raster LlamaGen, next-scale VAR) and their jitted CFG samplers.

Tiny models on a tiny random VQ-VAE. Per kind one sampling program (batch 3) is checked several
ways (settings are traced, so each call below reuses it) against one jitted scoring program
(the uncached full-sequence forward) and float64 numpy.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxar.decode import image
from jaxar.decode.sampling import SamplingConfig, SamplingParams, row_keys, sample
from jaxar.models.masks import Mask
from jaxar.models.vision import ar, scales
from jaxar.models.vision.vqvae import VQVAE, VQVAEConfig

K, C = 16, 10
NULL = C
LABELS = np.array([0, 3, NULL], np.int32)  # a null-class row: its guided logits are unconditional
PATCH = (1, 2, 3, 5, 7)


@pytest.fixture(scope="module")
def tokenizer():
    """A random tokenizer (every leaf normal(0, 0.3), built from shapes: no init program to compile)."""
    vq = VQVAEConfig(channels=8, codebook_size=K, code_dim=8, num_res_blocks=0, patch_nums=PATCH, num_phi=2)
    shapes = jax.eval_shape(VQVAE(vq).init, jax.random.PRNGKey(0), jnp.zeros((1, 28, 28, 1)))
    rng = np.random.RandomState(0)
    return vq, jax.tree_util.tree_map(lambda s: jnp.asarray(rng.normal(0, 0.3, s.shape), jnp.float32), shapes)


def random_params(config, seed):
    """Every leaf random (normal * 0.3; norm scales around 1), the adaptive-norm terms included, so
    conditioning and every block matter (init_params zero-initialises AdaLN)."""
    shapes = jax.eval_shape(lambda: ar.init_params(config, 0))
    rng = np.random.RandomState(seed)

    def fill(path, leaf):
        x = rng.normal(0.0, 0.3, leaf.shape).astype(np.float32)
        names = [getattr(p, "key", "") for p in path]
        return jnp.asarray(x + 1.0 if names[-1] == "scale" and "norm" in names[-2] else x)

    return jax.tree_util.tree_map_with_path(fill, shapes)


def make_model(kind, tokenizer):
    cfg = ar.ImageARConfig(kind=kind, codebook_size=K, code_dim=8, patch_nums=PATCH, d_model=32, n_layers=2,
                           n_heads=2, mlp_dim=64, label_dropout=0.3)
    params = random_params(cfg, 1 if kind == "raster" else 2)
    tok = tokenizer if kind == "var" else None

    @jax.jit
    def evaluate(params, tokens, labels, rng):
        """(score with labels, score with the null class, loss_fn, its metrics) in one program."""
        both = ar.score(params, jnp.concatenate([tokens, tokens]),
                        jnp.concatenate([labels, jnp.full_like(labels, NULL)]), cfg, tok)
        cond, uncond = jnp.split(both, 2)
        loss, metrics = ar.loss_fn(params, {"tokens": tokens, "labels": labels}, rng, cfg, tok)
        return cond, uncond, loss, metrics

    sampler = functools.partial(image.sample_tokens, params, config=cfg, tokenizer=tok, return_logits=True)
    return cfg, params, evaluate, sampler


@pytest.fixture(scope="module")
def raster(tokenizer):
    return make_model("raster", tokenizer)


@pytest.fixture(scope="module")
def var(tokenizer):
    return make_model("var", tokenizer)


def log_softmax64(x):
    x = np.asarray(x, np.float64)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def assert_rows_close(got, want, rtol=1e-5):
    """Per row (last axis): |got - want| <= rtol * max|want| of that row (+ a float32 floor)."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert got.shape == want.shape
    bound = rtol * np.maximum(np.abs(want).max(-1, keepdims=True), 1.0)
    assert np.all(np.abs(got - want) <= bound), np.abs(got - want).max()


@pytest.mark.parametrize("kind", ["raster", "var"])
def test_cached_cfg_sampling_equals_full_sequence_scoring(kind, request):
    """The logits each token was sampled from (KV cache; raster one token per step, var one scale per
    step) equal the uncached full-sequence forward of the sampled tokens, mixed by CFG, at s = 1, 0, 2.5."""
    cfg, params, evaluate, sampler = request.getfixturevalue(kind)
    for s in (1.0, 0.0, 2.5):
        tokens, guided = sampler(LABELS, cfg_scale=s, seed=7)
        if s == 1.0:
            programs = image._sample_jit._cache_size()
        assert tokens.shape == (3, cfg.seq_len) and tokens.dtype == jnp.int32
        assert int(tokens.min()) >= 0 and int(tokens.max()) < K
        cond, uncond, _, _ = evaluate(params, tokens, jnp.asarray(LABELS), jax.random.PRNGKey(0))
        c, u = log_softmax64(cond), log_softmax64(uncond)
        assert_rows_close(guided, u + s * (c - u))
    assert image._sample_jit._cache_size() == programs  # a new scale reuses the compiled sampler
    # The null-class row is unconditional whatever the scale; conditioning matters for the others.
    assert_rows_close(guided[2], u[2])
    assert np.abs(c[:2] - u[:2]).max() > 1e-2


@functools.partial(jax.jit, static_argnums=0)
def replay_sampler(cfg, logits, seed):
    """`sampling.sample` with the sampler's documented keys on given logits [3, seq_len, K] (default
    settings), every token in one call: keys [3, seq_len] (raster: row_keys(seed, 3, i) for token i;
    var: row_keys(seed, 3 n_k^2, k) over scale k's tokens row-major)."""
    if cfg.kind == "raster":
        keys = jax.vmap(lambda i: row_keys(seed, 3, i), out_axes=1)(jnp.arange(cfg.seq_len))
    else:
        keys = jnp.concatenate([row_keys(seed, 3 * n * n, k).reshape(3, n * n) for k, n in enumerate(PATCH)], axis=1)
    flat = sample(keys.reshape(-1), logits.reshape(-1, K), SamplingParams.build(SamplingConfig(), keys.size))
    return flat.reshape(3, cfg.seq_len)


@pytest.mark.parametrize("kind", ["raster", "var"])
def test_cfg_scale_zero_is_unconditional_and_one_is_conditional(kind, request):
    cfg, params, evaluate, sampler = request.getfixturevalue(kind)
    labels = jnp.asarray(LABELS)
    uncond_tokens, _ = sampler(labels, cfg_scale=0.0, seed=3)
    null_tokens, _ = sampler(jnp.full_like(labels, NULL), cfg_scale=1.0, seed=3)
    np.testing.assert_array_equal(uncond_tokens, null_tokens)  # token for token
    # Scale 1 = conditional-only sampling: replay the sampler's keys on the conditional logits of
    # the full forward (teacher forced on its own tokens) and draw the same tokens.
    tokens, _ = sampler(labels, cfg_scale=1.0, seed=5)
    assert not np.array_equal(tokens, uncond_tokens)
    cond, _, _, _ = evaluate(params, tokens, labels, jax.random.PRNGKey(0))
    replay = replay_sampler(cfg, cond, np.uint32(5))
    np.testing.assert_array_equal(tokens, replay)


@pytest.mark.parametrize("kind", ["raster", "var"])
def test_greedy_sampling_is_argmax_of_scoring(kind, request):
    cfg, params, evaluate, sampler = request.getfixturevalue(kind)
    tokens, _ = sampler(LABELS, cfg_scale=1.0, temperature=0.0, seed=0)
    cond, _, _, _ = evaluate(params, tokens, jnp.asarray(LABELS), jax.random.PRNGKey(0))
    np.testing.assert_array_equal(tokens, np.argmax(np.asarray(cond), axis=-1))
    programs = image._sample_jit._cache_size()
    again, _ = sampler(LABELS, cfg_scale=1.0, temperature=0.0, seed=99)  # greedy ignores the seed
    np.testing.assert_array_equal(tokens, again)
    top1, _ = sampler(LABELS, cfg_scale=1.0, temperature=0.7, top_k=1, seed=1)  # top-k 1 is greedy
    np.testing.assert_array_equal(top1, tokens)
    nucleus, _ = sampler(LABELS, cfg_scale=1.0, temperature=1.0, top_p=1e-4, seed=2)  # so is a tiny top-p
    np.testing.assert_array_equal(nucleus, tokens)
    assert image._sample_jit._cache_size() == programs  # new settings reuse the compiled sampler


def test_linear_schedule_ramps_from_conditional_to_the_scale():
    got = [float(image.guidance_scale(3.0, i, 5, "linear")) for i in range(5)]
    np.testing.assert_allclose(got, [1.0, 1.5, 2.0, 2.5, 3.0], rtol=1e-6)
    assert float(image.guidance_scale(3.0, 2, 5, "constant")) == 3.0


def test_var_block_causal_mask_equals_dense_reference():
    ids = scales.scale_ids(PATCH)
    L = len(ids)
    ref = np.zeros((L, L), bool)
    starts = scales.scale_starts(PATCH)
    for k in range(len(PATCH)):  # a query of scale k sees every key of scales 0..k
        ref[starts[k]:starts[k + 1], :starts[k + 1]] = True
    got = Mask.block_causal(jnp.broadcast_to(jnp.asarray(ids), (2, L))).dense(2, L)
    np.testing.assert_array_equal(np.asarray(got), np.broadcast_to(ref, (2, L, L)))


def test_var_scoring_is_block_causal_by_scale(var):
    """Changing the tokens of scale k changes the logits of later scales only."""
    cfg, params, evaluate, _ = var
    starts = scales.scale_starts(PATCH)
    rng = np.random.RandomState(0)
    tokens = rng.randint(0, K, (3, cfg.seq_len)).astype(np.int32)
    changed = tokens.copy()
    k = 2
    changed[:, starts[k]:starts[k + 1]] = (changed[:, starts[k]:starts[k + 1]] + 1) % K
    a = np.asarray(evaluate(params, tokens, jnp.asarray(LABELS), jax.random.PRNGKey(0))[0])
    b = np.asarray(evaluate(params, changed, jnp.asarray(LABELS), jax.random.PRNGKey(0))[0])
    np.testing.assert_array_equal(a[:, :starts[k + 1]], b[:, :starts[k + 1]])  # scales 0..k: inputs unchanged
    assert np.abs(a[:, starts[k + 1]:] - b[:, starts[k + 1]:]).min(axis=-1).max() > 0


@pytest.mark.parametrize("kind", ["raster", "var"])
def test_loss_is_float64_cross_entropy_of_scoring(kind, request):
    cfg, params, evaluate, _ = request.getfixturevalue(kind)
    rng = np.random.RandomState(1)
    tokens = jnp.asarray(rng.randint(0, K, (3, cfg.seq_len)), jnp.int32)
    labels = jnp.asarray([1, 2, 9], jnp.int32)
    key = jax.random.PRNGKey(4)
    dropped = ar.drop_labels(labels, key, cfg.label_dropout, C)
    _, _, loss, metrics = evaluate(params, tokens, labels, key)
    cond, _, _, _ = evaluate(params, tokens, dropped, jax.random.PRNGKey(0))  # scores with the dropped labels
    logp = log_softmax64(cond)
    want = -np.take_along_axis(logp, np.asarray(tokens)[..., None], axis=-1).mean()
    np.testing.assert_allclose(float(loss), want, rtol=1e-5)
    acc = (np.argmax(np.asarray(cond), -1) == np.asarray(tokens)).mean()
    np.testing.assert_allclose(float(metrics["accuracy"]), acc, rtol=1e-6)


def test_label_dropout_rate():
    labels = jnp.asarray(np.arange(20000) % C, jnp.int32)
    out = np.asarray(ar.drop_labels(labels, jax.random.PRNGKey(0), 0.1, C))
    dropped = out == NULL
    np.testing.assert_array_equal(out[~dropped], np.asarray(labels)[~dropped])
    sigma = np.sqrt(0.1 * 0.9 / labels.size)
    assert abs(dropped.mean() - 0.1) < 4 * sigma
    np.testing.assert_array_equal(np.asarray(ar.drop_labels(labels, jax.random.PRNGKey(0), 0.0, C)), labels)


def test_errors_are_one_line(tokenizer):
    raster_cfg = ar.ImageARConfig(kind="raster", codebook_size=K, d_model=32, n_layers=1, n_heads=2, mlp_dim=64)
    var_cfg = raster_cfg.__class__(**{**raster_cfg.to_dict(), "kind": "var", "code_dim": 8})
    params = jax.eval_shape(lambda: ar.init_params(raster_cfg, 0))
    cases = [
        (lambda: image.sample_tokens(params, [0, 11], config=raster_cfg), "label 11 out of range"),
        (lambda: image.sample_tokens(params, [-1], config=raster_cfg), "label -1 out of range"),
        (lambda: ar.score(params, np.zeros((2, 48), np.int32), [0, 1], raster_cfg), "tokens must be int [batch, 49]"),
        (lambda: ar.score(params, np.zeros((2, 49), np.int32), [0, 1, 2], raster_cfg), "one label per row"),
        (lambda: ar.score(params, np.full((1, 49), K, np.int32), [0], raster_cfg), "token 16 out of range"),
        (lambda: ar.score(params, np.zeros((1, 88), np.int32), [0], var_cfg), "needs tokenizer="),
        (lambda: image.sample_tokens(params, [0], config=var_cfg), "needs tokenizer="),
        (lambda: image.sample_tokens(params, [0], config=raster_cfg, cfg_schedule="cosine"), "cfg_schedule"),
        (lambda: ar.ImageARConfig(kind="diffusion"), "kind='diffusion' is not supported"),
        (lambda: ar.ImageARConfig.from_dict({"kind": "var", "depth": 3}), "unknown image model config keys"),
        (lambda: ar.score(params, np.zeros((1, 88), np.int32), [0],
                          ar.ImageARConfig(kind="var", codebook_size=K, code_dim=4), tokenizer),
         "code_dim"),
    ]
    for fn, text in cases:
        with pytest.raises(ValueError) as err:
            fn()
        assert text in str(err.value) and "\n" not in str(err.value), str(err.value)
    assert ar.ImageARConfig.from_dict(var_cfg.to_dict()) == var_cfg
    assert (raster_cfg.seq_len, var_cfg.seq_len) == (49, 88)


def test_encode_and_decode_images(var, tokenizer):
    cfg = var[0]
    vq, vq_params = tokenizer
    pixels = np.random.RandomState(0).randint(0, 256, (3, 28, 28)).astype(np.uint8)
    tokens = ar.encode_tokens(cfg, vq, vq_params, pixels, batch_size=2)  # two batches, the last one padded
    assert tokens.shape == (3, cfg.seq_len) and tokens.dtype == np.int32 and 0 <= tokens.min() and tokens.max() < K
    np.testing.assert_array_equal(ar.encode_tokens(cfg, vq, vq_params, pixels[1:], batch_size=2), tokens[1:])
    assert len(np.unique(tokens)) > 3
    images = image.decode_images(tokens, config=cfg, tokenizer=tokenizer)
    assert images.shape == (3, 28, 28) and images.dtype == np.uint8
