"""Training: run configs, the sharded train step and loop, checkpoints.

    from jaxar.train import load_run_config, train
    result = train(load_run_config("configs/tiny.yaml", ["train.steps=30"]))

Imported lazily: `import jaxar.train.data` does not pull in orbax or optax.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "MeshConfig": "jaxar.train.config",
    "RunConfig": "jaxar.train.config",
    "TrainConfig": "jaxar.train.config",
    "load_run_config": "jaxar.train.config",
    "build_run_config": "jaxar.train.config",
    "TrainState": "jaxar.train.trainer",
    "TrainResult": "jaxar.train.trainer",
    "RunMismatchError": "jaxar.train.trainer",
    "build_step_functions": "jaxar.train.trainer",
    "cross_entropy_sums": "jaxar.train.trainer",
    "loss_fn": "jaxar.train.trainer",
    "make_optimizer": "jaxar.train.trainer",
    "read_metrics": "jaxar.train.trainer",
    "train": "jaxar.train.trainer",
    "make_mesh": "jaxar.train.sharding",
    "initialize_distributed": "jaxar.train.sharding",
    "LoraConfig": "jaxar.train.lora",
    "export_model": "jaxar.train.trainer",
    "describe_damage": "jaxar.train.checkpoint",
    "find_checkpoint": "jaxar.train.checkpoint",
    "load_for_inference": "jaxar.train.checkpoint",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'jaxar.train' has no attribute {name!r}")
