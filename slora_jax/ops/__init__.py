"""Public functional ops: gathered LoRA (and, later, paged attention)."""

from slora_jax.ops.lora import (
    IMPLS,
    KernelConfig,
    LoraMeta,
    PagedWeights,
    SlotWeights,
    add_lora,
    add_lora_group,
    build_lora_meta,
    build_lora_meta_jnp,
    default_block_m,
    expand,
    lora_reference,
    num_tiles,
    random_slot_weights,
    shrink,
)

__all__ = [
    "IMPLS",
    "KernelConfig",
    "LoraMeta",
    "PagedWeights",
    "SlotWeights",
    "add_lora",
    "add_lora_group",
    "build_lora_meta",
    "build_lora_meta_jnp",
    "default_block_m",
    "expand",
    "lora_reference",
    "num_tiles",
    "random_slot_weights",
    "shrink",
]
