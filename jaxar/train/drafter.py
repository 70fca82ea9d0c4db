"""Training draft heads on a frozen base: `train.py --config configs/{medusa,eagle}.yaml base_model=DIR`.

A config whose top-level `task` is "medusa" or "eagle" is a drafter run:

    task: medusa | eagle
    run_dir: runs/smollm2-medusa
    seed: 0
    base_model: runs/smollm2-135m      # a jaxar run dir, a Hugging Face dir or a .gguf file (or "smollm2")
    heads: {num_heads: 4, hydra: false, num_layers: 1, feature_layers: null, dtype: float32}
    data: {source: shakespeare, tokenizer: null, ...}   # DataConfig fields; tokenizer null: the base's
    train: {steps, batch_size, seq_len, lr, ..., rollout: 3, decay: 0.8, feature_weight: 0.0}
    mesh: {data: -1, fsdp: 1, tensor: 1}

The text is the text trainer's pipeline (`jaxar.train.data`: any data.source, packed rows, a grain
iterator whose state is checkpointed). Every step runs the frozen base on the batch (no gradient:
`jax.lax.stop_gradient`) for its hidden states and logits, then the heads' loss:

* medusa (`heads.hydra` false): head i's cross-entropy to the true token t+i+2, weighted decay^i;
  Hydra (`heads.hydra` true): the same with the heads teacher-forced on the true previous tokens.
* eagle: the training-time test. Step 0 feeds the fused target features; step s = 1..rollout-1 feeds
  the drafter's own output hidden of step s-1 at the previous position, exactly as drafting does:
  query (s, t) attends to the step-0 entries at positions <= t - s (true features, what the drafter's
  cache holds after a verification) and to the entries (r, t - s + r), r = 1..s, of its own chain
  (one forward over the steps 0..s stacked, with a tree mask). The loss is the soft cross-entropy
  to the base's next-token distribution (at t + 1), weighted decay^s; with `feature_weight` > 0 plus
  that weight times the smooth-L1 distance of the output hidden to the base's last hidden state at
  t + 1 (off by default).

The losses are weighted means (divided by the sum of the weights), in nats per token.
`train.grad_accum` must be 1. Params (the heads only) are replicated over the mesh, the batch split
over (data, fsdp); the base's params are replicated and never saved. The run dir holds the text
trainer's outputs: checkpoints/ (orbax, `RunCheckpointer`; running again resumes), metrics.jsonl,
TensorBoard, loss.png, run_config.json, the tokenizer, and `drafter.json` (kind, heads config,
the base model's absolute path and its ModelConfig) so that `load_drafter_run` finds everything.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
import time
from typing import Any, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxar.config import ConfigError, ModelConfig
from jaxar.models import heads as H
from jaxar.train import sharding as shd
from jaxar.train.config import MeshConfig, TrainConfig, _coerce_section, load_yaml, parse_override

log = logging.getLogger(__name__)

TASKS = ("medusa", "eagle")
TOP_LEVEL = ("task", "run_dir", "seed", "base_model", "heads", "data", "train", "mesh")
SECTIONS = ("heads", "data", "train", "mesh")
RUN_CONFIG_FILE = "run_config.json"
DRAFTER_FILE = "drafter.json"
DEFAULT_BASE_MODEL = "runs/smollm2-135m"


@dataclasses.dataclass(frozen=True)
class DrafterOptions:
    """The drafter-only training switches (given in the `train` section).

    rollout: EAGLE: steps of the training-time test (1: no rollout).
    decay: weight of head i / rollout step s is decay**i.
    feature_weight: EAGLE: weight of the smooth-L1 feature regression (0: off).
    """

    rollout: int = 3
    decay: float = 0.8
    feature_weight: float = 0.0

    def validate(self) -> None:
        if isinstance(self.rollout, bool) or not isinstance(self.rollout, int) or self.rollout < 1:
            raise ConfigError(f"train.rollout={self.rollout!r} must be an integer >= 1")
        if not 0.0 < self.decay <= 1.0:
            raise ConfigError(f"train.decay={self.decay!r} must be in (0, 1]")
        if self.feature_weight < 0:
            raise ConfigError(f"train.feature_weight={self.feature_weight!r} must be >= 0")


@dataclasses.dataclass(frozen=True)
class DrafterRunConfig:
    task: str
    run_dir: str
    seed: int
    base_model: str  # absolute path
    heads: H.HeadsConfig
    data: Any  # DataConfig (tokenizer: the resolved one)
    train: TrainConfig
    options: DrafterOptions
    mesh: MeshConfig

    def to_dict(self) -> dict:
        return {"task": self.task, "run_dir": self.run_dir, "seed": self.seed, "base_model": self.base_model,
                "heads": self.heads.to_dict(), "data": self.data.to_dict(),
                "train": {**dataclasses.asdict(self.train), **dataclasses.asdict(self.options)},
                "mesh": self.mesh.as_dict()}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)


def is_drafter_config(raw: dict, overrides: Sequence[str] = ()) -> bool:
    """A drafter run: `task: medusa|eagle` in the YAML or in a `task=` override (the override wins)."""
    task = raw.get("task") if isinstance(raw, dict) else None
    for text in overrides:
        if text.split("=", 1)[0].strip() == "task":
            task = parse_override(text)[1]
    return task in TASKS


def _fields(cls) -> list:
    return [f.name for f in dataclasses.fields(cls)]


def _section_keys() -> dict:
    from jaxar.train.data import DataConfig

    return {"heads": [k for k in _fields(H.HeadsConfig) if k != "kind"], "data": _fields(DataConfig),
            "train": _fields(TrainConfig) + _fields(DrafterOptions), "mesh": _fields(MeshConfig)}


def _unknown(key: str) -> ConfigError:
    import difflib

    known = [k for k in TOP_LEVEL if k not in SECTIONS] + [f"{s}.{k}" for s, ks in _section_keys().items()
                                                          for k in ks]
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
    hint = f"; did you mean {close[0]!r}?" if close else f"; known keys: {', '.join(known)}"
    return ConfigError(f"unknown config key {key!r} for a drafter run{hint}")


def apply_drafter_overrides(raw: dict, overrides: Sequence[str]) -> dict:
    out = {k: (dict(v) if isinstance(v, dict) else v) for k, v in raw.items()}
    sections = _section_keys()
    for text in overrides:
        key, value = parse_override(text)
        parts = key.split(".")
        if len(parts) == 1 and parts[0] in TOP_LEVEL and parts[0] not in SECTIONS:
            out[parts[0]] = value
        elif len(parts) == 2 and parts[0] in sections and parts[1] in sections[parts[0]]:
            section = dict(out.get(parts[0]) or {})
            section[parts[1]] = value
            out[parts[0]] = section
        elif len(parts) == 1 and parts[0] in SECTIONS:
            raise ConfigError(f"override {text!r}: set the fields of {parts[0]!r} one by one "
                              f"(e.g. {parts[0]}.<field>=...)")
        else:
            raise _unknown(key)
    return out


def build_drafter_run_config(raw: dict) -> DrafterRunConfig:
    from jaxar.api import resolve_model_path
    from jaxar.train.data import DataConfig, DataError

    task = raw.get("task")
    if task not in TASKS:
        raise ConfigError(f"task={task!r} is not a drafter kind; use one of {TASKS}")
    sections = _section_keys()
    for k in raw:
        if k not in TOP_LEVEL:
            raise _unknown(str(k))
    for s in SECTIONS:
        if raw.get(s) is not None and not isinstance(raw[s], dict):
            raise ConfigError(f"config section {s!r} must be a mapping, got {raw[s]!r}")
        for k in raw.get(s) or {}:
            if k not in sections[s]:
                raise _unknown(f"{s}.{k}")
    run_dir = raw.get("run_dir")
    if not isinstance(run_dir, str) or not run_dir:
        raise ConfigError(f"run_dir={run_dir!r} must be a non-empty path")
    seed = raw.get("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ConfigError(f"seed={seed!r} must be an integer")
    base = raw.get("base_model") or DEFAULT_BASE_MODEL
    if not isinstance(base, str):
        raise ConfigError(f"base_model={base!r} must be a path (a jaxar run dir, a Hugging Face dir or a .gguf file)")
    try:
        base_path = resolve_model_path(base)
    except FileNotFoundError as e:
        raise ConfigError(f"base_model={base!r}: {e}") from None
    if not os.path.exists(base_path):
        raise ConfigError(f"base_model={base!r} does not exist; pass base_model=DIR (a jaxar run dir, a Hugging "
                          "Face directory or a .gguf file)")
    base_path = os.path.abspath(base_path)

    heads_values = _coerce_section("heads", dict(raw.get("heads") or {}), H.HeadsConfig)
    try:
        heads = H.HeadsConfig(kind=task, **heads_values)
        heads.validate()
    except (TypeError, ValueError) as e:
        raise ConfigError(f"heads: {e}") from None

    data_raw = dict(raw.get("data") or {})
    if data_raw.get("tokenizer") is None:
        data_raw["tokenizer"] = _base_tokenizer_source(base_path)
    try:
        data = DataConfig(**_coerce_section("data", data_raw, DataConfig))
    except DataError as e:
        raise ConfigError(f"data: {e}") from None
    train_raw = dict(raw.get("train") or {})
    option_values = {k: train_raw.pop(k) for k in _fields(DrafterOptions) if k in train_raw}
    train = TrainConfig(**_coerce_section("train", train_raw, TrainConfig))
    train.validate()
    if train.grad_accum != 1:
        raise ConfigError(f"train.grad_accum={train.grad_accum}: drafter runs take one batch per step (use 1)")
    options = DrafterOptions(**_coerce_section("train", option_values, DrafterOptions))
    options.validate()
    mesh = MeshConfig(**_coerce_section("mesh", dict(raw.get("mesh") or {}), MeshConfig))
    mesh.validate()
    return DrafterRunConfig(task=task, run_dir=run_dir, seed=seed, base_model=base_path, heads=heads, data=data,
                            train=train, options=options, mesh=mesh)


def _base_tokenizer_source(base_path: str) -> str:
    """Where the base's tokenizer lives (the base path itself); a one-line error when it has none."""
    from jaxar.tokenizer import load_tokenizer

    try:
        load_tokenizer(base_path)
    except (OSError, ValueError) as e:
        raise ConfigError(f"base_model={base_path!r} has no tokenizer ({e}); set data.tokenizer") from None
    return base_path


def load_drafter_run_config(path: Optional[str], overrides: Sequence[str] = ()) -> DrafterRunConfig:
    raw = load_yaml(path) if path is not None else {}
    return build_drafter_run_config(apply_drafter_overrides(raw, overrides))


# ---------------------------------------------------------------------------
# Losses


def base_outputs(base_params, batch: dict, *, heads: H.HeadsConfig, base_config: ModelConfig):
    """The frozen base on the batch: (logits [B, T, V], last hidden [B, T, D], EAGLE feature hiddens
    (3 x [B, T, D]) or ()), all under stop_gradient."""
    from jaxar.models.transformer import forward

    layers = heads.layers_for(base_config) if heads.kind == "eagle" else ()
    out = forward(base_params, batch["tokens"], config=base_config, positions=batch["positions"],
                  segment_ids=batch["segment_ids"], return_hidden=True, hidden_layers=layers)
    logits, hidden = out[0], out[2]
    feats = out[3] if layers else ()
    return jax.tree_util.tree_map(jax.lax.stop_gradient, (logits, hidden, tuple(feats)))


def _shift(x, k: int, fill=0):
    """x[:, t + k] at t (fill past the end); x [B, T, ...]."""
    if k == 0:
        return x
    pad = jnp.full((x.shape[0], k) + x.shape[2:], fill, x.dtype)
    return jnp.concatenate([x[:, k:], pad], axis=1)


def medusa_loss(params, base_params, batch: dict, *, heads: H.HeadsConfig, base_config: ModelConfig,
                options: DrafterOptions):
    """(weighted mean CE over the heads, metrics): head i at t against the true token t+i+2."""
    _, hidden, _ = base_outputs(base_params, batch, heads=heads, base_config=base_config)
    if heads.hydra:
        logits = H.hydra_logits_teacher_forced(params, base_params, hidden, batch["tokens"], config=heads,
                                               base_config=base_config)
    else:
        logits = H.medusa_logits(params, base_params, hidden, config=heads, base_config=base_config)
    seg = batch["segment_ids"]
    total, wsum, metrics = 0.0, 0.0, {}
    for i in range(heads.num_heads):
        target = _shift(batch["targets"], i + 1)
        valid = (_shift(batch["loss_mask"], i + 1) > 0) & (_shift(seg, i + 1, -1) == seg) & (seg > 0)
        lg = logits[:, :, i].astype(jnp.float32)
        nll = jax.nn.logsumexp(lg, -1) - jnp.take_along_axis(lg, target[..., None], -1)[..., 0]
        v = valid.astype(jnp.float32)
        n = jnp.maximum(jnp.sum(v), 1.0)
        ce = jnp.sum(nll * v) / n
        w = options.decay ** i
        total, wsum = total + w * ce, wsum + w
        metrics[f"loss_{i}"] = ce
        metrics[f"acc_{i}"] = jnp.sum((jnp.argmax(lg, -1) == target) * v) / n
    return total / wsum, metrics


def rollout_tree_mask(segment_ids, steps: int):
    """[B, steps*T, steps*T] bool for the training-time test over steps 0..steps-1 stacked: query
    (a, t) sees (0, j) for j <= t - a and (r, t - a + r) for 1 <= r <= a, within its segment."""
    B, T = segment_ids.shape
    a = jnp.repeat(jnp.arange(steps), T)  # step of each stacked index
    t = jnp.tile(jnp.arange(T), steps)  # position of each stacked index
    qa, qt, ka, kt = a[:, None], t[:, None], a[None, :], t[None, :]
    vis = ((ka == 0) & (kt <= qt - qa)) | ((ka >= 1) & (ka <= qa) & (kt == qt - qa + ka))
    seg = jnp.tile(segment_ids, (1, steps))
    return vis[None] & (seg[:, :, None] == seg[:, None, :])


def eagle_rollout(params, base_params, tokens, features, positions, segment_ids, steps: int, *,
                  heads: H.HeadsConfig, base_config: ModelConfig):
    """The training-time test: (logits [B, steps, T, V], hidden [B, steps, T, D]).

    tokens[:, t] = token_{t+1}, features [B, T, D]: the fused target features (step 0). Step s feeds at
    position t the drafter's output hidden of step s-1 at position t-1 (zeros at t = 0), and its query
    (s, t) sees what the drafter's cache would hold when drafting step s from a verified prefix ending
    at t - s (`rollout_tree_mask`); so row (s, t) equals drafting s steps past position t - s.
    """
    B, T = tokens.shape
    feats = [features]
    # Training differentiates through the drafter's attention: the XLA path (one spare cache slot, never
    # attended, keeps the size off a multiple of KV_CHUNK, whose chunked loop is a while_loop).
    base_config = base_config.replace(attention_backend="xla")

    def run(n_steps):
        cache = H.eagle_cache(heads, base_config, B, n_steps * T + 1)
        return H.eagle_forward(params, base_params, jnp.tile(tokens, (1, n_steps)), jnp.concatenate(feats, axis=1),
                               cache=cache, positions=jnp.tile(positions, (1, n_steps)),
                               tree_mask=rollout_tree_mask(segment_ids, n_steps), config=heads,
                               base_config=base_config)

    for s in range(1, steps):
        _, hidden, _ = run(s)
        prev = hidden[:, (s - 1) * T: s * T]  # o_{s-1}[t]
        feats.append(jnp.concatenate([jnp.zeros_like(prev[:, :1]), prev[:, :-1]], axis=1).astype(features.dtype))
    logits, hidden, _ = run(steps)
    return logits.reshape(B, steps, T, -1), hidden.reshape(B, steps, T, -1)


def eagle_loss(params, base_params, batch: dict, *, heads: H.HeadsConfig, base_config: ModelConfig,
               options: DrafterOptions):
    """(weighted mean over the rollout steps of the soft CE to the base's next-token distribution, metrics)."""
    base_logits, base_hidden, feats = base_outputs(base_params, batch, heads=heads, base_config=base_config)
    S = options.rollout
    tokens, seg = batch["targets"], batch["segment_ids"]  # tokens[t] = x_{t+1}
    B, T = tokens.shape
    logits, hidden = eagle_rollout(params, base_params, tokens, H.eagle_fuse(params, feats), batch["positions"], seg,
                                   S, heads=heads, base_config=base_config)
    p = jax.nn.softmax(_shift(base_logits, 1).astype(jnp.float32), -1)  # the base's distribution of x_{t+2}
    p_top = jnp.argmax(p, -1)
    target_hidden = _shift(base_hidden, 1).astype(jnp.float32)
    tt = jnp.arange(T)[None, :]
    base_valid = (batch["loss_mask"] > 0) & (_shift(batch["loss_mask"], 1) > 0) & (_shift(seg, 1, -1) == seg) & (
        tt < T - 1)
    total, wsum, metrics = 0.0, 0.0, {}
    for s in range(S):
        lg = logits[:, s].astype(jnp.float32)
        chain_same = jnp.concatenate([jnp.full((B, s), -1, seg.dtype), seg[:, :T - s]], axis=1) == seg
        v = (base_valid & chain_same & (tt >= s)).astype(jnp.float32)
        n = jnp.maximum(jnp.sum(v), 1.0)
        ce = jnp.sum(-jnp.sum(p * jax.nn.log_softmax(lg, -1), -1) * v) / n
        loss_s = ce
        if options.feature_weight > 0:
            diff = hidden[:, s].astype(jnp.float32) - target_hidden
            l1 = jnp.mean(jnp.where(jnp.abs(diff) < 1, 0.5 * diff ** 2, jnp.abs(diff) - 0.5), -1)
            loss_s = ce + options.feature_weight * jnp.sum(l1 * v) / n
            metrics[f"feature_{s}"] = jnp.sum(l1 * v) / n
        w = options.decay ** s
        total, wsum = total + w * loss_s, wsum + w
        metrics[f"loss_{s}"] = ce
        metrics[f"acc_{s}"] = jnp.sum((jnp.argmax(lg, -1) == p_top) * v) / n
    return total / wsum, metrics


def drafter_loss(kind: str):
    return medusa_loss if kind == "medusa" else eagle_loss


# ---------------------------------------------------------------------------
# Loading runs


class DrafterRun(NamedTuple):
    kind: str
    heads_config: H.HeadsConfig
    params: Any
    base_model_path: str
    run_config: dict
    base_config: Optional[ModelConfig] = None
    step_dir: Optional[str] = None
    token_counts: Optional[np.ndarray] = None  # training-data id counts (the draft vocabulary), if recorded


def _abstract(tree, sharding=None):
    sharding = sharding or jax.sharding.SingleDeviceSharding(jax.devices()[0])
    return jax.tree_util.tree_map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding), tree)


def load_drafter_run(path: str) -> DrafterRun:
    """The newest complete checkpoint of a drafter run (a run dir, its checkpoints/ or a step dir):
    its kind, HeadsConfig, head params, the base model's path and the run config."""
    from jaxar.train import checkpoint as ckpt

    path = os.path.abspath(os.path.expanduser(path))
    step_dir = ckpt.find_checkpoint(path) if os.path.isdir(path) else None
    if step_dir is None:
        raise FileNotFoundError(f"{path} holds no complete drafter checkpoint (train one with train.py --config "
                                "configs/medusa.yaml or configs/eagle.yaml)")
    run = ckpt.read_run_config(step_dir)
    if run.get("task") not in TASKS:
        raise ValueError(f"{path} is not a drafter run (its task is {run.get('task')!r}, not one of {TASKS})")
    heads = H.HeadsConfig.from_dict(run["heads"])
    base_config = ModelConfig.from_dict(run["base_config"])
    shapes = jax.eval_shape(lambda: H.init_heads(heads, base_config, jax.random.PRNGKey(0)))
    with ckpt._QuietFailedReads():
        try:
            params = ckpt._restore_item(step_dir, "params", _abstract(shapes))
        except Exception as e:  # noqa: BLE001 - orbax / tensorstore raise many kinds
            raise ckpt.CheckpointError(ckpt.describe_damage(e, "params")) from e
    ckpt.verify_checksums(params, ckpt.read_json_item(step_dir, "meta")["checksums"]["params"], "params")
    counts = None
    for where in (path, os.path.dirname(os.path.dirname(step_dir))):  # the run dir given, or above the step dir
        if os.path.isfile(os.path.join(where, TOKEN_COUNTS_FILE)):
            counts = np.load(os.path.join(where, TOKEN_COUNTS_FILE))
            break
    return DrafterRun(kind=heads.kind, heads_config=heads, params=params, base_model_path=run["base_model"],
                      run_config=run, base_config=base_config, step_dir=step_dir, token_counts=counts)


TOKEN_COUNTS_FILE = "token_counts.npy"


def token_counts(data, tokenizer, vocab_size: int) -> np.ndarray:
    """int64 [vocab_size]: how often each id occurs in the training split of `data` (a DataConfig)
    under `tokenizer`; the drafter's draft vocabulary is the most frequent ids (EAGLE-3's d2t)."""
    from jaxar.train.data import load_documents, split_documents

    train_docs, _ = split_documents(load_documents(data), data.val_fraction or 0.0)
    counts = np.zeros((vocab_size,), np.int64)
    for doc in train_docs:
        ids = np.asarray(tokenizer.encode(doc), np.int64)
        np.add.at(counts, ids[ids < vocab_size], 1)
    return counts


def write_token_counts(run_dir: str, data, tokenizer, vocab_size: int) -> str:
    """Write `token_counts.npy` into a drafter run (kept if it is already there)."""
    path = os.path.join(run_dir, TOKEN_COUNTS_FILE)
    if not os.path.exists(path):
        counts = token_counts(data, tokenizer, vocab_size)
        with open(path + ".tmp", "wb") as f:
            np.save(f, counts)
        os.replace(path + ".tmp", path)
    return path


def draft_vocabulary(counts: Optional[np.ndarray], vocab_size: int, size: int) -> Optional[np.ndarray]:
    """The `size` most frequent ids (ties: lower id first), sorted, or None (the whole vocabulary) when
    there are no counts or size covers it."""
    if counts is None or size is None or size >= vocab_size:
        return None
    if size < 1:
        raise ValueError(f"draft vocabulary size must be >= 1, got {size}")
    order = np.lexsort((np.arange(len(counts)), -np.asarray(counts)))
    return np.sort(order[:size]).astype(np.int32)


def is_drafter_run(path: str) -> bool:
    """Whether `path` is a drafter run directory (it has drafter.json or a drafter checkpoint)."""
    if os.path.isfile(os.path.join(path, DRAFTER_FILE)):
        return True
    from jaxar.train import checkpoint as ckpt

    found = ckpt.find_checkpoint(path) if os.path.isdir(path) else None
    try:
        return found is not None and ckpt.read_run_config(found).get("task") in TASKS
    except ckpt.CheckpointError:
        return False


# ---------------------------------------------------------------------------
# The loop


class DrafterState(NamedTuple):
    step: jax.Array
    params: Any
    opt_state: Any
    rng: jax.Array


def _identity(run: dict) -> dict:
    train = run.get("train") or {}
    return {"task": run.get("task"), "heads": run.get("heads"), "base_model": run.get("base_model"),
            "data": run.get("data"), "seed": run.get("seed"),
            "train": {k: train.get(k) for k in ("batch_size", "seq_len", "rollout")}}


def load_base(run: DrafterRunConfig):
    """(ModelConfig, params) of the frozen base; one-line ConfigErrors."""
    import jaxar

    from jaxar.train.checkpoint import CheckpointError

    try:
        base_config, base_params = jaxar.from_pretrained(run.base_model)
    except (OSError, ValueError, CheckpointError) as e:
        raise ConfigError(f"base_model={run.base_model!r}: {e}") from None
    try:
        run.heads.validate(base_config)
    except ValueError as e:
        raise ConfigError(f"heads: {e}") from None
    if run.train.seq_len > base_config.max_seq_len:
        raise ConfigError(f"train.seq_len={run.train.seq_len} exceeds the base model's max_seq_len="
                          f"{base_config.max_seq_len}")
    return base_config.replace(weight_quant="none"), base_params


def train_drafter(run: DrafterRunConfig, *, force: bool = False, devices=None, stop_after: Optional[int] = None):
    """Train (or resume) a drafter run; see the module docstring. Returns a `trainer.TrainResult`."""
    from jaxar.tokenizer import load_tokenizer
    from jaxar.train import checkpoint as ckpt
    from jaxar.train.data import make_train_iterator, make_val_batches
    from jaxar.train.trainer import (TrainResult, _Preemption, _Writers, _differences, _stop_requested, lr_schedule,
                                     make_optimizer, plot_losses)

    cfg, options = run.train, run.options
    run_dir = os.path.abspath(run.run_dir)
    is_main = jax.process_index() == 0
    mesh = shd.make_mesh(run.mesh.as_dict(), devices)
    if cfg.batch_size % shd.batch_shards(mesh) or cfg.batch_size % jax.process_count():
        raise ConfigError(f"train.batch_size={cfg.batch_size} must be a multiple of the data x fsdp mesh size "
                          f"({shd.batch_shards(mesh)}) and of the {jax.process_count()} processes")
    try:
        tokenizer = load_tokenizer(run.data.tokenizer)
    except (OSError, ValueError) as e:
        raise ConfigError(f"data.tokenizer={run.data.tokenizer!r}: {e}") from None
    base_config, base_params = load_base(run)
    if tokenizer.vocab_size > base_config.vocab_size:
        raise ConfigError(f"vocabulary mismatch: the tokenizer has {tokenizer.vocab_size} ids but the base model "
                          f"{run.base_model!r} only {base_config.vocab_size}")

    os.makedirs(run_dir, exist_ok=True)
    config_path = os.path.join(run_dir, RUN_CONFIG_FILE)
    previous = None
    if os.path.exists(config_path):
        try:
            with open(config_path) as f:
                previous = json.load(f)
        except ValueError:
            previous = None
    run_dict = {**run.to_dict(), "base_config": base_config.to_dict()}
    if previous is not None and _identity(previous) != _identity(run_dict):
        diff = _differences(_identity(previous), _identity(run_dict))
        if not force:
            shown = "\n  ".join(diff[:20])
            raise ConfigError(f"run_dir {run.run_dir!r} already holds a run with a different configuration:\n  "
                              f"{shown}\nUse another run_dir, or pass --force to move the old run's outputs into "
                              f"{run.run_dir}/replaced-<time>/ and start over.")
        if is_main:
            moved = ckpt.remove_run_outputs(run_dir, names=(ckpt.CHECKPOINTS_DIR, "metrics.jsonl", "tb", "loss.png",
                                                            RUN_CONFIG_FILE, DRAFTER_FILE))
            print(f"[jaxar] --force: moved the previous run's outputs to {moved}", file=sys.stderr)
    if is_main:
        for name, text in ((config_path, json.dumps(run_dict, indent=2, sort_keys=True)),
                           (os.path.join(run_dir, DRAFTER_FILE), json.dumps(
                               {"kind": run.task, "heads": run.heads.to_dict(), "base_model": run.base_model,
                                "base_config": base_config.to_dict(), "tokenizer": run.data.tokenizer},
                               indent=2, sort_keys=True))):
            with open(name + ".tmp", "w") as f:
                f.write(text)
            os.replace(name + ".tmp", name)
        tokenizer.save(run_dir)
        write_token_counts(run_dir, run.data, tokenizer, base_config.vocab_size)

    replicated = NamedSharding(mesh, P())
    batch_sharding = shd.batch_sharding(mesh)
    base_params = jax.device_put(base_params, replicated)
    heads = run.heads
    loss_impl = drafter_loss(run.task)

    def loss_fn(params, base, batch):
        return loss_impl(params, base, batch, heads=heads, base_config=base_config, options=options)

    abstract_params = jax.eval_shape(lambda: H.init_heads(heads, base_config, jax.random.PRNGKey(0)))
    optimizer = make_optimizer(cfg, abstract_params)
    schedule = lr_schedule(cfg)

    def init_state(rng):
        params = H.init_heads(heads, base_config, rng)
        return DrafterState(step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.init(params),
                            rng=jax.random.fold_in(rng, 1))

    abstract_state = jax.eval_shape(init_state, jax.random.PRNGKey(0))
    state_shardings = jax.tree_util.tree_map(lambda _: replicated, abstract_state)

    def train_step(state: DrafterState, base, batch):
        (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params, base, batch)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {**metrics, "loss": loss, "lr": schedule(state.step), "grad_norm": optax.global_norm(grads)}
        return DrafterState(step=state.step + 1, params=params, opt_state=opt_state, rng=state.rng), metrics

    train_step = jax.jit(train_step, in_shardings=(state_shardings, replicated, batch_sharding),
                         out_shardings=(state_shardings, replicated), donate_argnums=(0,))
    eval_step = jax.jit(lambda params, base, batch: loss_fn(params, base, batch)[0])

    data_iter = make_train_iterator(run.data, tokenizer, seq_len=cfg.seq_len, global_batch_size=cfg.batch_size,
                                    seed=run.seed, process_index=jax.process_index(),
                                    process_count=jax.process_count())
    checkpointer = ckpt.RunCheckpointer(run_dir, keep=cfg.keep_checkpoints, async_save=cfg.async_checkpoint)
    opt_abstract = {"opt_state": _abstract(abstract_state.opt_state, replicated),
                    "rng": _abstract(abstract_state.rng, replicated)}
    restored = checkpointer.restore_latest(_abstract(abstract_state.params, replicated), opt_abstract)
    if restored is not None:
        state = DrafterState(step=jax.device_put(jnp.asarray(restored.step, jnp.int32), replicated),
                             params=restored.params, opt_state=restored.opt_state, rng=restored.rng)
        if restored.data_state is not None:
            data_iter.set_state(restored.data_state)
        start_step = restored.step
        if is_main:
            print(f"[jaxar] resuming {run_dir} from step {start_step}", file=sys.stderr)
    else:
        state = jax.jit(init_state, out_shardings=state_shardings)(jax.random.PRNGKey(run.seed))
        start_step = 0

    val_batches = [shd.global_batch({k: v[v.shape[0] // jax.process_count() * jax.process_index():
                                           v.shape[0] // jax.process_count() * (jax.process_index() + 1)]
                                     for k, v in b.items()}, mesh)
                   for b in make_val_batches(run.data, tokenizer, seq_len=cfg.seq_len, batch_size=cfg.batch_size,
                                             max_batches=cfg.eval_batches)] if cfg.eval_batches > 0 else []

    def evaluate(params) -> Optional[float]:
        if not val_batches:
            return None
        return float(np.mean(jax.device_get([eval_step(params, base_params, b) for b in val_batches])))

    writers = _Writers(run_dir, start_step, is_main)
    bar = None
    if is_main and cfg.progress_bar:
        from tqdm.auto import tqdm

        bar = tqdm(total=cfg.steps, initial=start_step, desc=f"train {run.task}", dynamic_ncols=True,
                   file=sys.stderr)
    tokens_per_step = cfg.batch_size * cfg.seq_len
    losses, val_losses = {}, {}
    preempted = False
    step = start_step
    last_saved = start_step if restored is not None else -1

    def save(at_step: int) -> None:
        nonlocal last_saved
        if at_step == last_saved:
            return
        checkpointer.save(at_step, params=state.params, opt_state=state.opt_state, rng=state.rng,
                          data_state=data_iter.get_state(), run_config=run_dict)
        last_saved = at_step

    def evaluate_and_record(at_step: int) -> None:
        val = evaluate(state.params)
        if val is not None:
            val_losses[at_step] = val
            writers.write({"step": at_step, "val_loss": val})
            if bar is not None:
                bar.write(f"step {at_step}: val_loss {val:.4f}")

    pending = []
    t_last, step_last = time.perf_counter(), start_step
    end_step = cfg.steps if stop_after is None else min(cfg.steps, start_step + stop_after)
    try:
        with _Preemption() as preemption:
            while step < end_step:
                batch = shd.global_batch(next(data_iter), mesh)
                state, metrics = train_step(state, base_params, batch)
                step += 1
                pending.append((step, metrics))
                if bar is not None:
                    bar.update(1)
                log_now = step % cfg.log_every == 0 or step == end_step
                if log_now:
                    fetched = jax.device_get([m for _, m in pending])
                    now = time.perf_counter()
                    seconds = (now - t_last) / max(step - step_last, 1)
                    t_last, step_last = now, step
                    m = {k: float(v) for k, v in fetched[-1].items()}
                    for s, fm in zip([s for s, _ in pending], fetched):
                        losses[s] = float(fm["loss"])
                    pending = []
                    writers.write({"step": step, **m, "step_s": seconds, "tokens_per_s": tokens_per_step / seconds,
                                   "tokens": step * tokens_per_step, "time": time.time()})
                    if bar is not None:
                        post = {"loss": f"{m['loss']:.4f}", "acc_0": f"{m.get('acc_0', 0.0):.3f}",
                                "s/step": f"{seconds:.2f}"}
                        bar.set_postfix(post, refresh=False)
                if cfg.eval_every and step % cfg.eval_every == 0 and step < cfg.steps:
                    evaluate_and_record(step)
                if cfg.checkpoint_every and step % cfg.checkpoint_every == 0:
                    save(step)
                if _stop_requested(preemption.requested, every_step=log_now):
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
        except Exception as e:  # noqa: BLE001 - a plot is not worth failing a run for
            log.warning("could not plot losses: %s", e)
    return TrainResult(run_dir=run_dir, step=step, losses=losses, val_losses=val_losses, preempted=preempted,
                       state=state)


__all__ = ["DEFAULT_BASE_MODEL", "DRAFTER_FILE", "DrafterOptions", "DrafterRun", "DrafterRunConfig", "TASKS",
           "apply_drafter_overrides", "base_outputs", "build_drafter_run_config", "drafter_loss", "eagle_loss", "eagle_rollout",
           "is_drafter_config", "is_drafter_run", "load_drafter_run", "load_drafter_run_config", "medusa_loss",
           "rollout_tree_mask", "train_drafter"]
