"""Image datasets: IDX files (the MNIST family's format) and the bundled Fashion-MNIST.

    images, labels = load_image_split("fashion_mnist", "train")    # uint8 [60000, 28, 28], int32 [60000]
    images, labels = load_image_split("path/to/dir", "t10k")        # any directory of IDX files

An IDX file is a big-endian header (two zero bytes, a type code, the number of
dimensions, then each dimension as a uint32) followed by the array in C order;
files may be gzip-compressed (`.gz`). `read_idx` reads any of them. A split
`NAME` of a directory is the pair `NAME-images-idx3-ubyte[.gz]` and
`NAME-labels-idx1-ubyte[.gz]` (the names other toolkits download; `train` and
`t10k` for the MNIST family).

Fashion-MNIST (Zalando Research, MIT licence; 60,000 training and 10,000 test
images of 28x28 grayscale clothing in 10 classes) is bundled in
`data/fashion-mnist/` as Debian's `dataset-fashion-mnist` ships it (see
data/README.md): `source="fashion_mnist"`.
"""

from __future__ import annotations

import gzip
import os
from pathlib import Path
from typing import Tuple, Union

import numpy as np

# IDX type code -> numpy dtype (big-endian on disk).
_IDX_DTYPES = {0x08: np.dtype("u1"), 0x09: np.dtype("i1"), 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"),
               0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}

FASHION_MNIST = "fashion_mnist"
FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                         "Ankle boot")
_SPLITS = {"train": "train", "test": "t10k", "t10k": "t10k"}


class ImageDataError(ValueError):
    """An image file or directory is missing or not what it claims to be."""


def read_idx(path: Union[str, os.PathLike]) -> np.ndarray:
    """The array stored in an IDX file (gzip-compressed when the name ends in .gz), in native byte order."""
    path = Path(path)
    try:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except FileNotFoundError:
        raise ImageDataError(f"{path}: no such IDX file") from None
    except (OSError, EOFError, gzip.BadGzipFile) as e:
        raise ImageDataError(f"{path}: cannot read it ({e})") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise ImageDataError(f"{path}: not an IDX file (bad magic number {raw[:4].hex() or 'empty'})")
    dtype, ndim = _IDX_DTYPES[raw[2]], raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ImageDataError(f"{path}: IDX header cut short ({len(raw)} bytes for {ndim} dimensions)")
    shape = tuple(int(d) for d in np.frombuffer(raw, ">u4", count=ndim, offset=4))
    expected = header + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(raw) != expected:
        raise ImageDataError(f"{path}: {len(raw)} bytes, but the header's shape {shape} needs {expected}; "
                             "the file is truncated or damaged")
    return np.frombuffer(raw, dtype, offset=header).reshape(shape).astype(dtype.newbyteorder("="))


def _split_file(directory: Path, split: str, kind: str) -> Path:
    ndim = 3 if kind == "images" else 1
    for name in (f"{split}-{kind}-idx{ndim}-ubyte.gz", f"{split}-{kind}-idx{ndim}-ubyte",
                 f"{split}-{kind}.idx{ndim}-ubyte.gz", f"{split}-{kind}.idx{ndim}-ubyte"):
        if (directory / name).is_file():
            return directory / name
    raise ImageDataError(f"{directory}: no {split}-{kind}-idx{ndim}-ubyte[.gz] file for split {split!r}")


def image_source_dir(source: Union[str, os.PathLike]) -> Path:
    """The directory of a named image source ("fashion_mnist": the bundled copy) or a path."""
    if str(source) == FASHION_MNIST:
        from jaxar.train.data import data_dir

        return data_dir() / "fashion-mnist"
    path = Path(source).expanduser()
    if not path.is_dir():
        raise ImageDataError(f"image source {str(source)!r} is neither {FASHION_MNIST!r} nor a directory of IDX files")
    return path


def load_image_split(source: Union[str, os.PathLike], split: str = "train") -> Tuple[np.ndarray, np.ndarray]:
    """(images uint8 [N, H, W], labels int32 [N]) of a split ("train", "test"/"t10k", or a file prefix)."""
    directory = image_source_dir(source)
    prefix = _SPLITS.get(split, split)
    images = read_idx(_split_file(directory, prefix, "images"))
    labels = read_idx(_split_file(directory, prefix, "labels"))
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise ImageDataError(f"{directory} split {split!r}: images {images.shape} and labels {labels.shape} do not "
                             "pair up (want [N, H, W] and [N])")
    return images.astype(np.uint8, copy=False), labels.astype(np.int32)


__all__ = ["FASHION_MNIST", "FASHION_MNIST_CLASSES", "ImageDataError", "image_source_dir", "load_image_split",
           "read_idx"]
