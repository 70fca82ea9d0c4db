"""Medusa / Hydra draft heads on the target's last hidden state, chain or fixed tree.

The target's hidden state at the index whose distribution produced the last
emitted token (the root of the next round) feeds the heads: Medusa head i
predicts the token i + 1 places after the root, Hydra head i also sees the
embeddings of the root and the i tokens drafted before it on the node's path.
Drafts are deterministic (the rank-th most likely token of a head), so
acceptance is the exact rule for deterministic drafts (accept x with p(x),
siblings in turn), and greedy output equals plain greedy.

A fixed tree (`jaxar.decode.tree.fixed_tree` / `default_tree`) says, per node,
its depth and rank: node (depth d, rank r) is head d-1's r-th token
(Medusa: the same for every parent; Hydra: given the node's own path).
"""

from __future__ import annotations

import dataclasses
from typing import Tuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxar.config import ModelConfig
from jaxar.decode.drafters import register


@dataclasses.dataclass(frozen=True)
class HeadsDrafter:
    """State: (the target hidden state `[B, D]` that predicted the root, head params, target params)."""

    num_draft: int  # N nodes
    heads_config: object  # HeadsConfig
    base_config: ModelConfig
    parents: Tuple[int, ...]  # the fixed tree, topological
    depths: Tuple[int, ...]
    ranks: Tuple[int, ...]
    is_tree: bool = True

    @property
    def max_depth(self) -> int:
        return max(self.depths)

    @property
    def feature_layers(self):
        return (self.base_config.n_layers,)

    def init(self, params, prompts, lengths, cache_len, features):
        (h,) = features  # [B, P, D]; the last prefilled token predicts the prompt's last token
        idx = jnp.clip(lengths - 2, 0, h.shape[1] - 1)
        hidden = jnp.take_along_axis(h, idx[:, None, None], axis=1)[:, 0].astype(jnp.float32)
        return (hidden, params[0], params[1])

    def propose(self, state, ctx):
        from jaxar.models import heads

        head_params, base_params = params_of(state)
        hidden = state_hidden(state)
        B = hidden.shape[0]
        root = jnp.take_along_axis(ctx.seq, (ctx.seq_len - 1)[:, None], axis=1)[:, 0]
        parents = np.asarray(self.parents)
        depths = np.asarray(self.depths)
        ranks = np.asarray(self.ranks)
        K = int(ranks.max()) + 1
        tokens = [None] * self.num_draft
        if not self.heads_config.hydra:
            logits = heads.medusa_logits(head_params, base_params, hidden[:, None], config=self.heads_config,
                                         base_config=self.base_config)[:, 0]  # [B, H, V]
            top = jax.lax.top_k(logits[:, :self.max_depth], K)[1].astype(jnp.int32)  # [B, depth, K]
            out = top[:, depths - 1, ranks]  # [B, N]
        else:
            # per depth: the head of that depth on every distinct parent of that depth's nodes
            for d in range(1, self.max_depth + 1):
                nodes = np.nonzero(depths == d)[0]
                par = sorted(set(int(parents[j]) for j in nodes))
                paths = []
                for pj in par:
                    path = []
                    while pj >= 0:
                        path.append(pj)
                        pj = int(parents[pj])
                    paths.append(path[::-1])
                prev = [jnp.stack([root] + [tokens[j] for j in path], axis=1) for path in paths]  # [B, d]
                prev = jnp.stack(prev, axis=1)  # [B, P_d, d]
                n_par = len(par)
                lg = heads.hydra_head_logits(head_params, base_params, jnp.repeat(hidden, n_par, axis=0),
                                             prev.reshape(B * n_par, d), d - 1, config=self.heads_config,
                                             base_config=self.base_config).reshape(B, n_par, -1)
                top = jax.lax.top_k(lg, K)[1].astype(jnp.int32)  # [B, P_d, K]
                for j in nodes:
                    tokens[j] = top[:, par.index(int(parents[j])), ranks[j]]
            out = jnp.stack(tokens, axis=1)
        parents_arr = None
        if self.is_tree:
            parents_arr = jnp.broadcast_to(jnp.asarray(parents, jnp.int32)[None], (B, self.num_draft))
        return out, parents_arr, None, state

    def update(self, state, ctx, accepted, kept, seq, verified):
        (h,) = verified.hiddens  # [B, N+1, D]
        n = verified.accepted
        last = jnp.where(n > 0, jnp.take_along_axis(verified.path, jnp.maximum(n - 1, 0)[:, None], axis=1)[:, 0] + 1, 0)
        new = jnp.take_along_axis(h, last[:, None, None], axis=1)[:, 0]
        hidden = state_hidden(state)
        return with_hidden(state, jnp.where(ctx.active[:, None], new, hidden))


# The drafter's params (heads, target) travel in the state, as a draft model's do.
def params_of(state):
    return state[1], state[2]


def state_hidden(state):
    return state[0]


def with_hidden(state, hidden):
    return (hidden,) + tuple(state[1:])


def tree_spec(nodes: int, depth: int, topk: int, max_heads: int):
    """(parents, depths, ranks, is_tree) of the fixed tree for `--tree-nodes/--tree-depth/--tree-topk`."""
    from jaxar.decode import tree

    if depth < 1 or depth > max_heads:
        raise ValueError(f"tree depth must be in 1..{max_heads} (the run has {max_heads} heads), got {depth}")
    if nodes == 1:  # a chain of the heads' top-1 tokens
        return tuple(range(-1, depth - 1)), tuple(range(1, depth + 1)), (0,) * depth, False
    t = tree.default_tree(nodes, depth, topk)
    return tuple(int(x) for x in t.parents), tuple(int(x) for x in t.depth), tuple(int(x) for x in t.rank), True


@register("medusa")
def make(*, num_draft, target_config, draft_params=None, draft_config=None, target_params=None, tree_nodes=None,
         tree_depth=None, tree_topk=None, **_):
    if draft_params is None or draft_config is None or target_params is None:
        raise ValueError("draft='medusa' needs the heads' params and HeadsConfig (a trained heads run)")
    if getattr(draft_config, "kind", None) != "medusa":
        raise ValueError(f"draft='medusa' needs a Medusa/Hydra heads run, got kind {getattr(draft_config, 'kind', None)!r}")
    depth = int(tree_depth or draft_config.num_heads)
    nodes = int(tree_nodes or num_draft)
    parents, depths, ranks, is_tree = tree_spec(nodes, depth, int(tree_topk or 4), draft_config.num_heads)
    drafter = HeadsDrafter(num_draft=len(parents), heads_config=draft_config, base_config=target_config,
                             parents=parents, depths=depths, ranks=ranks, is_tree=is_tree)
    return drafter, (draft_params, target_params)
