"""Tensor parallelism: the Megatron partition of the base model and S-LoRA's partition of
LoRA over a 1-D `tp` mesh, the forward under `jax.shard_map`, loaders that place
checkpoints and adapters straight into their shards, and adapter shards in the pages of
the unified pool (`paged`)."""

from slora_jax.parallel.mesh import TP_AXIS, check_tp, local_config, make_mesh, tp_size
from slora_jax.parallel.lora import TP_LORA_IMPLS
from slora_jax.parallel.model import decode_step, forward, forward_jit, greedy_generate, prefill
from slora_jax.parallel.paged import ShardedPagedLora, TPShards, put_shards, write_adapter_shards
from slora_jax.parallel.sharding import (
    LORA_STRATEGIES,
    create_pool,
    dense_kv_cache,
    init_random_lora,
    init_random_params,
    load_checkpoint,
    pack_slots,
    padded_rank,
    paged_kv_cache,
    param_specs,
    shard_lora_weights,
    shard_params,
    unstack_layers,
    unstack_lora,
)

__all__ = [
    "LORA_STRATEGIES",
    "ShardedPagedLora",
    "TPShards",
    "TP_AXIS",
    "TP_LORA_IMPLS",
    "check_tp",
    "create_pool",
    "decode_step",
    "dense_kv_cache",
    "forward",
    "forward_jit",
    "greedy_generate",
    "init_random_lora",
    "init_random_params",
    "load_checkpoint",
    "local_config",
    "make_mesh",
    "pack_slots",
    "padded_rank",
    "paged_kv_cache",
    "param_specs",
    "prefill",
    "put_shards",
    "shard_lora_weights",
    "shard_params",
    "tp_size",
    "unstack_layers",
    "unstack_lora",
    "write_adapter_shards",
]
