"""The KV cache: explicit static buffers plus a length per row.

Each layer has its own K and V buffer (`k[layer]`, `v[layer]`, each
`[batch, max_len, kv_heads, head_dim]`), so a decode step writes only the new
slots of each layer in place (no per-layer slice out of a stacked buffer and
back). Each row of a batch has its own length, so rows at different lengths
(ragged prompts, different numbers of accepted speculative drafts) need no
realignment. Entries at or beyond a row's length are ignored by attention and
overwritten by later writes; rolling back rejected drafts is lowering
`lengths`.

With `config.kv_cache_dtype == "int8"` the buffers hold int8 values and
`k_scale[layer]`, `v_scale[layer]` (`[batch, max_len, kv_heads]` float32)
one symmetric scale per slot and kv head: a write quantizes each new
(token, head) vector by its own max |x| / 127 (`jaxar.quant.quantize_kv`),
attention dequantizes chunk by chunk. Float caches have empty scale tuples.
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
    # int8 caches: n_layers x [batch, max_len, kv_heads] float32 scales; float caches: ().
    k_scale: Tuple[jax.Array, ...] = ()
    v_scale: Tuple[jax.Array, ...] = ()

    @classmethod
    def empty(cls, config: ModelConfig, batch: int, max_len: int, dtype=None) -> "KVCache":
        """Zeroed buffers for `batch` rows of up to `max_len` tokens each, stored
        in `dtype` (default `config.cache_dtype`: int8 adds the scale buffers)."""
        if max_len > config.max_seq_len and config.position == "learned":
            raise ValueError(
                f"cache max_len={max_len} exceeds the model's learned positions ({config.max_seq_len}); "
                f"use max_len <= {config.max_seq_len}")
        dtype = jnp.dtype(dtype or config.cache_dtype)
        shape = (batch, max_len, config.num_kv_heads, config.dim_per_head)
        zeros = lambda shape, dtype: tuple(jnp.zeros(shape, dtype) for _ in range(config.n_layers))  # noqa: E731
        scales = ()
        if dtype == jnp.int8:
            scales = zeros(shape[:3], jnp.float32)
        return cls(k=zeros(shape, dtype), v=zeros(shape, dtype), lengths=jnp.zeros((batch,), jnp.int32),
                   k_scale=scales, v_scale=scales)

    @property
    def quantized(self) -> bool:
        return len(self.k_scale) > 0

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
        return KVCache(k=take(self.k), v=take(self.v), lengths=self.lengths[rows], k_scale=take(self.k_scale),
                       v_scale=take(self.v_scale))

    def repeat_rows(self, n: int) -> "KVCache":
        """Each row repeated `n` times in place (row b -> rows b*n .. b*n+n-1)."""
        return self.take_rows(jnp.repeat(jnp.arange(self.batch), n))

    def nbytes(self) -> int:
        return sum(b.size * b.dtype.itemsize for b in self.k + self.v + self.k_scale + self.v_scale)

    def layer(self, i: int) -> tuple:
        """Layer i's buffers: (k, v) or, int8, (k, v, k_scale, v_scale)."""
        if self.quantized:
            return self.k[i], self.v[i], self.k_scale[i], self.v_scale[i]
        return self.k[i], self.v[i]
