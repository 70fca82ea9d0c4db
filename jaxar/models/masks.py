"""One description of who attends to whom, shared by every attention backend.

Every token carries an integer *order id*; key j is visible to query i iff

    order_id[j] <= order_id[i]   and (when packed) segment_id[j] == segment_id[i].

The kinds are choices of order ids:

* ``causal``: order id = position t (key j visible iff j <= i);
* ``bidirectional``: order id = 0 everywhere (everything visible);
* ``block_causal``: order id = block id (full within a block, causal across blocks:
  VAR scales, block diffusion);
* ``prefix``: order id = 0 for t < P (the prefix sees itself fully), t after.

Packed segment ids combine with any kind. The XLA / cuDNN paths take :meth:`Mask.dense`;
a kernel needs a single mode, the order ids (:meth:`Mask.order_ids`, the ``block_ids`` of
``pallas_kernels.flash_attention``), or its cheaper special cases (:meth:`Mask.flash_kwargs`).

A tree among new tokens (draft verification) is not expressible as ids: it stays an explicit
``[B, T, T]`` bool, see :func:`cache_mask`.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import jax
import jax.numpy as jnp

__all__ = ["KINDS", "NEW_KINDS", "Mask", "cache_mask"]

KINDS = ("causal", "bidirectional", "block_causal", "prefix")
NEW_KINDS = ("causal", "bidirectional")

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class Mask:
    """Mask description; a pytree whose `kind` is static and whose arrays are leaves.

    Attributes:
      kind: "causal" | "bidirectional" | "block_causal" | "prefix".
      block_ids: int [B, T], block of each token (block_causal only).
      prefix_len: int [B], bidirectional prefix length of each row (prefix only).
      segment_ids: int [B, T], packed documents (any kind): tokens only see their own document.
    """

    kind: str
    block_ids: Optional[Array] = None
    prefix_len: Optional[Array] = None
    segment_ids: Optional[Array] = None

    def validate(self) -> "Mask":
        """Checks the kind and its fields. The constructors call it (not __post_init__: jax
        rebuilds pytrees with placeholder leaves)."""
        if self.kind not in KINDS:
            raise ValueError(f"Mask: kind must be one of {KINDS}, got {self.kind!r}")
        if (self.kind == "block_causal") != (self.block_ids is not None):
            raise ValueError(f"Mask: block_ids go with kind 'block_causal' only, got kind={self.kind!r}")
        if (self.kind == "prefix") != (self.prefix_len is not None):
            raise ValueError(f"Mask: prefix_len goes with kind 'prefix' only, got kind={self.kind!r}")
        return self

    @staticmethod
    def causal(segment_ids=None) -> "Mask":
        return Mask("causal", segment_ids=segment_ids).validate()

    @staticmethod
    def bidirectional(segment_ids=None) -> "Mask":
        return Mask("bidirectional", segment_ids=segment_ids).validate()

    @staticmethod
    def block_causal(block_ids, segment_ids=None) -> "Mask":
        return Mask("block_causal", block_ids=block_ids, segment_ids=segment_ids).validate()

    @staticmethod
    def prefix(prefix_len, segment_ids=None) -> "Mask":
        return Mask("prefix", prefix_len=prefix_len, segment_ids=segment_ids).validate()

    def _check_shapes(self, batch: int, T: int):
        for name in ("block_ids", "segment_ids"):
            x = getattr(self, name)
            if x is not None and tuple(x.shape) != (batch, T):
                raise ValueError(f"Mask: {name} must have shape {(batch, T)}, got {tuple(x.shape)}")
        if self.prefix_len is not None and tuple(self.prefix_len.shape) != (batch,):
            raise ValueError(f"Mask: prefix_len must have shape {(batch,)}, got {tuple(self.prefix_len.shape)}")

    def order_ids(self, batch: int, T: int) -> Array:
        """int32 [batch, T]: key j is visible to query i iff ids[j] <= ids[i] (and same segment).

        Non-decreasing along T for every kind (given non-decreasing block ids), which is what lets
        the flash-attention kernel skip fully masked key blocks.
        """
        self._check_shapes(batch, T)
        # [batch, T]
        t = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32)[None], (batch, T))
        if self.kind == "causal":
            return t
        if self.kind == "bidirectional":
            return jnp.zeros((batch, T), jnp.int32)
        if self.kind == "block_causal":
            return self.block_ids.astype(jnp.int32)
        # prefix: the first P tokens share order id 0 (one bidirectional block).
        return jnp.where(t < self.prefix_len.astype(jnp.int32)[:, None], 0, t)

    def dense(self, batch: int, T: int) -> Array:
        """bool [batch, T, T] (query x key): True where the query may attend to the key."""
        ids = self.order_ids(batch, T)
        # [batch, query, key]
        mask = ids[:, None, :] <= ids[:, :, None]
        if self.segment_ids is not None:
            mask &= self.segment_ids[:, :, None] == self.segment_ids[:, None, :]
        return mask

    def flash_kwargs(self, batch: int, T: int) -> dict:
        """Keyword arguments of `pallas_kernels.flash_attention` for this mask: the
        position-causal or unmasked paths where they apply, order ids (`block_ids`) otherwise."""
        self._check_shapes(batch, T)
        kwargs = dict(segment_ids=self.segment_ids)
        if self.kind == "causal":
            return dict(kwargs, causal=True)
        if self.kind == "bidirectional":
            return dict(kwargs, causal=False)
        return dict(kwargs, causal=True, block_ids=self.order_ids(batch, T))


jax.tree_util.register_dataclass(
    Mask, data_fields=["block_ids", "prefix_len", "segment_ids"], meta_fields=["kind"]
)


def cache_mask(lengths, T: int, max_len: int, new: str = "causal", tree=None) -> Array:
    """bool [batch, T, max_len] for T new queries per row against the cache.

    Query t of row b sits in slot `lengths[b] - T + t` (`lengths` [batch] counts the valid slots
    including the T new ones) and sees every earlier slot. Among the T new slots, `new="causal"`
    sees the slots up to its own and `"bidirectional"` sees all T (a VAR scale, a diffusion
    block); `tree` (bool [batch, T, T], query x new key) replaces either pattern (draft-tree
    verification). Slots at or past `lengths[b]` are never visible.
    """
    if new not in NEW_KINDS:
        raise ValueError(f"cache_mask: new must be one of {NEW_KINDS}, got {new!r}")
    batch = lengths.shape[0]
    if tree is not None and tuple(tree.shape) != (batch, T, T):
        raise ValueError(f"cache_mask: tree must have shape {(batch, T, T)}, got {tuple(tree.shape)}")
    slots = jnp.arange(max_len)[None, None, :]  # [1, 1, S]
    start = (lengths - T)[:, None, None]  # [B, 1, 1]: slot of the first new token
    if tree is not None:
        rel = slots - start  # [B, 1, S]: index among the new block
        in_block = (rel >= 0) & (rel < T)
        # [B, T, S]: tree[b, t, rel] inside the new block
        index = jnp.broadcast_to(jnp.clip(rel, 0, T - 1), (batch, T, max_len))
        return jnp.where(in_block, jnp.take_along_axis(tree, index, axis=2), slots < start)
    if new == "bidirectional":
        return jnp.broadcast_to(slots < start + T, (batch, T, max_len))
    query_slot = start + jnp.arange(T)[None, :, None]  # [B, T, 1]
    return slots <= query_slot
