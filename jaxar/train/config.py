"""Run configuration for `train.py`: YAML file + dotted `key=value` overrides -> `RunConfig`.

    run_dir: runs/shakespeare
    seed: 0
    init_from: null                               # pretrained start: HF dir, .gguf file or jaxar run dir
    model:   {family: llama, d_model: 192, ...}   # ModelConfig fields; family picks the preset defaults
    data:    {source: shakespeare, ...}           # DataConfig fields (jaxar.train.data)
    train:   {steps: 2000, batch_size: 32, ...}   # TrainConfig fields
    mesh:    {data: -1, fsdp: 1, tensor: 1}       # MeshConfig fields
    lora:    {rank: 8, alpha: 16, targets: [q_proj, v_proj]}  # LoraConfig fields (rank 0: off)

init_from: the model section comes from the checkpoint (its config); the YAML's
model section may only restate it or change what keeps the parameters the same
(COMPATIBLE_MODEL_KEYS: dtypes, remat, scan_layers, attention backend, a longer
max_seq_len for RoPE models). data.tokenizer defaults to the checkpoint's own
tokenizer. A run_dir that already has checkpoints resumes from them instead.

    config = load_run_config("configs/tiny.yaml", ["train.steps=50", "model.d_model=64"])

Override values are parsed as YAML scalars (`train.lr=1e-3`, `data.shuffle=false`,
`model.n_kv_heads=null`). Unknown keys fail with the closest known key suggested;
bad values fail with the key, the value and what is allowed.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import os
import typing
from typing import Any, Iterable, Optional, Sequence

import yaml

from jaxar.config import ConfigError, ModelConfig
from jaxar.train.data import DataConfig, DataError
from jaxar.train.lora import LoraConfig

SECTIONS = ("model", "data", "train", "mesh", "lora")
TOP_LEVEL = ("run_dir", "seed", "init_from") + SECTIONS

# Model keys a config may set differently from its init_from checkpoint: they change how the
# parameters are computed or stored, not which parameters there are.
COMPATIBLE_MODEL_KEYS = ("dtype", "param_dtype", "remat", "scan_layers", "attention_backend", "kv_cache_dtype",
                         "max_seq_len")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Optimisation, schedule and loop cadence.

    batch_size is global (all hosts, all micro-batches): one optimizer update
    sees batch_size * seq_len tokens. grad_accum splits it into that many
    micro-batches run one after the other inside the step (lax.scan).
    lr warms up linearly over warmup_steps, then decays on a cosine to
    lr * min_lr_ratio at `steps`.
    """

    steps: int = 1000
    batch_size: int = 32
    seq_len: int = 128
    lr: float = 3e-4
    warmup_steps: int = 100
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0  # global-norm clip; 0 disables
    grad_accum: int = 1
    checkpoint_every: int = 500  # 0: only at the end (and on SIGTERM)
    keep_checkpoints: int = 3  # newest kept; 0 keeps all
    async_checkpoint: bool = True
    eval_every: int = 250  # 0: only at the end
    eval_batches: int = 20
    log_every: int = 10
    progress_bar: bool = True
    # Hugging Face directory written at the end of training (save_pretrained, LoRA merged; relative
    # paths are under run_dir). None: "hf" when init_from or LoRA is set, else none; "": never.
    export: Optional[str] = None

    def validate(self) -> None:
        _need(self.steps >= 1, "train.steps", self.steps, "must be >= 1")
        _need(self.batch_size >= 1, "train.batch_size", self.batch_size, "must be >= 1")
        _need(self.seq_len >= 1, "train.seq_len", self.seq_len, "must be >= 1")
        _need(self.lr > 0, "train.lr", self.lr, "must be > 0")
        _need(self.warmup_steps >= 0, "train.warmup_steps", self.warmup_steps, "must be >= 0")
        _need(0 <= self.min_lr_ratio <= 1, "train.min_lr_ratio", self.min_lr_ratio, "must be in [0, 1]")
        _need(self.weight_decay >= 0, "train.weight_decay", self.weight_decay, "must be >= 0")
        _need(0 <= self.beta1 < 1, "train.beta1", self.beta1, "must be in [0, 1)")
        _need(0 <= self.beta2 < 1, "train.beta2", self.beta2, "must be in [0, 1)")
        _need(self.eps > 0, "train.eps", self.eps, "must be > 0")
        _need(self.grad_clip >= 0, "train.grad_clip", self.grad_clip, "must be >= 0 (0 disables clipping)")
        _need(self.grad_accum >= 1, "train.grad_accum", self.grad_accum, "must be >= 1")
        _need(self.batch_size % self.grad_accum == 0, "train.batch_size", self.batch_size,
              f"must be a multiple of train.grad_accum={self.grad_accum}")
        for name in ("checkpoint_every", "keep_checkpoints", "eval_every", "eval_batches"):
            _need(getattr(self, name) >= 0, f"train.{name}", getattr(self, name), "must be >= 0")
        _need(self.log_every >= 1, "train.log_every", self.log_every, "must be >= 1")


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Device mesh shape over the axes (data, fsdp, tensor); one entry may be -1 ("the rest")."""

    data: int = -1
    fsdp: int = 1
    tensor: int = 1

    def validate(self) -> None:
        sizes = dataclasses.asdict(self)
        for name, v in sizes.items():
            _need(v == -1 or v >= 1, f"mesh.{name}", v, "must be a positive integer or -1 (the rest)")
        _need(list(sizes.values()).count(-1) <= 1, "mesh", sizes, "at most one axis may be -1")

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class RunConfig:
    run_dir: str
    seed: int
    model: ModelConfig
    data: DataConfig
    train: TrainConfig
    mesh: MeshConfig
    init_from: Optional[str] = None
    lora: LoraConfig = LoraConfig()

    def to_dict(self) -> dict:
        d = {
            "run_dir": self.run_dir,
            "seed": self.seed,
            "model": self.model.to_dict(),
            "data": self.data.to_dict(),
            "train": dataclasses.asdict(self.train),
            "mesh": self.mesh.as_dict(),
        }
        # Only when set, so that the configs of runs without them read as before.
        if self.init_from is not None:
            d["init_from"] = self.init_from
        if self.lora.enabled:
            d["lora"] = self.lora.to_dict()
        return d

    @property
    def export_dir(self) -> Optional[str]:
        """Where the end of training writes the Hugging Face directory (None: nowhere)."""
        export = self.train.export
        if export is None:
            export = "hf" if (self.init_from is not None or self.lora.enabled) else ""
        if not export:
            return None
        return os.path.join(self.run_dir, os.path.expanduser(export))

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict) -> "RunConfig":
        """From a dict as written by `to_dict` (or a parsed YAML file with every section)."""
        return build_run_config(d)


def _need(cond: bool, key: str, value: Any, what: str) -> None:
    if not cond:
        raise ConfigError(f"{key}={value!r} {what}")


# ---------------------------------------------------------------------------
# Loading


def _field_types(cls) -> dict:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _known_keys() -> dict[str, Sequence[str]]:
    return {
        "model": [f.name for f in dataclasses.fields(ModelConfig)],
        "data": [f.name for f in dataclasses.fields(DataConfig)],
        "train": [f.name for f in dataclasses.fields(TrainConfig)],
        "mesh": [f.name for f in dataclasses.fields(MeshConfig)],
        "lora": [f.name for f in dataclasses.fields(LoraConfig)],
    }


def all_keys() -> list[str]:
    """Every dotted key a config accepts."""
    keys = ["run_dir", "seed", "init_from"]
    for section, names in _known_keys().items():
        keys += [f"{section}.{n}" for n in names]
    return keys


def _unknown_key_error(key: str) -> ConfigError:
    candidates = all_keys()
    leaf = key.split(".")[-1]
    close = difflib.get_close_matches(key, candidates, n=1, cutoff=0.6)
    if not close:  # a right name under the wrong section, or a typo in the leaf only
        by_leaf = {k.split(".")[-1]: k for k in candidates}
        leaf_close = difflib.get_close_matches(leaf, list(by_leaf), n=1, cutoff=0.6)
        close = [by_leaf[leaf_close[0]]] if leaf_close else []
    hint = f"; did you mean {close[0]!r}?" if close else f"; known keys: {', '.join(candidates)}"
    return ConfigError(f"unknown config key {key!r}{hint}")


def _coerce(key: str, value: Any, hint: Any) -> Any:
    """Light type coercion of YAML values: ints to floats, numeric strings ("1e-3") to numbers."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin is typing.Union and type(None) in args:
        if value is None:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(key, value, inner[0]) if len(inner) == 1 else value
    if hint is float:
        if isinstance(value, bool):
            raise ConfigError(f"{key}={value!r} must be a number")
        if isinstance(value, int):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                raise ConfigError(f"{key}={value!r} must be a number") from None
        if not isinstance(value, float):
            raise ConfigError(f"{key}={value!r} must be a number")
    elif hint is int:
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}={value!r} must be an integer")
    elif hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}={value!r} must be true or false")
    elif hint is str:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        if not isinstance(value, str):
            raise ConfigError(f"{key}={value!r} must be a string")
    elif hint is tuple or origin is tuple:
        if isinstance(value, list):
            return tuple(value)
    return value


def _coerce_section(section: str, values: dict, cls) -> dict:
    types = _field_types(cls)
    out = {}
    for k, v in values.items():
        if k not in types:
            raise _unknown_key_error(f"{section}.{k}")
        out[k] = _coerce(f"{section}.{k}", v, types[k])
    return out


def parse_override(text: str) -> tuple[str, Any]:
    """"train.lr=1e-3" -> ("train.lr", 0.001); values are YAML scalars."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not of the form key=value (e.g. train.steps=100)")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override {text!r} has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"override {text!r}: value is not valid YAML ({e})") from None
    return key, value


def apply_overrides(raw: dict, overrides: Iterable[str]) -> dict:
    """A copy of the nested dict `raw` with each dotted override applied."""
    out = {k: (dict(v) if isinstance(v, dict) else v) for k, v in raw.items()}
    for text in overrides:
        key, value = parse_override(text)
        parts = key.split(".")
        if len(parts) == 1:
            if parts[0] not in TOP_LEVEL or parts[0] in SECTIONS:
                if parts[0] in SECTIONS:
                    raise ConfigError(f"override {text!r}: set the fields of {parts[0]!r} one by one "
                                      f"(e.g. {parts[0]}.<field>=...)")
                raise _unknown_key_error(key)
            out[parts[0]] = value
        elif len(parts) == 2 and parts[0] in SECTIONS:
            if parts[1] not in _known_keys()[parts[0]]:
                raise _unknown_key_error(key)
            section = out.get(parts[0])
            section = dict(section) if isinstance(section, dict) else {}
            section[parts[1]] = value
            out[parts[0]] = section
        else:
            raise _unknown_key_error(key)
    return out


def build_model_config(values: dict, *, vocab_size: Optional[int] = None,
                       eos_token_id: Optional[int] = None) -> ModelConfig:
    """ModelConfig from the `model:` section; `family` picks the preset defaults.

    vocab_size / eos_token_id fill in what the section leaves unset (null),
    normally from the tokenizer.
    """
    values = dict(values)
    if values.get("vocab_size") is None:
        values.pop("vocab_size", None)
        if vocab_size is not None:
            values["vocab_size"] = vocab_size
    values = _coerce_section("model", values, ModelConfig)
    family = values.pop("family", "llama")
    if values.get("eos_token_id") is None and eos_token_id is not None:
        values["eos_token_id"] = eos_token_id
    presets = {"llama": ModelConfig.llama, "gpt2": ModelConfig.gpt2, "qwen2": ModelConfig.qwen2}
    if family == "mistral":
        return ModelConfig.llama(**{**values, "family": "mistral"})
    if family not in presets:
        raise ConfigError(f"model.family={family!r} is not supported; use one of "
                          f"{sorted(list(presets) + ['mistral'])}")
    try:
        return presets[family](**values)
    except TypeError as e:  # a None where the dataclass needs a value, etc.
        raise ConfigError(f"model: {e}") from None


def build_run_config(raw: dict, *, tokenizer=None) -> RunConfig:
    """Validate the nested dict of a whole config and build the dataclasses.

    tokenizer: fills model.vocab_size / model.eos_token_id when they are unset;
    when None it is loaded from `data.tokenizer`.
    """
    if not isinstance(raw, dict):
        raise ConfigError(f"a config must be a mapping of sections, got {type(raw).__name__}")
    for k in raw:
        if k not in TOP_LEVEL:
            raise _unknown_key_error(str(k))
    for s in SECTIONS:
        if raw.get(s) is not None and not isinstance(raw[s], dict):
            raise ConfigError(f"config section {s!r} must be a mapping, got {raw[s]!r}")
    run_dir = raw.get("run_dir")
    if not isinstance(run_dir, str) or not run_dir:
        raise ConfigError(f"run_dir={run_dir!r} must be a non-empty path")
    seed = _coerce("seed", raw.get("seed", 0), int)
    init_from = raw.get("init_from")
    if init_from is not None:
        if not isinstance(init_from, str) or not init_from:
            raise ConfigError(f"init_from={init_from!r} must be a path (a Hugging Face directory, a .gguf file "
                              "or a jaxar run directory)")
        from jaxar.api import resolve_model_path  # a bundled model's name ("smollm2") reads its packaged file

        try:
            init_from = resolve_model_path(init_from)
        except FileNotFoundError as e:
            raise ConfigError(f"init_from={init_from!r}: {e}") from None
    lora = LoraConfig(**_coerce_section("lora", dict(raw.get("lora") or {}), LoraConfig))
    lora.validate()

    data_raw = dict(raw.get("data") or {})
    if init_from is not None and data_raw.get("tokenizer") is None:
        data_raw["tokenizer"] = init_from  # the checkpoint's own tokenizer
    data_values = _coerce_section("data", data_raw, DataConfig)
    try:
        data = DataConfig(**data_values)
    except DataError as e:
        raise ConfigError(f"data: {e}") from None

    train_values = _coerce_section("train", dict(raw.get("train") or {}), TrainConfig)
    train = TrainConfig(**train_values)
    train.validate()
    mesh = MeshConfig(**_coerce_section("mesh", dict(raw.get("mesh") or {}), MeshConfig))
    mesh.validate()

    model_values = dict(raw.get("model") or {})
    if init_from is not None:
        model = model_from_checkpoint(init_from, model_values)
        if tokenizer is None:
            tokenizer = _load_tokenizer(data.tokenizer)
        if model.vocab_size < tokenizer.vocab_size:
            raise ConfigError(f"the init_from model's vocabulary ({model.vocab_size} ids) is smaller than the "
                              f"tokenizer's ({tokenizer.vocab_size} ids, data.tokenizer={data.tokenizer!r})")
        if train.seq_len > model.max_seq_len:
            raise ConfigError(f"train.seq_len={train.seq_len} exceeds the init_from model's max_seq_len="
                              f"{model.max_seq_len}; lower train.seq_len")
        return RunConfig(run_dir=run_dir, seed=seed, model=model, data=data, train=train, mesh=mesh,
                         init_from=init_from, lora=lora)
    needs_tokenizer = model_values.get("vocab_size") is None or model_values.get("eos_token_id") is None
    vocab_size = eos = None
    if needs_tokenizer:
        if tokenizer is None:
            from jaxar.tokenizer import load_tokenizer

            try:
                tokenizer = load_tokenizer(data.tokenizer)
            except (OSError, ValueError) as e:
                raise ConfigError(f"data.tokenizer={data.tokenizer!r}: {e}") from None
        vocab_size, eos = tokenizer.vocab_size, tokenizer.eos_id
    model = build_model_config(model_values, vocab_size=vocab_size, eos_token_id=eos)
    if tokenizer is not None and model.vocab_size < tokenizer.vocab_size:
        raise ConfigError(f"model.vocab_size={model.vocab_size} is smaller than the tokenizer's vocabulary "
                          f"({tokenizer.vocab_size} ids)")
    if model.position == "learned" and train.seq_len > model.max_seq_len:
        raise ConfigError(f"train.seq_len={train.seq_len} exceeds model.max_seq_len={model.max_seq_len}")
    if train.seq_len > model.max_seq_len:
        model = model.replace(max_seq_len=train.seq_len)
    return RunConfig(run_dir=run_dir, seed=seed, model=model, data=data, train=train, mesh=mesh, lora=lora)


def _load_tokenizer(name: str):
    from jaxar.tokenizer import load_tokenizer

    try:
        return load_tokenizer(name)
    except (OSError, ValueError) as e:
        raise ConfigError(f"data.tokenizer={name!r}: {e}") from None


def checkpoint_model_config(path: str) -> ModelConfig:
    """The ModelConfig of a pretrained checkpoint without reading its weights (a GGUF file: its
    metadata): a Hugging Face directory, a .gguf file (or a directory holding one) or a jaxar run dir."""
    from jaxar.convert import gguf, hf

    try:
        gguf_file = gguf.find_gguf(path)
    except ValueError as e:
        raise ConfigError(f"init_from={path!r}: {e}") from None
    if gguf_file is not None:
        try:
            return hf.config_from_hf(gguf.hf_config_from_gguf(gguf.read_gguf(gguf_file)), source=gguf_file)
        except (OSError, ValueError) as e:
            raise ConfigError(f"init_from={path!r}: {e}") from None
    if os.path.isfile(os.path.join(path, "config.json")):
        jaxar_cfg = os.path.join(path, "jaxar_config.json")
        try:
            if os.path.isfile(jaxar_cfg):  # written by save_pretrained
                with open(jaxar_cfg) as f:
                    return ModelConfig.from_dict(json.load(f))
            with open(os.path.join(path, "config.json")) as f:
                return hf.config_from_hf(json.load(f), source=os.path.join(path, "config.json"))
        except ValueError as e:
            raise ConfigError(f"init_from={path!r}: {e}") from None
    from jaxar.train import checkpoint as ckpt

    found = ckpt.find_checkpoint(path) if os.path.isdir(path) else None
    if found is None:
        raise ConfigError(f"init_from={path!r} is not a Hugging Face directory (config.json), a .gguf file or a "
                          "jaxar run directory with a complete checkpoint")
    return ModelConfig.from_dict(ckpt.read_run_config(found)["model"])


def model_from_checkpoint(path: str, model_values: dict) -> ModelConfig:
    """The init_from checkpoint's ModelConfig with the model section's compatible changes applied;
    a key that would change the architecture is an error naming it."""
    base = checkpoint_model_config(path)
    values = {k: v for k, v in model_values.items() if v is not None}
    family = values.pop("family", None)
    if family is not None and family != base.family and not {family, base.family} <= {"llama", "mistral"}:
        raise ConfigError(f"model.family={family!r} conflicts with the init_from checkpoint ({base.family!r}); "
                          "remove it from the model section (the architecture comes from init_from)")
    values = _coerce_section("model", values, ModelConfig)
    current = base.to_dict()
    changes = {}
    for k, v in values.items():
        have = current[k]
        same = (list(v) if isinstance(v, (list, tuple)) else v) == have or (k == "eos_token_id" and (
            [v] if isinstance(v, int) else list(v)) == have)
        if same:
            continue
        if k not in COMPATIBLE_MODEL_KEYS:
            raise ConfigError(f"model.{k}={v!r} conflicts with the init_from checkpoint's {k}={have!r}; remove it "
                              f"from the model section (only {', '.join(COMPATIBLE_MODEL_KEYS)} may change)")
        if k == "max_seq_len" and (base.position == "learned" or v < base.max_seq_len):
            raise ConfigError(f"model.max_seq_len={v!r}: the init_from checkpoint has max_seq_len="
                              f"{base.max_seq_len} and {base.position} positions; it can only grow with RoPE")
        changes[k] = v
    try:
        return base.replace(**changes) if changes else base
    except (TypeError, ValueError) as e:
        raise ConfigError(f"model: {e}") from None


def load_yaml(path: str) -> dict:
    if not os.path.isfile(path):
        raise ConfigError(f"config file {path!r} does not exist")
    with open(path) as f:
        try:
            raw = yaml.safe_load(f)
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML ({e})") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: a config must be a mapping of sections")
    return raw


def load_run_config(path: Optional[str], overrides: Sequence[str] = (), *, tokenizer=None) -> RunConfig:
    """Read the YAML at `path` (None: start from nothing), apply `overrides`, validate."""
    raw = load_yaml(path) if path is not None else {}
    raw = apply_overrides(raw, overrides)
    return build_run_config(raw, tokenizer=tokenizer)


__all__ = [
    "COMPATIBLE_MODEL_KEYS",
    "MeshConfig",
    "RunConfig",
    "TrainConfig",
    "all_keys",
    "apply_overrides",
    "build_model_config",
    "build_run_config",
    "checkpoint_model_config",
    "load_run_config",
    "model_from_checkpoint",
    "parse_override",
]
