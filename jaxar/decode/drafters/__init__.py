"""Drafters for speculative decoding, one file each, looked up by name.

Every drafter is a hashable object (a jit static argument) with

    num_draft: int                                    N tokens per proposal
    init(params, prompts [B, P], lengths [B], cache_len) -> state
    propose(state, ctx: DraftContext) -> (drafts [B, N] int32,
                                          parents [B, N] int32 | None (None: a chain),
                                          draft_probs [B, N, V] float32 | None (None: deterministic drafts),
                                          state)
    update(state, ctx, accepted [B], kept [B], seq [B, L]) -> state

A tree drafter (`is_tree = True`) proposes N nodes in topological order with
`parents [B, N]` (-1: the root, i.e. the last emitted token; else an
earlier node) and `max_depth` (the deepest node's depth, static); its
`draft_probs` are None or `[B, N+1, V]`: index 0 the distribution the root's
children were drawn from, index j+1 node j's. A chain drafter's depth is N.

A drafter that reads the target's hidden states (Medusa heads, EAGLE) names
them in `feature_layers` (Hugging Face numbering, as `forward`'s
`hidden_layers`); then `init` also receives `features=` (the prefill's hidden
states, each [B, P, D], valid at positions < lengths - 1) and `update` also
receives `verified=Verified(...)` (the verify forward's hidden states at the
root and every node, the accepted path and the next token). A chain drafter
with `wants_probs = True` (Jacobi windows) receives `verified=` with `probs`,
the target's distributions at the N+1 verified positions (hiddens empty).

`params` are the drafter's own weights (a draft model's), None for
table-based drafters. `update` runs after the driver has kept `kept` tokens
of a round in which `accepted` drafts passed; `seq` is the sequence buffer
after the write, `ctx` the context the proposal saw. `state` is a pytree
carried through the decode loop.

A module here registers a factory with `@register("name")`:
`factory(*, num_draft, target_config, **options) -> (drafter, params)`,
where options are `draft_params`, `draft_config`, `ngram` (a factory takes
what it needs and ignores the rest). Every module in this package is
imported on first lookup, so a new drafter is a new file.
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import Any, Callable, Dict, NamedTuple, Tuple

import jax

from jaxar.decode.sampling import SamplingParams


class DraftContext(NamedTuple):
    """What a drafter may read in a round (all traced)."""

    seq: jax.Array  # [B, L] int32 prompt + output so far
    seq_len: jax.Array  # [B] int32 valid tokens in seq
    active: jax.Array  # [B] bool rows still generating
    step: jax.Array  # () int32 round index (key derivation: row_keys(seed, B, step * (N + 2) + i))
    seed: jax.Array  # () uint32
    sampling: SamplingParams  # per-row settings, for drafts sampled from processed distributions
    row_ids: Any = None  # [B] int32 ids folded into the rows' keys (row_keys(..., row_ids=)), None: 0..B-1


class Verified(NamedTuple):
    """What the verify forward of a round produced (for feature drafters)."""

    hiddens: tuple  # per feature layer [B, N+1, D]: index 0 the root (last token), j+1 draft node j
    path: jax.Array  # [B, depth] int32 accepted node per depth, -1 after `accepted`
    accepted: jax.Array  # [B] int32 drafts accepted (before EOS / budget truncation)
    next_token: jax.Array  # [B] int32 the correction / bonus token
    probs: Any = None  # [B, N+1, V] float32 the target's processed distributions (drafters with wants_probs)


def is_tree(drafter) -> bool:
    """Whether `drafter` proposes trees (parents) rather than chains."""
    return bool(getattr(drafter, "is_tree", False))


def max_depth(drafter) -> int:
    """Deepest draft position: N for a chain, the tree's depth for a tree."""
    return int(getattr(drafter, "max_depth", drafter.num_draft)) if is_tree(drafter) else int(drafter.num_draft)


_REGISTRY: Dict[str, Callable[..., Tuple[Any, Any]]] = {}
_loaded = False


def register(name: str):
    """Decorator: register a drafter factory under `name`."""

    def deco(factory):
        if name in _REGISTRY and _REGISTRY[name] is not factory:
            raise ValueError(f"drafter {name!r} is registered twice")
        _REGISTRY[name] = factory
        return factory

    return deco


def _load_all() -> None:
    global _loaded
    if not _loaded:
        for module in pkgutil.iter_modules(__path__):
            importlib.import_module(f"{__name__}.{module.name}")
        _loaded = True


def names() -> Tuple[str, ...]:
    """Registered drafter names, sorted."""
    _load_all()
    return tuple(sorted(_REGISTRY))


def make(name: str, *, num_draft: int, target_config, **options):
    """`(drafter, params)` for the drafter registered as `name`."""
    _load_all()
    if name not in _REGISTRY:
        raise ValueError(f"draft must be one of {', '.join(repr(n) for n in names())}, got {name!r}")
    if num_draft < 1:
        raise ValueError(f"num_draft must be >= 1, got {num_draft}")
    return _REGISTRY[name](num_draft=num_draft, target_config=target_config, **options)


__all__ = ["DraftContext", "Verified", "is_tree", "max_depth", "register", "names", "make"]
