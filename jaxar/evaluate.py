"""Perplexity of a text model over a text source (the library side of `eval.py`).

    windows = token_windows(documents, tokenizer, seq_len=1024)
    result = perplexity(params, config, windows, batch_size=8)
    result.nats_per_token, result.perplexity, result.bits_per_byte

Each document is tokenized on its own by the model's tokenizer (`bos_id` in
front when the tokenizer's `add_bos`) and cut into windows of `seq_len` input
tokens; window k holds the document's tokens [k*seq_len, (k+1)*seq_len] (one
more than its inputs: the last is only a target, and the next window's first
input), so windows never overlap in what they score, attention restarts at
every window, and every token of a document after its first is scored exactly
once. Windows never cross documents. The last window of a document may be
shorter (padded and masked). `max_tokens` stops after that many scored tokens.

bits/byte = total nats / ln 2 / the UTF-8 bytes of the scored tokens' text
(the decoded targets, special tokens dropped): a measure that does not depend
on the tokenizer.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import sys
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxar.config import ModelConfig


@dataclasses.dataclass
class Windows:
    """Scoring windows, each row `tokens[i, :lengths[i] + 1]` (inputs and targets shifted by one).

    tokens: [n, seq_len + 1] int32, padded with 0. lengths: [n] scored tokens of each window.
    n_bytes: UTF-8 bytes of the scored text (see the module docstring).
    """

    tokens: np.ndarray
    lengths: np.ndarray
    n_bytes: int
    seq_len: int

    @property
    def num_tokens(self) -> int:
        return int(self.lengths.sum())


@dataclasses.dataclass
class PerplexityResult:
    nats_per_token: float
    perplexity: float
    bits_per_byte: float
    total_nats: float
    tokens: int
    bytes: int
    windows: int
    seq_len: int

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def token_windows(documents: Sequence[str], tokenizer, *, seq_len: int, max_tokens: Optional[int] = None
                  ) -> Windows:
    """The scoring windows of `documents` under `tokenizer` (see the module docstring)."""
    if seq_len < 1:
        raise ValueError(f"seq_len must be >= 1, got {seq_len}")
    if max_tokens is not None and max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
    rows, lengths, n_bytes = [], [], 0
    budget = max_tokens
    bos = [tokenizer.bos_id] if tokenizer.add_bos and tokenizer.bos_id is not None else []
    for ids in _encoded(documents, tokenizer):
        if budget is not None and budget <= 0:
            break
        ids = bos + ids
        if budget is not None:
            ids = ids[:budget + 1]
        if len(ids) < 2:
            continue
        for start in range(0, len(ids) - 1, seq_len):
            chunk = ids[start:start + seq_len + 1]
            rows.append(np.pad(np.asarray(chunk, np.int32), (0, seq_len + 1 - len(chunk))))
            lengths.append(len(chunk) - 1)
        n_bytes += len(tokenizer.decode(ids[1:]).encode("utf-8"))
        if budget is not None:
            budget -= len(ids) - 1
    if not rows:
        raise ValueError("the text gives no token to score (every document is shorter than two tokens)")
    return Windows(np.stack(rows), np.asarray(lengths, np.int32), n_bytes, seq_len)


def _encoded(documents: Sequence[str], tokenizer, chunk: int = 64):
    """Token ids of each document in turn, encoded `chunk` documents at a time (in parallel for HF tokenizers)."""
    for start in range(0, len(documents), chunk):
        yield from (list(ids) for ids in tokenizer.encode_batch(list(documents[start:start + chunk])))


@functools.partial(jax.jit, static_argnames="config")
def _window_nats(params, tokens, lengths, config: ModelConfig):
    from jaxar.train.trainer import cross_entropy_sums

    # tokens: [batch, seq_len + 1]; lengths: [batch]
    seq_len = tokens.shape[1] - 1
    position = jnp.arange(seq_len)[None, :]
    mask = position < lengths[:, None]
    batch = {
        "tokens": tokens[:, :-1],
        "targets": tokens[:, 1:],
        "positions": jnp.broadcast_to(position, mask.shape),
        "segment_ids": mask.astype(jnp.int32),
        "loss_mask": mask,
    }
    return cross_entropy_sums(params, batch, config)


def perplexity(params, config: ModelConfig, windows: Windows, *, batch_size: int = 8, progress: bool = True
               ) -> PerplexityResult:
    """Score `windows` in batches of `batch_size` (one compiled program; the last
    batch is padded with empty windows). tqdm progress on stderr when `progress`."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if windows.seq_len > config.max_seq_len:
        raise ValueError(f"seq_len {windows.seq_len} is longer than the model's context ({config.max_seq_len})")
    n = len(windows.lengths)
    batch_size = min(batch_size, n)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=windows.num_tokens, desc="scoring", unit="tok", file=sys.stderr, leave=False)
    total, count = 0.0, 0
    for start in range(0, n, batch_size):
        tokens = windows.tokens[start:start + batch_size]
        lengths = windows.lengths[start:start + batch_size]
        pad = batch_size - len(lengths)
        if pad:
            tokens = np.pad(tokens, ((0, pad), (0, 0)))
            lengths = np.pad(lengths, (0, pad))
        nats, scored = jax.device_get(_window_nats(params, jnp.asarray(tokens), jnp.asarray(lengths), config))
        total += float(nats)
        count += int(round(float(scored)))
        if bar is not None:
            bar.update(int(lengths.sum()))
    if bar is not None:
        bar.close()
    nats_per_token = total / count
    return PerplexityResult(
        nats_per_token=nats_per_token, perplexity=math.exp(nats_per_token),
        bits_per_byte=total / math.log(2) / windows.n_bytes if windows.n_bytes else float("nan"),
        total_nats=total, tokens=count, bytes=windows.n_bytes, windows=n, seq_len=windows.seq_len)


__all__ = ["PerplexityResult", "Windows", "perplexity", "token_windows"]
