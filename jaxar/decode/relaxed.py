"""Relaxed (lossy, bounded) speculative acceptance for image AR models.

Raster VQ image tokens are often visually interchangeable: a draft ``x`` whose
target mass is low may still be close, in the codebook latent space, to codes
the target likes. The rules here accept more such drafts and document a bound
on the distortion of each emitted position. Notation follows
:mod:`jaxar.decode.acceptance`: per row drafts ``x_0 .. x_{k-1}`` with draft
distributions ``q_i`` and target distributions ``p_0 .. p_k``.

* ``exact``: the lossless rule (:func:`acceptance.accept_from_randomness`).
* ``lantern:K,DELTA`` (after LANTERN, Jang et al. 2024; our provable
  formulation, see :func:`lantern_target`): each position's target ``p_i`` is
  replaced by a relaxed ``p'_i`` that moves at most ``DELTA`` of total
  variation from the target's surplus tokens to the draft's nearby deficit
  tokens (``K`` codebook neighbours); the exact rule run on ``p'`` emits
  exactly ``p'`` (TV to ``p`` at most ``DELTA`` per position).
* ``gsd:G[,P_THR[,D_THR]]`` (grouped speculative decoding, Tsai et al. 2025,
  after the reference code github.com/junhyukso/GSD): draft ``x`` is accepted
  with probability ``min(1, p(G(x)) / q(G(x)))`` for a dynamic group
  ``G(x)`` of plausible, latent-close tokens (:func:`gsd_masses`); the
  rejection residual is the exact one. TV bound: :func:`gsd_tv_bound`.

``lantern`` with ``DELTA = 0`` and ``gsd`` with ``G = 0`` are bit-identical to
``exact``. All bounds are per position, conditional on the emitted prefix.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import NamedTuple, Optional

import numpy as np
import jax
import jax.numpy as jnp

from jaxar.decode import acceptance

__all__ = [
    "AcceptRule",
    "parse_accept",
    "AcceptTables",
    "build_tables",
    "codebook_neighbours",
    "codebook_cosine_distance",
    "lantern_target",
    "gsd_masses",
    "gsd_tv_bound",
    "relaxed_accept",
]

KINDS = ("exact", "lantern", "gsd")
_SPEC_HELP = "use exact, lantern:K,DELTA (e.g. lantern:8,0.1) or gsd:G[,P_THR[,D_THR]] (e.g. gsd:3)"


@dataclasses.dataclass(frozen=True)
class AcceptRule:
    """A speculative acceptance rule (hashable: pass it as a jit static arg).

    Attributes
    ----------
    kind : ``"exact"``, ``"lantern"`` or ``"gsd"``.
    k : int
        lantern: number ``>= 1`` of codebook neighbours ``N(x)`` of a code.
    delta : float
        lantern: per-position total-variation budget ``0 <= delta <= 1``.
    g : int
        gsd: rank half-width ``>= 0`` of the group window.
    p_thr, d_thr : float
        gsd: group members ``y`` need ``|p(y) - p(x)| < p_thr`` and cosine
        distance ``d(x, y) < d_thr``.
    """

    kind: str = "exact"
    k: int = 0
    delta: float = 0.0
    g: int = 0
    p_thr: float = 0.15
    d_thr: float = 0.5

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"AcceptRule kind must be one of {KINDS}, got {self.kind!r}")
        if self.kind == "lantern":
            if not (isinstance(self.k, (int, np.integer)) and self.k >= 1):
                raise ValueError(f"lantern k must be an integer >= 1 (neighbours), got {self.k!r}")
            if not (0.0 <= float(self.delta) <= 1.0):
                raise ValueError(f"lantern delta must be in [0, 1] (a TV budget), got {self.delta!r}")
        if self.kind == "gsd":
            if not (isinstance(self.g, (int, np.integer)) and self.g >= 0):
                raise ValueError(f"gsd g must be an integer >= 0 (rank half-width), got {self.g!r}")
            for name in ("p_thr", "d_thr"):
                v = float(getattr(self, name))
                if not (math.isfinite(v) and v >= 0):
                    raise ValueError(f"gsd {name} must be a finite number >= 0, got {v!r}")

    @property
    def is_exact(self) -> bool:
        """True when the rule reduces to the exact one, bit for bit: ``exact``,
        ``lantern`` with ``delta = 0`` (``p' = p``) and ``gsd`` with ``g = 0``
        (``G(x) = {x}``)."""
        return (self.kind == "exact" or (self.kind == "lantern" and float(self.delta) == 0.0)
                or (self.kind == "gsd" and self.g == 0))


def parse_accept(spec: str) -> AcceptRule:
    """Parse the CLI ``--accept`` string: ``exact``, ``lantern:K,DELTA`` or
    ``gsd:G[,P_THR[,D_THR]]``; one-line ValueError on anything else."""
    spec = str(spec).strip()
    kind, sep, rest = spec.partition(":")
    kind = kind.strip().lower()
    args = [a.strip() for a in rest.split(",")] if sep else []
    if kind == "exact":
        if sep:
            raise ValueError(f"--accept exact takes no parameters, got {spec!r}; use plain 'exact'")
        return AcceptRule("exact")
    if kind == "lantern":
        if len(args) != 2:
            raise ValueError(f"--accept lantern needs k,delta, e.g. lantern:8,0.1 (got {spec!r})")
        try:
            k = int(args[0])
        except ValueError:
            k = None
        if k is None or k < 1:
            raise ValueError(f"--accept lantern k must be an integer >= 1, e.g. lantern:8,0.1 (got {args[0]!r})")
        try:
            delta = float(args[1])
        except ValueError:
            delta = float("nan")
        if not (0.0 <= delta <= 1.0):
            raise ValueError(f"--accept lantern delta must be a number in [0, 1], e.g. lantern:8,0.1 (got {args[1]!r})")
        return AcceptRule("lantern", k=k, delta=delta)
    if kind == "gsd":
        if not 1 <= len(args) <= 3 or args[0] == "":
            raise ValueError(f"--accept gsd needs g[,p_thr[,d_thr]], e.g. gsd:3 or gsd:3,0.15,0.5 (got {spec!r})")
        try:
            g = int(args[0])
        except ValueError:
            g = None
        if g is None or g < 0:
            raise ValueError(f"--accept gsd g must be an integer >= 0, e.g. gsd:3 (got {args[0]!r})")
        thr = []
        for name, a in zip(("p_thr", "d_thr"), args[1:]):
            try:
                v = float(a)
            except ValueError:
                v = float("nan")
            if not (math.isfinite(v) and v >= 0):
                raise ValueError(f"--accept gsd {name} must be a number >= 0, e.g. gsd:3,0.15,0.5 (got {a!r})")
            thr.append(v)
        return AcceptRule("gsd", g=g, **dict(zip(("p_thr", "d_thr"), thr)))
    raise ValueError(f"unknown --accept {spec!r}; {_SPEC_HELP}")


# ----------------------------------------------------------------------------
# Codebook tables (numpy, computed once).

def codebook_neighbours(codebook, k: int, chunk: int = 1024) -> np.ndarray:
    """The ``k`` nearest other codes of each code, ``int32 [K, k]``.

    Euclidean distance ``||c_x - c_y||`` (computed as
    ``|c_x|^2 + |c_y|^2 - 2 c_x . c_y`` in float64, ``chunk`` rows at a time),
    the code itself excluded, ascending, ties broken by the lower index.
    """
    c = np.asarray(codebook, np.float64)
    if c.ndim != 2:
        raise ValueError(f"codebook must be [K, C], got shape {c.shape}")
    K = c.shape[0]
    k = int(k)
    if not 1 <= k < K:
        raise ValueError(f"neighbours k={k} must be in [1, K) for a codebook of K={K} codes; lower k")
    sq = np.sum(c * c, axis=-1)
    out = np.empty((K, k), np.int32)
    for s in range(0, K, chunk):
        rows = np.arange(s, min(s + chunk, K))
        d2 = sq[rows, None] + sq[None, :] - 2.0 * (c[rows] @ c.T)
        d2[np.arange(len(rows)), rows] = np.inf
        out[rows] = np.argsort(d2, axis=-1, kind="stable")[:, :k]
    return out


def codebook_cosine_distance(codebook) -> np.ndarray:
    """``1 - cos(c_x, c_y)`` as ``float32 [K, K]``, exactly 0 on the diagonal.

    A zero code has cosine similarity 0 to every other code (distance 1).
    Memory is ``4 K^2`` bytes (1 GiB at ``K = 16384``).
    """
    c = np.asarray(codebook, np.float64)
    if c.ndim != 2:
        raise ValueError(f"codebook must be [K, C], got shape {c.shape}")
    norm = np.linalg.norm(c, axis=-1, keepdims=True)
    u = c / np.where(norm > 0, norm, 1.0)
    d = (1.0 - u @ u.T).astype(np.float32)
    np.fill_diagonal(d, 0.0)
    return d


class AcceptTables(NamedTuple):
    """Codebook tables a rule needs: ``neighbours`` ``int32 [K, k]`` (lantern)
    and ``distance`` ``float32 [K, K]`` cosine distance (gsd); ``None`` if unused.
    Built as numpy; ``jax.device_put(tables)`` once before a decode loop so
    the tables are not copied to the device at every call."""

    neighbours: Optional[np.ndarray] = None
    distance: Optional[np.ndarray] = None


def build_tables(rule: AcceptRule, codebook=None) -> AcceptTables:
    """Build only the tables ``rule`` needs from the VQ ``codebook`` ``[K, C]``."""
    if rule.kind == "exact":
        return AcceptTables()
    if codebook is None:
        raise ValueError(f"--accept {rule.kind} needs the VQ codebook [K, C]; pass codebook=")
    K = np.shape(codebook)[0]
    if rule.kind == "lantern":
        if rule.k >= K:
            raise ValueError(f"lantern k={rule.k} must be < codebook size K={K}; lower k")
        return AcceptTables(neighbours=codebook_neighbours(codebook, rule.k))
    return AcceptTables(distance=codebook_cosine_distance(codebook))


# ----------------------------------------------------------------------------
# LANTERN-style relaxed target.

def lantern_target(p, q, neighbours, delta: float):
    """Relaxed target ``p'`` within total variation ``delta`` of ``p``.

    Over the last axis (``K`` codes; leading dims arbitrary), with surplus
    ``s = max(0, p - q)``, deficit ``d = max(0, q - p)`` and ``N(x) =
    neighbours[x]`` (distinct codes other than ``x``):

    * raw transport ``T(y -> x) = s(y) d(x) / D(y)`` for ``y in N(x)``, with
      ``D(y) = sum_{x: y in N(x)} d(x)`` (0 when ``D(y) = 0``): each surplus
      token spreads its surplus over the deficit tokens that list it as a
      neighbour, in proportion to their deficits; so ``sum_x T(y -> x) <= s(y)``;
    * inflow cap ``T(y -> x) *= c(x) = min(1, d(x) / sum_y T_raw(y -> x))``, so
      ``inflow(x) <= d(x)``;
    * ``M = sum T``, ``lam = min(1, delta / M)`` (0 when ``M = 0`` or
      ``delta = 0``), ``p' = p + lam (inflow - outflow)``.

    Surplus and deficit tokens are disjoint, so ``p' >= min(p, q) >= 0``,
    ``sum p' = sum p``, ``TV(p', p) = lam M <= delta`` and the exact acceptance
    mass grows by the same amount: ``sum min(p', q) = sum min(p, q) + lam M``.
    The exact rule run on ``p'`` emits exactly ``p'``. Gathers and scatter-adds
    over ``neighbours [K, k]`` only (no ``K x K`` matrix).

    Returns ``(p' [..., K] float32, moved [...] float32 = lam M)``; with
    ``delta = 0``, ``p'`` is ``p`` bit for bit.
    """
    p = jnp.asarray(p, jnp.float32)
    q = jnp.asarray(q, jnp.float32)
    nb = jnp.asarray(neighbours, jnp.int32)
    if p.shape != q.shape:
        raise ValueError(f"p and q must have the same shape, got {p.shape} and {q.shape}")
    K = p.shape[-1]
    if nb.ndim != 2 or nb.shape[0] != K:
        raise ValueError(f"neighbours must be [K, k] with K = {K} (p's last axis), got {nb.shape}")
    lead = p.shape[:-1]
    p2, q2 = p.reshape(-1, K), q.reshape(-1, K)
    new, moved = _lantern_core(p2, q2, nb, float(delta))
    return new.reshape(p.shape), moved.reshape(lead)


@functools.partial(jax.jit, static_argnums=(3,))
def _lantern_core(p, q, nb, delta):
    R, K = p.shape
    k = nb.shape[1]
    flat = nb.reshape(-1)                                   # pair (x, j) -> y = nb[x, j]
    s = jnp.maximum(p - q, 0.0)
    d = jnp.maximum(q - p, 0.0)
    pair_d = jnp.broadcast_to(d[:, :, None], (R, K, k)).reshape(R, K * k)
    D = jnp.zeros((R, K), jnp.float32).at[:, flat].add(pair_d)
    s_y = s[:, flat].reshape(R, K, k)
    D_y = D[:, flat].reshape(R, K, k)
    raw = jnp.where(D_y > 0, s_y * d[:, :, None] / jnp.where(D_y > 0, D_y, 1.0), 0.0)
    raw_in = jnp.sum(raw, axis=-1)
    c = jnp.where(raw_in > d, d / jnp.where(raw_in > 0, raw_in, 1.0), 1.0)
    t = raw * c[:, :, None]                                 # [R, K(x), k]
    inflow = jnp.sum(t, axis=-1)
    outflow = jnp.zeros((R, K), jnp.float32).at[:, flat].add(t.reshape(R, K * k))
    m = jnp.sum(inflow, axis=-1)
    lam = jnp.where((m > 0) & (delta > 0), jnp.minimum(1.0, delta / jnp.where(m > 0, m, 1.0)), 0.0)
    new = jnp.where(lam[:, None] > 0, p + lam[:, None] * (inflow - outflow), p)
    return new, lam * m


# ----------------------------------------------------------------------------
# Grouped speculative decoding.

def _group_masses(p, q, x, distance, g, p_thr, d_thr):
    """``(p(G(x)), q(G(x)))`` for tokens ``x [..., m]`` under ``p, q [..., V]``."""
    V = p.shape[-1]
    if g == 0:
        xc = jnp.clip(x, 0, V - 1)
        pg = jnp.take_along_axis(p, xc, axis=-1)
        qg = jnp.take_along_axis(q, xc, axis=-1)
    else:
        lead, m = x.shape[:-1], x.shape[-1]
        w = 2 * g + 1
        order = jnp.argsort(-p, axis=-1, stable=True)       # descending p, ties by lower index
        rank = jnp.argsort(order, axis=-1, stable=True)     # rank[y] = position of y in order
        xc = jnp.clip(x, 0, V - 1)
        rx = jnp.take_along_axis(rank, xc, axis=-1)         # [..., m]
        off = jnp.arange(-g, g + 1, dtype=jnp.int32)
        r = rx[..., None] + off                             # [..., m, w]
        valid = (r >= 0) & (r < V)
        y = jnp.take_along_axis(order, jnp.clip(r, 0, V - 1).reshape(lead + (m * w,)), axis=-1)
        py = jnp.take_along_axis(p, y, axis=-1).reshape(lead + (m, w))
        qy = jnp.take_along_axis(q, y, axis=-1).reshape(lead + (m, w))
        y = y.reshape(lead + (m, w))
        px = jnp.take_along_axis(p, xc, axis=-1)
        dist = distance[xc[..., None], y]
        member = valid & ((off == 0) | ((jnp.abs(py - px[..., None]) < p_thr) & (dist < d_thr)))
        pg = jnp.sum(jnp.where(member, py, 0.0), axis=-1)
        qg = jnp.sum(jnp.where(member, qy, 0.0), axis=-1)
    ok = (x >= 0) & (x < V)
    return jnp.where(ok, pg, 0.0), jnp.where(ok, qg, 0.0)


_group_masses_jit = jax.jit(_group_masses, static_argnums=(4, 5, 6))


def gsd_masses(p, q, drafts, distance, g: int, p_thr: float = 0.15, d_thr: float = 0.5):
    """Group masses ``(p(G(x)), q(G(x)))`` of each draft ``x``.

    ``G(x)``: the tokens ``y`` whose rank in ``p``'s descending order (ties by
    lower index) is within ``+-g`` of ``x``'s, with ``|p(y) - p(x)| < p_thr``
    and ``distance[x, y] < d_thr``; ``x`` itself always belongs. ``g = 0``
    gives ``(p(x), q(x))`` exactly. (The reference GSD code takes the window
    ``[r - g, r + g)`` of the logit order and its own latent distance.)

    Parameters
    ----------
    p, q : ``[..., V]`` target and draft distributions.
    drafts : int ``[...]`` draft tokens (out-of-range ids get masses 0: rejected).
    distance : ``[V, V]`` latent distance (e.g. :func:`codebook_cosine_distance`);
        unused when ``g = 0``.

    Returns ``(pG, qG)`` float32 of ``drafts``' shape.
    """
    p = jnp.asarray(p, jnp.float32)
    q = jnp.asarray(q, jnp.float32)
    x = jnp.asarray(drafts, jnp.int32)
    if p.shape != q.shape or x.shape != p.shape[:-1]:
        raise ValueError(f"p, q must be [..., V] and drafts [...]: got {p.shape}, {q.shape}, {x.shape}")
    dist = None if int(g) == 0 else jnp.asarray(distance, jnp.float32)
    pg, qg = _group_masses_jit(p, q, x[..., None], dist, int(g), float(p_thr), float(d_thr))
    return pg[..., 0], qg[..., 0]


def _ratio(a, b):
    """``min(1, a / b)``, 1 where ``b = 0``."""
    return jnp.where(b > 0, jnp.minimum(1.0, a / jnp.where(b > 0, b, 1.0)), 1.0)


def gsd_tv_bound(p, q, distance, g: int, p_thr: float = 0.15, d_thr: float = 0.5):
    """Bound on ``TV(out, p)`` for one position under the gsd rule.

    With ``a(x) = min(1, p(x) / q(x))``, ``a'(x) = min(1, p(G(x)) / q(G(x)))``
    and residual ``r = norm(max(0, p - q))``, the exact rule emits
    ``p(z) = q(z) a(z) + (1 - sum_x q a) r(z)`` and the gsd rule emits
    ``out(z) = q(z) a'(z) + (1 - sum_x q a') r(z)``, so
    ``out - p = q (a' - a) - (sum_x q (a' - a)) r`` and
    ``TV(out, p) = 1/2 sum_z |out - p| <= sum_x q(x) |a'(x) - a(x)|``.

    ``p, q`` ``[..., V]``; returns the bound ``[...]`` float32 (0 for ``g = 0``).
    Costs ``O(V g)`` per position.
    """
    p = jnp.asarray(p, jnp.float32)
    q = jnp.asarray(q, jnp.float32)
    if p.shape != q.shape:
        raise ValueError(f"p and q must have the same shape, got {p.shape} and {q.shape}")
    if int(g) == 0:
        return jnp.zeros(p.shape[:-1], jnp.float32)
    return _tv_bound_jit(p, q, jnp.asarray(distance, jnp.float32), int(g), float(p_thr), float(d_thr))


def _tv_bound(p, q, distance, g, p_thr, d_thr):
    x = jnp.broadcast_to(jnp.arange(p.shape[-1], dtype=jnp.int32), p.shape)
    pg, qg = _group_masses(p, q, x, distance, g, p_thr, d_thr)
    return jnp.sum(q * jnp.abs(_ratio(pg, qg) - _ratio(p, q)), axis=-1)


_tv_bound_jit = jax.jit(_tv_bound, static_argnums=(3, 4, 5))


# ----------------------------------------------------------------------------
# The rule.

def relaxed_accept(rule: AcceptRule, tables: AcceptTables, target_probs, draft_probs, draft_tokens,
                   uniforms, noise):
    """Speculative acceptance under ``rule`` with explicit randomness.

    Parameters
    ----------
    rule : AcceptRule (static).
    tables : AcceptTables from :func:`build_tables` (``K = V``).
    target_probs : ``[B, k+1, V]`` target distributions ``p``.
    draft_probs : ``[B, k, V]`` draft distributions ``q`` (``None`` only for exact).
    draft_tokens : int ``[B, k]``; uniforms ``[B, k]``; noise ``[B, k+1, V]``
        (as :func:`acceptance.accept_from_randomness`).

    Returns
    -------
    ``(n [B] int32, next_token [B] int32, tv [B, k] float32)``: emit
    ``draft_tokens[:, :n]`` then ``next_token``; ``tv[:, i]`` bounds
    ``TV(emitted_i, p_i)`` given the prefix (exact: 0; lantern: the moved mass
    ``lam M <= delta``, attained; gsd: :func:`gsd_tv_bound`).
    """
    if not isinstance(rule, AcceptRule):
        raise ValueError(f"rule must be an AcceptRule (see parse_accept), got {type(rule).__name__}")
    target_probs = jnp.asarray(target_probs)
    draft_tokens = jnp.asarray(draft_tokens)
    uniforms = jnp.asarray(uniforms)
    noise = jnp.asarray(noise)
    draft_probs = None if draft_probs is None else jnp.asarray(draft_probs)
    B, k, V = acceptance._check_shapes(target_probs, draft_probs, draft_tokens, uniforms, noise)
    if rule.kind == "exact":
        n, nxt = acceptance.accept_from_randomness(target_probs, draft_probs, draft_tokens, uniforms, noise)
        return n, nxt, jnp.zeros((B, k), jnp.float32)
    if draft_probs is None:
        raise ValueError(f"--accept {rule.kind} needs draft_probs [B, k, V]; use exact for deterministic drafts")
    if rule.kind == "lantern":
        nb = tables.neighbours
        if nb is None or np.shape(nb)[0] != V:
            raise ValueError(f"lantern needs tables.neighbours [V={V}, k]; build them with build_tables(rule, codebook)")
        return _relaxed_core(rule, nb, None, target_probs, draft_probs, draft_tokens, uniforms, noise)
    dist = tables.distance
    if rule.g > 0 and (dist is None or np.shape(dist) != (V, V)):
        raise ValueError(f"gsd needs tables.distance [V, V] = {(V, V)}; build it with build_tables(rule, codebook)")
    return _relaxed_core(rule, None, dist, target_probs, draft_probs, draft_tokens, uniforms, noise)


@functools.partial(jax.jit, static_argnums=(0,))
def _relaxed_core(rule, nb, dist, p, q, x, u, e):
    k = x.shape[1]
    p = p.astype(jnp.float32)
    q = q.astype(jnp.float32)
    if rule.kind == "lantern":
        pr, moved = _lantern_core(p[:, :k].reshape(-1, p.shape[-1]), q.reshape(-1, q.shape[-1]),
                                  nb.astype(jnp.int32), float(rule.delta))
        p_new = jnp.concatenate([pr.reshape(q.shape), p[:, k:]], axis=1)
        n, nxt = acceptance._accept_core(p_new, q, x, u, e)
        return n, nxt, moved.reshape(x.shape)
    xi = x.astype(jnp.int32)
    if rule.g == 0:
        n, nxt = acceptance._accept_core(p, q, xi, u, e)
        return n, nxt, jnp.zeros(x.shape, jnp.float32)
    args = (dist.astype(jnp.float32), rule.g, float(rule.p_thr), float(rule.d_thr))
    pg, qg = _group_masses(p[:, :k], q, xi[..., None], *args)
    n, nxt = acceptance._accept_core(p, q, xi, u, e, pg[..., 0], qg[..., 0])
    return n, nxt, _tv_bound(p[:, :k], q, *args)
