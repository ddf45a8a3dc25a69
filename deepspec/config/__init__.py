"""Validated configuration: one schema of typed, frozen dataclasses (``schema.py``: :class:`Config`
and its sections), loading and overrides (``loader.py``)."""

from deepspec.config.loader import (
    build_config,
    config_to_dict,
    finalize_config,
    get_default_config,
    load_config,
    parse_opts,
    save_config,
    suggest_keys,
    validate_against_target,
)
from deepspec.config.schema import (
    ALGORITHMS,
    FIELDS,
    FIELDS_BY_KEY,
    Config,
    DataConfig,
    LoggingConfig,
    ModelConfig,
    TrainConfig,
)

__all__ = [
    "ALGORITHMS",
    "FIELDS",
    "FIELDS_BY_KEY",
    "Config",
    "DataConfig",
    "LoggingConfig",
    "ModelConfig",
    "TrainConfig",
    "build_config",
    "config_to_dict",
    "finalize_config",
    "get_default_config",
    "load_config",
    "parse_opts",
    "save_config",
    "suggest_keys",
    "validate_against_target",
]
