"""Vector quantiser (jaxar.models.vision.quantize) and the VQ-VAE image tokenizer (jaxar.models.vision.vqvae)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxar.models.vision.quantize import (EMAState, code_distances, code_usage, ema_init, ema_update, nearest_code,
                                          restart_dead_codes, straight_through, vq_losses)


def _random(shape, seed):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


# ---------------------------------------------------------------------------------------------- quantize.py


def test_nearest_code_matches_float64_brute_force_argmin():
    z, codebook = _random((3, 5, 4, 6), 0), _random((17, 6), 1)
    indices, quantized = nearest_code(jnp.asarray(z), jnp.asarray(codebook))
    # [3, 5, 4, 17] exact differences, no expansion trick
    ref_dist = ((z[..., None, :].astype(np.float64) - codebook.astype(np.float64)) ** 2).sum(-1)
    ref = ref_dist.argmin(-1)
    assert indices.dtype == jnp.int32 and indices.shape == (3, 5, 4)
    np.testing.assert_array_equal(np.asarray(indices), ref)
    np.testing.assert_array_equal(np.asarray(quantized), codebook[ref])
    np.testing.assert_allclose(np.asarray(code_distances(jnp.asarray(z), jnp.asarray(codebook))), ref_dist,
                               rtol=1e-5, atol=1e-5)


def test_nearest_code_ties_go_to_the_lowest_index():
    # codes 1, 2 and 4 are the same vector; code 3 is equidistant from z = 0 as code 0 (both at distance 1).
    codebook = np.array([[1.0, 0.0], [5.0, 5.0], [5.0, 5.0], [0.0, -1.0], [5.0, 5.0]], np.float32)
    z = np.array([[0.0, 0.0], [5.0, 5.0], [4.0, 5.0], [0.0, -1.0]], np.float32)
    indices, quantized = nearest_code(jnp.asarray(z), jnp.asarray(codebook))
    assert np.asarray(indices).tolist() == [0, 1, 1, 3]
    np.testing.assert_array_equal(np.asarray(quantized), codebook[[0, 1, 1, 3]])


def test_nearest_code_rejects_mismatched_code_dim():
    with pytest.raises(ValueError, match="code dim"):
        nearest_code(jnp.zeros((2, 3)), jnp.zeros((4, 5)))
    with pytest.raises(ValueError, match=r"\[K, D\]"):
        nearest_code(jnp.zeros((2, 3)), jnp.zeros((4, 5, 3)))


def test_straight_through_forwards_q_and_passes_the_gradient_to_z_unchanged():
    z, q, target = jnp.asarray(_random((4, 3), 2)), jnp.asarray(_random((4, 3), 3)), _random((4, 3), 4)
    weights = _random((4, 3), 5)

    def loss(z, q):  # L(y) = sum w * (y - t)^2 evaluated at y = straight_through(z, q) = q
        return jnp.sum(jnp.asarray(weights) * (straight_through(z, q) - jnp.asarray(target)) ** 2)

    np.testing.assert_allclose(np.asarray(straight_through(z, q)), np.asarray(q), rtol=0, atol=1e-6)
    grad_z, grad_q = jax.grad(loss, argnums=(0, 1))(z, q)
    # hand derivation: dL/dy = 2 w (y - t) at y = q, and dy/dz = identity, dy/dq = 0
    expected = 2.0 * weights.astype(np.float64) * (np.asarray(q, np.float64) - target)
    np.testing.assert_allclose(np.asarray(grad_z), expected, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(grad_q), np.zeros((4, 3)))


def test_vq_losses_match_numpy_and_route_gradients():
    z, q, beta = _random((2, 3, 3, 4), 6), _random((2, 3, 3, 4), 7), 0.25
    losses = vq_losses(jnp.asarray(z), jnp.asarray(q), beta)
    mse = ((z.astype(np.float64) - q) ** 2).mean()
    np.testing.assert_allclose(float(losses.codebook), mse, rtol=1e-6)
    np.testing.assert_allclose(float(losses.commitment), mse, rtol=1e-6)
    np.testing.assert_allclose(float(losses.total), (1 + beta) * mse, rtol=1e-6)
    # codebook term moves only q, commitment term only z: d total/dz = beta * 2 (z - q) / n, d/dq = 2 (q - z) / n
    grad_z, grad_q = jax.grad(lambda a, b: vq_losses(a, b, beta).total, argnums=(0, 1))(jnp.asarray(z),
                                                                                         jnp.asarray(q))
    n = z.size
    np.testing.assert_allclose(np.asarray(grad_z), beta * 2 * (z.astype(np.float64) - q) / n, rtol=1e-5, atol=1e-8)
    np.testing.assert_allclose(np.asarray(grad_q), 2 * (q.astype(np.float64) - z) / n, rtol=1e-5, atol=1e-8)


def test_code_usage_counts_and_perplexity():
    indices = np.array([[0, 0, 1], [3, 3, 3]], np.int32)
    counts, perplexity = code_usage(jnp.asarray(indices), 5)
    assert np.asarray(counts).tolist() == [2, 1, 0, 3, 0]
    p = np.array([2, 1, 3]) / 6
    np.testing.assert_allclose(float(perplexity), np.exp(-(p * np.log(p)).sum()), rtol=1e-6)
    _, uniform = code_usage(jnp.arange(8), 8)
    np.testing.assert_allclose(float(uniform), 8.0, rtol=1e-6)
    _, single = code_usage(jnp.zeros(10, jnp.int32), 8)
    np.testing.assert_allclose(float(single), 1.0, rtol=1e-6)


def _numpy_ema_update(cluster_size, embed_sum, z, indices, decay, eps):
    num_codes = cluster_size.shape[0]
    flat_z, flat_i = z.reshape(-1, z.shape[-1]).astype(np.float64), indices.reshape(-1)
    one_hot = np.eye(num_codes)[flat_i]  # [N, K]
    n = decay * cluster_size + (1 - decay) * one_hot.sum(0)
    m = decay * embed_sum + (1 - decay) * one_hot.T @ flat_z
    total = n.sum()
    smoothed = (n + eps) / (total + num_codes * eps) * total
    return n, m, m / smoothed[:, None]


def test_ema_update_matches_float64_numpy_over_several_steps():
    num_codes, dim, decay, eps = 7, 3, 0.9, 1e-5
    codebook = _random((num_codes, dim), 8)
    state = ema_init(jnp.asarray(codebook))
    np.testing.assert_array_equal(np.asarray(state.cluster_size), np.ones(num_codes))
    ref_n, ref_m = np.ones(num_codes), codebook.astype(np.float64)
    for step in range(3):
        z = _random((2, 4, 4, dim), 10 + step)
        indices, _ = nearest_code(jnp.asarray(z), state.codebook)
        state = ema_update(state, jnp.asarray(z), indices, decay, eps)
        ref_n, ref_m, ref_codebook = _numpy_ema_update(ref_n, ref_m, z, np.asarray(indices), decay, eps)
        np.testing.assert_allclose(np.asarray(state.cluster_size), ref_n, rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(np.asarray(state.embed_sum), ref_m, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(np.asarray(state.codebook), ref_codebook, rtol=1e-5, atol=1e-6)
    # codes never assigned keep their initial vector (size and sum decay together)
    unused = np.asarray(state.cluster_size) < decay ** 3 + 1e-6
    if unused.any():
        np.testing.assert_allclose(np.asarray(state.codebook)[unused], codebook[unused], rtol=1e-4)


def test_ema_update_with_decay_zero_gives_the_cluster_means():
    z = np.array([[1.0, 2.0], [3.0, 4.0], [10.0, 10.0]], np.float32)
    indices = np.array([0, 0, 2], np.int32)
    state = ema_update(ema_init(jnp.zeros((3, 2))), jnp.asarray(z), jnp.asarray(indices), decay=0.0, eps=0.0)
    np.testing.assert_allclose(np.asarray(state.codebook)[[0, 2]], [[2.0, 3.0], [10.0, 10.0]], rtol=1e-6)


def test_restart_dead_codes_replaces_exactly_the_dead_codes_with_batch_latents():
    num_codes, dim = 6, 4
    codebook = _random((num_codes, dim), 20)
    cluster_size = np.array([5.0, 0.1, 2.0, 0.0, 0.99, 1.0], np.float32)
    state = EMAState(jnp.asarray(cluster_size), jnp.asarray(codebook * cluster_size[:, None]), jnp.asarray(codebook))
    z = _random((2, 3, 3, dim), 21)  # 18 latents >= 6 codes: distinct picks
    new, dead = restart_dead_codes(state, jnp.asarray(z), jax.random.PRNGKey(0), threshold=1.0)
    assert np.asarray(dead).tolist() == [False, True, False, True, True, False]
    live = ~np.asarray(dead)
    np.testing.assert_array_equal(np.asarray(new.codebook)[live], codebook[live])
    np.testing.assert_array_equal(np.asarray(new.cluster_size)[live], cluster_size[live])
    np.testing.assert_array_equal(np.asarray(new.embed_sum)[live], np.asarray(state.embed_sum)[live])
    flat_z = z.reshape(-1, dim)
    replaced = np.asarray(new.codebook)[~live]
    rows = [int(np.flatnonzero((flat_z == r).all(-1))[0]) for r in replaced]  # each is some batch latent
    assert len(set(rows)) == len(rows)
    np.testing.assert_array_equal(np.asarray(new.embed_sum)[~live], replaced)
    np.testing.assert_array_equal(np.asarray(new.cluster_size)[~live], np.ones(3))
    # a different key picks (almost surely) different latents; fewer latents than codes still works
    small, dead_small = restart_dead_codes(state, jnp.asarray(z[:1, :1, :2]), jax.random.PRNGKey(1), threshold=1.0)
    for r in np.asarray(small.codebook)[np.asarray(dead_small)]:
        assert (z[0, 0, :2] == r).all(-1).any()
