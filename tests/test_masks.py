"""jaxar.models.masks against masks spelled out with plain numpy loops."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxar.models.masks import Mask, cache_mask

B, T = 2, 12
SEGMENTS = np.array([[0] * 5 + [1] * 7, [3] * 12])
BLOCKS = np.array([[0, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2, 2],  # VAR-like scales 1, 4, 7
                   [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]])
PREFIX = np.array([4, 0])


def _dense_loop(visible, segments=None):
    """[B, T, T] from a predicate visible(b, i, j) (query i, key j)."""
    out = np.zeros((B, T, T), bool)
    for b in range(B):
        for i in range(T):
            for j in range(T):
                same = segments is None or segments[b, i] == segments[b, j]
                out[b, i, j] = bool(visible(b, i, j)) and same
    return out


def _reference(kind, segments):
    if kind == "causal":
        return _dense_loop(lambda b, i, j: j <= i, segments)
    if kind == "bidirectional":
        return _dense_loop(lambda b, i, j: True, segments)
    if kind == "block_causal":
        return _dense_loop(lambda b, i, j: BLOCKS[b, j] <= BLOCKS[b, i], segments)
    # prefix: inside the prefix everything, after it causal
    return _dense_loop(lambda b, i, j: j <= i or (i < PREFIX[b] and j < PREFIX[b]), segments)


def _mask(kind, segments):
    seg = None if segments is None else jnp.asarray(segments)
    if kind == "causal":
        return Mask.causal(seg)
    if kind == "bidirectional":
        return Mask.bidirectional(seg)
    if kind == "block_causal":
        return Mask.block_causal(jnp.asarray(BLOCKS), seg)
    return Mask.prefix(jnp.asarray(PREFIX), seg)


@pytest.mark.parametrize("segments", [None, SEGMENTS], ids=["single", "packed"])
@pytest.mark.parametrize("kind", ["causal", "bidirectional", "block_causal", "prefix"])
def test_dense_matches_loop(kind, segments):
    dense = np.asarray(_mask(kind, segments).dense(B, T))
    assert dense.shape == (B, T, T) and dense.dtype == np.bool_
    np.testing.assert_array_equal(dense, _reference(kind, segments))


@pytest.mark.parametrize("kind", ["causal", "bidirectional", "block_causal", "prefix"])
def test_order_ids_are_non_decreasing(kind):
    ids = np.asarray(_mask(kind, None).order_ids(B, T))
    assert ids.dtype == np.int32 and ids.shape == (B, T)
    assert np.all(np.diff(ids, axis=1) >= 0)


def test_mask_is_a_pytree_with_static_kind():
    mask = Mask.block_causal(jnp.asarray(BLOCKS), jnp.asarray(SEGMENTS))
    leaves, treedef = jax.tree_util.tree_flatten(mask)
    assert len(leaves) == 2
    assert jax.tree_util.tree_unflatten(treedef, leaves).kind == "block_causal"
    dense = jax.jit(lambda m: m.dense(B, T))(mask)
    np.testing.assert_array_equal(np.asarray(dense), _reference("block_causal", SEGMENTS))


@pytest.mark.parametrize("kind", ["causal", "bidirectional", "block_causal", "prefix"])
def test_flash_kwargs_give_the_same_mask(kind):
    """The kernel arguments describe the same mask (read back as a dense one)."""
    kw = _mask(kind, SEGMENTS).flash_kwargs(B, T)
    if kw.get("block_ids") is not None:
        ids = np.asarray(kw["block_ids"])
        visible = lambda b, i, j: ids[b, j] <= ids[b, i]
    elif kw["causal"]:
        visible = lambda b, i, j: j <= i
    else:
        visible = lambda b, i, j: True
    np.testing.assert_array_equal(_dense_loop(visible, np.asarray(kw["segment_ids"])),
                                  _reference(kind, SEGMENTS))


@pytest.mark.parametrize("make,match", [
    (lambda: Mask("diagonal"), "kind must be one of"),
    (lambda: Mask("block_causal").validate(), "block_ids"),
    (lambda: Mask("causal", prefix_len=jnp.zeros(2, jnp.int32)).validate(), "prefix_len"),
    (lambda: Mask.block_causal(jnp.zeros((2, 5), jnp.int32)).order_ids(B, T), "block_ids must"),
    (lambda: Mask.causal(jnp.zeros((2, 5), jnp.int32)).dense(B, T), "segment_ids must"),
    (lambda: Mask.prefix(jnp.zeros((3,), jnp.int32)).dense(B, T), "prefix_len must"),
    (lambda: cache_mask(jnp.array([3, 4]), 2, 6, new="tree"), "new must be one of"),
    (lambda: cache_mask(jnp.array([3, 4]), 2, 6, tree=jnp.ones((2, 2, 3), bool)), "tree must"),
])
def test_bad_inputs(make, match):
    with pytest.raises(ValueError, match=match):
        mask = make()
        if isinstance(mask, Mask):
            mask.validate()


def _cache_loop(lengths, t_new, max_len, new, tree):
    out = np.zeros((len(lengths), t_new, max_len), bool)
    for b, n in enumerate(lengths):
        start = n - t_new
        for t in range(t_new):
            for s in range(max_len):
                if s < start:
                    out[b, t, s] = True
                elif s < n:
                    j = s - start
                    if tree is not None:
                        out[b, t, s] = tree[b, t, j]
                    else:
                        out[b, t, s] = j <= t if new == "causal" else True
    return out


@pytest.mark.parametrize("new,with_tree", [("causal", False), ("bidirectional", False),
                                           ("causal", True), ("bidirectional", True)])
def test_cache_mask_matches_loop(new, with_tree):
    lengths, t_new, max_len = np.array([3, 7, 9]), 3, 9
    tree = None
    if with_tree:
        tree = np.random.default_rng(0).random((3, t_new, t_new)) < 0.5
        tree |= np.eye(t_new, dtype=bool)[None]
    got = cache_mask(jnp.asarray(lengths), t_new, max_len, new=new,
                     tree=None if tree is None else jnp.asarray(tree))
    assert got.shape == (3, t_new, max_len) and got.dtype == jnp.bool_
    np.testing.assert_array_equal(np.asarray(got), _cache_loop(lengths, t_new, max_len, new, tree))


def test_cache_mask_bidirectional_is_the_all_ones_tree():
    lengths = jnp.array([4, 6])
    ones = jnp.ones((2, 4, 4), bool)
    np.testing.assert_array_equal(np.asarray(cache_mask(lengths, 4, 8, new="bidirectional")),
                                  np.asarray(cache_mask(lengths, 4, 8, tree=ones)))


def test_cache_mask_causal_equals_layers_cache_attention_mask():
    layers = pytest.importorskip("jaxar.models.layers")
    if not hasattr(layers, "cache_attention_mask"):
        pytest.skip("layers.cache_attention_mask is gone (masks.cache_mask replaced it)")
    lengths = jnp.array([3, 7, 9])
    tree = jnp.asarray(np.random.default_rng(1).random((3, 3, 3)) < 0.5)
    np.testing.assert_array_equal(np.asarray(cache_mask(lengths, 3, 9)),
                                  np.asarray(layers.cache_attention_mask(lengths, 3, 9)))
    np.testing.assert_array_equal(np.asarray(cache_mask(lengths, 3, 9, tree=tree)),
                                  np.asarray(layers.cache_attention_mask(lengths, 3, 9, tree)))


@pytest.mark.parametrize("kind", ["block_causal", "prefix"])
def test_flash_kernel_with_flash_kwargs_matches_dense(kind):
    """The Pallas kernel (interpret mode) given flash_kwargs computes attention under dense()."""
    from pallas_kernels.flash_attention import flash_attention, masked_attention_reference

    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.standard_normal((B, T, 2, 16), np.float32))
    k = jnp.asarray(rng.standard_normal((B, T, 1, 16), np.float32))
    v = jnp.asarray(rng.standard_normal((B, T, 1, 16), np.float32))
    mask = _mask(kind, SEGMENTS)
    out = flash_attention(q, k, v, **mask.flash_kwargs(B, T), block_q=16, block_k=16, interpret=True)
    want = masked_attention_reference(q, k, v, mask.dense(B, T))
    np.testing.assert_allclose(np.asarray(out), np.asarray(want), rtol=1e-5, atol=1e-5)
