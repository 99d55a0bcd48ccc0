"""The "vLLM-packed" baseline of S-LoRA: one full copy of the model, with its adapter merged, per adapter.

Each adapter's copy is made when the adapter is added, as a separate model
instance would be. Copies must fit the device memory budget beside the base
model; the adapter whose copy would not fit raises `OutOfDeviceMemory` (the
runner reports it in the results instead of crashing). Batches are served
FCFS over adapters, one at a time, like instances time-sharing one GPU.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp

from slora_jax.baselines.merge import merge_lora
from slora_jax.baselines.static_batch import StaticBatchServer, tree_bytes
from slora_jax.errors import SloraError
from slora_jax.model.llama import Params


class OutOfDeviceMemory(SloraError, MemoryError):
    """Model copies no longer fit the device memory budget."""


def device_memory_bytes(device: jax.Device | None = None) -> int:
    """The device's memory limit (`bytes_limit`), or the host's physical memory where there is none (CPU)."""
    device = device or jax.devices()[0]
    stats = device.memory_stats() or {}
    if "bytes_limit" in stats:
        return int(stats["bytes_limit"])
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


class MergedCopiesServer(StaticBatchServer):
    def __init__(self, *args, memory_budget_bytes: int = 0, **kwargs):
        super().__init__(*args, **kwargs)
        self.memory_budget_bytes = memory_budget_bytes or device_memory_bytes()
        self.copy_bytes = tree_bytes(self.params)
        self._copies: dict[str, Params] = {}

    def check_fits(self, num_adapters: int) -> None:
        """Raise `OutOfDeviceMemory` now, before any copy is made, if `num_adapters` copies cannot all fit."""
        needed = (num_adapters + 1) * self.copy_bytes  # the base model and one copy per adapter
        if needed > self.memory_budget_bytes:
            raise OutOfDeviceMemory(
                f"merged_copies: {num_adapters} adapters need {num_adapters} model copies, "
                f"{needed / 2**30:.2f} GiB of model weights with the base model; the budget is "
                f"{self.memory_budget_bytes / 2**30:.2f} GiB (it fits {self.memory_budget_bytes // self.copy_bytes - 1})")

    def add_adapter(self, name, source) -> None:
        needed = (len(self._copies) + 2) * self.copy_bytes  # the base model, the copies so far, this one
        if needed > self.memory_budget_bytes:
            raise OutOfDeviceMemory(
                f"merged_copies: the copy for adapter {name!r} (number {len(self._copies) + 1}) needs "
                f"{needed / 2**30:.2f} GiB of model weights in all; the budget is "
                f"{self.memory_budget_bytes / 2**30:.2f} GiB")
        super().add_adapter(name, source)
        merged = merge_lora(self.params, self.cfg, self.host(name))
        # A copy of its own, also of the leaves the adapter leaves alone: a separate model instance.
        self._copies[name] = jax.tree.map(lambda x: jnp.array(x, copy=True), merged)
        self._host.pop(name)  # the copy is all a batch needs

    def _params_for(self, adapter: str | None) -> Params:
        return self.params if adapter is None else self._copies[adapter]

    def memory_report(self) -> dict[str, float]:
        return {**super().memory_report(), "num_copies": len(self._copies),
                "copies_bytes": len(self._copies) * self.copy_bytes}
