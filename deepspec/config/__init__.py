"""Validated configuration: one schema of typed, frozen dataclasses (``schema.py``: :class:`Config`
and its sections), the sources a config is read from (``sources.py``: files, ``_base_`` /
``_target_`` layers, ``--opts``) and merging, checking and saving (``loader.py``)."""

from deepspec.config.loader import (
    build_config,
    config_to_dict,
    finalize_config,
    get_default_config,
    load_config,
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
from deepspec.config.sources import parse_opts

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
