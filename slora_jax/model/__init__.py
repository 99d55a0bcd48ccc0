"""The functional Llama, its KV cache interface and Hugging Face checkpoint I/O."""

from slora_jax.model.cache import DenseKVCache
from slora_jax.model.checkpoint import load_checkpoint, read_config
from slora_jax.model.generate import greedy_generate
from slora_jax.model.llama import (
    LoraInputs,
    decode_step,
    forward,
    init_random_params,
    param_shapes,
    prefill,
    stack_layers,
    unstack_layers,
)

__all__ = [
    "DenseKVCache",
    "LoraInputs",
    "decode_step",
    "forward",
    "greedy_generate",
    "init_random_params",
    "load_checkpoint",
    "param_shapes",
    "prefill",
    "read_config",
    "stack_layers",
    "unstack_layers",
]
