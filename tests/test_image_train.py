"""train.py / sample.py / eval_images.py for image runs: configs, deterministic batches, tiny end-to-end runs
(tokenizer -> raster and VAR -> samples), the output contract and the one-line errors."""

import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from jaxar.config import ConfigError
from jaxar.train import vision

ROOT = Path(__file__).resolve().parents[1]


def _write_idx(path: Path, array: np.ndarray) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    path.write_bytes(gzip.compress(header + array.astype(np.uint8).tobytes()))


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    """64 training and 32 test images: real Fashion-MNIST rows, so the classes are real."""
    from jaxar.train.images import load_image_split

    d = tmp_path_factory.mktemp("idx")
    for split, prefix, n in (("train", "train", 64), ("test", "t10k", 32)):
        images, labels = load_image_split("fashion_mnist", split)
        _write_idx(d / f"{prefix}-images-idx3-ubyte.gz", images[:n])
        _write_idx(d / f"{prefix}-labels-idx1-ubyte.gz", labels[:n])
    return str(d)


_TRAIN = ["train.steps=2", "train.batch_size=8", "train.warmup_steps=1", "train.log_every=1", "train.eval_every=0",
          "train.checkpoint_every=0", "train.progress_bar=false", "train.async_checkpoint=false"]


def _config(name, run_dir, data, *extra):
    return vision.load_image_run_config(str(ROOT / "configs" / name), [f"run_dir={run_dir}", f"data.source={data}",
                                                                       "data.val_images=16"] + _TRAIN + list(extra))


_TINY_VQ = ["model.channels=4", "model.codebook_size=16", "model.code_dim=4", "model.patch_nums=[1,3,7]",
            "model.quant_resi=0"]
_NO_EVAL = ["train.eval_batches=0"]
_TINY_AR = ["model.d_model=16", "model.n_layers=1", "model.n_heads=2", "model.mlp_dim=32"]


@pytest.fixture(scope="module")
def runs(tiny_data, tmp_path_factory):
    """A tiny tokenizer, classifier, raster and VAR run trained by train_image (2 steps each)."""
    root = tmp_path_factory.mktemp("runs")
    vq = vision.train_image(_config("fashion-vq.yaml", root / "vq", tiny_data, *_TINY_VQ, *_NO_EVAL))
    out = {"vq": vq}
    out["classifier"] = vision.train_image(_config("fashion-classifier.yaml", root / "clf", tiny_data,
                                                   "model.channels=2", "model.feature_dim=8"))
    out["classifier"].tiny_data = tiny_data
    for task in ("raster", "var"):
        out[task] = vision.train_image(_config(f"fashion-{task}.yaml", root / task, tiny_data, *_TINY_AR, *_NO_EVAL,
                                               f"tokenizer_run={root / 'vq'}"))
    return out


def test_batches_are_epoch_permutations_and_resume_exactly():
    n, bs, seed = 10, 4, 3
    expected = np.concatenate([np.random.default_rng([seed, e]).permutation(n) for e in range(3)])
    got = np.concatenate([vision.batch_indices(n, bs, s, seed) for s in range(7)])
    np.testing.assert_array_equal(got, expected[:28])
    # a resumed run asks for step 5 directly and gets the same rows
    np.testing.assert_array_equal(vision.batch_indices(n, bs, 5, seed), expected[20:24])


def test_config_errors_are_one_line(tiny_data, tmp_path):
    with pytest.raises(ConfigError, match="did you mean 'model.codebook_size'"):
        _config("fashion-vq.yaml", tmp_path / "a", tiny_data, "model.codebok_size=8")
    with pytest.raises(ConfigError, match="not a trained tokenizer run"):
        _config("fashion-var.yaml", tmp_path / "b", tiny_data, f"tokenizer_run={tmp_path / 'missing'}")
    with pytest.raises(ConfigError, match="data.source"):
        _config("fashion-vq.yaml", tmp_path / "c", str(tmp_path / "nowhere"))


def test_ar_runs_take_the_codes_from_the_tokenizer(runs, tiny_data, tmp_path):
    vq_dir = runs["vq"].run_dir
    cfg = _config("fashion-var.yaml", tmp_path / "v", tiny_data, f"tokenizer_run={vq_dir}")
    assert cfg.model.codebook_size == 16 and tuple(cfg.model.patch_nums) == (1, 3, 7) and cfg.model.code_dim == 4
    with pytest.raises(ConfigError, match="comes from the tokenizer"):
        _config("fashion-var.yaml", tmp_path / "w", tiny_data, f"tokenizer_run={vq_dir}", "model.codebook_size=32")
    # a tokenizer without the multi-scale quantizer cannot serve a VAR model (its config is all that is read)
    single = tmp_path / "single"
    single.mkdir()
    run = json.loads((Path(vq_dir) / "run_config.json").read_text())
    run["model"]["patch_nums"] = []
    (single / "run_config.json").write_text(json.dumps(run))
    with pytest.raises(ConfigError, match="no multi-scale quantizer"):
        _config("fashion-var.yaml", tmp_path / "x", tiny_data, f"tokenizer_run={single}")
    assert _config("fashion-raster.yaml", tmp_path / "y", tiny_data, f"tokenizer_run={single}").model.side == 7


def test_tiny_runs_train_checkpoint_and_reload(runs):
    for task, result in runs.items():
        assert result.step == 2 and len(result.losses) == 2 and all(np.isfinite(list(result.losses.values())))
        loaded = vision.load_image_run(result.run_dir)
        assert loaded.task == task
        import jax

        same = jax.tree_util.tree_map(lambda a, b: bool(np.array_equal(np.asarray(a), np.asarray(b))),
                                      loaded.params, result.state.params)
        assert all(jax.tree_util.tree_leaves(same))
        if task in ("raster", "var"):
            assert loaded.tokenizer is not None and loaded.tokenizer[0].codebook_size == 16
    assert os.path.isfile(os.path.join(runs["vq"].run_dir, "recon.png"))
    # the classifier's evaluation covers the whole (tiny) test split: its accuracy == its predictions there
    from jaxar.image_metrics import image_features
    from jaxar.train.images import load_image_split

    clf = runs["classifier"]
    images, labels = load_image_split(clf.tiny_data, "test")
    _, predicted = image_features(clf.state.params, vision.load_image_run(clf.run_dir).config, images)
    assert clf.val_metrics[2]["accuracy"] == pytest.approx(float(np.mean(predicted == labels)), abs=1e-9)


def _sample(argv, capsys):
    from jaxar.decode.cli import run

    code = run(argv)
    return code, capsys.readouterr()


def test_sample_cli_writes_the_image_contract(runs, tiny_data, tmp_path, capsys):
    out = tmp_path / "out"
    code, cap = _sample(["--model", runs["var"].run_dir, "--labels", "0,3,7", "--per-label", "2", "--cfg-scale",
                         "1.5", "--seed", "4", "--output-dir", str(out), "--no-progress"], capsys)
    assert code == 0, cap.err
    with np.load(out / "samples.npz") as f:
        images, labels = f["images"], f["labels"]
    assert images.dtype == np.uint8 and images.shape == (6, 28, 28)
    np.testing.assert_array_equal(labels, [0, 0, 3, 3, 7, 7])
    from PIL import Image

    assert Image.open(out / "grid.png").size[1] > 0
    stats = json.loads([line for line in cap.err.splitlines() if line.startswith("{")][-1])
    assert stats["forwards_per_image"] == 3 and stats["images"] == 6
    # the same seed gives the same images; nothing is overwritten without --overwrite
    code, cap = _sample(["--model", runs["var"].run_dir, "--labels", "0,3,7", "--per-label", "2", "--cfg-scale",
                         "1.5", "--seed", "4", "--output-dir", str(out), "--no-progress"], capsys)
    assert code == 2 and "already exists" in cap.err
    again = tmp_path / "again"
    code, cap = _sample(["--model", runs["var"].run_dir, "--labels", "0,3,7", "--per-label", "2", "--cfg-scale",
                         "1.5", "--seed", "4", "--output-dir", str(again), "--no-progress"], capsys)
    with np.load(again / "samples.npz") as f:
        np.testing.assert_array_equal(f["images"], images)
    # eval_images.py on that output: the metrics of jaxar.image_metrics over the classifier's features
    import eval_images
    from jaxar.image_metrics import evaluate_samples
    from jaxar.train.images import load_image_split

    clf = vision.load_image_run(runs["classifier"].run_dir)
    code = eval_images.main(["--samples", str(out / "samples.npz"), "--classifier", runs["classifier"].run_dir,
                             "--data", tiny_data, "--json", str(tmp_path / "m.json")])
    assert code == 0
    (row,) = json.loads((tmp_path / "m.json").read_text())
    ref = evaluate_samples(clf.params, clf.config, images, labels, load_image_split(tiny_data, "test")[0])
    for key in ("fd", "precision", "recall", "class_consistency"):
        assert row[key] == pytest.approx(ref[key], rel=1e-9, abs=1e-12), key


@pytest.mark.parametrize("extra, message", [
    (["--labels", "0,10"], "--labels [10] out of range: this model has classes 0..9"),
    (["--labels", "a,b"], "--labels must be comma-separated class ids"),
    (["--labels", "0", "--prompt", "hi"], "is an image model"),
    (["--labels", "0", "--per-label", "0"], "--per-label must be >= 1"),
])
def test_sample_cli_image_errors_are_one_line(runs, tmp_path, capsys, extra, message):
    code, cap = _sample(["--model", runs["var"].run_dir, "--output-dir", str(tmp_path / "e")] + extra, capsys)
    assert code == 2
    lines = cap.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("sample.py: error:") and message in lines[0], cap.err


def test_text_model_given_labels_and_tokenizer_run_sampled_are_one_line(runs, smollm2_hf_dir, tmp_path, capsys):
    code, cap = _sample(["--model", smollm2_hf_dir, "--labels", "0", "--output-dir", str(tmp_path)], capsys)
    assert code == 2 and "are for image models" in cap.err and len(cap.err.strip().splitlines()) == 1
    code, cap = _sample(["--model", runs["vq"].run_dir, "--labels", "0", "--output-dir", str(tmp_path)], capsys)
    assert code == 2 and "not a generative image model" in cap.err


def test_train_py_runs_an_image_config_as_a_program(tiny_data, tmp_path):
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=os.environ["XLA_FLAGS"])
    argv = [sys.executable, str(ROOT / "train.py"), "--config", str(ROOT / "configs" / "fashion-vq.yaml"),
            f"run_dir={tmp_path / 'p'}", f"data.source={tiny_data}", "data.val_images=16", "train.steps=1",
            "train.batch_size=8", "train.progress_bar=false"] + _TINY_VQ
    bad = subprocess.run(argv + ["model.patch_nums=[1,2,3]"], capture_output=True, text=True, env=env, timeout=300)
    assert bad.returncode == 2 and bad.stderr.strip().splitlines()[-1].startswith("train.py: error: model:")
    assert "patch_nums" in bad.stderr.strip().splitlines()[-1]


def test_an_interrupted_image_run_resumes_to_the_uninterrupted_params(runs, tiny_data, tmp_path, capsys):
    import jax

    args = ("model.channels=2", "model.feature_dim=8", *_NO_EVAL)  # the fixture's classifier (evaluation aside)
    whole = runs["classifier"]
    cut = vision.train_image(_config("fashion-classifier.yaml", tmp_path / "cut", tiny_data, *args), stop_after=1)
    assert cut.step == 1
    resumed = vision.train_image(_config("fashion-classifier.yaml", tmp_path / "cut", tiny_data, *args))
    assert resumed.step == 2 and "resuming" in capsys.readouterr().err
    for a, b in zip(jax.tree_util.tree_leaves(whole.state.params), jax.tree_util.tree_leaves(resumed.state.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # another configuration in the same run_dir is refused, not mixed in
    with pytest.raises(ConfigError, match="already holds a run with a different configuration"):
        vision.train_image(_config("fashion-classifier.yaml", tmp_path / "cut", tiny_data, *args,
                                   "model.feature_dim=16"))


def test_sample_cli_speculative_raster_decoding(runs, tmp_path, capsys):
    """--decode sjd / mcsjd / draft:DIR with exact and relaxed acceptance: greedy images equal plain decoding's
    (the raster run drafts for itself: same tokenizer), the stats report the measured forwards."""
    raster = runs["raster"].run_dir
    common = ["--model", raster, "--labels", "0,4", "--per-label", "2", "--temperature", "0", "--no-progress"]
    code, cap = _sample(common + ["--output-dir", str(tmp_path / "plain")], capsys)
    assert code == 0, cap.err
    with np.load(tmp_path / "plain" / "samples.npz") as f:
        plain = f["images"]
    for i, extra in enumerate([["--decode", "sjd", "--window", "4"],
                               ["--decode", "mcsjd", "--accept", "lantern:3,0.1", "--jacobi-init", "previous"],
                               ["--decode", f"draft:{raster}", "--window", "3", "--accept", "gsd:2"]]):
        out = tmp_path / f"spec{i}"
        code, cap = _sample(common + extra + ["--output-dir", str(out), "--stats", str(tmp_path / f"s{i}.json")],
                            capsys)
        assert code == 0, cap.err
        with np.load(out / "samples.npz") as f:
            np.testing.assert_array_equal(f["images"], plain)
        stats = json.loads((tmp_path / f"s{i}.json").read_text())
        assert stats["decode"] == extra[1].split(":")[0] and 1 <= stats["forwards_per_image"] <= 49
        assert stats["tokens_per_forward"] == pytest.approx(49 / stats["forwards_per_image"])
        assert stats["tv_bound_per_code"] == 0.0  # greedy rows are exact whatever the rule
        assert (stats["draft_forwards_per_image"] > 0) == (i == 2)


@pytest.mark.parametrize("model, extra, message", [
    ("var", ["--decode", "sjd"], "--decode sjd is for raster runs"),
    ("raster", ["--decode", "jacobi"], "use plain, sjd, mcsjd or draft:DIR"),
    ("raster", ["--decode", "sjd", "--window", "0"], "--window must be >= 1"),
    ("raster", ["--accept", "lantern:3,0.1"], "--accept / --window are for speculative decoding"),
    ("raster", ["--decode", "sjd", "--accept", "lantern:3"], "lantern"),
    ("raster", ["--decode", "draft:vq"], "the draft must be a raster run"),
])
def test_sample_cli_speculative_errors_are_one_line(runs, tmp_path, capsys, model, extra, message):
    extra = [f"draft:{runs['vq'].run_dir}" if e == "draft:vq" else e for e in extra]
    code, cap = _sample(["--model", runs[model].run_dir, "--labels", "0", "--output-dir", str(tmp_path / "e")]
                        + extra, capsys)
    assert code == 2
    lines = cap.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("sample.py: error:") and message in lines[0], cap.err
