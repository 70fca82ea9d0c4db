"""Inference bigger than one device: params, caches and batches placed on a mesh.

    mesh = jaxar.train.sharding.make_mesh({"data": 2, "tensor": 4})
    params = jaxar.parallel.shard_params(params, config, mesh)
    out = generate(params, prompts, lengths, config=config, max_new_tokens=64)

`shard_params` converts the params to the decode layout (int8 when
`config.weight_quant == "int8"`) and places every leaf with the same
logical-axis rules as training (`jaxar.train.sharding.RULES`: heads, kv
heads, MLP and vocab over `tensor`, the embedding width over `fsdp`; a
dimension the mesh axis does not divide stays whole). It also records the
mesh in the params (`params["placement"]`, a pytree node without leaves, so
jit sees it as static structure): every `forward` on those params, hence
`generate`, `beam_search`, `speculative_generate` and the draft model,
constrains the tokens to be split by batch over (`data`, `fsdp`) and the KV
cache to be split by batch over (`data`, `fsdp`) and by kv head over `tensor`
(each where it divides). Nothing else changes: the same jitted programs run,
XLA inserts the collectives. A draft model for speculative decoding must be
placed on the same mesh (`shard_params(draft_params, draft_config, mesh)`).

Fusing q|k|v and gate|up into one kernel (`transformer.decode_params`) is
done only when the mesh has no tensor axis (size 1): a fused kernel split
over `tensor` would cut across the q / k / v boundary, and each step would
reshuffle it. With tensor parallelism q, k, v (and gate, up) stay separate,
each split by heads (mlp), so the projections need no communication.
"""

from __future__ import annotations

from typing import Mapping, Optional

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxar.cache import KVCache
from jaxar.config import ModelConfig
from jaxar.train.sharding import BATCH_AXES, RULES, logical_to_spec

# Logical names of the fused decode-layout axes (not in RULES: replicated).
FUSED_QKV = "qkv"
FUSED_GATE_UP = "gate_up"
_IN_AXES = {"o_proj": 2}  # input axes of each kernel (others: 1)


@jax.tree_util.register_pytree_node_class
class MeshPlacement:
    """The mesh a params tree lives on, carried inside it as static structure (no leaves)."""

    def __init__(self, mesh: Mesh, rules: tuple = ()):
        self.mesh = mesh
        self.rules = tuple(rules)

    def tree_flatten(self):
        return (), (self.mesh, self.rules)

    @classmethod
    def tree_unflatten(cls, aux, children):
        return cls(*aux)

    def __eq__(self, other):
        return isinstance(other, MeshPlacement) and (self.mesh, self.rules) == (other.mesh, other.rules)

    def __hash__(self):
        return hash((self.mesh, self.rules))

    def __repr__(self):
        return f"MeshPlacement({dict(self.mesh.shape)})"

    def _constrain(self, x, spec: P):
        return jax.lax.with_sharding_constraint(x, NamedSharding(self.mesh, spec))

    def constrain_inputs(self, tokens, embeds, cache: Optional[KVCache]):
        """Tokens / embeds split by batch, the cache as `cache_specs` says (inside jit)."""
        if tokens is not None:
            tokens = self._constrain(tokens, P(batch_axes(self.mesh, tokens.shape[0]), None))
        if embeds is not None:
            embeds = self._constrain(embeds, P(batch_axes(self.mesh, embeds.shape[0]), None, None))
        if cache is not None:
            cache = self.constrain_cache(cache)
        return tokens, embeds, cache

    def constrain_cache(self, cache: KVCache) -> KVCache:
        specs = cache_specs(cache, self.mesh)
        return jax.tree_util.tree_map(self._constrain, cache, specs)


def batch_axes(mesh: Mesh, batch: int):
    """The mesh axes a batch of `batch` rows is split over: (data, fsdp), else data or fsdp alone
    (whichever divides it, with more than one device), else None (replicated)."""
    axes = [a for a in BATCH_AXES if mesh.shape.get(a, 1) > 1]
    size = 1
    for a in axes:
        size *= mesh.shape[a]
    if axes and batch % size == 0:
        return tuple(axes) if len(axes) > 1 else axes[0]
    for a in axes:
        if batch % mesh.shape[a] == 0:
            return a
    return None


def cache_specs(cache: KVCache, mesh: Mesh) -> KVCache:
    """PartitionSpecs mirroring `cache`: buffers [B, S, K, Dh] and scales [B, S, K] split by batch
    (`batch_axes`) and by kv head over `tensor` where it divides K; lengths by batch."""
    B, _, K, _ = cache.k[0].shape
    rows = batch_axes(mesh, B)
    heads = "tensor" if mesh.shape.get("tensor", 1) > 1 and K % mesh.shape["tensor"] == 0 else None
    buf, scale = P(rows, None, heads, None), P(rows, None, heads)
    return KVCache(k=tuple(buf for _ in cache.k), v=tuple(buf for _ in cache.v), lengths=P(rows),
                   k_scale=tuple(scale for _ in cache.k_scale), v_scale=tuple(scale for _ in cache.v_scale))


def shard_cache(cache: KVCache, mesh: Mesh) -> KVCache:
    """`cache` placed on `mesh` (outside jit) as `cache_specs` says."""
    specs = cache_specs(cache, mesh)
    return jax.tree_util.tree_map(lambda x, s: jax.device_put(x, NamedSharding(mesh, s)), cache, specs)


def decode_logical_axes(params: dict, config: ModelConfig) -> dict:
    """Logical axis names for every leaf of decode-layout params (fused and / or int8), mirroring the tree.

    Per-layer leaves take the training names (`transformer.param_logical_axes`) without the `layers`
    axis; fused kernels keep `embed` on the input and a replicated fused output (`qkv`, `gate_up`);
    a `kernel_scale` takes its kernel's output names, `embedding_scale` is `vocab`.
    """
    from jaxar.models.transformer import param_logical_axes

    stacked = param_logical_axes(config)
    fused = {"qkv_proj": {"kernel": ("embed", FUSED_QKV), "bias": (FUSED_QKV,)},
             "gate_up_proj": {"kernel": ("embed", FUSED_GATE_UP), "bias": (FUSED_GATE_UP,)}}

    def axes_for(path, leaf):
        names = [getattr(p, "key", getattr(p, "idx", None)) for p in path]
        if names[0] == "layers":
            node = stacked["layers"]
            for name in names[2:-2]:
                node = node[name]
            module, leafname = names[-2], names[-1]
            table = fused.get(module) or {k: v[1:] for k, v in node[module].items()}
        else:
            module, leafname = names[0], names[-1]
            table = dict(stacked[module])
            if module == "embed":
                table["embedding_scale"] = ("vocab",)
        if leafname == "kernel_scale":
            return table["kernel"][_IN_AXES.get(module, 1):]
        return table[leafname]

    return jax.tree_util.tree_map_with_path(axes_for, {k: v for k, v in params.items() if k != "placement"})


def param_specs(params: dict, config: ModelConfig, mesh: Mesh, rules: Optional[Mapping] = None) -> dict:
    """PartitionSpecs for decode-layout params on `mesh` (training's rules by default)."""
    rules = RULES if rules is None else rules
    axes = decode_logical_axes(params, config)
    leaves = {k: v for k, v in params.items() if k != "placement"}
    return jax.tree_util.tree_map(lambda a, x: logical_to_spec(a, x.shape, mesh, rules), axes, leaves,
                                  is_leaf=lambda x: isinstance(x, tuple) and all(isinstance(n, (str, type(None)))
                                                                                 for n in x))


def shard_params(params: dict, config: ModelConfig, mesh: Mesh, rules: Optional[Mapping] = None) -> dict:
    """Params ready for decoding on `mesh`: the decode layout (int8 with `config.weight_quant == "int8"`),
    each leaf placed by the logical-axis `rules` (default: training's `RULES`), the mesh recorded in
    `params["placement"]` so forward / generate / speculative_generate constrain batches and caches to it.

    Args:
      params: the stacked (training / from_pretrained) or the decode layout, on any device(s).
      config: the model config (its weight_quant is applied here).
      mesh: a Mesh whose axis names include those the rules use (`jaxar.train.sharding.make_mesh`:
        data, fsdp, tensor).
      rules: logical name -> mesh axis or None (default `jaxar.train.sharding.RULES`).
    """
    from jaxar.models.transformer import decode_params, is_decode_layout

    missing = sorted({a for a in (rules or RULES).values() if a is not None} - set(mesh.axis_names))
    if missing:
        raise ValueError(f"the mesh has axes {tuple(mesh.axis_names)} but the sharding rules use {missing}; "
                         "build it with jaxar.train.sharding.make_mesh or pass rules=")
    params = {k: v for k, v in params.items() if k != "placement"}
    if not is_decode_layout(params):
        params = decode_params(params, config, fuse=mesh.shape.get("tensor", 1) == 1)
    params = decode_params(params, config)  # int8 when the config says so
    specs = param_specs(params, config, mesh, rules)
    placed = jax.tree_util.tree_map(lambda x, s: jax.device_put(x, NamedSharding(mesh, s)), params, specs,
                                    is_leaf=lambda x: isinstance(x, P))
    rules_items = tuple(sorted((rules or {}).items()))
    return {**placed, "placement": MeshPlacement(mesh, rules_items)}


def placement_of(params) -> Optional[MeshPlacement]:
    """The `MeshPlacement` of `shard_params` output, or None."""
    return params.get("placement") if isinstance(params, dict) else None


def check_same_mesh(params, draft_params, what: str = "draft_params") -> None:
    """A one-line error when the target and the draft model's params are not placed on the same mesh."""
    if not (isinstance(draft_params, dict) and "embed" in draft_params):
        return  # not a model's params (another drafter's state)
    target, draft = placement_of(params), placement_of(draft_params)
    if (target is None) == (draft is None) and (target is None or target.mesh == draft.mesh):
        return
    where = lambda p: "one device" if p is None else f"the mesh {dict(p.mesh.shape)}"  # noqa: E731
    raise ValueError(f"the target params are on {where(target)} but {what} are on {where(draft)}; place both with "
                     "jaxar.parallel.shard_params(..., mesh) on the same mesh (or neither)")


__all__ = ["MeshPlacement", "batch_axes", "cache_specs", "check_same_mesh", "decode_logical_axes", "param_specs",
           "placement_of", "shard_cache", "shard_params"]
