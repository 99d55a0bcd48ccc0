"""The serving engine's parts under tensor parallelism (`EngineConfig.tp > 1`).

`Engine` builds a `TensorParallel` and takes from it: the params placed in
their shards (per-layer buffers for `layer_loop="unrolled"`), the unified pool
split along its pages' elements (`sharding.create_pool`: each device's slab is
pages of its `K/tp` KV heads), the adapter store, and the `forward` its jitted
step calls: `model.forward`'s signature, running `parallel.forward` under
`shard_map`. Sampling stays in the same jitted step, outside `shard_map`, on the
logits split over the vocabulary (XLA inserts the gathers it needs).

Adapters, per `unified_memory`:
- True (default): in the unified pool's pages, each device's slab of an
  adapter's pages holding its shard for `tp_lora_strategy` (`paged.py`;
  `ShardedAdapterStore`): one allocator, one placement and one page table for
  all devices; adapters and KV cache share the pages as on one device.
- False: S-LoRA's "no unified memory" ablation, dense slots beside a KV-only
  pool, split per strategy (`ShardedSlotAdapterStore`).
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from slora_jax.adapters.adapter import LoraAdapter
from slora_jax.adapters.store import AdapterStore, SlotAdapterStore
from slora_jax.config import PROJECTIONS, EngineConfig, LlamaConfig
from slora_jax.errors import ConfigError
from slora_jax.memory.allocator import PageAllocator
from slora_jax.memory.pool import AdapterPlacement, PoolLayout, place_adapter
from slora_jax.model.checkpoint import read_config
from slora_jax.model.llama import Params
from slora_jax.ops.lora import SlotWeights
from slora_jax.parallel import sharding
from slora_jax.parallel.lora import TP_LORA_IMPLS
from slora_jax.parallel.mesh import local_config, make_mesh, tp_size
from slora_jax.parallel.model import forward as tp_forward
from slora_jax.parallel.paged import ShardedPagedLora, TPShards, put_shards, write_adapter_shards


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
        if ec.unified_memory:
            self._check_pages(ec)

    def _check_pages(self, ec: EngineConfig) -> None:
        """A device's slab of a page holds whole adapter rows; the paged kernels take whole row chunks."""
        layout = PoolLayout.for_model(self.cfg, ec.num_pages, ec.page_size, ec.lora_chunk)
        try:
            local = sharding.local_pool_layout(layout, ec.tp)
        except ValueError as e:
            raise ConfigError(f"EngineConfig.tp={ec.tp} with unified_memory=True: a device's slab of a page "
                              f"holds adapter rows of lora_chunk={ec.lora_chunk} elements: {e} (choose a "
                              "lora_chunk or page_size that fits)") from None
        if self.lora_impl == "pallas":
            shards = TPShards(ec.tp, self.strategy)
            widths = {p: shards.widths(p, *self.cfg.projection_shape(p)) for p in PROJECTIONS}
            bad = {p: w for p, w in widths.items() if w[0] % local.lora_chunk or w[1] % local.lora_chunk}
            if bad:
                raise ConfigError(f"EngineConfig.lora_impl='pallas' at tp={ec.tp}, unified_memory=True: the paged "
                                  f"kernels read each device's adapter shards in chunks of lora_chunk="
                                  f"{ec.lora_chunk} columns, which must divide every shard width; these do not: "
                                  f"{bad}")

    def place_params(self, params):
        """Params (host, one device, or already sharded) in their shards; per-layer buffers for
        `layer_loop="unrolled"` (the caller's arrays are left alive)."""
        params = sharding.shard_params(params, self.cfg, self.mesh)
        if self.unstacked and not sharding.has_layer_list(params["layers"]):
            params = sharding.unstack_layers(params, self.cfg, self.mesh, donate=False)
        return params

    def replicate(self, x: jax.Array) -> jax.Array:
        """`x` replicated over the mesh (as the step's outputs outside `shard_map` come)."""
        return jax.device_put(x, NamedSharding(self.mesh, P()))

    def create_pool(self, layout: PoolLayout, dtype) -> jax.Array:
        return sharding.create_pool(layout, self.mesh, dtype)

    def adapter_store(self, ec: EngineConfig, layout: PoolLayout, allocator: PageAllocator,
                      dtype) -> "ShardedAdapterStore | ShardedSlotAdapterStore":
        """Adapters in the pool's pages (`unified_memory`), or in dense slots beside it."""
        if ec.unified_memory:
            return ShardedAdapterStore(self.cfg, layout, allocator, self.mesh, self.strategy,
                                       ec.host_adapter_budget_bytes, dtype, ec.max_resident_adapters,
                                       ec.adapter_stage_threads, ec.host_adapter_spare_bytes)
        return ShardedSlotAdapterStore(self.cfg, self.mesh, self.strategy, ec.max_loras, ec.max_lora_rank,
                                       rank_block=16 if self.lora_impl == "pallas" else 1,
                                       projections=ec.slot_projections or PROJECTIONS,
                                       host_budget_bytes=ec.host_adapter_budget_bytes, dtype=dtype)

    def forward(self, params, cfg, tokens_BxS, pos_BxS, cache, lora=None, logits_index_B=None):
        """`model.forward` over the mesh for the engine's step; `cache` is its `PagedKVCache`
        with the single-device layout (each device reads its slab with the local one)."""
        local = sharding.local_pool_layout(cache.layout, tp_size(self.mesh))
        logits, out = tp_forward(params, cfg, tokens_BxS, pos_BxS, cache.replace(layout=local), lora,
                                 logits_index_B, mesh=self.mesh, strategy=self.strategy, lora_impl=self.lora_impl)
        return logits, out.replace(layout=cache.layout)


class ShardedAdapterStore(AdapterStore):
    """`AdapterStore` whose adapters live in the pages of a pool split over `mesh`
    (`sharding.create_pool`), each device's slab of an adapter's pages holding its
    shard for `strategy` (`paged.py`). Tiers, staging, pins and LRU eviction are the
    store's; placement is that of a shard (`TPShards`), packing writes every shard
    (`[tp, L, rows, C]`), the copy sends each device its own, and the write scatters
    per device. Pages, `memory()` and the allocator count global page ids, so the
    accounting is that of all devices together.
    """

    def __init__(self, cfg: LlamaConfig, layout: PoolLayout, allocator: PageAllocator, mesh, strategy: str,
                 host_budget_bytes: int = 8 << 30, dtype=jnp.bfloat16, max_resident: int = 1024,
                 stage_threads: int = 1, spare_bytes: int = 0):
        super().__init__(cfg, layout, allocator, host_budget_bytes, dtype, max_resident, stage_threads, spare_bytes)
        self.mesh, self.shards = mesh, TPShards(tp_size(mesh), strategy)
        self.shards.layout(layout)  # checks that a slab holds whole rows

    def _place(self, adapter: LoraAdapter) -> AdapterPlacement:
        return place_adapter(adapter, self.cfg, self.layout, self.shards)

    def _put(self, rows: np.ndarray) -> jax.Array:
        return put_shards(rows, self.mesh)

    def _write(self, pool: jax.Array, rows_dev: jax.Array, pages: np.ndarray) -> jax.Array:
        return write_adapter_shards(pool, rows_dev, jnp.asarray(pages), self.layout, self.mesh)

    def _lora_input(self, table, slot_ids, projections, meta, impl, kernel) -> ShardedPagedLora:
        return ShardedPagedLora(table, slot_ids, self.layout, self.cfg, self.shards, self._r_max, projections, meta,
                                impl, kernel)


class ShardedSlotAdapterStore(SlotAdapterStore):
    """`SlotAdapterStore` whose slots live split over the mesh as `strategy` lays them out
    (`sharding.lora_spec`); an adapter loads into its slot shard by shard.

    The slot rank is `max_rank` padded so that every device's rank columns are a
    multiple of `rank_block` (16 for the Pallas kernels) and a split R divides by tp.
    """

    def __init__(self, cfg: LlamaConfig, mesh, strategy: str, max_loras: int, max_rank: int, rank_block: int = 1,
                 projections=PROJECTIONS, host_budget_bytes: int = 8 << 30, dtype=jnp.bfloat16):
        self.mesh, self.strategy = mesh, strategy
        rank = sharding.padded_rank("q", max_rank, tp_size(mesh), strategy, rank_block)  # a split R: the strictest
        super().__init__(cfg, max_loras, rank, projections, host_budget_bytes=host_budget_bytes, dtype=dtype)

    def _shardings(self, proj: str) -> SlotWeights:
        return sharding.named(self.mesh, sharding.lora_spec(proj, self.strategy))

    def _zero_slots(self, proj: str) -> SlotWeights:
        zeros = lambda: super(ShardedSlotAdapterStore, self)._zero_slots(proj)
        return jax.jit(zeros, out_shardings=self._shardings(proj))()

    def _write_slot(self, new: dict[str, SlotWeights], slot: int) -> dict[str, SlotWeights]:
        new = {p: jax.device_put(w, self._shardings(p)) for p, w in new.items()}
        return super()._write_slot(new, slot)
