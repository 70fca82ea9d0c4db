"""The KV cache: explicit static buffers plus a length per row.

Each layer has its own K and V buffer (`k[layer]`, `v[layer]`, each
`[batch, max_len, kv_heads, head_dim]`), so a decode step writes only the new
slots of each layer in place (no per-layer slice out of a stacked buffer and
back). Each row of a batch has its own length, so rows at different lengths
(ragged prompts, different numbers of accepted speculative drafts) need no
realignment. Entries at or beyond a row's length are ignored by attention and
overwritten by later writes; rolling back rejected drafts is lowering
`lengths`.
"""

from __future__ import annotations

from typing import NamedTuple, Tuple

import jax
import jax.numpy as jnp

from jaxar.config import ModelConfig


class KVCache(NamedTuple):
    # n_layers x [batch, max_len, kv_heads, head_dim]
    k: Tuple[jax.Array, ...]
    # n_layers x [batch, max_len, kv_heads, head_dim]
    v: Tuple[jax.Array, ...]
    # [batch] int32: valid entries per row. Slot i of a row holds the token at
    # position i of that row.
    lengths: jax.Array

    @classmethod
    def empty(cls, config: ModelConfig, batch: int, max_len: int, dtype=None) -> "KVCache":
        """Zeroed buffers for `batch` rows of up to `max_len` tokens each."""
        if max_len > config.max_seq_len and config.position == "learned":
            raise ValueError(
                f"cache max_len={max_len} exceeds the model's learned positions ({config.max_seq_len}); "
                f"use max_len <= {config.max_seq_len}")
        dtype = jnp.dtype(dtype or config.dtype)
        shape = (batch, max_len, config.num_kv_heads, config.dim_per_head)
        zeros = lambda: tuple(jnp.zeros(shape, dtype) for _ in range(config.n_layers))  # noqa: E731
        return cls(k=zeros(), v=zeros(), lengths=jnp.zeros((batch,), jnp.int32))

    @property
    def max_len(self) -> int:
        return self.k[0].shape[1]

    @property
    def batch(self) -> int:
        return self.k[0].shape[0]

    @property
    def n_layers(self) -> int:
        return len(self.k)

    def with_lengths(self, lengths: jax.Array) -> "KVCache":
        return self._replace(lengths=jnp.asarray(lengths, jnp.int32))

    def take_rows(self, rows: jax.Array) -> "KVCache":
        """The cache of rows `rows` (int [n]), e.g. beams reordered or repeated."""
        take = lambda bufs: tuple(b[rows] for b in bufs)  # noqa: E731
        return KVCache(k=take(self.k), v=take(self.v), lengths=self.lengths[rows])

    def repeat_rows(self, n: int) -> "KVCache":
        """Each row repeated `n` times in place (row b -> rows b*n .. b*n+n-1)."""
        return self.take_rows(jnp.repeat(jnp.arange(self.batch), n))

    def nbytes(self) -> int:
        return sum(b.size * b.dtype.itemsize for b in self.k + self.v)
