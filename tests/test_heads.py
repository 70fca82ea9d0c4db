"""Draft heads (jaxar.models.heads) and their training by train.py (jaxar.train.drafter).

A tiny random base (d_model 32, 2 layers; vocabulary 257 = the byte tokenizer's, since the training
runs read the bundled Shakespeare through the base's own tokenizer) written as a Hugging Face
directory by save_pretrained.
"""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxar.config import ConfigError, ModelConfig
from jaxar.models import heads as H
from jaxar.models.transformer import forward, init_params

BASE = ModelConfig(vocab_size=257, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, mlp_dim=64, max_seq_len=64,
                   initializer_range=0.3)  # a peaked random base: its distributions are worth imitating


@pytest.fixture(scope="module")
def base():
    return BASE, init_params(BASE, 0)


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory, base):
    from jaxar.api import save_pretrained
    from jaxar.tokenizer import ByteTokenizer

    path = str(tmp_path_factory.mktemp("heads") / "base")
    save_pretrained(base[0], base[1], path, tokenizer=ByteTokenizer())
    return path


def _tokens(B, T, seed=1):
    return jax.random.randint(jax.random.PRNGKey(seed), (B, T), 0, BASE.vocab_size)


def test_zero_init_medusa_and_hydra_heads_are_the_base_head(base):
    cfg, bp = base
    toks = _tokens(2, 7)
    logits, _, hidden = forward(bp, toks, config=cfg, return_hidden=True)
    mc = H.HeadsConfig(kind="medusa", num_heads=3, num_layers=2)
    ml = H.medusa_logits(H.init_heads(mc, cfg, 0), bp, hidden, config=mc, base_config=cfg)
    assert ml.shape == (2, 7, 3, cfg.vocab_size)
    np.testing.assert_array_equal(np.asarray(ml), np.broadcast_to(np.asarray(logits)[:, :, None], ml.shape))
    hc = H.HeadsConfig(kind="medusa", num_heads=3, hydra=True)
    hp = H.init_heads(hc, cfg, 0)
    hl = H.hydra_logits_teacher_forced(hp, bp, hidden, toks, config=hc, base_config=cfg)
    np.testing.assert_array_equal(np.asarray(hl), np.broadcast_to(np.asarray(logits)[:, :, None], hl.shape))


def test_hydra_single_position_matches_teacher_forced_and_a_numpy_reference(base):
    cfg, bp = base
    hc = H.HeadsConfig(kind="medusa", num_heads=3, hydra=True)
    hp = H.init_heads(hc, cfg, 0)
    leaves, tree = jax.tree_util.tree_flatten(hp)
    keys = jax.random.split(jax.random.PRNGKey(3), len(leaves))
    hp = jax.tree_util.tree_unflatten(tree, [x + 0.1 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)])
    toks = _tokens(2, 6, seed=4)
    _, _, hidden = forward(bp, toks, config=cfg, return_hidden=True)
    tf = np.asarray(H.hydra_logits_teacher_forced(hp, bp, hidden, toks, config=hc, base_config=cfg))
    emb = np.asarray(bp["embed"]["embedding"], np.float64)
    head_w = np.asarray(bp["lm_head"]["kernel"], np.float64)
    silu = lambda x: x / (1 + np.exp(-x))  # noqa: E731
    t = 1
    for i in range(3):
        prev = toks[:, t + 1: t + 2 + i]
        one = np.asarray(H.hydra_head_logits(hp, bp, hidden[:, t], prev, i, config=hc, base_config=cfg))
        np.testing.assert_allclose(one, tf[:, t, i], rtol=1e-5, atol=1e-5)
        p = jax.tree_util.tree_map(lambda x: np.asarray(x, np.float64), hp["heads"][i])
        x = np.concatenate([np.asarray(hidden[:, t], np.float64)] + [emb[np.asarray(prev[:, j])] for j in range(i + 1)],
                           axis=-1)
        x = x @ p["in"]["kernel"] + p["in"]["bias"]
        for r in p["res"]:
            x = x + silu(x @ r["kernel"] + r["bias"])
        np.testing.assert_allclose(one, x @ head_w, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="prev_tokens"):
        H.hydra_head_logits(hp, bp, hidden[:, t], toks[:, :1], 2, config=hc, base_config=cfg)


def test_eagle_tree_through_the_cache_equals_each_path_uncached(base):
    cfg, bp = base
    ec = H.HeadsConfig(kind="eagle")
    ep = H.init_heads(ec, cfg, 5)
    B, P = 2, 5
    parents = np.array([[-1, -1, 0, 0, 2, 1], [-1, 0, 1, -1, 3, 2]])  # N = 6 nodes per row
    N = parents.shape[1]
    toks = np.asarray(_tokens(B, P + N, seed=6))
    feats = np.asarray(jax.random.normal(jax.random.PRNGKey(7), (B, P + N, cfg.d_model)))
    cache = H.eagle_cache(ec, cfg, B, 16)
    _, _, cache = H.eagle_forward(ep, bp, toks[:, :P], feats[:, :P], config=ec, base_config=cfg, cache=cache)
    depth = np.zeros((B, N), int)
    mask = np.zeros((B, N, N), bool)
    paths = [[None] * N for _ in range(B)]
    for b in range(B):
        for j in range(N):
            chain, k = [], j
            while k >= 0:
                chain.append(k)
                k = parents[b, k]
            paths[b][j] = chain[::-1]
            depth[b, j] = len(chain) - 1
            mask[b, j, chain] = True
    logits, hidden, cache = H.eagle_forward(ep, bp, toks[:, P:], feats[:, P:], config=ec, base_config=cfg,
                                            cache=cache, positions=P + depth, tree_mask=jnp.asarray(mask))
    assert logits.shape == (B, N, cfg.vocab_size) and hidden.shape == (B, N, cfg.d_model)
    assert list(np.asarray(cache.lengths)) == [P + N] * B
    # Reference: the root path alone, uncached and causal (padded to P + N with slots it never sees).
    causal = jax.jit(lambda t, f: H.eagle_forward(ep, bp, t, f, config=ec, base_config=cfg)[:2])
    for b in range(B):
        for j in range(N):
            idx = list(range(P)) + [P + k for k in paths[b][j]]
            pad = [0] * (P + N - len(idx))
            ref, ref_h = causal(toks[b:b + 1, idx + pad], feats[b:b + 1, idx + pad])
            np.testing.assert_allclose(np.asarray(logits[b, j]), np.asarray(ref[0, len(idx) - 1]), rtol=1e-4,
                                       atol=1e-4)
            np.testing.assert_allclose(np.asarray(hidden[b, j]), np.asarray(ref_h[0, len(idx) - 1]), rtol=1e-4,
                                       atol=1e-4)


def test_rollout_mask_and_rollout_equal_step_by_step_drafting(base):
    from jaxar.train.drafter import eagle_rollout, rollout_tree_mask

    seg = np.array([[1, 1, 1, 2, 2, 2, 2]])
    S, T = 3, seg.shape[1]
    got = np.asarray(rollout_tree_mask(jnp.asarray(seg), S))[0]
    for a in range(S):
        for t in range(T):
            for r in range(S):
                for j in range(T):
                    want = (j <= t - a) if r == 0 else (1 <= r <= a and j == t - a + r)
                    assert got[a * T + t, r * T + j] == (want and seg[0, j] == seg[0, t])
    cfg, bp = base
    ec = H.HeadsConfig(kind="eagle")
    ep = H.init_heads(ec, cfg, 8)
    T = 5
    toks = _tokens(1, T, seed=9)
    f0 = jax.random.normal(jax.random.PRNGKey(10), (1, T, cfg.d_model))
    pos = jnp.arange(T)[None]
    rollout = jax.jit(lambda *a: eagle_rollout(*a, S, heads=ec, base_config=cfg))
    logits, hidden = rollout(ep, bp, toks, f0, pos, jnp.ones((1, T), jnp.int32))
    assert logits.shape == (1, S, T, cfg.vocab_size)
    # Drafting: verified prefix up to position P (true features), then s steps on the drafter's own outputs;
    # each step an uncached causal forward over the sequence so far (padded to T: later slots are unseen).
    causal = jax.jit(lambda f: H.eagle_forward(ep, bp, toks, f, config=ec, base_config=cfg)[:2])
    for P in range(T - S + 1):
        feats = np.zeros((1, T, cfg.d_model), np.float32)
        feats[:, :P + 1] = f0[:, :P + 1]
        for s in range(S):
            ref, ref_h = causal(jnp.asarray(feats))
            np.testing.assert_allclose(np.asarray(logits[0, s, P + s]), np.asarray(ref[0, P + s]), rtol=1e-4,
                                       atol=1e-4)
            np.testing.assert_allclose(np.asarray(hidden[0, s, P + s]), np.asarray(ref_h[0, P + s]), rtol=1e-4,
                                       atol=1e-4)
            if P + s + 1 < T:
                feats[:, P + s + 1] = ref_h[:, P + s]


def _train(base_dir, run_dir, kind, *extra, steps=16):
    import train as train_cli

    args = ["--config", f"configs/{kind}.yaml", f"base_model={base_dir}", f"run_dir={run_dir}",
            f"train.steps={steps}", "train.batch_size=4", "train.seq_len=24", "train.lr=1e-2", "train.warmup_steps=2",
            "train.eval_batches=0", "train.log_every=1", "train.progress_bar=false", "train.checkpoint_every=8",
            "train.async_checkpoint=false", *extra]
    assert train_cli.main(args) == 0
    rows = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl")) if '"loss"' in line]
    return rows


def _check_learned(rows, n=4):
    first = np.mean([r["loss"] for r in rows[:n]])
    last = np.mean([r["loss"] for r in rows[-n:]])
    assert last < first - 0.1, (first, last)


def _sample(base_dir, tmp_path, name, *extra):
    from jaxar.decode import cli

    out, stats = str(tmp_path / f"{name}.jsonl"), str(tmp_path / f"{name}.json")
    assert cli.run(["--model", base_dir, "--prompt", "ROMEO: thou", "--prompt", "ab", "--max-new-tokens", "12",
                    "--temperature", "0", "--no-progress", "--output", out, "--stats", stats, *extra]) == 0
    return [json.loads(line) for line in open(out)], json.load(open(stats))


def _sample_with_drafter_equals_plain(base_dir, run_dir, tmp_path, *tree):
    """sample.py --draft RUN (greedy) writes the same completions as plain greedy sampling."""
    plain, _ = _sample(base_dir, tmp_path, "plain")
    spec, stats = _sample(base_dir, tmp_path, "spec", "--draft", run_dir, *tree)
    assert [r["tokens"] for r in spec] == [r["tokens"] for r in plain]
    assert stats["tokens_per_target_forward"] >= 1.0
    return stats


def test_train_medusa_and_load(base_dir, base, tmp_path):
    from jaxar.train.drafter import load_drafter_run

    run_dir = str(tmp_path / "medusa")
    rows = _train(base_dir, run_dir, "medusa", "heads.num_heads=2")
    _check_learned(rows)
    assert [r["step"] for r in rows] == list(range(1, 17))
    assert os.path.isfile(os.path.join(run_dir, "loss.png"))
    with open(os.path.join(run_dir, "drafter.json")) as f:
        meta = json.load(f)
    assert meta["kind"] == "medusa" and meta["base_model"] == os.path.abspath(base_dir)
    run = load_drafter_run(run_dir)
    assert run.kind == "medusa" and run.heads_config.num_heads == 2 and not run.heads_config.hydra
    assert run.base_model_path == os.path.abspath(base_dir) and run.run_config["train"]["steps"] == 16
    cfg, bp = base
    toks = _tokens(1, 5)
    _, _, hidden = forward(bp, toks, config=cfg, return_hidden=True)
    out = H.medusa_logits(run.params, bp, hidden, config=run.heads_config, base_config=run.base_config)
    assert out.shape == (1, 5, 2, cfg.vocab_size) and bool(jnp.all(jnp.isfinite(out)))
    assert float(jnp.max(jnp.abs(run.params["heads"][0]["res"][0]["kernel"]))) > 0  # trained away from zero


def test_train_hydra_resumes(base_dir, tmp_path, capsys):
    run_dir = str(tmp_path / "hydra")
    first = _train(base_dir, run_dir, "medusa", "heads.num_heads=2", "heads.hydra=true", steps=8)
    capsys.readouterr()
    rows = _train(base_dir, run_dir, "medusa", "heads.num_heads=2", "heads.hydra=true", steps=16)
    assert "resuming" in capsys.readouterr().err
    assert [r["step"] for r in rows] == list(range(1, 17)) and rows[:8] == first
    _check_learned(rows)
    from jaxar.train.drafter import load_drafter_run

    run = load_drafter_run(run_dir)
    assert run.heads_config.hydra and int(os.path.basename(run.step_dir)) == 16
    stats = _sample_with_drafter_equals_plain(base_dir, run_dir, tmp_path, "--tree-nodes", "5", "--tree-topk", "2")
    assert len(stats["acceptance_rate_per_position"]) == 2  # by tree depth: one per head


def test_train_eagle_and_load(base_dir, base, tmp_path):
    from jaxar.train.drafter import load_drafter_run

    run_dir = str(tmp_path / "eagle")
    rows = _train(base_dir, run_dir, "eagle", "train.rollout=2")
    _check_learned(rows)
    assert "loss_1" in rows[-1] and "acc_1" in rows[-1]
    run = load_drafter_run(run_dir)
    assert run.kind == "eagle" and run.run_config["train"]["rollout"] == 2
    cfg, bp = base
    toks = _tokens(1, 4)
    logits, hidden, _ = H.eagle_forward(run.params, bp, toks, jnp.zeros((1, 4, cfg.d_model)), config=run.heads_config,
                                        base_config=run.base_config)
    assert logits.shape == (1, 4, cfg.vocab_size) and bool(jnp.all(jnp.isfinite(logits)))
    stats = _sample_with_drafter_equals_plain(base_dir, run_dir, tmp_path, "--tree-nodes", "6", "--tree-depth", "3",
                                              "--tree-topk", "2")
    assert len(stats["acceptance_rate_per_position"]) == 3


def test_config_errors(base_dir, tmp_path):
    from jaxar.api import save_pretrained
    from jaxar.tokenizer import ByteTokenizer
    from jaxar.train import drafter

    with pytest.raises(ConfigError, match="base_model=.*does not exist"):
        drafter.load_drafter_run_config("configs/medusa.yaml", [f"base_model={tmp_path}/nope"])
    with pytest.raises(ConfigError, match="not a drafter kind"):
        drafter.build_drafter_run_config({"task": "nope", "run_dir": "r", "base_model": base_dir})
    with pytest.raises(ConfigError, match="unknown config key 'heads.num_head'"):
        drafter.load_drafter_run_config("configs/medusa.yaml", [f"base_model={base_dir}", "heads.num_head=3"])
    small = BASE.replace(vocab_size=64)
    save_pretrained(small, init_params(small, 0), str(tmp_path / "small"), tokenizer=ByteTokenizer())
    run = drafter.load_drafter_run_config("configs/medusa.yaml", [f"base_model={tmp_path}/small",
                                                                  f"run_dir={tmp_path}/r", "train.seq_len=16"])
    with pytest.raises(ConfigError, match="vocabulary mismatch"):
        drafter.train_drafter(run)
    with pytest.raises(ValueError, match="kind"):
        H.HeadsConfig(kind="medusa3").validate()
