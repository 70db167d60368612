"""The DDN model: configuration, generator, Discrete Distribution Layer and Split-and-Prune."""

from ddn_dist.model.config import ModelConfig
from ddn_dist.model.ddl import DiscreteDistributionLayer, LayerOutput, SelectFn
from ddn_dist.model.generator import DDN, DDNOutput, build_model
from ddn_dist.model.split_prune import (
    LocalParamAccess,
    ParamAccess,
    SplitEvent,
    SplitPrune,
)

__all__ = [
    "DDN",
    "DDNOutput",
    "DiscreteDistributionLayer",
    "LayerOutput",
    "LocalParamAccess",
    "ModelConfig",
    "ParamAccess",
    "SelectFn",
    "SplitEvent",
    "SplitPrune",
    "build_model",
]
