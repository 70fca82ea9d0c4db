"""LoRA as a parameter transform: adapters beside frozen base params, merged before `forward`.

    adapters = init_adapters(lora, base_params, rng)          # {"layers": {"attn": {"q_proj": {"a", "b"}}}}
    params = merge(base_params, adapters, lora)               # W + alpha / rank * A @ B, same tree as base

A target is the name of a projection under `layers` (q_proj, k_proj, v_proj,
o_proj, gate_proj, up_proj, down_proj). Its kernel is [layers, *in, *out]
(o_proj: in = (heads, head_dim); the others: in = one axis); the adapter is
A [layers, *in, rank] and B [layers, rank, *out], and the merged kernel is

    W + (alpha / rank) * einsum("l i r, l r o -> l i o", A, B)  (reshaped to W's shape)

B starts at zero, so the merged params equal the base params exactly at step 0.
The model code never sees adapters: training merges them inside the loss, and
checkpoints / exports merge them once. Dropout on the adapter input is not
offered: it has no merged-weight form.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Optional

import jax
import jax.numpy as jnp

from jaxar.config import ConfigError

# Input axes of each target kernel after the leading layer axis.
IN_AXES = {"q_proj": 1, "k_proj": 1, "v_proj": 1, "o_proj": 2, "gate_proj": 1, "up_proj": 1, "down_proj": 1}
DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """`lora:` section. rank 0 (the default) turns LoRA off: every parameter trains.

    rank: adapter rank r; alpha: the update is scaled by alpha / rank;
    targets: projections that get adapters (names under layers/attn and layers/mlp).
    """

    rank: int = 0
    alpha: float = 16.0
    targets: tuple = DEFAULT_TARGETS

    @property
    def enabled(self) -> bool:
        return self.rank > 0

    @property
    def scale(self) -> float:
        return float(self.alpha) / self.rank

    def validate(self) -> None:
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 0:
            raise ConfigError(f"lora.rank={self.rank!r} must be an integer >= 0 (0 turns LoRA off)")
        if not self.alpha > 0:
            raise ConfigError(f"lora.alpha={self.alpha!r} must be > 0")
        targets = tuple(self.targets) if isinstance(self.targets, (list, tuple)) else None
        if not targets:
            raise ConfigError(f"lora.targets={self.targets!r} must be a non-empty list, e.g. [q_proj, v_proj]")
        unknown = [t for t in targets if t not in IN_AXES]
        if unknown:
            raise ConfigError(f"lora.targets: {unknown[0]!r} is not a projection; use some of {sorted(IN_AXES)}")
        if len(set(targets)) != len(targets):
            raise ConfigError(f"lora.targets={list(targets)} names a projection twice")

    def to_dict(self) -> dict:
        return {"rank": self.rank, "alpha": self.alpha, "targets": list(self.targets)}


def _target_paths(params, lora: LoraConfig) -> dict:
    """{"layers/<group>/<target>": kernel} for every target kernel in `params`."""
    found = {}
    layers = params.get("layers", {}) if isinstance(params, dict) else {}
    for group, modules in layers.items():
        if not isinstance(modules, dict):
            continue
        for name, leaves in modules.items():
            if name in lora.targets and isinstance(leaves, dict) and "kernel" in leaves:
                found[f"layers/{group}/{name}"] = leaves["kernel"]
    missing = [t for t in lora.targets if not any(p.endswith("/" + t) for p in found)]
    if missing:
        raise ConfigError(f"lora.targets: this model has no {missing[0]!r} kernel under layers "
                          f"(it has: {sorted(p.split('/')[-1] for p in found) or 'none of the targets'})")
    return found


def _split(path: str, shape) -> tuple[int, tuple, tuple]:
    n_in = IN_AXES[path.split("/")[-1]]
    return shape[0], tuple(shape[1:1 + n_in]), tuple(shape[1 + n_in:])


def init_adapters(lora: LoraConfig, params, rng: jax.Array) -> dict:
    """A ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in)) (PEFT's kaiming-uniform bound), B = 0; float32."""
    out = {}
    targets = _target_paths(params, lora)
    for i, (path, kernel) in enumerate(sorted(targets.items())):
        layers, ins, outs = _split(path, kernel.shape)
        bound = 1.0 / math.sqrt(math.prod(ins))
        a = jax.random.uniform(jax.random.fold_in(rng, i), (layers, *ins, lora.rank), jnp.float32, -bound, bound)
        _, group, name = path.split("/")
        out.setdefault("layers", {}).setdefault(group, {})[name] = {
            "a": a, "b": jnp.zeros((layers, lora.rank, *outs), jnp.float32)}
    return out


def adapter_logical_axes(lora: LoraConfig, params_axes, params_shapes) -> dict:
    """Logical axes of the adapters: A keeps the kernel's input axes, B its output axes."""
    out = {}
    shapes = _target_paths(params_shapes, lora)
    for path, kernel in shapes.items():
        group, name = path.split("/")[1:]
        axes = params_axes["layers"][group][name]["kernel"]
        _, ins, _ = _split(path, kernel.shape)
        n_in = len(ins)
        out.setdefault("layers", {}).setdefault(group, {})[name] = {
            "a": (axes[0], *axes[1:1 + n_in], None), "b": (axes[0], None, *axes[1 + n_in:])}
    return out


def delta(adapter: dict, shape, scale: float) -> jax.Array:
    """scale * A @ B in float32, shaped like the kernel [layers, *in, *out]."""
    a, b = adapter["a"].astype(jnp.float32), adapter["b"].astype(jnp.float32)
    layers, rank = a.shape[0], a.shape[-1]
    a2 = a.reshape(layers, -1, rank)  # [layers, in, rank]
    b2 = b.reshape(layers, rank, -1)  # [layers, rank, out]
    return (scale * jnp.einsum("lir,lro->lio", a2, b2)).reshape(shape)


def _adapters(adapters):
    for group, modules in adapters.get("layers", {}).items():
        for name, adapter in modules.items():
            yield group, name, adapter


def merge(params, adapters: Optional[dict], lora: LoraConfig) -> Any:
    """The base params with every adapter folded into its kernel (W + alpha / rank * A @ B), in W's dtype."""
    if not adapters:
        return params
    layers = dict(params["layers"])
    for group, name, adapter in _adapters(adapters):
        modules = dict(layers[group])
        leaves = dict(modules[name])
        w = leaves["kernel"]
        leaves["kernel"] = (w.astype(jnp.float32) + delta(adapter, w.shape, lora.scale)).astype(w.dtype)
        modules[name] = leaves
        layers[group] = modules
    return {**params, "layers": layers}


def num_params(adapters) -> int:
    return sum(int(x.size) for x in jax.tree_util.tree_leaves(adapters))


__all__ = ["DEFAULT_TARGETS", "LoraConfig", "adapter_logical_axes", "delta", "init_adapters", "merge", "num_params"]
