"""Draft trees for speculative decoding: shapes, masks, dynamic expansion, acceptance, cache compaction.

Layout, per batch row, static shapes: N draft nodes in topological order.

* ``tokens [B, N]`` int32 draft tokens; ``parents [B, N]`` int32: -1 is the
  root (the last emitted token, the one the target cache lacks), otherwise
  the index of the parent node, always smaller than the node's own index.
* The target verifies ``[root, node_0 .. node_{N-1}]`` (T = N + 1 tokens) in
  one forward: index 0 is the root, node j is at index j + 1.
  ``tree_mask [B, T, T]``: query i sees key j iff j is i or an ancestor of i.
  Positions: the root at ``start``, a node at ``start + depth`` (the root's
  children have depth 1).
* ``p [B, T, V]``: the target's next-token distribution after each index.
  ``q [B, T, V]`` or None: ``q[:, j]`` is the draft distribution the
  children of index j were drawn from (i.i.d., with replacement); None means
  deterministic drafts (siblings distinct, e.g. top-k), i.e. ``q`` one-hot per
  child.
* Acceptance returns ``(path [B, D], n_acc [B], next_token [B])``:
  ``path[:, i]`` is the node accepted at depth i + 1, -1 from ``n_acc`` on;
  D = the tree's maximum depth (static). The emitted tokens are
  ``tokens[path[:n_acc]]`` then ``next_token``.

Fixed (Medusa-style) trees are built on the host from lists of rank paths
(:func:`fixed_tree`, :func:`chain_tree`, :func:`default_tree`); dynamic
(EAGLE-2) trees are grown on device by :func:`dynamic_tree`.
"""

from __future__ import annotations

import functools
import heapq
from fractions import Fraction
from typing import Callable, NamedTuple, Sequence, Tuple

import numpy as np
import jax
import jax.numpy as jnp

from jaxar.cache import KVCache
from jaxar.decode.acceptance import TINY, first_argmax, key_layout

__all__ = [
    "FixedTree",
    "fixed_tree",
    "chain_tree",
    "default_tree",
    "tree_mask",
    "tree_depths",
    "tree_positions",
    "select_top_nodes",
    "dynamic_tree",
    "tree_accept_greedy",
    "draw_tree_randomness",
    "tree_accept_from_randomness",
    "tree_accept",
    "tree_accept_typical",
    "compact_cache",
]


# ----------------------------------------------------------------------------------------------------------------
# Fixed trees (host side)


class FixedTree(NamedTuple):
    """A static draft tree (numpy, one for every row).

    ``choices[j]`` is node j's path of ranks from the root; node j's token is
    the ``rank[j]``-th most likely token of draft head ``depth[j] - 1`` (Medusa)
    or of its parent's draft distribution.
    """

    parents: np.ndarray  # [N] int32, -1: the root
    depth: np.ndarray  # [N] int32, 1-based
    rank: np.ndarray  # [N] int32, the last element of the node's path
    max_depth: int
    choices: Tuple[Tuple[int, ...], ...]

    @property
    def n_nodes(self) -> int:
        return int(self.parents.shape[0])

    @property
    def topk(self) -> int:
        """How many candidates per depth the tree reads (max rank + 1)."""
        return int(self.rank.max()) + 1

    def batched_parents(self, batch: int) -> jax.Array:
        """``parents`` broadcast to ``[batch, N]`` int32."""
        return jnp.broadcast_to(jnp.asarray(self.parents, jnp.int32), (batch, self.n_nodes))

    def tokens_from_topk(self, topk_tokens) -> jax.Array:
        """Node tokens ``[B, N]`` from per-depth candidates ``[B, max_depth, K]``
        (``K >= topk``; entry ``[b, d, r]`` = the rank-r token of head d):
        node j gets ``topk_tokens[:, depth[j] - 1, rank[j]]``."""
        topk_tokens = jnp.asarray(topk_tokens)
        if topk_tokens.ndim != 3 or topk_tokens.shape[1] != self.max_depth or topk_tokens.shape[2] < self.topk:
            raise ValueError(f"topk_tokens must be [B, {self.max_depth}, >= {self.topk}], got {topk_tokens.shape}")
        return topk_tokens[:, self.depth - 1, self.rank].astype(jnp.int32)


def fixed_tree(choices: Sequence[Sequence[int]]) -> FixedTree:
    """A :class:`FixedTree` from Medusa-style choices, e.g. ``[(0,), (1,), (0, 0), (0, 1), (0, 0, 0)]``.

    Each choice is a non-empty path of non-negative ranks; every proper prefix
    of a choice must be a choice too, and no choice may repeat. Nodes are
    sorted by (length, lexicographic), so parents precede children.
    """
    paths = []
    for c in choices:
        try:
            path = tuple(int(r) for r in c)
        except TypeError:
            raise ValueError(f"each choice must be a sequence of ints, got {c!r}") from None
        if not path or min(path) < 0:
            raise ValueError(f"each choice must be a non-empty path of ranks >= 0, got {c!r}")
        paths.append(path)
    if not paths:
        raise ValueError("a tree needs at least one choice")
    if len(set(paths)) != len(paths):
        dup = next(p for p in paths if paths.count(p) > 1)
        raise ValueError(f"choice {dup} appears more than once")
    known = set(paths)
    for path in paths:
        for d in range(1, len(path)):
            if path[:d] not in known:
                raise ValueError(f"choice {path} lacks its prefix {path[:d]}")
    paths.sort(key=lambda p: (len(p), p))
    index = {p: i for i, p in enumerate(paths)}
    parents = np.array([index[p[:-1]] if len(p) > 1 else -1 for p in paths], np.int32)
    depth = np.array([len(p) for p in paths], np.int32)
    rank = np.array([p[-1] for p in paths], np.int32)
    return FixedTree(parents=parents, depth=depth, rank=rank, max_depth=int(depth.max()), choices=tuple(paths))


def chain_tree(depth: int) -> FixedTree:
    """The chain of ``depth`` nodes, each the top-1 token: ``(0,), (0, 0), ...``."""
    if int(depth) < 1:
        raise ValueError(f"depth must be >= 1, got {depth}")
    return fixed_tree([(0,) * d for d in range(1, int(depth) + 1)])


def default_tree(n_nodes: int, depth: int, topk: int) -> FixedTree:
    """The ``n_nodes`` most probable rank paths under a Zipf rank prior.

    A rank-r candidate is taken to be right with probability
    ``w(r) = (1 / (r + 1)) / H`` (``H = sum_{r < topk} 1 / (r + 1)``),
    independently per depth, so a path's prior is the product of its ranks'
    ``w``. Paths have at most ``depth`` ranks, each ``< topk``. The result is
    the best ``n_nodes`` paths, ties broken toward shorter and then
    lexicographically smaller paths (exact rational arithmetic, so the result
    is deterministic). Since every extension is at most as probable as its
    prefix, the set is prefix-closed.
    """
    n_nodes, depth, topk = int(n_nodes), int(depth), int(topk)
    if n_nodes < 1 or depth < 1 or topk < 1:
        raise ValueError(f"n_nodes, depth and topk must be >= 1, got {n_nodes}, {depth}, {topk}")
    total = sum(topk ** d for d in range(1, depth + 1))
    if n_nodes > total:
        raise ValueError(f"a tree of depth {depth} and top-{topk} has only {total} nodes, asked for {n_nodes}")
    norm = sum(Fraction(1, r + 1) for r in range(topk))
    weight = [Fraction(1, r + 1) / norm for r in range(topk)]
    # best-first search: children are never more probable than their parent
    heap = [(-weight[r], 1, (r,)) for r in range(topk)]
    heapq.heapify(heap)
    chosen = []
    while len(chosen) < n_nodes:
        neg, length, path = heapq.heappop(heap)
        chosen.append(path)
        if length < depth:
            for r in range(topk):
                heapq.heappush(heap, (neg * weight[r], length + 1, path + (r,)))
    return fixed_tree(chosen)


# ----------------------------------------------------------------------------------------------------------------
# Masks, depths, positions


def _check_parents(parents):
    parents = jnp.asarray(parents) if not isinstance(parents, np.ndarray) else parents
    if parents.ndim != 2:
        raise ValueError(f"parents must be [B, N], got shape {parents.shape}")
    if not jnp.issubdtype(parents.dtype, jnp.integer):
        raise ValueError(f"parents must be integers, got {parents.dtype}")
    if isinstance(parents, np.ndarray):  # host values: check the topological order once here
        own = np.arange(parents.shape[1])[None]
        if np.any(parents < -1) or np.any(parents >= own):
            raise ValueError("parents[b, j] must be -1 (the root) or a node index < j")
    return jnp.asarray(parents, jnp.int32)


@jax.jit
def _ancestors(parents):
    """[B, N+1, N+1] bool ancestor-or-self matrix over [root, nodes] (pointer doubling)."""
    B, N = parents.shape
    T = N + 1
    # parent of every index; the root is its own parent so jumps saturate there
    jump = jnp.concatenate([jnp.zeros((B, 1), jnp.int32), parents.astype(jnp.int32) + 1], axis=1)  # [B, T]
    anc = jnp.broadcast_to(jnp.eye(T, dtype=bool), (B, T, T))
    # after s steps anc holds the ancestors at distance < 2**s and jump the 2**s-th ancestor
    for _ in range(int(np.ceil(np.log2(T))) if T > 1 else 0):
        anc = anc | jnp.take_along_axis(anc, jump[:, :, None], axis=1)
        jump = jnp.take_along_axis(jump, jump, axis=1)
    return anc


def tree_mask(parents) -> jax.Array:
    """``[B, N+1, N+1]`` bool: query i sees key j iff j is i or an ancestor of i
    (index 0 the root, node j at j + 1). Jit-able for traced ``parents [B, N]``."""
    return _ancestors(_check_parents(parents))


def tree_depths(parents) -> jax.Array:
    """``[B, N]`` int32 depth of every node (the root's children: 1)."""
    anc = _ancestors(_check_parents(parents))
    return (jnp.sum(anc[:, 1:], axis=-1) - 1).astype(jnp.int32)


def tree_positions(parents, start) -> jax.Array:
    """``[B, N+1]`` int32 positions: the root at ``start [B]``, node j at ``start + depth_j``."""
    parents = _check_parents(parents)
    depths = tree_depths(parents)
    start = jnp.asarray(start, jnp.int32)
    if start.shape != (parents.shape[0],):
        raise ValueError(f"start must be [B] = ({parents.shape[0]},), got shape {start.shape}")
    return start[:, None] + jnp.concatenate([jnp.zeros_like(depths[:, :1]), depths], axis=1)


# ----------------------------------------------------------------------------------------------------------------
# Dynamic trees (EAGLE-2)


def _top_by_score(scores, n: int):
    """Indices [B, n] of the n largest scores, ties toward the lower index (in rank order)."""
    B, M = scores.shape
    iota = jnp.broadcast_to(jnp.arange(M, dtype=jnp.int32), (B, M))
    # lexicographic sort on (-score, index): NaN-free scores assumed
    _, order = jax.lax.sort((-scores.astype(jnp.float32), iota), dimension=1, num_keys=2)
    return order[:, :n]


def select_top_nodes(scores, parents, n: int):
    """Keep the ``n`` candidates with the highest cumulative scores.

    Args:
      scores: ``[B, M]`` float cumulative scores (log-probabilities of the
        path); a child's score must not exceed its parent's.
      parents: ``[B, M]`` int32 candidate parents (-1 the root, else an index
        smaller than the candidate's own).
      n: how many to keep (static, ``<= M``).

    Ties go to the lower index, so (with the two conditions above) the kept set
    is ancestor-closed. Returns ``(index [B, n], parents [B, n])``: the kept
    candidates in increasing index order (so topological) and their parents
    renumbered into ``0..n-1`` (-1 the root).
    """
    scores = jnp.asarray(scores)
    parents = jnp.asarray(parents, jnp.int32)
    if scores.ndim != 2 or parents.shape != scores.shape:
        raise ValueError(f"scores and parents must both be [B, M], got {scores.shape} and {parents.shape}")
    B, M = scores.shape
    n = int(n)
    if not 1 <= n <= M:
        raise ValueError(f"n must be in 1..{M} (the number of candidates), got {n}")
    return _select_top_nodes(scores, parents, n)


@functools.partial(jax.jit, static_argnums=2)
def _select_top_nodes(scores, parents, n):
    B, M = scores.shape
    index = jnp.sort(_top_by_score(scores, n), axis=1)
    rows = jnp.arange(B)[:, None]
    new_index = jnp.full((B, M), -1, jnp.int32).at[rows, index].set(jnp.arange(n, dtype=jnp.int32)[None])
    old_parent = jnp.take_along_axis(parents, index, axis=1)
    new_parent = jnp.where(old_parent < 0, -1, jnp.take_along_axis(new_index, jnp.maximum(old_parent, 0), axis=1))
    return index, new_parent


def dynamic_tree(expand: Callable, state, root_logp, *, depth: int, topk: int, n: int):
    """Grow an EAGLE-2 draft tree and keep its ``n`` most probable nodes.

    Candidates, in this (ancestor-first) order:

    * depth 1: the ``topk`` most likely tokens of ``root_logp [B, V]``
      (log-probabilities of the token after the root), scored by their log-prob;
    * depth d + 1 (d = 1 .. depth-1): the frontier is the ``topk`` best
      depth-d candidates by cumulative score; the drafter returns each
      frontier node's next-token log-probs and each frontier node gets its
      ``topk`` most likely tokens as children (frontier i's rank-r child
      is candidate ``offset + i * topk + r``), scored parent score + log-prob.

    ``M = topk + (depth - 1) * topk**2`` candidates in all; the result is
    :func:`select_top_nodes` of them (ancestor-closed, topological). Siblings
    are distinct tokens, so the drafts are deterministic (verify with
    ``q=None``).

    Args:
      expand: the drafter's callback
        ``expand(state, cand_tokens [B, m], cand_parents [B, m], frontier [B, topk], d) -> (state, logp [B, topk, V])``
        where ``m`` is the number of candidates so far (all of depth <= d),
        ``frontier`` holds candidate indices (all at depth ``d``, best first)
        and ``d`` (Python int, 1-based) is the frontier's depth. It must
        return the log-probs of the token after each frontier node, i.e. it
        attends the frontier's ancestry, which it reads from the candidate
        arrays. Called for d = 1 .. depth-1 (not at all for depth 1).
      state: the drafter's state, threaded through ``expand``.
      root_logp: ``[B, V]`` draft log-probabilities after the root.
      depth, topk, n: static ints (``n <= M``).

    Returns ``(tokens [B, n] int32, parents [B, n] int32, state)``.
    """
    depth, topk, n = int(depth), int(topk), int(n)
    root_logp = jnp.asarray(root_logp)
    if root_logp.ndim != 2:
        raise ValueError(f"root_logp must be [B, V], got shape {root_logp.shape}")
    B, V = root_logp.shape
    if depth < 1 or not 1 <= topk <= V:
        raise ValueError(f"need depth >= 1 and 1 <= topk <= V={V}, got depth={depth}, topk={topk}")
    M = topk + (depth - 1) * topk * topk
    if not 1 <= n <= M:
        raise ValueError(f"n must be in 1..{M} (topk + (depth - 1) * topk**2 candidates), got {n}")
    values, tokens = jax.lax.top_k(root_logp.astype(jnp.float32), topk)
    cand_tokens = tokens.astype(jnp.int32)
    cand_parents = jnp.full((B, topk), -1, jnp.int32)
    scores = values
    level_start = 0  # first candidate index of the newest depth
    for d in range(1, depth):
        level = scores[:, level_start:]
        frontier = level_start + _top_by_score(level, topk)  # [B, topk] candidate indices, best first
        state, logp = expand(state, cand_tokens, cand_parents, frontier, d)
        logp = jnp.asarray(logp, jnp.float32)
        if logp.shape != (B, topk, V):
            raise ValueError(f"expand must return logp [B, topk, V] = {(B, topk, V)}, got {logp.shape}")
        child_lp, child_tok = jax.lax.top_k(logp, topk)  # [B, topk, topk]
        parent_score = jnp.take_along_axis(scores, frontier, axis=1)[:, :, None]
        # a child never outscores its parent, which keeps select_top_nodes ancestor-closed
        child_score = jnp.minimum(parent_score + child_lp, parent_score)
        level_start = cand_tokens.shape[1]
        cand_tokens = jnp.concatenate([cand_tokens, child_tok.reshape(B, -1).astype(jnp.int32)], axis=1)
        cand_parents = jnp.concatenate([cand_parents, jnp.repeat(frontier, topk, axis=1)], axis=1)
        scores = jnp.concatenate([scores, child_score.reshape(B, -1)], axis=1)
    index, parents = select_top_nodes(scores, cand_parents, n)
    return jnp.take_along_axis(cand_tokens, index, axis=1), parents, state


# ----------------------------------------------------------------------------------------------------------------
# Acceptance


def _check_tree_inputs(p, q, tokens, parents, max_depth):
    if p.ndim != 3:
        raise ValueError(f"target probabilities must be [B, N+1, V], got shape {p.shape}")
    B, T, V = p.shape
    if tokens.shape != (B, T - 1) or parents.shape != (B, T - 1):
        raise ValueError(f"tokens and parents must be [B, N] = {(B, T - 1)} to match [B, N+1, V] = {p.shape}, "
                         f"got {tokens.shape} and {parents.shape}")
    if not (jnp.issubdtype(tokens.dtype, jnp.integer) and jnp.issubdtype(parents.dtype, jnp.integer)):
        raise ValueError(f"tokens and parents must be integers, got {tokens.dtype} and {parents.dtype}")
    if q is not None and q.shape != p.shape:
        raise ValueError(f"draft probabilities must be [B, N+1, V] = {p.shape} or None, got {q.shape}")
    if int(max_depth) < 1:
        raise ValueError(f"max_depth must be >= 1, got {max_depth}")
    return B, T - 1, V


def tree_accept_greedy(logits, tokens, parents, max_depth: int):
    """Greedy tree verification: the longest root path whose every token is the
    target argmax at its parent.

    Args:
      logits: ``[B, N+1, V]`` target logits (or probabilities), or their
        argmax ``[B, N+1]`` (integer).
      tokens, parents: ``[B, N]``.
      max_depth: static; nodes deeper than this are never accepted.

    Among siblings with the same token the lowest index wins. Returns
    ``(path [B, max_depth], n_acc [B], next_token [B])``, next_token the
    argmax at the last accepted index (the root if none).
    """
    logits = jnp.asarray(logits)
    tokens = jnp.asarray(tokens)
    parents = jnp.asarray(parents)
    if logits.ndim == 3 and jnp.issubdtype(logits.dtype, jnp.floating):
        target = first_argmax(logits)
    elif logits.ndim == 2 and jnp.issubdtype(logits.dtype, jnp.integer):
        target = logits.astype(jnp.int32)
    else:
        raise ValueError(f"logits must be float [B, N+1, V] or integer argmax [B, N+1]; got {logits.dtype} "
                         f"{logits.shape}")
    _check_tree_inputs(target[..., None], None, tokens, parents, max_depth)
    return _greedy_core(target, tokens.astype(jnp.int32), parents.astype(jnp.int32), int(max_depth))


@functools.partial(jax.jit, static_argnums=3)
def _greedy_core(target, tokens, parents, max_depth):
    B, N = tokens.shape
    D = max_depth
    depth_iota = jnp.arange(D, dtype=jnp.int32)[None]

    def body(j, carry):
        cur, want, path, n = carry  # want: the target argmax at the current node
        acc = (parents[:, j] == cur) & (tokens[:, j] == want) & (n < D)
        path = jnp.where(acc[:, None] & (depth_iota == n[:, None]), j, path)
        return (jnp.where(acc, j, cur), jnp.where(acc, target[:, j + 1], want), path, n + acc)

    init = (jnp.full((B,), -1, jnp.int32), target[:, 0], jnp.full((B, D), -1, jnp.int32),
            jnp.zeros((B,), jnp.int32))
    _, want, path, n = jax.lax.fori_loop(0, N, body, init)
    return path, n, want


def draw_tree_randomness(key, batch: int, n_nodes: int, vocab: int):
    """``(uniforms [B, N], noise [B, V])`` float32 for one tree verification.

    ``key``: one key per row (typed ``[B]`` or raw ``uint32 [B, 2]``), so a
    row's randomness does not depend on the rest of the batch, or a single key
    (typed scalar or raw ``[2]``). Per row the key is split in two: one half
    draws a uniform per node (its acceptance test; a node is tested at most
    once), the other Exp(1) noise for the one emitted token (clamped to
    ``>= TINY``).
    """
    return _draw_tree_randomness(key, int(batch), int(n_nodes), int(vocab))


@functools.partial(jax.jit, static_argnums=(1, 2, 3))
def _draw_tree_randomness(key, batch, n_nodes, vocab):
    key, single = key_layout(key, batch)

    def draw(k):
        ku, ke = jax.random.split(k)
        u = jax.random.uniform(ku, (n_nodes,), jnp.float32)
        e = jax.random.exponential(ke, (vocab,), jnp.float32)
        return u, jnp.maximum(e, TINY)

    if single:
        key = jax.random.split(key, batch)
    return jax.vmap(draw)(key)


def _residual(r, q_child, p_node):
    """After a rejected sibling: ``norm(max(r - q, 0))``; ``p`` if that is all zero."""
    d = jnp.maximum(r - q_child, 0.0)
    s = jnp.sum(d, axis=-1, keepdims=True)
    return jnp.where(s > 0, d / jnp.where(s > 0, s, 1.0), p_node)


def tree_accept_from_randomness(p, q, tokens, parents, uniforms, noise, max_depth: int):
    """:func:`tree_accept` with explicit randomness: ``uniforms [B, N]`` in
    [0, 1) (node j's acceptance test) and ``noise [B, V]`` positive Exp(1)
    (the emitted token). Returns ``(path [B, max_depth], n_acc [B], next_token [B])``."""
    p = jnp.asarray(p)
    q = None if q is None else jnp.asarray(q)
    tokens = jnp.asarray(tokens)
    parents = jnp.asarray(parents)
    B, N, V = _check_tree_inputs(p, q, tokens, parents, max_depth)
    uniforms = jnp.asarray(uniforms, jnp.float32)
    noise = jnp.asarray(noise, jnp.float32)
    if uniforms.shape != (B, N) or noise.shape != (B, V):
        raise ValueError(f"uniforms must be [B, N] = {(B, N)} and noise [B, V] = {(B, V)}, got {uniforms.shape} "
                         f"and {noise.shape}")
    return _tree_accept_core(p, q, tokens.astype(jnp.int32), parents.astype(jnp.int32), uniforms, noise,
                             int(max_depth), _residual)


@functools.partial(jax.jit, static_argnums=(6, 7))
def _tree_accept_core(p, q, tokens, parents, uniforms, noise, max_depth, sibling_residual):
    """One pass over the nodes in index order (see :func:`tree_accept`).

    Children of the current node come in index order, and the children of an
    accepted node all have larger indices than it, so a single scan visits
    every sibling the rule needs. ``sibling_residual(r, q_child, p_node)`` is
    the update after a rejected sibling (a parameter so tests can break it).
    """
    B, T, V = p.shape
    N = T - 1
    D = max_depth
    p = p.astype(jnp.float32)
    q = None if q is None else q.astype(jnp.float32)
    cols = jnp.arange(V, dtype=jnp.int32)[None]
    depth_iota = jnp.arange(D, dtype=jnp.int32)[None]

    def body(j, carry):
        # cur: current node (-1 root); r: its residual target; p_cur, q_cur: p and q at it
        cur, r, p_cur, q_cur, path, n = carry
        tok = tokens[:, j]
        is_child = (parents[:, j] == cur) & (n < D)
        in_range = (tok >= 0) & (tok < V)
        tok_c = jnp.clip(tok, 0, V - 1)[:, None]
        px = jnp.where(in_range, jnp.take_along_axis(r, tok_c, axis=1)[:, 0], 0.0)
        if q is None:  # deterministic: q is one-hot at the child's token
            q_child = (cols == tok[:, None]).astype(jnp.float32)
            qx = in_range.astype(jnp.float32)
        else:
            q_child = q_cur
            qx = jnp.where(in_range, jnp.take_along_axis(q_cur, tok_c, axis=1)[:, 0], 0.0)
        # u < min(1, px / qx) without dividing; px = 0 always rejects
        acc = is_child & ((uniforms[:, j] * qx < px) | ((px >= qx) & (px > 0)))
        rej = is_child & ~acc
        p_j = p[:, j + 1]
        r = jnp.where(acc[:, None], p_j, jnp.where(rej[:, None], sibling_residual(r, q_child, p_cur), r))
        p_cur = jnp.where(acc[:, None], p_j, p_cur)
        if q is not None:
            q_cur = jnp.where(acc[:, None], q[:, j + 1], q_cur)
        path = jnp.where(acc[:, None] & (depth_iota == n[:, None]), j, path)
        return jnp.where(acc, j, cur), r, p_cur, q_cur, path, n + acc

    q0 = jnp.zeros((B, V), jnp.float32) if q is None else q[:, 0]
    init = (jnp.full((B,), -1, jnp.int32), p[:, 0], p[:, 0], q0, jnp.full((B, D), -1, jnp.int32),
            jnp.zeros((B,), jnp.int32))
    _, r, p_cur, _, path, n = jax.lax.fori_loop(0, N, body, init)
    e = jnp.maximum(noise, TINY)
    s_r = r / e
    next_token = jnp.where(jnp.max(s_r, axis=-1) > 0, first_argmax(s_r), first_argmax(p_cur / e))
    return path, n.astype(jnp.int32), next_token.astype(jnp.int32)


def tree_accept(p, q, tokens, parents, key, max_depth: int):
    """Lossless tree verification by recursive rejection over siblings.

    Rule, per row, starting at the root with ``r = p[root]``: go over the
    current node's children in index order and test child x (its node's
    uniform u):

    * sampled drafts (``q`` given; the children of index i were drawn i.i.d.
      from ``q[i]``): accept iff ``u < min(1, r(x) / q(x))``; on rejection
      ``r <- norm(max(r - q, 0))`` and try the next sibling;
    * deterministic drafts (``q`` None, siblings distinct): accept iff
      ``u < r(x)``; on rejection ``r <- norm(r with x zeroed)`` (the same
      rule with ``q = one_hot(x)``).

    On acceptance move to the child (``r = p[child]``) and repeat. When every
    child fails, or there are none, emit ``next_token ~ r`` by the exponential
    race ``argmax_v r(v) / E(v)`` (E Exp(1)). An all-zero residual falls back
    to the current node's ``p``. The emitted tokens (accepted path, then
    next_token) are distributed exactly as tokens sampled from the target.
    Nodes deeper than ``max_depth`` are never accepted.

    Args:
      p: ``[B, N+1, V]`` target probabilities at the root and every node.
      q: ``[B, N+1, V]`` draft probabilities the children of each index were
        drawn from, or None for deterministic drafts.
      tokens, parents: ``[B, N]`` int.
      key: one PRNG key per row (typed ``[B]`` or raw ``[B, 2]``; a single
        key also works); see :func:`draw_tree_randomness`.
      max_depth: static int, the path length D.

    Returns ``(path [B, D] int32, n_acc [B] int32, next_token [B] int32)``.
    """
    p = jnp.asarray(p)
    tokens = jnp.asarray(tokens)
    B, N, V = _check_tree_inputs(p, None if q is None else jnp.asarray(q), tokens, jnp.asarray(parents), max_depth)
    uniforms, noise = draw_tree_randomness(key, B, N, V)
    return tree_accept_from_randomness(p, q, tokens, parents, uniforms, noise, max_depth)


def tree_accept_typical(p, tokens, parents, key, max_depth: int, *, epsilon: float = 0.3, delta: float = 0.09):
    """Medusa's typical acceptance: a LOSSY option (the output is not the target's distribution).

    A node is plausible when its token's target probability at its parent is
    above ``min(epsilon, delta * exp(-H(p[parent])))`` (H the entropy in nats);
    the accepted path is the deepest node whose whole root path is plausible
    (ties: the lowest index), capped at ``max_depth``, and the next token is
    sampled from ``p`` at its end. What it guarantees: every accepted token
    had at least that probability under the target (greedy-like when the
    target is confident, more permissive when it is uncertain); what it does
    not: the joint distribution of the output (use ``tree_accept`` for exact
    sampling). The randomness of the next token is ``draw_tree_randomness``'s noise.

    Returns ``(path [B, D], n_acc [B], next_token [B])`` as ``tree_accept``.
    """
    p = jnp.asarray(p, jnp.float32)
    tokens = jnp.asarray(tokens, jnp.int32)
    parents = jnp.asarray(parents, jnp.int32)
    B, N, V = _check_tree_inputs(p, None, tokens, parents, max_depth)
    D = int(max_depth)
    anc = _ancestors(parents)[:, 1:, 1:]  # [B, N, N] node j is i or an ancestor of i
    entropy = -jnp.sum(jnp.where(p > 0, p * jnp.log(jnp.maximum(p, 1e-30)), 0.0), axis=-1)  # [B, N+1]
    threshold = jnp.minimum(epsilon, delta * jnp.exp(-entropy))
    par_idx = parents + 1  # the parent's index in [root, nodes]
    p_tok = jnp.take_along_axis(jnp.take_along_axis(p, par_idx[:, :, None], axis=1), tokens[:, :, None], axis=2)[..., 0]
    ok = p_tok > jnp.take_along_axis(threshold, par_idx, axis=1)  # [B, N]
    good = jnp.all(anc <= ok[:, None, :], axis=-1)  # every ancestor-or-self plausible
    depth = jnp.sum(anc, axis=-1).astype(jnp.int32)  # [B, N]
    score = jnp.where(good & (depth <= D), depth, 0)
    best = jnp.argmax(score, axis=1).astype(jnp.int32)  # the first deepest
    n_acc = jnp.max(score, axis=1).astype(jnp.int32)
    on_path = jnp.take_along_axis(anc, best[:, None, None], axis=1)[:, 0] & (n_acc[:, None] > 0)  # [B, N]
    d_iota = jnp.arange(1, D + 1, dtype=jnp.int32)
    hit = on_path[:, None, :] & (depth[:, None, :] == d_iota[None, :, None])  # [B, D, N]
    path = jnp.where(jnp.any(hit, -1), jnp.argmax(hit, -1), -1).astype(jnp.int32)
    end = jnp.where(n_acc > 0, best + 1, 0)
    p_end = jnp.take_along_axis(p, end[:, None, None], axis=1)[:, 0]
    _, noise = draw_tree_randomness(key, B, N, V)
    nxt = first_argmax(p_end / jnp.maximum(noise, TINY))
    return path, n_acc, nxt.astype(jnp.int32)


# ----------------------------------------------------------------------------------------------------------------
# Cache compaction


def compact_cache(cache: KVCache, start, path, n_acc) -> KVCache:
    """Move the accepted path's keys and values next to the root.

    The verify forward wrote the root at slot ``start`` and node j at slot
    ``start + 1 + j`` of each row. For ``i < n_acc`` the entries (every
    layer's k and v, and the int8 scales) of node ``path[:, i]`` move to slot
    ``start + 1 + i``; lengths become ``start + 1 + n_acc``. Only the D
    source slots of each row are gathered and scattered.

    Args:
      cache: the cache after the verify forward.
      start: ``[B]`` int, the root's slot.
      path: ``[B, D]`` int accepted node per depth (-1 past n_acc).
      n_acc: ``[B]`` int accepted count.
    """
    start = jnp.asarray(start, jnp.int32)
    path = jnp.asarray(path, jnp.int32)
    n_acc = jnp.asarray(n_acc, jnp.int32)
    B = cache.batch
    if start.shape != (B,) or n_acc.shape != (B,) or path.ndim != 2 or path.shape[0] != B:
        raise ValueError(f"start and n_acc must be [B] and path [B, D] with B={B}, got {start.shape}, "
                         f"{n_acc.shape} and {path.shape}")
    return _compact(cache, start, path, n_acc)


@jax.jit
def _compact(cache, start, path, n_acc):
    B, D = path.shape
    L = cache.max_len
    keep = jnp.arange(D, dtype=jnp.int32)[None] < n_acc[:, None]
    src = jnp.clip(start[:, None] + 1 + jnp.maximum(path, 0), 0, L - 1)  # [B, D]
    dst = jnp.where(keep, start[:, None] + 1 + jnp.arange(D, dtype=jnp.int32)[None], L)  # L: dropped
    rows = jnp.arange(B)[:, None]

    def move(buf):
        return buf.at[rows, dst].set(buf[rows, src], mode="drop")

    moved = lambda bufs: tuple(move(b) for b in bufs)  # noqa: E731
    return KVCache(k=moved(cache.k), v=moved(cache.v), lengths=jnp.minimum(start + 1 + n_acc, L),
                   k_scale=moved(cache.k_scale), v_scale=moved(cache.v_scale))
