"""Image metrics (FD, precision/recall, class consistency), the classifier CNN and the picture writers.

References: scipy.linalg.sqrtm for the Frechet distance (pytorch-fid's route), closed forms for commuting
covariances, brute-force numpy for the k-NN precision/recall, float64 numpy for the classifier's head.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import scipy.linalg
from PIL import Image

from jaxar import image_metrics as im
from jaxar.models.vision import classifier as clf


def _gaussian(rng, n, mean, cov):
    return rng.multivariate_normal(mean, cov, size=n)


def _random_cov(rng, d):
    a = rng.normal(size=(d, d))
    return a @ a.T / d + 0.1 * np.eye(d)


# ----------------------------------------------------------------------------------------------- Frechet distance

def test_frechet_distance_matches_scipy_sqrtm_reference():
    rng = np.random.default_rng(0)
    d = 8
    a = _gaussian(rng, 300, np.zeros(d), _random_cov(rng, d))
    b = _gaussian(rng, 200, rng.normal(size=d), _random_cov(rng, d))
    mu_a, mu_b = a.mean(0), b.mean(0)
    s_a, s_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = scipy.linalg.sqrtm(s_a @ s_b).real
    expected = np.sum((mu_a - mu_b) ** 2) + np.trace(s_a) + np.trace(s_b) - 2 * np.trace(covmean)
    assert im.frechet_distance(a, b) == pytest.approx(expected, rel=1e-9)
    assert im.frechet_distance(b, a) == pytest.approx(expected, rel=1e-9)
    mu, sigma = im.feature_statistics(a)
    np.testing.assert_allclose(sigma, s_a, rtol=1e-12)  # unbiased (N - 1), as pytorch-fid's np.cov
    np.testing.assert_allclose(mu, mu_a, rtol=1e-12)


def test_frechet_distance_of_a_set_with_itself_is_zero():
    rng = np.random.default_rng(1)
    a = _gaussian(rng, 100, np.ones(16), _random_cov(rng, 16))
    assert abs(im.frechet_distance(a, a)) < 1e-8
    # fewer samples than dimensions: singular covariances still give a finite, ~0 distance
    few = rng.normal(size=(5, 16))
    assert abs(im.frechet_distance(few, few)) < 1e-8


def test_frechet_distance_closed_form_for_commuting_covariances():
    rng = np.random.default_rng(2)
    d = 6
    q, _ = np.linalg.qr(rng.normal(size=(d, d)))
    lam_a, lam_b = rng.uniform(0.1, 3.0, d), rng.uniform(0.1, 3.0, d)
    mu_a, mu_b = rng.normal(size=d), rng.normal(size=d)
    s_a, s_b = (q * lam_a) @ q.T, (q * lam_b) @ q.T
    expected = np.sum((mu_a - mu_b) ** 2) + np.sum((np.sqrt(lam_a) - np.sqrt(lam_b)) ** 2)
    assert im.frechet_distance_from_statistics(mu_a, s_a, mu_b, s_b) == pytest.approx(expected, rel=1e-10)
    # one-dimensional Gaussians: (m1 - m2)^2 + (sd1 - sd2)^2
    got = im.frechet_distance_from_statistics([1.0], [[4.0]], [-2.0], [[9.0]])
    assert got == pytest.approx(9.0 + 1.0, rel=1e-12)


def test_frechet_distance_errors():
    rng = np.random.default_rng(3)
    with pytest.raises(ValueError, match="feature dimensions differ"):
        im.frechet_distance(rng.normal(size=(10, 4)), rng.normal(size=(10, 5)))
    with pytest.raises(ValueError, match="at least 2"):
        im.frechet_distance(rng.normal(size=(1, 4)), rng.normal(size=(10, 4)))
    with pytest.raises(ValueError, match=r"\[N, D\]"):
        im.frechet_distance(rng.normal(size=(10,)), rng.normal(size=(10, 4)))


# ----------------------------------------------------------------------------------------------- precision / recall

def _brute_precision_recall(real, fake, k):
    def dist(x, y):
        return np.sqrt(np.sum((x[:, None, :] - y[None, :, :]) ** 2, axis=-1))

    real_radii = np.sort(dist(real, real), axis=1)[:, k]
    fake_radii = np.sort(dist(fake, fake), axis=1)[:, k]
    d = dist(fake, real)  # [fake, real]
    precision = np.mean([np.any(d[j] <= real_radii) for j in range(len(fake))])
    recall = np.mean([np.any(d[:, i] <= fake_radii) for i in range(len(real))])
    return precision, recall


@pytest.mark.parametrize("k", [1, 3])
def test_precision_recall_equals_brute_force(monkeypatch, k):
    monkeypatch.setattr(im, "_CHUNK", 7)  # several row blocks, a ragged last one
    rng = np.random.default_rng(4)
    real = rng.normal(size=(40, 5))
    fake = rng.normal(size=(33, 5)) * 1.3 + 0.4
    expected = _brute_precision_recall(real, fake, k)
    assert 0.0 < expected[0] < 1.0 and 0.0 < expected[1] < 1.0  # a case that discriminates
    assert im.precision_recall(real, fake, k=k) == expected
    radii = im.knn_radii(real, k)
    d = np.sqrt(np.sum((real[:, None] - real[None]) ** 2, -1))
    np.testing.assert_allclose(np.sqrt(radii), np.sort(d, axis=1)[:, k], rtol=1e-10)
    assert im.precision_recall(real, fake, k=k, real_radii=radii) == expected  # radii computed once, reused


def test_precision_recall_known_answers():
    rng = np.random.default_rng(5)
    real = rng.normal(size=(50, 4))
    assert im.precision_recall(real, real.copy(), k=3) == (1.0, 1.0)
    far = rng.normal(size=(30, 4)) + 1000.0
    assert im.precision_recall(real, far, k=3) == (0.0, 0.0)
    # 30 real samples plus 20 far outliers: exactly the 30 are inside real balls
    mixed = np.concatenate([real[:30], far[:20]])
    assert im.precision_recall(real, mixed, k=3)[0] == 0.6


def test_precision_recall_errors():
    rng = np.random.default_rng(6)
    with pytest.raises(ValueError, match="at least 4"):
        im.precision_recall(rng.normal(size=(3, 2)), rng.normal(size=(10, 2)), k=3)
    with pytest.raises(ValueError, match="k must be"):
        im.precision_recall(rng.normal(size=(10, 2)), rng.normal(size=(10, 2)), k=0)
    with pytest.raises(ValueError, match="feature dimensions differ"):
        im.precision_recall(rng.normal(size=(10, 2)), rng.normal(size=(10, 3)))


# ----------------------------------------------------------------------------------------------- class consistency

def test_class_consistency_and_per_class():
    labels = np.array([0, 0, 1, 1, 1, 3, 3, 3])
    predicted = np.array([0, 2, 1, 1, 0, 3, 3, 3])
    assert im.class_consistency(predicted, labels) == 6 / 8
    assert im.per_class_consistency(predicted, labels, 4) == [0.5, 2 / 3, None, 1.0]
    with pytest.raises(ValueError, match="one length"):
        im.class_consistency(predicted[:3], labels)


# ----------------------------------------------------------------------------------------------- classifier

_TINY = clf.ClassifierConfig(num_classes=10, channels=4, feature_dim=16, dropout=0.25)


@pytest.fixture(scope="module")
def tiny_classifier():
    params = clf.init_params(_TINY, jax.random.PRNGKey(0))
    rng = np.random.default_rng(7)
    pixels = rng.integers(0, 256, size=(6, 28, 28), dtype=np.uint8)
    labels = np.arange(6, dtype=np.int32) % 10
    return params, pixels, labels


def test_classifier_features_are_the_penultimate_layer(tiny_classifier):
    params, pixels, labels = tiny_classifier
    images = (pixels.astype(np.float32) / 127.5 - 1.0)  # [B, 28, 28]: the channel axis is optional
    eval_fn = jax.jit(lambda p, x, y: (clf.logits(p, x, _TINY), clf.features(p, x, _TINY),
                                       clf.predict(p, x, _TINY), clf.loss_fn(p, x, y, _TINY)))
    out_logits, feats, pred, (loss, metrics) = jax.device_get(eval_fn(params, images, labels))
    assert out_logits.shape == (6, 10) and feats.shape == (6, 16) and pred.shape == (6,)
    assert pred.dtype == np.int32 and np.all(feats >= 0)  # features are after the relu
    head = params["params"]["head"]
    expected = feats.astype(np.float64) @ np.asarray(head["kernel"], np.float64) + np.asarray(head["bias"])
    np.testing.assert_allclose(out_logits, expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(pred, np.argmax(out_logits, axis=-1))
    z = out_logits.astype(np.float64)
    log_probs = z - z.max(-1, keepdims=True) - np.log(np.sum(np.exp(z - z.max(-1, keepdims=True)), -1,
                                                             keepdims=True))
    assert float(loss) == pytest.approx(-np.mean(log_probs[np.arange(6), labels]), rel=1e-5)
    assert float(metrics["accuracy"]) == pytest.approx(np.mean(pred == labels), rel=1e-6)


def test_classifier_training_steps_reduce_the_loss(tiny_classifier):
    params, pixels, labels = tiny_classifier
    images = jnp.asarray(pixels[..., None], jnp.float32) / 127.5 - 1.0
    opt = optax.adam(1e-2)

    @jax.jit
    def step(params, state, rng):
        # the update uses dropout (rng); the loss reported is the eval-mode loss of the incoming params
        eval_loss, _ = clf.loss_fn(params, images, labels, _TINY)
        (_, _), grads = jax.value_and_grad(clf.loss_fn, has_aux=True)(params, images, labels, _TINY, rng)
        updates, state = opt.update(grads, state, params)
        return optax.apply_updates(params, updates), state, eval_loss, grads

    state = opt.init(params)
    losses = []
    for i in range(10):
        params, state, loss, grads = step(params, state, jax.random.PRNGKey(i))
        losses.append(float(loss))
        if i == 0:
            assert all(np.all(np.isfinite(g)) for g in jax.tree_util.tree_leaves(grads))
            assert any(np.any(g != 0) for g in jax.tree_util.tree_leaves(grads))
    assert losses[-1] < 0.7 * losses[0], losses


def test_classifier_errors_and_config(tiny_classifier):
    params = tiny_classifier[0]
    with pytest.raises(ValueError, match=r"images must be \[B, 28, 28\]"):
        clf.logits(params, jnp.zeros((2, 28, 27)), _TINY)
    with pytest.raises(ValueError, match="must be float"):
        clf.logits(params, jnp.zeros((2, 28, 28), jnp.uint8), _TINY)
    with pytest.raises(ValueError, match="labels must be integer"):
        clf.loss_fn(params, jnp.zeros((2, 28, 28)), jnp.zeros((3,), jnp.int32), _TINY)
    with pytest.raises(ValueError, match="dropout must be in"):
        clf.ClassifierConfig(dropout=1.0)
    with pytest.raises(ValueError, match="channels must be"):
        clf.ClassifierConfig(channels=0)
    with pytest.raises(ValueError, match="unknown keys"):
        clf.ClassifierConfig.from_dict({"channels": 8, "width": 3})
    assert clf.ClassifierConfig.from_dict(_TINY.to_dict()) == _TINY


def test_evaluate_samples_pads_batches_and_reports_the_metrics(tiny_classifier):
    params, pixels, labels = tiny_classifier
    rng = np.random.default_rng(8)
    samples = rng.integers(0, 256, size=(7, 28, 28), dtype=np.uint8)
    sample_labels = np.arange(7) % 3
    reference = rng.integers(0, 256, size=(9, 28, 28), dtype=np.uint8)
    feats, pred = im.image_features(params, _TINY, samples, batch_size=4)  # 4 + 3 padded to 4
    direct_logits, direct = clf.Classifier(_TINY).apply(params, jnp.asarray(samples, jnp.float32) / 127.5 - 1.0)
    np.testing.assert_allclose(feats, np.asarray(direct), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(pred, np.argmax(np.asarray(direct_logits), -1))
    ref_feats, _ = im.image_features(params, _TINY, reference, batch_size=4)
    metrics = im.evaluate_samples(params, _TINY, samples, sample_labels, reference, batch_size=4, k=2)
    assert metrics["num_samples"] == 7 and len(metrics["per_class_consistency"]) == 10
    assert metrics["fd"] == pytest.approx(im.frechet_distance(feats, ref_feats), rel=1e-6)
    assert (metrics["precision"], metrics["recall"]) == im.precision_recall(ref_feats, feats, k=2)
    assert metrics["class_consistency"] == im.class_consistency(pred, sample_labels)
    with pytest.raises(ValueError, match="uint8"):
        im.image_features(params, _TINY, samples.astype(np.float32))


# ----------------------------------------------------------------------------------------------- pictures

def test_save_grid_and_pairs_write_pngs_of_the_expected_size(tmp_path):
    rng = np.random.default_rng(9)
    images = rng.integers(0, 256, size=(10, 28, 28), dtype=np.uint8)
    path = im.save_grid(images, tmp_path / "grid.png", rows=3, scale=2)
    with Image.open(path) as png:
        assert png.size == im.grid_size(3, 4, scale=2) == (4 * 58 + 2, 3 * 58 + 2)
        pixels = np.asarray(png)
    # image 5 is row 1, column 1; each pixel drawn 2x2
    top, left = 2 + 58, 2 + 58
    np.testing.assert_array_equal(pixels[top:top + 56:2, left:left + 56:2], images[5])
    np.testing.assert_array_equal(pixels[top + 1:top + 56:2, left + 1:left + 56:2], images[5])

    labels = np.array([2, 0, 2, 0, 0, 1, 2, 2, 1, 0])
    named = im.save_grid(images, tmp_path / "named.png", labels=labels, class_names=[f"c{i}" for i in range(3)])
    with Image.open(named) as png:
        plain_w, plain_h = im.grid_size(3, 4, scale=2)  # 3 labels, at most 4 images each
        assert png.size[1] == plain_h and png.size[0] > plain_w

    pairs = im.save_pairs(images, 255 - images, tmp_path / "pairs.png", columns=4, scale=1)
    with Image.open(pairs) as png:
        assert png.size == im.grid_size(6, 4, scale=1)
        pixels = np.asarray(png)
    np.testing.assert_array_equal(pixels[2:30, 2:30], images[0])
    np.testing.assert_array_equal(pixels[2 + 30:30 + 30, 2:30], 255 - images[0])  # reconstruction below

    curve = im.plot_curve([0, 1, 2], {"raster": [3.0, 2.0, 2.5], "var": [2.0, 1.0, 1.2]}, tmp_path / "fd.png",
                          "guidance scale", "FD", "FD against guidance")
    with Image.open(curve) as png:
        assert png.format == "PNG"
    with pytest.raises(ValueError, match="series 'var' has 2 values"):
        im.plot_curve([0, 1, 2], {"var": [1.0, 2.0]}, tmp_path / "bad.png", "x", "y")
    with pytest.raises(ValueError, match="uint8"):
        im.save_grid(images.astype(np.float32), tmp_path / "bad.png")
