"""The model's cache path, packing masks and execution switches, against the full forward."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxar
from jaxar.models.layers import cache_attention_mask
from tests.hf_models import max_rel_err

CONFIGS = {
    "llama_gqa": jaxar.ModelConfig.llama(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, mlp_dim=48,
                                         max_seq_len=64, initializer_range=0.2),
    "gpt2": jaxar.ModelConfig.gpt2(vocab_size=64, d_model=24, n_layers=2, n_heads=3, mlp_dim=40, max_seq_len=64,
                                   initializer_range=0.2),
    "qwen2": jaxar.ModelConfig.qwen2(vocab_size=64, d_model=24, n_layers=2, n_heads=6, n_kv_heads=2, mlp_dim=40,
                                     max_seq_len=64, initializer_range=0.2),
}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_ragged_incremental_decoding_equals_full_forward(name):
    """Prefill ragged prompts in one padded forward, then decode one token at a time:
    each row's logits equal a full forward over that row's tokens alone."""
    config = CONFIGS[name]
    params = jaxar.init_params(config, 0)
    rng = np.random.default_rng(0)
    prompt_lens = np.array([3, 7, 5])
    total = 11  # tokens per row in the end
    seqs = rng.integers(0, config.vocab_size, size=(3, total))
    B, P = len(prompt_lens), prompt_lens.max()
    prompt = np.where(np.arange(P)[None] < prompt_lens[:, None], seqs[:, :P], 0)  # pad with junk-free zeros

    cache = jaxar.KVCache.empty(config, B, 32)
    logits, cache = jaxar.forward(params, prompt, config=config, cache=cache, num_new=prompt_lens)
    np.testing.assert_array_equal(cache.lengths, prompt_lens)
    step = jax.jit(lambda p, t, c: jaxar.forward(p, t, config=config, cache=c))
    got = [[logits[b, : prompt_lens[b]]] for b in range(B)]
    lengths = prompt_lens.copy()
    while lengths.min() < total:
        tok = seqs[np.arange(B), np.minimum(lengths, total - 1)][:, None]
        out, cache = step(params, tok, cache)
        for b in range(B):
            if lengths[b] < total:
                got[b].append(out[b])
        lengths = np.minimum(lengths + 1, total)
        cache = cache.with_lengths(lengths)  # rows that finished stay put
    for b in range(B):
        ref = jaxar.forward(params, seqs[b : b + 1], config=config)[0][0]
        assert max_rel_err(jnp.concatenate(got[b]), ref) < 1e-4


def test_multi_token_steps_and_rollback():
    """Writing k+1 tokens then rolling back by lowering lengths (what speculative
    decoding does) leaves the cache equivalent to never having written them."""
    config = CONFIGS["llama_gqa"]
    params = jaxar.init_params(config, 1)
    seq = np.random.default_rng(1).integers(0, 64, size=(2, 12))
    cache = jaxar.KVCache.empty(config, 2, 16)
    _, cache = jaxar.forward(params, seq[:, :5], config=config, cache=cache)
    junk = (seq[:, 5:9] + 7) % 64
    _, cache = jaxar.forward(params, junk, config=config, cache=cache)  # 4 drafts, all rejected
    cache = cache.with_lengths(np.array([5, 5]))
    out, cache = jaxar.forward(params, seq[:, 5:12], config=config, cache=cache)
    ref = jaxar.forward(params, seq, config=config)[0][:, 5:12]
    assert max_rel_err(out, ref) < 1e-4


def test_writes_past_the_cache_end_are_dropped_not_clamped():
    config = CONFIGS["llama_gqa"]
    params = jaxar.init_params(config, 2)
    seq = np.random.default_rng(2).integers(0, 64, size=(1, 8))
    cache = jaxar.KVCache.empty(config, 1, 8)
    _, cache = jaxar.forward(params, seq[:, :6], config=config, cache=cache)
    k_before = np.asarray(cache.k)
    _, cache2 = jaxar.forward(params, seq[:, :4], config=config, cache=cache)  # slots 6..9: 8, 9 don't exist
    np.testing.assert_array_equal(np.asarray(cache2.k)[:, :, :6], k_before[:, :, :6])
    assert int(cache2.lengths[0]) == 8


def test_tree_mask_matches_separate_branches():
    """Two draft branches verified in one forward through a tree mask give the
    logits of running each branch on its own."""
    config = CONFIGS["qwen2"]
    params = jaxar.init_params(config, 3)
    seq = np.random.default_rng(3).integers(0, 64, size=(1, 6))
    a, b = [11, 12], [21, 22]
    # new block: [a0, a1, b0, b1]; b0's parent is the prefix, not a1
    tree = np.array([[1, 0, 0, 0], [1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 1, 1]], bool)[None]
    cache = jaxar.KVCache.empty(config, 1, 16)
    _, cache = jaxar.forward(params, seq, config=config, cache=cache)
    positions = np.array([[6, 7, 6, 7]])
    out, _ = jaxar.forward(params, np.array([a + b]), config=config, cache=cache, positions=positions, tree_mask=tree)
    ref_a = jaxar.forward(params, np.concatenate([seq, [a]], 1), config=config)[0][0, 6:]
    ref_b = jaxar.forward(params, np.concatenate([seq, [b]], 1), config=config)[0][0, 6:]
    assert max_rel_err(out[0, :2], ref_a) < 1e-4
    assert max_rel_err(out[0, 2:], ref_b) < 1e-4


def test_packed_documents_do_not_attend_to_each_other():
    config = CONFIGS["llama_gqa"]
    params = jaxar.init_params(config, 4)
    rng = np.random.default_rng(4)
    doc1, doc2 = rng.integers(0, 64, size=5), rng.integers(0, 64, size=7)
    tokens = np.concatenate([doc1, doc2])[None]
    segment_ids = np.array([[1] * 5 + [2] * 7])
    positions = np.array([list(range(5)) + list(range(7))])
    packed, _ = jaxar.forward(params, tokens, config=config, positions=positions, segment_ids=segment_ids)
    ref1 = jaxar.forward(params, doc1[None], config=config)[0]
    ref2 = jaxar.forward(params, doc2[None], config=config)[0]
    assert max_rel_err(packed[:, :5], ref1) < 1e-5
    assert max_rel_err(packed[:, 5:], ref2) < 1e-5


@pytest.mark.parametrize("changes", [dict(scan_layers=False), dict(remat="full"), dict(remat="dots")])
def test_scan_unroll_and_remat_are_numerically_the_same(changes):
    config = CONFIGS["gpt2"]
    params = jaxar.init_params(config, 5)
    tokens = np.random.default_rng(5).integers(0, 64, size=(2, 9))

    def loss(p, cfg):
        return jnp.mean(jaxar.forward(p, tokens, config=cfg)[0] ** 2)

    ref_l, ref_g = jax.value_and_grad(loss)(params, config)
    l, g = jax.value_and_grad(loss)(params, config.replace(**changes))
    np.testing.assert_allclose(l, ref_l, rtol=1e-5)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), g, ref_g)


def test_cache_mask_is_bottom_right_aligned():
    mask = np.asarray(cache_attention_mask(jnp.array([5, 3]), 2, 6))
    # row 0: queries at slots 3 and 4; row 1: slots 1 and 2
    expected0 = np.array([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 0]], bool)
    expected1 = np.array([[1, 1, 0, 0, 0, 0], [1, 1, 1, 0, 0, 0]], bool)
    np.testing.assert_array_equal(mask[0], expected0)
    np.testing.assert_array_equal(mask[1], expected1)


def test_bad_config_and_inputs_give_clear_errors():
    with pytest.raises(jaxar.ConfigError, match="multiple of model.n_kv_heads"):
        jaxar.ModelConfig.llama(n_heads=4, n_kv_heads=3)
    with pytest.raises(jaxar.ConfigError, match="not divisible"):
        jaxar.ModelConfig.llama(d_model=30, n_heads=4)
    with pytest.raises(jaxar.ConfigError, match="rope scaling type 'yarn'"):
        jaxar.ModelConfig.llama(rope_scaling={"rope_type": "yarn", "factor": 2.0})
    config = CONFIGS["llama_gqa"]
    params = jaxar.init_params(config, 0)
    with pytest.raises(ValueError, match=r"tokens must be \[batch, T\]"):
        jaxar.forward(params, np.zeros(5, np.int32), config=config)
    with pytest.raises(ValueError, match="cache has 2 rows"):
        jaxar.forward(params, np.zeros((1, 2), np.int32), config=config, cache=jaxar.KVCache.empty(config, 2, 8))


def test_pallas_backend_matches_xla_in_training_and_decoding():
    """attention_backend='pallas' runs flash_attention (no cache) and
    decode_attention (cache) in interpret mode on CPU; both equal the XLA path."""
    from jaxar.decode.generate import generate, pad_prompts

    config = CONFIGS["llama_gqa"].replace(n_layers=1)
    pallas = config.replace(attention_backend="pallas")
    params = jaxar.init_params(config, 6)
    rng = np.random.default_rng(6)
    tokens = rng.integers(0, 64, size=(2, 10))
    seg = np.array([[1] * 4 + [2] * 6, [1] * 10])
    ref = jaxar.forward(params, tokens, config=config, segment_ids=seg)[0]
    got = jaxar.forward(params, tokens, config=pallas, segment_ids=seg)[0]
    assert max_rel_err(got, ref) < 1e-4
    g_ref = jax.grad(lambda p: jnp.mean(jaxar.forward(p, tokens, config=config)[0] ** 2))(params)
    g_pal = jax.grad(lambda p: jnp.mean(jaxar.forward(p, tokens, config=pallas)[0] ** 2))(params)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-6), g_pal, g_ref)
    toks, lens = pad_prompts([list(tokens[0, :3]), list(tokens[1, :7])])
    out_ref = generate(params, toks, lens, config=config, max_new_tokens=5, eos_ids=[])
    out_pal = generate(params, toks, lens, config=pallas, max_new_tokens=5, eos_ids=[])
    np.testing.assert_array_equal(out_pal.tokens, out_ref.tokens)
