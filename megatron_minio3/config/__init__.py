"""Typed configuration: one dataclass tree, YAML files in configs/, dotted command-line overrides."""
from megatron_minio3.config.loader import ConfigError, dump_yaml, load_config, parse_cli, to_dict
from megatron_minio3.config.schema import (
    ActorConfig,
    ClusterConfig,
    Config,
    OptimConfig,
    ParallelConfig,
    RefConfig,
    SftConfig,
    TrainerConfig,
)

__all__ = [
    "ActorConfig",
    "ClusterConfig",
    "Config",
    "ConfigError",
    "OptimConfig",
    "ParallelConfig",
    "RefConfig",
    "SftConfig",
    "TrainerConfig",
    "dump_yaml",
    "load_config",
    "parse_cli",
    "to_dict",
]
