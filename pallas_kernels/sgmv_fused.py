"""Fused SGMV: `y[t] += (x[t] @ A[slot(t)]) @ B[slot(t)]` in one launch, from dense slots or pool pages.

Contract
--------
Inputs (T tokens in their original order, S adapters, NT tiles; tiles as in `sgmv_shrink`):
  y      `[T, H_out]` bf16 or fp32, aliased to the output (`input_output_aliases`):
         rows outside every tile are neither read nor written.
  x      `[T, H_in]`, same dtype as the weights; only rows of tiles are read.
  perm, tile_start, tile_end, tile_slot: the step's `LoraMeta` (see `sgmv_shrink`).
  used_tiles `[1]` int32: tiles that hold rows (the first `used_tiles` of NT).
  Weights, one of two layouts (`paged` static):
  - dense slots: `a [S, H_in, R]`, `b [S, R, H_out]` (scale folded into b), `rank [S]`;
    slot `s` uses columns/rows `[:rank[s]]` (0: this projection has no LoRA).
  - pool pages (`slora_jax.memory.pool` layout): `rows [num_rows, C]` (one layer's row
    view), `pages [S, max_pages]` (each adapter's page table), `rank`, `a_row`,
    `b_row [S]` (the projection's rank and first virtual rows). A^T and B are
    chunk-major: column chunk `j` of width C is `rank` consecutive virtual rows,
    virtual row `v` lives at `pages[s, v // rows_per_page] * rows_per_page + v % rows_per_page`.
Output:
  y' `[T, H_out]`, y's buffer: `y'[t] = (f32(y[t]) + (v[t] as the weights' dtype) @ B)`
  cast to y's dtype, where `v[t] = x[t] @ A` accumulates in fp32.

Work: grid `(n_split_max, NT)`. Program `(p, tile)` computes its tile's whole shrink
`v [block_m, R]` (one pass over A, K-loop of `unroll_k` chunks a step), then the
expand for its share of the H_out chunks. How many of the `n_split_max` programs of
a tile take a share is decided at run time from `used_tiles` (about
`target_programs / used_tiles`, so a decode batch with a few adapters still fills
the GPU and a prefill batch with many tiles does not re-read x and A); the rest,
padding tiles and rank-0 adapters return at once. The programs of one tile run
side by side (the split is the fastest grid axis), so their repeated reads of x
and A come from L2. One launch, no partial sums in HBM.

Ranks: a tile's loads stop at its adapter's own rank (rows past it are masked, not
read), so bytes follow each adapter's rank; the MMA is `R` wide (R, static: the
power of two >= the batch's rank bucket, at least 16).

Triton rules kept: block sizes are powers of two (`block_m`, `R`, the chunk
width); every dot is 2-D with both sides >= 16.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels.compat import compiler_params, default_interpret, pl, plgpu
from pallas_kernels.sgmv_paged import paged_row_ids
from pallas_kernels.sgmv_shrink import _iota, _pow2_divisor, rows_at, tile_rows


def _largest_divisor(n: int, cap: int) -> int:
    return max(d for d in range(1, max(1, min(n, cap)) + 1) if n % d == 0)


def _fused_kernel(perm_ref, tile_start_ref, tile_end_ref, tile_slot_ref, used_ref, rank_ref, *refs,
                  paged: bool, block_m: int, block_r: int, chunk: int, h_in: int, h_out: int,
                  unroll_k: int, unroll_n: int, n_split_max: int, target_programs: int,
                  rows_per_page: int, n_tokens: int, mixed: bool):
    if paged:
        pages_ref, a_row_ref, b_row_ref, w_ref, x_ref, y_ref, o_ref = refs
        max_pages = pages_ref.shape[0] // rank_ref.shape[0]
    else:
        a_ref, b_ref, x_ref, y_ref, o_ref = refs
    split = pl.program_id(0)
    tile = pl.program_id(1)
    slot = tile_slot_ref[tile]
    safe = jnp.maximum(slot, 0)
    rank = jnp.where(slot >= 0, rank_ref[safe], 0)

    # This tile's share of the H_out chunks (decided from the real tile count).
    n_out = h_out // chunk
    n_split = jnp.clip(target_programs // jnp.maximum(used_ref[0], 1), 1, n_split_max)
    per = (n_out + n_split - 1) // n_split
    per = (per + unroll_n - 1) // unroll_n * unroll_n
    c_lo = split * per
    c_hi = jnp.minimum(c_lo + per, n_out)

    @pl.when((rank > 0) & (c_lo < n_out))
    def _():
        rows_M, row_ok_M = tile_rows(perm_ref, tile_start_ref, tile_end_ref, tile,
                                     block_m=block_m, n_tokens=n_tokens)
        i_R = _iota(block_r)
        rank_ok_R = i_R < rank
        # fp32 weights: full-precision dots (Triton's default for fp32 is TF32, ~1e-3 off).
        precision = lax.Precision.HIGHEST if x_ref.dtype == jnp.float32 else None

        if paged:
            def w_rows(first, j):  # physical rows `[R]` of chunk j's rank rows
                return paged_row_ids(pages_ref, safe, max_pages, first + j * rank, rank_ok_R,
                                     rows_per_page=rows_per_page, block_r=block_r)

            a_first, b_first = a_row_ref[safe], b_row_ref[safe]

            def shrink_dot(x_MxC, j):  # x @ A[chunk j]; A^T chunk is `[R, C]` rows
                at_RxC = plgpu.load(rows_at(w_ref, (), w_rows(a_first, j), 0, chunk, mixed=mixed),
                                    mask=jnp.broadcast_to(rank_ok_R[:, None], (block_r, chunk)), other=0)
                return lax.dot_general(x_MxC, at_RxC, (((1,), (1,)), ((), ())), precision=precision,
                                       preferred_element_type=jnp.float32)

            def load_b(j, ok):  # B chunk `[R, C]`
                return plgpu.load(rows_at(w_ref, (), w_rows(b_first, j), 0, chunk, mixed=mixed),
                                  mask=jnp.broadcast_to((rank_ok_R & ok)[:, None], (block_r, chunk)), other=0)
        else:
            def shrink_dot(x_MxC, j):
                a_CxR = plgpu.load(a_ref.at[safe, pl.ds(j * chunk, chunk), pl.ds(0, block_r)],
                                   mask=jnp.broadcast_to(rank_ok_R[None, :], (chunk, block_r)), other=0)
                return jnp.dot(x_MxC, a_CxR, precision=precision, preferred_element_type=jnp.float32)

            def load_b(j, ok):
                return plgpu.load(b_ref.at[safe, pl.ds(0, block_r), pl.ds(j * chunk, chunk)],
                                  mask=jnp.broadcast_to((rank_ok_R & ok)[:, None], (block_r, chunk)), other=0)

        xmask_MxC = jnp.broadcast_to(row_ok_M[:, None], (block_m, chunk))

        # Shrink: v = x @ A over all of H_in, `unroll_k` chunks a step.
        def k_body(step, acc_MxR):
            for u in range(unroll_k):
                j = step * unroll_k + u
                x_MxC = plgpu.load(rows_at(x_ref, (), rows_M, j * chunk, chunk, mixed=mixed),
                                   mask=xmask_MxC, other=0)
                acc_MxR += shrink_dot(x_MxC, j)
            return acc_MxR

        n_in = h_in // chunk
        v_MxR = lax.fori_loop(0, n_in // unroll_k, k_body, jnp.zeros((block_m, block_r), jnp.float32))
        v_MxR = v_MxR.astype((w_ref if paged else b_ref).dtype)

        # Expand: y[:, chunk j] += v @ B[:, chunk j] for this program's chunks.
        def n_body(step, carry):
            for u in range(unroll_n):
                j_raw = c_lo + step * unroll_n + u
                ok = j_raw < c_hi
                j = jnp.minimum(j_raw, n_out - 1)  # addresses stay in bounds; `ok` masks
                d_MxC = jnp.dot(v_MxR, load_b(j, ok), precision=precision, preferred_element_type=jnp.float32)
                ymask = xmask_MxC & ok
                y_MxC = plgpu.load(rows_at(y_ref, (), rows_M, j * chunk, chunk, mixed=mixed),
                                   mask=ymask, other=0)
                plgpu.store(rows_at(o_ref, (), rows_M, j * chunk, chunk, mixed=mixed),
                            (y_MxC.astype(jnp.float32) + d_MxC).astype(y_MxC.dtype), mask=ymask)
            return carry

        lax.fori_loop(0, (c_hi - c_lo + unroll_n - 1) // unroll_n, n_body, 0)


def _launch(y_TxO, x_TxI, rank_S, weight_args, perm_T, tile_start, tile_end, tile_slot, used_tiles, *,
            paged: bool, block_m: int, block_r: int, chunk: int, rows_per_page: int = 0,
            n_split_max: int, target_programs: int, unroll_k: int, unroll_n: int, num_warps: int,
            num_stages: int, interpret: bool | None, mixed_index: bool | None):
    T, H_in = x_TxI.shape
    _, H_out = y_TxO.shape
    NT = tile_slot.shape[0]
    for name, v in (("block_m", block_m), ("rank block R", block_r), ("chunk", chunk)):
        if v < 16 or v & (v - 1):
            raise ValueError(f"{name} must be a power of two >= 16, got {v}")
    if H_in % chunk or H_out % chunk:
        raise ValueError(f"H_in={H_in} and H_out={H_out} must be multiples of the chunk width {chunk}")
    if interpret is None:
        interpret = default_interpret()
    if mixed_index is None:
        mixed_index = not interpret
    n_in, n_out = H_in // chunk, H_out // chunk
    kernel = functools.partial(
        _fused_kernel, paged=paged, block_m=block_m, block_r=block_r, chunk=chunk, h_in=H_in,
        h_out=H_out, unroll_k=_largest_divisor(n_in, unroll_k), unroll_n=max(1, min(unroll_n, n_out)),
        n_split_max=max(1, min(n_split_max, n_out)), target_programs=target_programs,
        rows_per_page=rows_per_page, n_tokens=T, mixed=mixed_index)
    args = (perm_T, tile_start, tile_end, tile_slot, jnp.reshape(used_tiles, (1,)).astype(jnp.int32),
            rank_S, *weight_args, x_TxI, y_TxO)
    return pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct(y_TxO.shape, y_TxO.dtype),
        grid=(max(1, min(n_split_max, n_out)), NT),
        input_output_aliases={len(args) - 1: 0},
        compiler_params=compiler_params(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name="sgmv_fused_paged" if paged else "sgmv_fused",
    )(*args)


def sgmv_fused(y_TxO, x_TxI, a_SxIxR, b_SxRxO, rank_S, perm_T, tile_start, tile_end, tile_slot,
               used_tiles, *, block_m: int, chunk: int = 64, n_split_max: int = 16,
               target_programs: int = 256, unroll_k: int = 4, unroll_n: int = 2, num_warps: int = 4,
               num_stages: int = 3, interpret: bool | None = None, mixed_index: bool | None = None):
    """One-launch LoRA from dense slots (`R = a.shape[-1]`, a power of two >= 16); returns y' (y's buffer).

    The chunk (K and N block) is lowered to the largest power of two dividing H_in and H_out.
    """
    R = a_SxIxR.shape[-1]
    chunk = _pow2_divisor(math.gcd(x_TxI.shape[1], y_TxO.shape[1]), chunk)
    return _launch(y_TxO, x_TxI, rank_S, (a_SxIxR, b_SxRxO), perm_T, tile_start, tile_end, tile_slot,
                   used_tiles, paged=False, block_m=block_m, block_r=R, chunk=chunk,
                   n_split_max=n_split_max, target_programs=target_programs, unroll_k=unroll_k,
                   unroll_n=unroll_n, num_warps=num_warps, num_stages=num_stages, interpret=interpret,
                   mixed_index=mixed_index)


def sgmv_fused_paged(y_TxO, x_TxI, rows_NxC, pages_SxP, rank_S, a_row_S, b_row_S, perm_T, tile_start,
                     tile_end, tile_slot, used_tiles, *, rows_per_page: int, r_block: int, block_m: int,
                     n_split_max: int = 16, target_programs: int = 256, unroll_k: int = 4,
                     unroll_n: int = 2, num_warps: int = 4, num_stages: int = 3,
                     interpret: bool | None = None, mixed_index: bool | None = None):
    """One-launch LoRA read from pool pages (chunk width = `rows.shape[1]`); returns y' (y's buffer).

    `r_block` (static, a power of two >= 16) bounds the ranks of the batch.
    """
    return _launch(y_TxO, x_TxI, rank_S, (pages_SxP.reshape(-1), a_row_S, b_row_S, rows_NxC), perm_T, tile_start,
                   tile_end, tile_slot, used_tiles, paged=True, block_m=block_m, block_r=r_block,
                   chunk=rows_NxC.shape[1], rows_per_page=rows_per_page, n_split_max=n_split_max,
                   target_programs=target_programs, unroll_k=unroll_k, unroll_n=unroll_n,
                   num_warps=num_warps, num_stages=num_stages, interpret=interpret,
                   mixed_index=mixed_index)
