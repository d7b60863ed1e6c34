"""The one typed config tree: YAML in, ``--set a.b=c`` overrides, errors that name the key and the fix.

``schema``: the dataclasses (every key, its type and default) and the checks each makes on itself;
``loader``: YAML and overrides into a Config, ``config_from_dict``, ``resume_differences``;
``checks``: checks against the world (ranks, files and folders), run at train or launch time;
``backends``: the backend registry (name -> module, checks, memory estimate); ``plan``: what a backend will do
(the DeepSpeed config, memory per GPU); ``errors``: ``ConfigError``.
No module here imports torch: the login node validates configs without it.
"""

from keeltune.config.backends import BACKENDS, DEFAULT_BACKEND, BackendSpec, backend_spec
from keeltune.config.checks import check_paths, check_world_size
from keeltune.config.loader import config_from_dict, load_config, resume_differences
from keeltune.config.schema import (
    BIAS_AXES,
    BIAS_METRICS,
    RESUME_MUTABLE,
    SWAP_AXES,
    BiasConfig,
    BiasGuardConfig,
    BiasProbeConfig,
    Config,
    ConfigError,
    ConsistencyConfig,
    CounterfactualConfig,
    DataConfig,
    DedupConfig,
    EarlyStoppingConfig,
    FieldNames,
    QLoraConfig,
    RegularizationConfig,
    RetentionGuardConfig,
    SourceConfig,
    StageConfig,
    TaskConfig,
    TaskGenerationConfig,
    VocabularyConfig,
    WandbConfig,
    available_metrics,
    mixing_counts,
)

__all__ = [
    "BACKENDS",
    "BIAS_AXES",
    "BIAS_METRICS",
    "SWAP_AXES",
    "BiasConfig",
    "BiasGuardConfig",
    "BiasProbeConfig",
    "ConsistencyConfig",
    "CounterfactualConfig",
    "BackendSpec",
    "DEFAULT_BACKEND",
    "backend_spec",
    "RESUME_MUTABLE",
    "Config",
    "ConfigError",
    "DataConfig",
    "DedupConfig",
    "EarlyStoppingConfig",
    "FieldNames",
    "QLoraConfig",
    "RegularizationConfig",
    "RetentionGuardConfig",
    "SourceConfig",
    "StageConfig",
    "TaskConfig",
    "TaskGenerationConfig",
    "VocabularyConfig",
    "WandbConfig",
    "available_metrics",
    "check_paths",
    "check_world_size",
    "config_from_dict",
    "load_config",
    "mixing_counts",
    "resume_differences",
]
