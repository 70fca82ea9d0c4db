"""Hugging Face safetensors <-> jaxar params, for GPT-2, Llama, Qwen2 and Mistral.

Hugging Face stores linear weights as [out, in] (torch.nn.Linear) except
GPT-2's Conv1D, which stores [in, out] and fuses q, k, v into `c_attn`.
jaxar keeps the layer stack in one array with a leading [n_layers] axis.
"""

from __future__ import annotations

import json
import os
import struct
from typing import Callable, Dict

import numpy as np

from jaxar.config import ConfigError, ModelConfig

SUPPORTED_MODEL_TYPES = ("llama", "gpt2", "qwen2", "mistral")


class CheckpointError(ValueError):
    """A checkpoint file is missing, truncated, or does not fit the config."""


# ---------------------------------------------------------------------------
# config.json <-> ModelConfig


def _rope_fields(hf: dict):
    """(rope_theta, rope_scaling) from either the old top-level fields or the
    newer `rope_parameters` dict."""
    params = hf.get("rope_parameters")
    if isinstance(params, dict) and "full_attention" in params:  # per-layer-type form
        params = params["full_attention"]
    theta = hf.get("rope_theta")
    scaling = hf.get("rope_scaling")
    if isinstance(params, dict):
        theta = params.get("rope_theta", theta)
        scaling = {k: v for k, v in params.items() if k != "rope_theta"}
    if theta is None:
        theta = 10000.0
    if scaling:
        kind = scaling.get("rope_type", scaling.get("type", "default"))
        if kind == "default":
            scaling = None
        else:
            scaling = {k: v for k, v in scaling.items() if v is not None}
    return float(theta), (scaling or None)


def config_from_hf(hf: dict, *, source: str = "config.json") -> ModelConfig:
    """A jaxar ModelConfig from a Hugging Face config.json dict."""
    model_type = hf.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ConfigError(
            f"{source}: model_type {model_type!r} is not supported; jaxar loads {', '.join(SUPPORTED_MODEL_TYPES)}")
    eos = hf.get("eos_token_id")
    common = dict(bos_token_id=hf.get("bos_token_id"), eos_token_id=eos, pad_token_id=hf.get("pad_token_id"),
                  vocab_size=hf["vocab_size"], initializer_range=hf.get("initializer_range", 0.02))
    if model_type == "gpt2":
        for flag in ("scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn"):
            if hf.get(flag):
                raise ConfigError(f"{source}: GPT-2 option {flag}=true is not supported")
        if not hf.get("scale_attn_weights", True):
            raise ConfigError(f"{source}: GPT-2 option scale_attn_weights=false is not supported")
        d = hf["n_embd"]
        act = hf.get("activation_function", "gelu_new")
        return ModelConfig.gpt2(
            d_model=d, n_layers=hf["n_layer"], n_heads=hf["n_head"], mlp_dim=hf.get("n_inner") or 4 * d,
            max_seq_len=hf.get("n_positions", 1024), norm_eps=hf.get("layer_norm_epsilon", 1e-5),
            activation="gelu_new" if act in ("gelu_new", "gelu_pytorch_tanh") else act,
            tie_embeddings=hf.get("tie_word_embeddings", True), **common)

    sliding = hf.get("sliding_window")
    use_sliding = hf.get("use_sliding_window", model_type == "mistral")
    max_pos = hf.get("max_position_embeddings", 2048)
    if sliding is not None and use_sliding and sliding < max_pos:
        raise ConfigError(
            f"{source}: sliding-window attention (sliding_window={sliding}) is not implemented; "
            f"set sliding_window to null in config.json to load it with full attention")
    theta, scaling = _rope_fields(hf)
    act = hf.get("hidden_act", "silu")
    if act not in ("silu", "gelu", "gelu_new", "relu", "gelu_pytorch_tanh"):
        raise ConfigError(f"{source}: hidden_act {act!r} is not supported")
    n_heads = hf["num_attention_heads"]
    head_dim = hf.get("head_dim")
    if head_dim == hf["hidden_size"] // n_heads:
        head_dim = None
    family = "llama" if model_type == "mistral" else model_type
    builder = ModelConfig.qwen2 if model_type == "qwen2" else ModelConfig.llama
    attn_bias = hf.get("attention_bias", False)
    return builder(
        family=family if model_type != "mistral" else "mistral",
        d_model=hf["hidden_size"], n_layers=hf["num_hidden_layers"], n_heads=n_heads,
        n_kv_heads=hf.get("num_key_value_heads") or n_heads, head_dim=head_dim, mlp_dim=hf["intermediate_size"],
        max_seq_len=max_pos, norm_eps=hf.get("rms_norm_eps", 1e-6), rope_theta=theta, rope_scaling=scaling,
        activation="gelu_tanh" if act == "gelu_pytorch_tanh" else act,
        qkv_bias=True if model_type == "qwen2" else attn_bias,
        out_bias=False if model_type == "qwen2" else attn_bias,
        mlp_bias=hf.get("mlp_bias", False),
        tie_embeddings=hf.get("tie_word_embeddings", False), **common)


def config_to_hf(cfg: ModelConfig) -> dict:
    """A Hugging Face config.json dict for `cfg`."""
    eos = list(cfg.eos_token_id) if cfg.eos_token_id else None
    if eos is not None and len(eos) == 1:
        eos = eos[0]
    common = dict(vocab_size=cfg.vocab_size, bos_token_id=cfg.bos_token_id, eos_token_id=eos,
                  pad_token_id=cfg.pad_token_id, tie_word_embeddings=cfg.tie_embeddings,
                  initializer_range=cfg.initializer_range, torch_dtype=cfg.param_dtype, dtype=cfg.param_dtype)
    if cfg.family == "gpt2":
        if cfg.norm != "layernorm" or cfg.position != "learned" or cfg.gated_mlp:
            raise ConfigError("family='gpt2' export needs layernorm, learned positions and a plain MLP")
        return dict(model_type="gpt2", architectures=["GPT2LMHeadModel"], n_embd=cfg.d_model, n_layer=cfg.n_layers,
                    n_head=cfg.n_heads, n_inner=cfg.mlp_dim, n_positions=cfg.max_seq_len,
                    layer_norm_epsilon=cfg.norm_eps, activation_function=cfg.activation,
                    attn_pdrop=0.0, embd_pdrop=0.0, resid_pdrop=0.0, **common)
    if cfg.norm != "rmsnorm" or cfg.position != "rope" or not cfg.gated_mlp:
        raise ConfigError(f"family={cfg.family!r} export needs rmsnorm, rope and a gated MLP")
    model_type = cfg.family
    arch = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "mistral": "MistralForCausalLM"}[model_type]
    rope_parameters = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    if cfg.rope_scaling:
        rope_parameters = {**cfg.rope_scaling_dict, "rope_theta": cfg.rope_theta}
    if model_type == "qwen2" and (not cfg.qkv_bias or cfg.out_bias):
        raise ConfigError("family='qwen2' export needs qkv_bias=True and out_bias=False")
    if model_type != "qwen2" and cfg.qkv_bias != cfg.out_bias:
        raise ConfigError("llama export needs qkv_bias == out_bias (Hugging Face's attention_bias covers both)")
    out = dict(model_type=model_type, architectures=[arch], hidden_size=cfg.d_model,
               num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads,
               num_key_value_heads=cfg.num_kv_heads, head_dim=cfg.dim_per_head, intermediate_size=cfg.mlp_dim,
               max_position_embeddings=cfg.max_seq_len, rms_norm_eps=cfg.norm_eps,
               hidden_act="gelu_pytorch_tanh" if cfg.activation == "gelu_tanh" else cfg.activation,
               rope_theta=cfg.rope_theta, rope_scaling=cfg.rope_scaling_dict, rope_parameters=rope_parameters,
               mlp_bias=cfg.mlp_bias, attention_dropout=0.0, **common)
    if model_type != "qwen2":
        out["attention_bias"] = cfg.qkv_bias
    else:
        out["use_sliding_window"] = False
        out["sliding_window"] = None
    if model_type == "mistral":
        out["sliding_window"] = None
    return out


# ---------------------------------------------------------------------------
# safetensors files


def _check_safetensors_file(path: str) -> dict:
    """Header of a safetensors file; raises CheckpointError if it is truncated."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path}: file is truncated or not a safetensors file ({size} bytes)")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8:
            raise CheckpointError(f"{path}: file is truncated (header says {n} header bytes, file has {size})")
        try:
            header = json.loads(f.read(n))
        except ValueError as e:
            raise CheckpointError(f"{path}: corrupt safetensors header ({e})") from None
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if 8 + n + end > size:
        raise CheckpointError(f"{path}: file is truncated: tensors need {8 + n + end} bytes, file has {size}")
    return header


def read_safetensors_dir(path: str) -> Dict[str, np.ndarray]:
    """All tensors of a Hugging Face model directory (single or sharded)."""
    from safetensors import safe_open

    index = os.path.join(path, "model.safetensors.index.json")
    single = os.path.join(path, "model.safetensors")
    if os.path.exists(index):
        with open(index) as f:
            weight_map = json.load(f)["weight_map"]
        files = sorted(set(weight_map.values()))
    elif os.path.exists(single):
        files = ["model.safetensors"]
    else:
        others = sorted(x for x in os.listdir(path) if x.endswith(".safetensors"))
        if not others:
            raise CheckpointError(
                f"{path}: no model.safetensors or model.safetensors.index.json found "
                "(PyTorch .bin checkpoints are not read; convert them to safetensors first)")
        files = others
    tensors = {}
    for name in files:
        fpath = os.path.join(path, name)
        if not os.path.exists(fpath):
            raise CheckpointError(f"{fpath}: shard listed in model.safetensors.index.json is missing")
        _check_safetensors_file(fpath)
        with safe_open(fpath, "np") as f:
            for key in f.keys():
                tensors[key] = f.get_tensor(key)
    return tensors


# ---------------------------------------------------------------------------
# tensors <-> params

_PREFIXES = ("model.", "transformer.")


def _strip(name: str) -> str:
    for p in _PREFIXES:
        if name.startswith(p):
            return name[len(p):]
    return name


class _Reader:
    """Fetches HF tensors by name and checks their shapes, with clear errors."""

    def __init__(self, tensors: Dict[str, np.ndarray], source: str):
        self.t = {_strip(k): v for k, v in tensors.items()}
        self.source = source
        self.used = set()

    def __call__(self, name: str, shape) -> np.ndarray:
        if name not in self.t:
            raise CheckpointError(f"{self.source}: tensor {name!r} is missing (expected shape {tuple(shape)})")
        x = self.t[name]
        if tuple(x.shape) != tuple(shape):
            raise CheckpointError(
                f"{self.source}: tensor {name!r} has shape {tuple(x.shape)}, expected {tuple(shape)} for this config")
        self.used.add(name)
        return x

    def has(self, name):
        return name in self.t


def params_from_hf(tensors: Dict[str, np.ndarray], cfg: ModelConfig, *, source: str = "checkpoint",
                   dtype=None) -> dict:
    """jaxar params (numpy, `dtype` or the checkpoint's own) from HF tensors."""
    r = _Reader(tensors, source)
    D, F, V, L = cfg.d_model, cfg.mlp_dim, cfg.vocab_size, cfg.n_layers
    H, K, Dh = cfg.n_heads, cfg.num_kv_heads, cfg.dim_per_head
    cast = (lambda x: np.asarray(x, dtype=dtype)) if dtype is not None else np.asarray

    def stack(fn: Callable[[int], np.ndarray]):
        return cast(np.stack([fn(i) for i in range(L)]))

    def norm(prefix_fn):
        out = {"scale": stack(lambda i: r(prefix_fn(i) + ".weight", (D,)))}
        if cfg.norm == "layernorm":
            out["bias"] = stack(lambda i: r(prefix_fn(i) + ".bias", (D,)))
        return out

    params: dict = {}
    if cfg.family == "gpt2":
        params["embed"] = {"embedding": cast(r("wte.weight", (V, D)))}
        params["pos_embed"] = {"embedding": cast(r("wpe.weight", (cfg.max_seq_len, D)))}
        h = lambda i: f"h.{i}."  # noqa: E731
        # c_attn: [D, 3D] (in, out), columns ordered q | k | v.
        qkv_w = [r(h(i) + "attn.c_attn.weight", (D, 3 * D)) for i in range(L)]
        qkv_b = [r(h(i) + "attn.c_attn.bias", (3 * D,)) for i in range(L)]
        attn = {}
        for j, name in enumerate(("q_proj", "k_proj", "v_proj")):
            attn[name] = {
                "kernel": cast(np.stack([w[:, j * D:(j + 1) * D].reshape(D, H, Dh) for w in qkv_w])),
                "bias": cast(np.stack([b[j * D:(j + 1) * D].reshape(H, Dh) for b in qkv_b])),
            }
        attn["o_proj"] = {"kernel": stack(lambda i: r(h(i) + "attn.c_proj.weight", (D, D)).reshape(H, Dh, D)),
                          "bias": stack(lambda i: r(h(i) + "attn.c_proj.bias", (D,)))}
        mlp = {"up_proj": {"kernel": stack(lambda i: r(h(i) + "mlp.c_fc.weight", (D, F))),
                           "bias": stack(lambda i: r(h(i) + "mlp.c_fc.bias", (F,)))},
               "down_proj": {"kernel": stack(lambda i: r(h(i) + "mlp.c_proj.weight", (F, D))),
                             "bias": stack(lambda i: r(h(i) + "mlp.c_proj.bias", (D,)))}}
        params["layers"] = {"attn_norm": norm(lambda i: h(i) + "ln_1"), "attn": attn,
                            "mlp_norm": norm(lambda i: h(i) + "ln_2"), "mlp": mlp}
        params["final_norm"] = {"scale": cast(r("ln_f.weight", (D,))), "bias": cast(r("ln_f.bias", (D,)))}
        if not cfg.tie_embeddings:
            params["lm_head"] = {"kernel": cast(r("lm_head.weight", (V, D)).T)}
        return params

    lay = lambda i: f"layers.{i}."  # noqa: E731
    params["embed"] = {"embedding": cast(r("embed_tokens.weight", (V, D)))}

    def linear_in_heads(name, heads, bias):
        # torch [heads*Dh, D] -> jaxar [D, heads, Dh]
        out = {"kernel": stack(lambda i: r(lay(i) + name + ".weight", (heads * Dh, D)).T.reshape(D, heads, Dh))}
        if bias:
            out["bias"] = stack(lambda i: r(lay(i) + name + ".bias", (heads * Dh,)).reshape(heads, Dh))
        return out

    attn = {"q_proj": linear_in_heads("self_attn.q_proj", H, cfg.qkv_bias),
            "k_proj": linear_in_heads("self_attn.k_proj", K, cfg.qkv_bias),
            "v_proj": linear_in_heads("self_attn.v_proj", K, cfg.qkv_bias),
            "o_proj": {"kernel": stack(lambda i: r(lay(i) + "self_attn.o_proj.weight", (D, H * Dh)).T.reshape(H, Dh, D))}}
    if cfg.out_bias:
        attn["o_proj"]["bias"] = stack(lambda i: r(lay(i) + "self_attn.o_proj.bias", (D,)))

    def linear(name, d_in, d_out):
        out = {"kernel": stack(lambda i: r(lay(i) + name + ".weight", (d_out, d_in)).T)}
        if cfg.mlp_bias:
            out["bias"] = stack(lambda i: r(lay(i) + name + ".bias", (d_out,)))
        return out

    mlp = {"gate_proj": linear("mlp.gate_proj", D, F), "up_proj": linear("mlp.up_proj", D, F),
           "down_proj": linear("mlp.down_proj", F, D)}
    params["layers"] = {"attn_norm": norm(lambda i: lay(i) + "input_layernorm"), "attn": attn,
                        "mlp_norm": norm(lambda i: lay(i) + "post_attention_layernorm"), "mlp": mlp}
    params["final_norm"] = {"scale": cast(r("norm.weight", (D,)))}
    if not cfg.tie_embeddings:
        # Some checkpoints tie in practice but still ship lm_head; others omit it.
        params["lm_head"] = {"kernel": cast(r("lm_head.weight", (V, D)).T)}
    return params


def params_to_hf(params: dict, cfg: ModelConfig) -> Dict[str, np.ndarray]:
    """Hugging Face tensor dict (with the `model.` / `transformer.` prefixes
    transformers writes) for jaxar params."""
    p = _to_numpy(params)
    D, L = cfg.d_model, cfg.n_layers
    H, K, Dh = cfg.n_heads, cfg.num_kv_heads, cfg.dim_per_head
    lay, at, mlp = p["layers"], p["layers"]["attn"], p["layers"]["mlp"]
    out = {}
    if cfg.family == "gpt2":
        pre = "transformer."
        out[pre + "wte.weight"] = p["embed"]["embedding"]
        out[pre + "wpe.weight"] = p["pos_embed"]["embedding"]
        for i in range(L):
            h = f"{pre}h.{i}."
            out[h + "ln_1.weight"], out[h + "ln_1.bias"] = lay["attn_norm"]["scale"][i], lay["attn_norm"]["bias"][i]
            out[h + "ln_2.weight"], out[h + "ln_2.bias"] = lay["mlp_norm"]["scale"][i], lay["mlp_norm"]["bias"][i]
            out[h + "attn.c_attn.weight"] = np.concatenate(
                [at[n]["kernel"][i].reshape(D, H * Dh) for n in ("q_proj", "k_proj", "v_proj")], axis=1)
            out[h + "attn.c_attn.bias"] = np.concatenate(
                [at[n]["bias"][i].reshape(H * Dh) for n in ("q_proj", "k_proj", "v_proj")])
            out[h + "attn.c_proj.weight"] = at["o_proj"]["kernel"][i].reshape(H * Dh, D)
            out[h + "attn.c_proj.bias"] = at["o_proj"]["bias"][i]
            out[h + "mlp.c_fc.weight"] = mlp["up_proj"]["kernel"][i]
            out[h + "mlp.c_fc.bias"] = mlp["up_proj"]["bias"][i]
            out[h + "mlp.c_proj.weight"] = mlp["down_proj"]["kernel"][i]
            out[h + "mlp.c_proj.bias"] = mlp["down_proj"]["bias"][i]
        out[pre + "ln_f.weight"], out[pre + "ln_f.bias"] = p["final_norm"]["scale"], p["final_norm"]["bias"]
        if not cfg.tie_embeddings:
            out["lm_head.weight"] = p["lm_head"]["kernel"].T
        return {k: np.ascontiguousarray(v) for k, v in out.items()}

    pre = "model."
    out[pre + "embed_tokens.weight"] = p["embed"]["embedding"]
    for i in range(L):
        h = f"{pre}layers.{i}."
        out[h + "input_layernorm.weight"] = lay["attn_norm"]["scale"][i]
        out[h + "post_attention_layernorm.weight"] = lay["mlp_norm"]["scale"][i]
        for n, heads in (("q_proj", H), ("k_proj", K), ("v_proj", K)):
            out[h + f"self_attn.{n}.weight"] = at[n]["kernel"][i].reshape(D, heads * Dh).T
            if "bias" in at[n]:
                out[h + f"self_attn.{n}.bias"] = at[n]["bias"][i].reshape(heads * Dh)
        out[h + "self_attn.o_proj.weight"] = at["o_proj"]["kernel"][i].reshape(H * Dh, D).T
        if "bias" in at["o_proj"]:
            out[h + "self_attn.o_proj.bias"] = at["o_proj"]["bias"][i]
        for n in ("gate_proj", "up_proj", "down_proj"):
            out[h + f"mlp.{n}.weight"] = mlp[n]["kernel"][i].T
            if "bias" in mlp[n]:
                out[h + f"mlp.{n}.bias"] = mlp[n]["bias"][i]
    out[pre + "norm.weight"] = p["final_norm"]["scale"]
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = p["lm_head"]["kernel"].T
    return {k: np.ascontiguousarray(v) for k, v in out.items()}


def _to_numpy(tree):
    import jax

    return jax.tree_util.tree_map(lambda x: np.asarray(jax.device_get(x)), tree)
