"""eval.py: perplexity against transformers' loss on the same token windows."""

import json
import math

import pytest
import torch

import eval as eval_cli
from jaxar.evaluate import token_windows
from jaxar.tokenizer import load_tokenizer

TEXT = (
    "The quick brown fox jumps over the lazy dog. Meanwhile, in a small village by the sea, the fishermen "
    "mended their nets and talked about the weather, which had been unusually calm for the season.\n\n"
    "def mean(values):\n    return sum(values) / len(values)  # arithmetic mean\n\n"
    "Les marées montent et descendent deux fois par jour; 潮の満ち引きは一日に二回起こる。"
    "Numbers: 3.14159, 2.71828, 1729, and 42. The end of the first part.\n\n"
    "In the second part, the story continues: the fox, having jumped, sat down to rest under an old oak tree "
    "and watched the clouds drift slowly across the sky until the sun went down behind the hills."
)
SEQ_LEN = 96


def test_nats_per_token_equals_transformers_loss_on_the_same_windows(smollm2_hf_dir, smollm2_torch, tmp_path,
                                                                     capsys):
    data = tmp_path / "text.txt"
    data.write_text(TEXT, encoding="utf-8")
    out = tmp_path / "ppl.json"
    code = eval_cli.run(["--model", smollm2_hf_dir, "--data", str(data), "--seq-len", str(SEQ_LEN),
                         "--batch-size", "4", "--json", "--output", str(out), "--no-progress",
                         "--scan-layers", "true"])  # same numerics as unrolled; compiles in a fraction of the time
    assert code == 0
    result = json.loads(capsys.readouterr().out)
    assert json.loads(out.read_text()) == result

    # The windows: the text's tokens (SmolLM2 adds no BOS) in consecutive chunks of SEQ_LEN + 1 sharing
    # one token, so that each token after the first is a target exactly once.
    tok = load_tokenizer(smollm2_hf_dir)
    ids = tok.encode(TEXT)
    windows = token_windows([TEXT], tok, seq_len=SEQ_LEN)
    assert tok.add_bos is False and 2 * SEQ_LEN > len(ids) - 1 > SEQ_LEN and result["windows"] == 2
    assert windows.tokens[0].tolist() == ids[:SEQ_LEN + 1]
    assert windows.tokens[1, :len(ids) - SEQ_LEN].tolist() == ids[SEQ_LEN:]

    total, count = 0.0, 0
    for start in (0, SEQ_LEN):
        chunk = torch.tensor([ids[start:start + SEQ_LEN + 1]])
        with torch.no_grad():
            ref = smollm2_torch(chunk[:, :-1], labels=chunk[:, :-1].clone())  # loss: mean over shifted targets
        loss, logits = ref.loss, ref.logits[0].double()
        targets = chunk[0, 1:]
        nll = torch.nn.functional.cross_entropy(logits, targets, reduction="sum").item()
        total, count = total + nll, count + len(targets)
        if start == 0:  # the plain-sum reference agrees with transformers' own loss on the inner targets
            inner = torch.nn.functional.cross_entropy(logits[:-1], targets[:-1]).item()
            assert abs(inner - loss.item()) < 1e-5 * loss.item()
    assert result["tokens"] == count == len(ids) - 1
    assert result["nats_per_token"] == pytest.approx(total / count, rel=1e-5)
    assert result["perplexity"] == pytest.approx(math.exp(total / count), rel=1e-5)
    # bits/byte: total nats / ln 2 / UTF-8 bytes of the scored text (all of it but the first token, "The")
    assert tok.decode(ids[:1]) == "The"
    assert result["bytes"] == len(TEXT.encode("utf-8")) - 3
    assert result["bits_per_byte"] == pytest.approx(result["total_nats"] / math.log(2) / result["bytes"], rel=1e-12)
    assert result["total_nats"] == pytest.approx(total, rel=1e-5)


def test_max_tokens_limits_the_scored_tokens(smollm2_hf_dir):
    tok = load_tokenizer(smollm2_hf_dir)
    windows = token_windows([TEXT, TEXT], tok, seq_len=SEQ_LEN, max_tokens=150)
    assert windows.num_tokens == 150 and windows.lengths.tolist() == [SEQ_LEN, 150 - SEQ_LEN]
    assert windows.n_bytes == len(tok.decode(tok.encode(TEXT)[1:151]).encode("utf-8"))


@pytest.mark.parametrize("args, message", [
    (["--model", "/no/such/model", "--data", "shakespeare"], "--model /no/such/model: no such file or directory"),
    (["--model", ".", "--data", "/no/such/file.txt"], "--data /no/such/file.txt: data source"),
    (["--model", ".", "--data", "shakespeare", "--seq-len", "0"], "--seq-len must be >= 1"),
    (["--model", ".", "--data", "shakespeare", "--batch-size", "0"], "--batch-size must be >= 1"),
])
def test_bad_input_is_one_line_and_exit_2(args, message, capsys):
    assert eval_cli.run(args) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"eval.py: error: {message}") and err.count("\n") == 1


def test_bad_model_directory_and_existing_output(tmp_path, capsys):
    data = tmp_path / "t.txt"
    data.write_text("hello world")
    assert eval_cli.run(["--model", str(tmp_path), "--data", str(data)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"eval.py: error: --model {tmp_path}: ") and err.count("\n") == 1
    out = tmp_path / "ppl.json"
    out.write_text("{}")
    assert eval_cli.run(["--model", str(tmp_path), "--data", str(data), "--output", str(out)]) == 2
    assert "already exists; pass --overwrite" in capsys.readouterr().err
    assert out.read_text() == "{}"
