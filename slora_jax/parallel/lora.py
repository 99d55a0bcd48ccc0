"""LoRA under tensor parallelism, and the projection epilogue that holds the block all-reduces.

Inside the TP forward (`shard_map`) every projection of a decoder layer ends in
`ShardedProjections.layer_fn(...)(proj, y, x)`, called with this device's
slices. With `x`, `y` as each device sees them and `v = x @ A` the `[T, r]`
shrink output:

Column-parallel (q, k, v, gate, up): `x [T, I]` whole, `y [T, O/tp]` this
device's output columns, B split like `y` (`[S, R, O/tp]`).
  - `slora` (S-LoRA): A split along the rank (`[S, I, R/tp]`). Each device
    computes its `R/tp` columns of `v`, one all-gather makes `v [T, R]`, then
    `y += v @ B_i`. Extra collective: the all-gather of `[T, R]`.
  - `replicated_a` (vLLM's default): A whole on every device; `v = x @ A`
    computed redundantly, `y += v @ B_i`. No extra collective; A's bytes are
    read `tp` times over.

Row-parallel (o, down): `x [T, I/tp]` this device's input slice, `y [T, H]`
the partial sum of the base matmul over that slice; A split along its input
(`[S, I/tp, R]`), so `x @ A_i` is a partial sum of `v` too. The block's
all-reduce (`psum`) of `y` happens here, after the LoRA term is added:
  - `slora`: `v = psum(x @ A_i)` (extra collective: an all-reduce of `[T, R]`);
    B split along its output (`[S, R, H/tp]`), device i adds `v @ B_i` into
    columns `i*H/tp ...` of its partial `y`; the block's all-reduce then sums
    base partials and places every device's LoRA slice:
    `psum(y_i + scatter_i(v @ B_i)) = x @ W + v @ B`.
  - `replicated_a`: B whole; device i adds `(x @ A_i) @ B` to its partial `y`
    and the block's all-reduce sums them (`sum_i (x_i A_i) B = (x A) B`, by
    linearity). No extra collective; B's bytes are read `tp` times over.

So the block all-reduces are exactly the base model's two per layer; `slora`
adds one `[T, R]` all-gather per targeted column-parallel projection and one
`[T, R]` all-reduce per targeted row-parallel one. With adapters in pool pages
the projections sharing x (q, k, v; gate, up) go together
(`ShardedProjections.layer_group_fn`, `column_parallel_lora_group`): one shrink
launch, one all-gather of all their shards side by side, one expand launch.

Ranks: every slot keeps its true rank in `ranks` (replicated). Under `slora`, a
column-parallel A is split in `R/tp` columns (R padded to a multiple of tp by
`sharding.shard_lora_weights`), so device i sees slot s at local rank
`clip(r_s - i*R/tp, 0, R/tp)`; a slot of rank 3 at R/tp = 2 has local ranks
2, 1, 0, 0 on four devices.

Paged shards (`unified_memory=True` in the engine, `paged.py`): the same
partitions with each device's shards read in place from its slab of the pool's
pages (`PagedShard`: the A half and the B half as `PagedWeights`, one table for
all devices). A rank-split A is cut per adapter (`ceil(r/tp)` columns on every
device, not `R/tp` of a pool-wide `R`), so after the all-gather each token's
columns are put back in rank order by `merge_rank_shards`.

Both halves run per shard either as jnp (`reference`: every token's weights
gathered, `[T, I, R]` materialized) or as the Pallas split SGMV pair
(`pallas`: `ops.lora.shrink` / `expand`, each segment's adapter read once). The
kernels work in 16-column rank blocks, so a shard's `R` (`R/tp` for a split A)
should be a multiple of 16 (`sharding.padded_rank(..., rank_block=16)`), or it is
padded, a copy, every step. A split A of a small rank then sits on few devices
(rank 16 at tp 4: R = 64, all 16 columns on device 0), so its shrink reads are
not divided: the split pays off from rank 16 * tp up.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels.sgmv_expand import expand_reference
from pallas_kernels.sgmv_shrink import shrink_reference
from slora_jax.model.layers import LoraFn
from slora_jax.ops import lora as lora_ops
from slora_jax.ops.lora import LoraMeta, PagedWeights, SlotWeights
from slora_jax.parallel.mesh import TP_AXIS
from slora_jax.parallel.sharding import COLUMN_PARALLEL, ROW_PARALLEL

TP_LORA_IMPLS = ("reference", "pallas")


@functools.partial(jax.tree_util.register_dataclass, data_fields=["a", "b"], meta_fields=[])
@dataclasses.dataclass(frozen=True)
class PagedShard:
    """One projection's LoRA shard on one device, in place in its slab of pool pages.

    `a` is read for its A half only (rank `a_rank`: a rank-split A's columns on this
    device), `b` for its B half only (the LoRA rank); both share rows and pages.
    """

    a: PagedWeights
    b: PagedWeights


@functools.partial(jax.tree_util.register_dataclass, data_fields=["slot_T", "meta"], meta_fields=["impl"])
@dataclasses.dataclass(frozen=True)
class GatheredLora:
    """The two halves of gathered LoRA on one device's shards: `impl="reference"` (jnp, each
    token's weights gathered) or `"pallas"` (the split SGMV pair `ops.lora.shrink`/`expand`,
    reading each segment's adapter once, from pool pages in place for `PagedWeights`; needs
    `meta`, the step's `LoraMeta`, which holds no ranks and so serves every shard)."""

    slot_T: jax.Array  # [T] int32, -1: no adapter
    impl: str = "reference"
    meta: LoraMeta | None = None

    def shrink(self, x_TxI: jax.Array, w: SlotWeights | PagedWeights) -> jax.Array:
        """`[T, R]` fp32 (R: `w`'s rank width), zero past each token's rank and for slot -1."""
        if self.impl == "pallas":
            return lora_ops.shrink(x_TxI, w, self.meta, impl="pallas")
        if isinstance(w, PagedWeights):
            return shrink_reference(x_TxI, w.read_a(), w.rank, self.slot_T)
        return shrink_reference(x_TxI, w.a, w.ranks, self.slot_T)

    def expand(self, y_TxO: jax.Array, v_TxR: jax.Array, w: SlotWeights | PagedWeights) -> jax.Array:
        if self.impl == "pallas":
            return lora_ops.expand(y_TxO, v_TxR, w, self.meta, impl="pallas")
        if isinstance(w, PagedWeights):
            return expand_reference(y_TxO, v_TxR, w.read_b(), w.rank, self.slot_T)
        return expand_reference(y_TxO, v_TxR, w.b, w.ranks, self.slot_T)

    def shrink_group(self, x_TxI: jax.Array, ws) -> tuple[jax.Array, ...]:
        """`shrink` of projections sharing x; the Pallas impl on pool pages launches once for them."""
        if self.impl == "pallas":
            return lora_ops.shrink_group(x_TxI, ws, self.meta, impl="pallas")
        return tuple(self.shrink(x_TxI, w) for w in ws)

    def expand_group(self, ys_TxO, vs_TxR, ws) -> tuple[jax.Array, ...]:
        if self.impl == "pallas":
            return lora_ops.expand_group(ys_TxO, vs_TxR, ws, self.meta, impl="pallas")
        return tuple(self.expand(y, v, w) for y, v, w in zip(ys_TxO, vs_TxR, ws))


def merge_rank_shards(v_TxDRl: jax.Array, rl_T: jax.Array, Rl: int, r_max: int) -> jax.Array:
    """All-gathered shrink shards -> `[T, r_max]` in rank order.

    `v_TxDRl` is `[T, tp * Rl]`, device j's `Rl` (static) columns at `j * Rl`; a token
    whose adapter's A is split in `rl_T[t]` columns a device has its rank column
    `c` at device `c // rl`, column `c % rl`. Columns at or past `tp * rl` (past
    the rank) hold arbitrary values: the expand reads none past the rank.
    """
    rl_Tx1 = jnp.maximum(rl_T, 1)[:, None]
    c_1xR = jnp.arange(r_max)[None, :]
    idx_TxR = jnp.minimum((c_1xR // rl_Tx1) * Rl + c_1xR % rl_Tx1, v_TxDRl.shape[1] - 1)
    return jnp.take_along_axis(v_TxDRl, idx_TxR, axis=1)


def column_parallel_lora(y_TxOl: jax.Array, x_TxI: jax.Array, w: SlotWeights | PagedShard, g: GatheredLora,
                         strategy: str) -> jax.Array:
    """`y + (x @ A[slot]) @ B[slot]` for this device's output columns (see the module docstring)."""
    if isinstance(w, PagedShard):
        if strategy != "slora":
            return g.expand(y_TxOl, g.shrink(x_TxI, w.a), w.b)
        v_TxRl = g.shrink(x_TxI, w.a).astype(w.b.rows.dtype)  # as the dense path: gathered in B's dtype
        v_TxDRl = lax.all_gather(v_TxRl, TP_AXIS, axis=1, tiled=True)
        rl_T = jnp.where(g.slot_T >= 0, w.a.rank[jnp.maximum(g.slot_T, 0)], 0)
        return g.expand(y_TxOl, merge_rank_shards(v_TxDRl, rl_T, w.a.r_max, w.b.r_max), w.b)
    if strategy == "slora":
        Rl = w.a.shape[-1]  # this device's rank columns
        i = lax.axis_index(TP_AXIS)
        local = w._replace(ranks=jnp.clip(w.ranks - i * Rl, 0, Rl))
        # The expand casts v to B's dtype anyway: gather it in that dtype (half the bytes in bf16).
        v_TxRl = g.shrink(x_TxI, local).astype(w.b.dtype)
        v_TxR = lax.all_gather(v_TxRl, TP_AXIS, axis=1, tiled=True)
    else:
        v_TxR = g.shrink(x_TxI, w)
    return g.expand(y_TxOl, v_TxR, w)


def column_parallel_lora_group(ys_TxOl, x_TxI: jax.Array, ws: list[PagedShard], g: GatheredLora,
                               strategy: str) -> tuple[jax.Array, ...]:
    """`column_parallel_lora` of projections sharing x (q, k, v; gate, up), adapters in pool pages:
    one shrink launch, under `slora` one all-gather of all their `[T, Rl]` shards, one expand launch."""
    vs = g.shrink_group(x_TxI, [w.a for w in ws])
    if strategy == "slora":
        dtype = ws[0].b.rows.dtype  # as the dense path: gathered in B's dtype
        widths = [v.shape[1] for v in vs]
        v_TxW = jnp.concatenate([v.astype(dtype) for v in vs], axis=1)
        T, W = v_TxW.shape
        v_TxDW = lax.all_gather(v_TxW, TP_AXIS, axis=1, tiled=True)  # device j's W columns at j * W
        tp = v_TxDW.shape[1] // W
        v_TxDxW = v_TxDW.reshape(T, tp, W)
        starts = [sum(widths[:j]) for j in range(len(ws))]
        merged = []
        for w, Rl, c0 in zip(ws, widths, starts):
            rl_T = jnp.where(g.slot_T >= 0, w.a.rank[jnp.maximum(g.slot_T, 0)], 0)
            v_TxDRl = v_TxDxW[:, :, c0 : c0 + Rl].reshape(T, tp * Rl)
            merged.append(merge_rank_shards(v_TxDRl, rl_T, Rl, w.b.r_max))
        vs = merged
    return g.expand_group(ys_TxOl, vs, [w.b for w in ws])


def row_parallel_lora(y_TxH: jax.Array, x_TxIl: jax.Array, w: SlotWeights | PagedShard | None,
                      g: GatheredLora | None, strategy: str) -> jax.Array:
    """The block's all-reduce of the partial base output `y`, with the LoRA term added (module docstring)."""
    if w is None:
        return lax.psum(y_TxH, TP_AXIS)
    wa, wb = (w.a, w.b) if isinstance(w, PagedShard) else (w, w)
    v_part_TxR = g.shrink(x_TxIl, wa)  # partial sum over this input slice
    if strategy == "slora":
        v_TxR = lax.psum(v_part_TxR, TP_AXIS)
        Hl = wb.h_out if isinstance(wb, PagedWeights) else wb.b.shape[-1]
        start = lax.axis_index(TP_AXIS) * Hl
        y_TxHl = lax.dynamic_slice_in_dim(y_TxH, start, Hl, axis=1)
        y_TxHl = g.expand(y_TxHl, v_TxR, wb)
        y_TxH = lax.dynamic_update_slice_in_dim(y_TxH, y_TxHl, start, axis=1)
    else:
        y_TxH = g.expand(y_TxH, v_part_TxR, wb)
    return lax.psum(y_TxH, TP_AXIS)


@functools.partial(jax.tree_util.register_dataclass, data_fields=["weights", "gathered", "paged"],
                   meta_fields=["strategy"])
@dataclasses.dataclass(frozen=True)
class ShardedProjections:
    """The `lora` argument of `decoder_stack` on one device of the TP forward.

    It offers the `LoraInputs` protocol (`per_layer`, `layer_fn`) over this
    device's LoRA shards, and also ends every row-parallel projection with the
    block all-reduce, so it is passed even when no adapter is present.

    weights: projection -> this device's `SlotWeights` shards, `[L, ...]`-stacked
      (possibly empty), or a list of such dicts, one per layer; gathered: the
      step's token slots and LoRA implementation, or None (no adapter this step);
      paged: adapters in pool pages instead of `weights` (`paged.ShardedPagedLora`,
      whose `weights(layer, pool_slab, proj)` gives a `PagedShard`), or None.
    """

    weights: dict[str, SlotWeights] | list[dict[str, SlotWeights]]
    gathered: GatheredLora | None
    strategy: str
    paged: object = None

    def per_layer(self):
        return self.weights

    def _shard(self, proj: str, layer: jax.Array, layer_weights, cache_now):
        """This layer's weights of `proj` on this device, or None (no LoRA to add)."""
        if self.gathered is None:
            return None
        if self.paged is None:
            return layer_weights.get(proj)
        if proj not in self.paged.projections:
            return None
        return self.paged.weights(layer, cache_now().pool, proj)  # the live pool: no copy of an older one

    def layer_fn(self, layer: jax.Array, layer_weights, cache_now) -> LoraFn:
        g = self.gathered

        def epilogue(proj: str, y: jax.Array, x: jax.Array) -> jax.Array:
            w = self._shard(proj, layer, layer_weights, cache_now)
            if proj in ROW_PARALLEL:
                return row_parallel_lora(y, x, w, g, self.strategy)
            assert proj in COLUMN_PARALLEL, proj
            return y if w is None else column_parallel_lora(y, x, w, g, self.strategy)

        epilogue.reads_pool = self.paged is not None and g is not None  # see `DecoderLayer`
        return epilogue

    def layer_group_fn(self, layer: jax.Array, layer_weights, cache_now):
        """Projections sharing x in one launch pair (and, under `slora`, one all-gather), for
        adapters in pool pages; None (one `layer_fn` call each) otherwise."""
        g = self.gathered
        if g is None or self.paged is None:
            return None

        def lora_group(projs: tuple[str, ...], ys: tuple[jax.Array, ...], x: jax.Array) -> tuple[jax.Array, ...]:
            todo = [i for i, p in enumerate(projs) if p in self.paged.projections]
            assert all(p in COLUMN_PARALLEL for p in projs), projs
            if not todo:
                return ys
            ws = [self._shard(projs[i], layer, layer_weights, cache_now) for i in todo]
            done = column_parallel_lora_group([ys[i] for i in todo], x, ws, g, self.strategy)
            out = list(ys)
            for i, y in zip(todo, done):
                out[i] = y
            return tuple(out)

        # The Pallas group reads q's LoRA weights in the launch that also makes k and v, which the
        # KV write then waits for; the jnp reference reads them per projection (see `DecoderLayer`).
        lora_group.reads_pool = g.impl != "pallas"
        return lora_group
