"""Adapters in the unified pool's pages under tensor parallelism.

The pool `[L, num_pages, page_elems]` is split along `page_elems`
(`sharding.create_pool`): for every page id, device `i`'s slab is a page of the
local layout (`sharding.local_pool_layout`: `K/tp` KV heads, `rows_per_page / tp`
adapter rows of the same `lora_chunk` C). An adapter owns pages like on one
device, and device `i`'s slab of them holds **device i's shard** of the adapter,
chunk-major as in `memory/pool.py`, in the local layout. The shards of each
projection, per strategy (as `lora.py` computes with them; `rl = ceil(r / tp)`):

    strategy       projection   A^T stored (rank x width)       B stored (rank x width)
    slora          column       rl x H_in   (rank cols i*rl..)   r x O/tp   (output cols i*O/tp..)
    slora          row          r  x I/tp   (input rows i*I/tp..) r x H/tp
    replicated_a   column       r  x H_in   (whole)              r x O/tp
    replicated_a   row          r  x I/tp                        r x H      (whole)

Every device's shard has the same shape, so one placement (`pool.place_adapter`
with `TPShards`: rows computed from the shard shapes) and one page table serve
all devices: the engine's `AdapterTable` is replicated, and one allocator of
global page ids keeps doing the bookkeeping. Ranks stay per adapter (nothing is
padded to a pool- or batch-wide rank).

A rank-split A (slora, column-parallel) is cut in `rl = ceil(r/tp)` columns on
every device, the last devices' columns zero where `r` is not a multiple of
`tp` (rank 3 at tp 4: one column each on devices 0..2, a zero column on device
3). The alternative, per-device local ranks `clip(r - i*rl, 0, rl)` in
per-device tables, saves those few zero rows but gives each device its own
table and rows; the padded rank keeps one table, and the zero columns add
nothing to `v`. The table records that rank as `a_rank` (B keeps `r`). After
the all-gather, device `j`'s shrink columns sit at `j * Rl` (`Rl` the static
bound `ceil(r_max / tp)`), so `lora.merge_rank_shards` moves each token's
columns to `j * rl + k` (its adapter's own `rl`) before the expand.

Packing (`pool.adapter_shard_rows`) writes host `[tp, L, rows, C]`; the copy to
the devices (`put_shards`) sends each device only its `[1, L, rows, C]`, and
`write_adapter_shards` scatters them into the slabs under `shard_map`, the pool
donated (no device ever holds another's shard or a whole adapter).
"""

from __future__ import annotations

import dataclasses
import functools

import flax.struct
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from slora_jax.compat import shard_map
from slora_jax.config import PROJECTIONS, LlamaConfig
from slora_jax.memory.pool import AdapterTable, PoolLayout, WholeAdapter, scatter_rows
from slora_jax.ops.lora import KernelConfig, LoraMeta, PagedWeights
from slora_jax.parallel.lora import PagedShard
from slora_jax.parallel.mesh import TP_AXIS, tp_size
from slora_jax.parallel.sharding import COLUMN_PARALLEL, check_strategy, local_pool_layout


@dataclasses.dataclass(frozen=True)
class TPShards(WholeAdapter):
    """An adapter cut into `tp` shards per `strategy` (the table of the module docstring);
    the `pool.WholeAdapter` protocol."""

    tp: int
    strategy: str

    def __post_init__(self):
        check_strategy(self.strategy)

    @property
    def num_shards(self) -> int:
        return self.tp

    def layout(self, layout: PoolLayout) -> PoolLayout:
        return local_pool_layout(layout, self.tp)

    def _rank_split(self, proj: str) -> bool:
        return self.strategy == "slora" and proj in COLUMN_PARALLEL

    def widths(self, proj: str, h_in: int, h_out: int) -> tuple[int, int]:
        if proj in COLUMN_PARALLEL:
            return h_in, h_out // self.tp
        return h_in // self.tp, h_out // self.tp if self.strategy == "slora" else h_out

    def a_rank(self, proj: str, rank: int) -> int:
        return -(-rank // self.tp) if self._rank_split(proj) else rank

    def split(self, proj: str, shard: int, rank: int, a_IxR: np.ndarray,
              b_RxO: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        h_in, h_out = self.widths(proj, a_IxR.shape[0], b_RxO.shape[1])
        if self._rank_split(proj):  # by the placed rank: a lower-rank layer keeps the same column split
            rl = self.a_rank(proj, rank)
            a_IxR = a_IxR[:, shard * rl : (shard + 1) * rl]
        elif h_in != a_IxR.shape[0]:
            a_IxR = a_IxR[shard * h_in : (shard + 1) * h_in]
        if h_out != b_RxO.shape[1]:
            b_RxO = b_RxO[:, shard * h_out : (shard + 1) * h_out]
        return a_IxR, b_RxO


def rows_sharding(mesh: Mesh) -> NamedSharding:
    """Where packed shard rows `[tp, L, rows, C]` go: device i gets `[1, L, rows, C]`, its own."""
    return NamedSharding(mesh, P(TP_AXIS))


def put_shards(rows_DxLxNxC: np.ndarray, mesh: Mesh) -> jax.Array:
    """Start the copy of packed shard rows to their devices (asynchronous; each device its shard)."""
    return jax.device_put(rows_DxLxNxC, rows_sharding(mesh))


@functools.partial(jax.jit, static_argnames=("layout", "mesh"), donate_argnames=("pool",))
def write_adapter_shards(pool: jax.Array, rows_DxLxNxC: jax.Array, page_ids: jax.Array, layout: PoolLayout,
                         mesh: Mesh) -> jax.Array:
    """Scatter each device's shard rows into its slab of pages `page_ids`, in place (pool donated).

    `pool` from `sharding.create_pool(layout, mesh)`; `rows_DxLxNxC` from `put_shards`
    (`N = len(page_ids) * rows_per_page / tp`); `page_ids` replicated.
    """
    local = local_pool_layout(layout, tp_size(mesh))

    def per_device(pool_l, rows_1xLxNxC, ids):
        return scatter_rows(pool_l, rows_1xLxNxC[0], ids, local)

    slab = P(None, None, TP_AXIS)
    return shard_map(per_device, mesh=mesh, in_specs=(slab, P(TP_AXIS), P()), out_specs=slab)(
        pool, rows_DxLxNxC, page_ids)


@flax.struct.dataclass
class ShardedPagedLora:
    """The engine's LoRA input under tensor parallelism with adapters in pool pages.

    The TP forward (`parallel.forward`) passes it to every device replicated; there,
    `weights(layer, pool_slab, proj)` reads the device's shard of `proj` in place
    from its slab (the live pool of the layer's `cache_now()`), through the shared
    table. `r_max` (static) bounds the batch's ranks (B's; a rank-split A's bound is
    `shards.a_rank(proj, r_max)`).
    """

    table: AdapterTable  # rows: the adapters of this batch (one table for every device)
    slot_ids: jax.Array  # [B, S] int32, row of `table` for each token, -1 for none
    layout: PoolLayout = flax.struct.field(pytree_node=False)  # the pool's (global) layout
    cfg: LlamaConfig = flax.struct.field(pytree_node=False)
    shards: TPShards = flax.struct.field(pytree_node=False)
    r_max: int = flax.struct.field(pytree_node=False)
    projections: tuple[str, ...] = flax.struct.field(pytree_node=False)  # targeted by any adapter of the batch
    meta: LoraMeta | None = None  # needed unless impl == "reference"
    impl: str = flax.struct.field(pytree_node=False, default="reference")
    kernel: KernelConfig | None = flax.struct.field(pytree_node=False, default=None)

    def weights(self, layer: jax.Array, pool_slab: jax.Array, proj: str) -> PagedShard:
        """This device's shard of `proj` at `layer` (traced), in place in `pool_slab` `[L, num_pages, page_elems/tp]`."""
        local = self.shards.layout(self.layout)
        p = PROJECTIONS.index(proj)
        h_in, h_out = self.shards.widths(proj, *self.cfg.projection_shape(proj))
        rows_NxC = pool_slab.reshape(-1, local.lora_chunk)  # every layer's rows: a free reshape, no slice copy
        pages = self.table.pages + layer * local.num_pages
        t = self.table
        half = functools.partial(PagedWeights, rows_NxC, pages, a_row=t.a_row[:, p], b_row=t.b_row[:, p],
                                 rows_per_page=local.rows_per_page, h_in=h_in, h_out=h_out)
        return PagedShard(a=half(rank=t.a_rank[:, p], r_max=self.shards.a_rank(proj, self.r_max)),
                          b=half(rank=t.rank[:, p], r_max=self.r_max))


__all__ = ["ShardedPagedLora", "TPShards", "put_shards", "rows_sharding", "write_adapter_shards"]
