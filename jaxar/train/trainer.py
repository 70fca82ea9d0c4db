"""Training: state, loss, the jit-compiled step, and the loop.

    from jaxar.train import load_run_config, train
    result = train(load_run_config("configs/tiny.yaml", ["train.steps=30"]))

One optimizer update per `train_step(state, batch) -> (state, metrics)`: the
global batch is split into `train.grad_accum` micro-batches that a lax.scan
runs one after the other, summing token-level cross-entropy and its gradient;
the sum is divided by the number of loss tokens once at the end, so the update
equals that of one big batch. Params and optimizer state are sharded over the
mesh by the logical-axis rules of `jaxar.train.sharding`; the batch over
(data, fsdp). The step never waits on the host: metrics stay on the device
until the loop logs them.

Fine-tuning: `init_from` starts from pretrained params (sharded by the same
rules) instead of random ones. With LoRA (`lora.rank > 0`) the state's
`params` are the adapters, the only thing the optimizer sees; the base params
ride along frozen in `TrainState.frozen` and are merged with the adapters
inside the loss (`jaxar.train.lora.merge`), so the model code is unchanged.
At the end, the merged model is written as a Hugging Face directory
(`RunConfig.export_dir`).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import os
import signal
import sys
import time
from typing import Any, Callable, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxar.config import ConfigError, ModelConfig
from jaxar.models.transformer import forward, init_params, param_logical_axes
from jaxar.train import sharding as shd
from jaxar.train import lora as lora_lib
from jaxar.train.config import RunConfig, TrainConfig
from jaxar.train.lora import LoraConfig

log = logging.getLogger(__name__)

# Debugging aid: seconds to sleep after every step (the tests use it to kill a run part-way).
_STEP_SLEEP_ENV = "JAXAR_DEBUG_STEP_SLEEP"
# The run config, beside the checkpoints (not config.json: that name marks a Hugging Face model directory).
RUN_CONFIG_FILE = "run_config.json"


class TrainState(NamedTuple):
    """Everything a step reads and writes (a pytree; donated to the step)."""

    step: jax.Array  # int32 [], number of updates applied
    params: Any  # what trains: the model params, or with LoRA the adapters
    opt_state: Any
    rng: jax.Array  # uint32 [2]; per-step keys are fold_in(rng, step) (for stochastic layers)
    frozen: Any = None  # LoRA: the base model params (never updated, not in opt_state); else None


# ---------------------------------------------------------------------------
# Optimizer


def lr_schedule(train: TrainConfig) -> Callable[[jax.Array], jax.Array]:
    """Linear warmup to train.lr over warmup_steps, then cosine decay to lr * min_lr_ratio at train.steps."""
    peak, floor = train.lr, train.lr * train.min_lr_ratio
    warmup = max(train.warmup_steps, 0)
    decay_steps = max(train.steps - warmup, 1)

    def schedule(step):
        step = jnp.asarray(step, jnp.float32)
        warm = peak * (step + 1.0) / max(warmup, 1)
        progress = jnp.clip((step - warmup) / decay_steps, 0.0, 1.0)
        cosine = floor + (peak - floor) * 0.5 * (1.0 + jnp.cos(jnp.pi * progress))
        return jnp.where(step < warmup, warm, cosine)

    return schedule


def decay_mask(params) -> Any:
    """Weight decay on matrices (kernels, embeddings) only; not on norms and biases."""
    return jax.tree_util.tree_map_with_path(
        lambda path, _: str(getattr(path[-1], "key", "")) in ("kernel", "embedding"), params)


def make_optimizer(train: TrainConfig, params_like) -> optax.GradientTransformation:
    """AdamW with the warmup + cosine schedule, after global-norm clipping."""
    parts = []
    if train.grad_clip > 0:
        parts.append(optax.clip_by_global_norm(train.grad_clip))
    parts.append(optax.adamw(lr_schedule(train), b1=train.beta1, b2=train.beta2, eps=train.eps,
                             weight_decay=train.weight_decay, mask=decay_mask(params_like)))
    return optax.chain(*parts)


# ---------------------------------------------------------------------------
# Loss


def cross_entropy_sums(params, batch: dict, config: ModelConfig):
    """(sum of token cross-entropies over loss_mask, number of loss tokens), both float32 [].

    batch: tokens, targets, segment_ids, positions, loss_mask, each [batch, T] int.
    Attention stays within a segment (packed documents never see each other).
    """
    logits, _ = forward(params, batch["tokens"], config=config, positions=batch["positions"],
                        segment_ids=batch["segment_ids"])
    # [batch, T, vocab] float32
    logits = logits.astype(jnp.float32)
    log_norm = jax.nn.logsumexp(logits, axis=-1)
    target_logit = jnp.take_along_axis(logits, batch["targets"][..., None].astype(jnp.int32), axis=-1)[..., 0]
    mask = batch["loss_mask"].astype(jnp.float32)
    return jnp.sum((log_norm - target_logit) * mask), jnp.sum(mask)


def loss_fn(params, batch: dict, config: ModelConfig) -> jax.Array:
    """Masked mean cross-entropy (nats per target token)."""
    total, count = cross_entropy_sums(params, batch, config)
    return total / jnp.maximum(count, 1.0)


# ---------------------------------------------------------------------------
# Sharded state and step


def opt_state_shardings(abstract_opt_state, abstract_params, param_shardings, default):
    """Shardings for an optimizer state: a leaf whose key path ends with a parameter's
    path and has its shape (Adam's mu / nu, ...) shards like that parameter."""
    by_path = {}
    for (path, leaf), (_, s) in zip(jax.tree_util.tree_flatten_with_path(abstract_params)[0],
                                    jax.tree_util.tree_flatten_with_path(param_shardings)[0]):
        by_path[tuple(path)] = (leaf.shape, s)
    lengths = sorted({len(p) for p in by_path}, reverse=True)

    def pick(path, leaf):
        path = tuple(path)
        for n in lengths:
            hit = by_path.get(path[-n:]) if len(path) >= n else None
            if hit is not None and hit[0] == leaf.shape:
                return hit[1]
        return default

    return jax.tree_util.tree_map_with_path(pick, abstract_opt_state)


@dataclasses.dataclass
class StepFunctions:
    """The compiled pieces of a run and the shardings they use."""

    mesh: Mesh
    optimizer: optax.GradientTransformation
    state_shardings: TrainState
    batch_shardings: dict
    abstract_state: TrainState
    init: Callable  # rng -> TrainState (sharded)
    train_step: Callable  # (state, batch) -> (state, metrics); state donated
    eval_step: Callable  # (model params, batch) -> (loss sum, token count)
    init_from_params: Callable = None  # (model params, rng) -> TrainState: a pretrained start
    model_params: Callable = None  # (state.params, state.frozen) -> the model params (LoRA merged)
    param_shardings: Any = None  # of the model params


# model.scan_layers="auto" in training: the layers are scanned on TPU (compile time, memory; what XLA:TPU is
# built for) and unrolled elsewhere, up to SCAN_AUTO_MAX_UNROLLED layers (unrolled compile time grows with the
# depth; deeper models keep the scan everywhere; the rule is ModelConfig.uses_scan, shared with the model's
# scoring path). Measured with `benchmarks/train_throughput.py --vs-torch`
# (BENCHMARKS.md, "Train step vs torch (CPU)"): on XLA:CPU the scanned step stacks every layer's residuals into
# [n_layers, ...] buffers (zero-filled, then written slice by slice) and is slower than the unrolled one, which
# runs like a hand-written step. GPU: unrolled; not measured on a GPU yet (the GPU configs set scan_layers
# explicitly).


def resolve_scan_layers(model: ModelConfig, platform: Optional[str] = None) -> ModelConfig:
    """`model` with scan_layers True / False: "auto" picks by platform (default: jax's default backend)
    and depth, see SCAN_AUTO_PLATFORMS; an explicit True / False is kept."""
    if model.scan_layers != "auto":
        return model
    return model.replace(scan_layers=model.uses_scan(platform))


def build_step_functions(model: ModelConfig, train: TrainConfig, mesh: Mesh,
                         lora: Optional[LoraConfig] = None) -> StepFunctions:
    """Shardings from the logical-axis rules, and the jit-compiled init / train / eval steps.

    model.scan_layers="auto" is resolved for the mesh's platform first (`resolve_scan_layers`).
    lora (rank > 0): only adapters train; see the module docstring.
    Cached on its (hashable) arguments, so repeated runs in one process reuse the compiled steps.
    """
    lora = lora if lora is not None and lora.enabled else None
    return _build_step_functions(resolve_scan_layers(model, mesh.devices.flat[0].platform), train, mesh, lora)


@functools.lru_cache(maxsize=4)
def _build_step_functions(model: ModelConfig, train: TrainConfig, mesh: Mesh,
                          lora: Optional[LoraConfig] = None) -> StepFunctions:
    abstract_params = jax.eval_shape(lambda: init_params(model, jax.random.PRNGKey(0)))
    replicated = NamedSharding(mesh, P())
    param_specs = shd.tree_specs(param_logical_axes(model), abstract_params, mesh)
    param_shardings = shd.tree_shardings(param_specs, mesh)
    if lora is None:
        abstract_trainable, trainable_shardings, frozen_shardings = abstract_params, param_shardings, None
    else:
        abstract_trainable = jax.eval_shape(
            lambda p: lora_lib.init_adapters(lora, p, jax.random.PRNGKey(0)), abstract_params)
        adapter_axes = lora_lib.adapter_logical_axes(lora, param_logical_axes(model), abstract_params)
        trainable_shardings = shd.tree_shardings(shd.tree_specs(adapter_axes, abstract_trainable, mesh), mesh)
        frozen_shardings = param_shardings
    optimizer = make_optimizer(train, abstract_trainable)
    abstract_opt = jax.eval_shape(optimizer.init, abstract_trainable)
    opt_shardings = opt_state_shardings(abstract_opt, abstract_trainable, trainable_shardings, replicated)
    state_shardings = TrainState(step=replicated, params=trainable_shardings, opt_state=opt_shardings,
                                 rng=replicated, frozen=frozen_shardings)
    batch_sharding = shd.batch_sharding(mesh)
    from jaxar.train.data import BATCH_KEYS

    batch_shardings = {k: batch_sharding for k in BATCH_KEYS}
    accum = train.grad_accum
    micro_sharding = NamedSharding(mesh, P(None, shd.BATCH_AXES, None))

    def state_from_params(params, state_rng):
        """A fresh state around model params: they train, or (LoRA) new adapters train beside them."""
        if lora is None:
            return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.init(params),
                              rng=state_rng)
        adapter_rng, state_rng = jax.random.split(state_rng)
        adapters = lora_lib.init_adapters(lora, params, adapter_rng)
        return TrainState(step=jnp.zeros((), jnp.int32), params=adapters, opt_state=optimizer.init(adapters),
                          rng=state_rng, frozen=params)

    def init_fn(rng):
        params_rng, state_rng = jax.random.split(rng)
        return state_from_params(init_params(model, params_rng), state_rng)

    def init_from_params_fn(params, rng):
        return state_from_params(params, jax.random.split(rng)[1])

    def model_params_fn(trainable, frozen):
        return trainable if lora is None else lora_lib.merge(frozen, trainable, lora)

    abstract_state = jax.eval_shape(init_fn, jax.random.PRNGKey(0))
    schedule = lr_schedule(train)

    def trainable_loss(trainable, frozen, batch, config):
        return cross_entropy_sums(model_params_fn(trainable, frozen), batch, config)

    value_and_grad = jax.value_and_grad(trainable_loss, has_aux=True)

    def train_step(state: TrainState, batch: dict):
        def grad_fn(trainable, mb, config):
            return value_and_grad(trainable, state.frozen, mb, config)

        if accum == 1:
            (loss_sum, count), grad_sum = grad_fn(state.params, batch, model)
        else:
            def split(x):  # [B, T] -> [accum, B / accum, T]; micro-batch j = rows j, j + accum, ...
                B = x.shape[0]
                x = x.reshape((B // accum, accum) + x.shape[1:]).swapaxes(0, 1)
                return jax.lax.with_sharding_constraint(x, micro_sharding)

            micro = {k: split(v) for k, v in batch.items()}
            zeros = jax.tree_util.tree_map(jnp.zeros_like, state.params)
            zeros = jax.lax.with_sharding_constraint(zeros, trainable_shardings)

            def body(carry, mb):
                g_acc, l_acc, c_acc = carry
                (l, c), g = grad_fn(state.params, mb, model)
                g_acc = jax.tree_util.tree_map(jnp.add, g_acc, g)
                return (g_acc, l_acc + l, c_acc + c), None

            (grad_sum, loss_sum, count), _ = jax.lax.scan(
                body, (zeros, jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32)), micro)
        denom = jnp.maximum(count, 1.0)
        grads = jax.tree_util.tree_map(lambda g: g / denom, grad_sum)
        grad_norm = optax.global_norm(grads)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {"loss": loss_sum / denom, "grad_norm": grad_norm, "lr": schedule(state.step),
                   "loss_tokens": count}
        return TrainState(step=state.step + 1, params=params, opt_state=opt_state, rng=state.rng,
                          frozen=state.frozen), metrics

    def eval_step(params, batch):
        return cross_entropy_sums(params, batch, model)

    metric_shardings = {k: replicated for k in ("loss", "grad_norm", "lr", "loss_tokens")}
    return StepFunctions(
        mesh=mesh,
        optimizer=optimizer,
        state_shardings=state_shardings,
        batch_shardings=batch_shardings,
        abstract_state=abstract_state,
        init=jax.jit(init_fn, out_shardings=state_shardings),
        train_step=jax.jit(train_step, in_shardings=(state_shardings, batch_shardings),
                           out_shardings=(state_shardings, metric_shardings), donate_argnums=0),
        eval_step=jax.jit(eval_step, in_shardings=(param_shardings, batch_shardings),
                          out_shardings=(replicated, replicated)),
        init_from_params=jax.jit(init_from_params_fn, in_shardings=(param_shardings, replicated),
                                 out_shardings=state_shardings),
        model_params=jax.jit(model_params_fn, in_shardings=(trainable_shardings, frozen_shardings),
                             out_shardings=param_shardings),
        param_shardings=param_shardings,
    )


def check_batch_layout(train: TrainConfig, mesh: Mesh) -> None:
    shards = shd.batch_shards(mesh)
    micro = train.batch_size // train.grad_accum
    if micro % shards:
        raise ConfigError(
            f"train.batch_size={train.batch_size} / train.grad_accum={train.grad_accum} = {micro} rows per "
            f"micro-batch, which does not split over mesh.data * mesh.fsdp = {shards} batch shards")
    if train.batch_size % jax.process_count():
        raise ConfigError(f"train.batch_size={train.batch_size} must be a multiple of the "
                          f"{jax.process_count()} processes")


# ---------------------------------------------------------------------------
# Throughput


# Dense bf16 peak FLOP/s per device, by a substring of jax's device_kind (first match wins).
PEAK_FLOPS = (
    ("GH200", 989e12),
    ("H200", 989e12),
    ("H100", 989e12),
    ("H800", 989e12),
    ("B200", 2250e12),
    ("A100", 312e12),
    ("A800", 312e12),
    ("L40S", 362e12),
    ("L4", 121e12),
    ("V100", 125e12),
    ("TPU v6 lite", 918e12),
    ("TPU v6e", 918e12),
    ("TPU v5 lite", 197e12),
    ("TPU v5e", 197e12),
    ("TPU v5p", 459e12),
    ("TPU v5", 459e12),
    ("TPU v4", 275e12),
    ("TPU v3", 123e12),
)


def peak_flops(device=None) -> Optional[float]:
    """Peak dense bf16 FLOP/s of one device, None when unknown (CPU)."""
    device = device or jax.devices()[0]
    if device.platform == "cpu":
        return None
    kind = getattr(device, "device_kind", "")
    for name, value in PEAK_FLOPS:
        if name.lower() in kind.lower():
            return value
    return None


def flops_per_token(config: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token: 6 * (matmul params) + 12 * layers * seq_len * (heads * head_dim)."""
    n = config.num_params()
    if not config.tie_embeddings:
        n -= config.vocab_size * config.d_model  # the input embedding is a lookup, not a matmul
    if config.position == "learned":
        n -= config.max_seq_len * config.d_model
    attention = 12 * config.n_layers * seq_len * config.n_heads * config.dim_per_head
    return 6.0 * n + attention


# ---------------------------------------------------------------------------
# The loop


class _Preemption:
    """SIGTERM sets a flag; the loop checks it, saves, and returns."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def __enter__(self):
        try:
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not the main thread
            self._previous = None
        return self

    def _handle(self, signum, frame):
        self.requested = True

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


@dataclasses.dataclass
class TrainResult:
    run_dir: str
    step: int  # updates applied when the loop ended
    losses: dict  # step -> training loss, for every logged step of this process's loop
    val_losses: dict  # step -> validation loss
    preempted: bool
    state: Optional[TrainState] = None  # the final state (sharded jax arrays)
    model_config: Optional[ModelConfig] = None
    export_dir: Optional[str] = None  # the Hugging Face directory written at the end (LoRA merged), if any


class _Writers:
    """metrics.jsonl + TensorBoard, on process 0 only."""

    def __init__(self, run_dir: str, start_step: int, enabled: bool):
        self.enabled = enabled
        self.path = os.path.join(run_dir, "metrics.jsonl")
        self._file = None
        self._tb = None
        if not enabled:
            return
        # Rows past the step we resume from belong to a run that was cut off; they are replaced.
        rows = read_metrics(self.path)
        kept = [r for r in rows if r.get("step", 0) <= start_step]
        with open(self.path + ".tmp", "w") as f:
            for r in kept:
                f.write(json.dumps(r) + "\n")
        os.replace(self.path + ".tmp", self.path)
        self._file = open(self.path, "a")
        try:
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(os.path.join(run_dir, "tb"), purge_step=start_step + 1 if start_step else None)
        except Exception as e:  # noqa: BLE001 - TensorBoard is optional
            log.warning("TensorBoard logging disabled: %s", e)

    def write(self, row: dict) -> None:
        if not self.enabled:
            return
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()
        if self._tb is not None:
            for k, v in row.items():
                if k != "step" and isinstance(v, (int, float)) and v is not None and math.isfinite(v):
                    self._tb.add_scalar(f"train/{k}" if not k.startswith("val") else k, v, row["step"])

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
        if self._tb is not None:
            self._tb.close()


def read_metrics(path: str) -> list[dict]:
    """The rows of a metrics.jsonl (a torn last line is ignored)."""
    if not os.path.exists(path):
        return []
    rows = []
    with open(path) as f:
        for line in f:
            try:
                rows.append(json.loads(line))
            except ValueError:
                continue
    return rows


def plot_losses(metrics_path: str, out_path: str) -> Optional[str]:
    """loss.png: training and validation loss against step."""
    rows = read_metrics(metrics_path)
    train_rows = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    val_rows = [(r["step"], r["val_loss"]) for r in rows if "val_loss" in r]
    if not train_rows and not val_rows:
        return None
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=120)
    if train_rows:
        ax.plot(*zip(*train_rows), label="train", lw=1)
    if val_rows:
        ax.plot(*zip(*val_rows), "o-", label="validation", lw=1.5, ms=3)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats / token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_path)
    plt.close(fig)
    return out_path


def _identity(run: dict) -> dict:
    """The parts of a run config that must match to resume it (not model.scan_layers: scanned or
    unrolled, the layers and their parameters are the same)."""
    train = run.get("train") or {}
    model = {k: v for k, v in (run.get("model") or {}).items() if k != "scan_layers"}
    return {"model": model, "data": run.get("data"), "seed": run.get("seed"), "lora": run.get("lora"),
            "train": {"seq_len": train.get("seq_len"), "batch_size": train.get("batch_size")}}


def _differences(old: dict, new: dict, prefix: str = "") -> list[str]:
    out = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _differences(a, b, f"{prefix}{k}.")
        elif a != b:
            out.append(f"{prefix}{k}: {a!r} -> {b!r}")
    return out


class RunMismatchError(ConfigError):
    """run_dir holds a run with a different model / data / batch layout."""


def _check_existing_run(run_config: RunConfig, previous: Optional[dict], force: bool) -> bool:
    """True when the previous run's outputs must be moved aside (force)."""
    if previous is None:
        return False
    old, new = _identity(previous), _identity(run_config.to_dict())
    diff = _differences(old, new)
    if not diff:
        return False
    if not force:
        shown = "\n  ".join(diff[:20])
        raise RunMismatchError(
            f"run_dir {run_config.run_dir!r} already holds a run with a different configuration:\n  {shown}\n"
            "Use another run_dir, or pass --force to move the old run's outputs into "
            f"{run_config.run_dir}/replaced-<time>/ and start over.")
    return True


def _local_rows(batch: dict) -> dict:
    """This process's share of a batch that every process holds whole (validation)."""
    n, i = jax.process_count(), jax.process_index()
    return {k: v[v.shape[0] // n * i: v.shape[0] // n * (i + 1)] for k, v in batch.items()}


def train(run_config: RunConfig, *, force: bool = False, devices: Optional[Sequence] = None,
          stop_after: Optional[int] = None, tokenizer=None) -> TrainResult:
    """Train (or resume) the run described by `run_config`; see the module docstring.

    force: move a different run found in run_dir aside instead of refusing.
    devices: the devices of the mesh (default: all).
    stop_after: end the loop (with a checkpoint) after this many steps of this
        call, as a preemption would (for tests).
    """
    from jaxar.tokenizer import load_tokenizer
    from jaxar.train import checkpoint as ckpt
    from jaxar.train.data import make_train_iterator, make_val_batches

    model, train_cfg = run_config.model, run_config.train
    run_dir = os.path.abspath(run_config.run_dir)
    is_main = jax.process_index() == 0
    mesh = shd.make_mesh(run_config.mesh.as_dict(), devices)
    check_batch_layout(train_cfg, mesh)
    os.makedirs(run_dir, exist_ok=True)
    tokenizer = tokenizer or load_tokenizer(run_config.data.tokenizer)
    if tokenizer.vocab_size > model.vocab_size:
        raise ConfigError(f"model.vocab_size={model.vocab_size} is smaller than the tokenizer's "
                          f"{tokenizer.vocab_size} ids")

    # An existing run in run_dir: resume it when it is the same run, refuse otherwise.
    config_path = os.path.join(run_dir, RUN_CONFIG_FILE)
    checkpointer = ckpt.RunCheckpointer(run_dir, keep=train_cfg.keep_checkpoints,
                                        async_save=train_cfg.async_checkpoint)
    previous = checkpointer.latest_config()
    if previous is None and os.path.exists(config_path):
        with open(config_path) as f:
            try:
                previous = json.load(f)
            except ValueError:
                previous = None
    if _check_existing_run(run_config, previous, force):
        checkpointer.close()
        _barrier("jaxar_before_move_aside")
        if is_main:
            moved = ckpt.remove_run_outputs(run_dir)
            log.warning("--force: moved the previous run in %s to %s", run_dir, moved)
            print(f"[jaxar] --force: moved the previous run's outputs to {moved}", file=sys.stderr)
        _barrier("jaxar_after_move_aside")
        checkpointer = ckpt.RunCheckpointer(run_dir, keep=train_cfg.keep_checkpoints,
                                            async_save=train_cfg.async_checkpoint)
    if is_main:
        with open(config_path + ".tmp", "w") as f:
            f.write(run_config.to_json())
        os.replace(config_path + ".tmp", config_path)
        tokenizer.save(run_dir)

    lora = run_config.lora if run_config.lora.enabled else None
    export_dir = run_config.export_dir
    if export_dir is not None:
        export_dir = os.path.abspath(export_dir)
        if os.path.isdir(export_dir) and os.listdir(export_dir) and not os.path.isfile(
                os.path.join(export_dir, "jaxar_config.json")):
            raise ConfigError(f"train.export={export_dir!r} holds files that are not a jaxar export; "
                              "choose another train.export (or '' for none)")
    fns = build_step_functions(model, train_cfg, mesh, lora)
    data_iter = make_train_iterator(run_config.data, tokenizer, seq_len=train_cfg.seq_len,
                                    global_batch_size=train_cfg.batch_size, seed=run_config.seed,
                                    process_index=jax.process_index(), process_count=jax.process_count())

    abstract_opt_item = {
        "opt_state": _with_shardings(fns.abstract_state.opt_state, fns.state_shardings.opt_state),
        "rng": jax.ShapeDtypeStruct(fns.abstract_state.rng.shape, fns.abstract_state.rng.dtype,
                                    sharding=fns.state_shardings.rng),
    }
    if lora is None:
        restored = checkpointer.restore_latest(
            _with_shardings(fns.abstract_state.params, fns.state_shardings.params), abstract_opt_item)
    else:  # the checkpoint's params item is the frozen base; the adapters are the lora item
        restored = checkpointer.restore_latest(
            _with_shardings(fns.abstract_state.frozen, fns.state_shardings.frozen), abstract_opt_item,
            _with_shardings(fns.abstract_state.params, fns.state_shardings.params))
    if restored is not None:
        step_array = jax.jit(lambda: jnp.asarray(restored.step, jnp.int32), out_shardings=fns.state_shardings.step)()
        if lora is None:
            state = TrainState(step=step_array, params=restored.params, opt_state=restored.opt_state,
                               rng=restored.rng)
        else:
            state = TrainState(step=step_array, params=restored.lora, opt_state=restored.opt_state,
                               rng=restored.rng, frozen=restored.params)
        if restored.data_state is not None:
            data_iter.set_state(restored.data_state)
        start_step = restored.step
        if is_main:
            print(f"[jaxar] resuming {run_dir} from step {start_step}", file=sys.stderr)
    elif run_config.init_from is not None:
        params = load_init_params(run_config.init_from, model, fns.param_shardings)
        state = fns.init_from_params(params, jax.random.PRNGKey(run_config.seed))
        del params
        start_step = 0
        if is_main:
            print(f"[jaxar] starting from {run_config.init_from}", file=sys.stderr)
    else:
        state = fns.init(jax.random.PRNGKey(run_config.seed))
        start_step = 0

    def model_params(state):
        return state.params if lora is None else fns.model_params(state.params, state.frozen)

    val_batches = [shd.global_batch(_local_rows(b), mesh) for b in make_val_batches(
        run_config.data, tokenizer, seq_len=train_cfg.seq_len, batch_size=train_cfg.batch_size,
        max_batches=train_cfg.eval_batches)] if train_cfg.eval_batches > 0 else []

    def evaluate(params) -> Optional[float]:
        if not val_batches:
            return None
        total = count = 0.0
        sums = [fns.eval_step(params, b) for b in val_batches]
        for s, c in jax.device_get(sums):
            total, count = total + float(s), count + float(c)
        return total / max(count, 1.0)

    writers = _Writers(run_dir, start_step, is_main)
    run_dict = run_config.to_dict()
    tokens_per_step = train_cfg.batch_size * train_cfg.seq_len
    flops_tok = flops_per_token(model, train_cfg.seq_len)
    peak = peak_flops(mesh.devices.flat[0])
    peak_total = peak * mesh.devices.size if peak else None
    bar = None
    if is_main and train_cfg.progress_bar:
        from tqdm.auto import tqdm

        bar = tqdm(total=train_cfg.steps, initial=start_step, desc="train", dynamic_ncols=True, file=sys.stderr)

    losses, val_losses = {}, {}
    preempted = False
    step = start_step
    last_saved = start_step if restored is not None else -1

    def save(at_step: int) -> None:
        nonlocal last_saved
        if at_step == last_saved:
            return
        if lora is None:
            checkpointer.save(at_step, params=state.params, opt_state=state.opt_state, rng=state.rng,
                              data_state=data_iter.get_state(), run_config=run_dict)
        else:
            checkpointer.save(at_step, params=state.frozen, opt_state=state.opt_state, rng=state.rng,
                              data_state=data_iter.get_state(), run_config=run_dict, lora=state.params)
        last_saved = at_step

    def evaluate_and_record(at_step: int) -> None:
        val = evaluate(model_params(state))
        if val is not None:
            val_losses[at_step] = val
            writers.write({"step": at_step, "val_loss": val})
            if bar is not None:
                bar.write(f"step {at_step}: val_loss {val:.4f}")

    pending = []  # (step, device metrics) since the last log
    t_last, step_last = time.perf_counter(), start_step
    end_step = train_cfg.steps if stop_after is None else min(train_cfg.steps, start_step + stop_after)
    step_sleep = float(os.environ.get(_STEP_SLEEP_ENV, "0") or 0)
    try:
        with _Preemption() as preemption:
            if restored is None and run_config.init_from is not None and train_cfg.eval_every:
                evaluate_and_record(0)  # the pretrained model's validation loss, to compare against
            while step < end_step:
                local = next(data_iter)
                state, metrics = fns.train_step(state, shd.global_batch(local, mesh))
                step += 1
                pending.append((step, metrics))
                if bar is not None:
                    bar.update(1)
                log_now = step % train_cfg.log_every == 0 or step == end_step
                if log_now:
                    fetched = jax.device_get([m for _, m in pending])
                    now = time.perf_counter()
                    tok_s = tokens_per_step * (step - step_last) / max(now - t_last, 1e-9)
                    t_last, step_last = now, step
                    m = fetched[-1]
                    row = {"step": step, "loss": float(m["loss"]), "lr": float(m["lr"]),
                           "grad_norm": float(m["grad_norm"]), "tokens_per_s": tok_s,
                           "tokens": step * tokens_per_step, "time": time.time()}
                    row["mfu"] = tok_s * flops_tok / peak_total if peak_total else None
                    for s, fm in zip([s for s, _ in pending], fetched):
                        losses[s] = float(fm["loss"])
                    pending = []
                    writers.write(row)
                    if bar is not None:
                        post = {"loss": f"{row['loss']:.4f}", "tok/s": f"{tok_s:,.0f}"}
                        post["mfu"] = f"{row['mfu']:.1%}" if row["mfu"] is not None else "n/a"
                        bar.set_postfix(post, refresh=False)
                if train_cfg.eval_every and step % train_cfg.eval_every == 0 and step < train_cfg.steps:
                    evaluate_and_record(step)
                if train_cfg.checkpoint_every and step % train_cfg.checkpoint_every == 0:
                    save(step)
                if step_sleep:
                    time.sleep(step_sleep)
                if _stop_requested(preemption.requested, every_step=log_now):
                    preempted = True
                    if is_main:
                        print(f"[jaxar] SIGTERM: saving step {step} and exiting", file=sys.stderr)
                    break
            if pending:
                for s, fm in zip([s for s, _ in pending], jax.device_get([m for _, m in pending])):
                    losses[s] = float(fm["loss"])
            save(step)
            if step >= train_cfg.steps and step > start_step and not preempted:
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
    exported = None
    if export_dir is not None and step >= train_cfg.steps and not preempted:
        exported = export_model(model, model_params(state), export_dir, tokenizer=tokenizer,
                                chat_source=run_config.data.tokenizer)
        if is_main:
            print(f"[jaxar] wrote the model to {exported}", file=sys.stderr)
    return TrainResult(run_dir=run_dir, step=step, losses=losses, val_losses=val_losses, preempted=preempted,
                       state=state, model_config=model, export_dir=exported)


def load_init_params(path: str, model: ModelConfig, shardings) -> Any:
    """The params of the init_from checkpoint in model.param_dtype, placed with `shardings`;
    a checkpoint whose parameters do not have the model's shapes is a one-line ConfigError."""
    import jaxar

    from jaxar.train.checkpoint import CheckpointError

    try:
        _, params = jaxar.from_pretrained(path)
    except (OSError, ValueError, CheckpointError) as e:
        raise ConfigError(f"init_from={path!r}: {e}") from None
    expected = jax.eval_shape(lambda: init_params(model, jax.random.PRNGKey(0)))
    want = {jax.tree_util.keystr(p): x.shape for p, x in jax.tree_util.tree_flatten_with_path(expected)[0]}
    have = {jax.tree_util.keystr(p): np.shape(x) for p, x in jax.tree_util.tree_flatten_with_path(params)[0]}
    if want != have:
        diff = sorted(set(want) ^ set(have)) or [k for k in want if want[k] != have[k]]
        raise ConfigError(f"init_from={path!r}: its parameters do not fit the model config (first difference: "
                          f"{diff[0]} {have.get(diff[0])} vs {want.get(diff[0])})")
    dtype = jnp.dtype(model.param_dtype)
    return jax.tree_util.tree_map(lambda x, s: jax.device_put(np.asarray(x).astype(dtype), s), params, shardings)


def export_model(model: ModelConfig, params, export_dir: str, *, tokenizer=None,
                 chat_source: Optional[str] = None) -> str:
    """save_pretrained of the (merged) model params into export_dir, replacing an earlier export
    there; the chat template of `chat_source` (a tokenizer directory) is copied along."""
    import shutil

    from jaxar.api import save_pretrained

    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        params = multihost_utils.process_allgather(params, tiled=True)
    host = jax.device_get(params)
    if jax.process_index() == 0:
        save_pretrained(model, host, export_dir, tokenizer=tokenizer, overwrite=True)
        if chat_source and os.path.isdir(chat_source):
            for name in ("chat_template.jinja", "tokenizer_config.json", "special_tokens_map.json"):
                src = os.path.join(chat_source, name)
                if os.path.isfile(src) and not os.path.exists(os.path.join(export_dir, name)):
                    shutil.copy(src, os.path.join(export_dir, name))
        template_path = os.path.join(export_dir, "chat_template.jinja")
        if tokenizer is not None and not os.path.exists(template_path):  # e.g. a GGUF's template
            from jaxar.chat import find_chat_template

            source = find_chat_template(None, tokenizer)
            if source:
                with open(template_path, "w") as f:
                    f.write(source)
    _barrier("jaxar_after_export")
    return export_dir


def _with_shardings(abstract, shardings):
    return jax.tree_util.tree_map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                                  abstract, shardings)


def _barrier(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def _stop_requested(local_flag: bool, *, every_step: bool) -> bool:
    """SIGTERM seen by any process. Multi-host: agreed on at log steps only (a collective)."""
    if jax.process_count() == 1:
        return local_flag
    if not every_step:
        return False
    from jax.experimental import multihost_utils

    flags = multihost_utils.process_allgather(np.asarray([local_flag], np.int32))
    return bool(np.any(flags))


__all__ = [
    "RunMismatchError",
    "StepFunctions",
    "TrainResult",
    "TrainState",
    "build_step_functions",
    "cross_entropy_sums",
    "export_model",
    "load_init_params",
    "flops_per_token",
    "loss_fn",
    "lr_schedule",
    "make_optimizer",
    "peak_flops",
    "plot_losses",
    "read_metrics",
    "resolve_scan_layers",
    "train",
]
