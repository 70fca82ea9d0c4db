"""llama.cpp GGUF files in: weights, config, tokenizer vocabulary and chat template.

Supported:
* architectures `llama` (Llama 1-3, Mistral, SmolLM, ...), `qwen2` and `gpt2`
  (`SUPPORTED_ARCHITECTURES`); anything else is a one-line `ConfigError`;
* every tensor type `gguf.quants` dequantizes (F32, F16, BF16, Q4_0, Q4_1,
  Q5_0, Q5_1, Q8_0, the K-quants Q2_K..Q6_K, the IQ*, TQ* and MXFP4 types),
  dequantized once to float32 with numpy; the rest (Q8_1, Q8_K, integer and
  F64 tensors) raise `CheckpointError`;
* rope scaling `linear` (metadata) and Llama 3.1 `llama3` (recovered from the
  `rope_freqs` tensor when it matches Llama 3's formula); tied embeddings when
  the file has no `output.weight`; bos/eos/pad ids from `tokenizer.ggml.*`
  (eot/eom ids join eos);
* tokenizers (`jaxar.tokenizer.gguf_tokenizer`): `tokenizer.ggml.model` gpt2
  (byte-level BPE, pre-tokenizers gpt-2/default, smollm/starcoder, qwen2,
  llama-bpe/llama3 and aliases) and llama (SentencePiece BPE, byte fallback).
Not supported: MoE, sliding-window attention, partial rotary, per-layer head counts.

llama.cpp's converter permutes the rows of Llama's q/k projections (interleaved
rotary pairs); `_unpermute_rows` undoes that, so the weights equal the Hugging
Face checkpoint the file came from. The file is mapped to a Hugging Face
config dict and tensor names, then read by `jaxar.convert.hf`.

    config, params = load_gguf("model.gguf")      # what jaxar.from_pretrained does
    file = read_gguf("model.gguf")                # metadata and tensor table only
    file.metadata["tokenizer.chat_template"]

The tokenizer is built by `jaxar.tokenizer.gguf_tokenizer` from the same file.
"""

from __future__ import annotations

import dataclasses
import mmap
import os
import re
import struct
import sys
from typing import Any, Dict, Optional, Tuple

import numpy as np

from jaxar.config import ConfigError, ModelConfig
from jaxar.convert import hf
from jaxar.convert.hf import CheckpointError

SUPPORTED_ARCHITECTURES = ("llama", "qwen2", "gpt2")
GGUF_MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32

# GGUF metadata value types -> struct format (scalars).
_SCALAR = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9
_NUMPY = {0: np.uint8, 1: np.int8, 2: np.uint16, 3: np.int16, 4: np.uint32, 5: np.int32, 6: np.float32,
          7: np.bool_, 10: np.uint64, 11: np.int64, 12: np.float64}


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    """One entry of the tensor table. `shape` is numpy order (GGUF lists dims fastest first)."""

    name: str
    shape: Tuple[int, ...]
    qtype: int
    offset: int  # absolute byte offset in the file
    nbytes: int


class GGUFFile:
    """A GGUF file's metadata (plain Python values; numeric arrays as numpy) and
    tensor table, with the data memory-mapped and read on demand."""

    def __init__(self, path: str, metadata: Dict[str, Any], tensors: Dict[str, TensorInfo], data: np.ndarray):
        self.path = path
        self.metadata = metadata
        self.tensors = tensors
        self._data = data

    @property
    def architecture(self) -> Optional[str]:
        return self.metadata.get("general.architecture")

    def read(self, name: str) -> np.ndarray:
        """Tensor `name` as a float32 numpy array of shape `tensors[name].shape`."""
        import gguf

        info = self.tensors[name]
        raw = self._data[info.offset:info.offset + info.nbytes]
        try:
            qtype = gguf.GGMLQuantizationType(info.qtype)
        except ValueError:
            raise CheckpointError(f"{self.path}: tensor {name!r} has unknown ggml type {info.qtype}") from None
        block, type_size = gguf.GGML_QUANT_SIZES[qtype]
        rows = info.shape[:-1]
        raw = raw.reshape(*rows, info.shape[-1] // block * type_size)
        try:
            out = gguf.quants.dequantize(raw, qtype)
        except NotImplementedError:
            raise CheckpointError(
                f"{self.path}: tensor {name!r} is {qtype.name}, which jaxar cannot dequantize "
                "(supported: F32, F16, BF16, Q4_0..Q8_0, Q2_K..Q6_K, IQ*, TQ*, MXFP4)") from None
        return np.asarray(out, dtype=np.float32).reshape(info.shape)


class _Cursor:
    """Little-endian reads from a byte buffer with truncation checks."""

    def __init__(self, buf, path: str):
        self.buf, self.pos, self.size, self.path = buf, 0, len(buf), path

    def need(self, n: int):
        if self.pos + n > self.size:
            raise CheckpointError(
                f"{self.path}: file is truncated (needs {self.pos + n} bytes to read its header, has {self.size})")

    def unpack(self, fmt: str):
        n = struct.calcsize("<" + fmt)
        self.need(n)
        out = struct.unpack_from("<" + fmt, self.buf, self.pos)
        self.pos += n
        return out[0] if len(out) == 1 else out

    def string(self) -> str:
        n = self.unpack("Q")
        self.need(n)
        s = self.buf[self.pos:self.pos + n].decode("utf-8", errors="replace")
        self.pos += n
        return s

    def value(self, vtype: int):
        if vtype in _SCALAR:
            return self.unpack(_SCALAR[vtype])
        if vtype == _STRING:
            return self.string()
        if vtype == _ARRAY:
            etype, count = self.unpack("I"), self.unpack("Q")
            if etype in _NUMPY:
                dtype = np.dtype(_NUMPY[etype]).newbyteorder("<")
                self.need(count * dtype.itemsize)
                arr = np.frombuffer(self.buf, dtype=dtype, count=count, offset=self.pos).copy()
                self.pos += count * dtype.itemsize
                return arr
            if etype == _STRING:
                return self._strings(count)
            return [self.value(etype) for _ in range(count)]
        raise CheckpointError(f"{self.path}: corrupt metadata (unknown value type {vtype} at byte {self.pos})")

    def _strings(self, count: int) -> list:
        buf, pos, size, out = self.buf, self.pos, self.size, []
        unpack = struct.Struct("<Q").unpack_from
        for _ in range(count):
            if pos + 8 > size:
                self.pos = pos
                self.need(8)
            (n,) = unpack(buf, pos)
            pos += 8
            if pos + n > size:
                self.pos = pos
                self.need(n)
            out.append(buf[pos:pos + n].decode("utf-8", errors="replace"))
            pos += n
        self.pos = pos
        return out


def read_gguf(path: str) -> GGUFFile:
    """Parse a GGUF file's header (metadata and tensor table); tensor data stays on disk."""
    import gguf

    path = os.path.expanduser(str(path))
    if not os.path.isfile(path):
        raise FileNotFoundError(f"GGUF file {path!r} does not exist")
    size = os.path.getsize(path)
    if size < 24:
        raise CheckpointError(f"{path}: not a GGUF file (only {size} bytes)")
    with open(path, "rb") as f:  # the mapping outlives the file object
        mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    data = np.frombuffer(mapped, dtype=np.uint8)
    cur = _Cursor(mapped, path)  # slicing the mmap (bytes) is much faster than slicing numpy
    if mapped[:4] != GGUF_MAGIC:
        raise CheckpointError(f"{path}: not a GGUF file (starts with {mapped[:4]!r}, expected b'GGUF')")
    cur.pos = 4
    version = cur.unpack("I")
    if version not in (2, 3):
        raise CheckpointError(f"{path}: GGUF version {version} is not supported (jaxar reads versions 2 and 3, "
                              "little-endian)")
    n_tensors, n_kv = cur.unpack("Q"), cur.unpack("Q")
    if n_tensors > size or n_kv > size:
        raise CheckpointError(f"{path}: corrupt GGUF header ({n_tensors} tensors, {n_kv} metadata entries)")
    metadata: Dict[str, Any] = {}
    for _ in range(n_kv):
        key = cur.string()
        metadata[key] = cur.value(cur.unpack("I"))
    table = []
    for _ in range(n_tensors):
        name = cur.string()
        n_dims = cur.unpack("I")
        if n_dims > 8:
            raise CheckpointError(f"{path}: corrupt tensor table ({name!r} has {n_dims} dimensions)")
        dims = [cur.unpack("Q") for _ in range(n_dims)]
        qtype, offset = cur.unpack("I"), cur.unpack("Q")
        table.append((name, tuple(reversed(dims)), qtype, offset))
    alignment = int(metadata.get("general.alignment", DEFAULT_ALIGNMENT))
    start = -(-cur.pos // alignment) * alignment
    tensors = {}
    for name, shape, qtype, offset in table:
        try:
            block, type_size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(qtype)]
        except (ValueError, KeyError):
            raise CheckpointError(f"{path}: tensor {name!r} has unknown ggml type {qtype}") from None
        n = int(np.prod(shape, dtype=np.int64)) if shape else 1
        if not shape or shape[-1] % block:
            raise CheckpointError(f"{path}: tensor {name!r} of shape {shape} does not fit its type's blocks")
        nbytes = n // block * type_size
        end = start + offset + nbytes
        if end > size:
            raise CheckpointError(
                f"{path}: file is truncated: tensor {name!r} needs bytes up to {end}, the file has {size}")
        tensors[name] = TensorInfo(name, shape, qtype, start + offset, nbytes)
    return GGUFFile(path, metadata, tensors, data)


def find_gguf(path: str) -> Optional[str]:
    """The GGUF file `path` names: the file itself (ending in .gguf), or the only
    .gguf in a directory without config.json. None when `path` is neither; a
    directory holding several raises ValueError naming them."""
    path = os.path.expanduser(str(path))
    if os.path.isfile(path):
        return path if path.lower().endswith(".gguf") else None
    if not os.path.isdir(path) or os.path.exists(os.path.join(path, "config.json")):
        return None
    found = sorted(f for f in os.listdir(path) if f.lower().endswith(".gguf") and os.path.isfile(os.path.join(path, f)))
    if len(found) > 1:
        raise ValueError(f"{path!r} holds several GGUF files ({', '.join(found)}); pass the one to load")
    return os.path.join(path, found[0]) if found else None


# ---------------------------------------------------------------------------
# metadata -> Hugging Face config dict


def _int(v):
    if isinstance(v, np.ndarray):  # per-layer arrays (a few models); jaxar needs one value
        if v.size and np.all(v == v.flat[0]):
            return int(v.flat[0])
        raise ConfigError(f"per-layer value {v.tolist()} is not supported (jaxar needs the same value in every layer)")
    return None if v is None else int(v)


def _special_ids(md: dict) -> dict:
    ids = {}
    for hf_key, key in (("bos_token_id", "bos_token_id"), ("pad_token_id", "padding_token_id")):
        v = md.get(f"tokenizer.ggml.{key}")
        ids[hf_key] = None if v is None else int(v)
    eos = [int(md[f"tokenizer.ggml.{k}"]) for k in ("eos_token_id", "eot_token_id", "eom_token_id")
           if md.get(f"tokenizer.ggml.{k}") is not None]
    eos = list(dict.fromkeys(eos))
    ids["eos_token_id"] = None if not eos else (eos[0] if len(eos) == 1 else eos)
    return ids


def _llama3_rope_scaling(factors: np.ndarray, head_dim: int, theta: float, source: str) -> Optional[dict]:
    """Llama 3.1's rope scaling from llama.cpp's `rope_freqs` tensor (the per-frequency
    wavelength multipliers), if they follow Llama 3's formula with its usual constants."""
    factor = float(np.max(factors))
    if np.all(factors == 1.0):
        return None
    inv_freq = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    # Llama 3.x ships low 1, high 4, 8192 positions; the others are tried for smaller variants.
    candidates = [(low, high, 2 ** k) for low, high in ((1.0, 4.0), (1.0, 2.0), (2.0, 4.0)) for k in range(4, 21)]
    for low, high, original in sorted(candidates, key=lambda c: (c != (1.0, 4.0, 8192), c)):
        wavelen = 2 * np.pi / inv_freq
        low_wl, high_wl = original / low, original / high
        smooth = (original / wavelen - low) / (high - low)
        expect = np.where(wavelen < high_wl, 1.0,
                          np.where(wavelen > low_wl, factor, 1.0 / ((1 - smooth) / factor + smooth)))
        if factors.shape == expect.shape and np.allclose(factors, expect, rtol=1e-4):
            return {"rope_type": "llama3", "factor": factor, "low_freq_factor": low, "high_freq_factor": high,
                    "original_max_position_embeddings": original}
    raise ConfigError(f"{source}: the rope_freqs tensor does not match Llama 3's rope scaling; "
                      "custom per-frequency rope factors are not supported")


def hf_config_from_gguf(file: GGUFFile) -> dict:
    """A Hugging Face config.json dict for the model in `file`."""
    md, source = file.metadata, file.path
    arch = file.architecture
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ConfigError(f"{source}: GGUF architecture {arch!r} is not supported; jaxar loads "
                          f"{', '.join(SUPPORTED_ARCHITECTURES)}")

    def get(key, default=None, required=True):
        v = md.get(f"{arch}.{key}", default)
        if v is None and required:
            raise ConfigError(f"{source}: metadata {arch}.{key} is missing")
        return v

    embed = file.tensors.get("token_embd.weight")
    tokens = md.get("tokenizer.ggml.tokens")
    vocab = get("vocab_size", None, required=False)
    if vocab is None:
        vocab = embed.shape[0] if embed is not None else (len(tokens) if tokens is not None else None)
    if vocab is None:
        raise ConfigError(f"{source}: cannot tell the vocabulary size (no {arch}.vocab_size, no token_embd.weight)")
    d = _int(get("embedding_length"))
    n_heads = _int(get("attention.head_count"))
    out = dict(vocab_size=int(vocab), tie_word_embeddings="output.weight" not in file.tensors, **_special_ids(md))
    if arch == "gpt2":
        out.update(model_type="gpt2", n_embd=d, n_layer=_int(get("block_count")), n_head=n_heads,
                   n_inner=_int(get("feed_forward_length", 4 * d)), n_positions=_int(get("context_length")),
                   layer_norm_epsilon=float(get("attention.layer_norm_epsilon", 1e-5)),
                   activation_function="gelu_new")
        return out
    n_kv = _int(get("attention.head_count_kv", n_heads))
    head_dim = _int(get("attention.key_length", None, required=False)) or d // n_heads
    value_dim = _int(get("attention.value_length", None, required=False)) or head_dim
    rope_dim = _int(get("rope.dimension_count", None, required=False)) or head_dim
    if value_dim != head_dim or rope_dim != head_dim:
        raise ConfigError(f"{source}: key/value/rotary dimensions {head_dim}/{value_dim}/{rope_dim} differ; "
                          "jaxar needs one head_dim and full rotary embeddings")
    theta = float(get("rope.freq_base", 10000.0))
    out.update(model_type=arch, hidden_size=d, num_hidden_layers=_int(get("block_count")),
               num_attention_heads=n_heads, num_key_value_heads=n_kv, head_dim=head_dim,
               intermediate_size=_int(get("feed_forward_length")),
               max_position_embeddings=_int(get("context_length", 2048)),
               rms_norm_eps=float(get("attention.layer_norm_rms_epsilon", 1e-6)), rope_theta=theta,
               hidden_act="silu", mlp_bias="blk.0.ffn_gate.bias" in file.tensors)
    kind = get("rope.scaling.type", None, required=False)
    if kind not in (None, "none"):
        if kind != "linear":
            raise ConfigError(f"{source}: rope scaling {kind!r} is not supported (jaxar reads linear and llama3)")
        out["rope_scaling"] = {"rope_type": "linear", "factor": float(get("rope.scaling.factor"))}
    if "rope_freqs.weight" in file.tensors:
        scaling = _llama3_rope_scaling(file.read("rope_freqs.weight").astype(np.float64), head_dim, theta, source)
        if scaling is not None:
            out["rope_scaling"] = scaling
    if arch == "llama":
        out["attention_bias"] = "blk.0.attn_q.bias" in file.tensors
    else:
        out.update(use_sliding_window=False, sliding_window=None)
    return out


# ---------------------------------------------------------------------------
# tensors -> Hugging Face tensor names

_LLAMA_NAMES = {
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}
_GPT2_NAMES = {
    "attn_norm": "ln_1", "ffn_norm": "ln_2", "attn_qkv": "attn.c_attn", "attn_output": "attn.c_proj",
    "ffn_up": "mlp.c_fc", "ffn_down": "mlp.c_proj",
}
_GLOBAL_NAMES = {
    "llama": {"token_embd": "embed_tokens", "output_norm": "norm", "output": "lm_head"},
    "gpt2": {"token_embd": "wte", "position_embd": "wpe", "output_norm": "ln_f", "output": "lm_head"},
}
_BLOCK = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)$")


def _unpermute_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's q/k permutation: per head, rows [x0, x1, ..., y0, y1, ...]
    (Hugging Face's rotate-half layout) were written as [x0, y0, x1, y1, ...]."""
    rows = w.shape[0]
    return w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _hf_name(name: str, arch: str, source: str) -> Optional[str]:
    if name == "rope_freqs.weight":
        return None  # read into the config
    globals_ = _GLOBAL_NAMES["gpt2" if arch == "gpt2" else "llama"]
    stem, _, suffix = name.rpartition(".")
    if stem in globals_ and suffix in ("weight", "bias"):
        return f"{globals_[stem]}.{suffix}"
    m = _BLOCK.match(name)
    table = _GPT2_NAMES if arch == "gpt2" else _LLAMA_NAMES
    if m and m.group(2) in table:
        prefix = "h" if arch == "gpt2" else "layers"
        return f"{prefix}.{m.group(1)}.{table[m.group(2)]}.{m.group(3)}"
    raise CheckpointError(f"{source}: unexpected tensor {name!r} for a GGUF {arch!r} model "
                          "(jaxar would ignore it and compute something else)")


def hf_tensors_from_gguf(file: GGUFFile, hf_config: dict, *, progress: Optional[bool] = None
                         ) -> Dict[str, np.ndarray]:
    """Dequantized float32 tensors under Hugging Face names (without the model. prefix),
    in Hugging Face layouts: q/k rows unpermuted, GPT-2 Conv1D weights [in, out]."""
    arch = file.architecture
    names = list(file.tensors)
    if progress is None:
        progress = len(names) >= 100
    iterator = names
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(names, desc=f"reading {os.path.basename(file.path)}", unit="tensor", file=sys.stderr,
                        leave=False)
    out = {}
    for name in iterator:
        hf_name = _hf_name(name, arch, file.path)
        if hf_name is None:
            continue
        w = file.read(name)
        if arch == "llama" and (".attn_q." in name or ".attn_k." in name):
            heads = hf_config["num_attention_heads"] if ".attn_q." in name else hf_config["num_key_value_heads"]
            if w.shape[0] % (2 * heads):
                raise CheckpointError(f"{file.path}: tensor {name!r} of shape {w.shape} does not split into "
                                      f"{heads} heads of rotary pairs")
            w = _unpermute_rows(w, heads)
        if arch == "gpt2" and name.endswith(".weight") and any(
                f".{k}." in name for k in ("attn_qkv", "attn_output", "ffn_up", "ffn_down")):
            w = w.T  # llama.cpp stores Conv1D weights as [out, in]
        out[hf_name] = w
    return out


def load_gguf(path: str, *, progress: Optional[bool] = None) -> Tuple[ModelConfig, dict]:
    """`(config, params)` (float32 numpy) of the model in a GGUF file."""
    file = read_gguf(path)
    hf_config = hf_config_from_gguf(file)
    config = hf.config_from_hf(hf_config, source=file.path)
    tensors = hf_tensors_from_gguf(file, hf_config, progress=progress)
    params = hf.params_from_hf(tensors, config, source=file.path)
    return config, params


__all__ = [
    "GGUFFile",
    "SUPPORTED_ARCHITECTURES",
    "TensorInfo",
    "find_gguf",
    "hf_config_from_gguf",
    "hf_tensors_from_gguf",
    "load_gguf",
    "read_gguf",
]
