"""VAR's multi-scale residual quantizer (jaxar.models.vision.msvq) and its scale helpers (scales.py),
against plain float64 numpy reimplementations written here from the definitions."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxar.models.vision import scales
from jaxar.models.vision.msvq import MultiScaleVQ, phi_index

# --- numpy float64 references -----------------------------------------------------------------


def np_area(x, n, fractional=False):
    """[B, H, W, C] -> [B, n, n, C]: adaptive average pooling window by window (or box-filter overlaps)."""
    b, height, width, c = x.shape
    out = np.zeros((b, n, n, c))
    for i in range(n):
        for j in range(n):
            if not fractional:
                r0, r1 = math.floor(i * height / n), math.ceil((i + 1) * height / n)
                c0, c1 = math.floor(j * width / n), math.ceil((j + 1) * width / n)
                out[:, i, j] = x[:, r0:r1, c0:c1].mean(axis=(1, 2))
                continue
            total = 0.0
            for r in range(height):
                for s in range(width):
                    wr = max(0.0, min(r + 1, (i + 1) * height / n) - max(r, i * height / n))
                    ws = max(0.0, min(s + 1, (j + 1) * width / n) - max(s, j * width / n))
                    out[:, i, j] += wr * ws * x[:, r, s]
                    total += wr * ws
            out[:, i, j] /= total
    return out


def keys_cubic(d, a=-0.75):
    d = abs(d)
    if d <= 1:
        return (a + 2) * d**3 - (a + 3) * d**2 + 1
    if d < 2:
        return a * d**3 - 5 * a * d**2 + 8 * a * d - 4 * a
    return 0.0


def np_bicubic(x, size):
    """[B, h, w, C] -> [B, size, size, C]: half-pixel centres, 4x4 taps, border taps clamped."""
    b, height, width, c = x.shape
    if height == width == size:
        return x.copy()
    out = np.zeros((b, size, size, c))
    for oy in range(size):
        sy = (oy + 0.5) * height / size - 0.5
        for ox in range(size):
            sx = (ox + 0.5) * width / size - 0.5
            for ty in range(math.floor(sy) - 1, math.floor(sy) + 3):
                for tx in range(math.floor(sx) - 1, math.floor(sx) + 3):
                    w = keys_cubic(sy - ty) * keys_cubic(sx - tx)
                    out[:, oy, ox] += w * x[:, min(max(ty, 0), height - 1), min(max(tx, 0), width - 1)]
    return out


def np_conv3x3_same(x, kernel, bias):
    """Cross-correlation, zero padding 1: [B, H, W, Cin] x [3, 3, Cin, Cout] -> [B, H, W, Cout]."""
    b, height, width, _ = x.shape
    padded = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    out = np.zeros((b, height, width, kernel.shape[-1])) + bias
    for dy in range(3):
        for dx in range(3):
            out += padded[:, dy : dy + height, dx : dx + width] @ kernel[dy, dx]
    return out


def np_msvq(f, codebook, phis, phi_of_scale, patch_nums, ratio):
    """The residual quantizer loop in float64. phis: list of (kernel, bias) or None for identity.

    Returns tokens, the running f_hat after every scale, and the smallest gap between the best and
    second-best code distance (how far the fixed inputs are from an argmin tie)."""
    side = patch_nums[-1]
    residual, f_hat = f.copy(), np.zeros_like(f)
    tokens, partial, gap, inputs = [], [], np.inf, []
    for k, n in enumerate(patch_nums):
        z = np_area(residual, n) if n != side else residual
        inputs.append(z)
        dist = ((z[..., None, :] - codebook) ** 2).sum(-1)  # [B, n, n, K]
        idx = dist.argmin(-1)
        gap = min(gap, float(np.diff(np.sort(dist, axis=-1)[..., :2], axis=-1).min()))
        h = np_bicubic(codebook[idx], side)
        if phis is not None:
            kernel, bias = phis[phi_of_scale[k]]
            h = h * (1 - ratio) + np_conv3x3_same(h, kernel, bias) * ratio
        f_hat = f_hat + h
        residual = residual - h
        tokens.append(idx)
        partial.append(f_hat.copy())
    np_msvq.inputs = inputs  # the quantizer input of every scale (what the EMA codebook averages)
    return tokens, partial, gap


# --- fixtures -----------------------------------------------------------------------------------

PATCH_NUMS = (1, 2, 3, 5)  # 5 -> 2 and 5 -> 3 are non-integer ratios
B, D, K = 2, 3, 12


def _model_and_params(quant_resi=0.5, num_phi=2, codebook=None, seed=0):
    """The module and fixed parameters of the structure its init makes (filled here, not by the init's RNG)."""
    model = MultiScaleVQ(codebook_size=K if codebook is None else codebook.shape[0], dim=D, patch_nums=PATCH_NUMS,
                         quant_resi=quant_resi, num_phi=num_phi)
    shapes = jax.eval_shape(model.init, jax.random.PRNGKey(seed), jnp.zeros((1, 5, 5, D)))
    rng = np.random.default_rng(seed)
    params = jax.tree_util.tree_map(lambda s: jnp.asarray(rng.standard_normal(s.shape) * 0.3, jnp.float32), shapes)
    if codebook is None:  # codes on the latents' scale, so every scale uses several of them
        codebook = rng.standard_normal((K, D)) * 0.8
    params["params"]["codebook"] = jnp.asarray(codebook, jnp.float32)
    return model, params


def _latent(seed=1, side=5):
    return np.random.default_rng(seed).standard_normal((B, side, side, D)).astype(np.float32)


def _phis_of(params, count):
    return [(np.asarray(params["params"][f"phis_{i}"]["conv"]["kernel"], np.float64),
             np.asarray(params["params"][f"phis_{i}"]["conv"]["bias"], np.float64)) for i in range(count)]


# --- scales.py ---------------------------------------------------------------------------------


@pytest.mark.parametrize("fractional", [False, True])
def test_area_downsample_matches_numpy_window_average(fractional):
    x = np.random.default_rng(0).standard_normal((2, 7, 7, 3))
    for n in (1, 2, 3, 4, 5, 6, 7):  # the float64 matrices at every size, the jax function at non-integer ratios
        mat = scales.area_matrix(7, n, fractional)
        np.testing.assert_allclose(np.einsum("ph,qw,bhwc->bpqc", mat, mat, x), np_area(x, n, fractional), atol=1e-12)
    for n in (3, 5):
        got = np.asarray(scales.area_downsample(jnp.asarray(x, jnp.float32), n, fractional=fractional))
        np.testing.assert_allclose(got, np_area(x, n, fractional), atol=1e-6, rtol=0)
    # the two weightings agree exactly for integer ratios and differ otherwise (7 -> 3: rows {0,1,2} vs 0,1,1/3)
    np.testing.assert_allclose(scales.area_matrix(6, 3), scales.area_matrix(6, 3, fractional=True))
    np.testing.assert_allclose(scales.area_matrix(7, 3)[0], [1 / 3, 1 / 3, 1 / 3, 0, 0, 0, 0])
    np.testing.assert_allclose(scales.area_matrix(7, 3, fractional=True)[0], [3 / 7, 3 / 7, 1 / 7, 0, 0, 0, 0])


def test_upsample_matches_numpy_bicubic():
    rng = np.random.default_rng(1)
    for n in (1, 2, 3, 4, 5, 6, 7):
        x = rng.standard_normal((2, n, n, 3))
        mat = scales.bicubic_matrix(n, 7)
        np.testing.assert_allclose(np.einsum("ph,qw,bhwc->bpqc", mat, mat, x), np_bicubic(x, 7), atol=1e-12)
        if n in (1, 3, 5):
            got = np.asarray(scales.upsample(jnp.asarray(x, jnp.float32), 7))
            np.testing.assert_allclose(got, np_bicubic(x, 7), atol=1e-5, rtol=0)
    # interpolation of a constant is that constant; rows of the matrices are partitions of unity
    for n in (2, 3, 5):
        np.testing.assert_allclose(scales.bicubic_matrix(n, 7).sum(1), 1.0, atol=1e-12)


def test_resamplers_equal_torch_interpolate():
    torch = pytest.importorskip("torch")
    functional = torch.nn.functional
    x = np.random.default_rng(2).standard_normal((1, 7, 7, 2))
    nchw = torch.tensor(x).permute(0, 3, 1, 2)
    for n in (3, 5):
        area = functional.interpolate(nchw, size=(n, n), mode="area").permute(0, 2, 3, 1).numpy()
        np.testing.assert_allclose(scales.area_matrix(7, n) @ x[0, :, :, 0] @ scales.area_matrix(7, n).T,
                                   area[0, :, :, 0], atol=1e-12)
        small = torch.tensor(area).permute(0, 3, 1, 2)
        up = functional.interpolate(small, size=(7, 7), mode="bicubic", align_corners=False)
        np.testing.assert_allclose(scales.bicubic_matrix(n, 7) @ area[0, :, :, 0] @ scales.bicubic_matrix(n, 7).T,
                                   up.permute(0, 2, 3, 1).numpy()[0, :, :, 0], atol=1e-12)


def test_scale_ids_num_tokens_and_flattening():
    np.testing.assert_array_equal(scales.scale_ids((1, 2, 3)), [0] + [1] * 4 + [2] * 9)
    assert scales.scale_ids((1, 2, 3)).dtype == np.int32
    assert scales.num_tokens((1, 2, 3)) == 14 and scales.num_tokens(scales.scale_schedule(7)) == 140
    assert scales.scale_starts((1, 2, 3)) == (0, 1, 5, 14)
    assert scales.scale_schedule(7) == (1, 2, 3, 4, 5, 6, 7)
    assert scales.scale_schedule(16, 10) == (1, 2, 3, 4, 5, 6, 7, 9, 12, 16)
    assert scales.scale_schedule(7, 4) == (1, 2, 4, 7)
    maps = [jnp.arange(2 * n * n).reshape(2, n, n) + 100 * k for k, n in enumerate((1, 2, 3))]
    seq = scales.flatten_scales(maps)
    assert seq.shape == (2, 14)
    np.testing.assert_array_equal(seq[1, 1:5], [104, 105, 106, 107])  # raster order within a scale
    for a, b in zip(scales.unflatten_scales(seq, (1, 2, 3)), maps):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="strictly increasing"):
        scales.scale_ids((1, 3, 2))
    with pytest.raises(ValueError, match=r"\[B, 14"):
        scales.unflatten_scales(seq[:, :13], (1, 2, 3))
    with pytest.raises(ValueError, match="n must be in"):
        scales.area_downsample(jnp.zeros((1, 3, 3, 1)), 4)


# --- msvq.py -----------------------------------------------------------------------------------


def test_residual_quantizer_equals_numpy_reference():
    model, params = _model_and_params()
    f = _latent()
    out = model.apply(params, jnp.asarray(f))
    phi_of_scale = [0, 0, 1, 1]  # VAR's ticks for 2 shared phis: (1/6, 5/6) vs scale / 3
    assert [phi_index(k, 4, 2) for k in range(4)] == phi_of_scale
    codebook = np.asarray(params["params"]["codebook"], np.float64)
    tokens, partial, gap = np_msvq(f.astype(np.float64), codebook, _phis_of(params, 2), phi_of_scale, PATCH_NUMS, 0.5)
    assert gap > 1e-3  # the fixed inputs are far from an argmin tie, so fp32 vs fp64 cannot flip a token
    assert [t.shape for t in out.tokens] == [(B, n, n) for n in PATCH_NUMS]
    for got, want in zip(out.tokens, tokens):
        assert got.dtype == jnp.int32
        np.testing.assert_array_equal(got, want)
    assert len(np.unique(np.concatenate([t.ravel() for t in tokens]))) >= 4  # a non-trivial assignment
    np.testing.assert_allclose(out.quantized, partial[-1], atol=1e-5, rtol=0)
    codebook_loss = np.mean([np.mean((p - f) ** 2) for p in partial])  # VAR: mean over scales of mse(f_hat_k, f)
    np.testing.assert_allclose(out.codebook_loss, codebook_loss, rtol=1e-5)
    np.testing.assert_allclose(out.commitment_loss, codebook_loss, rtol=1e-5)
    np.testing.assert_allclose(out.loss, 1.25 * codebook_loss, rtol=1e-5)
    for got, want in zip(out.inputs, np_msvq.inputs):  # the area-downsampled residuals, scale by scale
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)


def test_identity_phi_and_codebook_holding_the_last_residual_reconstruct_exactly():
    # f = c0 (a code, constant in space) + detail[b, y, x] = u[y] g[b, x] with u = (1, -1, 0, 1, -1), which every
    # area window of 5 -> 1, 2, 3 rows averages to 0: scale 0 picks c0, scales 1 and 2 the zero code, and the last
    # scale (no resampling) the detail vectors 0 and +-g, all of which are codes.
    rng = np.random.default_rng(3)
    c0 = rng.standard_normal(D) * 3
    u = np.array([1.0, -1.0, 0.0, 1.0, -1.0])
    g = rng.standard_normal((B, 5, D))
    detail = u[None, :, None, None] * g[:, None, :, :]  # [B, y, x, D]
    f = (c0 + detail).astype(np.float32)
    codebook = np.concatenate([[c0, np.zeros(D)], g.reshape(-1, D), -g.reshape(-1, D)])
    model, params = _model_and_params(quant_resi=0.0, codebook=codebook)
    assert "phis_0" not in params["params"]
    out = model.apply(params, jnp.asarray(f))
    np.testing.assert_array_equal(out.tokens[0], 0)
    np.testing.assert_array_equal(out.tokens[1], 1)
    np.testing.assert_array_equal(out.tokens[2], 1)
    g_index = 2 + np.arange(B)[:, None] * 5 + np.arange(5)[None, :]  # [B, x]
    want_last = np.where(u[None, :, None] > 0, g_index[:, None, :], g_index[:, None, :] + B * 5)
    want_last = np.where(u[None, :, None] == 0, 1, want_last)
    np.testing.assert_array_equal(out.tokens[3], want_last)
    np.testing.assert_allclose(out.quantized, f, atol=1e-5, rtol=0)
    np.testing.assert_allclose(model.apply(params, out.tokens, method=MultiScaleVQ.decode_tokens), f, atol=1e-5)


def test_decode_tokens_of_encode_scales_is_f_hat_and_sampling_steps_rebuild_it():
    model, params = _model_and_params()
    f = jnp.asarray(_latent(seed=4))
    out = model.apply(params, f)
    tokens = model.apply(params, f, method=MultiScaleVQ.encode_scales)
    for a, b in zip(tokens, out.tokens):
        np.testing.assert_array_equal(a, b)
    decoded = model.apply(params, tokens, method=MultiScaleVQ.decode_tokens)
    np.testing.assert_allclose(decoded, out.quantized, atol=1e-5, rtol=0)

    # sampling: add one scale at a time; the next inputs are the running f_hat area-downsampled
    f_hat, inputs = jnp.zeros_like(f), []
    for k, tokens_k in enumerate(tokens):
        f_hat, nxt = model.apply(params, f_hat, tokens_k, k, method=MultiScaleVQ.add_scale)
        if k < len(PATCH_NUMS) - 1:
            assert nxt.shape == (B, PATCH_NUMS[k + 1], PATCH_NUMS[k + 1], D)
            np.testing.assert_allclose(nxt, np_area(np.asarray(f_hat, np.float64), PATCH_NUMS[k + 1]), atol=1e-5)
            np.testing.assert_allclose(model.apply(params, f_hat, k, method=MultiScaleVQ.next_scale_input), nxt)
            inputs.append(np.asarray(nxt).reshape(B, -1, D))
        else:
            assert nxt is None
    np.testing.assert_allclose(f_hat, decoded, atol=1e-5, rtol=0)
    teacher = model.apply(params, tokens, method=MultiScaleVQ.teacher_forcing_inputs)
    assert teacher.shape == (B, scales.num_tokens(PATCH_NUMS) - 1, D)
    np.testing.assert_allclose(teacher, np.concatenate(inputs, axis=1), atol=1e-5, rtol=0)


def test_straight_through_gradient_is_identity_and_commitment_gradient_is_hand_derived():
    model, params = _model_and_params()
    f = jnp.asarray(_latent(seed=5))
    weights = jnp.asarray(np.random.default_rng(6).standard_normal(f.shape), jnp.float32)

    def quantized_and_loss(p, x):
        out = model.apply(p, x)
        return out.quantized, out.loss

    (quantized, loss), vjp = jax.vjp(quantized_and_loss, params, f)
    _, grad_st = vjp((weights, jnp.zeros_like(loss)))
    np.testing.assert_allclose(grad_st, weights, atol=1e-6, rtol=0)

    # loss = mean_k [mse(f_hat_k, sg f) + beta mse(sg f_hat_k, f)]: d/df = beta * mean_k 2 (f - f_hat_k) / f.size
    _, partial, _ = np_msvq(np.asarray(f, np.float64), np.asarray(params["params"]["codebook"], np.float64),
                            _phis_of(params, 2), [0, 0, 1, 1], PATCH_NUMS, 0.5)
    want = 0.25 * np.mean([2 * (np.asarray(f, np.float64) - p) / f.size for p in partial], axis=0)
    grad_params, grad_loss = vjp((jnp.zeros_like(quantized), jnp.ones_like(loss)))
    np.testing.assert_allclose(grad_loss, want, atol=1e-7, rtol=1e-4)
    # the codebook term trains the codebook and phi
    assert float(jnp.abs(grad_params["params"]["codebook"]).sum()) > 0
    assert float(jnp.abs(grad_params["params"]["phis_1"]["conv"]["kernel"]).sum()) > 0


def test_bad_inputs_are_one_line_errors():
    model, params = _model_and_params()
    with pytest.raises(ValueError, match=r"latent must be \[B, 5, 5, 3\]"):
        model.apply(params, jnp.zeros((1, 4, 4, D)))
    with pytest.raises(ValueError, match="tokens must be a list of 4"):
        model.apply(params, [jnp.zeros((1, 1, 1), jnp.int32)], method=MultiScaleVQ.decode_tokens)
    with pytest.raises(ValueError, match="no scale after the last"):
        model.apply(params, jnp.zeros((1, 5, 5, D)), 3, method=MultiScaleVQ.next_scale_input)
    with pytest.raises(ValueError, match="strictly increasing"):
        MultiScaleVQ(codebook_size=4, dim=2, patch_nums=(2, 2)).init(jax.random.PRNGKey(0), jnp.zeros((1, 2, 2, 2)))
