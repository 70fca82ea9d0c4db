"""Drafters behind one interface, looked up by name; a new drafter is a new registration, not a new branch."""

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest

import jaxar
from jaxar.decode import drafters
from jaxar.decode.drafters import DraftContext, register
from jaxar.decode.generate import generate, pad_prompts
from jaxar.decode.sampling import SamplingConfig, SamplingParams
from jaxar.decode.speculative import speculative_generate

TARGET = jaxar.ModelConfig.llama(vocab_size=40, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, mlp_dim=48,
                                 max_seq_len=128, initializer_range=0.3)
SMALL = jaxar.ModelConfig.llama(vocab_size=40, d_model=16, n_layers=1, n_heads=2, mlp_dim=16, max_seq_len=128,
                                initializer_range=0.3)


@dataclasses.dataclass(frozen=True)
class RepeatDrafter:
    """Drafts the row's last token N times; counts its rounds in its state."""

    num_draft: int

    def init(self, params, prompts, lengths, cache_len):
        return jnp.zeros((prompts.shape[0],), jnp.int32)

    def propose(self, state, ctx):
        last = jnp.take_along_axis(ctx.seq, (ctx.seq_len - 1)[:, None], axis=1)
        return jnp.repeat(last, self.num_draft, axis=1), None, None, state

    def update(self, state, ctx, accepted, kept, seq):
        return state + ctx.active


@register("test_repeat")
def _make_repeat(*, num_draft, target_config, **_):
    return RepeatDrafter(num_draft), None


def test_registry_lists_the_drafters_and_rejects_unknown_names():
    assert {"model", "ngram", "trigram", "aded", "test_repeat"} <= set(drafters.names())
    with pytest.raises(ValueError, match=r"draft must be one of .*'ngram'.* got 'nope'"):
        drafters.make("nope", num_draft=2, target_config=TARGET)


def test_a_registered_drafter_plugs_into_speculative_generate():
    params = jaxar.init_params(TARGET, 0)
    toks, lens = pad_prompts([[1, 2, 2, 2], [5, 6, 7], [9]])
    plain = generate(params, toks, lens, config=TARGET, max_new_tokens=10, eos_ids=[3])
    spec = speculative_generate(params, toks, lens, config=TARGET, max_new_tokens=10, num_draft=3,
                                draft="test_repeat", eos_ids=[3])
    np.testing.assert_array_equal(spec.tokens, plain.tokens)
    np.testing.assert_array_equal(spec.num_tokens, plain.num_tokens)
    assert (np.asarray(spec.rounds) >= 1).all()


@pytest.mark.parametrize("name", ["model", "ngram", "trigram", "aded"])
def test_every_drafter_keeps_the_interface(name):
    B, N, P = 3, 4, 16
    drafter, dparams = drafters.make(name, num_draft=N, target_config=TARGET,
                                     draft_params=jaxar.init_params(SMALL, 1), draft_config=SMALL, ngram=2)
    toks, lens = pad_prompts([[1, 2, 3, 1, 2], [4, 5], [6, 7, 8, 9]])
    lens = jnp.asarray(lens)
    state = drafter.init(dparams, jnp.asarray(toks), lens, 64)
    seq = jnp.zeros((B, P + 16), jnp.int32).at[:, :P].set(toks)
    ctx = DraftContext(seq=seq, seq_len=lens, active=jnp.ones((B,), bool), step=jnp.int32(0),
                       seed=jnp.uint32(0), sampling=SamplingParams.build(SamplingConfig(temperature=1.0), B))
    drafts, parents, probs, state = drafter.propose(state, ctx)
    assert drafts.shape == (B, N) and drafts.dtype == jnp.int32 and parents is None
    assert ((np.asarray(drafts) >= 0) & (np.asarray(drafts) < TARGET.vocab_size)).all()
    if name == "model":
        assert probs.shape == (B, N, TARGET.vocab_size)
        np.testing.assert_allclose(np.asarray(probs).sum(-1), 1.0, rtol=1e-5)
    else:
        assert probs is None
    kept = jnp.array([2, 1, 3], jnp.int32)
    new_seq = seq.at[jnp.arange(B)[:, None], lens[:, None] + jnp.arange(N)[None]].set(drafts)
    drafter.update(state, ctx, kept - 1, kept, new_seq)
