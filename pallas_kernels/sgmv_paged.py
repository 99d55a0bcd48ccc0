"""SGMV split pair on pool pages: shrink (split-K, fp32 partials) then expand, reading adapters in place.

Contract
--------
Inputs (T tokens in their original order, S adapters of the batch, NT tiles; tiles as in
`sgmv_shrink`: `perm`, `tile_start`, `tile_end`, `tile_slot`):
  x      `[T, H_in]`, the weights' dtype; only rows of tiles are read.
  rows   `[num_rows, C]`: the pool as rows of C = lora_chunk elements (`slora_jax.memory.pool`).
  pages  `[S * max_pages]` int32, each adapter's page table (row-major `[S, max_pages]`).
  rank, a_row, b_row `[S]` int32: this projection's rank (0: not targeted) and first
         virtual rows of A^T and B. Both are chunk-major: column chunk `j` (width C) is
         `rank` consecutive virtual rows; virtual row `v` of adapter `s` is physical row
         `pages[s, v // rows_per_page] * rows_per_page + v % rows_per_page`.
Shrink output: `vpart [k_splits, T, R]` fp32, `v = vpart.sum(0)` (R = `r_block`, static,
  a power of two >= 16 bounding the batch's ranks); only rows of tiles are written.
Expand: `y [T, H_out]` aliased to the output; `y'[t] = f32(y[t]) + (v[t] as the weights'
  dtype) @ B`, cast to y's dtype; rows outside every tile are neither read nor written.

Work. Shrink: grid `(k_splits, NT)`, program `(s, tile)` takes `k_steps` consecutive
K chunks, unrolled, so all its loads are in flight at once (a loop over chunks would
pay one memory latency per step: the one-launch `sgmv_fused` is bound by that,
benchmarks/NOTES_lora_kernels.md). Expand: grid `(n_blocks, NT)`, program `(n, tile)`
sums the partials of its rows and adds `n_steps` chunks of `v @ B`, unrolled. The
split is the fastest grid axis: a tile's programs run together and share x in L2.
Padding tiles and rank-0 adapters return at once; rows past a tile and weight rows
past an adapter's rank are masked (never read), so bytes follow each adapter's rank.

Triton rules kept: block sizes are powers of two (`block_m`, R, C); every dot is 2-D
with both sides >= 16.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels.compat import compiler_params, default_interpret, pl, plgpu
from pallas_kernels.sgmv_shrink import _iota, rows_at, tile_rows


def paged_row_ids(pages_ref, s, max_pages: int, v0, rank_ok_R, *, rows_per_page: int, block_r: int):
    """Physical pool rows `[R]` of the virtual rows `v0 .. v0 + R` of adapter `s` (0 where masked).

    A block within two pages costs two scalar page-table reads (no per-row gather, no
    chain of dependent vector loads); with pages smaller than the block, each row's
    page is read.
    """
    i_R = _iota(block_r)
    if block_r > rows_per_page:
        v_R = v0 + i_R
        page_R = pages_ref[s * max_pages + jnp.minimum(v_R // rows_per_page, max_pages - 1)]
        return jnp.where(rank_ok_R, page_R * rows_per_page + v_R % rows_per_page, 0)
    off = v0 % rows_per_page + i_R
    base = s * max_pages + v0 // rows_per_page
    p0 = pages_ref[base]
    p1 = pages_ref[jnp.minimum(base + 1, pages_ref.shape[0] - 1)]
    phys_R = jnp.where(off < rows_per_page, p0 * rows_per_page + off, p1 * rows_per_page + off - rows_per_page)
    return jnp.where(rank_ok_R, phys_R, 0)


def _tile_adapter(tile_slot_ref, rank_ref, tile):
    slot = tile_slot_ref[tile]
    safe = jnp.maximum(slot, 0)
    return safe, jnp.where(slot >= 0, rank_ref[safe], 0)


def _shrink_kernel(perm_ref, tile_start_ref, tile_end_ref, tile_slot_ref, rank_ref, pages_ref, a_row_ref,
                   rows_ref, x_ref, vpart_ref, *, block_m: int, block_r: int, chunk: int, n_in: int,
                   k_steps: int, rows_per_page: int, n_tokens: int, mixed: bool):
    split = pl.program_id(0)
    tile = pl.program_id(1)
    safe, rank = _tile_adapter(tile_slot_ref, rank_ref, tile)
    max_pages = pages_ref.shape[0] // rank_ref.shape[0]

    @pl.when(rank > 0)
    def _():
        rows_M, row_ok_M = tile_rows(perm_ref, tile_start_ref, tile_end_ref, tile, block_m=block_m,
                                     n_tokens=n_tokens)
        rank_ok_R = _iota(block_r) < rank
        precision = lax.Precision.HIGHEST if x_ref.dtype == jnp.float32 else None  # fp32: no TF32
        a_first = a_row_ref[safe]
        acc_MxR = jnp.zeros((block_m, block_r), jnp.float32)
        for u in range(k_steps):  # unrolled: every chunk's loads issue together
            j_raw = split * k_steps + u
            ok = j_raw < n_in
            j = jnp.minimum(j_raw, n_in - 1)
            phys_R = paged_row_ids(pages_ref, safe, max_pages, a_first + j * rank, rank_ok_R,
                                   rows_per_page=rows_per_page, block_r=block_r)
            at_RxC = plgpu.load(rows_at(rows_ref, (), phys_R, 0, chunk, mixed=mixed),
                                mask=jnp.broadcast_to((rank_ok_R & ok)[:, None], (block_r, chunk)), other=0)
            x_MxC = plgpu.load(rows_at(x_ref, (), rows_M, j * chunk, chunk, mixed=mixed),
                               mask=jnp.broadcast_to((row_ok_M & ok)[:, None], (block_m, chunk)), other=0)
            acc_MxR += lax.dot_general(x_MxC, at_RxC, (((1,), (1,)), ((), ())), precision=precision,
                                       preferred_element_type=jnp.float32)
        plgpu.store(rows_at(vpart_ref, (split,), rows_M, 0, block_r, mixed=mixed), acc_MxR,
                    mask=jnp.broadcast_to(row_ok_M[:, None], (block_m, block_r)))


def _expand_kernel(perm_ref, tile_start_ref, tile_end_ref, tile_slot_ref, rank_ref, pages_ref, b_row_ref,
                   rows_ref, vpart_ref, y_ref, o_ref, *, block_m: int, block_r: int, chunk: int, n_out: int,
                   n_steps: int, k_splits: int, rows_per_page: int, n_tokens: int, mixed: bool):
    nblk = pl.program_id(0)
    tile = pl.program_id(1)
    safe, rank = _tile_adapter(tile_slot_ref, rank_ref, tile)
    max_pages = pages_ref.shape[0] // rank_ref.shape[0]

    @pl.when(rank > 0)
    def _():
        rows_M, row_ok_M = tile_rows(perm_ref, tile_start_ref, tile_end_ref, tile, block_m=block_m,
                                     n_tokens=n_tokens)
        rank_ok_R = _iota(block_r) < rank
        precision = lax.Precision.HIGHEST if y_ref.dtype == jnp.float32 else None
        vmask_MxR = row_ok_M[:, None] & rank_ok_R[None, :]
        v_MxR = jnp.zeros((block_m, block_r), jnp.float32)
        for s in range(k_splits):
            v_MxR += plgpu.load(rows_at(vpart_ref, (s,), rows_M, 0, block_r, mixed=mixed), mask=vmask_MxR,
                                other=0.0)
        v_MxR = v_MxR.astype(rows_ref.dtype)
        b_first = b_row_ref[safe]
        for u in range(n_steps):
            j_raw = nblk * n_steps + u
            ok = j_raw < n_out
            j = jnp.minimum(j_raw, n_out - 1)
            phys_R = paged_row_ids(pages_ref, safe, max_pages, b_first + j * rank, rank_ok_R,
                                   rows_per_page=rows_per_page, block_r=block_r)
            b_RxC = plgpu.load(rows_at(rows_ref, (), phys_R, 0, chunk, mixed=mixed),
                               mask=jnp.broadcast_to((rank_ok_R & ok)[:, None], (block_r, chunk)), other=0)
            d_MxC = jnp.dot(v_MxR, b_RxC, precision=precision, preferred_element_type=jnp.float32)
            ymask_MxC = jnp.broadcast_to((row_ok_M & ok)[:, None], (block_m, chunk))
            y_MxC = plgpu.load(rows_at(y_ref, (), rows_M, j * chunk, chunk, mixed=mixed), mask=ymask_MxC, other=0)
            plgpu.store(rows_at(o_ref, (), rows_M, j * chunk, chunk, mixed=mixed),
                        (y_MxC.astype(jnp.float32) + d_MxC).astype(y_MxC.dtype), mask=ymask_MxC)


def _check(block_m: int, block_r: int, chunk: int, h: int, name: str) -> None:
    for what, v in (("block_m", block_m), ("r_block", block_r), ("chunk C", chunk)):
        if v < 16 or v & (v - 1):
            raise ValueError(f"{what} must be a power of two >= 16, got {v}")
    if h % chunk:
        raise ValueError(f"{name}={h} must be a multiple of the pool's row width C={chunk}")


def sgmv_shrink_paged(x_TxI, rows_NxC, pages_SxP, rank_S, a_row_S, perm_T, tile_start, tile_end, tile_slot, *,
                      rows_per_page: int, r_block: int, block_m: int, k_steps: int = 4, num_warps: int = 4,
                      num_stages: int = 1, interpret: bool | None = None, mixed_index: bool | None = None):
    """Split-K shrink from pool pages; returns `vpart [k_splits, T, r_block]` fp32 (see module doc).

    `k_steps` K chunks per program; `k_splits = ceil(H_in / C / k_steps)`.
    """
    T, H_in = x_TxI.shape
    C = rows_NxC.shape[1]
    _check(block_m, r_block, C, H_in, "H_in")
    n_in = H_in // C
    k_steps = max(1, min(k_steps, n_in))
    k_splits = -(-n_in // k_steps)
    interpret = default_interpret() if interpret is None else interpret
    mixed = (not interpret) if mixed_index is None else mixed_index
    kernel = functools.partial(_shrink_kernel, block_m=block_m, block_r=r_block, chunk=C, n_in=n_in,
                               k_steps=k_steps, rows_per_page=rows_per_page, n_tokens=T, mixed=mixed)
    return pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((k_splits, T, r_block), jnp.float32),
        grid=(k_splits, tile_slot.shape[0]),
        compiler_params=compiler_params(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name="sgmv_shrink_paged",
    )(perm_T, tile_start, tile_end, tile_slot, rank_S, pages_SxP.reshape(-1), a_row_S, rows_NxC, x_TxI)


def sgmv_expand_paged(y_TxO, vpart_KxTxR, rows_NxC, pages_SxP, rank_S, b_row_S, perm_T, tile_start, tile_end,
                      tile_slot, *, rows_per_page: int, block_m: int, n_steps: int = 2, num_warps: int = 4,
                      num_stages: int = 1, interpret: bool | None = None, mixed_index: bool | None = None):
    """Expand from pool pages into y in place (y's buffer is aliased); `n_steps` N chunks per program."""
    T, H_out = y_TxO.shape
    k_splits, _, R = vpart_KxTxR.shape
    C = rows_NxC.shape[1]
    _check(block_m, R, C, H_out, "H_out")
    n_out = H_out // C
    n_steps = max(1, min(n_steps, n_out))
    interpret = default_interpret() if interpret is None else interpret
    mixed = (not interpret) if mixed_index is None else mixed_index
    kernel = functools.partial(_expand_kernel, block_m=block_m, block_r=R, chunk=C, n_out=n_out,
                               n_steps=n_steps, k_splits=k_splits, rows_per_page=rows_per_page, n_tokens=T,
                               mixed=mixed)
    args = (perm_T, tile_start, tile_end, tile_slot, rank_S, pages_SxP.reshape(-1), b_row_S, rows_NxC,
            vpart_KxTxR, y_TxO)
    return pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct(y_TxO.shape, y_TxO.dtype),
        grid=(-(-n_out // n_steps), tile_slot.shape[0]),
        input_output_aliases={len(args) - 1: 0},
        compiler_params=compiler_params(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name="sgmv_expand_paged",
    )(*args)
