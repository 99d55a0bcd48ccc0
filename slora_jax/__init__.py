"""slora-jax: serve thousands of LoRA adapters of one Llama base model with JAX and Pallas."""

from slora_jax.config import PRESETS, PROJECTIONS, LlamaConfig, preset
from slora_jax.errors import AdapterError, CheckpointError, SloraError

__version__ = "0.1.0"

__all__ = [
    "AdapterError",
    "CheckpointError",
    "LlamaConfig",
    "PRESETS",
    "PROJECTIONS",
    "SloraError",
    "preset",
]
