"""Int8 inference: weight-only int8 (per-output-channel scales) and the int8 KV cache (jaxar.quant)."""

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from jaxar import quant
from jaxar.cache import KVCache
from jaxar.config import ConfigError, ModelConfig
from jaxar.decode.generate import generate
from jaxar.decode.speculative import speculative_generate
from jaxar.models import layers as L
from jaxar.models.transformer import decode_params, forward, init_params

TINY = ModelConfig.llama(vocab_size=96, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, mlp_dim=64, max_seq_len=512,
                         initializer_range=0.2, rope_theta=500.0)


@pytest.mark.parametrize("shape,in_axes", [((48, 40), 1), ((4, 8, 24), 2)])
def test_int8_linear_equals_float64_matmul_of_the_dequantized_weights(shape, in_axes):
    rng = np.random.RandomState(0)
    w = rng.randn(*shape).astype(np.float32) * np.exp(rng.randn(*shape[in_axes:])).astype(np.float32)
    x = rng.randn(3, 5, *shape[:in_axes]).astype(np.float32)
    q, scale = quant.quantize_weight(jnp.asarray(w), in_axes)
    assert q.dtype == jnp.int8 and scale.shape == shape[in_axes:]
    y = L.linear({"kernel": q, "kernel_scale": scale}, jnp.asarray(x), jnp.float32, in_axes=in_axes)
    w_deq = np.asarray(q, np.float64) * np.asarray(scale, np.float64)
    ref = np.tensordot(x.astype(np.float64), w_deq, axes=in_axes)
    # fp32 accumulation of sum_i |x_i w_i| terms: relative to that magnitude, a few ulps per term
    bound = np.tensordot(np.abs(x).astype(np.float64), np.abs(w_deq), axes=in_axes) * 1e-6
    assert np.all(np.abs(np.asarray(y, np.float64) - ref) <= bound + 1e-12)


def test_quantize_dequantize_error_is_at_most_half_a_scale_step():
    rng = np.random.RandomState(1)
    w = jnp.asarray(rng.randn(64, 3, 16) * rng.gamma(1.0, size=(3, 16)), jnp.float32)
    w = w.at[:, 0, 0].set(0.0)  # an all-zero channel: scale 1, exact zeros
    q, scale = quant.quantize_weight(w, in_axes=1)
    err = np.abs(np.asarray(quant.dequantize_weight(q, scale)) - np.asarray(w))
    assert np.all(err <= np.asarray(scale)[None] / 2 * (1 + 1e-6))
    assert np.all(np.abs(np.asarray(q, np.int32)) <= 127) and np.abs(np.asarray(q, np.int32)).max() == 127
    assert np.all(np.asarray(q)[:, 0, 0] == 0)
    kv = jnp.asarray(rng.randn(2, 7, 3, 16), jnp.float32)
    qk, sk = quant.quantize_kv(kv)
    assert qk.dtype == jnp.int8 and sk.shape == (2, 7, 3)
    err = np.abs(np.asarray(quant.dequantize_kv(qk, sk)) - np.asarray(kv))
    assert np.all(err <= np.asarray(sk)[..., None] / 2 * (1 + 1e-6))


def _fake_quant(x):
    """float64 symmetric int8 round trip per vector of the last axis (the int8 cache's rule)."""
    scale = np.abs(x).max(-1, keepdims=True) / 127.0
    scale = np.where(scale > 0, scale, 1.0)
    return np.clip(np.round(x / scale), -127, 127) * scale


def _numpy_logits(params, tokens, cfg, quantize_kv):
    """Float64 numpy Llama over one row `tokens [T]` (full causal attention), keys and values
    through the int8 round trip when `quantize_kv`: what a cache that stored them would hold."""
    P = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), params)
    H, K, Dh = cfg.n_heads, cfg.num_kv_heads, cfg.dim_per_head
    T = len(tokens)

    def rms(x, s):
        return x / np.sqrt(np.mean(x * x, -1, keepdims=True) + cfg.norm_eps) * s

    inv = 1.0 / cfg.rope_theta ** (np.arange(0, Dh, 2) / Dh)
    ang = np.arange(T)[:, None] * inv
    cos, sin = np.cos(np.concatenate([ang, ang], -1))[:, None], np.sin(np.concatenate([ang, ang], -1))[:, None]

    def rope(x):
        return x * cos + np.concatenate([-x[..., Dh // 2:], x[..., :Dh // 2]], -1) * sin

    x = P["embed"]["embedding"][tokens]
    for i in range(cfg.n_layers):
        p = jax.tree_util.tree_map(lambda a: a[i], P["layers"])
        h = rms(x, p["attn_norm"]["scale"])
        q = rope(np.einsum("td,dhk->thk", h, p["attn"]["q_proj"]["kernel"]))
        k = rope(np.einsum("td,dhk->thk", h, p["attn"]["k_proj"]["kernel"]))
        v = np.einsum("td,dhk->thk", h, p["attn"]["v_proj"]["kernel"])
        if quantize_kv:
            k, v = _fake_quant(k), _fake_quant(v)
        k, v = np.repeat(k, H // K, axis=1), np.repeat(v, H // K, axis=1)
        s = np.einsum("thk,shk->hts", q, k) / np.sqrt(Dh) + np.where(np.tril(np.ones((T, T))) > 0, 0, -np.inf)
        a = np.exp(s - s.max(-1, keepdims=True))
        a /= a.sum(-1, keepdims=True)
        x = x + np.einsum("hts,shk,hkd->td", a, v, p["attn"]["o_proj"]["kernel"])
        h = rms(x, p["mlp_norm"]["scale"])
        g = h @ p["mlp"]["gate_proj"]["kernel"]
        x = x + (g / (1 + np.exp(-g)) * (h @ p["mlp"]["up_proj"]["kernel"])) @ p["mlp"]["down_proj"]["kernel"]
    return rms(x, P["final_norm"]["scale"]) @ P["lm_head"]["kernel"]


@pytest.fixture(scope="module")
def tiny_params():
    return init_params(TINY, 0)


def test_int8_kv_cache_logits_match_a_float64_reference_that_quantizes_keys_and_values(tiny_params):
    cfg = TINY.replace(kv_cache_dtype="int8")
    tokens = np.random.RandomState(2).randint(0, TINY.vocab_size, 20).astype(np.int32)
    ref = _numpy_logits(tiny_params, tokens, TINY, quantize_kv=True)
    ref_float = _numpy_logits(tiny_params, tokens, TINY, quantize_kv=False)
    # cache of 256 slots: the chunked attention path (two 128-slot pieces); the second 10 tokens read the
    # first 10 from the int8 cache (one compiled program for both calls)
    cache = KVCache.empty(cfg, 1, 256)
    assert cache.k[0].dtype == jnp.int8 and cache.k_scale[0].shape == (1, 256, TINY.num_kv_heads)
    p = decode_params(tiny_params, cfg)
    first, cache = forward(p, tokens[None, :10], config=cfg, cache=cache)
    second, cache = forward(p, tokens[None, 10:], config=cfg, cache=cache)
    got = np.concatenate([np.asarray(first[0], np.float64), np.asarray(second[0], np.float64)])
    np.testing.assert_allclose(got, ref, rtol=0, atol=2e-4)
    # stacked params with scan_layers=True score through the same int8 cache (the layers scanned)
    scanned, _ = forward(tiny_params, tokens[None], config=cfg.replace(scan_layers=True),
                         cache=KVCache.empty(cfg, 1, 256))
    np.testing.assert_allclose(np.asarray(scanned[0], np.float64), ref, rtol=0, atol=2e-4)
    assert np.abs(ref - ref_float).max() > 50 * 2e-4  # the quantization is visible at this tolerance


def _fake_quant_weights(params):
    """float64 numpy params with every kernel through the int8 round trip per output channel (the
    embedding per row), in the stacked layout: what weight_quant="int8" computes with."""
    P = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), params)

    def fq(w, axes):
        scale = np.abs(w).max(axis=axes, keepdims=True) / 127.0
        scale = np.where(scale > 0, scale, 1.0)
        return np.clip(np.round(w / scale), -127, 127) * scale

    for group, names in (("attn", ("q_proj", "k_proj", "v_proj", "o_proj")), ("mlp", ("gate_proj", "up_proj",
                                                                                      "down_proj"))):
        for name in names:
            w = P["layers"][group][name]["kernel"]  # [L, *in, *out]
            P["layers"][group][name]["kernel"] = fq(w, (1, 2) if name == "o_proj" else (1,))
    P["embed"]["embedding"] = fq(P["embed"]["embedding"], (1,))
    P["lm_head"]["kernel"] = fq(P["lm_head"]["kernel"], (0,))
    return P


def test_int8_weights_and_kv_greedy_tokens_equal_the_float64_reference_in_generate_and_speculative(tiny_params):
    cfg = TINY.replace(weight_quant="int8", kv_cache_dtype="int8")
    q = quant.quantize_params(tiny_params, TINY)
    assert quant.is_quantized(q) and q["layers"][0]["attn"]["qkv_proj"]["kernel"].dtype == jnp.int8
    assert q["embed"]["embedding"].dtype == jnp.int8 and q["embed"]["embedding_scale"].shape == (TINY.vocab_size,)
    assert q["layers"][0]["mlp"]["down_proj"]["kernel_scale"].shape == (TINY.d_model,)
    rng = np.random.RandomState(3)
    lengths = np.array([6, 3])
    prompts = rng.randint(0, TINY.vocab_size, (2, 16)).astype(np.int32)
    # float params with an int8 config are quantized by decode_params: the same program and tokens
    out = generate(tiny_params, prompts, lengths, config=cfg, max_new_tokens=10)
    np.testing.assert_array_equal(out.tokens, generate(q, prompts, lengths, config=cfg, max_new_tokens=10).tokens)
    # stacked int8 params (per-layer scales) fuse into the very same int8 decode layout
    stacked = quant.quantize_params(tiny_params, TINY, layout="stacked")
    assert stacked["layers"]["attn"]["q_proj"]["kernel_scale"].shape == (TINY.n_layers, TINY.n_heads, 8)
    np.testing.assert_array_equal(generate(stacked, prompts, lengths, config=cfg, max_new_tokens=10).tokens,
                                  out.tokens)
    ref_params = _fake_quant_weights(tiny_params)
    changed = False
    for b in range(2):
        seq = list(prompts[b, :lengths[b]])
        for _ in range(10):
            seq.append(int(np.argmax(_numpy_logits(ref_params, np.array(seq), TINY, quantize_kv=True)[-1])))
        assert list(np.asarray(out.tokens[b])) == seq[lengths[b]:]
        float_ref = _numpy_logits(tiny_params, np.array(seq), TINY, quantize_kv=False)
        changed |= np.abs(float_ref - _numpy_logits(ref_params, np.array(seq), TINY, quantize_kv=True)).max() > 0.01
    assert changed  # the int8 reference differs from the float model (the switches are not no-ops)
    spec = speculative_generate(tiny_params, prompts, lengths, config=cfg, max_new_tokens=10, num_draft=3,
                                draft="ngram")
    np.testing.assert_array_equal(spec.tokens, out.tokens)  # greedy speculative == greedy plain


def test_bad_quantization_settings_fail_with_one_line_errors(tiny_params):
    with pytest.raises(ConfigError, match="weight_quant='int4'"):
        TINY.replace(weight_quant="int4")
    with pytest.raises(ConfigError, match="kv_cache_dtype='fp8'"):
        TINY.replace(kv_cache_dtype="fp8")
    with pytest.raises(ConfigError, match="attention_backend='pallas'"):
        TINY.replace(kv_cache_dtype="int8", attention_backend="pallas")
    with pytest.raises(ValueError, match="kv_cache_dtype"):
        forward(tiny_params, np.zeros((1, 2), np.int32), config=TINY.replace(kv_cache_dtype="int8"),
                cache=KVCache.empty(TINY, 1, 8))


# SmolLM2-135M-Instruct (the fixture), the fixed text below (238 tokens, one cached forward): perplexity
# fp32 (transformers) 20.279; int8 weights 20.332 (+0.26%), int8 KV 20.218 (-0.30%), both 20.318 (+0.19%)
# under the suite's XLA flags (20.343, +0.31%, with XLA's default optimisation: int8 rounding ties move).
# The bound leaves 3x that margin.
PPL_REL_BOUND = 0.01

def _fixed_text() -> str:
    """The fixed English text benchmarks/quant_decode.py scores (one text for the test and the benchmark)."""
    import importlib.util
    import os

    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks", "quant_decode.py")
    spec = importlib.util.spec_from_file_location("quant_decode_bench", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.TEXT


TEXT = _fixed_text()


def cached_perplexity(params, config, ids):
    """exp(mean NLL) of ids[1:] from one forward through an empty cache of config.kv_cache_dtype: every query
    attends to the keys / values as the cache stores them (int8 included)."""
    cache = KVCache.empty(config, 1, 256)
    logits, _ = forward(params, ids[None], config=config, cache=cache)
    lp = jax.nn.log_softmax(logits[0, :-1], -1)
    return float(jnp.exp(-jnp.mean(jnp.take_along_axis(lp, jnp.asarray(ids[1:, None]), 1))))


def test_smollm2_int8_perplexity_within_one_percent_of_fp32(smollm2_jaxar, smollm2_torch, smollm2_hf_dir):
    import torch

    from jaxar.tokenizer import load_tokenizer

    config, params = smollm2_jaxar
    ids = np.asarray(load_tokenizer(smollm2_hf_dir).encode(TEXT)[:256], np.int32)
    assert 200 < len(ids) <= 256
    with torch.no_grad():
        ref = float(torch.exp(smollm2_torch(torch.as_tensor(ids[None]).long(), labels=torch.as_tensor(
            ids[None]).long()).loss))
    # stacked params, layers scanned (one layer to compile, not thirty); the int8 cache is read as in decoding
    scan = config.replace(scan_layers=True)
    q = quant.quantize_params(params, config, layout="stacked")
    ppl = {"int8 weights": cached_perplexity(q, scan.replace(weight_quant="int8"), ids),
           "int8 kv": cached_perplexity(params, scan.replace(kv_cache_dtype="int8"), ids),
           "both": cached_perplexity(q, scan.replace(weight_quant="int8", kv_cache_dtype="int8"), ids)}
    print(f"\nSmolLM2 perplexity fp32 {ref:.4f}", {k: round(v, 4) for k, v in ppl.items()})
    for name, value in ppl.items():
        assert abs(value / ref - 1) < PPL_REL_BOUND, (name, value, ref)
    assert ppl["int8 weights"] != ref and ppl["int8 kv"] != ref
