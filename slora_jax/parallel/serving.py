"""The serving engine's parts under tensor parallelism (`EngineConfig.tp > 1`).

`Engine` builds a `TensorParallel` and takes from it: the params placed in
their shards (per-layer buffers for `layer_loop="unrolled"`), the KV pool split
by KV heads (`sharding.create_pool`), dense adapter slots split per
`tp_lora_strategy` (`ShardedSlotAdapterStore`), and the `forward` its jitted
step calls: `model.forward`'s signature, running `parallel.forward` under
`shard_map`. Sampling stays in the same jitted step, outside `shard_map`, on the
logits split over the vocabulary (XLA inserts the gathers it needs).

Not yet: adapter pages of the unified pool under TP (`unified_memory=True`).
Adapter rows are chunk-major in pool pages (`memory/pool.py`), and a device's
slab of a page is a slice of its KV heads, so an adapter's A/B split would need
its own page layout per device; until then tp > 1 takes S-LoRA's "no unified
memory" ablation (`SlotAdapterStore`: fixed dense slots beside a KV-only pool)
and refuses `unified_memory=True` with a `ConfigError`.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp

from slora_jax.adapters.store import SlotAdapterStore
from slora_jax.config import PROJECTIONS, EngineConfig, LlamaConfig
from slora_jax.errors import ConfigError
from slora_jax.memory.pool import PoolLayout
from slora_jax.model.checkpoint import read_config
from slora_jax.model.llama import Params
from slora_jax.ops.lora import SlotWeights
from slora_jax.parallel import sharding
from slora_jax.parallel.lora import TP_LORA_IMPLS
from slora_jax.parallel.mesh import local_config, make_mesh, tp_size
from slora_jax.parallel.model import forward as tp_forward


def _mesh(cfg: LlamaConfig, tp: int):
    try:
        return make_mesh(cfg, tp)
    except ValueError as e:
        raise ConfigError(f"EngineConfig.tp: {e}") from None


def load_checkpoint(path: str | os.PathLike, ec: EngineConfig, dtype) -> tuple[LlamaConfig, Params]:
    """A model folder with each leaf placed straight into its shards (per-layer buffers for
    `layer_loop="unrolled"`)."""
    cfg = read_config(path)
    return sharding.load_checkpoint(path, _mesh(cfg, ec.tp), dtype, ec.layer_loop == "unrolled")


def init_random_params(cfg: LlamaConfig, ec: EngineConfig, dtype, seed: int) -> Params:
    """A preset's random weights drawn into their shards (`sharding.init_random_params`)."""
    return sharding.init_random_params(cfg, jax.random.key(seed), _mesh(cfg, ec.tp), dtype,
                                       ec.layer_loop == "unrolled")


class TensorParallel:
    """Mesh, strategy and LoRA implementation of an engine with `tp > 1` (config checked here)."""

    def __init__(self, cfg: LlamaConfig, ec: EngineConfig):
        if ec.unified_memory:
            raise ConfigError(
                f"EngineConfig.tp={ec.tp} needs unified_memory=False for now: adapter pages of the unified pool "
                "are not split across devices yet (dense adapter slots are)")
        if ec.lora_impl not in TP_LORA_IMPLS:
            raise ConfigError(f"EngineConfig.lora_impl={ec.lora_impl!r}: under tensor parallelism one of "
                              f"{TP_LORA_IMPLS} (or 'auto')")
        self.cfg, self.mesh = cfg, _mesh(cfg, ec.tp)
        if ec.lora_impl == "pallas":  # the SGMV kernels take each shard's sizes in 16-wide blocks
            local = local_config(cfg, ec.tp)
            sizes = {p: local.projection_shape(p) for p in PROJECTIONS}
            sizes["hidden / tp"] = (cfg.hidden_size // ec.tp,) * 2  # a row-parallel B split on its output
            bad = {p: s for p, s in sizes.items() if s[0] % 16 or s[1] % 16}
            if bad:
                raise ConfigError(f"EngineConfig.lora_impl='pallas' at tp={ec.tp}: every projection's per-device "
                                  f"sizes must be multiples of 16; these are not: {bad}")
        self.strategy, self.lora_impl = ec.tp_lora_strategy, ec.lora_impl
        self.unstacked = ec.layer_loop == "unrolled"

    def place_params(self, params):
        """Params (host, one device, or already sharded) in their shards; per-layer buffers for
        `layer_loop="unrolled"` (the caller's arrays are left alive)."""
        params = sharding.shard_params(params, self.cfg, self.mesh)
        if self.unstacked and not sharding.has_layer_list(params["layers"]):
            params = sharding.unstack_layers(params, self.cfg, self.mesh, donate=False)
        return params

    def create_pool(self, layout: PoolLayout, dtype) -> jax.Array:
        return sharding.create_pool(layout, self.mesh, dtype)

    def adapter_store(self, ec: EngineConfig, dtype) -> "ShardedSlotAdapterStore":
        return ShardedSlotAdapterStore(self.cfg, self.mesh, self.strategy, ec.max_loras, ec.max_lora_rank,
                                       rank_block=16 if self.lora_impl == "pallas" else 1,
                                       host_budget_bytes=ec.host_adapter_budget_bytes, dtype=dtype)

    def forward(self, params, cfg, tokens_BxS, pos_BxS, cache, lora=None, logits_index_B=None):
        """`model.forward` over the mesh for the engine's step; `cache` is its `PagedKVCache`
        with the single-device layout (each device reads its slab with the local one)."""
        local = sharding.local_pool_layout(cache.layout, tp_size(self.mesh))
        logits, out = tp_forward(params, cfg, tokens_BxS, pos_BxS, cache.replace(layout=local), lora,
                                 logits_index_B, mesh=self.mesh, strategy=self.strategy, lora_impl=self.lora_impl)
        return logits, out.replace(layout=cache.layout)


class ShardedSlotAdapterStore(SlotAdapterStore):
    """`SlotAdapterStore` whose slots live split over the mesh as `strategy` lays them out
    (`sharding.lora_spec`); an adapter loads into its slot shard by shard.

    The slot rank is `max_rank` padded so that every device's rank columns are a
    multiple of `rank_block` (16 for the Pallas kernels) and a split R divides by tp.
    """

    def __init__(self, cfg: LlamaConfig, mesh, strategy: str, max_loras: int, max_rank: int, rank_block: int = 1,
                 host_budget_bytes: int = 8 << 30, dtype=jnp.bfloat16):
        self.mesh, self.strategy = mesh, strategy
        rank = sharding.padded_rank("q", max_rank, tp_size(mesh), strategy, rank_block)  # a split R: the strictest
        super().__init__(cfg, max_loras, rank, host_budget_bytes=host_budget_bytes, dtype=dtype)

    def _shardings(self, proj: str) -> SlotWeights:
        return sharding.named(self.mesh, sharding.lora_spec(proj, self.strategy))

    def _zero_slots(self, proj: str) -> SlotWeights:
        zeros = lambda: super(ShardedSlotAdapterStore, self)._zero_slots(proj)
        return jax.jit(zeros, out_shardings=self._shardings(proj))()

    def _write_slot(self, new: dict[str, SlotWeights], slot: int) -> dict[str, SlotWeights]:
        new = {p: jax.device_put(w, self._shardings(p)) for p, w in new.items()}
        return super()._write_slot(new, slot)
