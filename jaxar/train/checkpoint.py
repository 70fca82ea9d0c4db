"""Checkpoints of a training run (orbax), and loading one for inference.

Layout under `run_dir/checkpoints/<step>/` (one orbax CheckpointManager step):

    params/      the model parameters (sharded arrays, tensorstore)
    opt_state/   {"opt_state": optimizer state, "rng": uint32[2]}
    meta/        JSON: step, checksums of every array, process count, time
    config/      JSON: the full run config (model, data, train, mesh, ...)
    data/        JSON per process: the grain data-iterator state after `step` batches

Saves are asynchronous: the arrays are copied to host memory in `save`, and
written in the background while training goes on. Orbax writes each step into
a temporary directory and renames it when every item is written, so a crash
mid-save leaves no step directory; `meta` carries a checksum of every array
(a wrapping uint32 sum of its bits), so a checkpoint whose files were damaged
later is detected on restore and skipped for the previous one.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import shutil
import time
import warnings
from typing import Any, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxar.config import ModelConfig

log = logging.getLogger(__name__)

CHECKPOINTS_DIR = "checkpoints"
ITEMS = ("params", "opt_state", "meta", "config", "data")
_STEP_DIR = re.compile(r"^\d+$")


class CheckpointError(RuntimeError):
    """A checkpoint is incomplete, damaged, or does not match the run."""


# ---------------------------------------------------------------------------
# Checksums


def _leaf_checksum(x) -> jax.Array:
    """Wrapping uint32 sum of the array's bits: independent of sharding and reduction order."""
    x = jnp.asarray(x)
    if x.dtype == jnp.bool_:
        bits = x.astype(jnp.uint32)
    elif x.dtype.itemsize == 4:
        bits = jax.lax.bitcast_convert_type(x, jnp.uint32)
    elif x.dtype.itemsize == 2:
        bits = jax.lax.bitcast_convert_type(x, jnp.uint16).astype(jnp.uint32)
    elif x.dtype.itemsize == 1:
        bits = jax.lax.bitcast_convert_type(x, jnp.uint8).astype(jnp.uint32)
    elif x.dtype.itemsize == 8:
        halves = jax.lax.bitcast_convert_type(x, jnp.uint32)  # [..., 2]
        bits = halves[..., 0] * jnp.uint32(2654435761) + halves[..., 1]
    else:
        raise TypeError(f"cannot checksum dtype {x.dtype}")
    # Weight by position so that swapped values change the sum too.
    idx = jnp.arange(bits.size, dtype=jnp.uint32).reshape(bits.shape)
    return jnp.sum(bits * (idx * jnp.uint32(2) + jnp.uint32(1)), dtype=jnp.uint32)


def _path_str(path) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path)


def tree_checksums(tree) -> dict:
    """{path: int} for every array leaf of `tree` (collective under multi-host: every process calls it)."""
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    if not flat:
        return {}
    paths = [_path_str(p) for p, _ in flat]
    leaves = [x for _, x in flat]
    sums = _checksums_jit(leaves)
    return {p: int(np.asarray(s.addressable_data(0) if isinstance(s, jax.Array) else s))
            for p, s in zip(paths, sums)}


@jax.jit
def _checksums_jit(leaves):
    return [_leaf_checksum(x) for x in leaves]


def verify_checksums(tree, expected: dict, what: str) -> None:
    got = tree_checksums(tree)
    if set(got) != set(expected):
        raise CheckpointError(f"{what}: the arrays restored ({len(got)}) are not those saved ({len(expected)})")
    bad = [p for p in got if got[p] != int(expected[p])]
    if bad:
        raise CheckpointError(f"{what}: checksum mismatch in {len(bad)} array(s), e.g. {bad[0]!r}")


# ---------------------------------------------------------------------------
# Finding checkpoints


def checkpoints_dir(path: str) -> str:
    return os.path.join(path, CHECKPOINTS_DIR)


def is_complete(step_dir: str) -> bool:
    """A finalized orbax step directory holding every item (not proof the bytes are intact)."""
    if not os.path.isdir(step_dir) or not _STEP_DIR.match(os.path.basename(step_dir.rstrip("/"))):
        return False
    if not os.path.exists(os.path.join(step_dir, "_CHECKPOINT_METADATA")):
        return False
    return all(os.path.isdir(os.path.join(step_dir, item)) for item in ("params", "meta", "config"))


def list_steps(directory: str) -> list[int]:
    """Steps of the complete-looking checkpoints under a checkpoints directory, ascending."""
    if not os.path.isdir(directory):
        return []
    steps = [int(n) for n in os.listdir(directory) if _STEP_DIR.match(n)]
    return sorted(s for s in steps if is_complete(os.path.join(directory, str(s))))


def _resolve_dir(path: str) -> Tuple[Optional[str], Optional[int]]:
    """(checkpoints directory, explicit step or None) for a run dir, checkpoints dir or step dir."""
    path = os.path.abspath(os.path.expanduser(str(path)))
    base = os.path.basename(path.rstrip("/"))
    if _STEP_DIR.match(base) and os.path.exists(os.path.join(path, "_CHECKPOINT_METADATA")):
        return os.path.dirname(path), int(base)
    if os.path.isdir(os.path.join(path, CHECKPOINTS_DIR)):
        return os.path.join(path, CHECKPOINTS_DIR), None
    if base == CHECKPOINTS_DIR or any(_STEP_DIR.match(n) for n in (os.listdir(path) if os.path.isdir(path) else [])):
        return path, None
    return None, None


def find_checkpoint(path: str) -> Optional[str]:
    """The step directory of the latest complete checkpoint under `path`, or None.

    `path`: a run_dir, its `checkpoints/` directory, or one step directory
    (returned as is when complete).
    """
    directory, step = _resolve_dir(path)
    if directory is None:
        return None
    if step is not None:
        step_dir = os.path.join(directory, str(step))
        return step_dir if is_complete(step_dir) else None
    steps = list_steps(directory)
    return os.path.join(directory, str(steps[-1])) if steps else None


def read_json_item(step_dir: str, item: str) -> Any:
    """A JSON item written by orbax's JsonSave (`<step_dir>/<item>/metadata`)."""
    folder = os.path.join(step_dir, item)
    candidates = [os.path.join(folder, "metadata")] + sorted(
        os.path.join(folder, n) for n in (os.listdir(folder) if os.path.isdir(folder) else []))
    for p in candidates:
        if os.path.isfile(p):
            try:
                with open(p) as f:
                    return json.load(f)
            except ValueError as e:
                raise CheckpointError(f"{p}: not valid JSON ({e})") from None
    raise CheckpointError(f"{folder}: no JSON item found")


def read_run_config(step_dir: str) -> dict:
    return read_json_item(step_dir, "config")


def _abstract_params(config: ModelConfig, sharding=None):
    from jaxar.models.transformer import init_params

    shapes = jax.eval_shape(lambda: init_params(config, jax.random.PRNGKey(0)))
    sharding = sharding or jax.sharding.SingleDeviceSharding(jax.devices()[0])
    return jax.tree_util.tree_map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding), shapes)


def _restore_item(step_dir: str, item: str, abstract):
    import orbax.checkpoint as ocp

    with ocp.StandardCheckpointer() as ckptr:
        return ckptr.restore(os.path.join(step_dir, item), abstract)


def load_params(step_dir: str, *, verify: bool = True) -> Tuple[ModelConfig, dict]:
    """(model config, params on the default device) of one step directory; raises CheckpointError."""
    try:
        run = read_run_config(step_dir)
        config = ModelConfig.from_dict(run["model"])
        meta = read_json_item(step_dir, "meta")
        params = _restore_item(step_dir, "params", _abstract_params(config))
    except CheckpointError:
        raise
    except Exception as e:  # noqa: BLE001 - orbax / tensorstore raise many kinds
        raise CheckpointError(f"cannot read checkpoint {step_dir}: {type(e).__name__}: {e}") from e
    if verify:
        verify_checksums(params, meta["checksums"]["params"], f"checkpoint {step_dir} (params)")
    return config, params


def load_for_inference(found: str) -> Tuple[ModelConfig, dict]:
    """(ModelConfig, params) from `find_checkpoint`'s answer (or any run / step directory).

    A damaged checkpoint is skipped, with a warning, for the next older
    complete one of the same run.
    """
    step_dir = found if is_complete(found) else find_checkpoint(found)
    if step_dir is None:
        raise FileNotFoundError(f"no complete checkpoint under {found!r}")
    directory = os.path.dirname(os.path.abspath(step_dir))
    first = int(os.path.basename(step_dir.rstrip("/")))
    errors = []
    for step in [first] + [s for s in reversed(list_steps(directory)) if s < first]:
        try:
            return load_params(os.path.join(directory, str(step)))
        except CheckpointError as e:
            warnings.warn(f"skipping damaged checkpoint: {e}", stacklevel=2)
            errors.append(str(e))
    raise CheckpointError(f"no readable checkpoint under {directory}: " + "; ".join(errors))


# ---------------------------------------------------------------------------
# The training-side manager


class _IteratorSnapshot:
    """What grain's checkpoint handler needs: get_state() -> JSON bytes, fixed at snapshot time."""

    def __init__(self, state: Any):
        self._json = json.dumps(state)

    def get_state(self) -> bytes:
        return self._json.encode()


@dataclasses.dataclass
class Restored:
    step: int
    params: Any
    opt_state: Any
    rng: Any
    data_state: Optional[dict]
    run_config: dict


class RunCheckpointer:
    """Asynchronous saves and fault-tolerant restores for one run directory.

    Every process of a multi-host run creates one and calls `save` / `restore`
    at the same steps.
    """

    def __init__(self, run_dir: str, *, keep: int = 3, async_save: bool = True):
        import orbax.checkpoint as ocp

        self.directory = os.path.abspath(checkpoints_dir(run_dir))
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep or None,
            enable_async_checkpointing=async_save,
            create=True,
            cleanup_tmp_directories=True,
        )
        self._ocp = ocp
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    # Saving -------------------------------------------------------------
    def save(self, step: int, *, params, opt_state, rng, data_state: Optional[dict], run_config: dict) -> None:
        """Start an asynchronous save of `step` (returns once the arrays are on the host)."""
        import grain

        ocp = self._ocp
        if step in self.manager.all_steps():
            return  # already saved (e.g. the final save right after a periodic one)
        opt_item = {"opt_state": opt_state, "rng": rng}
        meta = {
            "step": int(step),
            "time": time.time(),
            "process_count": jax.process_count(),
            "checksums": {"params": tree_checksums(params), "opt_state": tree_checksums(opt_item)},
        }
        items = dict(
            params=ocp.args.StandardSave(params),
            opt_state=ocp.args.StandardSave(opt_item),
            meta=ocp.args.JsonSave(meta),
            config=ocp.args.JsonSave(run_config),
        )
        if data_state is not None:
            items["data"] = grain.checkpoint.CheckpointSave(_IteratorSnapshot(data_state))
        self.manager.save(step, args=ocp.args.Composite(**items), force=True)

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()

    # Restoring ----------------------------------------------------------
    def latest_config(self) -> Optional[dict]:
        """The run config of the newest complete-looking checkpoint (None when there is none)."""
        for step in reversed(list_steps(self.directory)):
            try:
                return read_run_config(os.path.join(self.directory, str(step)))
            except CheckpointError:
                continue
        return None

    def restore_latest(self, abstract_params, abstract_opt_item) -> Optional[Restored]:
        """The newest checkpoint that restores and verifies; damaged ones are warned about and set aside.

        abstract_*: trees of jax.ShapeDtypeStruct with the target shardings.
        """
        ocp = self._ocp
        for step in reversed(list_steps(self.directory)):
            step_dir = os.path.join(self.directory, str(step))
            try:
                meta = read_json_item(step_dir, "meta")
                run_config = read_run_config(step_dir)
                restored = self.manager.restore(step, args=ocp.args.Composite(
                    params=ocp.args.StandardRestore(abstract_params),
                    opt_state=ocp.args.StandardRestore(abstract_opt_item),
                ))
                params, opt_item = restored["params"], restored["opt_state"]
                verify_checksums(params, meta["checksums"]["params"], f"checkpoint step {step} (params)")
                verify_checksums(opt_item, meta["checksums"]["opt_state"], f"checkpoint step {step} (optimizer)")
                data_state = self._read_data_state(step_dir, meta)
            except Exception as e:  # noqa: BLE001
                msg = f"checkpoint at step {step} in {self.directory} is damaged or incomplete ({e}); " \
                      "trying the previous one"
                warnings.warn(msg, stacklevel=2)
                log.warning(msg)
                self._set_aside(step_dir)
                continue
            return Restored(step=int(step), params=params, opt_state=opt_item["opt_state"], rng=opt_item["rng"],
                            data_state=data_state, run_config=run_config)
        return None

    def _read_data_state(self, step_dir: str, meta: dict) -> Optional[dict]:
        folder = os.path.join(step_dir, "data")
        if not os.path.isdir(folder):
            return None
        if meta.get("process_count", 1) != jax.process_count():
            raise CheckpointError(
                f"the checkpoint was written by {meta.get('process_count')} processes, this run has "
                f"{jax.process_count()}; the data-iterator state cannot be split differently")
        name = os.path.join(folder, f"process_{jax.process_index()}-of-{jax.process_count()}.json")
        if not os.path.isfile(name):
            raise CheckpointError(f"{name} is missing")
        with open(name) as f:
            text = f.read()
        try:
            return json.loads(text)
        except ValueError as e:
            raise CheckpointError(f"{name}: not valid JSON ({e})") from None

    def _set_aside(self, step_dir: str) -> None:
        """Move a damaged step out of orbax's sight (kept, never deleted) so the step can be saved again."""
        from jax.experimental import multihost_utils

        if jax.process_index() == 0:
            target = os.path.join(self.directory, f"damaged-{os.path.basename(step_dir)}-{int(time.time())}")
            try:
                os.replace(step_dir, target)
                log.warning("moved damaged checkpoint %s to %s", step_dir, target)
            except OSError as e:
                log.warning("could not move damaged checkpoint %s aside: %s", step_dir, e)
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices(f"jaxar_set_aside_{os.path.basename(step_dir)}")
        self.manager.reload()


def remove_run_outputs(run_dir: str, names=(CHECKPOINTS_DIR, "metrics.jsonl", "tb", "loss.png", "run_config.json")
                       ) -> Optional[str]:
    """Move a previous run's outputs into run_dir/replaced-<time>/ (nothing is deleted)."""
    present = [n for n in names if os.path.exists(os.path.join(run_dir, n))]
    if not present:
        return None
    target = os.path.join(run_dir, f"replaced-{time.strftime('%Y%m%d-%H%M%S')}")
    os.makedirs(target, exist_ok=True)
    for n in present:
        shutil.move(os.path.join(run_dir, n), os.path.join(target, n))
    return target


__all__ = [
    "CheckpointError",
    "RunCheckpointer",
    "find_checkpoint",
    "is_complete",
    "list_steps",
    "load_for_inference",
    "load_params",
    "read_run_config",
    "remove_run_outputs",
    "tree_checksums",
]
