"""The unified pool on the device: one buffer of pages holding KV cache and adapter weights.

The pool is one array `[L, num_pages, page_elems]`; page id `p` names the same
slot `[l, p]` in every layer. A page is read in one of two views, both free
reshapes (bitcasts) of the same bytes:

- **KV view** `[num_pages, 2, P, K, D]` per layer: K and V of `P` consecutive
  tokens of one sequence (`P` = `page_size`, `K` KV heads of `D` dims).
- **Row view** `[num_pages * rows_per_page, C]` per layer: rows of `C`
  (`lora_chunk`) elements. Adapter weights are rows.

Adapter page layout (shared with the gathered-LoRA kernels). An adapter owns a
list of pages (its page table); concatenated they form its *virtual rows*,
`v -> page_table[v // rows_per_page] * rows_per_page + v % rows_per_page`.
Every targeted projection stores, at its own rank `r` (the largest over layers),
`A^T [r, H_in]` and then `B [r, H_out]` (scale folded into `B`), each
**chunk-major**: column chunk `j` of width `C` is `r` consecutive rows, so a
kernel tile (ranks `i..i+R`, chunk `j`) is rows `offset + j*r + i ...`. A
layer the adapter does not target holds zeros. Nothing is padded to a batch-
or pool-wide max rank; only the adapter's last page is partly unused.

Sharded adapters (`AdapterShards`). Under tensor parallelism the pool is split
along `page_elems`, each device's slab being pages of a smaller layout
(`parallel.sharding.local_pool_layout`), and each slab of an adapter's pages holds
that device's shard of the adapter (`parallel.paged.TPShards`): A^T and B of a
shard's own widths, and A^T possibly at a rank `a_rank` other than B's (a
rank-split A). All shards share one shape, so one placement and one page table
serve every device. `WholeAdapter` is the one-shard case of one device.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from slora_jax.adapters.adapter import LoraAdapter
from slora_jax.config import PROJECTIONS, LlamaConfig
from slora_jax.ops.lora import PagedWeights, SlotWeights


@dataclasses.dataclass(frozen=True)
class PoolLayout:
    """Static shape of the pool (hashable: a static argument of jitted functions)."""

    num_layers: int
    num_pages: int
    page_size: int  # tokens per KV page
    num_kv_heads: int
    head_dim: int
    lora_chunk: int = 64  # C: adapter row width in elements

    def __post_init__(self):
        if self.page_elems % self.lora_chunk:
            raise ValueError(
                f"page of {self.page_elems} elements (2 x page_size {self.page_size} x {self.num_kv_heads} "
                f"KV heads x head_dim {self.head_dim}) is not a multiple of lora_chunk {self.lora_chunk}"
            )

    @classmethod
    def for_model(cls, cfg: LlamaConfig, num_pages: int, page_size: int = 16, lora_chunk: int = 64) -> "PoolLayout":
        return cls(cfg.num_hidden_layers, num_pages, page_size, cfg.num_key_value_heads, cfg.head_dim, lora_chunk)

    @property
    def page_elems(self) -> int:
        return 2 * self.page_size * self.num_kv_heads * self.head_dim

    @property
    def rows_per_page(self) -> int:
        return self.page_elems // self.lora_chunk

    def page_bytes(self, dtype) -> int:
        """Bytes of one page id across all layers."""
        return self.num_layers * self.page_elems * jnp.dtype(dtype).itemsize


def create_pool(layout: PoolLayout, dtype=jnp.bfloat16) -> jax.Array:
    """A zeroed pool `[L, num_pages, page_elems]`."""
    return jnp.zeros((layout.num_layers, layout.num_pages, layout.page_elems), dtype)


def kv_view(pool_layer: jax.Array, layout: PoolLayout) -> jax.Array:
    """One layer's pages as KV blocks `[num_pages, 2, P, K, D]`."""
    return pool_layer.reshape(layout.num_pages, 2, layout.page_size, layout.num_kv_heads, layout.head_dim)


def row_view(pool_layer: jax.Array, layout: PoolLayout) -> jax.Array:
    """One layer's pages as adapter rows `[num_pages * rows_per_page, C]`."""
    return pool_layer.reshape(layout.num_pages * layout.rows_per_page, layout.lora_chunk)


# ----------------------------------------------------------------------------- adapters


@dataclasses.dataclass(frozen=True)
class WholeAdapter:
    """How an adapter is cut into shards, one per slab of its pages: here, one shard (one device).

    The protocol `place_adapter`, `adapter_shard_rows` and `capacity` use (a
    sharded layout is `parallel.paged.TPShards`):
      num_shards: shards (slabs of each page), all of one shape;
      layout(layout): the `PoolLayout` each slab is read with;
      widths(proj, h_in, h_out): a shard's `(H_in, H_out)` of `proj`;
      a_rank(proj, rank): the rank A^T is stored at in a shard (B's is `rank`);
      split(proj, shard, rank, a_IxR, b_RxO): that shard's `(A [H_in', <= a_rank], B [<= rank, H_out'])`
        of one module, for the projection's placed `rank` (a module may have a lower
        rank in some layer; what a shard lacks of `a_rank` / `rank` is stored as zeros).
    """

    num_shards = 1

    def layout(self, layout: PoolLayout) -> PoolLayout:
        return layout

    def widths(self, proj: str, h_in: int, h_out: int) -> tuple[int, int]:
        return h_in, h_out

    def a_rank(self, proj: str, rank: int) -> int:
        return rank

    def split(self, proj: str, shard: int, rank: int, a_IxR: np.ndarray,
              b_RxO: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return a_IxR, b_RxO


WHOLE = WholeAdapter()


@dataclasses.dataclass(frozen=True)
class ProjectionPlacement:
    """Where one projection's LoRA lives in its adapter's virtual rows (of each shard)."""

    rank: int  # the LoRA rank: rows of B per chunk
    a_row: int  # first virtual row of A^T, chunk-major [H_in / C chunks][a_rank][C]
    b_row: int  # first virtual row of B, chunk-major [H_out / C chunks][rank][C]
    a_rank: int  # rows of A^T per chunk: `rank`, or a shard's rank columns of a rank-split A


@dataclasses.dataclass(frozen=True)
class AdapterPlacement:
    """The page layout of one adapter: per-projection placement and its size."""

    projections: dict[str, ProjectionPlacement]
    num_rows: int  # virtual rows of one shard
    num_pages: int
    unused_elems: int  # allocated but unused, per layer, over all shards (internal fragmentation)


def _chunks(width: int, c: int) -> int:
    return -(-width // c)


def place_adapter(adapter: LoraAdapter, cfg: LlamaConfig, layout: PoolLayout,
                  shards: WholeAdapter = WHOLE) -> AdapterPlacement:
    """Plan where each projection's A and B go, at the adapter's own ranks.

    `layout` is the pool's; with `shards`, the rows are those of one shard in
    `shards.layout(layout)` (the same plan for every shard).
    """
    local = shards.layout(layout)
    c, row = local.lora_chunk, 0
    placed = {}
    for proj in adapter.projections:
        r = max(m.rank for (_, p), m in adapter.modules.items() if p == proj)
        h_in, h_out = shards.widths(proj, *cfg.projection_shape(proj))
        r_a = shards.a_rank(proj, r)
        a_row, row = row, row + _chunks(h_in, c) * r_a
        b_row, row = row, row + _chunks(h_out, c) * r
        placed[proj] = ProjectionPlacement(r, a_row, b_row, r_a)
    pages = -(-row // local.rows_per_page)
    return AdapterPlacement(placed, row, pages, (pages * local.rows_per_page - row) * c * shards.num_shards)


def _put_chunk_major(dst_JxRxC: np.ndarray, m_rxW: np.ndarray) -> None:
    """Copy `[r, W]` into chunk-major rows `[ceil(W/C), R, C]` (R >= r): chunk j's r rows are
    consecutive; the rest of `dst` (ranks past r, the padding of a partial last chunk) is zeroed."""
    n, _, c = dst_JxRxC.shape
    r, w = m_rxW.shape
    full = w // c  # whole chunks
    dst_JxRxC[:full, :r] = m_rxW[:, : full * c].reshape(r, full, c).transpose(1, 0, 2)
    if full < n:
        dst_JxRxC[full, :r, : w - full * c] = m_rxW[:, full * c :]
        dst_JxRxC[full, :r, w - full * c :] = 0
    dst_JxRxC[:, r:] = 0


def adapter_rows(adapter: LoraAdapter, placement: AdapterPlacement, cfg: LlamaConfig, layout: PoolLayout,
                 dtype=jnp.bfloat16) -> np.ndarray:
    """Host array `[L, num_pages * rows_per_page, C]` of the adapter's rows, scale folded into B.

    Each module is rounded to `dtype` once (B is multiplied by its scale in float32
    first) and copied straight into its chunk-major rows; only what no module fills
    is zeroed. The casts run on whole contiguous modules and the copies on
    same-width unsigned ints: numpy casts into strided bfloat16 views and copies
    bfloat16 (an ml_dtypes type) element by element, several times slower.
    """
    return adapter_shard_rows(adapter, placement, cfg, layout, WHOLE, dtype)[0]


def rows_shape(placement: AdapterPlacement, cfg: LlamaConfig, layout: PoolLayout,
               shards: WholeAdapter = WHOLE) -> tuple[int, int, int, int]:
    """Shape `[num_shards, L, num_pages * rows_per_page', C]` of `adapter_shard_rows`' result."""
    rows_per_page = shards.layout(layout).rows_per_page
    return (shards.num_shards, cfg.num_hidden_layers, placement.num_pages * rows_per_page, layout.lora_chunk)


def adapter_shard_rows(adapter: LoraAdapter, placement: AdapterPlacement, cfg: LlamaConfig, layout: PoolLayout,
                       shards: WholeAdapter, dtype=jnp.bfloat16, out: np.ndarray | None = None) -> np.ndarray:
    """`adapter_rows` of every shard: host `[num_shards, L, num_pages * rows_per_page', C]`.

    `placement` is `place_adapter(..., shards)`; shard `i`'s rows are what slab `i`
    of the adapter's pages holds (`rows_per_page'` of `shards.layout(layout)`).
    Each module is cast once, then split. `out` (C-contiguous, `rows_shape(...)` and
    `dtype`; its contents are overwritten) is written instead of a new array.
    """
    c, L, dtype, n = layout.lora_chunk, cfg.num_hidden_layers, jnp.dtype(dtype), shards.num_shards
    bits = np.dtype(f"u{dtype.itemsize}")
    shape = rows_shape(placement, cfg, layout, shards)
    if out is None:
        rows_DxLxNxC = np.empty(shape, dtype)
    elif out.shape != shape or out.dtype != dtype or not out.flags.c_contiguous:
        raise ValueError(f"out must be a C-contiguous {dtype.name} array of shape {shape}, got "
                         f"{out.dtype.name} {out.shape}")
    else:
        rows_DxLxNxC = out
    bits_DxLxNxC = rows_DxLxNxC.view(bits)
    bits_DxLxNxC[:, :, placement.num_rows :] = 0  # the last page's unused rows
    for proj, p in placement.projections.items():
        h_in, h_out = shards.widths(proj, *cfg.projection_shape(proj))
        na, nb = _chunks(h_in, c), _chunks(h_out, c)
        a_DxLxJxRxC = bits_DxLxNxC[:, :, p.a_row : p.a_row + na * p.a_rank].reshape(n, L, na, p.a_rank, c)
        b_DxLxJxRxC = bits_DxLxNxC[:, :, p.b_row : p.b_row + nb * p.rank].reshape(n, L, nb, p.rank, c)
        for layer in range(L):
            m = adapter.modules.get((layer, proj))
            if m is None:  # a layer the adapter does not target
                a_DxLxJxRxC[:, layer] = b_DxLxJxRxC[:, layer] = 0
                continue
            m = m.folded(dtype)  # no copy for an adapter kept folded
            a_IxR, b_RxO = m.a, m.b
            for i in range(n):
                a_i, b_i = shards.split(proj, i, p.rank, a_IxR.view(bits), b_RxO.view(bits))
                _put_chunk_major(a_DxLxJxRxC[i, layer], a_i.T)
                _put_chunk_major(b_DxLxJxRxC[i, layer], b_i)
    return rows_DxLxNxC


def physical_rows(page_ids: jax.Array, rows_per_page: int) -> jax.Array:
    """Row-view indices of all rows of `page_ids`, in page-table order."""
    return (page_ids[:, None] * rows_per_page + jnp.arange(rows_per_page)[None, :]).reshape(-1)


@functools.partial(jax.jit, static_argnames=("layout",), donate_argnames=("pool",))
def write_adapter(pool: jax.Array, rows_LxNxC: jax.Array, page_ids: jax.Array, layout: PoolLayout) -> jax.Array:
    """Copy an adapter's rows into its pages, in place (the pool is donated).

    `rows_LxNxC` is `adapter_rows(...)` (`N = len(page_ids) * rows_per_page`).
    """
    return scatter_rows(pool, rows_LxNxC, page_ids, layout)


def scatter_rows(pool: jax.Array, rows_LxNxC: jax.Array, page_ids: jax.Array, layout: PoolLayout) -> jax.Array:
    """`write_adapter`'s body, unjitted: `pool [L, num_pages, page_elems]` of `layout` with
    `page_ids`' rows replaced by `rows_LxNxC` (under TP, one device's slab and local layout)."""
    L = layout.num_layers
    rows = pool.reshape(L, layout.num_pages * layout.rows_per_page, layout.lora_chunk)
    rows = rows.at[:, physical_rows(page_ids, layout.rows_per_page)].set(rows_LxNxC.astype(pool.dtype))
    return rows.reshape(pool.shape)


def read_projection(pool_layer: jax.Array, layout: PoolLayout, page_table: jax.Array, placement: ProjectionPlacement,
                    h_in: int, h_out: int) -> tuple[jax.Array, jax.Array]:
    """Reference read of one projection's `A [H_in, a_rank]` and `B [rank, H_out]` from one layer's
    pages (of one shard: its slab, `layout` and widths)."""
    c = layout.lora_chunk
    rows = row_view(pool_layer, layout)
    phys = physical_rows(page_table, layout.rows_per_page)

    def read(first: int, width: int, r: int) -> jax.Array:
        n = _chunks(width, c)
        m_NxRxC = rows[phys[first : first + n * r]].reshape(n, r, c)
        return m_NxRxC.transpose(1, 0, 2).reshape(r, n * c)[:, :width]

    return read(placement.a_row, h_in, placement.a_rank).T, read(placement.b_row, h_out, placement.rank)


def gather_slots(pool: jax.Array, layout: PoolLayout, cfg: LlamaConfig,
                 resident: list[tuple[AdapterPlacement, np.ndarray]]) -> dict[str, SlotWeights]:
    """Dense `SlotWeights` (slot s = resident[s]) read back out of the pool's pages.

    The jnp reference for kernels that read adapters from pages: equal, slot by
    slot, to `pack_slots` of the same adapters (ranks are per projection).
    """
    out = {}
    for proj in PROJECTIONS:
        used = [(s, pl.projections[proj], pt) for s, (pl, pt) in enumerate(resident) if proj in pl.projections]
        if not used:
            continue
        h_in, h_out = cfg.projection_shape(proj)
        r_max = max(p.rank for _, p, _ in used)
        L, S = layout.num_layers, len(resident)
        a = jnp.zeros((L, S, h_in, r_max), pool.dtype)
        b = jnp.zeros((L, S, r_max, h_out), pool.dtype)
        ranks = np.zeros((L, S), np.int32)
        for s, p, pt in used:
            a_l, b_l = jax.vmap(lambda pl_: read_projection(pl_, layout, jnp.asarray(pt), p, h_in, h_out))(pool)
            a = a.at[:, s, :, : p.rank].set(a_l)
            b = b.at[:, s, : p.rank].set(b_l)
            ranks[:, s] = p.rank
        out[proj] = SlotWeights(a, b, jnp.asarray(ranks))
    return out


class AdapterTable(NamedTuple):
    """Where the adapters of a batch live (rows: the batch's adapters); numpy from `build`.

    pages: int32 `[A, max_pages]`, each adapter's page table (padded with 0).
    rank, a_row, b_row, a_rank: int32 `[A, 7]`, per projection in `PROJECTIONS` order
      (rank 0: not targeted; `a_rank`: `ProjectionPlacement.a_rank`, = rank but for a
      rank-split A).
    """

    pages: jax.Array
    rank: jax.Array
    a_row: jax.Array
    b_row: jax.Array
    a_rank: jax.Array

    @classmethod
    def build(cls, entries: list[tuple[AdapterPlacement, np.ndarray]], num_rows: int, max_pages: int) -> "AdapterTable":
        """Host-side (numpy) table of `entries` padded to `num_rows` adapters (padding rows are all rank 0)."""
        pages = np.zeros((num_rows, max_pages), np.int32)
        meta = np.zeros((4, num_rows, len(PROJECTIONS)), np.int32)
        for i, (placement, page_ids) in enumerate(entries):
            pages[i, : len(page_ids)] = page_ids
            for p, proj in enumerate(PROJECTIONS):
                if proj in placement.projections:
                    pp = placement.projections[proj]
                    meta[:, i, p] = (pp.rank, pp.a_row, pp.b_row, pp.a_rank)
        return cls(pages, *meta)


def paged_weights(pool: jax.Array, layout: PoolLayout, table: AdapterTable, proj: str,
                  h_in: int, h_out: int, r_max: int, layer=None) -> PagedWeights:
    """`proj`'s LoRA of the adapters of `table`, in place in the pool (no copy).

    What the gathered-LoRA kernels read; `r_max` (static) bounds the ranks. `pool`
    is one layer's `[num_pages, page_elems]`, or, with `layer` (a traced index), the
    whole `[L, num_pages, page_elems]` pool seen as `L * num_pages` pages.
    """
    p = PROJECTIONS.index(proj)
    pages = table.pages if layer is None else table.pages + layer * layout.num_pages
    return PagedWeights(pool.reshape(-1, layout.lora_chunk), pages, table.rank[:, p], table.a_row[:, p],
                        table.b_row[:, p], layout.rows_per_page, h_in, h_out, r_max)


def lora_from_pages(pool_layer: jax.Array, layout: PoolLayout, table: AdapterTable, proj: str,
                    h_in: int, h_out: int, r_max: int) -> SlotWeights:
    """Jittable jnp read of one layer's `proj` LoRA for every adapter of `table`, as dense slots.

    The reference for kernels that read adapter pages directly; entries past an
    adapter's own rank are zero.
    """
    return paged_weights(pool_layer, layout, table, proj, h_in, h_out, r_max).to_slots()


def capacity(layout: PoolLayout, cfg: LlamaConfig, rank: int, projections=("q", "k", "v", "o"),
             dtype=jnp.bfloat16, shards: WholeAdapter = WHOLE) -> dict[str, float]:
    """What fits in an empty pool of `layout`: adapters of one shape (cut into `shards`, e.g. a
    tensor-parallel split), or tokens of KV cache. Bytes are those of all devices together."""
    from slora_jax.adapters.random import random_adapter  # only shapes matter here

    tiny = dataclasses.replace(cfg, num_hidden_layers=1)  # placement is per layer: one layer suffices
    placement = place_adapter(random_adapter(tiny, rank, projections), tiny, layout, shards)
    return {
        "page_bytes": layout.page_bytes(dtype),
        "pool_bytes": layout.num_pages * layout.page_bytes(dtype),
        "tokens_per_page": layout.page_size,
        "tokens_fit": layout.num_pages * layout.page_size,
        "pages_per_adapter": placement.num_pages,
        "adapters_fit": layout.num_pages // placement.num_pages,
        "adapter_fragmentation": placement.unused_elems / (placement.num_pages * layout.page_elems),
    }
