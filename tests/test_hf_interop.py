"""jaxar.from_pretrained / save_pretrained against Hugging Face transformers on the same weights."""

import json
import os

import numpy as np
import pytest
import torch
import transformers

import jaxar
from jaxar.convert.hf import CheckpointError
from tests.hf_models import FAMILIES, hf_logits, make_hf_model, max_rel_err


def _random_tokens(vocab, shape, seed=0):
    return np.random.default_rng(seed).integers(0, vocab, size=shape, dtype=np.int64)


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_from_pretrained_matches_transformers_logits(tmp_path, name):
    model = make_hf_model(name)
    model.save_pretrained(tmp_path)
    config, params = jaxar.from_pretrained(str(tmp_path))
    tokens = _random_tokens(config.vocab_size, (3, 19), seed=1)
    logits, cache = jaxar.forward(params, tokens, config=config)
    assert cache is None
    assert logits.shape == (3, 19, config.vocab_size)
    assert max_rel_err(logits, hf_logits(model, tokens)) < 1e-3


@pytest.mark.parametrize("name", ["llama_gqa", "gpt2", "qwen2", "llama_mqa_llama3_bias"])
def test_save_pretrained_round_trip_through_transformers(tmp_path, name):
    model = make_hf_model(name, seed=3)
    model.save_pretrained(tmp_path / "hf")
    config, params = jaxar.from_pretrained(str(tmp_path / "hf"))
    jaxar.save_pretrained(config, params, str(tmp_path / "out"))
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "out")).eval().float()
    tokens = _random_tokens(config.vocab_size, (2, 11), seed=4)
    assert max_rel_err(hf_logits(reloaded, tokens), hf_logits(model, tokens)) < 1e-5
    # ... and jaxar reads its own export back identically.
    config2, params2 = jaxar.from_pretrained(str(tmp_path / "out"))
    assert config2 == config
    np.testing.assert_array_equal(jaxar.forward(params2, tokens, config=config2)[0],
                                  jaxar.forward(params, tokens, config=config)[0])


def test_native_jaxar_model_exports_to_transformers(tmp_path):
    config = jaxar.ModelConfig.llama(vocab_size=40, d_model=16, n_layers=2, n_heads=4, n_kv_heads=2, mlp_dim=24,
                                     initializer_range=0.3)
    params = jaxar.init_params(config, 7)
    jaxar.save_pretrained(config, params, str(tmp_path / "m"))
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "m")).eval().float()
    tokens = _random_tokens(40, (2, 9))
    assert max_rel_err(jaxar.forward(params, tokens, config=config)[0], hf_logits(hf_model, tokens)) < 1e-3


def test_sharded_checkpoint_loads(tmp_path):
    model = make_hf_model("llama_gqa", seed=5)
    config, params = jaxar.from_pretrained(_save(model, tmp_path / "hf"))
    jaxar.save_pretrained(config, params, str(tmp_path / "sharded"), max_shard_bytes=20_000)
    files = os.listdir(tmp_path / "sharded")
    assert "model.safetensors.index.json" in files and sum(f.endswith(".safetensors") for f in files) > 2
    hf_sharded = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "sharded")).eval().float()
    config2, params2 = jaxar.from_pretrained(str(tmp_path / "sharded"))
    tokens = _random_tokens(config.vocab_size, (2, 8))
    assert max_rel_err(jaxar.forward(params2, tokens, config=config2)[0], hf_logits(hf_sharded, tokens)) < 1e-3


def test_old_top_level_rope_theta_field_is_read(tmp_path):
    model = make_hf_model("qwen2", seed=2)
    model.save_pretrained(tmp_path)
    cfg_path = tmp_path / "config.json"
    hf_cfg = json.loads(cfg_path.read_text())
    theta = hf_cfg.pop("rope_parameters")["rope_theta"]
    hf_cfg["rope_theta"] = theta  # the pre-`rope_parameters` layout
    cfg_path.write_text(json.dumps(hf_cfg))
    config, params = jaxar.from_pretrained(str(tmp_path))
    assert config.rope_theta == theta == 1e6
    tokens = _random_tokens(config.vocab_size, (2, 13))
    assert max_rel_err(jaxar.forward(params, tokens, config=config)[0], hf_logits(model, tokens)) < 1e-3


def test_bfloat16_forward_is_close_to_float32(tmp_path):
    model = make_hf_model("llama_gqa")
    config, params = jaxar.from_pretrained(_save(model, tmp_path))
    config16, params16 = jaxar.from_pretrained(str(tmp_path), dtype="bfloat16")
    assert params16["embed"]["embedding"].dtype == np.dtype("bfloat16")
    tokens = _random_tokens(config.vocab_size, (2, 10))
    ref = jaxar.forward(params, tokens, config=config)[0]
    out = jaxar.forward(params16, tokens, config=config16)[0]
    assert max_rel_err(out, ref) < 0.05


def _save(model, path):
    model.save_pretrained(path)
    return str(path)


# --- errors -------------------------------------------------------------------


def test_unsupported_model_type_is_named(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert", "vocab_size": 10}))
    with pytest.raises(jaxar.ConfigError, match="model_type 'bert' is not supported"):
        jaxar.from_pretrained(str(tmp_path))


def test_missing_directory_and_missing_weights(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        jaxar.from_pretrained(str(tmp_path / "nope"))
    model = make_hf_model("gpt2")
    model.save_pretrained(tmp_path)
    os.remove(tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        jaxar.from_pretrained(str(tmp_path))


def test_truncated_safetensors_is_reported_with_file_name(tmp_path):
    model = make_hf_model("llama_gqa")
    model.save_pretrained(tmp_path)
    f = tmp_path / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"model\.safetensors: file is truncated"):
        jaxar.from_pretrained(str(tmp_path))


def test_shape_mismatch_names_tensor_and_expected_shape(tmp_path):
    model = make_hf_model("llama_gqa")
    model.save_pretrained(tmp_path)
    cfg_path = tmp_path / "config.json"
    hf_cfg = json.loads(cfg_path.read_text())
    hf_cfg["intermediate_size"] = 50  # the file has 48
    cfg_path.write_text(json.dumps(hf_cfg))
    with pytest.raises(CheckpointError, match=r"'layers\.0\.mlp\.gate_proj\.weight' has shape \(48, 32\), expected \(50, 32\)"):
        jaxar.from_pretrained(str(tmp_path))


def test_missing_tensor_is_named(tmp_path):
    from safetensors.numpy import load_file, save_file

    model = make_hf_model("qwen2")
    model.save_pretrained(tmp_path)
    tensors = load_file(str(tmp_path / "model.safetensors"))
    del tensors["model.layers.1.self_attn.k_proj.bias"]
    save_file(tensors, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"'layers\.1\.self_attn\.k_proj\.bias' is missing \(expected shape \(16,\)\)"):
        jaxar.from_pretrained(str(tmp_path))


def test_save_pretrained_never_overwrites_silently(tmp_path):
    config = jaxar.ModelConfig.gpt2(vocab_size=20, d_model=8, n_layers=1, n_heads=2, mlp_dim=16, max_seq_len=16)
    params = jaxar.init_params(config, 0)
    out = tmp_path / "model"
    jaxar.save_pretrained(config, params, str(out))
    before = (out / "model.safetensors").read_bytes()
    with pytest.raises(FileExistsError, match="overwrite=True"):
        jaxar.save_pretrained(config, jaxar.init_params(config, 1), str(out))
    assert (out / "model.safetensors").read_bytes() == before
    jaxar.save_pretrained(config, jaxar.init_params(config, 1), str(out), overwrite=True)
    assert (out / "model.safetensors").read_bytes() != before
