"""pd2bw-ray: PipeDream-2BW pipeline-parallel training orchestrated by Ray."""

from .config import ActorResources, CommConfig, ConfigError, PipelineConfig, StageOptions
from .driver import PipelineTrainer
from .executor import NonFiniteError, PipelineFailure

__all__ = ["ActorResources", "CommConfig", "ConfigError", "NonFiniteError", "PipelineConfig", "PipelineFailure",
           "PipelineTrainer", "StageOptions"]
