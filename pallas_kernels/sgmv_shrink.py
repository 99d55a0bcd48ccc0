"""SGMV shrink: `v[t, :r] = x[t] @ A[slot(t)][:, :r]` for rows grouped in tiles of one adapter.

Contract
--------
Inputs (T tokens in their original order, S adapter slots, NT tiles):
  x      `[T, H_in]`   bf16 or fp32, read only for rows that belong to a tile.
  a      `[S, H_in, R]` same dtype as x; slot `s` holds its adapter in columns `[:ranks[s]]`.
  ranks  `[S]`  int32, rank of each slot for this projection (0: no LoRA here, skipped).
  perm   `[T]`  int32, token index at each sorted position (tokens grouped by slot).
  tile_start `[NT]` int32, first sorted position of the tile.
  tile_end   `[NT]` int32, end (exclusive) of the tile's segment; the tile covers
             positions `[tile_start, min(tile_start + block_m, tile_end))`.
  tile_slot  `[NT]` int32, the tile's slot; -1 marks a padding tile (no work).
Output:
  vpart  `[k_splits, T, R]` fp32 partial sums over `k_splits` slices of H_in:
         `v = vpart.sum(0)`. Only rows of tiles and rank blocks `< ranks[slot]` are
         written (columns `>= rank` inside a written block are 0); the rest is
         undefined. The expand kernel reads exactly the written part.

Work: grid `(R // block_r, k_splits, NT)`. A program loads its tile's slot, looks up
the rank and returns at once if its rank block is past the rank, so a segment
costs work up to its own rank, not the batch's max. The weight address
`a[slot, k, r]` is computed in-kernel from the slot: a paged layout replaces that
one index computation. Split-K (partials, no atomics, deterministic) fills the GPU
when there are few tiles: split `s` takes K blocks `[s * ceil(n_kb / k_splits), ...)`,
the last ones may get fewer or none, and every split writes its partial.

Requires `H_in % 16 == 0` (block_k is the largest power of two <= block_k dividing
H_in) and `R % block_r == 0` (`slora_jax.ops` pads R otherwise).

Triton rules kept: block sizes are powers of two; the dot is `[block_m, block_k] @
[block_k, block_r]` with all three >= 16; columns past the rank and rows past the
tile are masked, never read.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels.compat import compiler_params, default_interpret, pl, plgpu


def _iota(n: int) -> jax.Array:
    return lax.broadcasted_iota(jnp.int32, (n,), 0)


def rows_at(ref, lead: tuple, rows_M, col0, ncols: int, *, mixed: bool):
    """View `ref[*lead, rows_M, col0:col0 + ncols]` (a row gather) -> `[M, ncols]` block.

    `mixed=True` indexes with the row array and a `pl.ds` column slice, so Triton sees
    contiguous columns (vector loads); interpret mode cannot discharge that mix, so
    `mixed=False` spells both dimensions as `[M, ncols]` index arrays instead.
    """
    if mixed:
        return ref.at[(*lead, rows_M, pl.ds(col0, ncols))]
    M = rows_M.shape[0]
    r_MxC = jnp.broadcast_to(rows_M[:, None], (M, ncols))
    c_MxC = jnp.broadcast_to((col0 + _iota(ncols))[None, :], (M, ncols))
    return ref.at[(*lead, r_MxC, c_MxC)]


def tile_rows(perm_ref, tile_start_ref, tile_end_ref, tile, *, block_m: int, n_tokens: int):
    """Token indices `[block_m]` of a tile and which of them are real (shared by both kernels)."""
    start = tile_start_ref[tile]
    end = jnp.minimum(tile_end_ref[tile], start + block_m)
    pos_M = start + _iota(block_m)
    row_ok_M = pos_M < end
    # Rows past the tile point one past the end: masked on the GPU, and dropped (not
    # duplicated onto a real row) by interpret mode's read-modify-write stores.
    rows_M = jnp.where(row_ok_M, perm_ref[jnp.minimum(pos_M, n_tokens - 1)], n_tokens)
    return rows_M, row_ok_M


def _shrink_kernel(perm_ref, tile_start_ref, tile_end_ref, tile_slot_ref, ranks_ref, x_ref, a_ref,
                   vpart_ref, *, block_m: int, block_k: int, block_r: int, k_steps: int, n_kb: int,
                   n_tokens: int, mixed: bool):
    rblk = pl.program_id(0)  # fastest: a tile's rank blocks and splits run together, x stays in L2
    split = pl.program_id(1)
    tile = pl.program_id(2)
    slot = tile_slot_ref[tile]
    safe_slot = jnp.maximum(slot, 0)
    rank = jnp.where(slot >= 0, ranks_ref[safe_slot], 0)

    @pl.when(rblk * block_r < rank)
    def _():
        rows_M, row_ok_M = tile_rows(perm_ref, tile_start_ref, tile_end_ref, tile,
                                     block_m=block_m, n_tokens=n_tokens)
        r0 = rblk * block_r
        col_ok_R = r0 + _iota(block_r) < rank
        xmask_MxK = jnp.broadcast_to(row_ok_M[:, None], (block_m, block_k))
        amask_KxR = jnp.broadcast_to(col_ok_R[None, :], (block_k, block_r))

        def body(kb, acc_MxR):
            k0 = kb * block_k
            x_MxK = plgpu.load(rows_at(x_ref, (), rows_M, k0, block_k, mixed=mixed),
                               mask=xmask_MxK, other=0)
            # The weight address comes from the slot here: a page table plugs in at this line.
            a_KxR = plgpu.load(a_ref.at[safe_slot, pl.ds(k0, block_k), pl.ds(r0, block_r)],
                               mask=amask_KxR, other=0)
            return acc_MxR + jnp.dot(x_MxK, a_KxR, preferred_element_type=jnp.float32)

        # Split `split` takes K blocks [split * k_steps, ...) (the last split may get fewer,
        # or none: it still writes its zero partial, which the expand sums).
        kb_lo = split * k_steps
        kb_hi = jnp.minimum(kb_lo + k_steps, n_kb)
        acc_MxR = lax.fori_loop(kb_lo, kb_hi, body, jnp.zeros((block_m, block_r), jnp.float32))
        smask_MxR = jnp.broadcast_to(row_ok_M[:, None], (block_m, block_r))
        plgpu.store(rows_at(vpart_ref, (split,), rows_M, r0, block_r, mixed=mixed), acc_MxR, mask=smask_MxR)


def _pow2_divisor(n: int, cap: int) -> int:
    """Largest power of two <= cap dividing n."""
    b = 1
    while b * 2 <= cap and n % (b * 2) == 0:
        b *= 2
    return b


def sgmv_shrink(x_TxI, a_SxIxR, ranks_S, perm_T, tile_start, tile_end, tile_slot, *, block_m: int,
                block_k: int = 256, block_r: int = 16, k_splits: int | None = None,
                num_warps: int = 4, num_stages: int = 3, interpret: bool | None = None,
                mixed_index: bool | None = None, active_tiles: int | None = None):
    """Launch the shrink kernel; returns `vpart [k_splits, T, R]` fp32 (see module doc).

    `block_k` is lowered to the largest power of two dividing H_in; `k_splits=None`
    picks 2 to 8 splits of H_in from `active_tiles` (a static bound on the tiles
    that hold rows, from the metadata; default NT).
    `mixed_index` (default: not interpret) selects the row-gather indexing of `rows_at`.
    """
    T, H_in = x_TxI.shape
    S, _, R = a_SxIxR.shape
    NT = tile_slot.shape[0]
    if H_in % 16 or R % block_r or block_r < 16 or block_m < 16:
        raise ValueError(f"need H_in % 16 == 0, R % block_r == 0, block_r/block_m >= 16; got "
                         f"H_in={H_in} R={R} block_r={block_r} block_m={block_m}")
    block_k = _pow2_divisor(H_in, block_k)
    n_kb = H_in // block_k
    if k_splits is None:
        # H100, 4096 -> 4096 (benchmarks/NOTES_lora_kernels.md): up to 16 tiles ran
        # best with 8 splits, 64 to ~1000 tiles with 2 (1.2-1.7x faster than 8).
        k_splits = min(8, max(2, 128 // (active_tiles or NT)), n_kb)
    k_splits = max(1, min(k_splits, n_kb))
    if interpret is None:
        interpret = default_interpret()
    if mixed_index is None:
        mixed_index = not interpret
    kernel = functools.partial(_shrink_kernel, block_m=block_m, block_k=block_k, block_r=block_r,
                               k_steps=-(-n_kb // k_splits), n_kb=n_kb, n_tokens=T, mixed=mixed_index)
    return pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((k_splits, T, R), jnp.float32),
        grid=(R // block_r, k_splits, NT),
        compiler_params=compiler_params(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name="sgmv_shrink",
    )(perm_T, tile_start, tile_end, tile_slot, ranks_S, x_TxI, a_SxIxR)


def shrink_reference(x_TxI, a_SxIxR, ranks_S, slot_T):
    """Plain jnp: `v[t, :rank] = x[t] @ A[slot[t]][:, :rank]`, fp32; zero for slot -1 and past the rank."""
    R = a_SxIxR.shape[-1]
    has_T = slot_T >= 0
    s_T = jnp.where(has_T, slot_T, 0)
    v_TxR = jnp.einsum("ti,tir->tr", x_TxI, a_SxIxR[s_T], preferred_element_type=jnp.float32)
    keep_TxR = has_T[:, None] & (jnp.arange(R)[None, :] < ranks_S[s_T][:, None])
    return jnp.where(keep_TxR, v_TxR, 0.0)
