"""Text corpora -> packed, shuffled, checkpointable batches of token ids (grain).

Pipeline (training)::

    documents (strings, or conversations from chat JSONL)
      -> pieces: documents longer than PIECE_CHARS are cut at line breaks into
         pieces of at most that many characters (shard and shuffle granularity);
         a conversation is one piece
      -> this host's shard of the pieces (pieces[process_index::process_count])
      -> shuffle the pieces by seed, a new order every epoch, repeat forever
         (EpochShuffleMapDataset, hand-written: see its docstring)
      -> tokenize: [bos] (first piece of a document only, when the tokenizer has
         a bos distinct from eos) + encode(piece) + [eos] (last piece only);
         a conversation: its chat-template render, with a per-token mask of
         the assistant tokens (`chat_segments`)
      -> pack into rows of seq_len (input, target) pairs (grain's
         ConcatThenSplitIterDataset, `pack_rows`)
      -> shuffle rows in windows of `shuffle_window` rows (grain's
         WindowShuffleIterDataset)
      -> batch (global_batch_size // process_count rows)

Batch format: a dict of int32 numpy arrays, each [batch, seq_len]:

* `tokens`: input ids;
* `targets`: the id that follows `tokens` in the same document;
* `segment_ids`: 1, 2, 3, ... for the document chunks of a row, 0 = padding;
* `positions`: position within the chunk, starting at 0 at every chunk;
* `loss_mask`: 1 where `targets` carries loss: for text, every real next
  token (the final eos included); for a conversation, the assistant tokens
  only (each assistant message's content and its end-of-turn token); 0 on
  padding. The trainer's loss is the mean over loss_mask.

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

Shuffling is seeded from `seed`: the pieces (a numpy permutation, a new
order every epoch) and the rows (windows of `shuffle_window` rows; memory:
window * seq_len * 20 bytes). With num_workers > 0 each grain worker process
runs this on its slice of the pieces and batches are interleaved.

The iterator returned by `make_train_iterator` is a grain DatasetIterator:
`get_state()` returns a JSON-serialisable dict and `set_state(state)`
restores it, after which it yields exactly the batches an uninterrupted
iterator would.
"""

from __future__ import annotations

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
import grain.experimental as gex
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
        document per line, in `text_field`; or a conversation, a list of
        {"role", "content"} messages in `messages_field`, rendered with the
        tokenizer's chat template, loss on the assistant tokens only), a directory (every non-hidden,
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
    messages_field: str = "messages"
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
        for name in ("text_field", "messages_field"):
            v = getattr(self, name)
            if not isinstance(v, str) or not v:
                raise DataError(f"{name} must be a non-empty string, got {v!r}")
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


def _read_messages(value, where: str) -> "Chat":
    if not isinstance(value, list) or not value:
        raise DataError(f"{where}: messages must be a non-empty list of {{\"role\", \"content\"}} objects")
    for i, m in enumerate(value):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise DataError(f"{where}: message {i} must be an object with string \"role\" and \"content\", "
                            f"got {json.dumps(m)[:80]}")
    if not any(m["role"] == "assistant" for m in value):
        raise DataError(f"{where}: the conversation has no assistant message, so nothing to learn from")
    return Chat(value)


def _read_jsonl(path: Path, text_field: str, messages_field: str = "messages") -> list:
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
        if text_field not in record and messages_field in record:
            docs.append(_read_messages(record[messages_field], f"{path}:{lineno}"))
            continue
        if text_field not in record:
            fields = ", ".join(repr(k) for k in list(record)[:10])
            raise DataError(f"{path}:{lineno}: no field {text_field!r} or {messages_field!r} "
                            f"(the record has: {fields})")
        value = record[text_field]
        if not isinstance(value, str):
            raise DataError(
                f"{path}:{lineno}: field {text_field!r} must be a string, got {type(value).__name__}"
            )
        docs.append(value)
    return docs


def _read_file(path: Path, text_field: str, messages_field: str = "messages") -> list:
    if _is_jsonl(path):
        return _read_jsonl(path, text_field, messages_field)
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
            docs = _read_file(path, config.text_field, config.messages_field)
        elif path.is_dir():
            files = [p for p in _walk_files(path) if _is_jsonl(p) or not _looks_binary(p)]
            if not files:
                raise DataError(f"data source directory {str(path)!r} holds no text files")
            docs = [d for p in files for d in _read_file(p, config.text_field, config.messages_field)]
        elif _has_glob(source):
            files = sorted(
                Path(p) for p in _glob.glob(os.path.expanduser(source), recursive=True) if os.path.isfile(p)
            )
            if not files:
                raise DataFileNotFoundError(f"data source glob {source!r} matches no files")
            docs = [d for p in files for d in _read_file(p, config.text_field, config.messages_field)]
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
    if len(docs) == 1 and isinstance(docs[0], Chat):
        raise DataError(f"cannot hold out val_fraction={val_fraction} of a single conversation; "
                        "use more conversations or val_fraction=0")
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
        if isinstance(doc, Chat):  # a conversation is never cut (its rows split it if it is long)
            pieces.append((doc, True, True))
            continue
        parts = _split_text(doc, max_chars)
        for i, part in enumerate(parts):
            pieces.append((part, i == 0, i == len(parts) - 1))
    return pieces


def corpus_stats(config: DataConfig) -> dict:
    """Document and size counts of a source (reads it, does not tokenize it)."""
    groups = load_source_documents(config)
    docs = [d for g in groups for d in g]
    train, val = train_val_documents(config)
    texts = [d if isinstance(d, str) else "".join(m["content"] for m in d) for d in docs]
    return {
        "source": config.to_dict()["source"],
        "num_documents": len(docs),
        "num_chars": sum(len(t) for t in texts),
        "num_bytes": sum(len(t.encode("utf-8")) for t in texts),
        "num_train_documents": len(train),
        "num_val_documents": len(val),
        "num_train_pieces": len(make_pieces(train)),
    }


# ---------------------------------------------------------------------------
# Tokenizing and packing


class Chat(tuple):
    """A conversation document: a tuple of {"role", "content"} messages (from a chat JSONL record)."""

    __slots__ = ()

    def __repr__(self) -> str:
        return f"Chat({list(self)!r})"


def chat_segments(render, messages: Sequence[dict], end_of_turn: Sequence[str] = ()) -> list[tuple[str, bool]]:
    """The rendered conversation as [(text, is_assistant)], in order, concatenating to the whole render.

    render(messages, add_generation_prompt) -> str is the model's chat
    template (`jaxar.chat.ChatTemplate.render`). The conversation is rendered
    prefix by prefix: an assistant message's span is what its turn adds
    after the assistant header (the render with add_generation_prompt=True),
    up to and including the first end-of-turn text in it (`end_of_turn`,
    e.g. "<|im_end|>"); what follows that (a newline) is not assistant text.
    A template whose renders of longer prefixes do not extend the shorter
    ones cannot be split this way and raises DataError.
    """
    segments: list[tuple[str, bool]] = []
    prev = ""

    def extend(text: str, what: str) -> str:
        if not text.startswith(prev):
            raise DataError(f"the chat template's render of {what} does not extend the render of the messages "
                            "before it; cannot find the assistant tokens of this conversation")
        return text[len(prev):]

    for i, message in enumerate(messages):
        if message.get("role") == "assistant":
            head = render(messages[:i], True)
            segments.append((extend(head, f"the assistant header of message {i}"), False))
            prev = head
            full = render(messages[: i + 1], False)
            body = extend(full, f"message {i}")
            cuts = [body.find(t) + len(t) for t in end_of_turn if t and body.find(t) >= 0]
            cut = min(cuts) if cuts else len(body)
            segments.append((body[:cut], True))
            segments.append((body[cut:], False))
        else:
            full = render(messages[: i + 1], False)
            segments.append((extend(full, f"message {i}"), False))
        prev = full
    return [(t, a) for t, a in segments if t]


class _TokenizePiece:
    """(text, first, last) -> {"ids", "targets_mask"}: [bos] + encode(text) + [eos], mask all ones.

    A Chat piece is rendered with the chat template of `chat_dir` (loaded on
    first use) and encoded segment by segment; targets_mask is 1 exactly on
    the assistant tokens (content and end-of-turn token), which are the only
    targets that carry loss. No bos / eos is added: the template writes the
    special tokens it wants (as transformers' apply_chat_template does).
    """

    def __init__(self, tokenizer: Tokenizer, chat_dir: Optional[str] = None):
        self.tokenizer = tokenizer
        bos, eos = tokenizer.bos_id, tokenizer.eos_id
        self.bos = bos if bos is not None and bos != eos else None
        self.eos = eos
        self.chat_dir = chat_dir
        self._chat = None  # (render, end-of-turn texts), built on first use (templates do not pickle)

    def __getstate__(self):
        return {**self.__dict__, "_chat": None}

    def _chat_renderer(self):
        if self._chat is None:
            try:
                from jaxar import chat
            except ImportError as e:  # pragma: no cover - jaxar.chat ships with jaxar
                raise DataError(f"chat documents need jaxar.chat ({e})") from None
            where = self.chat_dir if self.chat_dir and os.path.isdir(str(self.chat_dir)) else None
            template = chat.load_chat_template(where, self.tokenizer)
            if template is None:
                raise DataError(f"the data holds chat messages but the tokenizer {self.chat_dir!r} has no chat "
                                "template (chat_template.jinja or tokenizer_config.json's chat_template)")
            eot = [t for t in chat.END_OF_TURN_TOKENS]
            id_to_token = getattr(self.tokenizer, "id_to_token", None)
            if callable(id_to_token) and self.eos is not None:
                text = id_to_token(self.eos)
                if text:
                    eot.append(text)
            self._chat = (lambda msgs, gen: template.render(msgs, add_generation_prompt=gen), tuple(eot))
        return self._chat

    def __call__(self, piece) -> dict:
        text, first, last = piece
        if isinstance(text, Chat):
            render, eot = self._chat_renderer()
            ids, mask = [], []
            for segment, is_assistant in chat_segments(render, list(text), eot):
                seg_ids = self.tokenizer.encode(segment)
                ids += seg_ids
                mask += [int(is_assistant)] * len(seg_ids)
            return {"ids": np.asarray(ids, np.int32), "targets_mask": np.asarray(mask, np.int32)}
        ids = self.tokenizer.encode_array(text).astype(np.int32, copy=False)
        head = [self.bos] if (first and self.bos is not None) else []
        tail = [self.eos] if (last and self.eos is not None) else []
        if head or tail:
            ids = np.concatenate([np.asarray(head, np.int32), ids, np.asarray(tail, np.int32)])
        return {"ids": ids, "targets_mask": np.ones(len(ids), np.int32)}


def _as_piece(element) -> dict:
    """A tokenized piece as {"ids", "targets_mask"} (a bare id array: every target carries loss)."""
    if isinstance(element, dict):
        return element
    ids = np.asarray(element, np.int32)
    return {"ids": ids, "targets_mask": np.ones(len(ids), np.int32)}


def _has_pairs(element) -> bool:
    return len(_as_piece(element)["ids"]) >= 2


def _pairs(element) -> dict:
    """A tokenized piece -> its (input, target) pairs: tokens, targets, loss_mask (each [L - 1])."""
    piece = _as_piece(element)
    ids = np.asarray(piece["ids"], np.int32)
    return {"tokens": ids[:-1], "targets": ids[1:],
            "loss_mask": np.asarray(piece["targets_mask"], np.int32)[1:]}


class _RowFromPacked:
    """grain's packed features -> the batch row format (BATCH_KEYS); padding gets pad_id and no loss."""

    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, packed: dict) -> dict:
        seg = np.asarray(packed["tokens_segment_ids"], np.int32)
        pad = seg == 0
        tokens = np.where(pad, self.pad_id, packed["tokens"]).astype(np.int32)
        targets = np.where(pad, self.pad_id, packed["targets"]).astype(np.int32)
        return {"tokens": tokens, "targets": targets, "segment_ids": seg,
                "positions": np.asarray(packed["tokens_positions"], np.int32),
                "loss_mask": np.where(pad, 0, packed["loss_mask"]).astype(np.int32)}


def _empty_row(seq_len: int, pad_id: int) -> dict:
    row = {k: np.zeros((seq_len,), np.int32) for k in BATCH_KEYS}
    row["tokens"][:] = pad_id
    row["targets"][:] = pad_id
    return row


def pack_rows(parent, seq_len: int, *, pad_id: int = 0):
    """Rows of `seq_len` (input, target) pairs from an IterDataset of tokenized pieces (grain).

    Elements: 1-D id arrays, or {"ids", "targets_mask"} dicts (targets_mask[j]
    = 1 when token j carries loss as a target). Packing is grain's
    `ConcatThenSplitIterDataset` on each piece's pairs (tokens, targets,
    loss_mask): pieces fill rows in order, a piece that does not fit is split
    and goes on in the next row as a new segment whose positions restart at
    0, segment ids restart at 1 in every row, and a finite stream ends with
    one padded row. Its get_state / set_state restore the position exactly
    (mid-piece included). One difference from a plain concatenation: a piece
    of exactly seq_len pairs that arrives while a row is partly filled is
    emitted first (grain passes full rows through); no pair is lost or repeated.
    """
    if seq_len < 1:
        raise DataError(f"seq_len must be >= 1, got {seq_len}")
    import grain.experimental as gex

    pairs = parent.filter(_has_pairs).map(_pairs)
    packed = gex.ConcatThenSplitIterDataset(
        pairs, length_struct={"tokens": seq_len, "targets": seq_len, "loss_mask": seq_len})
    return _JsonStateIterDataset(packed).map(_RowFromPacked(int(pad_id)))


def _tuples(state):
    """A state read back from JSON with its lists as tuples again (grain's packer compares
    its remainder slices with tuples, and a list never equals a tuple)."""
    if isinstance(state, dict):
        return {k: _tuples(v) for k, v in state.items()}
    if isinstance(state, list):
        return tuple(_tuples(v) for v in state)
    return state


class _JsonStateIterator(grain.DatasetIterator):
    def __next__(self):
        return next(self._parent)

    def get_state(self):
        return self._parent.get_state()

    def set_state(self, state):
        self._parent.set_state(_tuples(state))


class _JsonStateIterDataset(grain.IterDataset):
    """The parent, whose iterator also restores a state that went through JSON (see `_tuples`)."""

    def __iter__(self):
        return _JsonStateIterator(self._parent.__iter__())


class EpochShuffleMapDataset(grain.MapDataset):
    """The parent repeated forever; with shuffle, every epoch in a new order.

    Epoch e is np.random.default_rng([seed, e]).permutation(len(parent)):
    deterministic, and fast for any size. Hand-written rather than grain's
    `MapDataset.shuffle(seed).repeat()` (which also reshuffles every epoch):
    grain's index shuffle costs ~10 ms per element on datasets of a few
    elements (a corpus of a handful of long documents cut into pieces), which
    would dominate reading; this one costs one permutation per epoch.
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


def pack_token_arrays(arrays, seq_len: int, *, pad_id: int = 0, pad_last: bool = True) -> list[dict]:
    """Pack a finite list of token-id arrays (or {"ids", "targets_mask"} dicts) into rows
    (a helper for tests and tools); pad_last=False drops the last, padded row."""
    ds = grain.MapDataset.source([_as_piece(a) for a in arrays]).to_iter_dataset(_read_options())
    rows = list(pack_rows(ds, seq_len, pad_id=pad_id))
    if rows and not pad_last and int(rows[-1]["segment_ids"][-1]) == 0:
        rows = rows[:-1]
    return rows


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
    ds = ds.map(_TokenizePiece(tok, data_config.tokenizer))
    it = ds.to_iter_dataset(_read_options())
    pad_id = tok.pad_id if tok.pad_id is not None else 0
    it = pack_rows(it, seq_len, pad_id=pad_id)
    if data_config.shuffle and data_config.shuffle_window > 1:
        it = gex.WindowShuffleIterDataset(it, window_size=data_config.shuffle_window, seed=_derive_seed(seed, 1))
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
    ds = grain.MapDataset.source(make_pieces(val)).map(_TokenizePiece(tok, data_config.tokenizer))
    it = pack_rows(ds.to_iter_dataset(_read_options()), seq_len, pad_id=pad_id)
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
    "Chat",
    "EpochShuffleMapDataset",
    "chat_segments",
    "pack_rows",
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
