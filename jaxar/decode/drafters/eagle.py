"""The EAGLE-style feature drafter: one decoder layer on the target's fused features, dynamic trees.

Position t of the drafter reads (token t+1, feature t), where the feature is
the fused target hidden state (low / mid / high layers) when the target has
scored position t, and otherwise the drafter's own output hidden state of its
parent. Its cache holds every position the target has confirmed; the tree of
a round is grown on top of it without advancing its length (EAGLE-2): the
depth-1 candidates are the top-k tokens of the drafter's distribution after
the root; at each further depth the k best candidates (by cumulative draft
log-probability) are expanded by their own top-k, and the best N of all
candidates form the tree (`jaxar.decode.tree.dynamic_tree`). A frontier node
is scored by feeding its root path (at most depth tokens, block-diagonal
causal mask), so the drafter's cache is never polluted and every shape is
fixed by (depth, top-k, N).

Drafts are deterministic (distinct top-k children), so acceptance is the
exact rule for deterministic drafts; greedy output equals plain greedy.

Draft vocabulary (EAGLE-3): with `draft_vocab` ids (the most frequent ids of
the training data, `jaxar.train.drafter.draft_vocabulary`), the drafter's
output projection covers only those rows of the target's head, gathered once
per call. At a 49k vocabulary the full head is the largest read of a
drafting step (one per depth); drafts outside the subset are never proposed,
which costs acceptance only, never exactness.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from jaxar.config import ModelConfig
from jaxar.decode.drafters import register


@dataclasses.dataclass(frozen=True)
class EagleDrafter:
    """State: (drafter cache, root hidden [B, D], root log-probs [B, V], drafter params, target params,
    draft head: (rows [Vs, D], ids [Vs]) of the draft vocabulary, or the target params).

    The drafter cache holds positions 0 .. seq_len - 2 (every position whose
    target feature is known); the root hidden / log-probs are its output at
    position seq_len - 2, which reads the root token (seq_len - 1)."""

    num_draft: int  # N tree nodes
    heads_config: object  # HeadsConfig (kind eagle)
    base_config: ModelConfig
    depth: int
    topk: int
    is_tree: bool = True
    draft_vocab: int = 0  # size of the draft vocabulary (0: the whole vocabulary)

    @property
    def max_depth(self) -> int:
        return self.depth

    @property
    def feature_layers(self):
        return tuple(self.heads_config.layers_for(self.base_config))

    @property
    def slack(self) -> int:
        return self.topk * self.depth  # cache slots the tree scoring writes past the length

    def _lm(self, head, hidden):
        """Draft log-probs over the draft vocabulary (head: (rows [Vs, D], ids [Vs]) or the target params)."""
        from jaxar.models import heads

        if self.draft_vocab:
            rows, _ = head
            logits = jax.lax.dot_general(hidden.astype(rows.dtype), rows, (((hidden.ndim - 1,), (1,)), ((), ())))
        else:
            logits = heads.base_lm_head(head, hidden, self.base_config)
        return jax.nn.log_softmax(logits.astype(jnp.float32), -1)

    def _head(self, base_params, ids):
        from jaxar.models import heads

        if not self.draft_vocab:
            return base_params
        if self.base_config.tie_embeddings:
            rows = heads.base_embed(base_params, ids, self.base_config)
        else:
            rows = jnp.take(base_params["lm_head"]["kernel"], ids, axis=1).T.astype(jnp.dtype(self.base_config.dtype))
        return rows, ids

    def _ids(self, head, tokens):
        return jnp.take(head[1], tokens, axis=0) if self.draft_vocab else tokens

    def init(self, params, prompts, lengths, cache_len, features):
        from jaxar.models import heads

        e_params, base_params, ids = params
        B, P = prompts.shape
        cache = heads.eagle_cache(self.heads_config, self.base_config, B, cache_len + self.slack)
        fused = heads.eagle_fuse(e_params, features)  # [B, P, D]
        nxt = jnp.concatenate([prompts[:, 1:], jnp.zeros((B, 1), prompts.dtype)], axis=1)  # token t+1
        n = jnp.maximum(lengths - 1, 0)
        _, hidden, cache = heads.eagle_forward(e_params, base_params, nxt, fused, config=self.heads_config,
                                               base_config=self.base_config, cache=cache, num_new=n)
        h = jnp.take_along_axis(hidden, jnp.clip(n - 1, 0, P - 1)[:, None, None], axis=1)[:, 0]
        head = self._head(base_params, ids)
        return cache, h.astype(jnp.float32), self._lm(head, h), e_params, base_params, head

    def propose(self, state, ctx):
        from jaxar.decode import tree
        from jaxar.models import heads

        cache, root_h, root_logp, e_params, base_params, head = state
        B = root_h.shape[0]
        k, depth = self.topk, self.depth
        M = k + (depth - 1) * k * k
        D = root_h.shape[-1]
        start = cache.lengths  # the position of a depth-1 candidate

        def expand(hid, cand_tokens, cand_parents, frontier, d):
            # chains [B, k, d]: each frontier node's root path, depth 1 first
            chain = [frontier]
            for _ in range(d - 1):
                chain.append(jnp.take_along_axis(cand_parents, jnp.maximum(chain[-1], 0), axis=1))
            chain = jnp.stack(chain[::-1], axis=2)
            toks = self._ids(head, jnp.take_along_axis(cand_tokens, chain.reshape(B, k * d), axis=1))
            # feature of the node at depth i: the root hidden (i = 1) or its parent's hidden
            parent_h = jnp.take_along_axis(hid, jnp.maximum(chain, 0).reshape(B, k * d, 1), axis=1)
            feats = parent_h.reshape(B, k, d, D)
            feats = jnp.concatenate([jnp.broadcast_to(root_h[:, None, None], (B, k, 1, D)), feats[:, :, :-1]], 2)
            feats = feats.reshape(B, k * d, D)
            pos = start[:, None] + jnp.tile(jnp.arange(d, dtype=jnp.int32), k)[None]
            blk = np.kron(np.eye(k, dtype=bool), np.tril(np.ones((d, d), bool)))
            mask = jnp.broadcast_to(jnp.asarray(blk)[None], (B, k * d, k * d))
            _, hidden, _ = heads.eagle_forward(e_params, base_params, toks, feats, config=self.heads_config,
                                               base_config=self.base_config, cache=cache, positions=pos,
                                               tree_mask=mask, num_new=jnp.zeros((B,), jnp.int32))
            ends = hidden.reshape(B, k, d, D)[:, :, -1]  # [B, k, D]
            hid = jax.vmap(lambda h, f, e: h.at[f].set(e))(hid, frontier, ends.astype(hid.dtype))
            return hid, self._lm(head, ends)

        hid0 = jnp.zeros((B, M, D), jnp.float32)
        tokens, parents, _ = tree.dynamic_tree(expand, hid0, root_logp, depth=depth, topk=k, n=self.num_draft)
        return self._ids(head, tokens).astype(jnp.int32), parents.astype(jnp.int32), None, state

    def update(self, state, ctx, accepted, kept, seq, verified):
        from jaxar.models import heads

        cache, root_h, root_logp, e_params, base_params, head = state
        B, L = seq.shape
        depth = self.depth
        fused = heads.eagle_fuse(e_params, verified.hiddens)  # [B, N+1, D] at root and nodes
        idx = jnp.concatenate([jnp.zeros((B, 1), jnp.int32), jnp.maximum(verified.path, 0) + 1], axis=1)
        feats = jnp.take_along_axis(fused, idx[:, :, None], axis=1)  # [B, depth+1, D]
        # the tokens after those positions: the accepted drafts and the next token, now in seq
        toks = jnp.take_along_axis(seq, jnp.clip(ctx.seq_len[:, None] + jnp.arange(depth + 1)[None], 0, L - 1), 1)
        n = jnp.where(ctx.active, verified.accepted + 1, 0)
        _, hidden, cache = heads.eagle_forward(e_params, base_params, toks, feats, config=self.heads_config,
                                               base_config=self.base_config, cache=cache, num_new=n)
        h = jnp.take_along_axis(hidden, jnp.maximum(n - 1, 0)[:, None, None], axis=1)[:, 0].astype(jnp.float32)
        h = jnp.where(ctx.active[:, None], h, root_h)
        return cache, h, self._lm(head, h), e_params, base_params, head


@register("eagle")
def make(*, num_draft, target_config, draft_params=None, draft_config=None, target_params=None, tree_nodes=None,
         tree_depth=None, tree_topk=None, draft_vocab=None, **_):
    if draft_params is None or draft_config is None or target_params is None:
        raise ValueError("draft='eagle' needs the drafter's params and HeadsConfig (a trained EAGLE run)")
    ids = None
    if draft_vocab is not None:
        ids = np.unique(np.asarray(draft_vocab, np.int64))
        if ids.ndim != 1 or ids.size < 1 or ids[0] < 0 or ids[-1] >= target_config.vocab_size:
            raise ValueError(f"draft_vocab must be ids in 0..{target_config.vocab_size - 1}")
        if not target_config.tie_embeddings and set(target_params["lm_head"]) - {"kernel"}:
            ids = None  # a quantized or biased untied head: draft over the whole vocabulary
        if ids is not None and ids.size >= target_config.vocab_size:
            ids = None
    if getattr(draft_config, "kind", None) != "eagle":
        raise ValueError(f"draft='eagle' needs an EAGLE run, got kind {getattr(draft_config, 'kind', None)!r}")
    depth = int(tree_depth or num_draft)
    nodes = int(tree_nodes or num_draft)
    topk = 1 if nodes == 1 else int(tree_topk or 4)
    if nodes == 1:
        nodes = depth  # a chain: the top-1 token at each depth
    if depth < 1 or topk < 1:
        raise ValueError(f"tree depth and top-k must be >= 1, got {depth} and {topk}")
    most = topk + (depth - 1) * topk * topk
    if nodes > most:
        raise ValueError(f"tree_nodes={nodes} exceeds the {most} candidates of depth {depth} x top-k {topk}")
    if nodes < depth and topk == 1:
        raise ValueError(f"a chain of depth {depth} has {depth} nodes, got {nodes}")
    drafter = EagleDrafter(num_draft=nodes, heads_config=draft_config, base_config=target_config, depth=depth,
                           topk=topk, draft_vocab=0 if ids is None else int(ids.size))
    if ids is not None and topk > ids.size:
        raise ValueError(f"tree_topk={topk} exceeds the draft vocabulary of {ids.size} ids")
    return drafter, (draft_params, target_params, None if ids is None else jnp.asarray(ids, jnp.int32))
