"""The decode driver (jaxar.decode.loop): stop rules against a plain-Python
reference, and one compiled program across changed sampling settings."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxar
from jaxar.decode import loop
from jaxar.decode.generate import _generate, generate, pad_prompts
from jaxar.decode.loop import FINISH_LENGTH, FINISH_STOP, StepOutput
from jaxar.decode.sampling import SamplingConfig, SamplingParams


def _reference(script, n_emitted, budgets, eos, pad):
    """Plain-Python driver: per row, take each step's emitted tokens up to the
    first EOS and the budget; stop at EOS (stop) or budget (length)."""
    outs = []
    for b in range(len(budgets)):
        toks, reason = [], FINISH_LENGTH
        for s in range(len(script)):
            if len(toks) >= budgets[b] or reason == FINISH_STOP:
                break
            for t in script[s][b][: n_emitted[s][b]]:
                if len(toks) >= budgets[b]:
                    break
                toks.append(t)
                if t in eos:
                    reason = FINISH_STOP
                    break
        outs.append((toks, reason))
    return outs


@pytest.mark.parametrize("n", [1, 3])
def test_emit_rules_match_python_reference(n):
    rng = np.random.default_rng(n)
    B, steps, width, eos, pad = 5, 12, 16, (2, 7), -1
    script = rng.integers(0, 10, (steps, B, n)).astype(np.int32)
    n_emitted = rng.integers(1, n + 1, (steps, B)).astype(np.int32)
    budgets = np.array([16, 5, 0, 9, 1], np.int32)
    prompts, lengths = pad_prompts([[1, 3], [4], [5, 5, 5], [6, 8, 9, 3], [1]])

    @jax.jit
    def drive(script, n_emitted):
        def step(state):
            i = jnp.minimum(state.step, steps - 1)
            return state.inner, StepOutput(tokens=script[i], n_emitted=n_emitted[i])

        state = loop.init_state(prompts, lengths, budgets, eos, width, inner=jnp.int32(0))
        state = loop.run(step, state)
        return loop.outputs(state, width, pad)[0], state.num_tokens, state.finish_reason, state.seq

    tokens, num, reason, seq = drive(script, n_emitted)
    ref = _reference(script.tolist(), n_emitted.tolist(), budgets.tolist(), eos, pad)
    for b, (toks, why) in enumerate(ref):
        assert int(num[b]) == len(toks)
        assert tokens[b].tolist() == toks + [pad] * (width - len(toks))
        assert int(reason[b]) == why
        # the buffer holds the prompt then the output
        assert seq[b, : lengths[b] + len(toks)].tolist() == list(prompts[b, : lengths[b]]) + toks


def test_new_sampling_settings_reuse_one_compiled_program():
    config = jaxar.ModelConfig.llama(vocab_size=40, d_model=16, n_layers=1, n_heads=2, mlp_dim=24, max_seq_len=128,
                                     initializer_range=0.4, eos_token_id=[3])
    params = jaxar.init_params(config, 0)
    toks, lens = pad_prompts([[1, 2, 3], [4, 5], [6]])
    settings = [
        dict(sampling=SamplingConfig(temperature=0.0), max_new_tokens=9),
        dict(sampling=SamplingConfig(temperature=0.7, top_k=5), max_new_tokens=12, seed=3),
        dict(sampling=SamplingConfig(temperature=1.3, top_p=0.8, min_p=0.05), max_new_tokens=16, seed=4),
        dict(sampling=SamplingConfig(temperature=0.9, repetition_penalty=1.4), max_new_tokens=10),
        dict(sampling=[SamplingConfig(temperature=0.0), SamplingConfig(temperature=0.5, top_k=2),
                       SamplingConfig(temperature=1.0, repetition_penalty=0.8)], max_new_tokens=11,
             budgets=[4, 11, 7], eos_ids=[5, 6]),
    ]
    # unpadded prompts of other widths fall in the same prompt bucket
    other_toks, other_lens = pad_prompts([[7, 8, 9, 10, 11, 12, 13], [1], [2, 2]], bucket=False)
    before = _generate._cache_size()
    for i, kw in enumerate(settings):
        t, l_ = (toks, lens) if i % 2 else (other_toks, other_lens)
        out = generate(params, t, l_, config=config, **kw)
        assert out.tokens.shape == (3, kw["max_new_tokens"])
    assert _generate._cache_size() - before == 1


def test_speculative_reuses_its_program_across_sampling_settings():
    from jaxar.decode.speculative import _speculative, speculative_generate

    config = jaxar.ModelConfig.llama(vocab_size=40, d_model=16, n_layers=1, n_heads=2, mlp_dim=24, max_seq_len=128,
                                     initializer_range=0.4)
    params = jaxar.init_params(config, 0)
    toks, lens = pad_prompts([[1, 2, 3, 1, 2], [4, 5]])
    before = _speculative._cache_size()
    for kw in (dict(sampling=SamplingConfig(temperature=0.0), max_new_tokens=9),
               dict(sampling=SamplingConfig(temperature=0.8, top_k=4), max_new_tokens=13, seed=2),
               dict(sampling=[SamplingConfig(temperature=0.0), SamplingConfig(temperature=1.1, top_p=0.9)],
                    max_new_tokens=16, eos_ids=[4])):
        speculative_generate(params, toks, lens, config=config, num_draft=3, draft="ngram", **kw)
    assert _speculative._cache_size() - before == 1


def test_per_row_settings_equal_each_setting_alone():
    """A batch mixing greedy and sampled rows gives every row what a batch with
    that row's setting everywhere gives it (keys are per row)."""
    config = jaxar.ModelConfig.llama(vocab_size=30, d_model=16, n_layers=1, n_heads=2, mlp_dim=24, max_seq_len=64,
                                     initializer_range=0.5)
    params = jaxar.init_params(config, 1)
    toks, lens = pad_prompts([[1, 2, 3, 1, 2], [4, 5], [6, 7, 8], [9]])
    rows = [SamplingConfig(temperature=0.0, repetition_penalty=1.5), SamplingConfig(temperature=0.8, top_k=4),
            SamplingConfig(temperature=1.2, top_p=0.7), SamplingConfig(temperature=1.0, min_p=0.1)]
    mixed = generate(params, toks, lens, config=config, max_new_tokens=10, sampling=rows, seed=9, eos_ids=[],
                     return_logprobs=True)
    for b, cfg in enumerate(rows):
        alone = generate(params, toks, lens, config=config, max_new_tokens=10, sampling=cfg, seed=9, eos_ids=[],
                         return_logprobs=True)
        np.testing.assert_array_equal(mixed.tokens[b], alone.tokens[b])
        np.testing.assert_allclose(mixed.logprobs[b], alone.logprobs[b], rtol=1e-6, atol=1e-6)


def test_bad_per_row_settings_are_one_line_errors():
    with pytest.raises(ValueError, match="one per row"):
        SamplingParams.build([SamplingConfig()] * 2, 3)
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams.build([SamplingConfig(), SamplingConfig(top_p=0.0)], 2)
    with pytest.raises(ValueError, match=r"shape \(2,\)"):
        SamplingParams.build(SamplingParams.build(SamplingConfig(), 3), 2)
