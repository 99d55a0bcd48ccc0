"""slora-jax: serve thousands of LoRA adapters of one Llama base model with JAX and Pallas."""

from slora_jax.config import PRESETS, PROJECTIONS, EngineConfig, LlamaConfig, preset
from slora_jax.engine import Engine, SamplingParams
from slora_jax.errors import AdapterError, CheckpointError, RequestError, SloraError

__version__ = "0.1.0"

__all__ = [
    "AdapterError",
    "CheckpointError",
    "Engine",
    "EngineConfig",
    "LlamaConfig",
    "PRESETS",
    "PROJECTIONS",
    "RequestError",
    "SamplingParams",
    "SloraError",
    "preset",
]
