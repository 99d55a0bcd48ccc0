"""Gathered LoRA: `y[t] += (x[t] @ A[slot[t]]) @ B[slot[t]]` for a batch of mixed adapters.

Weight layout "dense stacked slots" (`SlotWeights`): every resident adapter has a
slot `s`; `a[s]` is `[H_in, R]` and `b[s]` is `[R, H_out]` with the adapter's
scale (`alpha/r`, or `alpha/sqrt(r)` for rsLoRA) already folded into `b`.
Adapters of rank `r < R` are zero-padded to `R`; `ranks[s]` is the true rank
(0 where the adapter does not target this projection). The same arrays with a
leading layer axis `[L, ...]` hold a whole model; the model slices one layer.

A token whose slot is negative (-1 by convention) uses no adapter and is left unchanged.

The batch metadata (`LoraMeta`: tokens grouped by slot into segments, segments cut
into tiles of `block_m` rows) is built once per step, on host with
`build_lora_meta` (numpy) or inside jit with `build_lora_meta_jnp`, and shared by
every projection. It holds no ranks: a rank belongs to (adapter, projection) and
the kernels read it from `SlotWeights.ranks[slot]`, so one metadata serves q, k,
v, o, gate, up and down even when an adapter targets only some of them.

`add_lora(y, x, w, meta, impl=...)` runs one of several implementations of the
same function (`IMPLS`): the Pallas SGMV kernels and the baselines of the paper
comparisons; `shrink` and `expand` expose the two halves.

The ops check their inputs on entry: shapes and dtypes always (static, so free
under jit), and the slot ids and ranks where those are concrete (numpy, or a jax
Array outside any trace): an id at or past the weights' `S`, or a rank past `R`,
raises instead of reading another adapter or garbage. Under jit, where the
serving engine calls the ops every step, those values are tracers and their
checks skip: no device op or host sync is added to the step.

`impl="pallas"` is forward-only: the kernels have no derivative rule, and
differentiating through them raises NotImplementedError. The jnp impls
("reference", "gather_bmm", "onehot", "ragged_dot", "padded_bmm", "loop") are
differentiable.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.lora_linear import MAX_TOKENS as LINEAR_MAX_TOKENS
from pallas_kernels.lora_linear import lora_linear_paged_group, paged_row_table
from pallas_kernels.lora_slab import COUNTERS as SLAB_COUNTERS
from pallas_kernels.lora_slab import MAX_TOKENS as SLAB_MAX_TOKENS
from pallas_kernels.lora_slab import linear_shrink_slab, linear_slab, slab_expand, slab_shrink
from pallas_kernels.sgmv_expand import expand_reference, sgmv_expand
from pallas_kernels.sgmv_fused import sgmv_fused, sgmv_fused_paged
from pallas_kernels.sgmv_paged import (
    read_paged,
    run_time_split_counts,
    run_time_split_plan,
    sgmv_expand_paged_group,
    sgmv_paged_group_one_launch,
    sgmv_shrink_paged_group,
)
from pallas_kernels.sgmv_shrink import sgmv_shrink, shrink_reference


class SlotWeights(NamedTuple):
    """LoRA weights of one projection for `S` adapter slots (optionally `[L, ...]`-stacked)."""

    a: jax.Array  # [(L,) S, H_in, R]
    b: jax.Array  # [(L,) S, R, H_out], scale folded in
    ranks: jax.Array  # [(L,) S] int32


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=["rows", "pages", "rank", "a_row", "b_row"],
    meta_fields=["rows_per_page", "h_in", "h_out", "r_max"],
)
@dataclasses.dataclass(frozen=True)
class PagedWeights:
    """LoRA weights of one projection for `S` adapters, read in place from pool pages.

    The unified pool's layout (`slora_jax.memory.pool`): `rows` is one layer's row
    view `[num_rows, C]`; adapter `s` owns pages `pages[s]`, whose rows in order are
    its virtual rows (`v -> pages[s, v // rows_per_page] * rows_per_page + v % rows_per_page`).
    This projection's `A^T [rank, h_in]` starts at virtual row `a_row[s]` and
    `B [rank, h_out]` (scale folded in) at `b_row[s]`, both chunk-major: column chunk
    `j` (width C) is `rank` consecutive rows. `rank[s] = 0`: no LoRA here.
    """

    rows: jax.Array  # [num_rows, C]
    pages: jax.Array  # [S, max_pages] int32
    rank: jax.Array  # [S] int32
    a_row: jax.Array  # [S] int32
    b_row: jax.Array  # [S] int32
    rows_per_page: int
    h_in: int
    h_out: int
    r_max: int  # static bound on `rank` (a bucket)

    @classmethod
    def from_slots(cls, w: SlotWeights, *, chunk: int, rows_per_page: int, num_pages: int | None = None,
                   page_ids=None) -> "PagedWeights":
        """Pack dense slots (concrete ranks) into pool-layout pages (a research and benchmark helper).

        Adapter `s` gets `ceil((H_in + H_out) / C * rank_s / rows_per_page)` pages (at least one),
        taken in order from `page_ids` (default `0, 1, ...`; pass a permutation to scatter
        them); the row store has `num_pages` pages (default: just enough), other rows zero.
        """
        (pw,) = cls.group_from_slots((w,), chunk=chunk, rows_per_page=rows_per_page, num_pages=num_pages,
                                     page_ids=page_ids)
        return pw

    @classmethod
    def group_from_slots(cls, ws, *, chunk: int, rows_per_page: int, num_pages: int | None = None,
                         page_ids=None) -> tuple["PagedWeights", ...]:
        """`from_slots` for several projections of the same S adapters, in one row store.

        Adapter `s` holds, for each projection `g` in turn, `A_g^T` then `B_g` at rank
        `ws[g].ranks[s]` (as `memory.pool` lays out an adapter), in one run of pages: the
        projections share `rows` and `pages` (what `add_lora_group` launches once for).
        """
        ranks_GxS = np.stack([np.asarray(w.ranks) for w in ws])
        dims = [(w.a.shape[1], w.b.shape[-1]) for w in ws]
        for h_in, h_out in dims:
            if h_in % chunk or h_out % chunk:
                raise ValueError(f"H_in={h_in} and H_out={h_out} must be multiples of the chunk width {chunk}")
        n_GxS = np.array([(h_in + h_out) // chunk for h_in, h_out in dims])[:, None] * ranks_GxS
        a_row_GxS = np.cumsum(n_GxS, axis=0) - n_GxS  # projection g starts after the rows of 0..g-1
        b_row_GxS = a_row_GxS + np.array([h_in // chunk for h_in, _ in dims])[:, None] * ranks_GxS
        n_pages_S = np.maximum(1, -(-n_GxS.sum(0) // rows_per_page))
        total = int(n_pages_S.sum())
        ids = np.arange(total) if page_ids is None else np.asarray(page_ids)[:total]
        if len(ids) < total:
            raise ValueError(f"the adapters need {total} pages, page_ids gives {len(ids)}")
        num_pages = int(num_pages or ids.max() + 1)
        pages_SxP = np.zeros((len(n_pages_S), int(n_pages_S.max())), np.int32)
        for s, first in enumerate(np.cumsum(n_pages_S) - n_pages_S):
            pages_SxP[s, : n_pages_S[s]] = ids[first : first + n_pages_S[s]]
        rows = np.zeros((num_pages * rows_per_page, chunk), ws[0].a.dtype)  # numpy: no per-shape compiles
        for w, ranks, a_row_S, (h_in, h_out) in zip(ws, ranks_GxS, a_row_GxS, dims):
            n_in, n_out = h_in // chunk, h_out // chunk
            a_SxIxR, b_SxRxO = np.asarray(w.a), np.asarray(w.b)
            for r in np.unique(ranks[ranks > 0]):
                idx = np.flatnonzero(ranks == r)  # the E adapters of rank r
                e = len(idx)
                at_ExNxC = a_SxIxR[idx][:, :, :r].transpose(0, 2, 1).reshape(e, r, n_in, chunk).transpose(0, 2, 1, 3)
                b_ExNxC = b_SxRxO[idx][:, :r].reshape(e, r, n_out, chunk).transpose(0, 2, 1, 3)
                m_ExVxC = np.concatenate([at_ExNxC.reshape(e, -1, chunk), b_ExNxC.reshape(e, -1, chunk)], axis=1)
                v_ExV = a_row_S[idx][:, None] + np.arange(m_ExVxC.shape[1])[None, :]
                phys_ExV = np.take_along_axis(pages_SxP[idx], v_ExV // rows_per_page, axis=1) * rows_per_page + (
                    v_ExV % rows_per_page)
                rows[phys_ExV.reshape(-1)] = m_ExVxC.reshape(-1, chunk)
        rows = jnp.asarray(rows)
        i32 = functools.partial(jnp.asarray, dtype=jnp.int32)
        return tuple(cls(rows, jnp.asarray(pages_SxP), i32(ranks), i32(a_row), i32(b_row), rows_per_page, h_in, h_out,
                         int(max(1, ranks.max(initial=1))))
                     for ranks, a_row, b_row, (h_in, h_out) in zip(ranks_GxS, a_row_GxS, b_row_GxS, dims))

    def read_a(self) -> jax.Array:
        """Dense `A [S, h_in, r_max]`, zero past each rank: the jnp read of the A half, a copy."""
        return read_paged(self.rows, self.pages, self.rank, self.a_row, self.h_in, rows_per_page=self.rows_per_page,
                          r_max=self.r_max).transpose(0, 2, 1)

    def read_b(self) -> jax.Array:
        """Dense `B [S, r_max, h_out]`, zero past each rank: the jnp read of the B half, a copy."""
        return read_paged(self.rows, self.pages, self.rank, self.b_row, self.h_out, rows_per_page=self.rows_per_page,
                          r_max=self.r_max)

    def to_slots(self) -> SlotWeights:
        """Gather into dense `SlotWeights` (`R = r_max`, zero past each rank): the jnp read, a copy."""
        return SlotWeights(self.read_a(), self.read_b(), self.rank)


Weights = SlotWeights | PagedWeights


def lora_reference(y_TxO: jax.Array, x_TxI: jax.Array, w: SlotWeights, slot_T: jax.Array) -> jax.Array:
    """Plain-jnp gathered LoRA (the reference every implementation is tested against).

    Args:
      y_TxO: base output `[T, H_out]`.
      x_TxI: input `[T, H_in]`.
      w: one layer's `SlotWeights` (`a: [S, H_in, R]`, `b: [S, R, H_out]`).
      slot_T: int32 `[T]`, adapter slot per token, -1 for none.
    Returns:
      `y + (x @ A) @ B` per token in `y.dtype`; the shrink accumulates in fp32.
    """
    has_T = slot_T >= 0
    s_T = jnp.where(has_T, slot_T, 0)
    a_TxIxR = w.a[s_T]
    b_TxRxO = w.b[s_T]
    v_TxR = jnp.einsum("ti,tir->tr", x_TxI, a_TxIxR, preferred_element_type=jnp.float32)
    d_TxO = jnp.einsum("tr,tro->to", v_TxR.astype(b_TxRxO.dtype), b_TxRxO, preferred_element_type=jnp.float32)
    d_TxO = jnp.where(has_T[:, None], d_TxO, 0.0)
    return (y_TxO.astype(jnp.float32) + d_TxO).astype(y_TxO.dtype)


# ----------------------------------------------------------------------------- metadata


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=["slot", "perm", "seg_start", "seg_len", "seg_slot", "num_segments",
                 "tile_start", "tile_end", "tile_slot", "used_tiles"],
    meta_fields=["block_m", "active_tiles"],
)
@dataclasses.dataclass(frozen=True)
class LoraMeta:
    """Per-step LoRA batch metadata; fixed shapes given `(T, max_segments, block_m)`.

    Positions `p` index the sorted order: token `perm[p]`. Tokens with an adapter
    come first, grouped by slot in increasing slot order; tokens without one last.
    Padding segments have length 0 and slot -1; padding tiles have slot -1.
    """

    slot: jax.Array  # [T] int32, slot per token in the original order, -1 = no adapter
    perm: jax.Array  # [T] int32, token at each sorted position
    seg_start: jax.Array  # [G] int32, first sorted position of each segment
    seg_len: jax.Array  # [G] int32, tokens in the segment (0 for padding)
    seg_slot: jax.Array  # [G] int32, the segment's slot (-1 for padding)
    num_segments: jax.Array  # [] int32, real segments (the first `num_segments` of G)
    tile_start: jax.Array  # [NT] int32, first sorted position of the tile
    tile_end: jax.Array  # [NT] int32, end of the tile's segment (the tile stops at min(start + block_m, end))
    tile_slot: jax.Array  # [NT] int32, the tile's slot (-1 for padding)
    used_tiles: jax.Array  # [] int32, tiles holding rows (the first `used_tiles` of NT)
    block_m: int  # static: rows per tile, a power of two >= 16
    active_tiles: int  # static: power-of-two bucket >= the real tile count (sizes the shrink's split-K)


def num_tiles(n_tokens: int, max_segments: int, block_m: int) -> int:
    """Static tile count: a bound on sum_g ceil(len_g / block_m) over any layout."""
    return max(1, min(n_tokens, -(-n_tokens // block_m) + max_segments))


def default_block_m(n_tokens: int) -> int:
    """Rows per tile by token bucket: 16 (the dot minimum) for decode-sized batches, more for prefill."""
    if n_tokens <= 128:
        return 16
    if n_tokens <= 1024:
        return 32
    return 64


def _pow2_ceil(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def _check_block_m(block_m: int) -> None:
    if block_m < 16 or block_m & (block_m - 1):
        raise ValueError(f"block_m must be a power of two >= 16, got {block_m}")


def _check_slot_ids(shape, dtype) -> None:
    """Slot ids are a 1-D integer array: a float id would be truncated (-0.5 to slot 0) without a word."""
    if len(shape) != 1:
        raise ValueError(f"slot_T must be 1-D [T] (one slot id per token), got shape {tuple(shape)}")
    if shape[0] and not jnp.issubdtype(dtype, jnp.integer):  # an empty list is float64 in numpy: no ids
        raise TypeError(f"slot_T must hold integer slot ids (negative: no adapter), got dtype {dtype}")


def build_lora_meta(slot_T, *, max_segments: int | None = None, block_m: int | None = None,
                    static_tiles: bool = False) -> LoraMeta:
    """Host (numpy) metadata builder; the engine calls this once per step.

    Args:
      slot_T: integer `[T]`, adapter slot per token, negative (-1) for none; a float
        array raises TypeError (its ids would be truncated), other than 1-D ValueError.
      max_segments: static number of segment entries G (default T); raises if the
        batch has more distinct slots.
      block_m: rows per tile (default `default_block_m(T)`).

    The static `active_tiles` (real tile count rounded up to a power of two) lets
    the split shrink kernels size their split-K to the work actually present; being
    static, each of its log2(T) values compiles the step once. `static_tiles=True`
    sets it to the tile bound NT instead (one compile per shape; what a serving loop
    wants: the one-launch kernel sizes its work from `used_tiles` at run time). NT
    itself, not NT rounded up: at the campaigns' 128-token bucket over 64 adapters
    NT is 72, and 128 made the paged o shrink take 8 K chunks a program instead of 4,
    which the 7B decode step measured slower (benchmarks/NOTES_lora_kernels.md, session 9).
    """
    slot_T = np.asarray(slot_T)
    _check_slot_ids(slot_T.shape, slot_T.dtype)
    slot_T = slot_T.astype(np.int32)
    (T,) = slot_T.shape
    G = T if max_segments is None else int(max_segments)
    key_T = np.where(slot_T >= 0, slot_T, np.iinfo(np.int32).max)
    perm_T = np.argsort(key_T, kind="stable").astype(np.int32)
    slots, counts = np.unique(slot_T[slot_T >= 0], return_counts=True)
    n_seg = len(slots)
    if n_seg > G:
        raise ValueError(f"{n_seg} distinct slots but max_segments={G}")
    bm = default_block_m(T) if block_m is None else int(block_m)
    _check_block_m(bm)
    NT = num_tiles(T, G, bm)
    seg_start = np.zeros(G, np.int32)
    seg_len = np.zeros(G, np.int32)
    seg_slot = np.full(G, -1, np.int32)
    seg_len[:n_seg] = counts
    seg_slot[:n_seg] = slots
    seg_start[:n_seg] = np.cumsum(counts) - counts
    ntile_g = -(-counts // bm)
    tile_start = np.zeros(NT, np.int32)
    tile_end = np.zeros(NT, np.int32)
    tile_slot = np.full(NT, -1, np.int32)
    g_of_tile = np.repeat(np.arange(n_seg), ntile_g)
    within = np.arange(len(g_of_tile)) - np.repeat(np.cumsum(ntile_g) - ntile_g, ntile_g)
    n_t = len(g_of_tile)
    tile_start[:n_t] = seg_start[g_of_tile] + within * bm
    tile_end[:n_t] = seg_start[g_of_tile] + seg_len[g_of_tile]
    tile_slot[:n_t] = seg_slot[g_of_tile]
    active = NT if static_tiles else min(_pow2_ceil(max(n_t, 1)), _pow2_ceil(NT))
    return LoraMeta(slot=slot_T, perm=perm_T, seg_start=seg_start, seg_len=seg_len, seg_slot=seg_slot,
                    num_segments=np.int32(n_seg), tile_start=tile_start, tile_end=tile_end,
                    tile_slot=tile_slot, used_tiles=np.int32(n_t), block_m=bm, active_tiles=active)


def build_lora_meta_jnp(slot_T: jax.Array, *, max_segments: int | None = None,
                        block_m: int | None = None) -> LoraMeta:
    """Jittable metadata builder, same output as `build_lora_meta`.

    Slots beyond `max_segments` distinct ones cannot raise under jit: they are
    dropped (their tokens get no LoRA, and `slot` says -1 for them, so that the impls that
    read per-token slots agree); size `max_segments` so that cannot happen.
    The layout is unknown at trace time, so `active_tiles` is the static tile bound.
    `slot_T` is checked as `build_lora_meta` checks it (dtype and shape: static).
    """
    slot_T = jnp.asarray(slot_T)
    _check_slot_ids(slot_T.shape, slot_T.dtype)
    slot_T = slot_T.astype(jnp.int32)
    (T,) = slot_T.shape
    if T == 0:  # no token: the host builder's empty layout (the sort and tiling below index a last element)
        return jax.tree.map(jnp.asarray, build_lora_meta(np.zeros(0, np.int32), max_segments=max_segments,
                                                         block_m=block_m, static_tiles=True))
    G = T if max_segments is None else int(max_segments)
    if G < 1:  # the layout is unknown at trace time, so even all-"-1" ids need one (empty) segment
        raise ValueError(f"max_segments={max_segments} with {T} tokens: the jittable builder needs >= 1")
    bm = default_block_m(T) if block_m is None else int(block_m)
    _check_block_m(bm)
    NT = num_tiles(T, G, bm)
    big = jnp.iinfo(jnp.int32).max
    key_T = jnp.where(slot_T >= 0, slot_T, big)
    perm_T = jnp.argsort(key_T, stable=True).astype(jnp.int32)
    sk_T = key_T[perm_T]
    valid_T = sk_T != big
    new_T = valid_T & jnp.concatenate([jnp.ones((1,), bool), sk_T[1:] != sk_T[:-1]])
    seg_T = jnp.cumsum(new_T.astype(jnp.int32)) - 1
    n_seg = jnp.minimum(jnp.sum(new_T.astype(jnp.int32)), G)
    pos_T = jnp.arange(T, dtype=jnp.int32)
    drop_T = jnp.where(new_T, seg_T, G)
    seg_start = jnp.zeros(G, jnp.int32).at[drop_T].set(pos_T, mode="drop")
    seg_slot = jnp.full(G, -1, jnp.int32).at[drop_T].set(sk_T, mode="drop")
    seg_len = jnp.zeros(G, jnp.int32).at[jnp.where(valid_T, seg_T, G)].add(1, mode="drop")
    ntile_g = (seg_len + bm - 1) // bm
    cum_g = jnp.cumsum(ntile_g)
    j_N = jnp.arange(NT, dtype=jnp.int32)
    g_N = jnp.minimum(jnp.searchsorted(cum_g, j_N, side="right"), G - 1).astype(jnp.int32)
    tile_ok_N = j_N < cum_g[-1]
    within_N = j_N - (cum_g[g_N] - ntile_g[g_N])
    tile_start = jnp.where(tile_ok_N, seg_start[g_N] + within_N * bm, 0)
    tile_end = jnp.where(tile_ok_N, seg_start[g_N] + seg_len[g_N], 0)
    tile_slot = jnp.where(tile_ok_N, seg_slot[g_N], -1)
    kept_T = jnp.zeros(T, bool).at[perm_T].set(valid_T & (seg_T < G))  # back in token order
    slot_T = jnp.where(kept_T | (slot_T < 0), slot_T, -1)
    return LoraMeta(slot=slot_T, perm=perm_T, seg_start=seg_start, seg_len=seg_len, seg_slot=seg_slot,
                    num_segments=n_seg.astype(jnp.int32), tile_start=tile_start.astype(jnp.int32),
                    tile_end=tile_end.astype(jnp.int32), tile_slot=tile_slot.astype(jnp.int32),
                    used_tiles=jnp.minimum(cum_g[-1], NT).astype(jnp.int32), block_m=bm,
                    active_tiles=NT)


# ----------------------------------------------------------------------------- kernels config


@dataclasses.dataclass(frozen=True)
class KernelConfig:
    """Launch parameters of the Pallas SGMV kernels (block sizes powers of two; None = heuristic).

    `add_lora` runs a split pair (fp32 partials in HBM between two launches):
    `sgmv_shrink` + `sgmv_expand` on dense slots, `sgmv_shrink_paged_group` +
    `sgmv_expand_paged_group` on `PagedWeights` (one launch each for all
    projections of an `add_lora_group` call; `shrink`/`expand` launch the same
    kernels, one half each, with G = 1); or, with
    `fused=True`, the one-launch `sgmv_fused` / `sgmv_fused_paged`. The split pair
    is the default because it measured faster (H200, 4096->4096 rank 16: 17.6 vs
    53.9 us at 64 distinct tokens on dense slots; benchmarks/NOTES_lora_kernels.md).
    """

    fused: bool = False
    # split pair, pages: K chunks (of C) per shrink program, unrolled; None: `default_k_steps` of the tiles
    paged_k_steps: int | None = None
    paged_n_steps: int = 2  # split pair, pages: N chunks per expand program, unrolled
    # pages (split pair and one launch): loop steps of `paged_k_steps` chunks per shrink program (fewer K
    # splits, so fewer partials to sum); 1: no loop. H200 (session 20): 2 with the presum took 1.09x the time of
    # the presum alone at 256-4096 tokens and 1.40x at 32-64 (medians); <= 16 tokens not yet measured.
    paged_k_loop: int = 1
    # split pair, pages: calls of at least this many tokens sum the shrink's K-split partials once (an XLA
    # reduction) before the expand, instead of every expand program of a tile summing them; 0: never.
    # H200 (session 20, 1000 adapters resident, 256/1024/4096 tokens, ranks 16/128/mixed, distinct and
    # identical): 0.30-1.01x the time of never, in all 36 cases (11008->4096 rank 128 distinct at 4096 tokens
    # 1748 vs 5294 us; identical 158 vs 462). At 32 and 64 tokens (36 cases, also 4096->1024): median 0.84x
    # (0.53-1.09x, one 1.89x: rank mixed, identical, 32 tokens, 35.2 vs 18.6 us); slower only with one adapter.
    # Session 21: 1 from 32, so that the decode calls `paged_one_launch_max_rank` sends to the pair have it too.
    paged_presum_min_tokens: int = 1
    group_projections: bool = True  # split pair, pages: `add_lora_group` launches once for its projections
    # split pair, pages: warps per program of both kernels; None: by tile (`paged_warps_for`), 4 where the fp32
    # [block_m, r_block] shrink tile has >= 4096 values, else 2. H200 (session 19, 4096->4096, 1000 adapters
    # resident): 64-row tiles at 4096 tokens took 2057 vs 5435 us with 4 warps against 2 (distinct, rank 128),
    # 1023 vs 1290 (rank 64), and 0.59-0.97x at uniform/identical; 32-row tiles at 1024 tokens: rank 128 and
    # mixed 0.83-1.04x with 4, rank 64 1.22-1.30x slower with 4 (2048 values). Decode-sized tiles (16 rows)
    # keep 2: it beat 4 for q/k/v of 7B at 64 tokens (28.7 vs 38.0-44.9 us; session 8). 8 lost everywhere.
    paged_warps: int | None = None
    # split pair, pages: calls of at most this many tokens run shrink and expand as one launch, the expand's
    # programs waiting on per-tile counters (`sgmv_paged_group_one_launch`); 0: never. H200, Llama-7B decode
    # step: 5.04-5.06 vs 5.23-5.24 ms at batch 1, 5.24 vs 5.43-5.49 at batch 8, 8.22 vs 8.20 at batch 64
    # (benchmarks/NOTES_lora_kernels.md, session 10).
    paged_one_launch_max_tokens: int = 16
    # ... and only where the group's rank block (the largest rank, as a power of two >= 16) is at most this;
    # larger ranks take the split pair with the presum. The one launch's expand programs each sum every K
    # split's partial after their wait, which grows with splits x rank. H200 (session 21, 1 and 8 tokens,
    # distinct and identical; benchmarks/results/kernels_s21_h200): at rank 128 and mixed ranks the pair
    # with the presum took 12.1-21.4 us on 11008->4096 against 66.9-82.6 with one launch (0.18-0.27x), and
    # 0.53-1.25x (median 0.75x) of it on 4096->4096 and 4096->1024; at rank 16, 0.83-1.58x (median 1.13x).
    paged_one_launch_max_rank: int = 32
    # one launch: how the expand reads the shrink's partials after its wait: "volatile" loads, or "cg" (L2
    # only), one a split; or "block": volatile block loads of several splits each. H200 (session 21, the 36
    # cases above): "cg" took 1.02x the time (median; 0.48-1.27x). Session 24 (CPU compile, no GPU): one
    # split at a time, each partial's layout conversion through shared memory comes before the next load, a
    # wait each; "block" takes the one launch from 33 SASS waits to 17 (4096->4096; 60 -> 17 at 11008->4096),
    # predicted 0.64x the device time (scripts/kernel_time_model.py). H100 (session 25, 1/8/16 tokens,
    # 4096->4096, 11008->4096, 4096->1024 and 4096->11008, ranks 8/16, distinct and identical, 36 cases;
    # benchmarks/results/kernels_s25_h100/decode_block*.json): "block" took 0.63x the device time of
    # "volatile" at 1 token (0.44-0.70x), 0.69x at 8 (0.43-0.74x), 0.66x at 16 (0.57-0.79x), none slower;
    # the Pallas kernels' sum 0.66x against the 0.64x predicted. Wall time at 1 token, launch-bound: 0.97x.
    paged_wait_loads: str = "block"
    # split pair, pages: N > 0 launches at most N programs along the tile axis, each looping over the used tiles
    # (stride N), so the padding tiles of the metadata's bound launch none; 0: one program per bound tile.
    # H200 (session 19, 4096->4096, metadata for 1000 segments): 128 took 0.59-0.82x the time of 0 at 1024 and
    # 4096 tokens (one adapter or 32-64 adapters, ranks 16 and 128: 1024 tokens rank 16 identical 22.9 vs
    # 39.0 us) and 0.94-1.03x at 64 tokens; 512 was between the two.
    paged_tile_programs: int = 128
    # split pair, pages: N > 0 flattens that tile loop: N programs in all, each looping with stride N over
    # the run-time items (K split x projection, or N block; used tile), so a call with many used tiles is
    # not held to `paged_tile_programs` programs per split and one with few launches no more programs than
    # N; 0: off (the grid `paged_tile_programs` x splits). H200 (session 21, 256-4096 tokens): one program
    # per bound tile took 0.73-0.87x the time of 128 with one token per adapter and 1.13-2.16x with one
    # adapter (`benchmarks/results/kernels_s21_h200/tile_programs.json`), which this is meant to reconcile;
    # not yet measured.
    paged_flat_programs: int = 0
    # split pair of `add_lora` / `add_lora_group`, pages, with `paged_flat_programs` N: S > 0 picks the
    # shrink's K splits at run time, about N / (used tiles x projections), 1 to S, each of whole loop steps
    # of `paged_k_steps` chunks (None: 4 here), and sums them (masked) before the expand whatever
    # `paged_presum_min_tokens`; the partials buffer holds S splits ([G, S, T, r_block] fp32). 0: the static
    # split count. Meant for calls with few used tiles (one adapter at 64 tokens, 11008->4096 rank 128: 14.7
    # us with 86 static splits against 21.8 with the default 22; H200, session 21) without giving calls with
    # many tiles more partials; not yet measured.
    paged_run_time_splits: int = 0
    # pages (split pair and one launch): True reads each program's metadata and page-table entries before any
    # weight load and issues every unrolled chunk's loads before its dots (`sgmv_paged` `phased`); False
    # interleaves them chunk by chunk; None: True for the one launch only. H200 (session 22, 1 and 8 tokens,
    # 4096->4096 and 11008->4096, ranks 16/128, distinct and identical; `decode_phased.json`): device time
    # 0.91x (0.86-0.94x) of interleaved at rank 16 (the one launch) and 0.93x (0.89-1.02x) at rank 128 (the
    # pair); at 64-256 tokens the pair took 0.76-1.91x (distinct median 1.08x, up to 1.91x at 64 tokens
    # rank 128: more tiles, bigger blocks in flight), so the pair keeps the interleaved order.
    paged_phased_loads: bool | None = None
    # split pair, pages, calls of at most `paged_one_launch_max_tokens` tokens (the decode calls whose rank
    # block the one launch leaves to the pair): K chunks per shrink program and warps per program where
    # `paged_k_steps` / `paged_warps` are None; 0: no override (`default_k_steps`, `paged_warps_for`). The
    # profile showed each program's unrolled chunks costing ~1.2 us apiece at one token (the loads do not
    # overlap), so decode calls want short programs. H200 (session 22, 1 and 8 tokens, 4096->4096 and
    # 11008->4096, ranks 64 and 128, distinct and identical; `decode_warps.json`): device time of 1 chunk and
    # 4 warps over the old defaults (4 chunks, 2 warps) 0.73x (0.71-0.94x) at rank 64 and 0.71x (0.65-0.99x)
    # at rank 128; 2 chunks and 4 warps 0.81x and 0.78x.
    paged_small_k_steps: int = 1
    paged_small_warps: int = 4
    # ... and their tile loop: `paged_tile_programs` for these calls (0: one program per bound tile, no loop
    # and no read of `used_tiles` first); None: no override. Ignored with `paged_flat_programs`. H100
    # (session 25, 1 and 8 tokens, 4096->4096 and 11008->4096, ranks 64/128, distinct and identical, 16
    # cases; `kernels_s25_h100/decode_trips.json`): device time of 0 over 128 0.94x (0.86-0.98x), none
    # slower; wall 0.93-0.95x (medians). Phased loads on top: 0.94x as well (predicted 0.86x), so not taken.
    paged_small_tile_programs: int | None = 0
    # split pair, pages, calls of more than `paged_one_launch_max_tokens` and at most this many tokens: K chunks
    # per shrink program and warps per program (`paged_mid_k_steps`, `paged_mid_warps`) where `paged_k_steps` /
    # `paged_warps` are None; 0: off (`default_k_steps`, `paged_warps_for`). H100 (session 25, one adapter,
    # 4096->4096 / 11008->4096 / 4096->1024, ranks 16/128; `kernels_s25_h100/identical_steps.json`): 2 chunks
    # and 4 warps took 0.62x the device time at 64 tokens, 0.83x at 256 and 1.13x at 1024. H100 (session 27,
    # 64 tokens, the same projections, ranks 16/64/128, 27 cases; `kernels_s27_h100/mid_shapes.json`): device
    # time over the default 0.59x identical (0.54-0.66x), 0.66x skewed (0.63-0.87x), 1.01x distinct
    # (0.90-1.44x; the 1.44x is 11008->4096 rank 16's shrink, 14.6 -> 23.2 us). Identical calls then beat
    # `loop` in all 9 cases (0.71-0.98x its device time), where the default took 1.12-1.75x. 17-63 tokens:
    # not measured.
    paged_mid_max_tokens: int = 64
    paged_mid_k_steps: int = 2
    paged_mid_warps: int = 4
    # Ablation, off: N > 0 computes each LoRA delta (zeros + the op) as a call annotated for GPU stream N
    # (`compat.on_gpu_stream`), added to the base output after, so XLA may run the latency-bound LoRA
    # kernels beside the base matmul that reads the same x. 0: the op accumulates into the base output on
    # the main stream (`memory.paged_lora`). H200, Llama-7B decode step at batch 64 with XLA's latency-hiding
    # scheduler: 8.47 ms against 8.26 without (session 11): the q/k/v delta's call ends before the q/k
    # matmul starts, and the zeros and adds cost more than the overlap of the o delta gives.
    lora_stream: int = 0
    # Calls of at most this many tokens (and at most `lora_linear.MAX_TOKENS`) on pages compute the base
    # projection and its LoRA in one launch (`lora_linear_group`, `pallas_kernels.lora_linear`): the LoRA's
    # latency-bound programs run beside the base matmul's programs, which stream W. 0: never (XLA's matmul,
    # then the split pair). H200, Llama-7B decode step at batch 64: 8.47-8.70 ms against 8.19 with XLA's matmul
    # then the split pair (session 13, shrink inside the launch; `linear_shrink_launch` not yet measured).
    linear_max_tokens: int = 0
    linear_block_n: int = 64  # one launch with the base: columns per matmul program (<= the pool's row width C)
    linear_block_k: int = 128  # one launch with the base: H_in per matmul loop step
    linear_shrink_k_steps: int | None = None  # one launch with the base: C-wide chunks per shrink program (None: all)
    linear_shrink_unroll: int = 2  # one launch with the base: C-wide chunks per shrink loop step
    # one launch with the base: adapters per expand loop step (one dot); None: few enough steps to ride on the
    # last half of the matmul's K loop
    linear_expand_unroll: int | None = None
    # one launch with the base: False runs the shrink in it too (the matmul programs wait for it); True runs the
    # split pair's shrink as its own launch first, and the matmul launch carries only the expand
    linear_shrink_launch: bool = False
    linear_warps: int = 4
    linear_stages: int = 3
    # The batch's adapters in a dense slab (`lora_linear_slab`, `pallas_kernels.lora_slab`; the engine's
    # `EngineConfig.lora_slab_rows`): calls of at most `lora_slab.MAX_TOKENS` tokens.
    slab_block_n: int = 64  # slab: output columns per program of the base GEMM (with its K extended)
    slab_block_k: int = 128  # slab: H_in per K-loop step of both kernels
    slab_block_p: int = 64  # slab: slab rows per shrink program and per extended-K step
    # slab: K splits of the shrink (the largest divisor of K's blocks up to this). H200, 7B at 64 tokens,
    # 47 adapters: 4 gave q/k/v 12.4 us and o 9.1, against 15.5-26.1 with 8-32 and 24.2 and 15.7 with 16
    # (benchmarks/NOTES_lora_kernels.md, session 14)
    slab_shrink_splits: int = 4
    # slab: K splits of the base GEMM, 0: enough for ~160 programs (7B o at 64 tokens: 4 splits, 14.4 us
    # against 18.3 unsplit; q/k/v: 1)
    slab_linear_splits: int = 0
    # slab: True runs the shrink's programs in the base GEMM's launch (`linear_shrink_slab`, neither waits on
    # the other), then the expand as its own launch (`slab_expand`); False: the shrink's launch, then the
    # GEMM with its K extended. Not yet measured on a GPU (session 14).
    slab_shrink_with_base: bool = False
    slab_warps: int = 4
    slab_stages: int = 3
    # slab: calls of more tokens than this (or than `lora_slab.MAX_TOKENS`) take the paths on pool pages.
    # H200, issue 6's campaign (session 16): the 128-token steps that carry a prompt chunk took 9.58 ms on
    # the slab against 9.16 with the split pair; 64 keeps the slab for full decode batches only.
    slab_max_tokens: int = 256
    chunk: int = 64  # fused, dense slots: K/N block (pages: the pool's row width C)
    n_split_max: int = 16  # fused: most programs sharing one tile's H_out
    target_programs: int = 256  # fused: tiles x splits aimed at (splits = this // used tiles)
    unroll_k: int = 4  # fused: K chunks per loop step
    unroll_n: int = 2  # fused: N chunks per loop step
    fused_warps: int = 4
    fused_stages: int = 3
    shrink_block_k: int = 256
    shrink_block_r: int = 16
    k_splits: int | None = None
    shrink_warps: int = 4
    shrink_stages: int = 3
    expand_block_n: int = 128
    expand_block_r: int = 16
    expand_warps: int = 4
    expand_stages: int = 2
    interpret: bool | None = None  # None: interpret unless on a GPU backend
    mixed_index: bool | None = None  # None: row-array + slice indexing unless interpreting


# ----------------------------------------------------------------------------- input checks
# Shapes and dtypes are static: checking them is free under jit. Values (slot ids, ranks) are checked only
# where concrete; under jit they are tracers and the checks skip, so the serving step gains no device op
# and no host sync. The kernels read out-of-range ids and ranks without a bounds check (clamped or as
# garbage), which is why these raise here.


def _host_value(x) -> np.ndarray | None:
    """`x` as numpy where it is concrete (numpy, or a jax Array outside any trace), else None."""
    if isinstance(x, jax.core.Tracer) or (isinstance(x, jax.Array) and not x.is_fully_addressable):
        return None
    return np.asarray(x)


def _config(config) -> KernelConfig:
    if config is None:
        return KernelConfig()
    if not isinstance(config, KernelConfig):
        raise TypeError(f"config must be a KernelConfig (e.g. KernelConfig(fused=True)) or None, "
                        f"got {type(config).__name__}: {config!r}")
    return config


def _check_ranks(ranks_S, R: int, name: str) -> None:
    """Integer `[S]` ranks; where concrete, each in `0..R` (a rank past R reads past the weights)."""
    if not jnp.issubdtype(ranks_S.dtype, jnp.integer):
        raise TypeError(f"{name} must be integer, got dtype {ranks_S.dtype}")
    r_S = _host_value(ranks_S)
    if r_S is not None and r_S.size and (r_S.min() < 0 or r_S.max() > R):
        bad = sorted({int(r) for r in r_S[(r_S < 0) | (r_S > R)]})
        raise ValueError(f"{name} must be in 0..{R} (the weights' rank width), got {bad[:8]}")


def _check_weights(w, *, a: bool = True, b: bool = True) -> tuple[int, int | None, int | None, int]:
    """`w` is one layer's weights; returns `(S, H_in, H_out, R)`, H_in (H_out) None where its half is unused.

    Only the halves the op reads are checked: a rank-split A under tensor parallelism has fewer rank columns
    than its B (`parallel.lora`), and `shrink` and `expand` each see one half of it.
    """
    if isinstance(w, PagedWeights):
        S = w.rank.shape[0] if w.rank.ndim == 1 else None
        if S is None or w.pages.ndim != 2 or w.pages.shape[0] != S or w.a_row.shape != (S,) or w.b_row.shape != (S,):
            raise ValueError(f"PagedWeights must hold S adapters: rank, a_row, b_row [S] and pages [S, max_pages]; "
                             f"got rank {w.rank.shape}, a_row {w.a_row.shape}, b_row {w.b_row.shape}, "
                             f"pages {w.pages.shape}")
        _check_ranks(w.rank, w.r_max, "PagedWeights.rank")
        return S, w.h_in if a else None, w.h_out if b else None, w.r_max
    if not isinstance(w, SlotWeights):
        raise TypeError(f"w must be SlotWeights or PagedWeights, got {type(w).__name__}")
    if w.ranks.ndim != 1:
        raise ValueError(f"SlotWeights.ranks must be [S] (one layer's weights), got shape {w.ranks.shape}")
    S = w.ranks.shape[0]
    for half, arr, axes in (("a", w.a, "[S, H_in, R]"), ("b", w.b, "[S, R, H_out]")):
        if not (a if half == "a" else b):
            continue
        if arr.ndim != 3:
            raise ValueError(f"SlotWeights.{half} must be one layer's {axes}, got shape {arr.shape}")
        if arr.shape[0] != S:
            raise ValueError(f"SlotWeights.ranks has {S} entries but {half} {axes} has S={arr.shape[0]} "
                             f"(shape {arr.shape}): one rank per slot")
    if a and b and w.a.shape[2] != w.b.shape[1]:
        raise ValueError(f"SlotWeights.a [S, H_in, R] and .b [S, R, H_out] must have one R, got a {w.a.shape}, "
                         f"b {w.b.shape}")
    R = w.a.shape[2] if a else w.b.shape[1]
    _check_ranks(w.ranks, R, "SlotWeights.ranks")
    return S, w.a.shape[1] if a else None, w.b.shape[2] if b else None, R


def _check_rows(z, name: str, T: int | None, width: int, what: str) -> int:
    """`z` is a floating `[T, width]` (T None: any); returns its T."""
    if z.ndim != 2 or z.shape[1] != width or (T is not None and z.shape[0] != T):
        t = "T" if T is None else T
        raise ValueError(f"{name} must be [{t}, {what}] = [{t}, {width}], got shape {z.shape}")
    if not jnp.issubdtype(z.dtype, jnp.floating):
        raise TypeError(f"{name} must be floating, got dtype {z.dtype}")
    return z.shape[0]


def _check_meta(meta, T: int, S: int) -> None:
    """`meta` was built for these T tokens, and (where its ids are concrete) names slots below S."""
    if not isinstance(meta, LoraMeta):
        raise TypeError(f"meta must be a LoraMeta (build_lora_meta / build_lora_meta_jnp), got {type(meta).__name__}")
    if meta.slot.shape != (T,):
        raise ValueError(f"meta was built for {meta.slot.shape[0]} tokens, x and y have T={T} rows")
    slot_T = _host_value(meta.slot)
    if slot_T is not None and slot_T.size and slot_T.max() >= S:
        bad = sorted({int(s) for s in slot_T[slot_T >= S]})
        raise ValueError(f"meta's slot ids {bad[:8]} are out of range: the weights hold S={S} adapters "
                         f"(ids 0..{S - 1}; negative: no adapter)")


def _check_pallas_dtype(x_TxI, w) -> None:
    """The kernels' dots take one element type (Triton rejects f32 x bf16); interpret mode would promote."""
    dtype = w.rows.dtype if isinstance(w, PagedWeights) else w.a.dtype
    if x_TxI.dtype != dtype:
        raise TypeError(f"impl='pallas' needs x in the weights' dtype {dtype}, got x {x_TxI.dtype}; cast x, or use "
                        f"a jnp impl, which promotes")


def _check_call(y_TxO, x_TxI, w, meta) -> int:
    """`add_lora`'s arguments agree with each other; returns T."""
    S, H_in, H_out, _ = _check_weights(w)
    T = _check_rows(x_TxI, "x", None, H_in, "H_in")
    _check_rows(y_TxO, "y", T, H_out, "H_out")
    _check_meta(meta, T, S)
    return T


def _check_slab(x_TxI, a_slab, b_slab, n_proj: int, offset) -> None:
    """The slab ops' operands agree: x `[T, H_in]` in the slab's dtype, slabs `[M, H_in, P]` and `[M, P, N]`,
    and (where `offset` is concrete) projections `offset .. offset + n_proj - 1` inside M. The kernels read
    a projection past M without a bounds check (another layer's rows, or garbage)."""
    if x_TxI.ndim != 2:
        raise ValueError(f"x must be [T, H_in], got shape {x_TxI.shape}")
    if a_slab.ndim != 3 or b_slab.ndim != 3 or a_slab.shape[0] != b_slab.shape[0] or a_slab.shape[2] != b_slab.shape[1]:
        raise ValueError(f"a_slab [M, H_in, P] and b_slab [M, P, N] must share M and P, got {a_slab.shape} and "
                         f"{b_slab.shape}")
    if x_TxI.dtype != a_slab.dtype or b_slab.dtype != a_slab.dtype:
        raise TypeError(f"x, a_slab and b_slab must have one dtype (the kernels' dots take one), got "
                        f"{x_TxI.dtype}, {a_slab.dtype}, {b_slab.dtype}")
    off = _host_value(offset)
    M = a_slab.shape[0]
    if off is not None and (int(off) < 0 or int(off) + n_proj > M):
        raise ValueError(f"offset={int(off)} with {n_proj} projections reads slab projections "
                         f"{int(off)}..{int(off) + n_proj - 1}, but the slabs hold M={M}")


@jax.custom_jvp
def _forward_only(*trees):
    """Identity on the floating inputs of a Pallas path, whose derivative rule raises a clear error (the
    kernels have none: differentiating a `pallas_call` failed inside Pallas with an empty AssertionError).

    It lowers to nothing (the compiled step is unchanged) and takes only arrays the kernels read anyway:
    a `custom_jvp` keeps all its inputs alive, so given the metadata it would keep the fields no kernel
    reads as arguments of the jitted step, passed (from the host: copied) every call.
    """
    return trees


@_forward_only.defjvp
def _forward_only_jvp(primals, tangents):
    raise NotImplementedError(f"impl='pallas' is forward-only: the Pallas SGMV kernels have no derivative rule; "
                              f"differentiate through a jnp impl, one of {tuple(_BASELINES)}")


def _mark(w: Weights, arrays: tuple, *, a: bool = True, b: bool = True):
    """`(w, arrays)` through `_forward_only`: the weight arrays the path reads (A and/or B, or the pool
    rows) and the given activations."""
    if isinstance(w, PagedWeights):
        rows, arrays = _forward_only(w.rows, arrays)
        return dataclasses.replace(w, rows=rows), arrays
    a_SxIxR, b_SxRxO, arrays = _forward_only(w.a if a else None, w.b if b else None, arrays)
    return w._replace(a=a_SxIxR if a else w.a, b=b_SxRxO if b else w.b), arrays


def _pad_rank(w: SlotWeights, multiple: int) -> SlotWeights:
    """Pad R to a multiple of the rank block (copies the weights: allocate R % 16 == 0 to avoid it)."""
    R = w.a.shape[-1]
    pad = -R % multiple
    if not pad:
        return w
    return SlotWeights(jnp.pad(w.a, ((0, 0), (0, 0), (0, pad))), jnp.pad(w.b, ((0, 0), (0, pad), (0, 0))), w.ranks)


def _pallas_vpart(x_TxI, w: SlotWeights, meta: LoraMeta, cfg: KernelConfig):
    return sgmv_shrink(x_TxI, w.a, w.ranks, meta.perm, meta.tile_start, meta.tile_end, meta.tile_slot,
                       block_m=meta.block_m, block_k=cfg.shrink_block_k, block_r=cfg.shrink_block_r,
                       k_splits=cfg.k_splits, active_tiles=meta.active_tiles, num_warps=cfg.shrink_warps,
                       num_stages=cfg.shrink_stages, interpret=cfg.interpret, mixed_index=cfg.mixed_index)


def _pallas_expand(y_TxO, vpart_KxTxR, w: SlotWeights, meta: LoraMeta, cfg: KernelConfig):
    return sgmv_expand(y_TxO, vpart_KxTxR, w.b, w.ranks, meta.perm, meta.tile_start, meta.tile_end,
                       meta.tile_slot, block_m=meta.block_m, block_n=cfg.expand_block_n,
                       block_r=cfg.expand_block_r, num_warps=cfg.expand_warps,
                       num_stages=cfg.expand_stages, interpret=cfg.interpret, mixed_index=cfg.mixed_index)


def _rank_mask(w: SlotWeights, slot_T):
    """`[T, R]` bool: token has an adapter and the column is below its rank."""
    has_T = slot_T >= 0
    r_T = jnp.where(has_T, w.ranks[jnp.maximum(slot_T, 0)], 0)
    return jnp.arange(w.a.shape[-1])[None, :] < r_T[:, None]


# ----------------------------------------------------------------------------- baselines
# Each takes (y, x, w, meta) and returns y + delta; all compute in fp32 and cast v to B's dtype.


def _finish(y_TxO, d_TxO):
    return (y_TxO.astype(jnp.float32) + d_TxO).astype(y_TxO.dtype)


def _add_gather_bmm(y_TxO, x_TxI, w, meta):
    """Punica's Gather-BMM: gather every token's A and B (`[T, H_in, R]`, `[T, R, H_out]`), then bmm."""
    slot_T = jnp.asarray(meta.slot)
    v_TxR = jnp.where(_rank_mask(w, slot_T), shrink_reference(x_TxI, w.a, w.ranks, slot_T), 0.0)
    return expand_reference(y_TxO, v_TxR, w.b, w.ranks, slot_T)


def _add_onehot(y_TxO, x_TxI, w, meta):
    """One-hot token->slot matrix against all S slots (reads every resident adapter), as JAX TPU serving does."""
    S, H_in, R = w.a.shape
    slot_T = jnp.asarray(meta.slot)
    oh_TxS = (slot_T[:, None] == jnp.arange(S)[None, :])
    keep_SxR = jnp.arange(R)[None, :] < w.ranks[:, None]
    xa_TxSxR = jnp.einsum("ti,sir->tsr", x_TxI, w.a, preferred_element_type=jnp.float32)
    v_TxSxR = jnp.where(oh_TxS[:, :, None] & keep_SxR[None], xa_TxSxR, 0.0).astype(w.b.dtype)
    d_TxO = jnp.einsum("tsr,sro->to", v_TxSxR, w.b, preferred_element_type=jnp.float32)
    return _finish(y_TxO, d_TxO)


def _add_ragged_dot(y_TxO, x_TxI, w, meta):
    """`jax.lax.ragged_dot` over tokens sorted by slot, one group per slot (all S groups)."""
    S = w.a.shape[0]
    perm_T = jnp.asarray(meta.perm)
    gs_S = jnp.zeros(S, jnp.int32).at[jnp.asarray(meta.seg_slot)].add(jnp.asarray(meta.seg_len), mode="drop")
    slot_sorted_T = jnp.asarray(meta.slot)[perm_T]
    v_TxR = jax.lax.ragged_dot(x_TxI[perm_T], w.a, gs_S, preferred_element_type=jnp.float32)
    v_TxR = jnp.where(_rank_mask(w, slot_sorted_T), v_TxR, 0.0)
    d_TxO = jax.lax.ragged_dot(v_TxR.astype(w.b.dtype), w.b, gs_S, preferred_element_type=jnp.float32)
    d_TxO = jnp.zeros_like(d_TxO).at[perm_T].set(d_TxO)  # rows past sum(gs) are 0 (no adapter)
    return _finish(y_TxO, d_TxO)


def _add_padded_bmm(y_TxO, x_TxI, w, meta):
    """S-LoRA's bmm baseline: every tile padded to `block_m` rows and to the max rank R, one bmm each."""
    T = x_TxI.shape[0]
    bm = meta.block_m
    perm_T = jnp.asarray(meta.perm)
    ts_N, te_N, sl_N = (jnp.asarray(a) for a in (meta.tile_start, meta.tile_end, meta.tile_slot))
    pos_NxM = ts_N[:, None] + jnp.arange(bm)[None, :]
    ok_NxM = (pos_NxM < jnp.minimum(te_N, ts_N + bm)[:, None]) & (sl_N[:, None] >= 0)
    tok_NxM = perm_T[jnp.minimum(pos_NxM, T - 1)]
    s_N = jnp.maximum(sl_N, 0)
    x_NxMxI = jnp.where(ok_NxM[..., None], x_TxI[tok_NxM], 0)
    v_NxMxR = jnp.einsum("nmi,nir->nmr", x_NxMxI, w.a[s_N], preferred_element_type=jnp.float32)
    d_NxMxO = jnp.einsum("nmr,nro->nmo", v_NxMxR.astype(w.b.dtype), w.b[s_N],
                         preferred_element_type=jnp.float32)
    tok_NxM = jnp.where(ok_NxM, tok_NxM, T)
    d_TxO = jnp.zeros((T, y_TxO.shape[1]), jnp.float32).at[tok_NxM.reshape(-1)].add(
        d_NxMxO.reshape(-1, y_TxO.shape[1]), mode="drop")
    return _finish(y_TxO, d_TxO)


def _add_loop(y_TxO, x_TxI, w, meta):
    """One matmul pair per segment, unrolled at trace time: needs concrete (numpy) metadata."""
    try:
        n_seg = int(meta.num_segments)
        seg_start, seg_len, seg_slot, perm = (np.asarray(a) for a in
                                              (meta.seg_start, meta.seg_len, meta.seg_slot, meta.perm))
    except (jax.errors.ConcretizationTypeError, jax.errors.TracerIntegerConversionError,
            jax.errors.TracerArrayConversionError) as e:
        raise ValueError("impl='loop' needs concrete metadata (numpy from build_lora_meta), "
                         "closed over rather than traced") from e
    d_TxO = jnp.zeros(y_TxO.shape, jnp.float32)
    for g in range(n_seg):
        tok = perm[seg_start[g]:seg_start[g] + seg_len[g]]
        s = int(seg_slot[g])
        v = jnp.dot(x_TxI[tok], w.a[s], preferred_element_type=jnp.float32)
        v = jnp.where(jnp.arange(w.a.shape[-1]) < w.ranks[s], v, 0.0)
        d_TxO = d_TxO.at[tok].set(jnp.dot(v.astype(w.b.dtype), w.b[s], preferred_element_type=jnp.float32))
    return _finish(y_TxO, d_TxO)


def _add_reference(y_TxO, x_TxI, w, meta):
    return lora_reference(y_TxO, x_TxI, w, jnp.asarray(meta.slot))


def _add_fused(y_TxO, x_TxI, w: Weights, meta: LoraMeta, cfg: KernelConfig):
    tiles = (meta.perm, meta.tile_start, meta.tile_end, meta.tile_slot, meta.used_tiles)
    launch = dict(block_m=meta.block_m, n_split_max=cfg.n_split_max, target_programs=cfg.target_programs,
                  unroll_k=cfg.unroll_k, unroll_n=cfg.unroll_n, num_warps=cfg.fused_warps,
                  num_stages=cfg.fused_stages, interpret=cfg.interpret, mixed_index=cfg.mixed_index)
    if isinstance(w, PagedWeights):
        return sgmv_fused_paged(y_TxO, x_TxI, w.rows, w.pages, w.rank, w.a_row, w.b_row, *tiles,
                                rows_per_page=w.rows_per_page, r_block=_pow2_ceil(max(16, w.r_max)), **launch)
    w = _pad_rank(w, _pow2_ceil(max(16, w.a.shape[-1])))
    return sgmv_fused(y_TxO, x_TxI, w.a, w.b, w.ranks, *tiles, chunk=cfg.chunk, **launch)


def _tile_loop(meta: LoraMeta, cfg: KernelConfig) -> dict:
    """The split pair's tile-loop arguments (`KernelConfig.paged_tile_programs`)."""
    if cfg.paged_flat_programs < 0:
        raise ValueError(f"paged_flat_programs must be >= 0 (0: off), got {cfg.paged_flat_programs}")
    if cfg.paged_flat_programs:
        return dict(tile_programs=cfg.paged_flat_programs, used_tiles=meta.used_tiles, flat=True)
    return dict(tile_programs=cfg.paged_tile_programs, used_tiles=meta.used_tiles) if cfg.paged_tile_programs else {}


def paged_warps_for(cfg: KernelConfig, block_m: int, r_block: int) -> int:
    """Warps per program of the paged kernels: `cfg.paged_warps`, or (None) 4 for tiles of at least 4096 fp32
    values (`block_m * r_block`, the shrink's accumulator), else 2 (`KernelConfig.paged_warps`)."""
    if cfg.paged_warps is not None:
        return cfg.paged_warps
    return 4 if block_m * r_block >= 4096 else 2


def _add_paged_group(ys_TxO, x_TxI, ws: tuple[PagedWeights, ...], meta: LoraMeta, cfg: KernelConfig):
    w0 = ws[0]
    tiles = (meta.perm, meta.tile_start, meta.tile_end, meta.tile_slot)
    common = dict(rows_per_page=w0.rows_per_page, block_m=meta.block_m, interpret=cfg.interpret,
                  mixed_index=cfg.mixed_index, phased=bool(cfg.paged_phased_loads))
    rank_GxS = jnp.stack([w.rank for w in ws])
    r_block = _pow2_ceil(max(16, *(w.r_max for w in ws)))
    warps = paged_warps_for(cfg, meta.block_m, r_block)
    small = x_TxI.shape[0] <= cfg.paged_one_launch_max_tokens
    if small and r_block <= cfg.paged_one_launch_max_rank:
        common["phased"] = cfg.paged_phased_loads is None or bool(cfg.paged_phased_loads)
        return sgmv_paged_group_one_launch(
            ys_TxO, x_TxI, w0.rows, w0.pages, rank_GxS, jnp.stack([w.a_row for w in ws]),
            jnp.stack([w.b_row for w in ws]), *tiles, r_block=r_block, k_steps=cfg.paged_k_steps,
            k_loop=cfg.paged_k_loop, active_tiles=meta.active_tiles, n_steps=cfg.paged_n_steps, num_warps=warps,
            wait_loads=cfg.paged_wait_loads, **common)
    if small and cfg.paged_small_tile_programs is not None and not cfg.paged_flat_programs:
        cfg = dataclasses.replace(cfg, paged_tile_programs=cfg.paged_small_tile_programs)
    k_steps = cfg.paged_k_steps
    if small and cfg.paged_small_k_steps and k_steps is None:
        k_steps = cfg.paged_small_k_steps
    if small and cfg.paged_small_warps and cfg.paged_warps is None:
        warps = cfg.paged_small_warps
    mid = not small and x_TxI.shape[0] <= cfg.paged_mid_max_tokens
    if mid and cfg.paged_mid_k_steps and k_steps is None:
        k_steps = cfg.paged_mid_k_steps
    if mid and cfg.paged_mid_warps and cfg.paged_warps is None:
        warps = cfg.paged_mid_warps
    shrink = functools.partial(sgmv_shrink_paged_group, x_TxI, w0.rows, w0.pages, rank_GxS,
                               jnp.stack([w.a_row for w in ws]), *tiles, r_block=r_block,
                               active_tiles=meta.active_tiles, num_warps=warps, **common, **_tile_loop(meta, cfg))
    if cfg.paged_run_time_splits:
        if not cfg.paged_flat_programs:
            raise ValueError("paged_run_time_splits needs paged_flat_programs > 0 (the programs it aims to fill)")
        k_steps, n_steps, most = run_time_split_plan(x_TxI.shape[1], w0.rows.shape[1], k_steps,
                                                     cfg.paged_run_time_splits)
        counts = run_time_split_counts(meta.used_tiles, len(ws), n_steps, most, cfg.paged_flat_programs)
        vpart = shrink(k_steps=k_steps, max_splits=most, split_counts=counts)
        # splits past this call's count were not written: masked, not summed
        vpart = jnp.where(jnp.arange(most)[None, :, None, None] < counts[0], vpart, 0.0).sum(1, keepdims=True)
    else:
        vpart = shrink(k_steps=k_steps, k_loop=cfg.paged_k_loop)
        if cfg.paged_presum_min_tokens and x_TxI.shape[0] >= cfg.paged_presum_min_tokens and vpart.shape[1] > 1:
            vpart = vpart.sum(1, keepdims=True)  # rows outside tiles are undefined, as before: never read
    return sgmv_expand_paged_group(ys_TxO, vpart, w0.rows, w0.pages, rank_GxS, jnp.stack([w.b_row for w in ws]),
                                   *tiles, n_steps=cfg.paged_n_steps, num_warps=warps, **common,
                                   **_tile_loop(meta, cfg))


def _add_pallas(y_TxO, x_TxI, w, meta, cfg: KernelConfig):
    if cfg.fused:
        return _add_fused(y_TxO, x_TxI, w, meta, cfg)
    if isinstance(w, PagedWeights):
        return _add_paged_group((y_TxO,), x_TxI, (w,), meta, cfg)[0]
    w = _pad_rank(w, max(cfg.shrink_block_r, cfg.expand_block_r))
    vpart = _pallas_vpart(x_TxI, w, meta, cfg)
    return _pallas_expand(y_TxO, vpart, w, meta, cfg)


_BASELINES = {
    "reference": _add_reference,
    "loop": _add_loop,
    "gather_bmm": _add_gather_bmm,
    "onehot": _add_onehot,
    "ragged_dot": _add_ragged_dot,
    "padded_bmm": _add_padded_bmm,
}
IMPLS = ("pallas", *_BASELINES)


# ----------------------------------------------------------------------------- public ops


def add_lora(y_TxO: jax.Array, x_TxI: jax.Array, w: Weights, meta: LoraMeta, *, impl: str = "pallas",
             config: KernelConfig | None = None) -> jax.Array:
    """`y + (x @ A[slot]) @ B[slot]` per token (rows with a negative slot unchanged), in y's dtype.

    Args:
      y_TxO: base output `[T, H_out]`, floating; with `impl="pallas"` its buffer is updated
        in place when the caller donates it (or it is dead after this call under jit).
      x_TxI: input `[T, H_in]`, floating. "pallas" needs the weights' dtype (TypeError
        otherwise: the GPU kernels' dots take one element type); the jnp impls promote x
        and the weights to their common dtype (jnp rules) and accumulate in fp32.
      w: one layer's `SlotWeights` (dense slots) or `PagedWeights` (pool pages; "pallas"
        reads them in place, the other impls gather them to slots first); slot
        padding past each rank is ignored by "pallas", "loop", "gather_bmm", "onehot",
        "ragged_dot" and must be zero for "reference" and "padded_bmm" (which multiply it).
      meta: `LoraMeta` of this step, built for these T tokens (`build_lora_meta` or
        `build_lora_meta_jnp`); slot ids must be below S (the weights' adapter count;
        checked where concrete), negative ids mean no adapter.
      impl: one of `IMPLS`. "pallas" is forward-only (differentiating it raises
        NotImplementedError); the others are differentiable.
      config: `KernelConfig` for "pallas" (None: the defaults).
    Returns:
      `[T, H_out]` in y's dtype; T = 0 returns y unchanged. Bad shapes, dtypes or (concrete)
      ids and ranks raise ValueError / TypeError before any work (see the module docstring).
    """
    if impl != "pallas" and impl not in _BASELINES:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    cfg = _config(config)
    if not _check_call(y_TxO, x_TxI, w, meta):
        return jnp.asarray(y_TxO)  # no token: the kernels' gathers cannot index an empty axis
    if impl == "pallas":
        _check_pallas_dtype(x_TxI, w)
        w, (y_TxO, x_TxI) = _mark(w, (y_TxO, x_TxI))
        return _add_pallas(y_TxO, x_TxI, w, meta, cfg)
    return _BASELINES[impl](y_TxO, x_TxI, _as_slots(w), meta)


def _as_slots(w: Weights) -> SlotWeights:
    return w.to_slots() if isinstance(w, PagedWeights) else w


def add_lora_group(ys_TxO, x_TxI: jax.Array, ws, meta: LoraMeta, *, impl: str = "pallas",
                   config: KernelConfig | None = None) -> tuple[jax.Array, ...]:
    """`add_lora(ys[g], x, ws[g], meta)` for projections sharing the input x (q, k, v; gate, up).

    With `impl="pallas"`, `PagedWeights` of one pool and one page table (`ws[g].rows`
    and `.pages` the same arrays, as `memory.pool.paged_weights` gives for one layer)
    and the split pair (`config.fused` False, `config.group_projections` True), it is
    one shrink and one expand launch for the whole group instead of one pair each;
    otherwise one `add_lora` per projection. Outputs may differ in width (GQA).
    Returns the updated outputs, a tuple in the order of `ys_TxO`; arguments are checked
    as `add_lora` checks them.
    """
    ys_TxO, ws = tuple(ys_TxO), tuple(ws)
    if len(ys_TxO) != len(ws):
        raise ValueError(f"{len(ys_TxO)} outputs for {len(ws)} weights")
    cfg = _config(config)
    if impl == "pallas" and not cfg.fused and cfg.group_projections and _paged_group(ws):
        if not min(_check_call(y, x_TxI, w, meta) for y, w in zip(ys_TxO, ws)):
            return tuple(jnp.asarray(y) for y in ys_TxO)
        for w in ws:
            _check_pallas_dtype(x_TxI, w)
        w0, (ys_TxO, x_TxI) = _mark(ws[0], (ys_TxO, x_TxI))  # the kernels read the pool through ws[0]
        return _add_paged_group(ys_TxO, x_TxI, (w0, *ws[1:]), meta, cfg)
    return tuple(add_lora(y, x_TxI, w, meta, impl=impl, config=cfg) for y, w in zip(ys_TxO, ws))


def paged_row_tables(ws, r_block: int | None = None) -> tuple[jax.Array, jax.Array]:
    """Row tables of `PagedWeights` of one pool (`lora_linear_group`): `a_tab [G, S, H_in/C, R]`,
    `b_tab [G, max H_out/C, S, R]` int32, the pool row of each row of each chunk, -1 past each rank.

    A page id names the same rows in every layer, so one build serves every layer's call
    (with `row_offset` moving to the layer's rows). `r_block`: a power of two >= 16 bounding
    every rank (default: from the weights' `r_max`).
    """
    ws = tuple(ws)
    C = ws[0].rows.shape[1]
    R = r_block or _pow2_ceil(max(16, *(w.r_max for w in ws)))
    table = functools.partial(paged_row_table, rows_per_page=ws[0].rows_per_page, r_block=R)
    a = jnp.stack([table(w.pages, w.rank, w.a_row, w.h_in // C) for w in ws])
    n_out = max(w.h_out for w in ws) // C
    return a, jnp.stack([table(w.pages, w.rank, w.b_row, n_out).transpose(1, 0, 2) for w in ws])


def lora_linear_group(x_TxI: jax.Array, ws_IxO, ws, meta: LoraMeta, *, tables=None, row_offset=None,
                      config: KernelConfig | None = None) -> tuple[jax.Array, ...]:
    """`x @ W_g` plus each token's LoRA delta, for projections sharing x, on `PagedWeights` of one pool.

    Args:
      x_TxI: input `[T, H_in]`, the base weights' dtype.
      ws_IxO: the base weights `[H_in, N_g]`, one per projection.
      ws: their `PagedWeights` (one pool and page table, as `add_lora_group` takes them).
      meta: the step's `LoraMeta`.
      tables: `paged_row_tables(ws)` (build them once a step and pass them to every layer's
        call, with `row_offset` the layer's first pool row); None builds them here.
    Returns `y_g [T, N_g]` in x's dtype. Calls of at most `config.linear_max_tokens` (and
    `pallas_kernels.lora_linear.MAX_TOKENS`) tokens are one launch
    (`lora_linear_paged_group`); longer ones are XLA's matmul then `add_lora_group`.
    """
    cfg = _config(config)
    ws_IxO, ws = tuple(ws_IxO), tuple(ws)
    if len(ws_IxO) != len(ws):
        raise ValueError(f"{len(ws_IxO)} base weights for {len(ws)} LoRA weights")
    for g, (w_IxO, w) in enumerate(zip(ws_IxO, ws)):
        S, H_in, H_out, _ = _check_weights(w)
        if w_IxO.shape != (H_in, H_out):
            raise ValueError(f"ws_IxO[{g}] must be [H_in, H_out] = [{H_in}, {H_out}] (its LoRA weights' shape), "
                             f"got {w_IxO.shape}")
        _check_meta(meta, _check_rows(x_TxI, "x", None, H_in, "H_in"), S)
    if not linear_fits(x_TxI.shape[0], ws, cfg):  # `tables` and `row_offset` serve the one launch only
        ys = tuple(jnp.dot(x_TxI, w.astype(x_TxI.dtype)) for w in ws_IxO)
        return add_lora_group(ys, x_TxI, ws, meta, config=cfg)
    a_tab, b_tab = paged_row_tables(ws) if tables is None else tables
    rank_GxS = jnp.stack([w.rank for w in ws])
    tiles = (meta.perm, meta.tile_start, meta.tile_end, meta.tile_slot)
    vpart = None
    if cfg.linear_shrink_launch:
        vpart = sgmv_shrink_paged_group(x_TxI, ws[0].rows, ws[0].pages, rank_GxS, jnp.stack([w.a_row for w in ws]),
                                        *tiles, rows_per_page=ws[0].rows_per_page, r_block=a_tab.shape[-1],
                                        block_m=meta.block_m, k_steps=cfg.paged_k_steps,
                                        active_tiles=meta.active_tiles,
                                        num_warps=paged_warps_for(cfg, meta.block_m, a_tab.shape[-1]),
                                        interpret=cfg.interpret, mixed_index=cfg.mixed_index, **_tile_loop(meta, cfg))
    return lora_linear_paged_group(
        x_TxI, ws_IxO, ws[0].rows, rank_GxS, a_tab, b_tab, meta.slot, *tiles, row_offset, vpart, block_m=meta.block_m,
        block_n=cfg.linear_block_n, block_k=cfg.linear_block_k, shrink_k_steps=cfg.linear_shrink_k_steps,
        shrink_unroll=cfg.linear_shrink_unroll, expand_unroll=cfg.linear_expand_unroll, num_warps=cfg.linear_warps,
        num_stages=cfg.linear_stages, interpret=cfg.interpret, mixed_index=cfg.mixed_index)


def linear_fits(n_tokens: int, ws, cfg: KernelConfig) -> bool:
    """Whether `lora_linear_group` runs as one launch for a call of `n_tokens` on `ws`."""
    if not (0 < n_tokens <= min(cfg.linear_max_tokens, LINEAR_MAX_TOKENS) and _paged_group(tuple(ws))):
        return False
    C = ws[0].rows.shape[1]
    return (C % cfg.linear_block_n == 0 and ws[0].h_in % cfg.linear_block_k == 0
            and all(w.h_out % cfg.linear_block_n == 0 for w in ws))


def slab_fits(n_tokens: int, h_in: int, n_out, cfg: KernelConfig) -> bool:
    """Whether `lora_linear_slab` takes a call of `n_tokens` from `h_in` to outputs `n_out`."""
    return (0 < n_tokens <= min(cfg.slab_max_tokens, SLAB_MAX_TOKENS) and h_in % cfg.slab_block_k == 0
            and all(n % cfg.slab_block_n == 0 for n in n_out))


def lora_linear_slab(x_TxI: jax.Array, ws_IxO, a_slab, b_slab, lo_GxT, hi_GxT, n_rows, offset=0, *,
                     config: KernelConfig | None = None, counters: jax.Array | None = None) -> tuple[jax.Array, ...]:
    """`x @ W_g` plus each token's LoRA delta, for projections sharing x, with the adapters in a dense slab.

    Args:
      x_TxI: input `[T, H_in]` (T <= `pallas_kernels.lora_slab.MAX_TOKENS`), the weights' dtype.
      ws_IxO: the G base weights `[H_in, N_g]`.
      a_slab, b_slab: `[M, H_in, P]` and `[M, P, N_max]`, projection `offset + g`'s A columns and
        B rows of the adapters in the slab (`slora_jax.memory.slab`), scale folded into B.
      lo_GxT, hi_GxT: int32 `[G, T]`, the slab rows `[lo, hi)` of each token's adapter in
        projection g (lo = hi: none).
      n_rows: used slab rows (int32 scalar; the kernels read no further).
      counters: optional int32 workspace, all zero, of at least `SLAB_COUNTERS` entries, shared by every
        call (the kernels' split-K counters; they leave it zero). None: each launch zeroes its own,
        one more small kernel a launch on a GPU (`pallas_kernels.lora_slab`, "Counters").
    Returns `y_g [T, N_g]` in x's dtype: two launches of plain pipelined GEMMs over dense operands,
    `slab_shrink` then `linear_slab` (the base GEMM with its K extended by the slab), or with
    `config.slab_shrink_with_base` `linear_shrink_slab` (the GEMM and the shrink side by side) then
    `slab_expand`.
    """
    cfg = _config(config)
    ws_IxO = tuple(ws_IxO)
    if x_TxI.ndim != 2:
        raise ValueError(f"x must be [T, H_in], got shape {x_TxI.shape}")
    T, H_in = x_TxI.shape
    if not slab_fits(T, H_in, [w.shape[1] for w in ws_IxO], cfg):
        raise ValueError(f"lora_linear_slab takes 1..{SLAB_MAX_TOKENS} tokens, H_in a multiple of "
                         f"slab_block_k={cfg.slab_block_k} and outputs of slab_block_n={cfg.slab_block_n}; got x "
                         f"{x_TxI.shape}, outputs {[w.shape[1] for w in ws_IxO]}")
    _check_slab(x_TxI, a_slab, b_slab, len(ws_IxO), offset)
    launch = dict(block_p=cfg.slab_block_p, num_warps=cfg.slab_warps, num_stages=cfg.slab_stages,
                  interpret=cfg.interpret, counters=counters)
    splits = cfg.slab_linear_splits or None
    if cfg.slab_shrink_with_base:
        ys, v_GxTxP = linear_shrink_slab(x_TxI, ws_IxO, a_slab, lo_GxT, hi_GxT, n_rows, offset,
                                         block_n=cfg.slab_block_n, block_k=cfg.slab_block_k, k_splits=splits,
                                         shrink_splits=cfg.slab_shrink_splits, **launch)
        return slab_expand(ys, v_GxTxP, b_slab, n_rows, offset, block_n=cfg.slab_block_n, **launch)
    v_GxTxP = slab_shrink(x_TxI, a_slab, lo_GxT, hi_GxT, n_rows, offset, block_k=cfg.slab_block_k,
                          k_splits=cfg.slab_shrink_splits, **launch)
    return linear_slab(x_TxI, ws_IxO, v_GxTxP, b_slab, n_rows, offset, block_n=cfg.slab_block_n,
                       block_k=cfg.slab_block_k, k_splits=splits, **launch)


def slab_counters() -> jax.Array:
    """A zeroed split-K counter workspace for the slab kernels (`counters=` of `lora_linear_slab`): make
    one, pass it to every call (of a step, of a run: the kernels leave it zero)."""
    return jnp.zeros((SLAB_COUNTERS,), jnp.int32)


def add_lora_slab(ys_TxO, x_TxI: jax.Array, a_slab, b_slab, lo_GxT, hi_GxT, n_rows, offset=0, *,
                  config: KernelConfig | None = None, counters: jax.Array | None = None) -> tuple[jax.Array, ...]:
    """`y_g + (x @ A) @ B` per token, for projections sharing x, with the adapters in a dense slab: the
    slab layout's `add_lora_group` (arguments as `lora_linear_slab`'s; `ys` the base outputs `[T, N_g]`).
    Two launches: `slab_shrink`, then `slab_expand` accumulating into the ys."""
    cfg = _config(config)
    ys_TxO = tuple(ys_TxO)
    _check_slab(x_TxI, a_slab, b_slab, len(ys_TxO), offset)
    for g, y in enumerate(ys_TxO):
        if y.ndim != 2 or y.shape[0] != x_TxI.shape[0]:
            raise ValueError(f"ys[{g}] must be [T={x_TxI.shape[0]}, N], got shape {y.shape}")
    launch = dict(block_p=cfg.slab_block_p, num_warps=cfg.slab_warps, num_stages=cfg.slab_stages,
                  interpret=cfg.interpret, counters=counters)
    v_GxTxP = slab_shrink(x_TxI, a_slab, lo_GxT, hi_GxT, n_rows, offset, block_k=cfg.slab_block_k,
                          k_splits=cfg.slab_shrink_splits, **launch)
    return slab_expand(tuple(ys_TxO), v_GxTxP, b_slab, n_rows, offset, block_n=cfg.slab_block_n, **launch)


class SlotSlab(NamedTuple):
    """One batch's adapters of a `SlotWeights` as a dense slab (`slab_from_slots`): `add_lora_slab`'s operands."""

    a: jax.Array  # [1, H_in, P]
    b: jax.Array  # [1, P, H_out]
    lo: jax.Array  # [1, T] int32: token t's adapter holds slab rows [lo, hi)
    hi: jax.Array  # [1, T]
    n_rows: jax.Array  # int32 scalar: rows in use, rounded up to the block


def slab_from_slots(w: SlotWeights, slot_T, *, rows: int | None = None, block: int = 64) -> SlotSlab:
    """The adapters that `slot_T` (numpy int32 `[T]`, -1 none) uses, side by side at their own ranks.

    For research code with dense stacked slots: `add_lora_slab((y,), x, s.a, s.b, s.lo, s.hi, s.n_rows)`
    then equals `lora_reference(y, x, w, slot_T)`. `rows` (a multiple of `block`, at least the rows
    used; default: those rounded up) fixes the slab's shape, so draws of one size share a compile.
    A copy of the used adapters is made (a gather on the device); the engine keeps its slab across
    steps instead (`slora_jax.memory.slab`).
    """
    slot_T = np.asarray(slot_T)
    _check_slot_ids(slot_T.shape, slot_T.dtype)
    slot_T = slot_T.astype(np.int32)
    ranks_S = np.asarray(w.ranks)
    if slot_T.size and slot_T.max() >= len(ranks_S):
        raise ValueError(f"slot ids {sorted({int(s) for s in slot_T[slot_T >= len(ranks_S)]})[:8]} are out of "
                         f"range: the weights hold S={len(ranks_S)} adapters")
    used = list(dict.fromkeys(int(s) for s in slot_T if s >= 0))
    start = np.cumsum([0] + [int(ranks_S[s]) for s in used])
    need = -(-int(start[-1]) // block) * block  # the rows the kernels read
    P = max(need, block) if rows is None else rows
    if P <= 0 or P % block or P < need:
        raise ValueError(f"rows={rows} must be a positive multiple of block={block} and hold the batch's "
                         f"{int(start[-1])} rows")
    slot_P = np.zeros(P, np.int32)
    row_P = np.zeros(P, np.int32)
    live_P = np.zeros(P, bool)
    for i, s in enumerate(used):
        slot_P[start[i] : start[i + 1]], row_P[start[i] : start[i + 1]] = s, np.arange(ranks_S[s])
        live_P[start[i] : start[i + 1]] = True
    lo_of = {s: int(start[i]) for i, s in enumerate(used)}
    lo_T = np.array([lo_of.get(int(s), 0) for s in slot_T], np.int32)
    hi_T = np.where(slot_T >= 0, lo_T + ranks_S[np.maximum(slot_T, 0)], lo_T).astype(np.int32)
    live = jnp.asarray(live_P)
    a_PxI = jnp.where(live[:, None], w.a[slot_P, :, row_P], 0)
    b_PxO = jnp.where(live[:, None], w.b[slot_P, row_P, :], 0)
    return SlotSlab(a_PxI.T[None], b_PxO[None], jnp.asarray(lo_T)[None], jnp.asarray(hi_T)[None],
                    jnp.asarray(need, jnp.int32))


def shrink(x_TxI: jax.Array, w: Weights, meta: LoraMeta, *, impl: str = "pallas",
           config: KernelConfig | None = None) -> jax.Array:
    """`v[t, :r] = x[t] @ A[slot[t]][:, :r]`: `[T, H_in] -> [T, R]` fp32, zero past the rank and for slot -1.

    `impl` is "pallas" or "reference". `R` is `a`'s rank width (`r_max` of
    `PagedWeights`, which "pallas" reads in place with the paged split shrink; the
    reference gathers them to slots first). Only the A half of `w` is read. Arguments
    are checked as `add_lora` checks them (x in A's dtype for "pallas"); T = 0 gives `[0, R]`.
    """
    if impl not in ("pallas", "reference"):
        raise ValueError(f"shrink impl must be 'pallas' or 'reference', got {impl!r}")
    cfg = _config(config)
    T, R = _check_shrink(x_TxI, w, meta)
    if not T:
        return jnp.zeros((0, R), jnp.float32)
    if impl == "reference":
        a_SxIxR, ranks_S = (w.read_a(), w.rank) if isinstance(w, PagedWeights) else (w.a, w.ranks)
        return shrink_reference(x_TxI, a_SxIxR, ranks_S, jnp.asarray(meta.slot))
    _check_pallas_dtype(x_TxI, w)
    w, (x_TxI,) = _mark(w, (x_TxI,), b=False)
    return _shrink_pallas(x_TxI, w, meta, cfg)


def _shrink_pallas(x_TxI, w: Weights, meta: LoraMeta, cfg: KernelConfig) -> jax.Array:
    slot_T = jnp.asarray(meta.slot)
    if isinstance(w, PagedWeights):
        v_TxR = _paged_shrink(x_TxI, w, meta, cfg)
        return jnp.where(_paged_rank_mask(w.rank, w.r_max, slot_T), v_TxR, 0.0)
    R = w.a.shape[-1]
    wp = _pad_rank(w, cfg.shrink_block_r)
    v_TxR = _pallas_vpart(x_TxI, wp, meta, cfg).sum(0)[:, :R]
    return jnp.where(_rank_mask(w, slot_T), v_TxR, 0.0)  # unwritten rows/blocks are undefined


def _check_shrink(x_TxI, w: Weights, meta: LoraMeta) -> tuple[int, int]:
    """`shrink`'s arguments agree with each other; returns `(T, R)`."""
    S, H_in, _, R = _check_weights(w, b=False)
    T = _check_rows(x_TxI, "x", None, H_in, "H_in")
    _check_meta(meta, T, S)
    return T, R


def _check_expand(y_TxO, v_TxR, w: Weights, meta: LoraMeta) -> int:
    """`expand`'s arguments agree with each other; returns T."""
    S, _, H_out, R = _check_weights(w, a=False)
    T = _check_rows(y_TxO, "y", None, H_out, "H_out")
    if v_TxR.ndim != 2 or v_TxR.shape != (T, R):
        what = "the paged weights' rank bound r_max" if isinstance(w, PagedWeights) else "B's rank width"
        raise ValueError(f"v must be [T, R] = [{T}, {R}] (R: {what}), got shape {v_TxR.shape}")
    _check_meta(meta, T, S)
    return T


def expand(y_TxO: jax.Array, v_TxR: jax.Array, w: Weights, meta: LoraMeta, *, impl: str = "pallas",
           config: KernelConfig | None = None) -> jax.Array:
    """`y[t] += v[t, :r] @ B[slot[t]][:r]` (v cast to B's dtype, fp32 accumulate); slot -1 rows unchanged.

    `impl` is "pallas" or "reference". `v` is `[T, R]`, R B's rank width (`r_max` of
    `PagedWeights`, whose B "pallas" reads in place with the paged split expand; the
    reference gathers it). Only the B half of `w` is read. Arguments are checked as
    `add_lora` checks them; T = 0 returns y.
    """
    if impl not in ("pallas", "reference"):
        raise ValueError(f"expand impl must be 'pallas' or 'reference', got {impl!r}")
    cfg = _config(config)
    if not _check_expand(y_TxO, v_TxR, w, meta):
        return jnp.asarray(y_TxO)
    if impl == "reference":
        b_SxRxO, ranks_S = (w.read_b(), w.rank) if isinstance(w, PagedWeights) else (w.b, w.ranks)
        return expand_reference(y_TxO, v_TxR, b_SxRxO, ranks_S, jnp.asarray(meta.slot))
    w, (y_TxO, v_TxR) = _mark(w, (y_TxO, v_TxR), a=False)
    return _expand_pallas(y_TxO, v_TxR, w, meta, cfg)


def _expand_pallas(y_TxO, v_TxR, w: Weights, meta: LoraMeta, cfg: KernelConfig) -> jax.Array:
    if isinstance(w, PagedWeights):
        return _paged_expand(y_TxO, v_TxR, w, meta, cfg)
    pad = -w.b.shape[1] % cfg.expand_block_r  # B's R: A's may differ (a rank-split A under TP)
    wp = w._replace(b=jnp.pad(w.b, ((0, 0), (0, pad), (0, 0)))) if pad else w
    v_TxR = jnp.pad(v_TxR.astype(jnp.float32), ((0, 0), (0, wp.b.shape[1] - v_TxR.shape[1])))
    return _pallas_expand(y_TxO, v_TxR[None], wp, meta, cfg)


def _paged_group(ws, x_TxI: jax.Array | None = None) -> bool:
    """`ws` are `PagedWeights` of one pool and one page table (and input width `x`'s): one launch serves them."""
    if not all(isinstance(w, PagedWeights) for w in ws):
        return False
    shared = {(w.h_in, w.rows_per_page, w.rows.shape, w.pages.shape) for w in ws}
    if len(shared) != 1 or (x_TxI is not None and shared.pop()[0] != x_TxI.shape[1]):
        raise ValueError("grouped projections need one input width, one pool and one page table")
    return True


def shrink_group(x_TxI: jax.Array, ws, meta: LoraMeta, *, impl: str = "pallas",
                 config: KernelConfig | None = None) -> tuple[jax.Array, ...]:
    """`shrink(x, ws[g], meta)` for projections sharing x: a tuple of `[T, ws[g].r_max]` fp32.

    With `impl="pallas"` and `PagedWeights` of one pool and page table (as
    `add_lora_group` takes them) it is one launch for the group; otherwise one
    `shrink` each. Used where something must happen between the halves (the
    all-gather of a rank-split A under tensor parallelism).
    """
    ws = tuple(ws)
    cfg = _config(config)
    if impl != "pallas" or not cfg.group_projections or len(ws) < 2 or not _paged_group(ws):
        return tuple(shrink(x_TxI, w, meta, impl=impl, config=cfg) for w in ws)
    if not min(_check_shrink(x_TxI, w, meta)[0] for w in ws):
        return tuple(jnp.zeros((0, w.r_max), jnp.float32) for w in ws)
    for w in ws:
        _check_pallas_dtype(x_TxI, w)
    w0, (x_TxI,) = _mark(ws[0], (x_TxI,))  # the kernel reads the pool through ws[0]
    return _shrink_paged_group(x_TxI, (w0, *ws[1:]), meta, cfg)


def _shrink_paged_group(x_TxI, ws: tuple[PagedWeights, ...], meta: LoraMeta, cfg: KernelConfig):
    w0, slot_T = ws[0], jnp.asarray(meta.slot)
    r_block = _pow2_ceil(max(16, *(w.r_max for w in ws)))
    vpart = sgmv_shrink_paged_group(
        x_TxI, w0.rows, w0.pages, jnp.stack([w.rank for w in ws]), jnp.stack([w.a_row for w in ws]), meta.perm,
        meta.tile_start, meta.tile_end, meta.tile_slot, rows_per_page=w0.rows_per_page,
        r_block=r_block, block_m=meta.block_m, k_steps=cfg.paged_k_steps, k_loop=cfg.paged_k_loop,
        active_tiles=meta.active_tiles, num_warps=paged_warps_for(cfg, meta.block_m, r_block),
        interpret=cfg.interpret, mixed_index=cfg.mixed_index, **_tile_loop(meta, cfg))
    v_GxTxR = vpart.sum(1)
    return tuple(jnp.where(_paged_rank_mask(w.rank, w.r_max, slot_T), v_GxTxR[g, :, : w.r_max], 0.0)
                 for g, w in enumerate(ws))


def expand_group(ys_TxO, vs_TxR, ws, meta: LoraMeta, *, impl: str = "pallas",
                 config: KernelConfig | None = None) -> tuple[jax.Array, ...]:
    """`expand(ys[g], vs[g], ws[g], meta)` for a group of projections; one launch as `shrink_group`.

    Each `vs[g]` is `[T, ws[g].r_max]` (as `shrink_group` gives); outputs may differ in width.
    """
    ys_TxO, vs_TxR, ws = tuple(ys_TxO), tuple(vs_TxR), tuple(ws)
    if not len(ys_TxO) == len(vs_TxR) == len(ws):
        raise ValueError(f"{len(ys_TxO)} outputs, {len(vs_TxR)} shrink results, {len(ws)} weights")
    cfg = _config(config)
    if impl != "pallas" or not cfg.group_projections or len(ws) < 2 or not _paged_group(ws):
        return tuple(expand(y, v, w, meta, impl=impl, config=cfg) for y, v, w in zip(ys_TxO, vs_TxR, ws))
    if not min(_check_expand(y, v, w, meta) for y, v, w in zip(ys_TxO, vs_TxR, ws)):
        return tuple(jnp.asarray(y) for y in ys_TxO)
    w0, (ys_TxO, vs_TxR) = _mark(ws[0], (ys_TxO, vs_TxR))  # the kernel reads the pool through ws[0]
    return _expand_paged_group(ys_TxO, vs_TxR, (w0, *ws[1:]), meta, cfg)


def _expand_paged_group(ys_TxO, vs_TxR, ws: tuple[PagedWeights, ...], meta: LoraMeta, cfg: KernelConfig):
    w0 = ws[0]
    r_block = _pow2_ceil(max(16, *(w.r_max for w in ws)))
    v_Gx1xTxR = jnp.stack([jnp.pad(v.astype(jnp.float32), ((0, 0), (0, r_block - v.shape[1]))) for v in vs_TxR])[:, None]
    return sgmv_expand_paged_group(
        ys_TxO, v_Gx1xTxR, w0.rows, w0.pages, jnp.stack([w.rank for w in ws]), jnp.stack([w.b_row for w in ws]),
        meta.perm, meta.tile_start, meta.tile_end, meta.tile_slot, rows_per_page=w0.rows_per_page,
        block_m=meta.block_m, n_steps=cfg.paged_n_steps, num_warps=paged_warps_for(cfg, meta.block_m, r_block),
        interpret=cfg.interpret, mixed_index=cfg.mixed_index, **_tile_loop(meta, cfg))


def _paged_rank_mask(rank_S: jax.Array, r_max: int, slot_T: jax.Array) -> jax.Array:
    """`[T, r_max]` bool: token has an adapter and the column is below its rank."""
    r_T = jnp.where(slot_T >= 0, rank_S[jnp.maximum(slot_T, 0)], 0)
    return jnp.arange(r_max)[None, :] < r_T[:, None]


def _paged_shrink(x_TxI, w: PagedWeights, meta: LoraMeta, cfg: KernelConfig) -> jax.Array:
    """The paged split shrink of one projection, `[T, r_max]` fp32 (rows outside tiles undefined)."""
    r_block = _pow2_ceil(max(16, w.r_max))
    vpart = sgmv_shrink_paged_group(
        x_TxI, w.rows, w.pages, w.rank[None], w.a_row[None], meta.perm, meta.tile_start, meta.tile_end,
        meta.tile_slot, rows_per_page=w.rows_per_page, r_block=r_block, block_m=meta.block_m,
        k_steps=cfg.paged_k_steps, k_loop=cfg.paged_k_loop, active_tiles=meta.active_tiles,
        num_warps=paged_warps_for(cfg, meta.block_m, r_block), interpret=cfg.interpret, mixed_index=cfg.mixed_index,
        **_tile_loop(meta, cfg))
    return vpart[0].sum(0)[:, : w.r_max]


def _paged_expand(y_TxO, v_TxR, w: PagedWeights, meta: LoraMeta, cfg: KernelConfig) -> jax.Array:
    """The paged split expand of one projection from a whole `v [T, r_max]` (one partial)."""
    r_block = _pow2_ceil(max(16, w.r_max))
    v_1x1xTxR = jnp.pad(v_TxR.astype(jnp.float32), ((0, 0), (0, r_block - v_TxR.shape[1])))[None, None]
    (y_TxO,) = sgmv_expand_paged_group(
        (y_TxO,), v_1x1xTxR, w.rows, w.pages, w.rank[None], w.b_row[None], meta.perm, meta.tile_start,
        meta.tile_end, meta.tile_slot, rows_per_page=w.rows_per_page, block_m=meta.block_m,
        n_steps=cfg.paged_n_steps, num_warps=paged_warps_for(cfg, meta.block_m, r_block), interpret=cfg.interpret,
        mixed_index=cfg.mixed_index, **_tile_loop(meta, cfg))
    return y_TxO


def random_slot_weights(key: jax.Array, ranks, h_in: int, h_out: int, *, dtype=jnp.bfloat16,
                        max_rank: int | None = None, scale: float = 1.0) -> SlotWeights:
    """Random `SlotWeights` with slot `s` of rank `ranks[s]`, zero-padded to R (a multiple of 16 by default).

    A ~ N(0, 1/H_in), B ~ N(0, scale^2/r): the delta has about the size of x's entries times scale.
    """
    ranks = np.asarray(ranks, np.int32)
    R = int(max_rank or max(16, -(-int(ranks.max(initial=1)) // 16) * 16))
    ka, kb = jax.random.split(key)
    keep_R = jnp.arange(R)
    r_S = jnp.asarray(ranks)
    a = jax.random.normal(ka, (len(ranks), h_in, R), jnp.float32) / np.sqrt(h_in)
    b = jax.random.normal(kb, (len(ranks), R, h_out), jnp.float32) * scale / jnp.sqrt(
        jnp.maximum(r_S, 1))[:, None, None]
    a = jnp.where(keep_R[None, None, :] < r_S[:, None, None], a, 0.0).astype(dtype)
    b = jnp.where(keep_R[None, :, None] < r_S[:, None, None], b, 0.0).astype(dtype)
    return SlotWeights(a, b, r_S)
