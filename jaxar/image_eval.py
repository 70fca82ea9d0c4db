"""Evaluating image runs against the Fashion-MNIST test split, in a trained classifier's feature space.

    ev = ImageEvaluator("runs/fashion-classifier")           # classifier + reference features, once
    ev.evaluate(images_uint8, labels)                         # {"fd", "precision", "recall", "class_consistency", ...}
    evaluate_tokenizer(load_image_run("runs/fashion-vq"), ev) # reconstruction MSE and FD of both quantizers
    evaluate_generator(load_image_run("runs/fashion-var"), ev, cfg_scales=[1, 2, 3])

FD is the FID recipe with the domain classifier's penultimate features in place of Inception's; precision /
recall are Kynkäänniemi et al.'s k-NN manifold estimates (jaxar.image_metrics). Samples are drawn class-balanced
(`per_label` of every class), and the reference is the whole 10,000-image test split.
"""

from __future__ import annotations

import os
from typing import Optional, Sequence

import numpy as np

DEFAULT_CLASSIFIER = "runs/fashion-classifier"


class ImageEvaluator:
    def __init__(self, classifier_run: str = DEFAULT_CLASSIFIER, *, data_source: str = "fashion_mnist", k: int = 3):
        from jaxar.train.images import load_image_split
        from jaxar.train.vision import load_image_run

        if not os.path.isdir(classifier_run):
            raise FileNotFoundError(f"classifier run {classifier_run!r} not found; train it first: python train.py "
                                    "--config configs/fashion-classifier.yaml")
        run = load_image_run(classifier_run)
        if run.task != "classifier":
            raise ValueError(f"{classifier_run} is a {run.task!r} run, not a classifier run")
        from jaxar.image_metrics import image_features, knn_radii

        self.run = run
        self.k = k
        self.reference_images, self.reference_labels = load_image_split(data_source, "test")
        # The reference features once; every evaluation reuses them.
        self.reference_features, self.reference_predicted = image_features(run.params, run.config,
                                                                           self.reference_images)
        self.reference_radii = knn_radii(self.reference_features, k)

    def evaluate(self, images, labels) -> dict:
        from jaxar.image_metrics import evaluate_features, image_features

        feats, predicted = image_features(self.run.params, self.run.config, np.asarray(images))
        return evaluate_features(feats, predicted, np.asarray(labels), self.reference_features, k=self.k,
                                 num_classes=self.run.config.num_classes, reference_radii=self.reference_radii)

    def accuracy(self) -> float:
        """The classifier's test accuracy (its own trustworthiness)."""
        return float(np.mean(self.reference_predicted == self.reference_labels))


def balanced_labels(num_classes: int, per_label: int) -> np.ndarray:
    return np.repeat(np.arange(num_classes, dtype=np.int64), per_label)


def evaluate_tokenizer(run, evaluator: ImageEvaluator, *, batch_size: int = 500) -> dict:
    """Reconstruction MSE (in [-1, 1] pixel space) and the metrics of reconstructions of the test split."""
    import jax

    from jaxar.models.vision import vqvae

    images = evaluator.reference_images
    labels = evaluator.reference_labels
    cfg = run.config

    @jax.jit
    def recon(params, x):
        out, aux = vqvae.VQVAE(cfg).apply(params, vqvae.to_model_images(x))
        return out, aux.get("ms_recon", out)

    singles, multis = [], []
    n = len(images) - len(images) % batch_size
    for s in range(0, n, batch_size):
        a, b = jax.device_get(recon(run.params, images[s:s + batch_size]))
        singles.append(np.asarray(a))
        multis.append(np.asarray(b))
    ref = np.asarray(vqvae.to_model_images(images[:n]))
    result = {}
    kinds = [("vq", np.concatenate(singles))]
    if cfg.patch_nums:
        kinds.append(("msvq", np.concatenate(multis)))
    for name, rec in kinds:
        metrics = evaluator.evaluate(vqvae.to_uint8(rec), labels[:n])
        metrics["mse"] = float(np.mean(np.square(np.clip(rec, -1, 1) - ref)))
        result[name] = metrics
    return result


def evaluate_generator(run, evaluator: ImageEvaluator, *, cfg_scales: Sequence[float] = (2.0,),
                       cfg_schedule: Optional[str] = None, per_label: int = 100, temperature: float = 1.0,
                       top_k: int = 0, top_p: float = 1.0, seed: int = 0, batch_size: int = 64,
                       progress: bool = True) -> list:
    """One row per guidance scale: the sample metrics and sampling speed."""
    from jaxar.decode.image_cli import sample_run

    labels = balanced_labels(run.config.num_classes, per_label)
    rows = []
    for scale in cfg_scales:
        images, stats = sample_run(run, labels, cfg_scale=scale, cfg_schedule=cfg_schedule, temperature=temperature,
                                   top_k=top_k, top_p=top_p, seed=seed, batch_size=batch_size, progress=progress)
        metrics = evaluator.evaluate(images, labels)
        rows.append({"cfg_scale": float(scale), **metrics, "images_per_s": stats["images_per_s"],
                     "forwards_per_image": stats["forwards_per_image"]})
    return rows


__all__ = ["DEFAULT_CLASSIFIER", "ImageEvaluator", "balanced_labels", "evaluate_generator", "evaluate_tokenizer"]
