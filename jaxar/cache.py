"""The KV cache: explicit static buffers plus a length per row.

Each row of a batch has its own length, so rows at different lengths (ragged
prompts, different numbers of accepted speculative drafts) need no
realignment. Entries at or beyond a row's length are ignored by attention and
overwritten by later writes; rolling back rejected drafts is lowering
`lengths`.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from jaxar.config import ModelConfig


class KVCache(NamedTuple):
    # [layers, batch, max_len, kv_heads, head_dim]
    k: jax.Array
    # [layers, batch, max_len, kv_heads, head_dim]
    v: jax.Array
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
        shape = (config.n_layers, batch, max_len, config.num_kv_heads, config.dim_per_head)
        return cls(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype), lengths=jnp.zeros((batch,), jnp.int32))

    @property
    def max_len(self) -> int:
        return self.k.shape[2]

    @property
    def batch(self) -> int:
        return self.k.shape[1]

    def with_lengths(self, lengths: jax.Array) -> "KVCache":
        return self._replace(lengths=jnp.asarray(lengths, jnp.int32))

    def nbytes(self) -> int:
        return self.k.size * self.k.dtype.itemsize * 2
