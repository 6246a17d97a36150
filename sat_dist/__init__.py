"""sat_dist: every rank builds the model on the meta device, reads only its shard's bytes,
materializes them on its device, and the group agrees the model is loaded and in eval mode."""
from .errors import CheckpointError, ConfigError, GroupLoadError, LoraError, PlanError, SatDistError
from .engine import load_engine
from .loader import load_model, set_loras, shutdown

__all__ = ["load_model", "load_engine", "set_loras", "shutdown", "SatDistError", "ConfigError", "CheckpointError",
           "PlanError", "GroupLoadError", "LoraError"]
__version__ = "0.1.0"
