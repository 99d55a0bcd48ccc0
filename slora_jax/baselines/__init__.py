"""The systems slora-jax is compared with, built on the same model code.

- `PeftMergeServer` (`peft_merge`): S-LoRA's PEFT baseline, one adapter per
  batch merged into the base weights for the batch.
- `MergedCopiesServer` (`merged_copies`): one merged copy of the model per
  adapter (S-LoRA's "vLLM-packed"); `OutOfDeviceMemory` when they do not fit.

`transformers` + `peft` itself (`hf_peft`) runs from `scripts/bench_hf_peft.py`
(the library does not import torch).
"""

from slora_jax.baselines.merge import merge_lora, merge_slot_weights
from slora_jax.baselines.merged_copies import MergedCopiesServer, OutOfDeviceMemory, device_memory_bytes
from slora_jax.baselines.peft_merge import PeftMergeServer
from slora_jax.baselines.static_batch import StaticBatchServer

__all__ = [
    "MergedCopiesServer",
    "OutOfDeviceMemory",
    "PeftMergeServer",
    "StaticBatchServer",
    "device_memory_bytes",
    "merge_lora",
    "merge_slot_weights",
]
