"""pd2bw-ray: PipeDream-2BW pipeline-parallel training orchestrated by Ray."""

from .config import ActorResources, CommConfig, ConfigError, PipelineConfig, StageOptions
from .driver import PipelineTrainer
from .executor import NonFiniteError, PipelineFailure
from .failure import FailureConfig, run_with_restarts
from .checkpoint import CheckpointConfig, prune_checkpoints

__all__ = ["ActorResources", "CheckpointConfig", "CommConfig", "ConfigError", "FailureConfig",
           "NonFiniteError", "PipelineConfig", "PipelineFailure", "PipelineTrainer",
           "StageOptions", "prune_checkpoints", "run_with_restarts"]
