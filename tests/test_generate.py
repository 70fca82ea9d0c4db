"""jaxar.decode.generate / beam_search against transformers' generate on the same weights."""

import numpy as np
import pytest
import torch

import jaxar
from jaxar.decode.generate import FINISH_LENGTH, FINISH_STOP, beam_search, generate, pad_prompts
from jaxar.decode.sampling import SamplingConfig
from tests.hf_models import make_hf_model

PROMPT_LENS = [3, 9, 1, 6]


def _load(name, tmp_path, seed=0):
    model = make_hf_model(name, seed=seed)
    model.save_pretrained(tmp_path)
    config, params = jaxar.from_pretrained(str(tmp_path))
    return model, config, params


def _prompts(vocab, lens, seed=0):
    rng = np.random.default_rng(seed)
    return [list(rng.integers(3, vocab, size=n)) for n in lens]


def _hf_generate(model, prompt, **kw):
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                             pad_token_id=0, **kw)
    return out[0, len(prompt):].tolist()


def _strip(tokens, n):
    return [int(t) for t in tokens[:n]]


@pytest.mark.parametrize("name", ["llama_gqa", "gpt2"])
def test_greedy_equals_transformers_row_by_row(tmp_path, name):
    model, config, params = _load(name, tmp_path)
    # An EOS id that the random model does emit, so stopping is exercised.
    eos = 5
    prompts = _prompts(config.vocab_size, PROMPT_LENS)
    toks, lens = pad_prompts(prompts)
    out = generate(params, toks, lens, config=config, max_new_tokens=12, eos_ids=[eos])
    for b, prompt in enumerate(prompts):
        ref = _hf_generate(model, prompt, max_new_tokens=12, do_sample=False, eos_token_id=eos)
        n = int(out.num_tokens[b])
        assert _strip(out.tokens[b], n) == ref[:n] and (n == len(ref) or ref[n] == 0)
        expected_reason = FINISH_STOP if ref[n - 1] == eos else FINISH_LENGTH
        assert int(out.finish_reason[b]) == expected_reason


def test_ragged_batch_equals_each_prompt_alone(tmp_path):
    _, config, params = _load("qwen2", tmp_path)
    prompts = _prompts(config.vocab_size, PROMPT_LENS, seed=1)
    sampling = SamplingConfig(temperature=0.9, top_k=20)
    toks, lens = pad_prompts(prompts)
    batch = generate(params, toks, lens, config=config, max_new_tokens=10, sampling=sampling, seed=7)
    for b, prompt in enumerate(prompts):
        # alone: same row index so the per-row random stream is the same
        solo_prompts = [prompts[0]] * len(prompts)
        solo_prompts[b] = prompt
        t, l_ = pad_prompts(solo_prompts)
        solo = generate(params, t, l_, config=config, max_new_tokens=10, sampling=sampling, seed=7)
        np.testing.assert_array_equal(batch.tokens[b], solo.tokens[b])
    # greedy: truly alone (batch of one)
    greedy = generate(params, toks, lens, config=config, max_new_tokens=8)
    for b, prompt in enumerate(prompts):
        t, l_ = pad_prompts([prompt])
        np.testing.assert_array_equal(greedy.tokens[b], generate(params, t, l_, config=config, max_new_tokens=8).tokens[0])


def test_repetition_penalty_and_logprobs_match_transformers(tmp_path):
    model, config, params = _load("llama_gqa", tmp_path, seed=2)
    prompts = _prompts(config.vocab_size, [4, 7], seed=2)
    toks, lens = pad_prompts(prompts)
    sampling = SamplingConfig(temperature=0.0, repetition_penalty=1.7)
    out = generate(params, toks, lens, config=config, max_new_tokens=10, sampling=sampling, eos_ids=[],
                   return_logprobs=True)
    for b, prompt in enumerate(prompts):
        with torch.no_grad():
            ref = model.generate(torch.tensor([prompt]), max_new_tokens=10, do_sample=False, repetition_penalty=1.7,
                                 eos_token_id=None, pad_token_id=0, output_scores=True, return_dict_in_generate=True)
        ref_tokens = ref.sequences[0, len(prompt):].tolist()
        assert out.tokens[b].tolist() == ref_tokens
        # HF scores are the processed logits; the log-softmax of them at the chosen token is the logprob
        ref_lp = [torch.log_softmax(s[0], -1)[t].item() for s, t in zip(ref.scores, ref_tokens)]
        np.testing.assert_allclose(out.logprobs[b], ref_lp, rtol=1e-4, atol=1e-4)


def test_per_row_budgets_and_no_eos(tmp_path):
    _, config, params = _load("gpt2", tmp_path)
    toks, lens = pad_prompts(_prompts(config.vocab_size, [2, 5, 3]))
    out = generate(params, toks, lens, config=config, max_new_tokens=9, budgets=[9, 3, 1], eos_ids=[], pad_id=-1)
    assert out.num_tokens.tolist() == [9, 3, 1]
    assert out.finish_reason.tolist() == [FINISH_LENGTH] * 3
    assert (np.asarray(out.tokens[1, 3:]) == -1).all() and (np.asarray(out.tokens[2, 1:]) == -1).all()


def test_temperature_one_samples_the_model_distribution(tmp_path):
    """Many rows sampling the first new token from the same prompt: the
    empirical histogram matches the model's softmax (chi-squared test)."""
    from scipy import stats

    config = jaxar.ModelConfig.llama(vocab_size=6, d_model=16, n_layers=1, n_heads=2, mlp_dim=16, max_seq_len=32,
                                     initializer_range=0.5)
    params = jaxar.init_params(config, 0)
    prompt = [1, 2, 3]
    rows = 4000
    toks, lens = pad_prompts([prompt] * rows)
    out = generate(params, toks, lens, config=config, max_new_tokens=1, sampling=SamplingConfig(temperature=1.0),
                   seed=3, eos_ids=[])
    probs = np.asarray(jax_softmax(jaxar.forward(params, np.array([prompt]), config=config)[0][0, -1]))
    counts = np.bincount(np.asarray(out.tokens[:, 0]), minlength=6)
    assert stats.chisquare(counts, probs * rows).pvalue > 1e-3


def jax_softmax(x):
    x = np.asarray(x, np.float64)
    e = np.exp(x - x.max())
    return e / e.sum()


def test_classifier_free_guidance_mixes_logits(tmp_path):
    _, config, params = _load("llama_gqa", tmp_path, seed=4)
    cond, uncond = _prompts(config.vocab_size, [5, 2], seed=4)
    toks, lens = pad_prompts([cond])
    utoks, ulens = pad_prompts([uncond])
    out = generate(params, toks, lens, config=config, max_new_tokens=4, cfg_scale=3.0, uncond_prompts=utoks,
                   uncond_lengths=ulens, eos_ids=[])
    # reference: a python loop of full forwards, mixing log-softmaxes
    c, u = list(cond), list(uncond)
    for _ in range(4):
        lc = np.log(jax_softmax(jaxar.forward(params, np.array([c]), config=config)[0][0, -1]))
        lu = np.log(jax_softmax(jaxar.forward(params, np.array([u]), config=config)[0][0, -1]))
        t = int(np.argmax(lu + 3.0 * (lc - lu)))
        c.append(t)
        u.append(t)
    assert out.tokens[0].tolist() == c[len(cond):]


@pytest.mark.parametrize("name,num_beams,eos", [("llama_gqa", 3, 5), ("gpt2", 4, None), ("qwen2", 2, 7)])
def test_beam_search_equals_transformers(tmp_path, name, num_beams, eos):
    model, config, params = _load(name, tmp_path, seed=5)
    prompts = _prompts(config.vocab_size, [4, 7, 2], seed=5)
    toks, lens = pad_prompts(prompts)
    out = beam_search(params, toks, lens, config=config, max_new_tokens=8, num_beams=num_beams,
                      eos_ids=[] if eos is None else [eos])
    for b, prompt in enumerate(prompts):
        ref = _hf_generate(model, prompt, max_new_tokens=8, num_beams=num_beams, do_sample=False,
                           eos_token_id=eos, early_stopping=False)
        n = int(out.num_tokens[b, 0])
        ref = [t for t in ref]
        assert _strip(out.tokens[b, 0], n) == ref[:n], (b, out.tokens[b, 0], ref)
        assert all(t == 0 for t in ref[n:])


def test_diverse_beam_search_matches_python_reference(tmp_path):
    _, config, params = _load("llama_gqa", tmp_path, seed=6)
    prompt = _prompts(config.vocab_size, [5], seed=6)[0]
    toks, lens = pad_prompts([prompt])
    out = beam_search(params, toks, lens, config=config, max_new_tokens=4, num_beams=4, num_beam_groups=2,
                      diversity_penalty=2.0, num_return_sequences=4, eos_ids=[])
    ref = _diverse_reference(params, config, prompt, steps=4, groups=2, per_group=2, penalty=2.0)
    got = {tuple(int(t) for t in seq) for seq in np.asarray(out.tokens[0])}
    assert got == set(ref)
    # groups are pushed apart: the two groups' best beams differ
    assert len(got) == 4


def _diverse_reference(params, config, prompt, steps, groups, per_group, penalty):
    """Plain-python diverse beam search without EOS (all hypotheses end at `steps`)."""

    def logp(seq):
        return np.log(jax_softmax(jaxar.forward(params, np.array([prompt + seq]), config=config)[0][0, -1]))

    beams = [[([], 0.0)] for _ in range(groups)]
    for _ in range(steps):
        counts = np.zeros(config.vocab_size)
        new_beams = []
        for g in range(groups):
            cands = []
            for seq, score in beams[g]:
                lp = logp(seq) - penalty * counts
                cands += [(seq + [t], score + lp[t]) for t in range(config.vocab_size)]
            cands.sort(key=lambda c: -c[1])
            chosen = cands[:per_group]
            for seq, _ in chosen:
                counts[seq[-1]] += 1
            new_beams.append(chosen)
        beams = new_beams
    return [tuple(seq) for group in beams for seq, _ in group]


def test_learned_positions_generate_up_to_the_context_equal_transformers(tmp_path):
    """GPT-2 (64 learned positions): rows whose prompt + new tokens fill the
    context exactly give transformers' greedy tokens, the last one at position 63."""
    model, config, params = _load("gpt2", tmp_path, seed=3)
    assert config.position == "learned" and config.max_seq_len == 64
    prompts = _prompts(config.vocab_size, [5, 23, 63], seed=3)
    budgets = [64 - len(p) for p in prompts]
    toks, lens = pad_prompts(prompts)
    out = generate(params, toks, lens, config=config, max_new_tokens=max(budgets), budgets=budgets, eos_ids=[])
    assert out.num_tokens.tolist() == budgets
    for b, prompt in enumerate(prompts):
        ref = _hf_generate(model, prompt, max_new_tokens=budgets[b], min_new_tokens=budgets[b], do_sample=False)
        assert _strip(out.tokens[b], budgets[b]) == ref


def test_request_past_a_learned_context_is_a_clear_error(tmp_path):
    _, config, params = _load("gpt2", tmp_path)
    toks, lens = pad_prompts([[5, 6, 7], [8] * 10])
    with pytest.raises(ValueError, match=r"row 1: prompt of 10 tokens plus 55 new tokens exceeds the model's context "
                                         r"of 64 .*lower max_new_tokens"):
        generate(params, toks, lens, config=config, max_new_tokens=55)
    with pytest.raises(ValueError, match="exceeds the model's context of 64"):
        beam_search(params, toks, lens, config=config, max_new_tokens=60, num_beams=2)
    # per-row budgets that fit are fine
    out = generate(params, toks, lens, config=config, max_new_tokens=61, budgets=[61, 54], eos_ids=[])
    assert out.num_tokens.tolist() == [61, 54]


def test_params_go_through_the_models_decode_layout_once_per_call(monkeypatch):
    """When the model offers `transformer.decode_params`, every entry point converts
    the params with it once, outside jit (the draft model's too)."""
    from jaxar.decode.speculative import speculative_generate
    from jaxar.models import transformer

    calls = []

    def decode_params(params, config):
        calls.append(config)
        return params

    monkeypatch.setattr(transformer, "decode_params", decode_params, raising=False)
    config = jaxar.ModelConfig.llama(vocab_size=30, d_model=16, n_layers=1, n_heads=2, mlp_dim=16, max_seq_len=64)
    params = jaxar.init_params(config, 0)
    toks, lens = pad_prompts([[1, 2, 3]])
    generate(params, toks, lens, config=config, max_new_tokens=3)
    beam_search(params, toks, lens, config=config, max_new_tokens=3, num_beams=2)
    speculative_generate(params, toks, lens, config=config, max_new_tokens=3, num_draft=2, draft_params=params,
                         draft_config=config)
    assert calls == [config] * 4


def test_presence_and_frequency_penalties_equal_a_greedy_numpy_resimulation(tmp_path):
    """Greedy decoding with per-row presence / frequency penalties, step by step: transformers'
    logits of the sequence so far, the penalties in float64 numpy over the generated tokens, argmax."""
    model, config, params = _load("llama_gqa", tmp_path)
    prompts = _prompts(config.vocab_size, PROMPT_LENS, seed=3)
    penalties = [(1.5, 0.0), (0.0, 1.0), (-0.5, 2.0), (0.0, 0.0)]
    sampling = [SamplingConfig(temperature=0.0, presence_penalty=p, frequency_penalty=f) for p, f in penalties]
    toks, lens = pad_prompts(prompts)
    out = generate(params, toks, lens, config=config, max_new_tokens=12, sampling=sampling, eos_ids=[])
    plain = generate(params, toks, lens, config=config, max_new_tokens=12, eos_ids=[])
    V = config.vocab_size
    for b, (prompt, (p, f)) in enumerate(zip(prompts, penalties)):
        seq, gen = list(prompt), []
        for _ in range(12):
            with torch.no_grad():
                logits = model(torch.tensor([seq])).logits[0, -1].double().numpy()
            counts = np.bincount(np.asarray(gen, np.int64), minlength=V).astype(np.float64)
            token = int(np.argmax(logits - p * (counts > 0) - f * counts))
            seq.append(token)
            gen.append(token)
        assert _strip(out.tokens[b], 12) == gen, b
    assert _strip(plain.tokens[3], 12) == _strip(out.tokens[3], 12)
    assert any(_strip(plain.tokens[b], 12) != _strip(out.tokens[b], 12) for b in range(3))  # the penalties bite


def test_stop_string_automaton_equals_a_brute_force_search():
    """loop.stop_string_table: after each token, "matched" exactly when the bytes so far contain
    a stop string (overlapping stop strings, tokens of several bytes, tokens that add nothing)."""
    from jaxar.decode.loop import STOP_MATCHED, stop_string_table

    rng = np.random.default_rng(0)
    pieces = [b"", b"a", b"b", b"c", b"ab", b"ba", b"abc", b"cab", b"bb", b"ca", b"\xc3", b"\xa9", b"xy", b"x"]
    stops = ["abab", "bca", "cc", "\u00e9"]
    table = stop_string_table(stops, pieces)
    assert table.shape[0] % 8 == 0 and (table[STOP_MATCHED] == STOP_MATCHED).all()
    for _ in range(400):
        ids = rng.integers(0, len(pieces), size=8)
        state, got, want = 0, None, None
        for k, t in enumerate(ids):
            state = table[state, t]
            if state == STOP_MATCHED and got is None:
                got = k
            text = b"".join(pieces[i] for i in ids[:k + 1])
            if want is None and any(s.encode() in text for s in stops):
                want = k
        assert got == want, ids
    # unknown token bytes restart the automaton: never a false match across them
    table = stop_string_table(["ab"], [b"a", None, b"b"])
    assert table[table[0, 0], 2] == STOP_MATCHED and table[table[table[0, 0], 1], 2] == 0
