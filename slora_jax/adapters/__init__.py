"""PEFT LoRA adapters: host-side representation, loading and validation, slot packing."""

from slora_jax.adapters.adapter import LoraAdapter, LoraModule
from slora_jax.adapters.pack import pack_slots
from slora_jax.adapters.peft import load_adapter

__all__ = ["LoraAdapter", "LoraModule", "load_adapter", "pack_slots"]
