"""Training in this process: loss, determinism, resume, checkpoints, configs, sharding rules.

Subprocess cases (8 fake devices, SIGKILL + resume, two processes) are in
test_train_processes.py.
"""

from __future__ import annotations

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxar
from jaxar.config import ConfigError
from jaxar.train import checkpoint as ckpt
from jaxar.train import sharding as shd
from jaxar.train.config import load_run_config, parse_override
from jaxar.config import SCAN_AUTO_MAX_UNROLLED
from jaxar.train.trainer import (RunMismatchError, build_step_functions,
                                 cross_entropy_sums, lr_schedule, read_metrics, resolve_scan_layers, train)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "configs", "tiny.yaml")
STEPS = 30


def tiny_config(run_dir, *overrides):
    return load_run_config(TINY, [f"run_dir={run_dir}", f"train.steps={STEPS}", "train.checkpoint_every=10",
                                  "train.log_every=1", "train.eval_every=0", "train.progress_bar=false",
                                  *overrides])


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("tiny") / "run"
    return train(tiny_config(run_dir))


def tree_equal(a, b) -> bool:
    leaves_a, leaves_b = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
    return len(leaves_a) == len(leaves_b) and all(
        np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(leaves_a, leaves_b))


# ---------------------------------------------------------------------------
# The loop


def test_loss_falls_on_the_tiny_config(tiny_run):
    losses = [tiny_run.losses[s] for s in sorted(tiny_run.losses)]
    assert len(losses) == STEPS and all(np.isfinite(losses))
    assert np.log(257) - 0.3 < losses[0] < np.log(257) + 0.3  # starts near uniform over the bytes
    assert np.mean(losses[-5:]) < losses[0] - 1.0


def test_same_seed_gives_the_same_losses(tiny_run, tmp_path):
    again = train(tiny_config(tmp_path / "run"))
    assert again.losses == tiny_run.losses


def test_run_dir_holds_metrics_tensorboard_plot_config_and_tokenizer(tiny_run):
    run_dir = tiny_run.run_dir
    rows = read_metrics(os.path.join(run_dir, "metrics.jsonl"))
    train_rows = [r for r in rows if "loss" in r]
    assert [r["step"] for r in train_rows] == list(range(1, STEPS + 1))
    for key in ("step", "loss", "lr", "tokens_per_s", "grad_norm"):
        assert all(key in r for r in train_rows)
    assert train_rows[-1]["loss"] == pytest.approx(tiny_run.losses[STEPS])
    assert any("val_loss" in r and r["step"] == STEPS for r in rows)
    assert any(n.startswith("events.out.tfevents") for n in os.listdir(os.path.join(run_dir, "tb")))
    with open(os.path.join(run_dir, "loss.png"), "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    with open(os.path.join(run_dir, "run_config.json")) as f:
        assert json.load(f)["train"]["steps"] == STEPS
    from jaxar.tokenizer import load_tokenizer

    assert load_tokenizer(run_dir).decode(load_tokenizer(run_dir).encode("to be")) == "to be"
    assert ckpt.list_steps(ckpt.checkpoints_dir(run_dir)) == [10, 20, 30]


def test_from_pretrained_returns_the_checkpoint_params(tiny_run):
    config, params = jaxar.from_pretrained(tiny_run.run_dir)
    assert config == tiny_run.model_config
    assert tree_equal(params, tiny_run.state.params)
    # And a step directory loads that step.
    config20, params20 = ckpt.load_for_inference(os.path.join(tiny_run.run_dir, "checkpoints", "20"))
    assert config20 == config and not tree_equal(params20, params)


def test_damaged_newest_checkpoint_is_skipped_and_resume_is_exact(tiny_run, tmp_path):
    run_dir = str(tmp_path / "run")
    shutil.copytree(tiny_run.run_dir, run_dir)
    newest = os.path.join(run_dir, "checkpoints", "30")
    for folder, _, files in os.walk(os.path.join(newest, "params")):
        for name in files:  # same sizes, different bytes
            path = os.path.join(folder, name)
            size = os.path.getsize(path)
            with open(path, "wb") as f:
                f.write(np.random.default_rng(0).integers(0, 256, size, dtype=np.uint8).tobytes())
    with pytest.warns(UserWarning, match="damaged"):
        _, params = ckpt.load_for_inference(run_dir)
    _, params20 = ckpt.load_for_inference(os.path.join(tiny_run.run_dir, "checkpoints", "20"))
    assert tree_equal(params, params20)

    # The trainer sets the damaged step aside (kept on disk), resumes from step 20 and
    # replays steps 21..30 exactly: same data-iterator position, same optimizer state.
    with pytest.warns(UserWarning, match="damaged"):
        resumed = train(tiny_config(run_dir))
    assert sorted(resumed.losses) == list(range(21, STEPS + 1))
    for s in resumed.losses:
        assert resumed.losses[s] == tiny_run.losses[s]
    assert tree_equal(resumed.state.params, tiny_run.state.params)
    assert any(n.startswith("damaged-30") for n in os.listdir(os.path.join(run_dir, "checkpoints")))
    rows = [r for r in read_metrics(os.path.join(run_dir, "metrics.jsonl")) if "loss" in r]
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))


def test_unfinished_save_is_not_a_checkpoint(tiny_run, tmp_path):
    run_dir = str(tmp_path / "run")
    shutil.copytree(tiny_run.run_dir, run_dir)
    # What a crash during an asynchronous save leaves behind: orbax's temporary directory,
    # and a step directory without its commit metadata.
    os.makedirs(os.path.join(run_dir, "checkpoints", "40.orbax-checkpoint-tmp-1234", "params"))
    os.makedirs(os.path.join(run_dir, "checkpoints", "50", "params"))
    assert ckpt.find_checkpoint(run_dir) == os.path.join(run_dir, "checkpoints", "30")


def test_a_different_run_in_run_dir_is_refused(tiny_run):
    with pytest.raises(RunMismatchError, match=r"(?s)model\.d_model: 32 -> 48.*--force"):
        train(load_run_config(TINY, [f"run_dir={tiny_run.run_dir}", "model.d_model=48"]))
    assert ckpt.list_steps(ckpt.checkpoints_dir(tiny_run.run_dir)) == [10, 20, 30]


def test_force_moves_the_old_run_aside(tmp_path):
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints" / "5").mkdir(parents=True)
    (run_dir / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\n')
    moved = ckpt.remove_run_outputs(str(run_dir))
    assert os.path.isdir(os.path.join(moved, "checkpoints", "5"))
    assert os.path.exists(os.path.join(moved, "metrics.jsonl"))
    assert not (run_dir / "checkpoints").exists()


# ---------------------------------------------------------------------------
# The step


def _tiny_batch(config, seed=0):
    rng = np.random.default_rng(seed)
    B, T = config.train.batch_size, config.train.seq_len
    tokens = rng.integers(0, 256, (B, T + 1), dtype=np.int32)
    segment_ids = np.ones((B, T), np.int32)
    segment_ids[:, T // 2:] = 2
    positions = np.where(segment_ids == 1, np.arange(T), np.arange(T) - T // 2).astype(np.int32)
    loss_mask = np.ones((B, T), np.int32)
    loss_mask[-1, -3:] = 0
    return {"tokens": tokens[:, :-1], "targets": tokens[:, 1:], "segment_ids": segment_ids,
            "positions": positions, "loss_mask": loss_mask}


def test_gradient_accumulation_gives_the_same_update(tmp_path):
    one = tiny_config(tmp_path, "train.grad_accum=1")
    four = tiny_config(tmp_path, "train.grad_accum=4")
    mesh = shd.make_mesh({"data": 1, "fsdp": 1, "tensor": 1})
    batch = shd.global_batch(_tiny_batch(one), mesh)
    results = []
    for cfg in (one, four):
        fns = build_step_functions(cfg.model, cfg.train, mesh)
        state, metrics = fns.train_step(fns.init(jax.random.PRNGKey(0)), batch)
        results.append((jax.device_get(state.params), jax.device_get(metrics)))
    (p1, m1), (p4, m4) = results
    assert m1["loss"] == pytest.approx(m4["loss"], rel=1e-5)
    assert m1["grad_norm"] == pytest.approx(m4["grad_norm"], rel=1e-4)
    for a, b in zip(jax.tree_util.tree_leaves(p1), jax.tree_util.tree_leaves(p4)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_packed_documents_do_not_attend_across_each_other():
    """The loss of a packed row is the sum of the documents' losses computed one by one."""
    from jaxar.train.data import pack_token_arrays

    config = jaxar.ModelConfig.llama(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, mlp_dim=64,
                                     max_seq_len=64)
    params = jaxar.init_params(config, jax.random.PRNGKey(1))
    rng = np.random.default_rng(0)
    docs = [rng.integers(0, 64, n).astype(np.int32) for n in (9, 17, 6)]
    (row,) = pack_token_arrays(docs, 40, pad_last=True)  # 8 + 16 + 5 pairs, then 11 padding
    packed = {k: jnp.asarray(v[None]) for k, v in row.items()}
    total, count = cross_entropy_sums(params, packed, config)
    # Reference: each document alone at the start of its own row, one segment, no packing
    # (the causal mask keeps the trailing filler out of the document's positions).
    width = max(len(d) for d in docs) - 1
    alone = {k: np.zeros((len(docs), width), np.int32) for k in ("tokens", "targets", "loss_mask")}
    for i, doc in enumerate(docs):
        alone["tokens"][i, :len(doc) - 1] = doc[:-1]
        alone["targets"][i, :len(doc) - 1] = doc[1:]
        alone["loss_mask"][i, :len(doc) - 1] = 1
    alone["segment_ids"] = np.ones((len(docs), width), np.int32)
    alone["positions"] = np.broadcast_to(np.arange(width, dtype=np.int32), (len(docs), width))
    expected, _ = cross_entropy_sums(params, {k: jnp.asarray(v) for k, v in alone.items()}, config)
    assert float(count) == sum(len(d) - 1 for d in docs)
    assert float(total) == pytest.approx(float(expected), rel=1e-5)


def test_scan_layers_auto_is_resolved_per_platform_and_explicit_values_are_kept():
    auto = jaxar.ModelConfig.llama(n_layers=4)
    assert auto.scan_layers == "auto"
    assert resolve_scan_layers(auto, "cpu").scan_layers is False  # measured faster unrolled on CPU
    assert resolve_scan_layers(auto, "gpu").scan_layers is False
    assert resolve_scan_layers(auto, "tpu").scan_layers is True
    assert resolve_scan_layers(auto.replace(n_layers=SCAN_AUTO_MAX_UNROLLED + 1), "cpu").scan_layers is True
    for explicit in (True, False):
        for platform in ("cpu", "gpu", "tpu"):
            assert resolve_scan_layers(auto.replace(scan_layers=explicit), platform).scan_layers is explicit
    with pytest.raises(ConfigError, match="model.scan_layers='sometimes'"):
        auto.replace(scan_layers="sometimes")
    assert load_run_config(TINY, ["run_dir=r", "model.scan_layers=false"]).model.scan_layers is False
    assert load_run_config(TINY, ["run_dir=r", "model.scan_layers=auto"]).model.scan_layers == "auto"


def test_scan_layers_auto_and_explicit_give_the_same_step(tmp_path):
    """"auto" builds the step of the resolved value, and scanned / unrolled steps agree."""
    mesh = shd.make_mesh({"data": 1, "fsdp": 1, "tensor": 1})
    base = tiny_config(tmp_path)
    batch = shd.global_batch(_tiny_batch(base), mesh)
    out = {}
    for scan in ("auto", True, False):
        model = base.model.replace(scan_layers=scan)
        fns = build_step_functions(model, base.train, mesh)
        state, metrics = fns.train_step(fns.init(jax.random.PRNGKey(0)), batch)
        out[scan] = (jax.device_get(state.params), float(metrics["loss"]))
    assert out["auto"][1] == out[jax.default_backend() == "tpu"][1]
    for scan in (True, False):
        assert out[scan][1] == pytest.approx(out["auto"][1], rel=1e-6)
        for a, b in zip(jax.tree_util.tree_leaves(out[scan][0]), jax.tree_util.tree_leaves(out["auto"][0])):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_a_run_resumes_when_only_scan_layers_changed(tiny_run):
    """scan_layers is an execution choice: the parameters are the same, so the run is the same run."""
    run_dir = tiny_run.run_dir
    with open(os.path.join(run_dir, "run_config.json")) as f:
        previous = json.load(f)
    from jaxar.train.trainer import _check_existing_run

    for scan in (True, False, "auto"):
        cfg = tiny_config(run_dir, f"model.scan_layers={str(scan).lower()}")
        assert _check_existing_run(cfg, previous, force=False) is False


def test_lr_schedule_warms_up_then_decays_to_the_floor():
    cfg = load_run_config(TINY, ["run_dir=x", "train.lr=1e-2", "train.warmup_steps=10", "train.steps=110",
                                 "train.min_lr_ratio=0.1"]).train
    lr = lr_schedule(cfg)
    assert float(lr(0)) == pytest.approx(1e-3)
    assert float(lr(9)) == pytest.approx(1e-2)
    assert float(lr(60)) == pytest.approx(0.5 * (1e-2 + 1e-3))
    assert float(lr(110)) == pytest.approx(1e-3)


# ---------------------------------------------------------------------------
# Sharding rules


def test_logical_axes_map_to_mesh_axes_when_divisible():
    mesh = jax.sharding.AbstractMesh((2, 2, 2), shd.MESH_AXES)
    P = jax.sharding.PartitionSpec
    assert shd.logical_to_spec(("layers", "embed", "heads", "head_dim"), (2, 32, 4, 8), mesh) == \
        P(None, "fsdp", "tensor", None)
    assert shd.logical_to_spec(("vocab", "embed"), (257, 32), mesh) == P(None, "fsdp")  # 257 is odd
    assert shd.logical_to_spec(("embed", "mlp"), (33, 64), mesh) == P(None, "tensor")
    assert shd.logical_to_spec(("layers", "embed"), (2, 32), mesh) == P(None, "fsdp")


def test_mesh_shape_must_match_the_device_count():
    assert shd.resolve_mesh_shape({"data": -1, "fsdp": 2, "tensor": 2}, 8) == {"data": 2, "fsdp": 2, "tensor": 2}
    with pytest.raises(ConfigError, match=r"mesh.data=2 \* mesh.fsdp=2 \* mesh.tensor=1 = 4, but there are 8"):
        shd.resolve_mesh_shape({"data": 2, "fsdp": 2, "tensor": 1}, 8)
    with pytest.raises(ConfigError, match="does not divide"):
        shd.resolve_mesh_shape({"data": -1, "fsdp": 3, "tensor": 1}, 8)


# ---------------------------------------------------------------------------
# Configs


def test_overrides_are_yaml_scalars():
    assert parse_override("train.lr=1e-3") == ("train.lr", "1e-3")  # YAML 1.1: a string ...
    cfg = load_run_config(TINY, ["run_dir=r", "train.lr=1e-3", "data.shuffle=false", "model.n_kv_heads=null",
                                 "mesh.data=1"])
    assert cfg.train.lr == 1e-3  # ... that the float field accepts
    assert cfg.data.shuffle is False and cfg.model.n_kv_heads is None and cfg.mesh.data == 1
    assert cfg.model.vocab_size == 257 and cfg.model.eos_token_id == (256,)  # from the byte tokenizer


def test_model_family_picks_the_preset():
    cfg = load_run_config(TINY, ["run_dir=r", "model.family=gpt2"])
    assert cfg.model.norm == "layernorm" and cfg.model.position == "learned" and cfg.model.d_model == 32


@pytest.mark.parametrize("override, message", [
    ("train.stpes=5", "unknown config key 'train.stpes'; did you mean 'train.steps'"),
    ("model.dmodel=5", "did you mean 'model.d_model'"),
    ("steps=5", "did you mean 'train.steps'"),
    ("optimizer.lr=1", "did you mean 'train.lr'"),
    ("train.lr=-1", "train.lr=-1.0 must be > 0"),
    ("train.steps=many", "train.steps='many' must be an integer"),
    ("train.grad_accum=3", "train.batch_size=8 must be a multiple of train.grad_accum=3"),
    ("model.n_heads=6", "model.d_model=32 is not divisible by model.n_heads=6"),
    ("model.remat=some", "model.remat='some'"),
    ("data.val_fraction=2", "val_fraction must be in"),
    ("mesh.tensor=0", "mesh.tensor=0 must be a positive integer or -1"),
    ("model.family=gpt3", "model.family='gpt3' is not supported"),
    ("train.steps", "is not of the form key=value"),
])
def test_config_errors_are_clear(override, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(".", r"\.").replace("*", r"\*")):
        load_run_config(TINY, ["run_dir=r", override])


def test_unknown_key_in_the_yaml_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("run_dir: r\ntrain:\n  batchsize: 4\n")
    with pytest.raises(ConfigError, match="did you mean 'train.batch_size'"):
        load_run_config(str(path))


def test_shipped_configs_load():
    for name in ("tiny", "shakespeare", "llama-1b"):
        cfg = load_run_config(os.path.join(ROOT, "configs", f"{name}.yaml"))
        assert cfg.train.steps > 0
    big = load_run_config(os.path.join(ROOT, "configs", "llama-1b.yaml")).model
    assert (big.n_layers, big.d_model, big.n_heads, big.num_kv_heads, big.mlp_dim, big.vocab_size) == \
        (22, 2048, 32, 4, 5632, 32000)
    assert 1.0e9 < big.num_params() < 1.2e9 and big.dtype == "bfloat16" and big.param_dtype == "float32"
