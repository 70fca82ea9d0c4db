from jaxar.config import ModelConfig, ConfigError  # noqa
