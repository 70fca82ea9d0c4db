"""Device mesh, logical-axis partition rules, and multi-host start-up.

The mesh has three axes:

* `data`   - pure data parallelism: the batch is split, params are replicated;
* `fsdp`   - the batch is split *and* params / optimizer state are sharded
             (gathered for each use by XLA);
* `tensor` - tensor (Megatron-style) parallelism over heads, MLP and vocab.

Parameters carry logical axis names (`jaxar.param_logical_axes`); `RULES`
maps each name to a mesh axis. A name is left unsharded where its dimension
is not divisible by the mesh axis size, or where an earlier dimension of the
same array already uses that mesh axis.
"""

from __future__ import annotations

import logging
import math
import os
from typing import Mapping, Optional, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxar.config import ConfigError

log = logging.getLogger(__name__)

MESH_AXES = ("data", "fsdp", "tensor")
# The mesh axes the batch dimension is split over.
BATCH_AXES = ("data", "fsdp")

# Logical axis name -> mesh axis (None: replicated). Data, not code.
RULES: Mapping[str, Optional[str]] = {
    "embed": "fsdp",
    "vocab": "tensor",
    "heads": "tensor",
    "kv_heads": "tensor",
    "mlp": "tensor",
    "head_dim": None,
    "layers": None,
    "pos": None,
    "cond": None,
}


# ---------------------------------------------------------------------------
# Mesh


def resolve_mesh_shape(sizes: Mapping[str, int], num_devices: int) -> dict:
    """{data, fsdp, tensor} with a -1 entry filled in; the product must be num_devices."""
    sizes = {a: int(sizes.get(a, 1)) for a in MESH_AXES}
    unknown = [a for a, v in sizes.items() if v == -1]
    if len(unknown) > 1:
        raise ConfigError(f"mesh: at most one axis may be -1, got {sizes}")
    for a, v in sizes.items():
        if v != -1 and v < 1:
            raise ConfigError(f"mesh.{a}={v} must be a positive integer or -1")
    known = math.prod(v for v in sizes.values() if v != -1)
    if unknown:
        if num_devices % known:
            raise ConfigError(
                f"mesh {sizes}: the other axes use {known} devices, which does not divide the "
                f"{num_devices} available devices")
        sizes[unknown[0]] = num_devices // known
    total = math.prod(sizes.values())
    if total != num_devices:
        shape = " * ".join(f"mesh.{a}={sizes[a]}" for a in MESH_AXES)
        raise ConfigError(
            f"{shape} = {total}, but there are {num_devices} devices ({jax.default_backend()}); "
            "the product must equal the device count (set one axis to -1 to use the rest)")
    return sizes


def make_mesh(sizes: Mapping[str, int], devices: Optional[Sequence] = None) -> Mesh:
    """A Mesh with axes (data, fsdp, tensor) over `devices` (default: every device of every process)."""
    devices = list(jax.devices() if devices is None else devices)
    shape = resolve_mesh_shape(sizes, len(devices))
    dims = tuple(shape[a] for a in MESH_AXES)
    if len(devices) == len(jax.devices()) and devices == list(jax.devices()):
        try:  # topology-aware order (ICI / NVLink rings) where jax knows one
            from jax.experimental import mesh_utils

            arr = mesh_utils.create_device_mesh(dims, devices=devices, allow_split_physical_axes=True)
            return Mesh(arr, MESH_AXES)
        except Exception as e:  # noqa: BLE001 - fall back to the plain order
            log.debug("create_device_mesh failed (%s); using the device order", e)
    return Mesh(np.asarray(devices, dtype=object).reshape(dims), MESH_AXES)


# ---------------------------------------------------------------------------
# Partition specs


def logical_to_spec(logical_axes: Sequence[Optional[str]], shape: Sequence[int], mesh: Mesh,
                    rules: Mapping[str, Optional[str]] = RULES) -> P:
    """PartitionSpec for one array from its logical axis names and shape."""
    if len(logical_axes) != len(shape):
        raise ValueError(f"logical axes {tuple(logical_axes)} do not match shape {tuple(shape)}")
    used = set()
    spec = []
    for name, dim in zip(logical_axes, shape):
        axis = rules.get(name) if name is not None else None
        if axis is None or axis in used or mesh.shape[axis] == 1 or dim % mesh.shape[axis]:
            spec.append(None)
            continue
        used.add(axis)
        spec.append(axis)
    return P(*spec)


def _is_axes(x) -> bool:
    return isinstance(x, tuple) and all(isinstance(a, (str, type(None))) for a in x)


def tree_specs(logical_axes, shapes, mesh: Mesh, rules: Mapping[str, Optional[str]] = RULES):
    """PartitionSpecs for a pytree, given its logical axes tree and a tree of shaped values."""
    return jax.tree_util.tree_map(
        lambda axes, x: logical_to_spec(axes, x.shape, mesh, rules), logical_axes, shapes, is_leaf=_is_axes)


def tree_shardings(specs, mesh: Mesh):
    return jax.tree_util.tree_map(lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda x: isinstance(x, P))


def batch_spec() -> P:
    """The batch dimension split over (data, fsdp); the sequence replicated."""
    return P(BATCH_AXES, None)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, batch_spec())


def batch_shards(mesh: Mesh) -> int:
    return mesh.shape["data"] * mesh.shape["fsdp"]


def global_batch(local: Mapping[str, np.ndarray], mesh: Mesh) -> dict:
    """This process's rows -> global jax arrays sharded over (data, fsdp).

    Every process passes its own slice (global_batch_size // process_count rows).
    """
    sharding = batch_sharding(mesh)
    out = {}
    for k, v in local.items():
        v = np.asarray(v)
        global_shape = (v.shape[0] * jax.process_count(),) + v.shape[1:]
        out[k] = jax.make_array_from_process_local_data(sharding, v, global_shape)
    return out


def describe(specs) -> dict:
    """{'/'-joined param path: 'PartitionSpec(...)'} for logs."""
    flat = jax.tree_util.tree_flatten_with_path(specs, is_leaf=lambda x: isinstance(x, P))[0]
    return {"/".join(str(getattr(k, "key", k)) for k in path): str(s) for path, s in flat}


# ---------------------------------------------------------------------------
# Multi-host


def distributed_settings(coordinator: Optional[str] = None, num_processes: Optional[int] = None,
                         process_id: Optional[int] = None) -> Optional[dict]:
    """Arguments for jax.distributed.initialize from explicit values or the environment.

    Environment: JAX_COORDINATOR_ADDRESS (or JAXAR_COORDINATOR), JAXAR_NUM_PROCESSES,
    JAXAR_PROCESS_ID. JAXAR_DISTRIBUTED=auto lets jax detect the cluster (TPU pods,
    SLURM, ...). None: run as a single process.
    """
    env = os.environ
    coordinator = coordinator or env.get("JAXAR_COORDINATOR") or env.get("JAX_COORDINATOR_ADDRESS")
    if num_processes is None and env.get("JAXAR_NUM_PROCESSES"):
        num_processes = int(env["JAXAR_NUM_PROCESSES"])
    if process_id is None and env.get("JAXAR_PROCESS_ID"):
        process_id = int(env["JAXAR_PROCESS_ID"])
    if coordinator:
        if num_processes is None or process_id is None:
            raise ConfigError(
                f"multi-host: coordinator {coordinator!r} is set but the number of processes and this "
                "process's id are not (--num-processes/--process-id or JAXAR_NUM_PROCESSES/JAXAR_PROCESS_ID)")
        if not 0 <= process_id < num_processes:
            raise ConfigError(f"multi-host: process id {process_id} is not in [0, {num_processes})")
        return {"coordinator_address": coordinator, "num_processes": num_processes, "process_id": process_id}
    if env.get("JAXAR_DISTRIBUTED", "").lower() == "auto":
        return {}
    if num_processes not in (None, 1) or process_id not in (None, 0):
        raise ConfigError("multi-host: --num-processes/--process-id need a coordinator address "
                          "(--coordinator HOST:PORT or JAX_COORDINATOR_ADDRESS)")
    return None


_INITIALIZED = False


def initialize_distributed(coordinator: Optional[str] = None, num_processes: Optional[int] = None,
                           process_id: Optional[int] = None) -> bool:
    """Call jax.distributed.initialize when the arguments or environment ask for several processes.

    Must run before anything touches a jax backend. Returns True when it initialised.
    """
    global _INITIALIZED
    settings = distributed_settings(coordinator, num_processes, process_id)
    if settings is None or _INITIALIZED:
        return _INITIALIZED
    platforms = (os.environ.get("JAX_PLATFORMS") or jax.config.jax_platforms or "").lower()
    if "cpu" in platforms or platforms == "":
        # CPU collectives across processes (a no-op for GPU/TPU computations).
        try:
            jax.config.update("jax_cpu_collectives_implementation", "gloo")
        except (AttributeError, ValueError, KeyError) as e:  # option renamed in some jax version
            log.warning("could not select gloo CPU collectives: %s", e)
    jax.distributed.initialize(**settings)
    _INITIALIZED = True
    log.info("jax.distributed: process %d of %d, %d local / %d global devices", jax.process_index(),
             jax.process_count(), jax.local_device_count(), jax.device_count())
    return True


__all__ = [
    "BATCH_AXES",
    "MESH_AXES",
    "RULES",
    "batch_sharding",
    "batch_spec",
    "distributed_settings",
    "global_batch",
    "initialize_distributed",
    "logical_to_spec",
    "make_mesh",
    "resolve_mesh_shape",
    "tree_shardings",
    "tree_specs",
]
