"""Speculative Jacobi decoding (SJD) and its coupled variant (MC-SJD) as a drafter.

The draft of a round is a window of L tokens right after the accepted prefix,
each drawn from the distribution the target gave that position in the
previous round (its Jacobi iterate): the target's verify forward over
[last, x_0 .. x_{L-1}] yields p_0 .. p_L, where p_m is its distribution for
the token m places after the prefix *given the previous drafts*. After the
driver keeps `kept` tokens (accepted drafts + the correction / bonus token),
the window slides by `kept`: position j of the new window is position
i = kept + j of the old one, and its draft distribution becomes q_j = p_i
(i <= L); positions past L have no iterate yet and start from `init`:

* ``"random"``: q = uniform over the vocabulary (SJD's random initialisation);
* ``"previous"``: q = p_L, the newest distribution of the previous iteration.

SJD draws every window token afresh from its q. MC-SJD (`coupled`) keeps a
window token stable when its distribution barely moved: with x the token the
same position held last round (drawn from q_old), it keeps x with probability
min(1, q(x) / q_old(x)) and otherwise draws from norm(max(0, q − q_old)), the
maximal coupling of q_old and q. Either way the new draft is distributed as q
given everything the target's test conditions on (the old token was drawn from
q_old and never tested: a tested token was accepted or replaced), so the exact
rejection rule min(1, p/q) keeps the target's distribution exactly. Greedy rows
(one-hot q) draft the previous iteration's argmax, i.e. plain Jacobi iteration.

Randomness: round r of row b uses `row_keys(seed, B, r * (L + 2), row_ids)[b]`
(the acceptance test uses index L + 1) for two uniforms per window position:
the coupling's keep test, and an inverse-CDF draw (`inverse_cdf`).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jaxar.decode.drafters import register
from jaxar.decode.sampling import row_keys

INITS = ("random", "previous")


def inverse_cdf(weights, u) -> jax.Array:
    """int32 [...]: a draw from `weights [..., V]` (non-negative, not necessarily normalised; some entry > 0)
    for each uniform `u [...]` in [0, 1): the first index whose cumulative weight exceeds u * total."""
    cdf = jnp.cumsum(weights, axis=-1)
    t = jnp.maximum(u * cdf[..., -1], 1e-30)[..., None]
    return jnp.minimum(jnp.sum(cdf < t, axis=-1), weights.shape[-1] - 1).astype(jnp.int32)


@dataclasses.dataclass(frozen=True)
class JacobiDrafter:
    """State: (drafts [B, L] int32 last proposal, q_old [B, L, V] what they were drawn from,
    q [B, L, V] the distributions of the next proposal, has_old [B, L] whether q_old / drafts
    describe the same absolute position as q)."""

    num_draft: int  # window L
    vocab: int  # V: the drafted ids are 0..V-1
    coupled: bool = False  # MC-SJD's maximal coupling between successive windows
    init_mode: str = "random"
    wants_probs = True

    def __post_init__(self):
        if self.init_mode not in INITS:
            raise ValueError(f"jacobi init must be one of {INITS}, got {self.init_mode!r}")

    def init(self, params, prompts, lengths, cache_len):
        B, L, V = prompts.shape[0], self.num_draft, self.vocab
        q = jnp.full((B, L, V), 1.0 / V, jnp.float32)
        return (jnp.zeros((B, L), jnp.int32), q, q, jnp.zeros((B, L), bool))

    def propose(self, state, ctx):
        d_old, q_old, q, has_old = state
        B, L, V = q.shape
        keys = row_keys(ctx.seed, B, ctx.step * (L + 2), row_ids=ctx.row_ids)

        # two uniforms per window position (the coupling's test, the draw): an inverse-CDF draw needs no
        # per-entry noise, which on a CPU costs more than the forward (L x V random numbers per row and round)
        u = jax.vmap(lambda key: jax.random.uniform(key, (2, L), jnp.float32))(keys)
        fresh = inverse_cdf(q, u[:, 1])
        if self.coupled:
            qn = jnp.take_along_axis(q, d_old[..., None], axis=-1)[..., 0]
            qo = jnp.take_along_axis(q_old, d_old[..., None], axis=-1)[..., 0]
            keep = (u[:, 0] * qo < qn) | (qn >= qo)  # u < min(1, q(x) / q_old(x))
            resid = jnp.maximum(q - q_old, 0.0)
            redraw = inverse_cdf(resid, u[:, 1])
            # an all-zero residual means q == q_old: then keep holds (up to rounding); fall back to a fresh draw
            redraw = jnp.where(jnp.max(resid, axis=-1) > 0, redraw, fresh)
            drafts = jnp.where(has_old, jnp.where(keep & (qn > 0), d_old, redraw), fresh)
        else:
            drafts = fresh
        greedy = ctx.sampling.greedy[:, None]
        drafts = jnp.where(greedy, jnp.argmax(q, axis=-1).astype(jnp.int32), drafts)
        return drafts, None, q, (drafts, q, q, jnp.ones_like(has_old))

    def update(self, state, ctx, accepted, kept, seq, verified=None):
        drafts, q_prop, _, _ = state
        if verified is None or verified.probs is None:
            raise ValueError("the jacobi drafter needs the target's distributions: pass verified=Verified(probs=...)")
        p = verified.probs.astype(jnp.float32)  # [B, L+1, V]
        B, L, V = q_prop.shape
        shift = jnp.where(ctx.active, kept, 0)[:, None]  # [B, 1]
        i = shift + jnp.arange(L)[None]  # old window index of each new position
        take = lambda a, idx: jnp.take_along_axis(a, idx[..., None], axis=1)  # noqa: E731
        new_q = take(p, jnp.minimum(i, L))
        if self.init_mode == "random":
            new_q = jnp.where((i <= L)[..., None], new_q, 1.0 / V)
        inside = i < L
        d_old = jnp.where(inside, jnp.take_along_axis(drafts, jnp.minimum(i, L - 1), axis=1), 0)
        q_old = take(q_prop, jnp.minimum(i, L - 1))
        # a row that did not move (inactive) keeps its window as it was proposed
        still = (shift == 0)
        new_q = jnp.where(still[..., None], q_prop, new_q)
        return d_old, q_old, new_q, inside & ~still


def _make(num_draft, target_config, vocab=None, coupled=False, jacobi_init="random", **_):
    return JacobiDrafter(num_draft=num_draft, vocab=int(vocab or target_config.vocab_size), coupled=coupled,
                         init_mode=jacobi_init), None


@register("jacobi")
def make(*, num_draft, target_config, vocab=None, jacobi_init="random", **_):
    """SJD: window `num_draft`, every draft redrawn from the previous iteration's distribution."""
    return _make(num_draft, target_config, vocab, False, jacobi_init)


@register("mcjacobi")
def make_coupled(*, num_draft, target_config, vocab=None, jacobi_init="random", **_):
    """MC-SJD: SJD with maximally coupled successive drafts."""
    return _make(num_draft, target_config, vocab, True, jacobi_init)
