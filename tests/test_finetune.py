"""Fine-tuning: init_from a pretrained model, chat JSONL with the loss on assistant tokens only,
LoRA (only adapters train, merged on save), and the one-line report of a damaged checkpoint."""

from __future__ import annotations

import json
import os
import shutil
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

import jaxar
from jaxar.config import ConfigError, ModelConfig
from jaxar.models.transformer import forward, init_params
from jaxar.train import checkpoint as ckpt
from jaxar.train import lora as lora_lib
from jaxar.train.config import load_run_config
from jaxar.train.data import Chat, DataConfig, DataError, load_documents, make_train_iterator
from jaxar.train.trainer import cross_entropy_sums, train
from tests.hf_models import hf_logits, max_rel_err

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "configs", "tiny.yaml")
STEPS = 6
TARGETS = "[q_proj,v_proj,o_proj,gate_proj,down_proj]"


def random_params(config: ModelConfig, seed: int = 0) -> dict:
    """Random params of `config` drawn by numpy (no init program to compile): N(0, 0.1), norm scales near 1."""
    rng = np.random.default_rng(seed)
    shapes = jax.eval_shape(lambda: init_params(config, jax.random.PRNGKey(0)))

    def draw(path, s):
        scale = str(getattr(path[-1], "key", "")) == "scale"
        x = (1.0 if scale else 0.0) + 0.1 * rng.standard_normal(s.shape)
        return jnp.asarray(x, s.dtype)

    return jax.tree_util.tree_map_with_path(draw, shapes)


def tree_equal(a, b) -> bool:
    la, lb = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
    return len(la) == len(lb) and all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(la, lb))


@pytest.fixture(scope="module")
def tiny_hf_dir(tmp_path_factory):
    """A random transformers Llama with tiny.yaml's architecture (257 byte ids fit its 300), saved as HF."""
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                                      tie_word_embeddings=False, rms_norm_eps=1e-6, rope_theta=20000.0,
                                      eos_token_id=256, bos_token_id=None)
    model = transformers.LlamaForCausalLM(config).eval().float()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1.0 + 0.1 * torch.randn_like(p) if "norm" in name else 0.1 * torch.randn_like(p))
    path = str(tmp_path_factory.mktemp("hf") / "tiny-llama")
    model.save_pretrained(path)
    return path


def lora_overrides(run_dir, hf_dir, *extra):
    return [f"run_dir={run_dir}", f"init_from={hf_dir}", "data.tokenizer=byte", f"train.steps={STEPS}",
            "train.checkpoint_every=3", "train.log_every=1", "train.eval_every=0", "train.progress_bar=false",
            "train.lr=3e-2", "train.warmup_steps=0", "train.eval_batches=1", "lora.rank=4", "lora.alpha=8",
            f"lora.targets={TARGETS}", *extra]


@pytest.fixture(scope="module")
def lora_run(tiny_hf_dir, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("lora") / "run"
    config = load_run_config(TINY, lora_overrides(run_dir, tiny_hf_dir))
    return config, train(config)


# ---------------------------------------------------------------------------
# LoRA as a parameter transform


def test_adapters_with_b_zero_reproduce_the_base_logits_exactly():
    config = ModelConfig.llama(vocab_size=50, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, mlp_dim=48,
                               max_seq_len=16)
    params = random_params(config)
    lora = lora_lib.LoraConfig(rank=4, targets=("q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj"))
    adapters = lora_lib.init_adapters(lora, params, jax.random.PRNGKey(1))
    merged = lora_lib.merge(params, adapters, lora)
    assert tree_equal(merged, params)
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 50, (2, 16)), jnp.int32)
    np.testing.assert_array_equal(np.asarray(forward(merged, tokens, config=config)[0]),
                                  np.asarray(forward(params, tokens, config=config)[0]))


def test_merge_is_w_plus_scaled_a_times_b_in_float64():
    config = ModelConfig.llama(vocab_size=50, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, mlp_dim=48,
                               max_seq_len=16)
    params = random_params(config)
    lora = lora_lib.LoraConfig(rank=3, alpha=6.0, targets=("o_proj", "k_proj"))
    adapters = lora_lib.init_adapters(lora, params, jax.random.PRNGKey(1))
    rng = np.random.default_rng(2)
    adapters = jax.tree_util.tree_map(lambda x: jnp.asarray(rng.normal(size=x.shape), jnp.float32), adapters)
    merged = lora_lib.merge(params, adapters, lora)
    for name, n_in in (("o_proj", 2), ("k_proj", 1)):
        w = np.asarray(params["layers"]["attn"][name]["kernel"], np.float64)
        a = np.asarray(adapters["layers"]["attn"][name]["a"], np.float64)
        b = np.asarray(adapters["layers"]["attn"][name]["b"], np.float64)
        L, r = a.shape[0], a.shape[-1]
        want = w + 2.0 * np.einsum("lir,lro->lio", a.reshape(L, -1, r), b.reshape(L, r, -1)).reshape(w.shape)
        np.testing.assert_allclose(np.asarray(merged["layers"]["attn"][name]["kernel"]), want, rtol=1e-5, atol=1e-5)
    # Everything else is the base, untouched.
    assert tree_equal(merged["layers"]["mlp"], params["layers"]["mlp"])
    assert tree_equal(merged["layers"]["attn"]["q_proj"], params["layers"]["attn"]["q_proj"])


def test_lora_trains_only_the_adapters_and_the_loss_falls(lora_run, tiny_hf_dir):
    config, result = lora_run
    # The model config is the checkpoint's (not tiny.yaml's defaults): rope theta and norm eps from config.json.
    assert config.model.rope_theta == 20000.0 and config.model.norm_eps == 1e-6 and config.model.vocab_size == 300
    _, base = jaxar.from_pretrained(tiny_hf_dir)
    state = result.state
    assert tree_equal(state.frozen, base)  # frozen: bit for bit the pretrained params
    adapter_shapes = sorted(x.shape for x in jax.tree_util.tree_leaves(state.params))
    opt_shapes = sorted(x.shape for x in jax.tree_util.tree_leaves(state.opt_state) if np.ndim(x) > 0)
    assert opt_shapes == sorted(adapter_shapes * 2)  # Adam's mu and nu of the adapters, nothing of the base
    losses = [result.losses[s] for s in sorted(result.losses)]
    assert len(losses) == STEPS and np.mean(losses[-2:]) < losses[0] - 0.3


def test_merged_export_loads_in_transformers_with_the_same_logits(lora_run, tiny_hf_dir):
    config, result = lora_run
    assert result.export_dir == os.path.join(str(config.run_dir), "hf")
    merged = jax.jit(lora_lib.merge, static_argnums=2)(result.state.frozen, result.state.params, config.lora)
    _, base = jaxar.from_pretrained(tiny_hf_dir)
    assert not tree_equal(merged, base)
    # from_pretrained of the run dir and of the export: the merged params.
    _, from_run = jaxar.from_pretrained(config.run_dir)
    _, from_export = jaxar.from_pretrained(result.export_dir)
    assert tree_equal(from_run, merged) and tree_equal(from_export, merged)
    tokens = np.random.default_rng(0).integers(0, 257, (2, 32))
    model = transformers.AutoModelForCausalLM.from_pretrained(result.export_dir, dtype=torch.float32).eval()
    ours = np.asarray(forward(merged, jnp.asarray(tokens, jnp.int32), config=config.model)[0])
    want = hf_logits(model, tokens)
    for row in range(2):
        assert max_rel_err(ours[row], want[row]) < 2e-5


def test_damaged_checkpoint_is_reported_in_one_line_and_lora_resume_is_exact(lora_run, tiny_hf_dir, tmp_path):
    config, result = lora_run
    run_dir = str(tmp_path / "run")
    shutil.copytree(config.run_dir, run_dir)
    newest = os.path.join(run_dir, "checkpoints", str(STEPS))
    for folder, _, files in os.walk(os.path.join(newest, "lora")):
        if os.path.basename(folder) != "d":
            continue
        for name in files:  # the adapters' array data (TensorStore's OCDBT data files): one byte flipped
            path = os.path.join(folder, name)
            with open(path, "r+b") as f:
                f.seek(os.path.getsize(path) // 2)
                byte = f.read(1)
                f.seek(-1, 1)
                f.write(bytes([byte[0] ^ 0xFF]))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _, params = ckpt.load_for_inference(run_dir)
    [w] = [w for w in caught if "damaged" in str(w.message)]
    text = str(w.message)
    assert "\n" not in text and len(text) < 400
    assert f"checkpoint step {STEPS} " in text and "(lora/" in text and text.endswith("loading step 3")

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        resumed = train(load_run_config(TINY, lora_overrides(run_dir, tiny_hf_dir)))
    damaged = [str(w.message) for w in caught if "damaged" in str(w.message)]
    assert len(damaged) == 1, damaged
    text = damaged[0]
    assert "\n" not in text and len(text) < 400
    assert text.startswith(f"checkpoint step {STEPS} in ") and text.endswith("resuming from step 3")
    assert "(lora/" in text and "checksum" in text  # what is wrong: an adapter array fails its checksum
    # The resumed LoRA run replays steps 4..6 exactly (adapters, optimizer and data position restored).
    assert sorted(resumed.losses) == list(range(4, STEPS + 1))
    assert all(resumed.losses[s] == result.losses[s] for s in resumed.losses)
    assert tree_equal(resumed.state.params, result.state.params)


# ---------------------------------------------------------------------------
# init_from configs


def test_init_from_takes_the_architecture_and_refuses_a_conflicting_one(tiny_hf_dir, tmp_path):
    base = [f"run_dir={tmp_path / 'r'}", f"init_from={tiny_hf_dir}", "data.tokenizer=byte"]
    config = load_run_config(TINY, base + ["model.remat=full", "model.dtype=bfloat16"])
    assert (config.model.remat, config.model.dtype, config.model.d_model) == ("full", "bfloat16", 32)
    with pytest.raises(ConfigError) as e:
        load_run_config(TINY, base + ["model.d_model=64"])
    message = str(e.value)
    assert "\n" not in message and "model.d_model=64" in message and "init_from" in message
    with pytest.raises(ConfigError, match="init_from=.*is not a Hugging Face directory"):
        load_run_config(TINY, [f"run_dir={tmp_path / 'r'}", f"init_from={tmp_path}", "data.tokenizer=byte"])


# ---------------------------------------------------------------------------
# Chat JSONL: the loss on assistant tokens only


CONVERSATIONS = [
    [{"role": "user", "content": "What is 12 + 30?"}, {"role": "assistant", "content": "12 + 30 = 42."}],
    [{"role": "system", "content": "Answer in one word."}, {"role": "user", "content": "Capital of France?"},
     {"role": "assistant", "content": "Paris"}, {"role": "user", "content": "And of Italy?"},
     {"role": "assistant", "content": "Rome"}],
    [{"role": "user", "content": "Reverse: a, b, c"}, {"role": "assistant", "content": "Reversed: c, b, a."}],
]


def reference_stream(hf_tokenizer):
    """(inputs, targets, target is an assistant token, conversation) of every pair, from transformers'
    apply_chat_template ids; assistant tokens found independently: after each "<|im_start|>assistant\\n"
    header up to and including the next <|im_end|>."""
    header = hf_tokenizer.encode("<|im_start|>assistant\n", add_special_tokens=False)
    im_end = hf_tokenizer.convert_tokens_to_ids("<|im_end|>")
    stream = []
    for c, messages in enumerate(CONVERSATIONS):
        ids = hf_tokenizer.apply_chat_template(messages, tokenize=True)
        ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
        assistant = np.zeros(len(ids), bool)
        i = 0
        while i < len(ids):
            if ids[i:i + len(header)] == header:
                j = i + len(header)
                while ids[j] != im_end:
                    j += 1
                assistant[i + len(header): j + 1] = True
                i = j
            i += 1
        stream += [(ids[k], ids[k + 1], bool(assistant[k + 1]), c) for k in range(len(ids) - 1)]
    return stream


def test_chat_loss_is_float64_cross_entropy_over_exactly_the_assistant_tokens(smollm2_hf_dir, tmp_path):
    path = tmp_path / "chat.jsonl"
    path.write_text("".join(json.dumps({"messages": m}) + "\n" for m in CONVERSATIONS))
    seq_len, batch_size = 40, 2
    data = DataConfig(source=str(path), tokenizer=smollm2_hf_dir, val_fraction=0.0, shuffle=False)
    docs = load_documents(data)
    assert all(isinstance(d, Chat) for d in docs) and [list(d) for d in docs] == CONVERSATIONS
    stream = reference_stream(transformers.AutoTokenizer.from_pretrained(smollm2_hf_dir))
    n_rows = -(-len(stream) // seq_len)
    it = make_train_iterator(data, seq_len=seq_len, global_batch_size=batch_size, seed=0)
    batches = [next(it) for _ in range(-(-n_rows // batch_size))]
    rows = [{k: b[k][i] for k in b} for b in batches for i in range(batch_size)][:n_rows]

    model = ModelConfig.llama(vocab_size=49152, d_model=16, n_layers=1, n_heads=2, n_kv_heads=1, mlp_dim=32,
                              max_seq_len=seq_len)
    params = random_params(model)
    segments = []  # (inputs, targets, is_assistant) of each packed segment, unpacked
    for r, row in enumerate(rows):
        pairs = stream[r * seq_len:(r + 1) * seq_len]
        n = len(pairs)
        # Row r holds exactly the next seq_len pairs of the stream, with the assistant targets masked in.
        np.testing.assert_array_equal(row["tokens"][:n], [p[0] for p in pairs])
        np.testing.assert_array_equal(row["targets"][:n], [p[1] for p in pairs])
        np.testing.assert_array_equal(row["loss_mask"][:n], [p[2] for p in pairs])
        convs = [p[3] for p in pairs]
        starts = [0] + [k for k in range(1, n) if convs[k] != convs[k - 1]] + [n]
        segments += [pairs[s:e] for s, e in zip(starts[:-1], starts[1:])]
    # Reference: each segment alone at positions 0.. (one row each, padded at the end, which a causal
    # model never sees), float64 log-softmax, cross-entropy summed over the assistant targets.
    inputs = np.zeros((len(segments), seq_len), np.int32)
    for i, seg in enumerate(segments):
        inputs[i, :len(seg)] = [p[0] for p in seg]
    logits = np.asarray(forward(params, jnp.asarray(inputs), config=model)[0], np.float64)
    want_sum, want_count = 0.0, 0
    for i, seg in enumerate(segments):
        logp = logits[i] - logits[i].max(-1, keepdims=True)
        logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
        for k, (_, target, is_assistant, _) in enumerate(seg):
            if is_assistant:
                want_sum -= logp[k, target]
                want_count += 1
    got_sum = got_count = 0.0
    for b in batches:
        total, count = cross_entropy_sums(params, {k: jnp.asarray(v) for k, v in b.items()}, model)
        got_sum, got_count = got_sum + float(total), got_count + float(count)
    assert got_count == want_count == sum(p[2] for p in stream) > 0
    assert abs(got_sum - want_sum) / want_sum < 1e-5


def test_chat_records_are_checked(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
    with pytest.raises(DataError, match=r"bad.jsonl:1: the conversation has no assistant message"):
        load_documents(DataConfig(source=str(path)))
    path.write_text(json.dumps({"messages": [{"role": "user"}]}) + "\n")
    with pytest.raises(DataError, match=r"bad.jsonl:1: message 0 must be an object with string"):
        load_documents(DataConfig(source=str(path)))


def test_init_from_a_gguf_file_reads_its_config_and_tokenizer(smollm2_gguf, smollm2_hf_dir, tmp_path):
    sft = os.path.join(ROOT, "configs", "smollm2-sft.yaml")
    from_gguf = load_run_config(sft, [f"run_dir={tmp_path / 'r'}", f"init_from={smollm2_gguf}"])
    from_hf = load_run_config(sft, [f"run_dir={tmp_path / 'r'}", f"init_from={smollm2_hf_dir}"])
    assert from_gguf.model == from_hf.model and from_gguf.model.n_layers == 30
    assert from_gguf.data.tokenizer == smollm2_gguf and from_gguf.lora.rank == 8


def test_train_cli_reports_init_from_problems_in_one_line(tiny_hf_dir, tmp_path, capsys):
    import train as train_cli

    base = ["--config", TINY, f"run_dir={tmp_path / 'r'}", "data.tokenizer=byte"]
    assert train_cli.main(base + [f"init_from={tmp_path / 'missing'}"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("train.py: error: init_from=") and "\n" not in err
    assert train_cli.main(base + [f"init_from={tiny_hf_dir}", "model.n_layers=4"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("train.py: error: model.n_layers=4 conflicts with the init_from checkpoint")
    assert "\n" not in err
