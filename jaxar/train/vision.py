"""Training of the image models: `train.py --config configs/fashion-{vq,classifier,raster,var}.yaml`.

A config with a top-level `task` is an image run:

    task: vq | classifier | raster | var
    run_dir: runs/fashion-vq
    seed: 0
    tokenizer_run: runs/fashion-vq     # raster / var: the VQ tokenizer run whose codes they model
    model: {...}                       # VQVAEConfig / ClassifierConfig / ImageARConfig fields
    data: {source: fashion_mnist, val_images: 2000}
    train: {steps, batch_size, lr, ...}   # jaxar.train.config.TrainConfig fields (seq_len unused)
    mesh: {data: -1, fsdp: 1, tensor: 1}

Evaluation (every train.eval_every steps and at the end) covers data.val_images test-split images, or the
whole test split for the classifier; train.eval_batches=0 turns it off.

* `vq`: the VQ-VAE tokenizer (`jaxar.models.vision.vqvae`); with `model.patch_nums` it also trains VAR's
  multi-scale residual quantizer on the same encoder / decoder, so one tokenizer run serves both the raster
  and the next-scale model. EMA codebook updates and dead-code restarts run after each optimizer update
  when `model.use_ema`. Writes `recon.png` (originals above reconstructions) at the end.
* `classifier`: the Fashion-MNIST CNN whose features the image metrics use (`jaxar.image_metrics`);
  its test accuracy is logged at every evaluation.
* `raster` / `var`: the class-conditional LlamaGen-style raster model and the VAR next-scale model
  (`jaxar.models.vision.ar`) over the tokenizer's codes. The dataset is encoded once by the tokenizer
  (cached in `run_dir/tokens.npz`), and the tokenizer's checkpoint is copied into `run_dir/tokenizer`, so
  the run samples on its own (`sample.py --model RUN_DIR --labels ...`).

The images live in memory (Fashion-MNIST is 47 MB as uint8); batches are a deterministic function of
(seed, step): epoch e is the permutation `default_rng([seed, e])` of the training set, so a resumed run
sees exactly the batches an uninterrupted one would, with no iterator state to save. (grain's
`MapDataset.shuffle` costs milliseconds per element on this CPU; a permutation of 60,000 indices costs
microseconds.) Each process reads only its rows of every global batch. Params are replicated over the mesh
and the batch is split over (data, fsdp); checkpoints, metrics, TensorBoard and the loss plot are the text
trainer's (`RunCheckpointer`, `metrics.jsonl`, `loss.png`). Running again with the same run_dir resumes.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import logging
import os
import shutil
import sys
import time
import warnings
from typing import Any, Callable, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxar.config import ConfigError
from jaxar.train import sharding as shd
from jaxar.train.config import MeshConfig, TrainConfig, _coerce_section, load_yaml, parse_override

log = logging.getLogger(__name__)

TASKS = ("vq", "classifier", "raster", "var")
AR_TASKS = ("raster", "var")
TOP_LEVEL = ("task", "run_dir", "seed", "tokenizer_run", "model", "data", "train", "mesh")
RUN_CONFIG_FILE = "run_config.json"
TOKENIZER_DIR = "tokenizer"
DEFAULT_TOKENIZER_RUN = "runs/fashion-vq"
# Keys of the AR model section that come from the tokenizer (a config may only restate them).
_FROM_TOKENIZER = ("codebook_size", "patch_nums", "code_dim")


@dataclasses.dataclass(frozen=True)
class ImageDataConfig:
    """source: "fashion_mnist" (the bundled copy) or a directory of IDX files; val_images: how many test-split
    images the periodic evaluation uses (the classifier's accuracy always uses the whole test split)."""

    source: str = "fashion_mnist"
    val_images: int = 2000

    def validate(self) -> None:
        from jaxar.train.images import image_source_dir

        if self.val_images < 1:
            raise ConfigError(f"data.val_images={self.val_images!r} must be >= 1")
        try:
            image_source_dir(self.source)
        except (FileNotFoundError, ValueError) as e:
            raise ConfigError(f"data.source={self.source!r}: {e}") from None


@dataclasses.dataclass(frozen=True)
class ImageRunConfig:
    task: str
    run_dir: str
    seed: int
    model: Any  # VQVAEConfig | ClassifierConfig | ImageARConfig
    data: ImageDataConfig
    train: TrainConfig
    mesh: MeshConfig
    tokenizer_run: Optional[str] = None

    def to_dict(self) -> dict:
        d = {"task": self.task, "run_dir": self.run_dir, "seed": self.seed, "model": model_to_dict(self.model),
             "data": dataclasses.asdict(self.data), "train": dataclasses.asdict(self.train),
             "mesh": self.mesh.as_dict()}
        if self.tokenizer_run is not None:
            d["tokenizer_run"] = self.tokenizer_run
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)


def model_to_dict(model) -> dict:
    d = model.to_dict() if hasattr(model, "to_dict") else dataclasses.asdict(model)
    return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}


def is_image_config(raw: dict) -> bool:
    return isinstance(raw, dict) and raw.get("task") is not None


def _model_class(task: str):
    if task == "vq":
        from jaxar.models.vision.vqvae import VQVAEConfig

        return VQVAEConfig
    if task == "classifier":
        from jaxar.models.vision.classifier import ClassifierConfig

        return ClassifierConfig
    from jaxar.models.vision.ar import ImageARConfig

    return ImageARConfig


def _fields(cls) -> list:
    return [f.name for f in dataclasses.fields(cls)]


def _sections(task: str) -> dict:
    model_keys = [k for k in _fields(_model_class(task)) if k != "kind"]
    return {"model": model_keys, "data": _fields(ImageDataConfig), "train": _fields(TrainConfig),
            "mesh": _fields(MeshConfig)}


def _unknown(key: str, task: str) -> ConfigError:
    known = list(TOP_LEVEL) + [f"{s}.{k}" for s, keys in _sections(task).items() for k in keys]
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
    if not close:
        by_leaf = {k.split(".")[-1]: k for k in known}
        leaf = difflib.get_close_matches(key.split(".")[-1], list(by_leaf), n=1, cutoff=0.6)
        close = [by_leaf[leaf[0]]] if leaf else []
    hint = f"; did you mean {close[0]!r}?" if close else f"; known keys: {', '.join(known)}"
    return ConfigError(f"unknown config key {key!r} for task {task!r}{hint}")


def apply_image_overrides(raw: dict, overrides: Sequence[str]) -> dict:
    out = {k: (dict(v) if isinstance(v, dict) else v) for k, v in raw.items()}
    for text in overrides:
        key, value = parse_override(text)
        if key == "task":
            out["task"] = value
    task = out.get("task")
    if task not in TASKS:
        raise ConfigError(f"task={task!r} is not an image task; use one of {TASKS}")
    sections = _sections(task)
    for text in overrides:
        key, value = parse_override(text)
        parts = key.split(".")
        if len(parts) == 1 and parts[0] in TOP_LEVEL and parts[0] not in sections:
            out[parts[0]] = value
        elif len(parts) == 2 and parts[0] in sections and parts[1] in sections[parts[0]]:
            section = dict(out.get(parts[0]) or {})
            section[parts[1]] = value
            out[parts[0]] = section
        elif len(parts) == 1 and parts[0] in sections:
            raise ConfigError(f"override {text!r}: set the fields of {parts[0]!r} one by one "
                              f"(e.g. {parts[0]}.<field>=...)")
        else:
            raise _unknown(key, task)
    return out


def build_image_run_config(raw: dict) -> ImageRunConfig:
    task = raw.get("task")
    if task not in TASKS:
        raise ConfigError(f"task={task!r} is not an image task; use one of {TASKS}")
    for k in raw:
        if k not in TOP_LEVEL:
            raise _unknown(str(k), task)
    sections = _sections(task)
    for s in sections:
        if raw.get(s) is not None and not isinstance(raw[s], dict):
            raise ConfigError(f"config section {s!r} must be a mapping, got {raw[s]!r}")
        for k in raw.get(s) or {}:
            if k not in sections[s]:
                raise _unknown(f"{s}.{k}", task)
    run_dir = raw.get("run_dir")
    if not isinstance(run_dir, str) or not run_dir:
        raise ConfigError(f"run_dir={run_dir!r} must be a non-empty path")
    seed = raw.get("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ConfigError(f"seed={seed!r} must be an integer")
    data = ImageDataConfig(**_coerce_section("data", dict(raw.get("data") or {}), ImageDataConfig))
    data.validate()
    train = TrainConfig(**_coerce_section("train", dict(raw.get("train") or {}), TrainConfig))
    train.validate()
    mesh = MeshConfig(**_coerce_section("mesh", dict(raw.get("mesh") or {}), MeshConfig))
    mesh.validate()
    model_values = dict(raw.get("model") or {})
    tokenizer_run = None
    if task in AR_TASKS:
        tokenizer_run = raw.get("tokenizer_run") or DEFAULT_TOKENIZER_RUN
        if not isinstance(tokenizer_run, str):
            raise ConfigError(f"tokenizer_run={tokenizer_run!r} must be the path of a vq run directory")
        tok_config = tokenizer_config(tokenizer_run)
        given = {k: model_values.pop(k) for k in _FROM_TOKENIZER if k in model_values}
        derived = {"codebook_size": tok_config.codebook_size, "code_dim": tok_config.code_dim,
                   "patch_nums": tuple(tok_config.patch_nums) or (7,)}
        for k, v in given.items():
            if v is not None and (tuple(v) if isinstance(v, list) else v) != derived[k]:
                raise ConfigError(f"model.{k}={v!r} differs from the tokenizer's {derived[k]!r} "
                                  f"(tokenizer_run={tokenizer_run!r}); remove it: it comes from the tokenizer")
        if task == "var" and not tok_config.patch_nums:
            raise ConfigError(f"tokenizer_run={tokenizer_run!r} has no multi-scale quantizer (model.patch_nums is "
                              "empty in its config); train the tokenizer with model.patch_nums set for a var model")
        model_values.update(kind=task, **derived)
    elif raw.get("tokenizer_run") is not None:
        raise ConfigError(f"tokenizer_run is for raster / var runs, not task={task!r}; remove it")
    cls = _model_class(task)
    values = _coerce_section("model", model_values, cls)
    try:
        model = cls(**values)
        if hasattr(model, "validate"):
            model.validate()
    except (TypeError, ValueError) as e:
        raise ConfigError(f"model: {e}") from None
    return ImageRunConfig(task=task, run_dir=run_dir, seed=seed, model=model, data=data, train=train, mesh=mesh,
                          tokenizer_run=tokenizer_run)


def load_image_run_config(path: Optional[str], overrides: Sequence[str] = ()) -> ImageRunConfig:
    raw = load_yaml(path) if path is not None else {}
    return build_image_run_config(apply_image_overrides(raw, overrides))


def model_from_dict(task: str, d: dict):
    cls = _model_class(task)
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}
    return cls.from_dict(values) if hasattr(cls, "from_dict") else cls(**values)


# ---------------------------------------------------------------------------
# Tasks: parameters, losses, evaluation


class Task(NamedTuple):
    init: Callable  # rng -> params
    loss: Callable  # (params, batch, rng) -> (loss, metrics)
    eval_metrics: Callable  # (params, batch) -> dict of per-example SUMS (and "count")
    extra_init: Callable  # params -> extra state (or None)
    post_update: Optional[Callable]  # (params, extra, batch, rng) -> (params, extra, metrics)


def make_task(run: ImageRunConfig, tokenizer=None) -> Task:
    cfg = run.model
    if run.task == "vq":
        from jaxar.models.vision import vqvae

        def init(rng):
            return vqvae.VQVAE(cfg).init(rng, jnp.zeros((1, 28, 28, 1), jnp.float32))

        def loss(params, batch, rng):
            return vqvae.loss_fn(params, vqvae.to_model_images(batch["images"]), cfg)

        def eval_metrics(params, batch):
            images = vqvae.to_model_images(batch["images"])
            recon, aux = vqvae.VQVAE(cfg).apply(params, images)
            out = {"recon_mse": jnp.sum(jnp.mean(jnp.square(recon - images), axis=(1, 2, 3)))}
            if cfg.patch_nums:
                out["ms_recon_mse"] = jnp.sum(jnp.mean(jnp.square(aux["ms_recon"] - images), axis=(1, 2, 3)))
            return out

        post = None
        extra_init = lambda params: None  # noqa: E731
        if cfg.use_ema:
            extra_init = vqvae.init_ema_state

            def post(params, extra, batch, rng):
                return vqvae.ema_codebook_step(params, extra, vqvae.to_model_images(batch["images"]), cfg,
                                               key=rng if cfg.dead_code_threshold > 0 else None)

        return Task(init, loss, eval_metrics, extra_init, post)
    if run.task == "classifier":
        from jaxar.models.vision import classifier as clf
        from jaxar.models.vision.vqvae import to_model_images

        def loss(params, batch, rng):
            return clf.loss_fn(params, to_model_images(batch["images"]), batch["labels"], cfg, rng=rng)

        def eval_metrics(params, batch):
            logits = clf.logits(params, to_model_images(batch["images"]), cfg)
            logp = jax.nn.log_softmax(logits.astype(jnp.float32))
            nll = -jnp.take_along_axis(logp, batch["labels"][:, None], axis=1)[:, 0]
            return {"loss": jnp.sum(nll), "accuracy": jnp.sum(jnp.argmax(logits, -1) == batch["labels"])}

        return Task(lambda rng: clf.init_params(cfg, rng), loss, eval_metrics, lambda p: None, None)
    from jaxar.models.vision import ar

    def loss(params, batch, rng):
        return ar.loss_fn(params, batch, rng, cfg, tokenizer=tokenizer)

    def eval_metrics(params, batch):
        logits = ar.score(params, batch["tokens"], batch["labels"], cfg, tokenizer=tokenizer).astype(jnp.float32)
        logp = jax.nn.log_softmax(logits)
        nll = -jnp.take_along_axis(logp, batch["tokens"][..., None], axis=-1)[..., 0]
        return {"loss": jnp.sum(jnp.mean(nll, axis=1)),
                "accuracy": jnp.sum(jnp.mean(jnp.argmax(logits, -1) == batch["tokens"], axis=1))}

    return Task(lambda rng: ar.init_params(cfg, rng), loss, eval_metrics, lambda p: None, None)


class ImageTrainState(NamedTuple):
    step: jax.Array
    params: Any
    opt_state: Any
    extra: Any
    rng: jax.Array


# ---------------------------------------------------------------------------
# Data


def load_images(data: ImageDataConfig, split: str):
    from jaxar.train.images import load_image_split

    return load_image_split(data.source, split)


def batch_indices(n: int, batch_size: int, step: int, seed: int) -> np.ndarray:
    """The training-set rows of global batch `step` (0-based): epochs are permutations
    `default_rng([seed, epoch])`; a batch that crosses an epoch end takes the rest from the next one."""
    start = step * batch_size
    out = []
    while len(out) < batch_size:
        epoch, offset = divmod(start + len(out), n)
        perm = np.random.default_rng([seed, epoch]).permutation(n)
        out.extend(perm[offset: offset + batch_size - len(out)].tolist())
    return np.asarray(out, np.int64)


# ---------------------------------------------------------------------------
# Loading runs


class ImageRun(NamedTuple):
    task: str
    config: Any  # the model config dataclass
    params: Any
    run_config: dict
    step_dir: str
    tokenizer: Optional[tuple] = None  # (VQVAEConfig, params) of an AR run


def run_task(path: str) -> Optional[str]:
    """The image task of a run directory (None: not an image run, e.g. a text model)."""
    for name in (os.path.join(path, RUN_CONFIG_FILE),):
        if os.path.isfile(name):
            try:
                with open(name) as f:
                    return json.load(f).get("task")
            except (OSError, ValueError):
                return None
    from jaxar.train import checkpoint as ckpt

    if os.path.isdir(path) and ckpt.is_complete(path):
        try:
            return ckpt.read_run_config(path).get("task")
        except ckpt.CheckpointError:
            return None
    return None


def _abstract(tree, sharding=None):
    sharding = sharding or jax.sharding.SingleDeviceSharding(jax.devices()[0])
    return jax.tree_util.tree_map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding), tree)


def _load_step(step_dir: str) -> ImageRun:
    from jaxar.train import checkpoint as ckpt

    reading = None
    try:
        run = ckpt.read_run_config(step_dir)
        task = run.get("task")
        if task not in TASKS:
            raise ckpt.CheckpointError(f"{step_dir} is not an image run (no image task in its config)")
        config = model_from_dict(task, run["model"])
        meta = ckpt.read_json_item(step_dir, "meta")
        dummy = ImageRunConfig(task=task, run_dir="", seed=0, model=config, data=ImageDataConfig(),
                               train=TrainConfig(), mesh=MeshConfig())
        shapes = jax.eval_shape(make_task(dummy).init, jax.random.PRNGKey(0))
        reading = "params"
        params = ckpt._restore_item(step_dir, "params", _abstract(shapes))
    except ckpt.CheckpointError:
        raise
    except Exception as e:  # noqa: BLE001 - orbax / tensorstore raise many kinds
        raise ckpt.CheckpointError(ckpt.describe_damage(e, reading)) from e
    ckpt.verify_checksums(params, meta["checksums"]["params"], "params")
    return ImageRun(task=task, config=config, params=params, run_config=run, step_dir=step_dir)


def load_image_run(path: str, *, with_tokenizer: bool = True) -> ImageRun:
    """An image run's newest readable checkpoint (a run directory, its checkpoints/ or one step
    directory); a damaged step is skipped with a one-line warning. AR runs come with their tokenizer
    (`run_dir/tokenizer`, copied there at training start)."""
    from jaxar.train import checkpoint as ckpt

    path = os.path.abspath(os.path.expanduser(path))
    if ckpt.is_complete(path):
        candidates = [path]
    else:
        directory = ckpt.checkpoints_dir(path) if os.path.isdir(ckpt.checkpoints_dir(path)) else path
        candidates = [os.path.join(directory, str(s)) for s in reversed(ckpt.list_steps(directory))]
    if not candidates:
        raise FileNotFoundError(f"{path} holds no complete checkpoint (train it with train.py first)")
    errors = []
    for step_dir in candidates:
        try:
            with ckpt._QuietFailedReads():
                run = _load_step(step_dir)
        except ckpt.CheckpointError as e:
            errors.append((step_dir, ckpt.describe_damage(e)))
            continue
        for bad, reason in errors:
            warnings.warn(f"checkpoint {bad} is damaged ({reason}); loading {step_dir}", stacklevel=2)
        if run.task in AR_TASKS and with_tokenizer:
            run_dir = os.path.dirname(os.path.dirname(step_dir))
            tok_dir = os.path.join(run_dir, TOKENIZER_DIR)
            if not os.path.isdir(tok_dir):
                raise FileNotFoundError(f"{run_dir} has no {TOKENIZER_DIR}/ (the tokenizer copied at training "
                                        "start); it is needed to turn codes into images")
            tok = load_image_run(tok_dir)
            run = run._replace(tokenizer=(tok.config, tok.params))
        return run
    raise ckpt.CheckpointError(f"no readable checkpoint under {path}: " +
                               "; ".join(f"{os.path.basename(d)}: {r}" for d, r in errors))


def tokenizer_config(tokenizer_run: str):
    """The VQVAEConfig of a vq run (read from its config, no weights); one-line ConfigError otherwise."""
    path = os.path.abspath(os.path.expanduser(tokenizer_run))
    run = None
    name = os.path.join(path, RUN_CONFIG_FILE)
    if os.path.isfile(name):
        with open(name) as f:
            run = json.load(f)
    else:
        from jaxar.train import checkpoint as ckpt

        found = ckpt.find_checkpoint(path) if os.path.isdir(path) else None
        if found is not None:
            run = ckpt.read_run_config(found)
    if run is None:
        raise ConfigError(f"tokenizer_run={tokenizer_run!r} is not a trained tokenizer run; train one first: "
                          "python train.py --config configs/fashion-vq.yaml")
    if run.get("task") != "vq":
        raise ConfigError(f"tokenizer_run={tokenizer_run!r} is a {run.get('task') or 'text'!r} run, not a vq "
                          "tokenizer run")
    return model_from_dict("vq", run["model"])


# ---------------------------------------------------------------------------
# The loop


@dataclasses.dataclass
class ImageTrainResult:
    run_dir: str
    step: int
    losses: dict
    val_losses: dict
    preempted: bool
    val_metrics: dict
    state: Any = None


def _identity(run: dict) -> dict:
    train = run.get("train") or {}
    return {"task": run.get("task"), "model": run.get("model"), "data": run.get("data"), "seed": run.get("seed"),
            "tokenizer_run": run.get("tokenizer_run"), "batch_size": train.get("batch_size")}


def _prepare_tokenizer(run: ImageRunConfig, run_dir: str, is_main: bool):
    """Copy the tokenizer's newest checkpoint (params, meta, config: not its optimizer state) into
    run_dir/tokenizer/checkpoints/<step> once, and load it from there."""
    from jaxar.train import checkpoint as ckpt

    target = os.path.join(run_dir, TOKENIZER_DIR)
    if not os.path.isdir(target):
        found = ckpt.find_checkpoint(os.path.abspath(os.path.expanduser(run.tokenizer_run)))
        if found is None:
            raise ConfigError(f"tokenizer_run={run.tokenizer_run!r} has no complete checkpoint; train it first: "
                              "python train.py --config configs/fashion-vq.yaml")
        src = load_image_run(found)  # verifies it reads before copying
        if is_main:
            tmp = target + ".tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            step_dir = os.path.join(tmp, ckpt.CHECKPOINTS_DIR, os.path.basename(src.step_dir.rstrip("/")))
            os.makedirs(step_dir)
            for name in os.listdir(src.step_dir):
                if name == "opt_state":
                    continue
                path = os.path.join(src.step_dir, name)
                (shutil.copytree if os.path.isdir(path) else shutil.copy2)(path, os.path.join(step_dir, name))
            with open(os.path.join(tmp, RUN_CONFIG_FILE), "w") as f:
                json.dump(src.run_config, f, indent=2, sort_keys=True)
            os.replace(tmp, target)
        shd_barrier("jaxar_tokenizer_copied")
    tok = load_image_run(target)
    if tok.task != "vq":
        raise ConfigError(f"{target} is not a vq tokenizer")
    return tok.config, tok.params


def shd_barrier(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def _encoded_tokens(run: ImageRunConfig, run_dir: str, tokenizer, images: np.ndarray, split: str) -> np.ndarray:
    """The dataset encoded by the tokenizer, cached in run_dir/tokens.npz (keyed by the tokenizer's checksum)."""
    from jaxar.models.vision import ar
    from jaxar.train.checkpoint import tree_checksums

    key = json.dumps(tree_checksums(tokenizer[1]), sort_keys=True)
    path = os.path.join(run_dir, "tokens.npz")
    if os.path.isfile(path):
        try:
            with np.load(path) as f:
                if str(f["key"]) == key and f"{run.task}_{split}" in f:
                    return f[f"{run.task}_{split}"]
        except (OSError, ValueError, KeyError):
            pass
    print(f"[jaxar] encoding the {split} split ({len(images)} images) with the tokenizer", file=sys.stderr)
    tokens = np.asarray(ar.encode_tokens(run.model, tokenizer[0], tokenizer[1], images))
    if jax.process_index() == 0:
        saved = {}
        if os.path.isfile(path):
            try:
                with np.load(path) as f:
                    if str(f["key"]) == key:
                        saved = {k: f[k] for k in f.files if k != "key"}
            except (OSError, ValueError, KeyError):
                saved = {}
        saved[f"{run.task}_{split}"] = tokens
        np.savez(path + ".tmp.npz", key=np.asarray(key), **saved)
        os.replace(path + ".tmp.npz", path)
    return tokens


def train_image(run: ImageRunConfig, *, force: bool = False, devices=None,
                stop_after: Optional[int] = None) -> ImageTrainResult:
    """Train (or resume) an image run; see the module docstring."""
    from jaxar.train import checkpoint as ckpt
    from jaxar.train.trainer import _Preemption, _Writers, _stop_requested, lr_schedule, make_optimizer, plot_losses

    cfg = run.train
    run_dir = os.path.abspath(run.run_dir)
    is_main = jax.process_index() == 0
    mesh = shd.make_mesh(run.mesh.as_dict(), devices)
    shards = shd.batch_shards(mesh)
    if cfg.batch_size % (shards * jax.process_count()) and cfg.batch_size % shards:
        raise ConfigError(f"train.batch_size={cfg.batch_size} must be a multiple of the data x fsdp mesh size "
                          f"({shards})")
    os.makedirs(run_dir, exist_ok=True)
    config_path = os.path.join(run_dir, RUN_CONFIG_FILE)
    previous = None
    if os.path.exists(config_path):
        try:
            with open(config_path) as f:
                previous = json.load(f)
        except ValueError:
            previous = None
    run_dict = run.to_dict()
    if previous is not None and _identity(previous) != _identity(run_dict):
        from jaxar.train.trainer import _differences

        diff = _differences(_identity(previous), _identity(run_dict))
        if not force:
            shown = "\n  ".join(diff[:20])
            raise ConfigError(f"run_dir {run.run_dir!r} already holds a run with a different configuration:\n  "
                              f"{shown}\nUse another run_dir, or pass --force to move the old run's outputs into "
                              f"{run.run_dir}/replaced-<time>/ and start over.")
        if is_main:
            moved = ckpt.remove_run_outputs(run_dir, names=(ckpt.CHECKPOINTS_DIR, "metrics.jsonl", "tb", "loss.png",
                                                            RUN_CONFIG_FILE, TOKENIZER_DIR, "tokens.npz",
                                                            "recon.png"))
            print(f"[jaxar] --force: moved the previous run's outputs to {moved}", file=sys.stderr)
        shd_barrier("jaxar_after_move_aside")
    if is_main:
        with open(config_path + ".tmp", "w") as f:
            f.write(run.to_json())
        os.replace(config_path + ".tmp", config_path)

    # Data (uint8 images in memory; AR runs: codes from the tokenizer).
    train_images, train_labels = load_images(run.data, "train")
    test_images, test_labels = load_images(run.data, "test")
    tokenizer = None
    if run.task in AR_TASKS:
        tokenizer = _prepare_tokenizer(run, run_dir, is_main)
        train_x = _encoded_tokens(run, run_dir, tokenizer, train_images, "train")
        val_x = _encoded_tokens(run, run_dir, tokenizer, test_images[: run.data.val_images], "test")
        field = "tokens"
    else:
        train_x, val_x, field = train_images, test_images[: run.data.val_images], "images"
    val_y = test_labels[: run.data.val_images]
    if run.task == "classifier":  # accuracy on the whole test split
        val_x, val_y = test_images, test_labels

    n_proc, proc = jax.process_count(), jax.process_index()
    task = make_task(run, tokenizer)
    replicated = NamedSharding(mesh, P())
    rows = NamedSharding(mesh, P(shd.BATCH_AXES))
    abstract_params = jax.eval_shape(task.init, jax.random.PRNGKey(0))
    optimizer = make_optimizer(cfg, abstract_params)
    schedule = lr_schedule(cfg)

    def init_state(rng):
        params = task.init(rng)
        return ImageTrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.init(params),
                               extra=task.extra_init(params), rng=jax.random.fold_in(rng, 1))

    abstract_state = jax.eval_shape(init_state, jax.random.PRNGKey(0))
    state_shardings = jax.tree_util.tree_map(lambda _: replicated, abstract_state)

    def train_step(state: ImageTrainState, batch):
        key = jax.random.fold_in(state.rng, state.step)
        loss_key, post_key = jax.random.split(key)
        (loss, metrics), grads = jax.value_and_grad(task.loss, has_aux=True)(state.params, batch, loss_key)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        extra = state.extra
        if task.post_update is not None:
            params, extra, more = task.post_update(params, extra, batch, post_key)
            metrics = {**metrics, **more}
        metrics = {**metrics, "loss": loss, "lr": schedule(state.step), "grad_norm": optax.global_norm(grads)}
        return ImageTrainState(step=state.step + 1, params=params, opt_state=opt_state, extra=extra,
                               rng=state.rng), metrics

    train_step = jax.jit(train_step, in_shardings=(state_shardings, rows), out_shardings=(state_shardings, None),
                         donate_argnums=(0,))
    eval_step = jax.jit(task.eval_metrics, in_shardings=(state_shardings.params, rows))

    checkpointer = ckpt.RunCheckpointer(run_dir, keep=cfg.keep_checkpoints, async_save=cfg.async_checkpoint)
    opt_abstract = {"opt_state": {"opt": _abstract(abstract_state.opt_state, replicated),
                                  "extra": _abstract(abstract_state.extra, replicated)},
                    "rng": _abstract(abstract_state.rng, replicated)}
    restored = checkpointer.restore_latest(_abstract(abstract_state.params, replicated), opt_abstract)
    if restored is not None:
        step_array = jax.device_put(jnp.asarray(restored.step, jnp.int32), replicated)
        state = ImageTrainState(step=step_array, params=restored.params, opt_state=restored.opt_state["opt"],
                                extra=restored.opt_state["extra"], rng=restored.rng)
        start_step = restored.step
        if is_main:
            print(f"[jaxar] resuming {run_dir} from step {start_step}", file=sys.stderr)
    else:
        state = jax.jit(init_state, out_shardings=state_shardings)(jax.random.PRNGKey(run.seed))
        start_step = 0

    local_rows = cfg.batch_size // n_proc

    def local_batch(step: int) -> dict:
        idx = batch_indices(len(train_x), cfg.batch_size, step, run.seed)[proc * local_rows:(proc + 1) * local_rows]
        return {field: train_x[idx], "labels": train_labels[idx].astype(np.int32)}

    def global_rows(local: dict) -> dict:
        return {k: jax.make_array_from_process_local_data(rows, v, (v.shape[0] * n_proc,) + v.shape[1:])
                for k, v in local.items()}

    # Evaluation in equal batches (one compile); a remainder smaller than a batch is left out.
    eval_bs = min(max(cfg.batch_size, 250), len(val_x))
    eval_bs -= eval_bs % (shards * n_proc)
    val_batches = [{field: val_x[s:s + eval_bs], "labels": val_y[s:s + eval_bs].astype(np.int32)}
                   for s in range(0, len(val_x) - eval_bs + 1, eval_bs)] if eval_bs and cfg.eval_batches else []

    def evaluate(params) -> dict:
        if not val_batches:
            return {}
        sums = jax.device_get([eval_step(params, global_rows(
            {k: v[proc * (eval_bs // n_proc):(proc + 1) * (eval_bs // n_proc)] for k, v in b.items()}))
            for b in val_batches])
        count = eval_bs * len(val_batches)
        return {k: float(sum(float(s[k]) for s in sums)) / count for k in sums[0]}

    writers = _Writers(run_dir, start_step, is_main)
    bar = None
    if is_main and cfg.progress_bar:
        from tqdm.auto import tqdm

        bar = tqdm(total=cfg.steps, initial=start_step, desc=f"train {run.task}", dynamic_ncols=True,
                   file=sys.stderr)
    losses, val_losses, val_metrics = {}, {}, {}
    preempted = False
    step = start_step
    last_saved = start_step if restored is not None else -1

    def save(at_step: int) -> None:
        nonlocal last_saved
        if at_step == last_saved:
            return
        checkpointer.save(at_step, params=state.params, opt_state={"opt": state.opt_state, "extra": state.extra},
                          rng=state.rng, data_state=None, run_config=run_dict)
        last_saved = at_step

    def evaluate_and_record(at_step: int) -> None:
        metrics = evaluate(state.params)
        if not metrics:
            return
        main = metrics.get("loss", metrics.get("recon_mse"))
        val_losses[at_step] = main
        val_metrics[at_step] = metrics
        writers.write({"step": at_step, "val_loss": main, **{f"val_{k}": v for k, v in metrics.items()}})
        if bar is not None:
            bar.write(f"step {at_step}: " + ", ".join(f"val_{k} {v:.4f}" for k, v in metrics.items()))

    items_per_step = cfg.batch_size
    pending = []
    t_last, step_last = time.perf_counter(), start_step
    end_step = cfg.steps if stop_after is None else min(cfg.steps, start_step + stop_after)
    try:
        with _Preemption() as preemption:
            while step < end_step:
                state, metrics = train_step(state, global_rows(local_batch(step)))
                step += 1
                pending.append((step, metrics))
                if bar is not None:
                    bar.update(1)
                log_now = step % cfg.log_every == 0 or step == end_step
                if log_now:
                    fetched = jax.device_get([m for _, m in pending])
                    now = time.perf_counter()
                    rate = items_per_step * (step - step_last) / max(now - t_last, 1e-9)
                    t_last, step_last = now, step
                    m = {k: float(v) for k, v in fetched[-1].items()}
                    for s, fm in zip([s for s, _ in pending], fetched):
                        losses[s] = float(fm["loss"])
                    pending = []
                    writers.write({"step": step, **m, "images_per_s": rate, "time": time.time()})
                    if bar is not None:
                        post = {"loss": f"{m['loss']:.4f}", "img/s": f"{rate:,.0f}"}
                        for k in ("recon_mse", "ms_recon_mse", "accuracy"):
                            if k in m:
                                post[k] = f"{m[k]:.4f}"
                        bar.set_postfix(post, refresh=False)
                if cfg.eval_every and step % cfg.eval_every == 0 and step < cfg.steps:
                    evaluate_and_record(step)
                if cfg.checkpoint_every and step % cfg.checkpoint_every == 0:
                    save(step)
                if _stop_requested(preemption.requested, every_step=log_now):  # multi-host: agreed at log steps
                    preempted = True
                    if is_main:
                        print(f"[jaxar] SIGTERM: saving step {step} and exiting", file=sys.stderr)
                    break
            if pending:
                for s, fm in zip([s for s, _ in pending], jax.device_get([m for _, m in pending])):
                    losses[s] = float(fm["loss"])
            save(step)
            if step >= cfg.steps and step > start_step and not preempted:
                evaluate_and_record(step)
            checkpointer.wait()
    finally:
        if bar is not None:
            bar.close()
        writers.close()
        checkpointer.close()
    if is_main:
        try:
            plot_losses(writers.path, os.path.join(run_dir, "loss.png"))
            if run.task == "vq" and step >= cfg.steps:
                _save_reconstructions(run.model, state.params, test_images[:12], os.path.join(run_dir, "recon.png"))
        except Exception as e:  # noqa: BLE001 - a plot is not worth failing a run for
            log.warning("could not write the plots: %s", e)
    return ImageTrainResult(run_dir=run_dir, step=step, losses=losses, val_losses=val_losses, preempted=preempted,
                            val_metrics=val_metrics, state=state)


def _save_reconstructions(config, params, images: np.ndarray, path: str) -> None:
    """recon.png: originals, then the single-scale and (when present) multi-scale reconstructions."""
    from jaxar.image_metrics import save_grid
    from jaxar.models.vision import vqvae

    recon, aux = jax.jit(lambda p, x: vqvae.VQVAE(config).apply(p, x))(params, vqvae.to_model_images(images))
    rows = [images, vqvae.to_uint8(recon)]
    if config.patch_nums:
        rows.append(vqvae.to_uint8(aux["ms_recon"]))
    save_grid(np.concatenate(rows), path, rows=len(rows))


__all__ = ["AR_TASKS", "ImageDataConfig", "ImageRun", "ImageRunConfig", "ImageTrainResult", "TASKS",
           "batch_indices", "build_image_run_config", "is_image_config", "load_image_run", "load_image_run_config",
           "run_task", "tokenizer_config", "train_image"]
