"""GGUF in: weights, config, tokenizer and chat template, against transformers' reading of the same files
and llama.cpp's tokenizer test vectors."""

import os

import gguf
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tokenizers
import torch
import transformers

import jaxar
from jaxar.config import ConfigError
from jaxar.convert.hf import CheckpointError
from jaxar.tokenizer import gguf_tokenizer, load_tokenizer
from tests import vocab
from tests.hf_models import FAMILIES, hf_logits, make_hf_model

TOKENS = np.array([[5, 17, 3, 40, 22, 9, 31, 2, 11], [1, 2, 3, 4, 5, 6, 7, 8, 9]])


def max_row_rel_err(a, b) -> float:
    """Largest per-row error relative to that row's largest logit."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.max(np.abs(a - b), axis=-1) / np.max(np.abs(b), axis=-1)))


# ---------------------------------------------------------------------------
# tiny GGUFs written the way llama.cpp's convert_hf_to_gguf.py writes them


def _permute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """convert_hf_to_gguf.py's LlamaModel.permute (independent of jaxar's inverse)."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _llama3_factors(scaling: dict, head_dim: int) -> np.ndarray:
    """convert_hf_to_gguf.py's LlamaModel rope_freqs for rope_type llama3."""
    import math

    freqs = 1.0 / (scaling["rope_theta"] ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim))
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    old = scaling["original_max_position_embeddings"]
    out = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < old / high:
            out.append(1.0)
        elif wavelen > old / low:
            out.append(factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.asarray(out, np.float32)


def _tokenizer_fields(w: gguf.GGUFWriter, vocab_size: int):
    tokens = sorted(tokenizers.pre_tokenizers.ByteLevel.alphabet())[:vocab_size - 1] + ["<|endoftext|>"]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([1] * (vocab_size - 1) + [3])
    w.add_bos_token_id(vocab_size - 1)
    w.add_eos_token_id(vocab_size - 1)
    w.add_chat_template("{% for m in messages %}{{ m['content'] }}{% endfor %}")


def write_gguf(model, path: str, *, quantize: dict = None, architecture: str = None) -> str:
    """A GGUF of a tiny transformers model, tensor names and layouts as llama.cpp's converter writes
    them; `quantize` maps GGUF tensor names to a ggml type (quantized with gguf.quants)."""
    cfg = model.config
    sd = {k: v.detach().numpy().astype(np.float32) for k, v in model.state_dict().items()}
    arch = architecture or {"llama": "llama", "qwen2": "qwen2", "gpt2": "gpt2"}[cfg.model_type]
    w = gguf.GGUFWriter(path, arch)
    w.add_name("tiny")
    tensors = {}
    if cfg.model_type == "gpt2":
        w.add_context_length(cfg.n_positions)
        w.add_embedding_length(cfg.n_embd)
        w.add_feed_forward_length(cfg.n_inner or 4 * cfg.n_embd)
        w.add_block_count(cfg.n_layer)
        w.add_head_count(cfg.n_head)
        w.add_layer_norm_eps(cfg.layer_norm_epsilon)
        w.add_file_type(gguf.LlamaFileType.ALL_F32)
        tensors["token_embd.weight"] = sd["transformer.wte.weight"]
        tensors["position_embd.weight"] = sd["transformer.wpe.weight"]
        tensors["output.weight"] = sd["lm_head.weight"]  # llama.cpp writes GPT-2's tied head explicitly
        for i in range(cfg.n_layer):
            h = f"transformer.h.{i}."
            for src, dst, transpose in (("ln_1", "attn_norm", False), ("ln_2", "ffn_norm", False),
                                        ("attn.c_attn", "attn_qkv", True), ("attn.c_proj", "attn_output", True),
                                        ("mlp.c_fc", "ffn_up", True), ("mlp.c_proj", "ffn_down", True)):
                weight = sd[h + src + ".weight"]
                tensors[f"blk.{i}.{dst}.weight"] = weight.T if transpose else weight
                tensors[f"blk.{i}.{dst}.bias"] = sd[h + src + ".bias"]
        tensors["output_norm.weight"] = sd["transformer.ln_f.weight"]
        tensors["output_norm.bias"] = sd["transformer.ln_f.bias"]
    else:
        H, K = cfg.num_attention_heads, cfg.num_key_value_heads
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // H
        w.add_context_length(cfg.max_position_embeddings)
        w.add_embedding_length(cfg.hidden_size)
        w.add_feed_forward_length(cfg.intermediate_size)
        w.add_block_count(cfg.num_hidden_layers)
        w.add_head_count(H)
        w.add_head_count_kv(K)
        w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
        w.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
        w.add_rope_dimension_count(head_dim)
        if head_dim != cfg.hidden_size // H:
            w.add_key_length(head_dim)
            w.add_value_length(head_dim)
        w.add_file_type(gguf.LlamaFileType.ALL_F32)
        scaling = cfg.rope_parameters
        if scaling.get("rope_type") == "llama3":  # the converter's rope_freqs tensor (wavelength multipliers)
            tensors["rope_freqs.weight"] = _llama3_factors(scaling, head_dim)
        tensors["token_embd.weight"] = sd["model.embed_tokens.weight"]
        if not cfg.tie_word_embeddings:
            tensors["output.weight"] = sd["lm_head.weight"]
        tensors["output_norm.weight"] = sd["model.norm.weight"]
        names = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
                 "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
                 "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
                 "mlp.down_proj": "ffn_down"}
        for key, value in sd.items():
            if not key.startswith("model.layers."):
                continue
            i, rest = key[len("model.layers."):].split(".", 1)
            module, suffix = rest.rsplit(".", 1)
            if arch == "llama" and module in ("self_attn.q_proj", "self_attn.k_proj"):
                value = _permute(value, H if module == "self_attn.q_proj" else K)
            tensors[f"blk.{i}.{names[module]}.{suffix}"] = value
    _tokenizer_fields(w, cfg.vocab_size)
    for name, value in tensors.items():
        qtype = (quantize or {}).get(name)
        if qtype is None:
            w.add_tensor(name, np.ascontiguousarray(value))
        else:
            w.add_tensor(name, gguf.quants.quantize(value, qtype), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def transformers_gguf(path: str):
    folder, name = os.path.split(path)
    return transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()


def jaxar_logits(config, params, tokens):
    logits, _ = jaxar.forward(params, jnp.asarray(tokens), config=config)
    return np.asarray(logits)


def _gpt2_for_gguf():
    # transformers reads GPT-2's feed_forward_length and context_length into fields GPT2Config does
    # not use, so the tiny model keeps GPT-2's defaults there (n_inner = 4 * n_embd, 1024 positions).
    _, model_cls, kwargs = FAMILIES["gpt2"]
    torch.manual_seed(0)
    model = model_cls(transformers.GPT2Config(**{**kwargs, "n_inner": None, "n_positions": 1024})).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1.0 + 0.1 * torch.randn_like(p) if "ln_" in name else 0.2 * torch.randn_like(p))
    return model


@pytest.mark.parametrize("family", ["qwen2", "gpt2", "llama_gqa"])
def test_tiny_gguf_logits_match_transformers_reading(family, tmp_path):
    model = _gpt2_for_gguf() if family == "gpt2" else make_hf_model(family)
    # llama_gqa: the q/k rows are permuted in the file, and two tensors are quantized.
    quantize = {"llama_gqa": {"blk.0.attn_q.weight": gguf.GGMLQuantizationType.Q8_0,
                              "blk.1.attn_k.weight": gguf.GGMLQuantizationType.Q4_0},
                "gpt2": {"blk.1.ffn_up.weight": gguf.GGMLQuantizationType.F16}}.get(family)
    path = write_gguf(model, str(tmp_path / f"{family}.gguf"), quantize=quantize)
    config, params = jaxar.from_pretrained(path)
    reference = transformers_gguf(path)
    ours = jaxar_logits(config, params, TOKENS)
    assert max_row_rel_err(ours, hf_logits(reference, TOKENS)) < 1e-5
    if quantize is None:  # nothing lost: the original model too
        assert max_row_rel_err(ours, hf_logits(model, TOKENS)) < 1e-5
    elif family == "llama_gqa":  # Q4_0 changed the logits, so the check against the reading is not vacuous
        assert max_row_rel_err(ours, hf_logits(model, TOKENS)) > 1e-3
    assert config.tie_embeddings == (family == "qwen2")
    assert config.eos_token_id == (model.config.vocab_size - 1,)


def test_llama3_rope_scaling_biases_and_head_dim_from_gguf(tmp_path):
    """MQA, head_dim != d_model / n_heads, q/k biases (permuted like the weights), MLP biases and Llama 3
    rope scaling recovered from the rope_freqs tensor: logits equal the original transformers model's."""
    model = make_hf_model("llama_mqa_llama3_bias")
    path = write_gguf(model, str(tmp_path / "m.gguf"))
    config, params = jaxar.from_pretrained(path)
    assert config.rope_scaling_dict == {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                        "high_freq_factor": 4.0, "original_max_position_embeddings": 16}
    assert (config.dim_per_head, config.num_kv_heads, config.qkv_bias, config.mlp_bias) == (6, 1, True, True)
    long_tokens = np.arange(40)[None] % 50  # past the original 16 positions, where the scaling matters
    assert max_row_rel_err(jaxar_logits(config, params, long_tokens), hf_logits(model, long_tokens)) < 1e-5


def test_tiny_quantized_llama_gguf_greedy_matches_transformers(tmp_path):
    """16 greedy tokens from jaxar's generate (prefill + cached decode) on a permuted, partly Q8_0 Llama
    GGUF are transformers' greedy tokens on its reading of the file."""
    from jaxar.decode.generate import generate

    path = write_gguf(make_hf_model("llama_gqa"), str(tmp_path / "m.gguf"),
                      quantize={"blk.0.attn_k.weight": gguf.GGMLQuantizationType.Q8_0})
    config, params = jaxar.from_pretrained(path)
    reference = transformers_gguf(path)
    prompts = TOKENS[:, :6]
    out = generate(params, jnp.asarray(prompts), jnp.asarray([6, 6]), config=config, max_new_tokens=16, eos_ids=[])
    with torch.no_grad():
        ref = reference.generate(torch.as_tensor(prompts), max_new_tokens=16, min_new_tokens=16, do_sample=False,
                                 eos_token_id=None, pad_token_id=0)
    assert np.asarray(out.tokens).tolist() == ref[:, 6:].tolist()


def test_gguf_directory_loads_like_the_file(tmp_path):
    path = write_gguf(make_hf_model("qwen2"), str(tmp_path / "m.gguf"))
    config, params = jaxar.from_pretrained(path)
    config_dir, params_dir = jaxar.from_pretrained(str(tmp_path))
    assert config_dir == config
    jax.tree_util.tree_map(np.testing.assert_array_equal, params_dir, params)
    tok = load_tokenizer(str(tmp_path))
    assert tok.chat_template == "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    assert tok.eos_id == tok.token_to_id("<|endoftext|>") == 70
    (tmp_path / "other.gguf").write_bytes(b"")
    with pytest.raises(ValueError, match="several GGUF files"):
        jaxar.from_pretrained(str(tmp_path))


def test_truncated_gguf_is_one_line_error(tmp_path):
    path = write_gguf(make_hf_model("qwen2"), str(tmp_path / "m.gguf"))
    data = open(path, "rb").read()
    for cut in (len(data) - 100, 300, 10):
        bad = tmp_path / f"cut{cut}.gguf"
        bad.write_bytes(data[:cut])
        with pytest.raises(CheckpointError, match="truncated|not a GGUF") as e:
            jaxar.from_pretrained(str(bad))
        assert "\n" not in str(e.value) and str(bad) in str(e.value)
    bad = tmp_path / "junk.gguf"
    bad.write_bytes(b"PK\x03\x04" + bytes(100))
    with pytest.raises(CheckpointError, match="not a GGUF file"):
        jaxar.from_pretrained(str(bad))


def test_unsupported_architecture_is_one_line_error(tmp_path):
    path = write_gguf(make_hf_model("qwen2"), str(tmp_path / "m.gguf"), architecture="falcon")
    with pytest.raises(ConfigError, match="architecture 'falcon' is not supported; jaxar loads llama, qwen2, gpt2"):
        jaxar.from_pretrained(path)


# ---------------------------------------------------------------------------
# the real SmolLM2-135M-Instruct Q4_1 GGUF


@pytest.fixture(scope="module")
def smollm2_from_gguf(smollm2_gguf):
    return jaxar.from_pretrained(smollm2_gguf)


def test_smollm2_gguf_params_equal_transformers_dequantization(smollm2_from_gguf, smollm2_jaxar):
    config, params = smollm2_from_gguf
    ref_config, ref_params = smollm2_jaxar  # transformers' float32 reading of the same file, via safetensors
    assert config == ref_config
    assert jax.tree_util.tree_structure(params) == jax.tree_util.tree_structure(ref_params)
    jax.tree_util.tree_map(np.testing.assert_array_equal, params, ref_params)


def test_smollm2_gguf_logits_match_transformers(smollm2_from_gguf, smollm2_torch, smollm2_gguf):
    config, params = smollm2_from_gguf
    config = config.replace(scan_layers=True)  # same numerics as unrolled; compiles in a fraction of the time
    tok = load_tokenizer(smollm2_gguf)
    prompts = [tok.encode("The capital of France is"), tok.encode("def fibonacci(n):\n    if n < 2:")]
    width = max(len(p) for p in prompts)
    tokens = np.array([p + [0] * (width - len(p)) for p in prompts])  # right padding: causal, so harmless
    ours = jaxar_logits(config, params, tokens)
    for i, p in enumerate(prompts):
        assert max_row_rel_err(ours[i, :len(p)], hf_logits(smollm2_torch, np.array([p]))[0]) < 1e-5


def test_smollm2_gguf_tokenizer_matches_transformers(smollm2_gguf, smollm2_hf_dir):
    tok = load_tokenizer(smollm2_gguf)
    # transformers' GGUF tokenizer of the same file (saved in the fixture directory)
    ref = transformers.AutoTokenizer.from_pretrained(smollm2_hf_dir)
    text = ("Héllo wörld! Ça va? 日本語のテキスト, emoji 🦙🚀😶‍🌫️ and русский текст, ελληνικά, العربية.\n\n"
            "def f(x):\n    return x**2  # square 1234567\n\tTabs\there   <|im_start|>user\nhi<|im_end|>\n"
            "   trailing spaces   \n\n\n$ ls -la | grep '\\.py$' && echo \"done\" 3.14159e-10 0x1F")
    assert tok.encode(text) == ref.encode(text, add_special_tokens=False)
    assert tok.decode(tok.encode(text)) == ref.decode(ref.encode(text, add_special_tokens=False),
                                                      skip_special_tokens=True)
    assert (tok.vocab_size, tok.bos_id, tok.eos_id, tok.pad_id) == (49152, 1, 2, 2)
    assert tok.add_bos is False and tok.encode_prompt("hi") == ref("hi").input_ids
    with open(os.path.join(smollm2_hf_dir, "chat_template.jinja")) as f:
        assert tok.chat_template == f.read()


# ---------------------------------------------------------------------------
# llama.cpp's tokenizer test vectors


def test_gguf_tokenizer_saves_and_reloads(tmp_path):
    tok = gguf_tokenizer(vocab.vocab_path("llama-spm"))
    assert tok.hf_tokenizer.encode("hi").ids[0] == tok.bos_id == 1  # the post-processor adds BOS too
    tok.save(tmp_path / "tok")
    again = load_tokenizer(tmp_path / "tok")
    text = "Hello 🦙 world 12345 </s> ok"
    assert again.encode(text) == tok.encode(text) and again.encode_prompt(text) == tok.encode_prompt(text)
    assert (again.bos_id, again.eos_id, again.add_bos, again.eos_ids) == (tok.bos_id, tok.eos_id, True, tok.eos_ids)


@pytest.mark.parametrize("name", ["gpt-2", "qwen2", "llama-bpe", "starcoder", "llama-spm"])
def test_tokenizer_matches_llama_cpp_vectors(name):
    tok = gguf_tokenizer(vocab.vocab_path(name))
    cases = vocab.vectors(name)
    assert len(cases) > 40
    mismatches = [(text, tok.encode(text), ids) for text, ids in cases if tok.encode(text) != ids]
    assert not mismatches, mismatches[:3]
    # llama.cpp adds BOS for the SentencePiece vocabulary (the file says so) and for llama-bpe (its default).
    assert tok.add_bos == (name in ("llama-bpe", "llama-spm"))
    if name != "llama-spm":  # byte-level BPE decodes back to the text exactly
        for text, ids in cases:
            assert tok.decode(ids) == text
