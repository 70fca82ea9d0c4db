"""Image-quality metrics in a classifier's feature space, and the pictures people look at.

Metrics (numpy, float64), on features of jaxar.models.vision.classifier (its penultimate layer):
  frechet_distance(a, b)         the FID recipe with a domain network: ||mu_a - mu_b||^2
                                 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2)), unbiased covariances (as pytorch-fid).
  precision_recall(real, fake)   Kynkaanniemi et al. 2019: each set's k-NN balls in its own set; precision =
                                 fraction of fake samples inside some real ball, recall = real inside some fake ball.
  class_consistency(pred, lab)   fraction of conditional samples the classifier assigns to their label.
  evaluate_samples(...)          all of them for uint8 samples against uint8 reference images (the test set).

Pictures (PIL for exact pixel grids, matplotlib for curves; both are dependencies through matplotlib):
  save_grid, save_pairs, plot_curve.

    feats = image_features(params, config, test_images)           # float64 [N, feature_dim], computed once
    metrics = evaluate_samples(params, config, samples, labels, test_images)
    metrics = evaluate_features(sample_feats, predicted, labels, feats)   # reuse the reference features
"""

from __future__ import annotations

import functools
import math
import os
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

PathLike = Union[str, os.PathLike]
_CHUNK = 512  # rows of a pairwise-distance block: 512 x 10,000 float64 = 40 MB


# ----------------------------------------------------------------------------------------------- Frechet distance

def _check_features(feats: Any, name: str, min_rows: int = 2) -> np.ndarray:
    feats = np.asarray(feats, dtype=np.float64)
    if feats.ndim != 2:
        raise ValueError(f"{name} must be features [N, D], got shape {feats.shape}")
    if feats.shape[0] < min_rows:
        raise ValueError(f"{name} has {feats.shape[0]} samples; this metric needs at least {min_rows}")
    if not np.all(np.isfinite(feats)):
        raise ValueError(f"{name} has NaN or infinite values; check the images or the classifier")
    return feats


def feature_statistics(feats: Any) -> Tuple[np.ndarray, np.ndarray]:
    """features [N, D] -> (mean [D], unbiased covariance [D, D]), float64 (N >= 2)."""
    feats = _check_features(feats, "feats")
    return feats.mean(axis=0), np.cov(feats, rowvar=False, ddof=1).reshape(feats.shape[1], feats.shape[1])


def _psd_sqrt(matrix: np.ndarray) -> np.ndarray:
    """Symmetric square root of a symmetric PSD matrix (negative rounding-error eigenvalues clipped to 0)."""
    eigvals, eigvecs = np.linalg.eigh((matrix + matrix.T) / 2)
    return (eigvecs * np.sqrt(np.clip(eigvals, 0.0, None))) @ eigvecs.T


def frechet_distance_from_statistics(mu_a: Any, sigma_a: Any, mu_b: Any, sigma_b: Any) -> float:
    """||mu_a - mu_b||^2 + Tr(S_a) + Tr(S_b) - 2 Tr((S_a S_b)^(1/2)).

    Tr((S_a S_b)^(1/2)) = sum of sqrt(eigenvalues of S_a^(1/2) S_b S_a^(1/2)): that matrix is symmetric PSD
    and similar to S_a S_b, so one eigh gives the trace without a non-symmetric matrix square root.
    """
    mu_a, mu_b = np.asarray(mu_a, np.float64), np.asarray(mu_b, np.float64)
    sigma_a, sigma_b = np.asarray(sigma_a, np.float64), np.asarray(sigma_b, np.float64)
    d = mu_a.shape[0]
    if mu_a.shape != (d,) or mu_b.shape != (d,) or sigma_a.shape != (d, d) or sigma_b.shape != (d, d):
        raise ValueError(f"statistics do not match: means {mu_a.shape} and {mu_b.shape}, covariances "
                         f"{sigma_a.shape} and {sigma_b.shape}; all must share one feature dimension")
    root_a = _psd_sqrt(sigma_a)
    middle = root_a @ sigma_b @ root_a
    eigvals = np.linalg.eigvalsh((middle + middle.T) / 2)
    tr_covmean = float(np.sum(np.sqrt(np.clip(eigvals, 0.0, None))))
    diff = mu_a - mu_b
    fd = float(diff @ diff + np.trace(sigma_a) + np.trace(sigma_b) - 2.0 * tr_covmean)
    return max(fd, 0.0)


def frechet_distance(feats_a: Any, feats_b: Any) -> float:
    """Frechet distance between Gaussians fitted to two feature sets [N_a, D] and [N_b, D] (N >= 2 each)."""
    feats_a = _check_features(feats_a, "feats_a")
    feats_b = _check_features(feats_b, "feats_b")
    if feats_a.shape[1] != feats_b.shape[1]:
        raise ValueError(f"feature dimensions differ: feats_a {feats_a.shape}, feats_b {feats_b.shape}; "
                         "compute both with the same classifier")
    return frechet_distance_from_statistics(*feature_statistics(feats_a), *feature_statistics(feats_b))


# ----------------------------------------------------------------------------------------------- precision / recall

def _squared_distances(a: np.ndarray, b: np.ndarray, b_sq: np.ndarray) -> np.ndarray:
    """||a_i - b_j||^2 [len(a), len(b)], clipped at 0."""
    d2 = np.sum(a * a, axis=1)[:, None] + b_sq[None, :] - 2.0 * (a @ b.T)
    return np.maximum(d2, 0.0)


def knn_radii(feats: Any, k: int = 3) -> np.ndarray:
    """Squared distance of each sample to its k-th nearest other sample of the same set, float64 [N].

    As the reference implementation: the k-th smallest distance after the sample itself (index k of the row
    sorted ascending, the self-distance 0 at index 0). Computed in row blocks, so memory is O(block * N).
    """
    feats = _check_features(feats, "feats", min_rows=k + 1)
    sq = np.sum(feats * feats, axis=1)
    radii = np.empty(feats.shape[0], np.float64)
    for start in range(0, feats.shape[0], _CHUNK):
        block = _squared_distances(feats[start:start + _CHUNK], feats, sq)
        radii[start:start + _CHUNK] = np.partition(block, k, axis=1)[:, k]
    return radii


def _fraction_inside(queries: np.ndarray, centres: np.ndarray, radii: np.ndarray) -> float:
    """Fraction of queries within radius (squared) of at least one centre."""
    sq = np.sum(centres * centres, axis=1)
    inside = 0
    for start in range(0, queries.shape[0], _CHUNK):
        block = _squared_distances(queries[start:start + _CHUNK], centres, sq)
        inside += int(np.sum(np.any(block <= radii[None, :], axis=1)))
    return inside / queries.shape[0]


def precision_recall(real_feats: Any, fake_feats: Any, k: int = 3, real_radii: Any = None) -> Tuple[float, float]:
    """Improved precision and recall (Kynkaanniemi et al. 2019) of fake samples against real ones.

    precision = fraction of fake samples inside the k-NN ball (in the real set) of some real sample;
    recall = fraction of real samples inside the k-NN ball (in the fake set) of some fake sample.
    Memory is bounded by row blocks of the pairwise distances (10k x 10k runs in ~100 MB). `real_radii`:
    knn_radii(real_feats, k) computed once, when one real set scores several fake sets.
    """
    if not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"k must be an integer >= 1, got {k!r}")
    real = _check_features(real_feats, "real_feats", min_rows=k + 1)
    fake = _check_features(fake_feats, "fake_feats", min_rows=k + 1)
    if real.shape[1] != fake.shape[1]:
        raise ValueError(f"feature dimensions differ: real_feats {real.shape}, fake_feats {fake.shape}; "
                         "compute both with the same classifier")
    if real_radii is None:
        real_radii = knn_radii(real, k)
    elif np.shape(real_radii) != (real.shape[0],):
        raise ValueError(f"real_radii must be [{real.shape[0]}] (knn_radii of real_feats), got {np.shape(real_radii)}")
    precision = _fraction_inside(fake, real, np.asarray(real_radii, np.float64))
    recall = _fraction_inside(real, fake, knn_radii(fake, k))
    return precision, recall


# ----------------------------------------------------------------------------------------------- class consistency

def _check_label_pair(predicted: Any, labels: Any) -> Tuple[np.ndarray, np.ndarray]:
    predicted, labels = np.asarray(predicted), np.asarray(labels)
    if predicted.ndim != 1 or predicted.shape != labels.shape or predicted.size == 0:
        raise ValueError(f"predicted and labels must be non-empty 1-D arrays of one length, got "
                         f"{predicted.shape} and {labels.shape}")
    return predicted, labels


def class_consistency(predicted: Any, labels: Any) -> float:
    """Fraction of samples whose predicted class equals the label they were generated for."""
    predicted, labels = _check_label_pair(predicted, labels)
    return float(np.mean(predicted == labels))


def per_class_consistency(predicted: Any, labels: Any, num_classes: int) -> List[Optional[float]]:
    """Class consistency of each label in [0, num_classes); None for a label with no samples."""
    predicted, labels = _check_label_pair(predicted, labels)
    out: List[Optional[float]] = []
    for c in range(num_classes):
        mask = labels == c
        out.append(float(np.mean(predicted[mask] == c)) if np.any(mask) else None)
    return out


# ----------------------------------------------------------------------------------------------- features of images

@functools.lru_cache(maxsize=None)
def _features_and_predictions(config):
    import jax

    from jaxar.models.vision import classifier
    from jaxar.models.vision.vqvae import to_model_images

    def run(params, pixels):
        images = to_model_images(pixels)
        out_logits, feats = classifier.Classifier(config).apply(params, images)
        return feats, jax.numpy.argmax(out_logits, axis=-1).astype(jax.numpy.int32)

    return jax.jit(run)


def image_features(classifier_params: Any, classifier_config: Any, images_uint8: Any, *,
                   batch_size: int = 500) -> Tuple[np.ndarray, np.ndarray]:
    """uint8 images [N, 28, 28] -> (features float64 [N, feature_dim], predicted classes int32 [N]).

    Runs the classifier in eval mode on jitted batches of `batch_size`; the last batch is padded, so one
    program serves every N.
    """
    images = np.asarray(images_uint8)
    if images.ndim == 4 and images.shape[-1] == 1:
        images = images[..., 0]
    if images.ndim != 3 or images.shape[1:] != (28, 28) or images.dtype != np.uint8 or images.shape[0] == 0:
        raise ValueError(f"images must be uint8 [N, 28, 28] with N >= 1, got {images.dtype} {images.shape}; "
                         "use vqvae.to_uint8 on model-space images")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    run = _features_and_predictions(classifier_config)
    n = images.shape[0]
    feats, preds = [], []
    for start in range(0, n, batch_size):
        batch = images[start:start + batch_size]
        valid = batch.shape[0]
        if valid < batch_size:
            batch = np.concatenate([batch, np.zeros((batch_size - valid, 28, 28), np.uint8)])
        f, p = run(classifier_params, batch)
        feats.append(np.asarray(f, np.float64)[:valid])
        preds.append(np.asarray(p)[:valid])
    return np.concatenate(feats), np.concatenate(preds)


def evaluate_features(sample_feats: Any, predicted: Any, labels: Any, reference_feats: Any, *, k: int = 3,
                      num_classes: Optional[int] = None, reference_radii: Any = None) -> Dict[str, Any]:
    """The metrics of samples from their features and predicted classes, against reference features.

    Returns {"fd", "precision", "recall", "class_consistency", "per_class_consistency" (a list, None where a
    class has no samples), "num_samples"}; plain Python numbers (JSON-ready).
    """
    sample_feats = _check_features(sample_feats, "sample_feats")
    predicted, labels = _check_label_pair(predicted, labels)
    if labels.shape[0] != sample_feats.shape[0]:
        raise ValueError(f"{labels.shape[0]} labels for {sample_feats.shape[0]} samples; give one label per sample")
    if num_classes is None:
        num_classes = int(max(labels.max(), predicted.max())) + 1
    precision, recall = precision_recall(reference_feats, sample_feats, k=k, real_radii=reference_radii)
    return {"fd": frechet_distance(sample_feats, reference_feats), "precision": precision, "recall": recall,
            "class_consistency": class_consistency(predicted, labels),
            "per_class_consistency": per_class_consistency(predicted, labels, num_classes),
            "num_samples": int(sample_feats.shape[0])}


def evaluate_samples(classifier_params: Any, classifier_config: Any, images_uint8: Any, labels: Any,
                     reference_images_uint8: Any, *, batch_size: int = 500, k: int = 3) -> Dict[str, Any]:
    """FD, precision/recall and class consistency of uint8 samples [N, 28, 28] generated for `labels` [N],
    against uint8 reference images (e.g. the Fashion-MNIST test set), in the classifier's feature space.

    Returns {"fd", "precision", "recall", "class_consistency", "per_class_consistency", "num_samples"}
    (see evaluate_features). To score several sample sets against one reference, compute the reference
    features once with image_features and call evaluate_features.
    """
    labels = np.asarray(labels)
    if labels.ndim != 1 or labels.shape[0] != np.shape(images_uint8)[0]:
        raise ValueError(f"labels must be [N] for {np.shape(images_uint8)[0]} images, got shape {labels.shape}")
    sample_feats, predicted = image_features(classifier_params, classifier_config, images_uint8,
                                             batch_size=batch_size)
    reference_feats, _ = image_features(classifier_params, classifier_config, reference_images_uint8,
                                        batch_size=batch_size)
    return evaluate_features(sample_feats, predicted, labels, reference_feats, k=k,
                             num_classes=classifier_config.num_classes)


# ----------------------------------------------------------------------------------------------- pictures

_GAP = 2  # pixels between tiles and around the grid
_BACKGROUND = 64


def _check_pixels(images: Any, name: str) -> np.ndarray:
    images = np.asarray(images)
    if images.ndim == 4 and images.shape[-1] == 1:
        images = images[..., 0]
    if images.ndim != 3 or images.dtype != np.uint8:
        raise ValueError(f"{name} must be uint8 [N, H, W], got {images.dtype} {images.shape}; "
                         "use vqvae.to_uint8 on model-space images")
    return images


def _write_tiles(rows: Sequence[Sequence[Optional[np.ndarray]]], path: PathLike, scale: int,
                 row_names: Optional[Sequence[str]] = None, tile_shape: Tuple[int, int] = (28, 28)) -> str:
    """Tiles (None = empty) in rows -> a grayscale PNG; optional text at the start of each row."""
    from PIL import Image, ImageDraw

    if not isinstance(scale, (int, np.integer)) or scale < 1:
        raise ValueError(f"scale must be an integer >= 1, got {scale!r}")
    th, tw = tile_shape[0] * scale, tile_shape[1] * scale
    num_cols = max(1, max(len(r) for r in rows))
    label_width = 0
    if row_names is not None:
        probe = ImageDraw.Draw(Image.new("L", (1, 1)))
        label_width = int(math.ceil(max(probe.textlength(str(n)) for n in row_names))) + 2 * _GAP
    width = label_width + num_cols * (tw + _GAP) + _GAP
    height = len(rows) * (th + _GAP) + _GAP
    canvas = Image.new("L", (width, height), _BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    for r, row in enumerate(rows):
        top = _GAP + r * (th + _GAP)
        if row_names is not None:
            _, y0, _, y1 = draw.textbbox((0, 0), str(row_names[r]))
            draw.text((_GAP, top + (th - (y1 + y0)) // 2), str(row_names[r]), fill=255)
        for c, tile in enumerate(row):
            if tile is None:
                continue
            big = np.repeat(np.repeat(tile, scale, axis=0), scale, axis=1)
            canvas.paste(Image.fromarray(big, "L"), (label_width + _GAP + c * (tw + _GAP), top))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path, format="PNG")
    return str(path)


def grid_size(num_rows: int, num_cols: int, scale: int = 2, tile: int = 28) -> Tuple[int, int]:
    """(width, height) in pixels of a save_grid / save_pairs picture without row names."""
    return num_cols * (tile * scale + _GAP) + _GAP, num_rows * (tile * scale + _GAP) + _GAP


def save_grid(images_uint8: Any, path: PathLike, rows: Optional[int] = None, labels: Any = None,
              class_names: Optional[Sequence[str]] = None, scale: int = 2) -> str:
    """A PNG grid of uint8 images [N, H, W], each pixel drawn scale x scale; returns the path written.

    With labels [N]: one row per distinct label (ascending), that label's images in order, and the class
    name (class_names[label], or the label number when class_names is None) at the row's start.
    Without labels: `rows` rows (default ceil(sqrt(N))), filled row by row. Tiles are 2 px apart; without
    row names the size is grid_size(rows, columns, scale).
    """
    images = _check_pixels(images_uint8, "images")
    n = images.shape[0]
    if n == 0:
        raise ValueError("save_grid got no images")
    if labels is not None:
        labels = np.asarray(labels)
        if labels.shape != (n,):
            raise ValueError(f"labels must be [{n}] (one per image), got shape {labels.shape}")
        classes = sorted(set(int(x) for x in labels))
        tile_rows = [[images[i] for i in np.flatnonzero(labels == c)] for c in classes]
        if class_names is not None:
            if max(classes) >= len(class_names) or min(classes) < 0:
                raise ValueError(f"labels {classes} outside class_names (len {len(class_names)})")
            names = [class_names[c] for c in classes]
        else:
            names = [str(c) for c in classes]
        return _write_tiles(tile_rows, path, scale, row_names=names, tile_shape=images.shape[1:])
    if rows is None:
        rows = int(math.ceil(math.sqrt(n)))
    if rows < 1:
        raise ValueError(f"rows must be >= 1, got {rows}")
    cols = int(math.ceil(n / rows))
    tile_rows = [list(images[r * cols:(r + 1) * cols]) for r in range(rows)]
    return _write_tiles(tile_rows, path, scale, tile_shape=images.shape[1:])


def save_pairs(originals: Any, reconstructions: Any, path: PathLike, columns: int = 16, scale: int = 2) -> str:
    """Originals above their reconstructions: blocks of two rows (originals, then reconstructions) of up to
    `columns` images each. Size: grid_size(2 * ceil(N / columns), min(N, columns), scale)."""
    originals = _check_pixels(originals, "originals")
    reconstructions = _check_pixels(reconstructions, "reconstructions")
    if originals.shape != reconstructions.shape or originals.shape[0] == 0:
        raise ValueError(f"originals {originals.shape} and reconstructions {reconstructions.shape} must be "
                         "non-empty and of one shape")
    if columns < 1:
        raise ValueError(f"columns must be >= 1, got {columns}")
    tile_rows = []
    for start in range(0, originals.shape[0], columns):
        tile_rows.append(list(originals[start:start + columns]))
        tile_rows.append(list(reconstructions[start:start + columns]))
    return _write_tiles(tile_rows, path, scale, tile_shape=originals.shape[1:])


def plot_curve(xs: Sequence[float], ys_by_name: Mapping[str, Sequence[float]], path: PathLike, xlabel: str,
               ylabel: str, title: str = "") -> str:
    """Line plot of one or more named series against xs (e.g. FD against guidance scale per model)."""
    xs = list(xs)
    for name, ys in ys_by_name.items():
        if len(ys) != len(xs):
            raise ValueError(f"series {name!r} has {len(ys)} values for {len(xs)} x values")
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    for name, ys in ys_by_name.items():
        ax.plot(xs, list(ys), "o-", label=name, lw=1.5, ms=4)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    ax.grid(alpha=0.3)
    if ys_by_name:
        ax.legend()
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return str(path)


__all__ = ["class_consistency", "evaluate_features", "evaluate_samples", "feature_statistics", "frechet_distance",
           "frechet_distance_from_statistics", "grid_size", "image_features", "knn_radii", "per_class_consistency",
           "plot_curve", "precision_recall", "save_grid", "save_pairs"]
