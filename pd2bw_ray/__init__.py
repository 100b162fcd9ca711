"""pd2bw-ray: PipeDream-2BW pipeline-parallel training orchestrated by Ray."""

from .config import ActorResources, CommConfig, ConfigError, PipelineConfig, StageOptions
from .driver import PipelineTrainer
from .executor import PipelineFailure

__all__ = ["ActorResources", "CommConfig", "ConfigError", "PipelineConfig", "PipelineFailure",
           "PipelineTrainer", "StageOptions"]
