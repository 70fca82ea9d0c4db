"""Configuration dataclasses and YAML/key=value loading.

`ModelConfig` describes every supported decoder-only family with switches
(norm kind, position kind, gated MLP, biases, tying), not subclasses. It is a
frozen, hashable dataclass so it can be a static argument of `jax.jit`.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Optional, Union

_FAMILIES = ("llama", "gpt2", "qwen2", "mistral")
_ACTIVATIONS = ("silu", "gelu", "gelu_new", "gelu_tanh", "relu")
_ATTENTION_BACKENDS = ("xla", "cudnn", "pallas")
_DTYPES = ("float32", "bfloat16", "float16")
_WEIGHT_QUANT = ("none", "int8")
_KV_CACHE_DTYPES = ("auto", "int8") + _DTYPES


# scan_layers="auto": where the layer scan pays (TPU: compile time and the scan's
# memory schedule); elsewhere unrolled, which measured faster on CPU (the scan
# writes stacked per-layer residuals every step), up to this many layers.
SCAN_AUTO_PLATFORMS = ("tpu",)
SCAN_AUTO_MAX_UNROLLED = 32


class ConfigError(ValueError):
    """A configuration value is missing, unknown or out of range."""


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Architecture of a decoder-only transformer.

    The defaults describe a small Llama. `family` only records where the
    config came from (for Hugging Face export); behaviour is set by the
    switches below it.
    """

    family: str = "llama"
    vocab_size: int = 256
    d_model: int = 128
    n_layers: int = 2
    n_heads: int = 4
    n_kv_heads: Optional[int] = None  # None: same as n_heads (multi-head attention)
    head_dim: Optional[int] = None  # None: d_model // n_heads
    mlp_dim: int = 512
    max_seq_len: int = 512
    # Switches that make the families.
    norm: str = "rmsnorm"  # rmsnorm | layernorm
    norm_eps: float = 1e-5
    position: str = "rope"  # rope | learned
    rope_theta: float = 10000.0
    # Hashable view of Hugging Face's rope_scaling / rope_parameters, e.g.
    # (("factor", 8.0), ("rope_type", "llama3"), ...). None: plain RoPE.
    rope_scaling: Optional[tuple] = None
    activation: str = "silu"
    gated_mlp: bool = True  # SwiGLU-style gate * up -> down; False: fc -> act -> proj
    qkv_bias: bool = False
    out_bias: bool = False  # bias on the attention output projection
    mlp_bias: bool = False
    tie_embeddings: bool = False
    # Width of a per-row conditioning vector fed to adaptive norms (VAR/DiT
    # AdaLN: shift, scale and gate per block from the vector); 0: none.
    cond_dim: int = 0
    # Token ids (None when the model has none). eos may be several ids.
    bos_token_id: Optional[int] = None
    eos_token_id: Optional[tuple] = None
    pad_token_id: Optional[int] = None
    # Numerics and execution.
    param_dtype: str = "float32"
    dtype: str = "float32"  # compute dtype (activations, KV cache)
    # True: lax.scan over the layers (fast compiles); False: unrolled; "auto": scanned on TPU, unrolled
    # elsewhere (measured faster on CPU) up to SCAN_AUTO_MAX_UNROLLED layers (see uses_scan).
    scan_layers: Union[bool, str] = "auto"
    remat: str = "none"  # none | full | dots (checkpoint policy for training)
    attention_backend: str = "xla"
    initializer_range: float = 0.02
    # Inference-only quantization (jaxar.quant). weight_quant="int8": every attention / MLP kernel,
    # the embedding table (per row: it is also the tied head) and lm_head are stored int8 with a
    # float32 scale per output channel, dequantized inside the matmul; applied once by
    # transformer.decode_params (generate, beam search, speculative decoding). kv_cache_dtype:
    # "auto" (= dtype), a float dtype, or "int8" (symmetric, one float32 scale per slot and kv head).
    weight_quant: str = "none"
    kv_cache_dtype: str = "auto"

    def __post_init__(self):
        eos = self.eos_token_id
        if isinstance(eos, int):
            object.__setattr__(self, "eos_token_id", (eos,))
        elif isinstance(eos, list):
            object.__setattr__(self, "eos_token_id", tuple(eos))
        if isinstance(self.rope_scaling, dict):
            object.__setattr__(self, "rope_scaling", freeze_dict(self.rope_scaling))
        self.validate()

    def uses_scan(self, platform: Optional[str] = None) -> bool:
        """Whether the no-cache (training / scoring) path scans the layers on `platform`
        (default: jax's default backend). "auto": scanned on SCAN_AUTO_PLATFORMS, or
        beyond SCAN_AUTO_MAX_UNROLLED layers (compile time), unrolled otherwise."""
        if self.scan_layers != "auto":
            return bool(self.scan_layers)
        import jax

        platform = platform or jax.default_backend()
        return platform in SCAN_AUTO_PLATFORMS or self.n_layers > SCAN_AUTO_MAX_UNROLLED

    # Derived sizes -----------------------------------------------------
    @property
    def num_kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def dim_per_head(self) -> int:
        return self.head_dim or self.d_model // self.n_heads

    @property
    def cache_dtype(self) -> str:
        """The KV cache's storage dtype ("int8" or a float dtype)."""
        return self.dtype if self.kv_cache_dtype == "auto" else self.kv_cache_dtype

    @property
    def rope_scaling_dict(self) -> Optional[dict]:
        return dict(self.rope_scaling) if self.rope_scaling is not None else None

    def num_params(self) -> int:
        """Parameter count (embeddings included)."""
        D, F, V, L = self.d_model, self.mlp_dim, self.vocab_size, self.n_layers
        H, K, Dh = self.n_heads, self.num_kv_heads, self.dim_per_head
        attn = D * H * Dh * 2 + D * K * Dh * 2
        mlp = D * F * (3 if self.gated_mlp else 2)
        per_layer = attn + mlp + 2 * D
        total = L * per_layer + V * D + D
        if not self.tie_embeddings:
            total += V * D
        if self.position == "learned":
            total += self.max_seq_len * D
        if self.cond_dim:
            total += L * (self.cond_dim + 1) * 6 * D + (self.cond_dim + 1) * 2 * D
        return total

    def validate(self) -> None:
        def need(cond, msg):
            if not cond:
                raise ConfigError(msg)

        need(self.family in _FAMILIES, f"model.family={self.family!r} is not supported; use one of {_FAMILIES}")
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "mlp_dim", "max_seq_len"):
            need(isinstance(getattr(self, name), int) and getattr(self, name) > 0,
                 f"model.{name} must be a positive integer, got {getattr(self, name)!r}")
        need(self.num_kv_heads > 0 and self.n_heads % self.num_kv_heads == 0,
             f"model.n_heads={self.n_heads} must be a multiple of model.n_kv_heads={self.num_kv_heads}")
        need(self.head_dim is not None or self.d_model % self.n_heads == 0,
             f"model.d_model={self.d_model} is not divisible by model.n_heads={self.n_heads}; set model.head_dim")
        need(self.norm in ("rmsnorm", "layernorm"), f"model.norm={self.norm!r}: use 'rmsnorm' or 'layernorm'")
        need(self.position in ("rope", "learned"), f"model.position={self.position!r}: use 'rope' or 'learned'")
        need(self.position != "rope" or self.dim_per_head % 2 == 0,
             f"RoPE needs an even head_dim, got {self.dim_per_head}")
        need(self.activation in _ACTIVATIONS, f"model.activation={self.activation!r}: use one of {_ACTIVATIONS}")
        need(self.attention_backend in _ATTENTION_BACKENDS,
             f"model.attention_backend={self.attention_backend!r}: use one of {_ATTENTION_BACKENDS}")
        need(self.dtype in _DTYPES and self.param_dtype in _DTYPES,
             f"model.dtype / model.param_dtype must be one of {_DTYPES}, got {self.dtype!r} / {self.param_dtype!r}")
        need(self.remat in ("none", "full", "dots"), f"model.remat={self.remat!r}: use 'none', 'full' or 'dots'")
        need(self.scan_layers in (True, False, "auto"),
             f"model.scan_layers={self.scan_layers!r}: use true, false or 'auto'")
        need(isinstance(self.cond_dim, int) and self.cond_dim >= 0,
             f"model.cond_dim must be an integer >= 0 (0: no conditioning), got {self.cond_dim!r}")
        need(self.weight_quant in _WEIGHT_QUANT,
             f"model.weight_quant={self.weight_quant!r}: use one of {_WEIGHT_QUANT}")
        need(self.kv_cache_dtype in _KV_CACHE_DTYPES,
             f"model.kv_cache_dtype={self.kv_cache_dtype!r}: use one of {_KV_CACHE_DTYPES}")
        need(not (self.kv_cache_dtype == "int8" and self.attention_backend == "pallas"),
             "model.kv_cache_dtype='int8' is not supported by attention_backend='pallas' (the decode-attention "
             "kernel reads float caches); use attention_backend='xla' or a float kv_cache_dtype")
        need(self.norm_eps > 0, f"model.norm_eps must be positive, got {self.norm_eps}")
        if self.rope_scaling is not None:
            kind = dict(self.rope_scaling).get("rope_type", dict(self.rope_scaling).get("type", "default"))
            need(kind in ("default", "linear", "llama3"),
                 f"rope scaling type {kind!r} is not supported; jaxar implements 'default', 'linear' and 'llama3'")

    # Conversions ---------------------------------------------------------
    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["eos_token_id"] = list(self.eos_token_id) if self.eos_token_id is not None else None
        d["rope_scaling"] = self.rope_scaling_dict
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"unknown model config keys {unknown}; known keys are {sorted(known)}")
        return cls(**d)

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    # Presets for the three families -------------------------------------
    @classmethod
    def llama(cls, **kw) -> "ModelConfig":
        base = dict(family="llama", norm="rmsnorm", position="rope", activation="silu", gated_mlp=True,
                    qkv_bias=False, out_bias=False, mlp_bias=False, norm_eps=1e-5)
        return cls(**{**base, **kw})

    @classmethod
    def qwen2(cls, **kw) -> "ModelConfig":
        base = dict(family="qwen2", norm="rmsnorm", position="rope", activation="silu", gated_mlp=True,
                    qkv_bias=True, out_bias=False, mlp_bias=False, norm_eps=1e-6, rope_theta=1e6)
        return cls(**{**base, **kw})

    @classmethod
    def gpt2(cls, **kw) -> "ModelConfig":
        base = dict(family="gpt2", norm="layernorm", position="learned", activation="gelu_new", gated_mlp=False,
                    qkv_bias=True, out_bias=True, mlp_bias=True, tie_embeddings=True, norm_eps=1e-5)
        return cls(**{**base, **kw})


def freeze_dict(d: Optional[dict]) -> Optional[tuple]:
    """A hashable, order-independent view of a flat dict (lists become tuples)."""
    if d is None:
        return None
    return tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in d.items()))
