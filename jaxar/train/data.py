"""Text corpora -> packed, shuffled, checkpointable batches of token ids (grain).

Pipeline (training)::

    documents (strings)
      -> pieces: documents longer than PIECE_CHARS are cut at line breaks into
         pieces of at most that many characters (shard and shuffle granularity)
      -> this host's shard of the pieces (pieces[process_index::process_count])
      -> shuffle the pieces by seed, a new order every epoch, repeat forever
      -> tokenize: [bos] (first piece of a document only, when the tokenizer has
         a bos distinct from eos) + encode(piece) + [eos] (last piece only)
      -> pack into rows of seq_len (input, target) pairs
      -> shuffle rows in windows of `shuffle_window` rows
      -> batch (global_batch_size // process_count rows)

Batch format: a dict of int32 numpy arrays, each [batch, seq_len]:

* `tokens`: input ids;
* `targets`: the id that follows `tokens` in the same document;
* `segment_ids`: 1, 2, 3, ... for the document chunks of a row, 0 = padding;
* `positions`: position within the chunk, starting at 0 at every chunk;
* `loss_mask`: 1 where `targets` is a real next token (everywhere a segment
  is, the final eos included), 0 on padding.

Packing: a tokenized piece t of length L gives the L - 1 pairs
(t[i], t[i + 1]). Pairs fill rows in order. When a piece does not fit in what
is left of a row, the row is filled and the rest of the piece goes on in the
next row as a new chunk: its segment id is a new one and its positions
restart at 0 (attention never crosses rows, so the chunk starts without
context, like a document does; positions stay < seq_len). Every pair of a
piece is in exactly one row, no pair is dropped at a row boundary, and no
two chunks share a segment id within a row. Training rows are never padded
(the stream is infinite); the last validation row and batch are (token 0 or
the tokenizer's pad id). A document's eos is only ever a target, never an
input; its first token is never a target (there is no bos before it unless
the tokenizer has one). Cutting a document into pieces loses the one pair
that crosses each cut.

Shuffling uses numpy permutations seeded from `seed`: the pieces (a new
order every epoch) and the rows (windows of `shuffle_window` rows; memory:
window * seq_len * 20 bytes). With num_workers > 0 each grain worker process
runs this on its slice of the pieces and batches are interleaved.

The iterator returned by `make_train_iterator` is a grain DatasetIterator:
`get_state()` returns a JSON-serialisable dict and `set_state(state)`
restores it, after which it yields exactly the batches an uninterrupted
iterator would.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import glob as _glob
import gzip
import bz2
import json
import lzma
import os
import sys
import sysconfig
import tarfile
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import grain
import numpy as np

from jaxar.tokenizer import Tokenizer, load_tokenizer

# Documents longer than this many characters are cut into pieces (at a line
# break where there is one in the second half of the window). One (input,
# target) pair is lost at each cut.
PIECE_CHARS = 32768

BUILTIN_SOURCES = ("shakespeare", "python_stdlib")
BATCH_KEYS = ("tokens", "targets", "segment_ids", "positions", "loss_mask")

_STDLIB_SKIP_DIRS = frozenset(
    {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}
)
_VAL_SPLIT_SEED = 0x5EED_DA7A  # fixed: the validation documents never depend on the training seed


class DataError(ValueError):
    """Bad data configuration or unreadable corpus."""


class DataFileNotFoundError(DataError, FileNotFoundError):
    """A data source names a file or directory that is not there."""


def data_dir() -> Path:
    """The directory of the bundled corpora (the repository's data/, or $JAXAR_DATA_DIR)."""
    env = os.environ.get("JAXAR_DATA_DIR")
    if env:
        return Path(env).expanduser()
    return Path(__file__).resolve().parents[2] / "data"


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Where the text comes from and how it is split and shuffled.

    source: "shakespeare" (bundled), "python_stdlib" (this interpreter's
        standard library), a text file (one document), a `.jsonl` file (one
        document per line, in `text_field`), a directory (every non-hidden,
        non-binary file under it, recursively, one document each) or a glob
        (e.g. "corpus/**/*.txt"). `.gz`, `.xz` and `.bz2` files are
        decompressed. A list of sources mixes them (documents in proportion
        to what each holds); each is split into train/validation on its own,
        so every source has held-out documents.
    tokenizer: "byte" or a tokenizer directory (see `jaxar.tokenizer.load_tokenizer`).
    val_fraction: fraction of the documents held out for validation; with a
        single document, that fraction of its characters at its end.
    shuffle: shuffle documents (every epoch anew) and rows (in windows of
        `shuffle_window` rows); False keeps the corpus order.
    max_docs: use only the first max_docs documents of the source (of each
        source, for a list).
    num_workers: grain worker processes for the training pipeline (0: in
        this process). The batches differ with the number of workers, but are
        deterministic for a given number.
    """

    source: Union[str, tuple[str, ...]] = "shakespeare"
    text_field: str = "text"
    tokenizer: str = "byte"
    val_fraction: float = 0.05
    shuffle: bool = True
    max_docs: Optional[int] = None
    num_workers: int = 0
    shuffle_window: int = 1024

    def __post_init__(self):
        if isinstance(self.source, (list, tuple)):
            if not self.source:
                raise DataError("data source list is empty; name at least one source")
            srcs = tuple(_check_source(s) for s in self.source)
            if len(set(srcs)) != len(srcs):
                raise DataError(f"data source list {list(srcs)} names a source twice")
            object.__setattr__(self, "source", srcs[0] if len(srcs) == 1 else srcs)
        else:
            object.__setattr__(self, "source", _check_source(self.source))
        if isinstance(self.tokenizer, os.PathLike):
            object.__setattr__(self, "tokenizer", os.fspath(self.tokenizer))
        if self.tokenizer is not None and not isinstance(self.tokenizer, str):
            raise DataError(f"tokenizer must be 'byte' or a tokenizer directory, got {self.tokenizer!r}")
        if not isinstance(self.text_field, str) or not self.text_field:
            raise DataError(f"text_field must be a non-empty string, got {self.text_field!r}")
        if isinstance(self.val_fraction, bool) or not isinstance(self.val_fraction, (int, float)):
            raise DataError(f"val_fraction must be a number, got {self.val_fraction!r}")
        if not 0.0 <= float(self.val_fraction) < 1.0:
            raise DataError(f"val_fraction must be in [0, 1), got {self.val_fraction}")
        if self.max_docs is not None and (
            isinstance(self.max_docs, bool) or not isinstance(self.max_docs, int) or self.max_docs < 1
        ):
            raise DataError(f"max_docs must be a positive integer or None, got {self.max_docs!r}")
        for name in ("num_workers", "shuffle_window"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise DataError(f"{name} must be a non-negative integer, got {v!r}")
        if not isinstance(self.shuffle, bool):
            raise DataError(f"shuffle must be true or false, got {self.shuffle!r}")

    @classmethod
    def from_dict(cls, d: dict) -> "DataConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise DataError(f"unknown data config keys {unknown}; known: {sorted(names)}")
        return cls(**d)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        if isinstance(self.source, tuple):
            d["source"] = list(self.source)
        return d

    @property
    def sources(self) -> tuple[str, ...]:
        """The source(s) as a tuple."""
        return self.source if isinstance(self.source, tuple) else (self.source,)


def _check_source(source) -> str:
    if not isinstance(source, (str, os.PathLike)) or not str(source).strip():
        raise DataError(f"data source must be a non-empty string (or a list of them), got {source!r}")
    return os.fspath(source)


# ---------------------------------------------------------------------------
# Reading documents


def _decode(data: bytes) -> str:
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    return data.decode("utf-8", errors="replace")


def _read_bytes(path: Path) -> bytes:
    name = path.name.lower()
    try:
        if name.endswith(".gz"):
            with gzip.open(path, "rb") as f:
                return f.read()
        if name.endswith(".xz"):
            with lzma.open(path, "rb") as f:
                return f.read()
        if name.endswith(".bz2"):
            with bz2.open(path, "rb") as f:
                return f.read()
        return path.read_bytes()
    except (OSError, EOFError, lzma.LZMAError) as e:
        raise DataError(f"cannot read {path}: {e}") from e


def _is_jsonl(path: Path) -> bool:
    name = path.name.lower()
    for ext in (".gz", ".xz", ".bz2"):
        if name.endswith(ext):
            name = name[: -len(ext)]
    return name.endswith(".jsonl")


def _read_jsonl(path: Path, text_field: str) -> list[str]:
    docs = []
    text = _decode(_read_bytes(path))
    # split("\n"), not splitlines(): JSON strings may hold U+2028 and other line separators.
    for lineno, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{lineno}: invalid JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(record, dict):
            raise DataError(f"{path}:{lineno}: expected a JSON object, got {type(record).__name__}")
        if text_field not in record:
            fields = ", ".join(repr(k) for k in list(record)[:10])
            raise DataError(f"{path}:{lineno}: no field {text_field!r} (the record has: {fields})")
        value = record[text_field]
        if not isinstance(value, str):
            raise DataError(
                f"{path}:{lineno}: field {text_field!r} must be a string, got {type(value).__name__}"
            )
        docs.append(value)
    return docs


def _read_file(path: Path, text_field: str) -> list[str]:
    if _is_jsonl(path):
        return _read_jsonl(path, text_field)
    return [_decode(_read_bytes(path))]


def _looks_binary(path: Path) -> bool:
    if path.name.lower().endswith((".gz", ".xz", ".bz2")):
        return False
    try:
        with open(path, "rb") as f:
            return b"\0" in f.read(8192)
    except OSError:
        return True


def _walk_files(root: Path) -> list[Path]:
    """Non-hidden files under root, recursively, in sorted relative-path order."""
    out = []
    for d, dirs, files in os.walk(root):
        dirs[:] = [x for x in dirs if not x.startswith(".") and x != "__pycache__"]
        out += [Path(d) / f for f in files if not f.startswith(".")]
    return sorted(out, key=lambda p: p.relative_to(root).as_posix())


@functools.lru_cache(maxsize=2)
def _shakespeare() -> tuple[str, ...]:
    path = data_dir() / "shakespeare.tar.xz"
    if not path.is_file():
        raise DataFileNotFoundError(
            f"the bundled Shakespeare corpus is missing: {path} does not exist "
            "(it ships in the repository's data/ directory; set JAXAR_DATA_DIR if it lives elsewhere)"
        )
    docs = []
    with tarfile.open(path, "r:xz") as tf:
        members = sorted((m for m in tf.getmembers() if m.isfile()), key=lambda m: m.name)
        for m in members:
            docs.append(_decode(tf.extractfile(m).read()))
    return tuple(docs)


def python_stdlib_files() -> list[Path]:
    """The *.py files of this interpreter's standard library, sorted, without
    site-packages and test directories."""
    root = Path(sysconfig.get_paths()["stdlib"])
    out = []
    for d, dirs, files in os.walk(root):
        dirs[:] = [x for x in dirs if x not in _STDLIB_SKIP_DIRS and not x.startswith(".")]
        out += [Path(d) / f for f in files if f.endswith(".py")]
    return sorted(out, key=lambda p: p.relative_to(root).as_posix())


@functools.lru_cache(maxsize=2)
def _python_stdlib() -> tuple[str, ...]:
    return tuple(_decode(p.read_bytes()) for p in python_stdlib_files())


def _has_glob(s: str) -> bool:
    return any(c in s for c in "*?[")


def load_documents(config: DataConfig) -> list[str]:
    """The source's documents, in a fixed order, empty ones dropped, at most max_docs
    (for a list of sources: each source's in turn)."""
    return [d for docs in load_source_documents(config) for d in docs]


def load_source_documents(config: DataConfig) -> list[list[str]]:
    """Each source's documents (one list per entry of `config.sources`)."""
    return [_load_one(source, config) for source in config.sources]


def train_val_documents(config: DataConfig, documents: Optional[Sequence[str]] = None
                        ) -> tuple[list[str], list[str]]:
    """(train, validation) documents of the config's sources, each source split
    on its own by `split_documents` (or `documents` split as one source)."""
    groups = [list(documents)] if documents is not None else load_source_documents(config)
    train, val = [], []
    for docs in groups:
        t, v = split_documents(docs, config.val_fraction)
        train += t
        val += v
    return train, val


def _load_one(source: str, config: DataConfig) -> list[str]:
    source = str(source)
    if source == "shakespeare":
        docs = list(_shakespeare())
    elif source == "python_stdlib":
        docs = list(_python_stdlib())
    else:
        path = Path(source).expanduser()
        if path.is_file():
            docs = _read_file(path, config.text_field)
        elif path.is_dir():
            files = [p for p in _walk_files(path) if _is_jsonl(p) or not _looks_binary(p)]
            if not files:
                raise DataError(f"data source directory {str(path)!r} holds no text files")
            docs = [d for p in files for d in _read_file(p, config.text_field)]
        elif _has_glob(source):
            files = sorted(
                Path(p) for p in _glob.glob(os.path.expanduser(source), recursive=True) if os.path.isfile(p)
            )
            if not files:
                raise DataFileNotFoundError(f"data source glob {source!r} matches no files")
            docs = [d for p in files for d in _read_file(p, config.text_field)]
        else:
            raise DataFileNotFoundError(
                f"data source {source!r}: no such file or directory (expected one of "
                f"{', '.join(BUILTIN_SOURCES)}, a text file, a .jsonl file, a directory or a glob)"
            )
    docs = [d for d in docs if d]
    if config.max_docs is not None:
        docs = docs[: config.max_docs]
    if not docs:
        raise DataError(f"data source {source!r} has no text: every document is empty")
    return docs


def split_documents(docs: Sequence[str], val_fraction: float) -> tuple[list[str], list[str]]:
    """(train, validation) documents.

    Several documents: round(n * val_fraction) of them (at least 1 when the
    fraction is > 0, at most n - 1), picked by a fixed permutation and kept in
    corpus order. One document: its last round(len * val_fraction) characters.
    """
    docs = list(docs)
    if val_fraction <= 0 or not docs:
        return docs, []
    if len(docs) == 1:
        text = docs[0]
        k = int(round(len(text) * val_fraction))
        if k == 0 or k >= len(text):
            raise DataError(
                f"cannot hold out val_fraction={val_fraction} of a single {len(text)}-character "
                "document; use more text or val_fraction=0"
            )
        return [text[: len(text) - k]], [text[len(text) - k :]]
    n = len(docs)
    n_val = min(max(1, int(round(n * val_fraction))), n - 1)
    perm = np.random.default_rng(_VAL_SPLIT_SEED).permutation(n)
    val_idx = set(perm[:n_val].tolist())
    train = [d for i, d in enumerate(docs) if i not in val_idx]
    val = [d for i, d in enumerate(docs) if i in val_idx]
    return train, val


def _split_text(text: str, max_chars: int) -> list[str]:
    if len(text) <= max_chars:
        return [text]
    out = []
    start = 0
    while len(text) - start > max_chars:
        end = start + max_chars
        cut = text.rfind("\n", start + max_chars // 2, end)
        end = cut + 1 if cut >= 0 else end
        out.append(text[start:end])
        start = end
    out.append(text[start:])
    return out


def make_pieces(docs: Sequence[str], max_chars: int = PIECE_CHARS) -> list[tuple[str, bool, bool]]:
    """(text, is_document_start, is_document_end) for every piece of every document."""
    pieces = []
    for doc in docs:
        parts = _split_text(doc, max_chars)
        for i, part in enumerate(parts):
            pieces.append((part, i == 0, i == len(parts) - 1))
    return pieces


def corpus_stats(config: DataConfig) -> dict:
    """Document and size counts of a source (reads it, does not tokenize it)."""
    groups = load_source_documents(config)
    docs = [d for g in groups for d in g]
    train, val = train_val_documents(config)
    return {
        "source": config.to_dict()["source"],
        "num_documents": len(docs),
        "num_chars": sum(len(d) for d in docs),
        "num_bytes": sum(len(d.encode("utf-8")) for d in docs),
        "num_train_documents": len(train),
        "num_val_documents": len(val),
        "num_train_pieces": len(make_pieces(train)),
    }


# ---------------------------------------------------------------------------
# Tokenizing and packing


class _TokenizePiece:
    """(text, first, last) -> int32 ids: [bos] + encode(text) + [eos]."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        bos, eos = tokenizer.bos_id, tokenizer.eos_id
        self.bos = bos if bos is not None and bos != eos else None
        self.eos = eos

    def __call__(self, piece) -> np.ndarray:
        text, first, last = piece
        ids = self.tokenizer.encode_array(text).astype(np.int32, copy=False)
        head = [self.bos] if (first and self.bos is not None) else []
        tail = [self.eos] if (last and self.eos is not None) else []
        if head or tail:
            ids = np.concatenate([np.asarray(head, np.int32), ids, np.asarray(tail, np.int32)])
        return ids


def _empty_row(seq_len: int, pad_id: int) -> dict:
    row = {k: np.zeros((seq_len,), np.int32) for k in BATCH_KEYS}
    row["tokens"][:] = pad_id
    row["targets"][:] = pad_id
    return row


def _pack_row(seq_len: int, pad_id: int, chunks) -> dict:
    """A row from [(ids, offset, n_pairs)]: pairs ids[offset + i] -> ids[offset + i + 1]."""
    row = _empty_row(seq_len, pad_id)
    fill = 0
    for seg, (ids, off, n) in enumerate(chunks, start=1):
        row["tokens"][fill : fill + n] = ids[off : off + n]
        row["targets"][fill : fill + n] = ids[off + 1 : off + n + 1]
        row["segment_ids"][fill : fill + n] = seg
        row["positions"][fill : fill + n] = np.arange(n, dtype=np.int32)
        row["loss_mask"][fill : fill + n] = 1
        fill += n
    return row


class _PackIterator(grain.DatasetIterator):
    """Packs token-id arrays from the parent into rows (see the module docstring).

    State: the parent's state from before the piece that the next row starts
    in the middle of, and how many of that piece's pairs were already used.
    """

    def __init__(self, parent, seq_len: int, pad_id: int, pad_last: bool):
        super().__init__(parent)
        self._seq_len = seq_len
        self._pad_id = pad_id
        self._pad_last = pad_last
        self._cur: Optional[np.ndarray] = None  # the piece being packed
        self._off = 0  # pairs of it already used
        self._cur_parent_state = None  # parent state from before _cur was read
        self._done = False

    def _next_piece(self) -> bool:
        while True:
            state = copy.deepcopy(self._parent.get_state())
            try:
                ids = next(self._parent)
            except StopIteration:
                self._done = True
                return False
            ids = np.asarray(ids, dtype=np.int32)
            if len(ids) >= 2:
                self._cur, self._off, self._cur_parent_state = ids, 0, state
                return True

    def __next__(self):
        S = self._seq_len
        chunks = []
        fill = 0
        while fill < S and not self._done:
            if self._cur is None and not self._next_piece():
                break
            n = min(S - fill, len(self._cur) - 1 - self._off)
            chunks.append((self._cur, self._off, n))
            fill += n
            self._off += n
            if self._off == len(self._cur) - 1:
                self._cur = None
        if fill == 0 or (fill < S and not self._pad_last):
            raise StopIteration
        return _pack_row(S, self._pad_id, chunks)

    def get_state(self):
        if self._cur is not None:
            return {"parent": copy.deepcopy(self._cur_parent_state), "offset": int(self._off)}
        return {"parent": copy.deepcopy(self._parent.get_state()), "offset": 0}

    def set_state(self, state):
        self._parent.set_state(copy.deepcopy(state["parent"]))
        self._cur, self._off, self._cur_parent_state, self._done = None, 0, None, False
        if state["offset"]:
            if not self._next_piece():
                raise DataError("iterator state does not match the data: the piece it was packing is gone")
            if state["offset"] >= len(self._cur) - 1:
                raise DataError("iterator state does not match the data: offset past the piece's end")
            self._off = int(state["offset"])


class PackIterDataset(grain.IterDataset):
    """Rows of `seq_len` (input, target) pairs from an IterDataset of 1-D token-id arrays.

    pad_last: pad and yield the last, partial row (validation); False drops it.
    """

    def __init__(self, parent, seq_len: int, *, pad_id: int = 0, pad_last: bool = False):
        super().__init__(parent)
        if seq_len < 1:
            raise DataError(f"seq_len must be >= 1, got {seq_len}")
        self._seq_len = int(seq_len)
        self._pad_id = int(pad_id)
        self._pad_last = bool(pad_last)

    def __iter__(self):
        return _PackIterator(self._parent.__iter__(), self._seq_len, self._pad_id, self._pad_last)

    def __str__(self) -> str:
        return f"PackIterDataset(seq_len={self._seq_len})"


class EpochShuffleMapDataset(grain.MapDataset):
    """The parent repeated forever; with shuffle, every epoch in a new order.

    Epoch e is np.random.default_rng([seed, e]).permutation(len(parent)):
    deterministic, and fast for any size (grain's own shuffle is slow on
    datasets of a few elements).
    """

    def __init__(self, parent, *, seed: int, shuffle: bool = True):
        super().__init__(parent)
        self._n = len(parent)
        if self._n == 0:
            raise DataError("cannot repeat an empty dataset")
        self._seed = int(seed)
        self._shuffle = shuffle
        self._perms: dict = {}

    def __len__(self) -> int:
        return sys.maxsize

    def _perm(self, epoch: int) -> np.ndarray:
        perm = self._perms.get(epoch)
        if perm is None:
            perm = np.random.default_rng([self._seed, epoch]).permutation(self._n)
            if len(self._perms) >= 4:
                self._perms = {}
            self._perms[epoch] = perm
        return perm

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.slice(index)
        epoch, j = divmod(int(index), self._n)
        if self._shuffle:
            j = int(self._perm(epoch)[j])
        return self._parent[j]

    def __str__(self) -> str:
        return f"EpochShuffleMapDataset(seed={self._seed}, shuffle={self._shuffle})"


class _WindowShuffleIterator(grain.DatasetIterator):
    """Reads `window` elements, yields them in a permuted order, repeats.

    State: the parent state at the window start, the window index and the
    position in the window (a restore re-reads the window).
    """

    def __init__(self, parent, window: int, seed: int):
        super().__init__(parent)
        self._window_size = window
        self._seed = seed
        self._window_index = 0
        self._pos = 0
        self._window: list = []
        self._start_state = copy.deepcopy(self._parent.get_state())

    def _fill(self):
        self._window = []
        for _ in range(self._window_size):
            try:
                self._window.append(next(self._parent))
            except StopIteration:
                break
        perm = np.random.default_rng([self._seed, self._window_index]).permutation(len(self._window))
        self._window = [self._window[i] for i in perm]

    def __next__(self):
        if self._pos >= len(self._window):
            if self._window:
                self._window_index += 1
            self._start_state = copy.deepcopy(self._parent.get_state())
            self._pos = 0
            self._fill()
            if not self._window:
                raise StopIteration
        item = self._window[self._pos]
        self._window[self._pos] = None
        self._pos += 1
        return item

    def get_state(self):
        return {
            "parent_window_start_state": copy.deepcopy(self._start_state),
            "window_index": self._window_index,
            "pos_in_window": self._pos,
        }

    def set_state(self, state):
        self._start_state = copy.deepcopy(state["parent_window_start_state"])
        self._parent.set_state(copy.deepcopy(self._start_state))
        self._window_index = int(state["window_index"])
        self._pos = int(state["pos_in_window"])
        self._window = []
        if self._pos:
            self._fill()
            for i in range(min(self._pos, len(self._window))):
                self._window[i] = None


class WindowShuffleIterDataset(grain.IterDataset):
    """Shuffles elements within consecutive windows of `window` elements."""

    def __init__(self, parent, *, window: int, seed: int):
        super().__init__(parent)
        self._window = int(window)
        self._seed = int(seed)

    def __iter__(self):
        return _WindowShuffleIterator(self._parent.__iter__(), self._window, self._seed)

    def __str__(self) -> str:
        return f"WindowShuffleIterDataset(window={self._window})"


def pack_token_arrays(arrays, seq_len: int, *, pad_id: int = 0, pad_last: bool = True) -> list[dict]:
    """Pack a finite list of token-id arrays into rows (a helper for tests and tools)."""
    ds = grain.MapDataset.source([np.asarray(a, np.int32) for a in arrays]).to_iter_dataset(
        grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)
    )
    return list(PackIterDataset(ds, seq_len, pad_id=pad_id, pad_last=pad_last))


def _derive_seed(seed: int, stream: int) -> int:
    return int(np.random.SeedSequence([int(seed) & 0xFFFFFFFFFFFFFFFF, stream]).generate_state(1)[0])


def _check_tokenizer(tokenizer) -> Tokenizer:
    tok = load_tokenizer(tokenizer) if (tokenizer is None or isinstance(tokenizer, (str, os.PathLike))) else tokenizer
    if tok.eos_id is None:
        raise DataError(f"the tokenizer {tok!r} has no eos id; documents need one to mark their end")
    return tok


def _read_options():
    # Synchronous reads: grain's thread prefetch costs milliseconds per element
    # (thread hand-offs), far more than tokenizing a piece. num_workers > 0
    # moves the whole pipeline to worker processes instead.
    return grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)


def _ensure_absl_flags_parsed():
    """grain's worker processes read absl flags; outside an absl app they are unparsed."""
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def make_train_dataset(
    data_config: DataConfig,
    tokenizer: Any = None,
    *,
    seq_len: int,
    global_batch_size: int,
    seed: int,
    process_index: int = 0,
    process_count: int = 1,
    documents: Optional[Sequence[str]] = None,
):
    """The grain IterDataset behind `make_train_iterator` (infinite).

    `documents` replaces reading `data_config.source` (the validation split is
    still taken out of them).
    """
    tok = _check_tokenizer(tokenizer if tokenizer is not None else data_config.tokenizer)
    if seq_len < 1:
        raise DataError(f"seq_len must be >= 1, got {seq_len}")
    if not 0 <= process_index < process_count:
        raise DataError(f"process_index must be in [0, {process_count}), got {process_index}")
    if global_batch_size < 1 or global_batch_size % process_count:
        raise DataError(
            f"global_batch_size ({global_batch_size}) must be a positive multiple of "
            f"process_count ({process_count})"
        )
    train, _ = train_val_documents(data_config, documents)
    pieces = make_pieces(train)
    if len(pieces) < process_count:
        raise DataError(
            f"the training split has {len(pieces)} pieces of text, fewer than the "
            f"{process_count} processes that must share them"
        )
    ds = grain.MapDataset.source(pieces)[process_index::process_count]
    ds = EpochShuffleMapDataset(ds, seed=_derive_seed(seed, 0), shuffle=data_config.shuffle)
    ds = ds.map(_TokenizePiece(tok))
    it = ds.to_iter_dataset(_read_options())
    pad_id = tok.pad_id if tok.pad_id is not None else 0
    it = PackIterDataset(it, seq_len, pad_id=pad_id, pad_last=False)
    if data_config.shuffle and data_config.shuffle_window > 1:
        it = WindowShuffleIterDataset(it, window=data_config.shuffle_window, seed=_derive_seed(seed, 1))
    it = it.batch(global_batch_size // process_count, drop_remainder=True)
    if data_config.num_workers > 0:
        _ensure_absl_flags_parsed()
        it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=data_config.num_workers))
    return it


def make_train_iterator(
    data_config: DataConfig,
    tokenizer: Any = None,
    *,
    seq_len: int,
    global_batch_size: int,
    seed: int,
    process_index: int = 0,
    process_count: int = 1,
    documents: Optional[Sequence[str]] = None,
):
    """An endless iterator of this host's training batches.

    Each host reads only its shard of the document pieces and yields
    global_batch_size // process_count rows per batch. The iterator is a
    grain DatasetIterator: `get_state()` (a JSON-serialisable dict) and
    `set_state(state)` checkpoint and restore it exactly. The same seed gives
    the same batches. `tokenizer` is a Tokenizer, a name/path for
    `load_tokenizer`, or None for `data_config.tokenizer`.
    """
    ds = make_train_dataset(
        data_config,
        tokenizer,
        seq_len=seq_len,
        global_batch_size=global_batch_size,
        seed=seed,
        process_index=process_index,
        process_count=process_count,
        documents=documents,
    )
    return iter(ds)


def make_val_batches(
    data_config: DataConfig,
    tokenizer: Any = None,
    *,
    seq_len: int,
    batch_size: int,
    max_batches: Optional[int] = None,
    documents: Optional[Sequence[str]] = None,
) -> list[dict]:
    """The validation split packed in corpus order: a fixed list of batches.

    At most max_batches (None: all) batches of exactly batch_size rows; the
    last row and batch are padded (segment_ids 0, loss_mask 0). [] when
    val_fraction is 0. The same on every host.
    """
    tok = _check_tokenizer(tokenizer if tokenizer is not None else data_config.tokenizer)
    if batch_size < 1:
        raise DataError(f"batch_size must be >= 1, got {batch_size}")
    if max_batches is not None and max_batches < 0:
        raise DataError(f"max_batches must be >= 0 or None, got {max_batches}")
    _, val = train_val_documents(data_config, documents)
    if not val or max_batches == 0:
        return []
    pad_id = tok.pad_id if tok.pad_id is not None else 0
    ds = grain.MapDataset.source(make_pieces(val)).map(_TokenizePiece(tok))
    it = PackIterDataset(ds.to_iter_dataset(_read_options()), seq_len, pad_id=pad_id, pad_last=True)
    batches = []
    rows = []
    for row in it:
        rows.append(row)
        if len(rows) == batch_size:
            batches.append(_stack(rows))
            rows = []
            if max_batches is not None and len(batches) >= max_batches:
                return batches
    if rows:
        while len(rows) < batch_size:
            rows.append(_empty_row(seq_len, pad_id))
        batches.append(_stack(rows))
    return batches


def _stack(rows: list[dict]) -> dict:
    return {k: np.stack([r[k] for r in rows]) for k in BATCH_KEYS}


__all__ = [
    "DataConfig",
    "DataError",
    "DataFileNotFoundError",
    "PIECE_CHARS",
    "BATCH_KEYS",
    "EpochShuffleMapDataset",
    "PackIterDataset",
    "WindowShuffleIterDataset",
    "corpus_stats",
    "data_dir",
    "load_documents",
    "load_source_documents",
    "train_val_documents",
    "make_pieces",
    "make_train_dataset",
    "make_train_iterator",
    "make_val_batches",
    "pack_token_arrays",
    "python_stdlib_files",
    "split_documents",
]
