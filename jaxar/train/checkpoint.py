"""Checkpoints of a training run (orbax), and loading one for inference.

Layout under `run_dir/checkpoints/<step>/` (one orbax CheckpointManager step):

    params/      the model parameters (sharded arrays, tensorstore); with LoRA, the frozen base
    lora/        LoRA runs only: the adapters (loading merges them into params)
    opt_state/   {"opt_state": optimizer state, "rng": uint32[2]}
    meta/        JSON: step, checksums of every array, process count, time
    config/      JSON: the full run config (model, data, train, mesh, ...)
    data/        JSON per process: the grain data-iterator state after `step` batches

Saves are asynchronous: the arrays are copied to host memory in `save`, and
written in the background while training goes on. Orbax writes each step into
a temporary directory and renames it when every item is written, so a crash
mid-save leaves no step directory; `meta` carries a checksum of every array
(a wrapping uint32 sum of its bits), so a checkpoint whose files were damaged
later is detected on restore and skipped for the previous one, with one
warning line naming the step, what is wrong and the step used instead
(`describe_damage` condenses orbax / TensorStore errors to one clause).
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
ITEMS = ("params", "lora", "opt_state", "meta", "config", "data")
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
        more = f" and {len(bad) - 1} more" if len(bad) > 1 else ""
        raise CheckpointError(f"{what}/{bad[0]}{more}: checksum mismatch")


_MAX_REASON_CHARS = 200


def describe_damage(error: BaseException, item: Optional[str] = None) -> str:
    """One line saying what is wrong with a checkpoint, from whatever orbax / TensorStore raised.

    Their messages run over many lines and kilobytes (specs, source locations,
    a chain of "while doing X: while doing Y: cause"). This keeps the first
    line without the `[tensorstore_spec=...]` / `[source locations=...]` parts;
    a TensorStore read error becomes "<item>/<array>: <STATUS>: ... <the last
    three clauses>" (e.g. "params/embed.embedding: DATA_LOSS: ... Error decoding
    b-tree node: CRC-32C checksum verification failed: expected=..."); at most
    _MAX_REASON_CHARS characters.
    """
    if isinstance(error, CheckpointError):
        text = str(error)
    else:
        text = f"{type(error).__name__}: {error}" if str(error) else type(error).__name__
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    line = lines[0] if lines else type(error).__name__
    line = re.sub(r"\s*\[(source locations|tensorstore_spec[^=]*)=.*?(\]|$)", "", line)
    line = re.sub(r"\s*tensorstore_spec=.*", "", line)
    line = re.sub(r"\s+", " ", line).strip()
    array = re.search(r'Error reading "([^"]+?)/\.z', line)
    status = re.search(r"\b([A-Z][A-Z_]{3,}): ", line)
    if array and status:
        parts = line.split(": ")
        line = f"{array.group(1)}: {status.group(1)}: ... " + ": ".join(parts[-3:])
    if item:
        line = f"{item}/{line}" if array and status else f"{item}: {line}"
    if len(line) > _MAX_REASON_CHARS:
        line = line[: _MAX_REASON_CHARS - 3].rstrip() + "..."
    return line


class _QuietFailedReads:
    """Keeps what a failed orbax read leaves behind off stderr, so that the damage is reported in one line.

    When one array of a restore fails, orbax's other asyncio read tasks end with
    the same TensorStore error (dozens of lines each) that nobody retrieves:
    asyncio logs "Task exception was never retrieved" when they are collected,
    and tasks whose event loop is already closed raise "Event loop is closed"
    into sys.unraisablehook. Inside this context those records are dropped; on
    exit the garbage is collected so that it happens here, not later.
    """

    _DROPPED = ("Task exception was never retrieved", "Future exception was never retrieved")

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self._DROPPED)

    def __enter__(self):
        import sys

        self._logger = logging.getLogger("asyncio")
        self._logger.addFilter(self)
        self._hook = sys.unraisablehook

        def hook(unraisable):
            if isinstance(unraisable.exc_value, RuntimeError) and "Event loop is closed" in str(unraisable.exc_value):
                return
            self._hook(unraisable)

        sys.unraisablehook = hook
        return self

    def __exit__(self, *exc):
        import gc
        import sys

        gc.collect()
        sys.unraisablehook = self._hook
        self._logger.removeFilter(self)
        return False


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


def _lora_config(run: dict):
    from jaxar.train.lora import LoraConfig

    section = run.get("lora") or {}
    lora = LoraConfig(**{**section, "targets": tuple(section.get("targets", LoraConfig.targets))})
    return lora if lora.enabled else None


def load_params(step_dir: str, *, verify: bool = True) -> Tuple[ModelConfig, dict]:
    """(model config, params on the default device) of one step directory, LoRA adapters merged;
    raises CheckpointError."""
    reading = None  # the item being read, to name it in the error
    try:
        run = read_run_config(step_dir)
        config = ModelConfig.from_dict(run["model"])
        meta = read_json_item(step_dir, "meta")
        abstract = _abstract_params(config)
        reading = "params"
        params = _restore_item(step_dir, "params", abstract)
        lora = _lora_config(run)
        adapters = None
        if lora is not None:
            from jaxar.train import lora as lora_lib

            abstract_adapters = jax.eval_shape(lambda: lora_lib.init_adapters(lora, abstract, jax.random.PRNGKey(0)))
            sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
            abstract_adapters = jax.tree_util.tree_map(
                lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding), abstract_adapters)
            reading = "lora"
            adapters = _restore_item(step_dir, "lora", abstract_adapters)
    except CheckpointError:
        raise
    except Exception as e:  # noqa: BLE001 - orbax / tensorstore raise many kinds
        raise CheckpointError(describe_damage(e, reading)) from e
    if verify:
        verify_checksums(params, meta["checksums"]["params"], "params")
        if adapters is not None:
            verify_checksums(adapters, meta["checksums"]["lora"], "lora")
    if adapters is not None:
        from jaxar.train import lora as lora_lib

        params = jax.jit(lora_lib.merge, static_argnums=2)(params, adapters, lora)
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
    damaged = []  # (step, reason) not yet reported
    for step in [first] + [s for s in reversed(list_steps(directory)) if s < first]:
        try:
            with _QuietFailedReads():
                loaded = load_params(os.path.join(directory, str(step)))
        except CheckpointError as e:
            damaged.append((step, describe_damage(e)))
            errors.append(f"step {step}: {describe_damage(e)}")
            continue
        for bad, reason in damaged:
            warnings.warn(f"checkpoint step {bad} in {directory} is damaged ({reason}); loading step {step}",
                          stacklevel=2)
        return loaded
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
    lora: Any = None


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
    def save(self, step: int, *, params, opt_state, rng, data_state: Optional[dict], run_config: dict,
             lora=None) -> None:
        """Start an asynchronous save of `step` (returns once the arrays are on the host).

        lora: the adapters of a LoRA run (params is then the frozen base)."""
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
        if lora is not None:
            meta["checksums"]["lora"] = tree_checksums(lora)
        items = dict(
            params=ocp.args.StandardSave(params),
            opt_state=ocp.args.StandardSave(opt_item),
            meta=ocp.args.JsonSave(meta),
            config=ocp.args.JsonSave(run_config),
        )
        if lora is not None:
            items["lora"] = ocp.args.StandardSave(lora)
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

    def restore_latest(self, abstract_params, abstract_opt_item, abstract_lora=None) -> Optional[Restored]:
        """The newest checkpoint that restores and verifies; damaged ones are set aside (kept on disk)
        and reported in one warning line each: "checkpoint step 40 in DIR is damaged (params/...:
        checksum mismatch); moved to damaged-40-<time>; resuming from step 30".

        abstract_*: trees of jax.ShapeDtypeStruct with the target shardings (abstract_lora: LoRA runs).
        """
        ocp = self._ocp
        damaged = []  # (step, reason, where it was moved)
        found = None
        for step in reversed(list_steps(self.directory)):
            step_dir = os.path.join(self.directory, str(step))
            try:
                meta = read_json_item(step_dir, "meta")
                run_config = read_run_config(step_dir)
                items = dict(params=ocp.args.StandardRestore(abstract_params),
                             opt_state=ocp.args.StandardRestore(abstract_opt_item))
                if abstract_lora is not None:
                    items["lora"] = ocp.args.StandardRestore(abstract_lora)
                with _QuietFailedReads():
                    try:
                        restored = self.manager.restore(step, args=ocp.args.Composite(**items))
                    except Exception as e:  # noqa: BLE001 - name the item that does not read
                        raise CheckpointError(self._unreadable_item(step, items, e)) from e
                params, opt_item = restored["params"], restored["opt_state"]
                verify_checksums(params, meta["checksums"]["params"], "params")
                adapters = None
                if abstract_lora is not None:
                    adapters = restored["lora"]
                    verify_checksums(adapters, meta["checksums"]["lora"], "lora")
                verify_checksums(opt_item, meta["checksums"]["opt_state"], "opt_state")
                data_state = self._read_data_state(step_dir, meta)
            except Exception as e:  # noqa: BLE001 - orbax / tensorstore raise many kinds
                reason = describe_damage(e)
                log.debug("checkpoint step %s is damaged", step, exc_info=True)  # the full error, for debugging
                damaged.append((step, reason, self._set_aside(step_dir)))
                continue
            found = Restored(step=int(step), params=params, opt_state=opt_item["opt_state"], rng=opt_item["rng"],
                             data_state=data_state, run_config=run_config, lora=adapters)
            break
        then = f"resuming from step {found.step}" if found is not None else "starting from scratch"
        for step, reason, moved in damaged:
            where = f"moved to {os.path.basename(moved)}; " if moved else ""
            warnings.warn(f"checkpoint step {step} in {self.directory} is damaged ({reason}); {where}{then}",
                          stacklevel=2)
        return found

    def _unreadable_item(self, step: int, items: dict, error: BaseException) -> str:
        """"<item>: <what went wrong>" for the first item of a failed restore that fails on its own."""
        for name, arg in items.items():
            try:
                self.manager.restore(step, args=self._ocp.args.Composite(**{name: arg}))
            except Exception as e:  # noqa: BLE001
                return describe_damage(e, name)
        return describe_damage(error)

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

    def _set_aside(self, step_dir: str) -> Optional[str]:
        """Move a damaged step out of orbax's sight (kept, never deleted) so the step can be saved again.
        Returns where it went (None: not moved, or not by this process)."""
        from jax.experimental import multihost_utils

        target = os.path.join(self.directory, f"damaged-{os.path.basename(step_dir)}-{int(time.time())}")
        moved = None
        if jax.process_index() == 0:
            try:
                os.replace(step_dir, target)
                moved = target
            except OSError as e:
                log.warning("could not move damaged checkpoint %s aside: %s", step_dir, describe_damage(e))
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices(f"jaxar_set_aside_{os.path.basename(step_dir)}")
        self.manager.reload()
        return moved


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
    "describe_damage",
    "find_checkpoint",
    "is_complete",
    "list_steps",
    "load_for_inference",
    "load_params",
    "read_run_config",
    "remove_run_outputs",
    "tree_checksums",
]
