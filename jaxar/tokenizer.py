"""Tokenizers: a byte-level default and a wrapper for Hugging Face tokenizers.

Every tokenizer implements `Tokenizer`:

* `vocab_size`, `bos_id`, `eos_id`, `pad_id` (the ids are None when absent),
  `eos_ids` (every id that ends generation, `eos_id` first);
* `encode(text) -> list[int]` never adds special tokens: callers add
  `bos_id` / `eos_id` themselves (the data pipeline appends `eos_id` to every
  document and prepends `bos_id` when the tokenizer has one distinct from
  `eos_id`);
* `add_bos`: whether a prompt should start with `bos_id`, as transformers'
  tokenizer would add it (`encode_prompt(text)` does so);
* `decode(ids) -> str` drops special ids and decodes invalid UTF-8 with
  errors="replace";
* `encode_batch(texts)`, `encode_array(text)` (an int32 numpy array) and
  `save(directory)`.

`ByteTokenizer` (the default, no files): ids 0..255 are the bytes of the UTF-8
text, 256 is `<eos>`. `HFTokenizer` wraps a `tokenizer.json`; `gguf_tokenizer`
builds one from a llama.cpp GGUF file's vocabulary (its `chat_template`
attribute holds the file's chat template). `train_bpe` trains a small
byte-level BPE. `load_tokenizer` picks one from a name, a directory or a file.
"""

from __future__ import annotations

import abc
import json
import os
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional, Sequence, Union

import numpy as np

MARKER_FILE = "jaxar_tokenizer.json"
HF_TOKENIZER_FILE = "tokenizer.json"

# Token strings tried for eos, in order, when no config file names one.
_EOS_CANDIDATES = ("<eos>", "</s>", "<|endoftext|>", "<|end_of_text|>")

TokenArg = Union[int, str, None]


class TokenizerNotFoundError(FileNotFoundError, ValueError):
    """No tokenizer where one was asked for (both FileNotFoundError and ValueError)."""


def _as_id_list(ids: Any) -> list[int]:
    """Accept a list/tuple of ints, a numpy or jax array (any shape) or an int."""
    if isinstance(ids, (list, tuple)):
        if all(isinstance(i, (int, np.integer)) for i in ids):
            return [int(i) for i in ids]
    arr = np.asarray(ids)
    if arr.dtype.kind not in "iu":
        if arr.size == 0:
            return []
        raise TypeError(f"token ids must be integers, got dtype {arr.dtype}")
    return [int(i) for i in arr.reshape(-1)]


class Tokenizer(abc.ABC):
    """The interface shared by every jaxar tokenizer."""

    vocab_size: int
    bos_id: Optional[int] = None
    eos_id: Optional[int] = None
    pad_id: Optional[int] = None
    # The chat template a GGUF file carries (`tokenizer.chat_template`); None otherwise
    # (for Hugging Face directories, `jaxar.chat.load_chat_template` reads the files).
    chat_template: Optional[str] = None

    @property
    def eos_ids(self) -> tuple[int, ...]:
        """Every id that ends generation (`eos_id` first); () when none."""
        return () if self.eos_id is None else (self.eos_id,)

    @property
    def add_bos(self) -> bool:
        """True when prompts start with `bos_id` (transformers' `add_special_tokens=True`)."""
        return False

    def encode_prompt(self, text: str) -> list[int]:
        """`encode(text)` with `bos_id` in front when `add_bos`: a generation prompt."""
        ids = self.encode(text)
        return [self.bos_id] + ids if self.add_bos and self.bos_id is not None else ids

    @abc.abstractmethod
    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, without any special token."""

    @abc.abstractmethod
    def decode(self, ids: Any) -> str:
        """Text of `ids` (special ids dropped, invalid UTF-8 replaced)."""

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [self.encode(t) for t in texts]

    def encode_array(self, text: str) -> np.ndarray:
        """`encode(text)` as a 1-D int32 numpy array."""
        return np.asarray(self.encode(text), dtype=np.int32)

    @abc.abstractmethod
    def save(self, directory: Union[str, os.PathLike]) -> None:
        """Write files from which `load_tokenizer(directory)` rebuilds this tokenizer."""


class ByteTokenizer(Tokenizer):
    """UTF-8 bytes as tokens: ids 0..255 are bytes, 256 is `<eos>`.

    There is no bos and no pad token (padding is marked by segment id 0 and
    loss mask 0 in the data pipeline, so its token value does not matter).
    """

    EOS = 256

    def __init__(self):
        self.vocab_size = 257
        self.bos_id = None
        self.eos_id = self.EOS
        self.pad_id = None

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def encode_array(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int32)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [list(t.encode("utf-8")) for t in texts]

    def decode(self, ids: Any) -> str:
        # Every id outside 0..255 (eos, or ids of a padded model vocabulary) is dropped.
        data = bytes(i for i in _as_id_list(ids) if 0 <= i < 256)
        return data.decode("utf-8", errors="replace")

    def save(self, directory: Union[str, os.PathLike]) -> None:
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        marker = {"type": "byte", "vocab_size": self.vocab_size, "eos_id": self.eos_id}
        (d / MARKER_FILE).write_text(json.dumps(marker, indent=2) + "\n")

    def __repr__(self) -> str:
        return "ByteTokenizer(vocab_size=257, eos_id=256)"

    def __eq__(self, other) -> bool:
        return isinstance(other, ByteTokenizer)

    def __hash__(self) -> int:
        return hash(ByteTokenizer)


def _read_json(path: Path) -> Optional[dict]:
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot read {path}: {e}") from e
    return data if isinstance(data, dict) else None


def _token_content(value: Any) -> Optional[str]:
    """`"</s>"` or `{"content": "</s>", ...}` (Hugging Face AddedToken) -> "</s>"."""
    if isinstance(value, str):
        return value
    if isinstance(value, Mapping) and isinstance(value.get("content"), str):
        return value["content"]
    return None


def _id_list(value: Any) -> list[int]:
    if isinstance(value, bool):
        return []
    if isinstance(value, int):
        return [value]
    if isinstance(value, (list, tuple)):
        return [int(v) for v in value if isinstance(v, int) and not isinstance(v, bool)]
    return []


class HFTokenizer(Tokenizer):
    """A Hugging Face `tokenizers` tokenizer (a `tokenizer.json`).

    `source` is a `tokenizers.Tokenizer`, a `tokenizer.json` file or a
    directory holding one. Special ids come from, in order: the constructor
    arguments (an id or a token string), the `jaxar_tokenizer.json` marker,
    `tokenizer_config.json`, `special_tokens_map.json`,
    `generation_config.json`, `config.json` (each looked for next to the
    tokenizer file) and, when nothing names them, the vocabulary: eos is the
    first of <eos>, </s>, <|endoftext|>, <|end_of_text|> present; bos is the
    token the tokenizer's post-processor puts in front of a text, if any.
    """

    def __init__(
        self,
        source: Any,
        *,
        bos_id: TokenArg = None,
        eos_id: TokenArg = None,
        pad_id: TokenArg = None,
        add_bos: Optional[bool] = None,
        extra_eos_ids: Sequence[int] = (),
        chat_template: Optional[str] = None,
    ):
        from tokenizers import Tokenizer as _HFTok

        self.directory: Optional[Path] = None
        if isinstance(source, _HFTok):
            self._tok = source
        else:
            path = Path(source).expanduser()
            if path.is_dir():
                self.directory = path
                path = path / HF_TOKENIZER_FILE
            elif path.is_file():
                self.directory = path.parent
            if not path.is_file():
                raise TokenizerNotFoundError(
                    f"no Hugging Face tokenizer file at {path} (expected a tokenizer.json "
                    "or a directory containing one)"
                )
            try:
                self._tok = _HFTok.from_file(str(path))
            except Exception as e:  # tokenizers raises a plain Exception
                raise ValueError(f"cannot load Hugging Face tokenizer {path}: {e}") from e
        self._configs = self._read_configs(self.directory)
        self.vocab_size = int(self._tok.get_vocab_size(with_added_tokens=True))
        self.eos_id = self._resolve("eos", eos_id)
        self.bos_id = self._resolve("bos", bos_id)
        self.pad_id = self._resolve("pad", pad_id)
        extra = []
        for cfg in (self._configs["marker"], self._configs["generation"], self._configs["model"]):
            key = "eos_ids" if cfg is self._configs["marker"] else "eos_token_id"
            extra += _id_list(cfg.get(key))
        ids = ([] if self.eos_id is None else [self.eos_id]) + extra + [int(i) for i in extra_eos_ids]
        self._eos_ids = tuple(dict.fromkeys(i for i in ids if 0 <= i < self.vocab_size))
        self._add_bos = self._resolve_add_bos() if add_bos is None else bool(add_bos and self.bos_id is not None)
        self.chat_template = chat_template

    # Special tokens ------------------------------------------------------
    @staticmethod
    def _read_configs(directory: Optional[Path]) -> dict:
        names = {
            "marker": MARKER_FILE,
            "tokenizer": "tokenizer_config.json",
            "special": "special_tokens_map.json",
            "generation": "generation_config.json",
            "model": "config.json",
        }
        return {
            k: ((_read_json(directory / f) if directory is not None else None) or {})
            for k, f in names.items()
        }

    def _token_id(self, value: TokenArg, what: str) -> Optional[int]:
        if value is None:
            return None
        if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
            value = int(value)
            if not 0 <= value < self.vocab_size:
                raise ValueError(f"{what} id {value} outside the vocabulary (size {self.vocab_size})")
            return value
        if isinstance(value, str):
            tid = self._tok.token_to_id(value)
            if tid is None:
                raise ValueError(f"{what} token {value!r} is not in the tokenizer's vocabulary")
            return int(tid)
        raise TypeError(f"{what} must be an int id or a token string, got {type(value).__name__}")

    def _resolve(self, kind: str, explicit: TokenArg) -> Optional[int]:
        if explicit is not None:
            return self._token_id(explicit, kind)
        c = self._configs
        marker = c["marker"]
        if marker.get("type") == "hf" and f"{kind}_id" in marker:
            return self._token_id(marker[f"{kind}_id"], kind)
        for cfg in (c["tokenizer"], c["special"]):
            content = _token_content(cfg.get(f"{kind}_token"))
            if content is not None and self._tok.token_to_id(content) is not None:
                return int(self._tok.token_to_id(content))
        for cfg in (c["generation"], c["model"]):
            ids = [i for i in _id_list(cfg.get(f"{kind}_token_id")) if 0 <= i < self.vocab_size]
            if ids:
                return ids[0]
        if kind == "eos":
            for tok in _EOS_CANDIDATES:
                tid = self._tok.token_to_id(tok)
                if tid is not None:
                    return int(tid)
        if kind == "bos":
            with_special = self._tok.encode("a", add_special_tokens=True).ids
            plain = self._tok.encode("a", add_special_tokens=False).ids
            if len(with_special) > len(plain) and with_special[: len(plain)] != plain:
                return int(with_special[0])
        return None

    def _resolve_add_bos(self) -> bool:
        """As transformers: `add_bos_token` in tokenizer_config.json when it is set
        (Llama-style tokenizers rebuild their post-processor from it), otherwise
        whether tokenizer.json's post-processor puts `bos_id` in front of a text."""
        if self.bos_id is None:
            return False
        flag = self._configs["tokenizer"].get("add_bos_token")
        if isinstance(flag, bool):
            return flag
        with_special = self._tok.encode("a", add_special_tokens=True).ids
        plain = self._tok.encode("a", add_special_tokens=False).ids
        return len(with_special) > len(plain) and with_special[0] == self.bos_id and with_special[1:1 + len(plain)] == plain

    @property
    def add_bos(self) -> bool:
        return self._add_bos

    @property
    def eos_ids(self) -> tuple[int, ...]:
        return self._eos_ids

    @property
    def hf_tokenizer(self):
        """The wrapped `tokenizers.Tokenizer`."""
        return self._tok

    def token_to_id(self, token: str) -> Optional[int]:
        return self._tok.token_to_id(token)

    def id_to_token(self, i: int) -> Optional[str]:
        return self._tok.id_to_token(int(i))

    # Encoding ------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        return list(self._tok.encode(text, add_special_tokens=False).ids)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [list(e.ids) for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Any) -> str:
        ids = [i for i in _as_id_list(ids) if 0 <= i < self.vocab_size]
        return self._tok.decode(ids, skip_special_tokens=True)

    def save(self, directory: Union[str, os.PathLike]) -> None:
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        self._tok.save(str(d / HF_TOKENIZER_FILE))

        def tok_str(i):
            return None if i is None else self._tok.id_to_token(i)

        config = dict(self._configs["tokenizer"])
        config.update(
            bos_token=tok_str(self.bos_id),
            eos_token=tok_str(self.eos_id),
            pad_token=tok_str(self.pad_id),
        )
        config.setdefault("tokenizer_class", "PreTrainedTokenizerFast")
        config["add_bos_token"] = self.add_bos
        if self.chat_template is not None:
            config.setdefault("chat_template", self.chat_template)
        (d / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
        marker = {
            "type": "hf",
            "vocab_size": self.vocab_size,
            "bos_id": self.bos_id,
            "eos_id": self.eos_id,
            "pad_id": self.pad_id,
            "eos_ids": list(self.eos_ids),
        }
        (d / MARKER_FILE).write_text(json.dumps(marker, indent=2) + "\n")

    def __repr__(self) -> str:
        return (
            f"HFTokenizer(vocab_size={self.vocab_size}, bos_id={self.bos_id}, "
            f"eos_id={self.eos_id}, pad_id={self.pad_id})"
        )

    def __getstate__(self):
        return {
            "json": self._tok.to_str(),
            "directory": self.directory,
            "configs": self._configs,
            "vocab_size": self.vocab_size,
            "bos_id": self.bos_id,
            "eos_id": self.eos_id,
            "pad_id": self.pad_id,
            "eos_ids": self._eos_ids,
            "add_bos": self._add_bos,
            "chat_template": self.chat_template,
        }

    def __setstate__(self, state):
        from tokenizers import Tokenizer as _HFTok

        self._tok = _HFTok.from_str(state["json"])
        self.directory = state["directory"]
        self._configs = state["configs"]
        self.vocab_size = state["vocab_size"]
        self.bos_id, self.eos_id, self.pad_id = state["bos_id"], state["eos_id"], state["pad_id"]
        self._eos_ids = state["eos_ids"]
        self._add_bos = state.get("add_bos", False)
        self.chat_template = state.get("chat_template")


# ---------------------------------------------------------------------------
# Tokenizers from llama.cpp GGUF files

# llama.cpp's pre-tokenizer regexes (llama-vocab.cpp), applied in turn, by `tokenizer.ggml.pre`.
_GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3_SPLIT = (r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
# pre name -> (regexes, ignore_merges, add_bos when the file does not say)
_GGUF_PRE = {}
for _names, _rule in (
    (("default", "gpt-2", "gpt2", "mpt", "olmo", "jais"), ((_GPT2_SPLIT,), False, False)),
    (("smollm", "starcoder", "refact", "codeshell", "exaone", "minerva"), ((r"\p{N}", _GPT2_SPLIT), False, False)),
    (("llama3", "llama-v3", "llama-bpe", "falcon3", "pixtral", "smaug-bpe", "dbrx"), ((_LLAMA3_SPLIT,), True, True)),
    (("qwen2", "deepseek-r1-qwen", "megrez"), ((_QWEN2_SPLIT,), False, False)),
):
    for _name in _names:
        _GGUF_PRE[_name] = _rule
GGUF_TOKENIZER_MODELS = ("gpt2", "llama")
_CONTROL, _USER_DEFINED = 3, 4


def _byte_level_bpe(md: dict, source: str):
    from tokenizers import Regex
    from tokenizers import Tokenizer as _HFTok
    from tokenizers import decoders, models, pre_tokenizers

    pre = md.get("tokenizer.ggml.pre", "default")
    if pre not in _GGUF_PRE:
        raise ValueError(f"{source}: GGUF pre-tokenizer {pre!r} is not supported; jaxar knows "
                         f"{', '.join(sorted(_GGUF_PRE))}")
    splits, ignore_merges, _ = _GGUF_PRE[pre]
    spelling = pre_tokenizers.ByteLevel.alphabet()
    alphabet = set(spelling)
    byte_chars = _bytes_to_unicode()
    vocab = {}
    for i, token in enumerate(md["tokenizer.ggml.tokens"]):
        if not set(token) <= alphabet:  # written as raw text: spell its bytes in the byte alphabet
            token = "".join(byte_chars[b] for b in token.encode("utf-8"))
        vocab.setdefault(token, i)
    merges = [tuple(m.split(" ", 1)) for m in md.get("tokenizer.ggml.merges", ())]
    tok = _HFTok(models.BPE(vocab=vocab, merges=merges, dropout=None, continuing_subword_prefix="",
                            end_of_word_suffix="", fuse_unk=False, ignore_merges=ignore_merges))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in splits]
        + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    return tok, vocab, alphabet


def _bytes_to_unicode() -> dict:
    """GPT-2's byte -> printable character table."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    chars, n = {}, 0
    for b in range(256):
        if b in keep:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + n)
            n += 1
    return chars


def _sentencepiece_bpe(md: dict, source: str):
    """SentencePiece BPE (llama.cpp's "llama" vocabulary): merges ranked by the score
    of the merged piece, unknown characters as <0xXX> byte tokens."""
    from tokenizers import Tokenizer as _HFTok
    from tokenizers import decoders, models, normalizers

    tokens = md["tokenizer.ggml.tokens"]
    scores = md.get("tokenizer.ggml.scores")
    if scores is None:
        raise ValueError(f"{source}: a SentencePiece GGUF vocabulary needs tokenizer.ggml.scores")
    vocab = {}
    for i, token in enumerate(tokens):
        vocab.setdefault(token, i)
    merges = []
    for token, i in vocab.items():
        pairs = [(token[:k], token[k:]) for k in range(1, len(token)) if token[:k] in vocab and token[k:] in vocab]
        pairs.sort(key=lambda p: (vocab[p[0]], vocab[p[1]]))
        merges += [(float(scores[i]), p) for p in pairs]
    merges.sort(key=lambda m: -m[0])  # stable: ties keep the vocabulary order
    unk = md.get("tokenizer.ggml.unknown_token_id")
    tok = _HFTok(models.BPE(vocab=vocab, merges=[p for _, p in merges], dropout=None, fuse_unk=True,
                            byte_fallback=True, unk_token=None if unk is None else tokens[int(unk)]))
    prefix = bool(md.get("tokenizer.ggml.add_space_prefix", True))
    # As llama.cpp: a space in front of every stretch of text (after each special token too),
    # even one that already starts with a space; spaces written as U+2581.
    steps = [normalizers.Prepend("\u2581")] if prefix else []
    tok.normalizer = normalizers.Sequence(steps + [normalizers.Replace(" ", "\u2581")])
    steps = [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
    if prefix:
        steps.append(decoders.Strip(content=" ", left=1, right=0))
    tok.decoder = decoders.Sequence(steps)
    return tok, vocab, None


def gguf_tokenizer(path: Union[str, os.PathLike, Any]) -> HFTokenizer:
    """The tokenizer a llama.cpp GGUF file describes, as an `HFTokenizer`.

    `path`: a .gguf file (or a `jaxar.convert.gguf.GGUFFile`). Vocabularies:
    `tokenizer.ggml.model` "gpt2" (byte-level BPE; pre-tokenizer by
    `tokenizer.ggml.pre`: gpt-2/default, smollm/starcoder, qwen2, llama-bpe/llama3
    and their aliases) and "llama" (SentencePiece BPE with byte fallback).
    CONTROL tokens become special added tokens, USER_DEFINED ones plain added
    tokens (matched whole, as llama.cpp does). bos/eos/pad ids, `add_bos`
    (`tokenizer.ggml.add_bos_token`, else llama.cpp's default for the
    vocabulary) and `chat_template` come from the metadata; eot/eom ids join `eos_ids`.
    """
    from tokenizers import AddedToken, processors

    from jaxar.convert.gguf import GGUFFile, read_gguf

    file = path if isinstance(path, GGUFFile) else read_gguf(os.fspath(Path(path).expanduser()))
    md, source = file.metadata, file.path
    kind = md.get("tokenizer.ggml.model")
    if kind is None or "tokenizer.ggml.tokens" not in md:
        raise TokenizerNotFoundError(f"{source}: the GGUF file holds no tokenizer (no tokenizer.ggml.model/tokens)")
    if kind == "gpt2":
        tok, vocab, alphabet = _byte_level_bpe(md, source)
        default_add_bos = _GGUF_PRE[md.get("tokenizer.ggml.pre", "default")][2]
    elif kind == "llama":
        tok, vocab, alphabet = _sentencepiece_bpe(md, source)
        default_add_bos = True
    else:
        raise ValueError(f"{source}: GGUF tokenizer model {kind!r} is not supported; jaxar builds "
                         f"{', '.join(GGUF_TOKENIZER_MODELS)}")
    tokens = md["tokenizer.ggml.tokens"]
    types = md.get("tokenizer.ggml.token_type")
    if types is not None:
        special = [AddedToken(t, normalized=False, special=True) for t, ty in zip(tokens, types)
                   if ty == _CONTROL and t in vocab and (alphabet is None or set(t) <= alphabet)]
        user = [AddedToken(t, normalized=False, special=False) for t, ty in zip(tokens, types)
                if ty == _USER_DEFINED and t in vocab]
        if special:
            tok.add_special_tokens(special)
        if user:
            tok.add_tokens(user)

    def token_id(key):
        v = md.get(f"tokenizer.ggml.{key}")
        return None if v is None or not 0 <= int(v) < len(tokens) else int(v)

    bos, eos, pad = token_id("bos_token_id"), token_id("eos_token_id"), token_id("padding_token_id")
    flag = md.get("tokenizer.ggml.add_bos_token")
    add_bos = (bool(flag) if flag is not None else default_add_bos) and bos is not None
    if add_bos:  # so that transformers-style encode(add_special_tokens=True) adds it too
        tok.post_processor = processors.TemplateProcessing(
            single=f"{tokens[bos]}:0 $A:0", pair=f"{tokens[bos]}:0 $A:0 {tokens[bos]}:1 $B:1",
            special_tokens=[(tokens[bos], bos)])
    extra = [i for i in (token_id("eot_token_id"), token_id("eom_token_id")) if i is not None]
    template = md.get("tokenizer.chat_template")
    return HFTokenizer(tok, bos_id=bos, eos_id=eos, pad_id=pad, add_bos=add_bos, extra_eos_ids=extra,
                       chat_template=template if isinstance(template, str) else None)


def train_bpe(
    texts: Iterable[str],
    vocab_size: int,
    *,
    min_frequency: int = 2,
    show_progress: bool = True,
) -> HFTokenizer:
    """Train a byte-level BPE (GPT-2 style) on `texts` with the `tokenizers` library.

    The vocabulary holds `<eos>` (id 0, the tokenizer's eos), the 256 byte
    symbols and learned merges, `vocab_size` in all (fewer if the texts run
    out of merges). Any text round-trips through encode/decode.
    """
    from tokenizers import Tokenizer as _HFTok
    from tokenizers import decoders, models, pre_tokenizers, trainers

    if vocab_size < 257:
        raise ValueError(f"vocab_size must be at least 257 (256 bytes + <eos>), got {vocab_size}")
    tok = _HFTok(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=["<eos>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=show_progress,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return HFTokenizer(tok, eos_id="<eos>")


def load_tokenizer(path_or_name: Union[str, os.PathLike, Tokenizer, None] = None) -> Tokenizer:
    """A tokenizer from a name, a directory or a file.

    * None or "byte": `ByteTokenizer`.
    * A `Tokenizer`: returned as it is.
    * A directory with `jaxar_tokenizer.json` (written by `save`): the kind it names.
    * A directory with `tokenizer.json`, or a `tokenizer.json` file: `HFTokenizer`.
    * A `.gguf` file, or a directory holding exactly one (and no tokenizer.json):
      `gguf_tokenizer` of it.

    Anything else raises `TokenizerNotFoundError` (a ValueError and a
    FileNotFoundError) naming the path and what was expected.
    """
    if isinstance(path_or_name, Tokenizer):
        return path_or_name
    if path_or_name is None or (isinstance(path_or_name, str) and path_or_name.strip().lower() == "byte"):
        return ByteTokenizer()
    path = Path(path_or_name).expanduser()
    expected = (
        "expected 'byte', a directory holding tokenizer.json (Hugging Face) or "
        f"{MARKER_FILE} (written by Tokenizer.save), a tokenizer.json file, or a .gguf file (or a directory holding one)"
    )
    if path.is_file():
        if path.name == MARKER_FILE:
            return load_tokenizer(path.parent)
        if path.suffix.lower() == ".gguf":
            return gguf_tokenizer(path)
        return HFTokenizer(path)
    if not path.is_dir():
        raise TokenizerNotFoundError(f"no tokenizer at {str(path)!r}: the path does not exist; {expected}")
    marker = _read_json(path / MARKER_FILE)
    if marker is not None:
        kind = marker.get("type")
        if kind == "byte":
            return ByteTokenizer()
        if kind == "hf":
            return HFTokenizer(path)
        raise ValueError(f"{path / MARKER_FILE}: unknown tokenizer type {kind!r} (expected 'byte' or 'hf')")
    if (path / HF_TOKENIZER_FILE).is_file():
        return HFTokenizer(path)
    ggufs = sorted(p for p in path.glob("*.gguf") if p.is_file())
    if len(ggufs) == 1:
        return gguf_tokenizer(ggufs[0])
    if len(ggufs) > 1:
        raise TokenizerNotFoundError(
            f"directory {str(path)!r} holds several GGUF files ({', '.join(p.name for p in ggufs)}); "
            "pass the one whose tokenizer to use")
    raise TokenizerNotFoundError(
        f"no tokenizer in directory {str(path)!r}: it has neither {HF_TOKENIZER_FILE} nor {MARKER_FILE}; {expected}"
    )


__all__ = [
    "Tokenizer",
    "ByteTokenizer",
    "HFTokenizer",
    "TokenizerNotFoundError",
    "gguf_tokenizer",
    "train_bpe",
    "load_tokenizer",
    "MARKER_FILE",
]
