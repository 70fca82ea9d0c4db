"""A small Fashion-MNIST classifier CNN, the domain network of the image metrics (jaxar/image_metrics.py).

  image [B, 28, 28, 1] in [-1, 1]
    -> conv3x3 C, relu, conv3x3 C, relu, maxpool 2        [B, 14, 14, C]
    -> conv3x3 2C, relu, conv3x3 2C, relu, maxpool 2      [B, 7, 7, 2C]
    -> flatten -> dense feature_dim, relu                 features [B, feature_dim]  (the penultimate layer)
    -> dropout (train only) -> dense num_classes          logits [B, num_classes]

The features are what the Frechet distance and precision/recall of samples are measured on (the FID recipe with
a domain network in place of Inception); the argmax of the logits gives the class consistency of conditional
samples.

Usage:
  config = ClassifierConfig()
  params = init_params(config, jax.random.PRNGKey(0))
  (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, images, labels, config, rng)
  feats = features(params, images, config)      # [B, feature_dim]
  labels = predict(params, images, config)      # int32 [B]
"""

import dataclasses
from typing import Any, Dict, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxar.models.vision.vqvae import IMAGE_SIZE, _check_images


@dataclasses.dataclass(frozen=True)
class ClassifierConfig:
    """Classifier hyper-parameters.

    num_classes: output classes (10 for Fashion-MNIST).
    channels: C, the width of the 28x28 stage; the 14x14 stage uses 2C.
    feature_dim: width of the penultimate dense layer (the features of the image metrics).
    dropout: dropout rate on the features before the last layer, in training only.
    """
    num_classes: int = 10
    channels: int = 32
    feature_dim: int = 128
    dropout: float = 0.25

    def __post_init__(self):
        for name in ("num_classes", "channels", "feature_dim"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"ClassifierConfig.{name} must be an integer >= 1, got {value!r}")
        if self.num_classes < 2:
            raise ValueError(f"ClassifierConfig.num_classes must be >= 2, got {self.num_classes}")
        if not 0.0 <= float(self.dropout) < 1.0:
            raise ValueError(f"ClassifierConfig.dropout must be in [0, 1), got {self.dropout}")

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "ClassifierConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"ClassifierConfig: unknown keys {unknown}; known keys are {sorted(known)}")
        return cls(**d)


class Classifier(nn.Module):
    config: ClassifierConfig

    @nn.compact
    def __call__(self, images: jax.Array, train: bool = False) -> Tuple[jax.Array, jax.Array]:
        """images float [B, 28, 28(, 1)] in [-1, 1] -> (logits [B, num_classes], features [B, feature_dim])."""
        c = self.config
        x = _check_images(images)
        for width in (c.channels, 2 * c.channels):
            x = nn.relu(nn.Conv(width, (3, 3), padding="SAME")(x))
            x = nn.relu(nn.Conv(width, (3, 3), padding="SAME")(x))
            x = nn.max_pool(x, (2, 2), strides=(2, 2))
        # [B, 7 * 7 * 2C]
        x = x.reshape(x.shape[0], -1)
        feats = nn.relu(nn.Dense(c.feature_dim, name="features")(x))
        h = nn.Dropout(c.dropout, deterministic=not train)(feats)
        logits = nn.Dense(c.num_classes, name="head")(h)
        return logits, feats


def init_params(config: ClassifierConfig, rng: jax.Array) -> Dict[str, Any]:
    """Fresh variables {"params": ...} (a plain dict)."""
    # one compiled program instead of an eager op per layer (~3x faster on CPU)
    init = jax.jit(lambda key: Classifier(config).init(key, jnp.zeros((1, IMAGE_SIZE, IMAGE_SIZE, 1), jnp.float32)))
    return {"params": init(rng)["params"]}


def _check_labels(labels: jax.Array, batch: int) -> jax.Array:
    labels = jnp.asarray(labels)
    if labels.shape != (batch,) or not jnp.issubdtype(labels.dtype, jnp.integer):
        raise ValueError(f"labels must be integer [{batch}] (one per image), got {labels.dtype} {labels.shape}")
    return labels


def loss_fn(params: Any, images: jax.Array, labels: jax.Array, config: ClassifierConfig,
            rng: Optional[jax.Array] = None) -> Tuple[jax.Array, Dict[str, jax.Array]]:
    """Mean cross-entropy of the labels; dropout is on when `rng` is given.

    Args:
      params: Classifier variables ({"params": ...}).
      images: float [B, 28, 28(, 1)] in [-1, 1].
      labels: int [B] in [0, num_classes).
      config: the model's ClassifierConfig.
      rng: PRNG key for dropout (training); None for the deterministic (eval-mode) loss.
    Returns:
      (loss, {"accuracy": fraction of argmax(logits) == labels}).
    """
    images = _check_images(images)
    labels = _check_labels(labels, images.shape[0])
    train = rng is not None
    rngs = {"dropout": rng} if train else None
    out_logits, _ = Classifier(config).apply(params, images, train=train, rngs=rngs)
    log_probs = jax.nn.log_softmax(out_logits.astype(jnp.float32), axis=-1)
    # [B]
    nll = -jnp.take_along_axis(log_probs, labels[:, None].astype(jnp.int32), axis=-1)[:, 0]
    accuracy = jnp.mean((jnp.argmax(out_logits, axis=-1) == labels).astype(jnp.float32))
    return jnp.mean(nll), {"accuracy": accuracy}


def logits(params: Any, images: jax.Array, config: ClassifierConfig) -> jax.Array:
    """Eval-mode logits [B, num_classes]."""
    return Classifier(config).apply(params, images)[0]


def features(params: Any, images: jax.Array, config: ClassifierConfig) -> jax.Array:
    """Eval-mode penultimate features [B, feature_dim] (after the relu)."""
    return Classifier(config).apply(params, images)[1]


def predict(params: Any, images: jax.Array, config: ClassifierConfig) -> jax.Array:
    """Predicted classes int32 [B]."""
    return jnp.argmax(logits(params, images, config), axis=-1).astype(jnp.int32)


__all__ = ["Classifier", "ClassifierConfig", "features", "init_params", "logits", "loss_fn", "predict"]
