"""Vector quantiser (jaxar.models.vision.quantize) and the VQ-VAE image tokenizer (jaxar.models.vision.vqvae)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxar.models.vision.quantize import (EMAState, code_distances, code_usage, ema_init, ema_update, nearest_code,
                                          restart_dead_codes, straight_through, vq_losses)


# jitted once per shape: eager dispatch compiles every primitive separately, which dominates these tiny tests
nearest_code_jit = jax.jit(nearest_code)
code_usage_jit = jax.jit(code_usage, static_argnums=1)
ema_update_jit = jax.jit(ema_update, static_argnums=(3, 4))
restart_dead_codes_jit = jax.jit(restart_dead_codes, static_argnums=3)


def _random(shape, seed):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


# ---------------------------------------------------------------------------------------------- quantize.py


def test_nearest_code_matches_float64_brute_force_argmin():
    z, codebook = _random((3, 5, 4, 6), 0), _random((17, 6), 1)
    indices, quantized = nearest_code_jit(jnp.asarray(z), jnp.asarray(codebook))
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

    np.testing.assert_allclose(np.asarray(jax.jit(straight_through)(z, q)), np.asarray(q), rtol=0, atol=1e-6)
    grad_z, grad_q = jax.jit(jax.grad(loss, argnums=(0, 1)))(z, q)
    # hand derivation: dL/dy = 2 w (y - t) at y = q, and dy/dz = identity, dy/dq = 0
    expected = 2.0 * weights.astype(np.float64) * (np.asarray(q, np.float64) - target)
    np.testing.assert_allclose(np.asarray(grad_z), expected, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(grad_q), np.zeros((4, 3)))


def test_vq_losses_match_numpy_and_route_gradients():
    z, q, beta = _random((2, 3, 3, 4), 6), _random((2, 3, 3, 4), 7), 0.25
    losses = jax.jit(vq_losses, static_argnums=2)(jnp.asarray(z), jnp.asarray(q), beta)
    mse = ((z.astype(np.float64) - q) ** 2).mean()
    np.testing.assert_allclose(float(losses.codebook), mse, rtol=1e-6)
    np.testing.assert_allclose(float(losses.commitment), mse, rtol=1e-6)
    np.testing.assert_allclose(float(losses.total), (1 + beta) * mse, rtol=1e-6)
    # codebook term moves only q, commitment term only z: d total/dz = beta * 2 (z - q) / n, d/dq = 2 (q - z) / n
    grad_z, grad_q = jax.jit(jax.grad(lambda a, b: vq_losses(a, b, beta).total, argnums=(0, 1)))(jnp.asarray(z),
                                                                                                 jnp.asarray(q))
    n = z.size
    np.testing.assert_allclose(np.asarray(grad_z), beta * 2 * (z.astype(np.float64) - q) / n, rtol=1e-5, atol=1e-8)
    np.testing.assert_allclose(np.asarray(grad_q), 2 * (q.astype(np.float64) - z) / n, rtol=1e-5, atol=1e-8)


def test_code_usage_counts_and_perplexity():
    indices = np.array([[0, 0, 1], [3, 3, 3]], np.int32)
    counts, perplexity = code_usage_jit(jnp.asarray(indices), 5)
    assert np.asarray(counts).tolist() == [2, 1, 0, 3, 0]
    p = np.array([2, 1, 3]) / 6
    np.testing.assert_allclose(float(perplexity), np.exp(-(p * np.log(p)).sum()), rtol=1e-6)
    _, uniform = code_usage_jit(jnp.arange(8), 8)
    np.testing.assert_allclose(float(uniform), 8.0, rtol=1e-6)
    _, single = code_usage_jit(jnp.zeros(10, jnp.int32), 8)
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
        indices, _ = nearest_code_jit(jnp.asarray(z), state.codebook)
        state = ema_update_jit(state, jnp.asarray(z), indices, decay, eps)
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
    state = ema_update_jit(ema_init(jnp.zeros((3, 2))), jnp.asarray(z), jnp.asarray(indices), 0.0, 0.0)
    np.testing.assert_allclose(np.asarray(state.codebook)[[0, 2]], [[2.0, 3.0], [10.0, 10.0]], rtol=1e-6)


def test_restart_dead_codes_replaces_exactly_the_dead_codes_with_batch_latents():
    num_codes, dim = 6, 4
    codebook = _random((num_codes, dim), 20)
    cluster_size = np.array([5.0, 0.1, 2.0, 0.0, 0.99, 1.0], np.float32)
    state = EMAState(jnp.asarray(cluster_size), jnp.asarray(codebook * cluster_size[:, None]), jnp.asarray(codebook))
    z = _random((2, 3, 3, dim), 21)  # 18 latents >= 6 codes: distinct picks
    new, dead = restart_dead_codes_jit(state, jnp.asarray(z), jax.random.PRNGKey(0), 1.0)
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
    small, dead_small = restart_dead_codes_jit(state, jnp.asarray(z[:1, :1, :2]), jax.random.PRNGKey(1), 1.0)
    for r in np.asarray(small.codebook)[np.asarray(dead_small)]:
        assert (z[0, 0, :2] == r).all(-1).any()


# ---------------------------------------------------------------------------------------------- vqvae.py

from jaxar.models.vision.vqvae import (VQVAE, VQVAEConfig, ema_codebook_step, init_ema_state, loss_fn,  # noqa: E402
                                       to_model_images, to_uint8)

_SMALL = dict(channels=8, codebook_size=32, code_dim=8, num_res_blocks=0)  # parameters do not depend on beta / EMA


@pytest.fixture(scope="module")
def fashion_images():
    from jaxar.train.images import load_image_split
    pixels, _ = load_image_split("fashion_mnist", "test")
    return pixels[:64]


@pytest.fixture(scope="module")
def small_params(fashion_images):
    return jax.jit(VQVAE(VQVAEConfig(**_SMALL)).init)(jax.random.PRNGKey(0), to_model_images(fashion_images[:1]))


@pytest.fixture(scope="module")
def small_outputs(fashion_images, small_params):
    """Everything the next two tests inspect, from one compiled program (eager linen dispatch and one compile per
    test would dominate their time)."""
    images = to_model_images(fashion_images[:8])
    config = VQVAEConfig(**_SMALL, beta=0.5)
    ema_config = dataclasses.replace(config, use_ema=True, ema_decay=0.5)  # same parameters, EMA codebook
    model = VQVAE(config)

    @jax.jit
    def run(params, images):
        out = {"z": model.apply(params, images, method=VQVAE.encode),
               "tokens": model.apply(params, images[..., 0], method=VQVAE.tokens)}  # [B, 28, 28] accepted too
        out["decoded"] = model.apply(params, out["tokens"], method=VQVAE.decode_tokens)
        out["recon"], out["aux"] = model.apply(params, images)
        (out["loss"], out["metrics"]), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, images, config)
        (out["ema_loss"], _), ema_grads = jax.value_and_grad(loss_fn, has_aux=True)(params, images, ema_config)
        out["grad_codebook"] = grads["params"]["codebook"]
        out["ema_grad_codebook"] = ema_grads["params"]["codebook"]
        out["ema_step"] = ema_codebook_step(params, init_ema_state(params), images, ema_config)
        return out

    return images, config, ema_config, run(small_params, images)


def test_vqvae_tokens_are_nearest_codes_of_the_latents_and_decode_to_images(fashion_images, small_params,
                                                                            small_outputs):
    model = VQVAE(VQVAEConfig(**_SMALL))
    params = small_params
    codebook = np.asarray(params["params"]["codebook"], np.float64)
    assert codebook.shape == (32, 8)
    out = small_outputs[3]
    z, tokens, decoded = out["z"], out["tokens"], out["decoded"]
    assert z.shape == (8, 7, 7, 8) and tokens.shape == (8, 7, 7) and tokens.dtype == jnp.int32
    ref = ((np.asarray(z, np.float64)[..., None, :] - codebook) ** 2).sum(-1).argmin(-1)
    np.testing.assert_array_equal(np.asarray(tokens), ref)
    assert 0 <= int(tokens.min()) and int(tokens.max()) < 32
    assert decoded.shape == (8, 28, 28, 1) and decoded.dtype == jnp.float32
    # the forward value of straight_through is the code vector, so a full pass equals decoding the tokens
    np.testing.assert_allclose(np.asarray(out["recon"]), np.asarray(decoded), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(out["aux"]["tokens"]), np.asarray(tokens))
    with pytest.raises(ValueError, match="28, 28"):
        jax.eval_shape(lambda x: model.apply(params, x, method=VQVAE.tokens), jnp.zeros((2, 32, 32, 1)))
    with pytest.raises(ValueError, match="to_model_images"):
        jax.eval_shape(lambda x: model.apply(params, x, method=VQVAE.tokens), jnp.asarray(fashion_images[:2]))
    with pytest.raises(ValueError, match="integer"):
        jax.eval_shape(lambda t: model.apply(params, t, method=VQVAE.decode_tokens), jnp.zeros((2, 7, 7)))


def test_default_config_shapes_and_parameter_count():
    config = VQVAEConfig()  # channels 64, K 512, D 32, one residual block per side
    model = VQVAE(config)
    params = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 28, 28, 1)))
    assert params["params"]["codebook"].shape == (512, 32)
    assert {"enc_res_0", "dec_res_0"} <= set(params["params"])
    num_params = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(params))
    assert 300_000 < num_params < 1_000_000  # small enough to train on a CPU in minutes
    tokens = jax.eval_shape(lambda p, x: model.apply(p, x, method=VQVAE.tokens), params,
                            jax.ShapeDtypeStruct((5, 28, 28, 1), jnp.float32))
    assert tokens.shape == (5, 7, 7) and tokens.dtype == jnp.int32
    decoded = jax.eval_shape(lambda p, t: model.apply(p, t, method=VQVAE.decode_tokens), params,
                             jax.ShapeDtypeStruct((5, 7, 7), jnp.int32))
    assert decoded.shape == (5, 28, 28, 1)
    with pytest.raises(ValueError, match="codebook_size"):
        VQVAEConfig(codebook_size=0)


def test_pixel_conversion_round_trips_uint8():
    pixels = np.arange(256, dtype=np.uint8)[:196].reshape(1, 14, 14).repeat(2, 1).repeat(2, 2)
    images = to_model_images(pixels)
    assert images.shape == (1, 28, 28, 1) and float(images.min()) == -1.0
    np.testing.assert_array_equal(to_uint8(images), pixels)
    np.testing.assert_array_equal(to_uint8(jnp.full((1, 28, 28, 1), 3.0)), np.full((1, 28, 28), 255, np.uint8))


def test_loss_terms_and_codebook_gradient_match_a_numpy_recomputation(small_params, small_outputs):
    params = small_params
    images, config, ema_config, out = small_outputs
    loss, metrics, grad_codebook, recon, aux = (out["loss"], out["metrics"], out["grad_codebook"], out["recon"],
                                                out["aux"])
    ema_loss, ema_grad, ema_step = out["ema_loss"], out["ema_grad_codebook"], out["ema_step"]
    z, q = np.asarray(aux["z"], np.float64), np.asarray(aux["quantized"], np.float64)
    mse = ((np.asarray(recon, np.float64) - np.asarray(images)) ** 2).mean()
    dist = ((z - q) ** 2).mean()
    np.testing.assert_allclose(float(metrics["recon_mse"]), mse, rtol=1e-5)
    np.testing.assert_allclose(float(metrics["codebook_loss"]), dist, rtol=1e-5)
    np.testing.assert_allclose(float(metrics["commitment_loss"]), dist, rtol=1e-5)
    np.testing.assert_allclose(float(loss), mse + (1 + 0.5) * dist, rtol=1e-5)  # mse + codebook + beta * commit
    tokens = np.asarray(aux["tokens"]).reshape(-1)
    assert int(metrics["codes_used"]) == len(np.unique(tokens))
    # only the codebook loss reaches the codes (straight-through gives them no decoder gradient):
    # d/dq_k = sum over latents assigned to k of 2 (q - z) / n; unused codes get exactly 0
    ref = np.zeros((32, 8))
    np.add.at(ref, tokens, 2 * (q - z).reshape(-1, 8) / z.size)
    np.testing.assert_allclose(np.asarray(grad_codebook), ref, rtol=1e-4, atol=1e-7)
    np.testing.assert_array_equal(np.asarray(grad_codebook)[np.setdiff1d(np.arange(32), tokens)], 0.0)
    # EMA codebook: no codebook term in the loss, no gradient to the codes, codes = smoothed EMA cluster means
    np.testing.assert_allclose(float(ema_loss), mse + 0.5 * dist, rtol=1e-5)
    np.testing.assert_array_equal(np.asarray(ema_grad), 0.0)
    new_params, new_state, info = ema_step
    codebook = np.asarray(params["params"]["codebook"], np.float64)
    ref_n, ref_m, ref_codebook = _numpy_ema_update(np.ones(32), codebook, z, tokens, 0.5, ema_config.ema_eps)
    np.testing.assert_allclose(np.asarray(new_state.cluster_size), ref_n, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(new_state.embed_sum), ref_m, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(new_params["params"]["codebook"]), ref_codebook, rtol=1e-5, atol=1e-6)
    assert int(info["dead_codes"]) == 0
    with pytest.raises(ValueError, match="use_ema=True"):
        ema_codebook_step(params, init_ema_state(params), images, config)
    with pytest.raises(ValueError, match="PRNG key"):
        ema_codebook_step(params, init_ema_state(params), images,
                          VQVAEConfig(**_SMALL, use_ema=True, dead_code_threshold=1.0))


def test_adam_steps_on_fashion_mnist_cut_reconstruction_error_and_use_the_codebook(fashion_images, small_params):
    import optax

    config = VQVAEConfig(**_SMALL, use_ema=True, ema_decay=0.9, dead_code_threshold=0.5)
    images = to_model_images(fashion_images)  # [64, 28, 28, 1]
    params = small_params
    optimizer = optax.adam(5e-3)

    @jax.jit
    def step(params, opt_state, ema_state, key):
        (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, images, config)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        params, ema_state, info = ema_codebook_step(params, ema_state, images, config, key)
        return params, opt_state, ema_state, dict(metrics, **info, loss=loss)

    opt_state, ema_state = optimizer.init(params), init_ema_state(params)
    # backend optimisation level 1 (conftest sets 0 for the session): ~2.5x less step time for ~1 s more compile
    compiled = step.lower(params, opt_state, ema_state, jax.random.PRNGKey(0)).compile(
        {"xla_backend_optimization_level": 1})
    history = []
    for i in range(20):
        params, opt_state, ema_state, metrics = compiled(params, opt_state, ema_state, jax.random.PRNGKey(i))
        history.append({k: float(v) for k, v in metrics.items()})
    for h in history:  # EMA mode: no codebook term in the loss
        np.testing.assert_allclose(h["loss"], h["recon_mse"] + 0.25 * h["commitment_loss"], rtol=1e-6)
    first, last = history[0]["recon_mse"], history[-1]["recon_mse"]
    assert last < 0.5 * first, [round(h["recon_mse"], 3) for h in history]  # ~0.69 -> ~0.28 in practice
    # usage: 12 codes in use until dead codes restart from batch latents (step 7), then ~30 of 32, perplexity ~18
    restarted = sum(h["dead_codes"] for h in history)
    usage = [(h["codes_used"], round(h["perplexity"], 1)) for h in history]
    assert restarted > 0 and history[-1]["codes_used"] >= 20 and 10.0 < history[-1]["perplexity"] <= 32.0, usage
    np.testing.assert_allclose(np.asarray(params["params"]["codebook"]), np.asarray(ema_state.codebook))


def test_multiscale_ema_step_moves_both_codebooks_to_float64_numpy_means():
    """With patch_nums the EMA step also moves the multi-scale codebook: to the EMA means of every scale's
    quantizer inputs (checked against tests/test_msvq.py's numpy loop) assigned to each code."""
    cfg = VQVAEConfig(channels=4, codebook_size=8, code_dim=3, use_ema=True, ema_decay=0.5, patch_nums=(1, 3, 7),
                      num_phi=1)
    model = VQVAE(cfg)
    params = jax.jit(model.init)(jax.random.PRNGKey(0), jnp.zeros((1, 28, 28, 1)))
    images = jnp.asarray(_random((4, 28, 28, 1), 5) * 2 - 1, jnp.float32)
    state = jax.jit(init_ema_state)(params)
    new_params, new_state, metrics = jax.jit(ema_codebook_step, static_argnames="config")(params, state, images,
                                                                                          config=cfg)
    z, out = jax.jit(lambda p, x: model.apply(p, x, method=lambda m, x: (lambda f: (f, m.msvq(f)))(m.encode(x))))(
        params, images)
    z = np.asarray(z, np.float64)
    inputs = np.concatenate([np.asarray(x, np.float64).reshape(-1, 3) for x in out.inputs])
    tokens = np.concatenate([np.asarray(t).reshape(-1) for t in out.tokens])
    ms = params["params"]["msvq"]["codebook"]
    _, _, want = _numpy_ema_update(np.ones(8), np.asarray(ms, np.float64), inputs, tokens, 0.5, cfg.ema_eps)
    np.testing.assert_allclose(new_params["params"]["msvq"]["codebook"], want, rtol=1e-5, atol=1e-6)
    vq_tokens = ((z[..., None, :] - np.asarray(params["params"]["codebook"], np.float64)) ** 2).sum(-1).argmin(-1)
    _, _, want_vq = _numpy_ema_update(np.ones(8), np.asarray(params["params"]["codebook"], np.float64), z, vq_tokens,
                                      0.5, cfg.ema_eps)
    np.testing.assert_allclose(new_params["params"]["codebook"], want_vq, rtol=1e-5, atol=1e-6)
    assert set(new_state) == {"vq", "msvq"} and set(metrics) == {"dead_codes", "ms_dead_codes"}
    with pytest.raises(ValueError, match="init_ema_state"):
        ema_codebook_step(params, state["vq"], images, cfg)
