"""PEFT LoRA adapters: host-side representation, loading and validation, slot packing,
random adapters for experiments and writing adapters in PEFT format."""

from slora_jax.adapters.adapter import LoraAdapter, LoraModule
from slora_jax.adapters.pack import pack_slots
from slora_jax.adapters.peft import load_adapter
from slora_jax.adapters.random import random_adapter, save_peft_adapter

__all__ = ["LoraAdapter", "LoraModule", "load_adapter", "pack_slots", "random_adapter", "save_peft_adapter"]
