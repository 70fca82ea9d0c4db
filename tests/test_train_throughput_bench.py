"""benchmarks/train_throughput.py --vs-torch, in CI without the timing: on the same initial weights and batch,
transformers + torch AdamW, the minimal pure-JAX step and jaxar's train step (layers scanned and unrolled)
compute the same loss, and the same loss again after one optimizer update."""

from __future__ import annotations

import importlib.util
import os

import jax
import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _bench():
    spec = importlib.util.spec_from_file_location("train_throughput_bench",
                                                  os.path.join(ROOT, "benchmarks", "train_throughput.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("n_kv_heads, tie", [(2, False), (None, True)], ids=["gqa-untied", "mha-tied"])
def test_torch_minimal_jax_and_jaxar_losses_agree(n_kv_heads, tie):
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from jaxar.models.transformer import init_params

    bench = _bench()
    cfg, train = bench.vs_torch_configs(d_model=32, n_layers=2, n_heads=4, n_kv_heads=n_kv_heads, mlp_dim=48,
                                        vocab_size=61, batch_size=2, seq_len=16, tie_embeddings=tie)
    params = jax.tree_util.tree_map(np.asarray, init_params(cfg, jax.random.PRNGKey(0)))
    batch = bench.synthetic_batch(2, 16, cfg.vocab_size)
    competitors = bench.build_competitors(cfg, train, params, batch)
    assert [c.name for c in competitors] == ["torch", "minimal_jax", "jaxar_scan_true", "jaxar_scan_false"]
    losses = bench.first_losses(competitors)
    rel = bench.loss_check(losses, "torch")
    for name, (initial, after_update) in rel.items():
        assert initial < 1e-5, (name, losses)
        assert after_update < 1e-4, (name, losses)
    # the update did something (the second check is not the first one again)
    assert abs(losses["torch"][1] - losses["torch"][0]) > 1e-3
