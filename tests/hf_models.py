"""Tiny random Hugging Face models for the tests (built from configs, never downloaded)."""

from __future__ import annotations

import numpy as np
import torch
import transformers

# name -> (config class, model class, config kwargs)
FAMILIES = {
    "llama_gqa": (transformers.LlamaConfig, transformers.LlamaForCausalLM, dict(
        vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=False, eos_token_id=2)),
    "llama_tied_mha_theta": (transformers.LlamaConfig, transformers.LlamaForCausalLM, dict(
        vocab_size=61, hidden_size=24, intermediate_size=40, num_hidden_layers=3, num_attention_heads=3,
        num_key_value_heads=3, max_position_embeddings=64, tie_word_embeddings=True, rope_theta=500000.0,
        rms_norm_eps=1e-5)),
    "llama_mqa_llama3_bias": (transformers.LlamaConfig, transformers.LlamaForCausalLM, dict(
        vocab_size=50, hidden_size=40, intermediate_size=36, num_hidden_layers=2, num_attention_heads=8,
        num_key_value_heads=1, head_dim=6, max_position_embeddings=256, attention_bias=True, mlp_bias=True,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 16})),
    "gpt2": (transformers.GPT2Config, transformers.GPT2LMHeadModel, dict(
        vocab_size=83, n_embd=36, n_layer=2, n_head=3, n_inner=52, n_positions=64, bos_token_id=0,
        eos_token_id=1)),
    "gpt2_default_inner": (transformers.GPT2Config, transformers.GPT2LMHeadModel, dict(
        vocab_size=64, n_embd=16, n_layer=1, n_head=2, n_positions=32, activation_function="gelu",
        bos_token_id=0, eos_token_id=0)),
    "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM, dict(
        vocab_size=71, hidden_size=48, intermediate_size=64, num_hidden_layers=2, num_attention_heads=6,
        num_key_value_heads=2, max_position_embeddings=128, rope_theta=1e6, tie_word_embeddings=True)),
    "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM, dict(
        vocab_size=55, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, sliding_window=None)),
}


def make_hf_model(name: str, seed: int = 0):
    """A tiny transformers model with every parameter random (biases and norm
    scales included, so the conversion of each tensor is exercised)."""
    config_cls, model_cls, kwargs = FAMILIES[name]
    torch.manual_seed(seed)
    model = model_cls(config_cls(**kwargs)).eval().float()
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if "norm" in pname or "ln_" in pname:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            else:
                p.copy_(0.2 * torch.randn_like(p))
    return model


def hf_logits(model, tokens: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.as_tensor(np.asarray(tokens), dtype=torch.long)).logits.float().numpy()


def max_rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / (np.max(np.abs(b)) + 1e-12))
