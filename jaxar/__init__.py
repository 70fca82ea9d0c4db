"""jaxar: train autoregressive models over device meshes and sample from them fast.

    config, params = jaxar.from_pretrained(path)
    logits, cache = jaxar.forward(params, tokens, config=config, positions=None, cache=None)
    jaxar.save_pretrained(config, params, path)
"""

from jaxar.api import from_pretrained, save_pretrained
from jaxar.cache import KVCache
from jaxar.config import ConfigError, ModelConfig
from jaxar.models.transformer import forward, init_params, param_logical_axes

__all__ = [
    "ConfigError",
    "KVCache",
    "ModelConfig",
    "forward",
    "from_pretrained",
    "init_params",
    "param_logical_axes",
    "save_pretrained",
]
__version__ = "0.1.0"
