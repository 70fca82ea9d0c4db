"""Tokenizers: byte round trips, BPE training, save/load, load_tokenizer dispatch."""

import json

import numpy as np
import pytest
import tokenizers

from jaxar.tokenizer import (
    ByteTokenizer,
    HFTokenizer,
    Tokenizer,
    TokenizerNotFoundError,
    load_tokenizer,
    train_bpe,
)

UNICODE = "Héllo, wörld! ünïcödé — 日本語のテキスト 🎉🐍\n\ttabs and ZWJ 👩‍👩‍👧 end"

_CORPUS = (
    "To be, or not to be, that is the question:\n"
    "Whether 'tis nobler in the mind to suffer\n"
    "The slings and arrows of outrageous fortune,\n"
    "Or to take arms against a sea of troubles\n"
    "And by opposing end them. To die—to sleep,\n"
    "def tokenize(text):\n    return [ord(c) for c in text]\n"
    "Ünïcödé: ça va? 日本語 🎉\n"
)
CORPUS = [_CORPUS * 3 + f"line {i}\n" for i in range(20)]  # a few KB


@pytest.fixture(scope="module")
def bpe():
    return train_bpe(CORPUS, 400, min_frequency=2, show_progress=False)


# ByteTokenizer ---------------------------------------------------------


def test_byte_round_trip_unicode():
    tok = ByteTokenizer()
    ids = tok.encode(UNICODE)
    assert ids == list(UNICODE.encode("utf-8"))
    assert all(0 <= i < 256 for i in ids)
    assert tok.decode(ids) == UNICODE
    assert tok.decode(np.asarray(ids, np.int32)) == UNICODE
    assert tok.encode_batch([UNICODE, "", "a"]) == [ids, [], [97]]
    arr = tok.encode_array(UNICODE)
    assert arr.dtype == np.int32 and arr.tolist() == ids


def test_byte_special_ids():
    tok = ByteTokenizer()
    assert isinstance(tok, Tokenizer)
    assert tok.vocab_size == 257
    assert tok.eos_id == 256 and tok.eos_ids == (256,)
    assert tok.bos_id is None and tok.pad_id is None
    # Special and out-of-range ids are dropped; invalid UTF-8 is replaced.
    assert tok.decode([104, 105, 256, 400]) == "hi"
    assert tok.decode([0xFF, 104]) == "\ufffdh"
    assert tok.decode(list("é".encode())[:1]) == "\ufffd"


def test_byte_save_writes_marker(tmp_path):
    ByteTokenizer().save(tmp_path / "tok")
    marker = json.loads((tmp_path / "tok" / "jaxar_tokenizer.json").read_text())
    assert marker["type"] == "byte"
    assert isinstance(load_tokenizer(str(tmp_path / "tok")), ByteTokenizer)


# HFTokenizer / train_bpe -----------------------------------------------


def test_train_bpe_vocab_and_eos(bpe):
    assert isinstance(bpe, HFTokenizer)
    assert bpe.vocab_size == 400
    assert bpe.eos_id == bpe.hf_tokenizer.token_to_id("<eos>")
    assert bpe.bos_id is None
    # Merges were learned: common text takes fewer tokens than bytes.
    assert len(bpe.encode(_CORPUS)) < len(_CORPUS.encode()) / 2


def test_train_bpe_rejects_tiny_vocab():
    with pytest.raises(ValueError, match="257"):
        train_bpe(CORPUS, 100, show_progress=False)


def test_hf_round_trip_matches_tokenizers_library(bpe, tmp_path):
    bpe.save(tmp_path / "bpe")
    assert (tmp_path / "bpe" / "tokenizer.json").is_file()
    loaded = load_tokenizer(str(tmp_path / "bpe"))
    assert isinstance(loaded, HFTokenizer)
    assert (loaded.vocab_size, loaded.eos_id, loaded.bos_id) == (bpe.vocab_size, bpe.eos_id, None)
    # Independent reference: the tokenizers library reading the same file.
    ref = tokenizers.Tokenizer.from_file(str(tmp_path / "bpe" / "tokenizer.json"))
    texts = [UNICODE, _CORPUS, "unseen words: zyxwvut qqq", ""]
    for text in texts:
        ids = loaded.encode(text)
        assert ids == ref.encode(text, add_special_tokens=False).ids
        assert ids == bpe.encode(text)
        # Byte-level BPE: every text round-trips.
        assert loaded.decode(ids) == text
        assert loaded.decode(ids) == ref.decode(ids)
    assert loaded.encode_batch(texts) == [loaded.encode(t) for t in texts]
    assert loaded.encode_array(UNICODE).tolist() == loaded.encode(UNICODE)
    # decode drops the eos id.
    assert loaded.decode(loaded.encode("abc") + [loaded.eos_id]) == "abc"


def test_hf_decode_invalid_utf8_replaced(bpe):
    # The byte-level token for the first byte of "é" alone is invalid UTF-8.
    lead = bpe.hf_tokenizer.token_to_id("Ã")  # byte 0xC3 in GPT-2's byte alphabet
    assert lead is not None
    assert bpe.decode([lead]) == "\ufffd"


def test_hf_special_tokens_from_config_files(bpe, tmp_path):
    d = tmp_path / "cfg"
    d.mkdir()
    bpe.hf_tokenizer.save(str(d / "tokenizer.json"))
    # No config file: eos found in the vocabulary.
    assert load_tokenizer(str(d)).eos_id == bpe.eos_id
    a, b = bpe.encode("a")[0], bpe.encode("b")[0]
    (d / "tokenizer_config.json").write_text(
        json.dumps({"eos_token": {"content": "a"}, "bos_token": "b", "pad_token": None})
    )
    (d / "generation_config.json").write_text(json.dumps({"eos_token_id": [a, 5, 7]}))
    tok = load_tokenizer(str(d))
    assert (tok.eos_id, tok.bos_id, tok.pad_id) == (a, b, None)
    assert tok.eos_ids == (a, 5, 7)
    # Constructor arguments win (ids or token strings).
    tok2 = HFTokenizer(d, eos_id="<eos>", pad_id=3)
    assert (tok2.eos_id, tok2.bos_id, tok2.pad_id) == (bpe.eos_id, b, 3)
    with pytest.raises(ValueError, match="not in the tokenizer's vocabulary"):
        HFTokenizer(d, eos_id="<no such token>")
    # save() keeps what was resolved.
    tok.save(tmp_path / "saved")
    again = load_tokenizer(str(tmp_path / "saved"))
    assert (again.eos_id, again.bos_id, again.pad_id, again.eos_ids) == (a, b, None, (a, 5, 7))
    # A tokenizer.json file path works too.
    assert load_tokenizer(str(d / "tokenizer.json")).eos_id == a


def test_hf_pickles(bpe):
    import pickle

    tok = pickle.loads(pickle.dumps(bpe))
    assert tok.encode(UNICODE) == bpe.encode(UNICODE)
    assert tok.eos_id == bpe.eos_id


# load_tokenizer ---------------------------------------------------------


def test_load_tokenizer_dispatch():
    assert isinstance(load_tokenizer(None), ByteTokenizer)
    assert isinstance(load_tokenizer("byte"), ByteTokenizer)
    tok = ByteTokenizer()
    assert load_tokenizer(tok) is tok


def test_load_tokenizer_errors(tmp_path):
    empty = tmp_path / "empty_dir"
    empty.mkdir()
    with pytest.raises(ValueError, match="empty_dir.*tokenizer.json"):
        load_tokenizer(str(empty))
    with pytest.raises(TokenizerNotFoundError):
        load_tokenizer(str(empty))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_tokenizer(str(tmp_path / "missing"))
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "jaxar_tokenizer.json").write_text(json.dumps({"type": "sentencepiece"}))
    with pytest.raises(ValueError, match="unknown tokenizer type"):
        load_tokenizer(str(tmp_path / "bad"))
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "tokenizer.json").write_text("{not json")
    with pytest.raises(ValueError, match="cannot load"):
        load_tokenizer(str(tmp_path / "broken"))
