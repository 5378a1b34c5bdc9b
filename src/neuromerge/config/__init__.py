"""The merge configuration: the typed schema (``schema``) and mergekit's YAML translated into it
(``mergekit``)."""

from neuromerge.config.mergekit import from_mergekit
from neuromerge.config.schema import (
    MergeConfig,
    ModelEntry,
    TensorClass,
    config_from_dict,
    load_config,
)

__all__ = ["MergeConfig", "ModelEntry", "TensorClass", "config_from_dict", "from_mergekit",
           "load_config"]
