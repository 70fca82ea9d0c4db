"""IDX reading and the bundled Fashion-MNIST (jaxar.train.images)."""

import gzip
import struct

import numpy as np
import pytest

from jaxar.train.images import FASHION_MNIST, ImageDataError, image_source_dir, load_image_split, read_idx


def _upstream_reader(directory, kind):
    """Zalando's own reader (fashion-mnist utils/mnist_reader.py): fixed offsets, no header parsing."""
    with gzip.open(directory / f"{kind}-labels-idx1-ubyte.gz", "rb") as f:
        labels = np.frombuffer(f.read(), dtype=np.uint8, offset=8)
    with gzip.open(directory / f"{kind}-images-idx3-ubyte.gz", "rb") as f:
        images = np.frombuffer(f.read(), dtype=np.uint8, offset=16).reshape(len(labels), 784)
    return images, labels


@pytest.mark.parametrize("split,kind,n", [("train", "train", 60000), ("test", "t10k", 10000)])
def test_bundled_fashion_mnist_equals_the_upstream_reader_and_is_balanced(split, kind, n):
    images, labels = load_image_split(FASHION_MNIST, split)
    ref_images, ref_labels = _upstream_reader(image_source_dir(FASHION_MNIST), kind)
    assert images.shape == (n, 28, 28) and images.dtype == np.uint8 and labels.dtype == np.int32
    np.testing.assert_array_equal(images.reshape(n, 784), ref_images)
    np.testing.assert_array_equal(labels, ref_labels)
    assert np.bincount(labels, minlength=10).tolist() == [n // 10] * 10  # 6,000 / 1,000 images per class
    if split == "train":  # the dataset's published normalisation statistics (mean 0.2860, std 0.3530)
        x = images.astype(np.float64) / 255
        assert abs(x.mean() - 0.2860) < 5e-4 and abs(x.std() - 0.3530) < 5e-4


def _write_idx(path, array, code):
    header = struct.pack(">BBBB", 0, 0, code, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    data = header + array.astype(array.dtype.newbyteorder(">")).tobytes()
    path.write_bytes(gzip.compress(data) if path.suffix == ".gz" else data)


@pytest.mark.parametrize("dtype,code", [(np.uint8, 0x08), (np.int8, 0x09), (np.int16, 0x0B), (np.int32, 0x0C),
                                        (np.float32, 0x0D), (np.float64, 0x0E)])
@pytest.mark.parametrize("name", ["a.idx", "a.idx.gz"])
def test_read_idx_round_trips_every_type(tmp_path, dtype, code, name):
    rng = np.random.default_rng(0)
    array = (rng.standard_normal((3, 4, 5)) * 100).astype(dtype)
    _write_idx(tmp_path / name, array, code)
    got = read_idx(tmp_path / name)
    assert got.dtype == np.dtype(dtype) and got.dtype.isnative
    np.testing.assert_array_equal(got, array)


def test_a_directory_of_idx_files_is_a_source(tmp_path):
    rng = np.random.default_rng(1)
    images, labels = rng.integers(0, 256, (7, 5, 6), dtype=np.uint8), rng.integers(0, 3, 7).astype(np.uint8)
    _write_idx(tmp_path / "train-images-idx3-ubyte", images, 0x08)
    _write_idx(tmp_path / "train-labels-idx1-ubyte.gz", labels, 0x08)
    got_images, got_labels = load_image_split(tmp_path, "train")
    np.testing.assert_array_equal(got_images, images)
    np.testing.assert_array_equal(got_labels, labels)


def test_bad_files_and_sources_are_one_line_errors(tmp_path):
    _write_idx(tmp_path / "t.idx", np.zeros((4, 3), np.uint8), 0x08)
    (tmp_path / "cut.idx").write_bytes((tmp_path / "t.idx").read_bytes()[:-2])
    (tmp_path / "bad.idx").write_bytes(b"\x12\x34\x08\x01\x00\x00\x00\x01\x00")
    _write_idx(tmp_path / "x-images-idx3-ubyte", np.zeros((2, 2, 2), np.uint8), 0x08)
    _write_idx(tmp_path / "x-labels-idx1-ubyte", np.zeros(3, np.uint8), 0x08)
    cases = [(lambda: read_idx(tmp_path / "cut.idx"), "truncated or damaged"),
             (lambda: read_idx(tmp_path / "bad.idx"), "not an IDX file"),
             (lambda: read_idx(tmp_path / "none.idx"), "no such IDX file"),
             (lambda: load_image_split(tmp_path / "nowhere"), "neither 'fashion_mnist' nor a directory"),
             (lambda: load_image_split(tmp_path, "train"), "no train-images-idx3-ubyte"),
             (lambda: load_image_split(tmp_path, "x"), "do not pair up")]
    for call, message in cases:
        with pytest.raises(ImageDataError, match=message) as e:
            call()
        assert "\n" not in str(e.value)
