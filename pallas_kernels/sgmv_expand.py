"""SGMV expand: `y[t] += v[t, :r] @ B[slot(t)][:r]`, accumulated into y in place.

Contract
--------
Inputs (T tokens in their original order, S slots, NT tiles; tiles as in `sgmv_shrink`):
  y      `[T, H_out]` bf16 or fp32, aliased to the output (`input_output_aliases`):
         rows outside every tile are neither read nor written.
  vpart  `[k_splits, T, R]` fp32 from `sgmv_shrink` (summed over the first axis here);
         only rows of tiles and columns `< ranks[slot]` are read.
  b      `[S, R, H_out]`, scale folded in; rows `[:ranks[s]]` of slot `s` are read.
  ranks, perm, tile_start, tile_end, tile_slot: as in `sgmv_shrink`.
Output:
  y' `[T, H_out]`, same buffer as y: `y'[t] = (f32(y[t]) + (v[t] as B's dtype) @ B).astype(y.dtype)`.

Work: grid `(H_out // block_n, NT)`; a program loops over rank blocks up to its
tile's own rank (a dynamic trip count), so no work is padded to the batch max
rank; padding tiles and rank-0 slots return at once. `b[slot, r, n]` is addressed
in-kernel from the slot (where a page table will plug in).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels.compat import compiler_params, default_interpret, pl, plgpu
from pallas_kernels.sgmv_shrink import _iota, _pow2_divisor, rows_at, tile_rows


def _expand_kernel(perm_ref, tile_start_ref, tile_end_ref, tile_slot_ref, ranks_ref, vpart_ref, b_ref,
                   y_ref, o_ref, *, block_m: int, block_n: int, block_r: int, k_splits: int,
                   n_tokens: int, mixed: bool):
    nblk = pl.program_id(0)  # fastest: a tile's N blocks run together, its v rows stay in L2
    tile = pl.program_id(1)
    slot = tile_slot_ref[tile]
    safe_slot = jnp.maximum(slot, 0)
    rank = jnp.where(slot >= 0, ranks_ref[safe_slot], 0)

    @pl.when(rank > 0)
    def _():
        rows_M, row_ok_M = tile_rows(perm_ref, tile_start_ref, tile_end_ref, tile,
                                     block_m=block_m, n_tokens=n_tokens)
        n0 = nblk * block_n
        ymask_MxN = jnp.broadcast_to(row_ok_M[:, None], (block_m, block_n))

        def body(j, acc_MxN):
            r0 = j * block_r
            col_ok_R = r0 + _iota(block_r) < rank
            vmask_MxR = row_ok_M[:, None] & col_ok_R[None, :]
            v_MxR = jnp.zeros((block_m, block_r), jnp.float32)
            for s in range(k_splits):
                v_MxR += plgpu.load(rows_at(vpart_ref, (s,), rows_M, r0, block_r, mixed=mixed),
                                    mask=vmask_MxR, other=0.0)
            bmask_RxN = jnp.broadcast_to(col_ok_R[:, None], (block_r, block_n))
            # The weight address comes from the slot here: a page table plugs in at this line.
            b_RxN = plgpu.load(b_ref.at[safe_slot, pl.ds(r0, block_r), pl.ds(n0, block_n)],
                               mask=bmask_RxN, other=0)
            return acc_MxN + jnp.dot(v_MxR.astype(b_RxN.dtype), b_RxN,
                                     preferred_element_type=jnp.float32)

        n_rblk = (rank + block_r - 1) // block_r
        acc_MxN = lax.fori_loop(0, n_rblk, body, jnp.zeros((block_m, block_n), jnp.float32))
        y_MxN = plgpu.load(rows_at(y_ref, (), rows_M, n0, block_n, mixed=mixed), mask=ymask_MxN, other=0)
        out_MxN = (y_MxN.astype(jnp.float32) + acc_MxN).astype(y_MxN.dtype)
        plgpu.store(rows_at(o_ref, (), rows_M, n0, block_n, mixed=mixed), out_MxN, mask=ymask_MxN)


def sgmv_expand(y_TxO, vpart_KxTxR, b_SxRxO, ranks_S, perm_T, tile_start, tile_end, tile_slot, *,
                block_m: int, block_n: int = 128, block_r: int = 16, num_warps: int = 4,
                num_stages: int = 2, interpret: bool | None = None, mixed_index: bool | None = None):
    """Launch the expand kernel; returns y with the LoRA delta added (y's buffer, aliased).

    `block_n` is lowered to the largest power of two dividing H_out; `mixed_index` as in `sgmv_shrink`.
    """
    T, H_out = y_TxO.shape
    k_splits, _, R = vpart_KxTxR.shape
    NT = tile_slot.shape[0]
    if H_out % 16 or R % block_r or block_r < 16 or block_m < 16:
        raise ValueError(f"need H_out % 16 == 0, R % block_r == 0, block_r/block_m >= 16; got "
                         f"H_out={H_out} R={R} block_r={block_r} block_m={block_m}")
    block_n = _pow2_divisor(H_out, block_n)
    if interpret is None:
        interpret = default_interpret()
    if mixed_index is None:
        mixed_index = not interpret
    kernel = functools.partial(_expand_kernel, block_m=block_m, block_n=block_n, block_r=block_r,
                               k_splits=k_splits, n_tokens=T, mixed=mixed_index)
    return pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct(y_TxO.shape, y_TxO.dtype),
        grid=(H_out // block_n, NT),
        input_output_aliases={7: 0},
        compiler_params=compiler_params(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name="sgmv_expand",
    )(perm_T, tile_start, tile_end, tile_slot, ranks_S, vpart_KxTxR, b_SxRxO, y_TxO)


def expand_reference(y_TxO, v_TxR, b_SxRxO, ranks_S, slot_T):
    """Plain jnp: `y[t] += v[t, :rank] @ B[slot[t]][:rank]` (fp32 accumulate); rows with slot -1 unchanged."""
    R = b_SxRxO.shape[1]
    has_T = slot_T >= 0
    s_T = jnp.where(has_T, slot_T, 0)
    keep_TxR = has_T[:, None] & (jnp.arange(R)[None, :] < ranks_S[s_T][:, None])
    v_TxR = jnp.where(keep_TxR, v_TxR, 0.0).astype(b_SxRxO.dtype)
    d_TxO = jnp.einsum("tr,tro->to", v_TxR, b_SxRxO[s_T], preferred_element_type=jnp.float32)
    return (y_TxO.astype(jnp.float32) + d_TxO).astype(y_TxO.dtype)
