"""Data pipeline: sources, packing against a reference packer, determinism,
checkpointed iterator state, multi-process sharding, validation batches."""

import gzip
import json
import time

import numpy as np
import pytest

from jaxar.tokenizer import ByteTokenizer, HFTokenizer, train_bpe
from jaxar.train.data import (
    BATCH_KEYS,
    PIECE_CHARS,
    DataConfig,
    DataError,
    corpus_stats,
    load_documents,
    make_pieces,
    make_train_iterator,
    make_val_batches,
    pack_token_arrays,
    split_documents,
    train_val_documents,
)

BYTE = ByteTokenizer()
EOS = BYTE.eos_id

# Small synthetic documents of varied lengths (some longer than a row, one of
# length 1 which gives a single pair: its byte -> eos).
DOCS = [
    "a",
    "hello world",
    "The quick brown fox jumps over the lazy dog. " * 3,
    "xyz",
    "ünïcödé 日本 🎉",
    "0123456789" * 7,
    "short",
    "Lorem ipsum dolor sit amet, consectetur adipiscing elit.",
]


def reference_pack(docs_ids, seq_len):
    """Pure-python packer: the stream of (input, target) pairs of every
    document, cut into rows of seq_len; a new segment (positions from 0)
    starts at each document and at each row start; the last row is padded."""
    pairs = []  # (input, target, occurrence)
    for occ, ids in enumerate(docs_ids):
        pairs += [(ids[i], ids[i + 1], occ) for i in range(len(ids) - 1)]
    rows = []
    for start in range(0, len(pairs), seq_len):
        chunk = pairs[start : start + seq_len]
        row = {k: [0] * seq_len for k in BATCH_KEYS}
        seg, pos, prev = 0, 0, None
        for j, (x, y, occ) in enumerate(chunk):
            if occ != prev:
                seg, pos, prev = seg + 1, 0, occ
            row["tokens"][j], row["targets"][j] = x, y
            row["segment_ids"][j], row["positions"][j], row["loss_mask"][j] = seg, pos, 1
            pos += 1
        rows.append(row)
    return rows


def byte_doc(text):
    return list(text.encode("utf-8")) + [EOS]


def take(it, n):
    return [next(it) for _ in range(n)]


def assert_batches_equal(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert set(x) == set(BATCH_KEYS) == set(y)
        for k in BATCH_KEYS:
            np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def rows_of(batches):
    return [{k: b[k][i] for k in BATCH_KEYS} for b in batches for i in range(b["tokens"].shape[0])]


def check_row_invariants(row, seq_len):
    seg, pos, mask = row["segment_ids"], row["positions"], row["loss_mask"]
    assert np.array_equal(mask, (seg > 0).astype(np.int32))
    # Segments are contiguous, numbered 1, 2, 3, ... and padding only at the end.
    real = seg[seg > 0]
    assert np.all(np.diff(real) >= 0) and np.all(np.diff(real) <= 1)
    if len(real):
        assert real[0] == 1 and np.all(seg[len(real) :] == 0)
    # Positions restart at 0 at every segment and count up within it.
    for s in np.unique(real):
        np.testing.assert_array_equal(pos[seg == s], np.arange(np.sum(seg == s)))
    assert pos.max() < seq_len


# Packing -------------------------------------------------------------------


@pytest.mark.parametrize("seq_len", [1, 7, 16, 64])
def test_packing_matches_reference(seq_len):
    docs_ids = [byte_doc(d) for d in DOCS]
    got = pack_token_arrays(docs_ids, seq_len, pad_last=True)
    want = reference_pack(docs_ids, seq_len)
    assert len(got) == len(want)
    for g, w in zip(got, want):
        for k in BATCH_KEYS:
            assert g[k].dtype == np.int32 and g[k].shape == (seq_len,)
            np.testing.assert_array_equal(g[k], w[k], err_msg=k)
        check_row_invariants(g, seq_len)
    # Every (input, target) pair of every document is there exactly once.
    assert sum(int(r["loss_mask"].sum()) for r in got) == sum(len(d) - 1 for d in docs_ids)


def test_packing_carries_the_per_token_loss_mask():
    # Pieces with a targets mask (chat: 1 on assistant tokens): pair i of a piece carries mask[i + 1],
    # across row splits too; everything else is packed as without a mask.
    rng = np.random.default_rng(0)
    docs_ids = [byte_doc(d) for d in DOCS]
    masks = [rng.integers(0, 2, len(ids)).astype(np.int32) for ids in docs_ids]
    pieces = [{"ids": np.asarray(ids, np.int32), "targets_mask": m} for ids, m in zip(docs_ids, masks)]
    for seq_len in (7, 16):
        got = pack_token_arrays(pieces, seq_len)
        want = reference_pack(docs_ids, seq_len)
        flat_mask = [int(v) for m in masks for v in m[1:]]
        assert len(got) == len(want)
        for r, (g, w) in enumerate(zip(got, want)):
            for k in ("tokens", "targets", "segment_ids", "positions"):
                np.testing.assert_array_equal(g[k], w[k], err_msg=k)
            n = int((np.asarray(w["segment_ids"]) > 0).sum())
            np.testing.assert_array_equal(g["loss_mask"][:n], flat_mask[r * seq_len:r * seq_len + n])
            assert not g["loss_mask"][n:].any()


def test_packed_targets_are_next_tokens_of_the_same_document():
    # Rebuild the documents from the packed rows alone: within a segment each
    # target is the next input; a chunk that continues a document (the last
    # one did not end with eos) starts with the previous chunk's last target.
    docs_ids = [byte_doc(d) for d in DOCS]
    rebuilt = []
    for row in pack_token_arrays(docs_ids, 16):
        seg = row["segment_ids"]
        for s in np.unique(seg[seg > 0]):
            toks = [int(t) for t in row["tokens"][seg == s]]
            tgts = [int(t) for t in row["targets"][seg == s]]
            assert toks[1:] == tgts[:-1]
            assert EOS not in toks  # eos is only ever a target
            if rebuilt and rebuilt[-1][-1] != EOS:
                assert rebuilt[-1][-1] == toks[0]
                rebuilt[-1] += tgts
            else:
                rebuilt.append(toks + tgts[-1:])
    assert rebuilt == docs_ids


def test_pipeline_without_shuffle_matches_reference_over_epochs():
    seq_len, batch = 16, 4
    cfg = DataConfig(source="unused", val_fraction=0.0, shuffle=False)
    it = make_train_iterator(cfg, BYTE, seq_len=seq_len, global_batch_size=batch, seed=0, documents=DOCS)
    docs_ids = [byte_doc(d) for d in DOCS]
    n_pairs = sum(len(d) - 1 for d in docs_ids)
    n_rows = 2 * n_pairs // seq_len + 4  # crosses the epoch boundary
    got = rows_of(take(it, n_rows // batch + 1))
    want = reference_pack(docs_ids * 4, seq_len)
    for g, w in zip(got, want):
        for k in BATCH_KEYS:
            np.testing.assert_array_equal(g[k], w[k], err_msg=k)
        # Training rows are never padded.
        assert g["loss_mask"].all()


def test_batch_format():
    cfg = DataConfig(source="unused", val_fraction=0.0)
    it = make_train_iterator(cfg, BYTE, seq_len=32, global_batch_size=6, seed=1, documents=DOCS)
    b = next(it)
    assert set(b) == set(BATCH_KEYS)
    for k in BATCH_KEYS:
        assert b[k].shape == (6, 32) and b[k].dtype == np.int32
    for r in rows_of([b]):
        check_row_invariants(r, 32)
        assert r["tokens"].max() <= EOS and r["targets"].max() <= EOS


# Determinism and checkpointing -----------------------------------------------


def _iter(seed, window=8, **kw):
    docs = [f"document {i}: " + "abcdefghij"[: i % 10] * (i % 13 + 1) for i in range(40)]
    cfg = DataConfig(source="unused", val_fraction=0.0, shuffle_window=window, **kw)
    return make_train_iterator(cfg, BYTE, seq_len=24, global_batch_size=4, seed=seed, documents=docs)


def test_same_seed_same_batches_other_seed_differs():
    a, b, c = take(_iter(0), 30), take(_iter(0), 30), take(_iter(1), 30)
    assert_batches_equal(a, b)
    assert any(not np.array_equal(x["tokens"], y["tokens"]) for x, y in zip(a, c))


def test_shuffle_changes_order_across_epochs():
    # Without the row window shuffle each epoch packs documents in a new order.
    docs = [chr(ord("A") + i) * 5 for i in range(20)]
    cfg = DataConfig(source="unused", val_fraction=0.0, shuffle_window=0)
    it = make_train_iterator(cfg, BYTE, seq_len=5, global_batch_size=1, seed=3, documents=docs)
    epochs = [[chr(next(it)["tokens"][0, 0]) for _ in range(20)] for _ in range(2)]
    assert sorted(epochs[0]) == sorted(epochs[1]) == sorted(d[0] for d in docs)
    assert epochs[0] != epochs[1]
    assert epochs[0] != [d[0] for d in docs]


@pytest.mark.parametrize("steps", [0, 1, 5, 13, 40])
def test_state_restore_gives_identical_batches(steps):
    it = _iter(7)
    take(it, steps)
    state = json.loads(json.dumps(it.get_state()))  # JSON-serialisable
    expected = take(it, 12)
    resumed = _iter(7)
    resumed.set_state(state)
    assert_batches_equal(take(resumed, 12), expected)


def test_state_restore_mid_document_no_shuffle():
    # Long documents: states taken in the middle of a document.
    docs = ["x" * 100, "y" * 37, "z" * 250]
    cfg = DataConfig(source="unused", val_fraction=0.0, shuffle=False)
    make = lambda: make_train_iterator(cfg, BYTE, seq_len=16, global_batch_size=2, seed=0, documents=docs)
    it = make()
    for _ in range(9):
        state = it.get_state()
        expected = take(it, 3)
        other = make()
        other.set_state(state)
        assert_batches_equal(take(other, 3), expected)


# Multi-process sharding ------------------------------------------------------------


def test_process_shards_are_disjoint_and_cover_the_corpus():
    docs = [chr(ord("A") + i) * (3 + i) for i in range(26)]
    n_pairs = sum(len(d) for d in docs)  # len(d) + 1 tokens -> len(d) pairs
    cfg = DataConfig(source="unused", val_fraction=0.0, shuffle=True, shuffle_window=4)
    seen = []
    for p in range(2):
        it = make_train_iterator(
            cfg, BYTE, seq_len=8, global_batch_size=4, seed=5, process_index=p, process_count=2, documents=docs
        )
        batches = take(it, n_pairs // 8 // 2 + 6)  # a bit more than one epoch of this shard
        assert batches[0]["tokens"].shape == (2, 8)
        letters = {chr(t) for b in batches for t in b["tokens"][b["segment_ids"] > 0].ravel() if t != EOS}
        seen.append(letters)
    assert seen[0].isdisjoint(seen[1])
    assert seen[0] | seen[1] == {d[0] for d in docs}


def test_process_arguments_validated():
    cfg = DataConfig(source="unused", val_fraction=0.0)
    with pytest.raises(DataError, match="multiple"):
        make_train_iterator(cfg, BYTE, seq_len=8, global_batch_size=3, seed=0, process_count=2, documents=DOCS)
    with pytest.raises(DataError, match="process_index"):
        make_train_iterator(
            cfg, BYTE, seq_len=8, global_batch_size=4, seed=0, process_index=2, process_count=2, documents=DOCS
        )
    with pytest.raises(DataError, match="fewer than"):
        make_train_iterator(cfg, BYTE, seq_len=8, global_batch_size=4, seed=0, process_count=4, documents=["ab", "cd"])


# Long documents are cut into pieces ------------------------------------------------


def test_long_documents_cut_into_pieces():
    line = "word " * 15 + "\n"
    doc = line * (2 * PIECE_CHARS // len(line) + 10)
    pieces = make_pieces([doc, "tiny"])
    assert len(pieces) == 4
    assert "".join(p[0] for p in pieces[:3]) == doc
    assert all(len(p[0]) <= PIECE_CHARS and p[0].endswith("\n") for p in pieces[:2])
    assert [(p[1], p[2]) for p in pieces] == [(True, False), (False, False), (False, True), (True, True)]
    # Through the pipeline: one eos per document per epoch.
    cfg = DataConfig(source="unused", val_fraction=0.0, shuffle=False)
    it = make_train_iterator(cfg, BYTE, seq_len=512, global_batch_size=8, seed=0, documents=[doc, "tiny"])
    n_pairs = len(doc) + 4 - 2  # each piece boundary loses one pair
    rows = rows_of(take(it, -(-n_pairs // 512 // 8)))
    targets = np.concatenate([r["targets"] for r in rows])[:n_pairs]
    assert int(np.sum(targets == EOS)) == 2


# Validation split and batches ----------------------------------------------------------


def test_split_documents():
    docs = [f"doc {i}" for i in range(40)]
    train, val = split_documents(docs, 0.1)
    assert len(val) == 4 and len(train) == 36 and set(train).isdisjoint(val)
    assert split_documents(docs, 0.1) == (train, val)  # fixed, seed independent
    assert split_documents(docs, 0.0) == (docs, [])
    # A single document: its end, by characters.
    train, val = split_documents(["abcdefghij" * 10], 0.05)
    assert train == ["abcdefghij" * 9 + "abcde"] and val == ["fghij"]
    with pytest.raises(DataError):
        split_documents(["ab"], 0.05)


def test_val_batches_fixed_and_padded():
    docs = [f"validation document number {i} " * (i + 1) for i in range(20)]
    cfg = DataConfig(source="unused", val_fraction=0.5)
    vb = make_val_batches(cfg, BYTE, seq_len=32, batch_size=4, max_batches=None, documents=docs)
    assert_batches_equal(vb, make_val_batches(cfg, BYTE, seq_len=32, batch_size=4, documents=docs))
    _, val = split_documents(docs, 0.5)
    want = reference_pack([byte_doc(d) for d in val], 32)
    got = rows_of(vb)
    assert len(got) == -(-len(want) // 4) * 4
    for g, w in zip(got, want + [{k: [0] * 32 for k in BATCH_KEYS}] * 4):
        for k in BATCH_KEYS:
            np.testing.assert_array_equal(g[k], w[k], err_msg=k)
    assert all(b[k].shape == (4, 32) for b in vb for k in BATCH_KEYS)
    assert len(make_val_batches(cfg, BYTE, seq_len=32, batch_size=4, max_batches=2, documents=docs)) == 2
    cfg0 = DataConfig(source="unused", val_fraction=0.0)
    assert make_val_batches(cfg0, BYTE, seq_len=32, batch_size=4, documents=docs) == []


# Tokenizers in the pipeline ---------------------------------------------------------


def test_bpe_tokenizer_with_bos():
    tok = train_bpe(DOCS * 5, 300, show_progress=False)
    hf = tok.hf_tokenizer
    hf.add_special_tokens(["<bos>"])
    tok = HFTokenizer(hf, eos_id="<eos>", bos_id="<bos>")
    cfg = DataConfig(source="unused", val_fraction=0.0, shuffle=False)
    it = make_train_iterator(cfg, tok, seq_len=2048, global_batch_size=1, seed=0, documents=DOCS)
    row = rows_of([next(it)])[0]
    docs_ids = [[tok.bos_id] + tok.encode(d) + [tok.eos_id] for d in DOCS]
    n = sum(len(d) - 1 for d in docs_ids)  # one epoch, then the next one starts
    assert n < 2048
    want = reference_pack(docs_ids, 2048)[0]
    for k in BATCH_KEYS:
        np.testing.assert_array_equal(row[k][:n], want[k][:n], err_msg=k)
    assert row["tokens"][n] == tok.bos_id


# Sources ------------------------------------------------------------------------


def test_shakespeare_bundled_and_fast():
    t0 = time.perf_counter()
    docs = load_documents(DataConfig(source="shakespeare"))
    assert time.perf_counter() - t0 < 5.0
    assert len(docs) == 42 and sum(map(len, docs)) > 4_000_000
    assert any("To be, or not to be" in d for d in docs)
    stats = corpus_stats(DataConfig(source="shakespeare"))
    assert stats["num_documents"] == 42 and stats["num_bytes"] > 4_000_000
    it = make_train_iterator(DataConfig(source="shakespeare"), "byte", seq_len=128, global_batch_size=4, seed=0)
    b = next(it)
    assert b["tokens"].max() < 257 and b["targets"].max() < 257 and b["tokens"].min() >= 0
    vb = make_val_batches(DataConfig(source="shakespeare"), BYTE, seq_len=128, batch_size=4, max_batches=3)
    assert len(vb) == 3


def test_python_stdlib_source():
    docs = load_documents(DataConfig(source="python_stdlib", max_docs=50))
    assert len(docs) == 50
    all_docs = load_documents(DataConfig(source="python_stdlib"))
    assert len(all_docs) > 100 and all_docs[:50] == docs
    assert any("def " in d for d in docs)


def test_text_file_glob_and_directory_sources(tmp_path):
    (tmp_path / "a.txt").write_text("first document\n")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.txt").write_text("second document\n")
    (tmp_path / "sub" / "c.md").write_text("third\n")
    (tmp_path / "sub" / "bin.dat").write_bytes(b"\x00\x01binary")
    with gzip.open(tmp_path / "d.txt.gz", "wt") as f:
        f.write("compressed document\n")
    assert load_documents(DataConfig(source=str(tmp_path / "a.txt"))) == ["first document\n"]
    assert load_documents(DataConfig(source=str(tmp_path / "**" / "*.txt"))) == [
        "first document\n",
        "second document\n",
    ]
    assert load_documents(DataConfig(source=str(tmp_path))) == [
        "first document\n",
        "compressed document\n",
        "second document\n",
        "third\n",
    ]
    assert load_documents(DataConfig(source=str(tmp_path), max_docs=2)) == [
        "first document\n",
        "compressed document\n",
    ]


def test_source_list_mixes_and_holds_out_each(tmp_path):
    (tmp_path / "code").mkdir()
    (tmp_path / "prose").mkdir()
    for i in range(10):
        (tmp_path / "code" / f"m{i:02d}.py").write_text(f"def f{i}():\n    return {i}\n")
        (tmp_path / "prose" / f"p{i:02d}.txt").write_text(f"Prose number {i}.\n")
    code = load_documents(DataConfig(source=str(tmp_path / "code")))
    prose = load_documents(DataConfig(source=str(tmp_path / "prose")))
    cfg = DataConfig(source=[str(tmp_path / "code"), str(tmp_path / "prose")], val_fraction=0.2)
    assert cfg.source == (str(tmp_path / "code"), str(tmp_path / "prose"))
    assert load_documents(cfg) == code + prose
    train, val = train_val_documents(cfg)
    ct, cv = split_documents(code, 0.2)
    pt, pv = split_documents(prose, 0.2)
    assert train == ct + pt and val == cv + pv  # each source has held-out documents
    assert corpus_stats(cfg)["num_val_documents"] == 4
    assert load_documents(DataConfig(source=[str(tmp_path / "code"), str(tmp_path / "prose")], max_docs=3)) == (
        code[:3] + prose[:3])
    assert DataConfig(source=[str(tmp_path / "code")]).source == str(tmp_path / "code")
    # The config round-trips through JSON (run_config.json) and YAML overrides.
    assert DataConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    from jaxar.train.config import load_run_config
    rc = load_run_config("configs/tiny.yaml", [f"data.source=[{tmp_path / 'code'}, shakespeare]"])
    assert rc.data.sources == (str(tmp_path / "code"), "shakespeare")
    for bad in ([], ["shakespeare", "shakespeare"], ["shakespeare", ""], [3]):
        with pytest.raises(DataError):
            DataConfig(source=bad)
    with pytest.raises(DataError, match="no such file"):
        load_documents(DataConfig(source=["shakespeare", str(tmp_path / "missing")]))


def test_jsonl_source(tmp_path):
    path = tmp_path / "data.jsonl"
    records = [{"text": "one", "id": 1}, {"text": "two\u2028lines"}, {"text": ""}, {"text": "three"}]
    path.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in records) + "\r\n\n")
    assert load_documents(DataConfig(source=str(path))) == ["one", "two\u2028lines", "three"]
    path2 = tmp_path / "other.jsonl"
    path2.write_text(json.dumps({"body": "alpha"}) + "\n")
    assert load_documents(DataConfig(source=str(path2), text_field="body")) == ["alpha"]
    it = make_train_iterator(
        DataConfig(source=str(path), val_fraction=0.0), BYTE, seq_len=4, global_batch_size=2, seed=0
    )
    assert next(it)["tokens"].shape == (2, 4)


def test_source_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file"):
        load_documents(DataConfig(source=str(tmp_path / "missing.txt")))
    with pytest.raises(DataError, match="matches no files"):
        load_documents(DataConfig(source=str(tmp_path / "*.nothing")))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"text": broken}\n')
    with pytest.raises(DataError, match=r"bad.jsonl:2: invalid JSON"):
        load_documents(DataConfig(source=str(bad)))
    nofield = tmp_path / "nofield.jsonl"
    nofield.write_text('{"text": "ok"}\n\n{"content": "x"}\n')
    with pytest.raises(DataError, match=r"nofield.jsonl:3: no field 'text'"):
        load_documents(DataConfig(source=str(nofield)))
    notstr = tmp_path / "notstr.jsonl"
    notstr.write_text('{"text": 5}\n')
    with pytest.raises(DataError, match=r"notstr.jsonl:1: field 'text' must be a string"):
        load_documents(DataConfig(source=str(notstr)))
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(DataError, match="no text"):
        load_documents(DataConfig(source=str(empty)))
    (tmp_path / "emptydir").mkdir()
    with pytest.raises(DataError, match="no text files"):
        load_documents(DataConfig(source=str(tmp_path / "emptydir")))


def test_config_validation():
    with pytest.raises(DataError, match="val_fraction"):
        DataConfig(val_fraction=1.0)
    with pytest.raises(DataError, match="max_docs"):
        DataConfig(max_docs=0)
    with pytest.raises(DataError, match="num_workers"):
        DataConfig(num_workers=-1)
    with pytest.raises(DataError, match="unknown data config keys"):
        DataConfig.from_dict({"source": "shakespeare", "sauce": 1})
    assert DataConfig.from_dict({"source": "python_stdlib"}).source == "python_stdlib"
    assert hash(DataConfig()) == hash(DataConfig())


def test_worker_processes():
    # num_workers > 0 runs the pipeline in grain worker processes; still
    # deterministic and checkpointable.
    docs = [f"doc {i} " * (i + 2) for i in range(12)]
    cfg = DataConfig(source="unused", val_fraction=0.0, num_workers=1, shuffle_window=4)
    make = lambda: make_train_iterator(cfg, BYTE, seq_len=16, global_batch_size=2, seed=0, documents=docs)
    it = make()
    first = take(it, 3)
    state = json.loads(json.dumps(it.get_state()))
    expected = take(it, 3)
    other = make()
    other.set_state(state)
    assert_batches_equal(take(other, 3), expected)
    for r in rows_of(first):
        check_row_invariants(r, 16)
